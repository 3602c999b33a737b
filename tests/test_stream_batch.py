"""Stream batching is exact: frames advanced together, each at its own step, equal the sequential loop's frames.

Tiny random models on CPU in fp32, 64x64. Each frame's output from `StreamBatcher` is compared with
`proc.process_batch([request])` for the same request, frame by frame: the bound is one uint8 level
(|a - b| <= 1/255 in [0, 1]); measured: final latents within 1.3e-6 relative, 7 values of 294,912 one level
off over 24 frames of 3 configs, the rest identical (a UNet batch of another size rounds differently); a frame
alone in flight is identical to the bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from service.processors import FrameRequest
from tests.fixtures_diffusion import create_processor, textured_frame

torch = pytest.importorskip("torch")

pytest_plugins = ["tests.fixtures_diffusion"]

MAX_LEVELS = 1  # uint8 levels: 1/255 in [0, 1]


@pytest.fixture
def standard(tiny_env):
    return create_processor("standard", style_prompt="a watercolor", num_steps=4, width=64, height=64)


def batcher_of(proc):
    from service.processors.stream_batch import StreamBatcher

    return StreamBatcher(proc)


def levels(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape == (64, 64, 3) and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def run_live(batcher, requests: list[tuple[FrameRequest, str]]) -> tuple[list[tuple[int, np.ndarray]], list[int]]:
    """Submit one frame per step, as a live stream does, then flush; (tag, image) in return order and the
    in-flight count after each submit."""
    out, depth = [], []
    for tag, (request, stream) in enumerate(requests):
        batcher.submit(request, tag, stream)
        depth.append(batcher.in_flight)
        out += batcher.step()
    out += batcher.flush()
    assert batcher.in_flight == 0
    return out, depth


class CountCalls:
    """Counts a module's real forward calls (a forward hook, the model itself untouched) and their batch sizes."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.timesteps: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.batches.append(args[0].shape[0])
        self.timesteps.append(args[1].detach().clone())


def test_one_frame_in_flight_is_bit_identical_to_the_sequential_loop(standard):
    """Alone in flight (batch 1, as the sequential loop runs it), a frame's Euler steps are the loop's own
    arithmetic to the bit: the per-sample coefficients are the loop's scalars, rounded the same way. The only
    difference a shared batch makes is then the models' rounding at another batch size."""
    batcher = batcher_of(standard)
    for i, (strength, steps) in enumerate([(0.7, 6), (1.0, 4), (0.5, 8)]):
        request = FrameRequest(textured_frame(64, 64, seed=i), "an ink drawing", strength, steps, i)
        batcher.submit(request, i)
        [(tag, image)] = batcher.flush()
        assert tag == i and np.array_equal(image, standard.process_batch([request])[0])


def test_frames_of_three_streams_equal_the_sequential_loop(standard):
    """Three streams with their own prompt, seed, strength and steps, one frame entering after every step:
    different schedules share each pass, and every frame equals its own sequential run."""
    streams = {
        "a": dict(prompt="a watercolor", strength=0.7, num_steps=4, seed=1),  # runs 3 of 4
        "b": dict(prompt="an ink drawing", strength=1.0, num_steps=3, seed=2),  # runs 3 of 3
        "c": dict(prompt="pixel art", strength=0.5, num_steps=5, seed=3),  # runs 3 of 5
    }
    names = ["a", "b", "c", "a", "b", "c", "a"]
    requests = [(FrameRequest(textured_frame(64, 64, seed=i), **streams[s]), s) for i, s in enumerate(names)]
    out, depth = run_live(batcher_of(standard), requests)
    assert sorted(tag for tag, _ in out) == list(range(len(requests)))
    assert max(depth) == 3  # three frames at three different steps of three schedules in flight
    worst = 0
    for tag, image in out:
        [reference] = standard.process_batch([requests[tag][0]])
        worst = max(worst, levels(image, reference))
    assert worst <= MAX_LEVELS, f"{worst} uint8 levels from the sequential loop"


def test_one_model_pass_per_step_whatever_is_in_flight(standard):
    """Each step() is one UNet call and one ControlNet call, on 2 x the frames in flight (CFG), with one
    timestep per sample."""
    unet, controlnet = CountCalls(standard.unet), CountCalls(standard.controlnet)
    batcher = batcher_of(standard)
    expected = []
    for i in range(5):
        steps = (4, 6)[i % 2]  # 3 and 5 steps to run (strength 0.7): different schedules in one batch
        batcher.submit(FrameRequest(textured_frame(64, 64, seed=i), "a watercolor", 0.7, steps, i), i)
        in_flight = batcher.in_flight
        before = len(unet.batches)
        batcher.step()
        assert len(unet.batches) == before + 1
        expected.append(2 * in_flight)
    assert unet.batches == controlnet.batches == expected
    assert max(expected) > 2
    mixed = unet.timesteps[-1]
    assert mixed.shape == (expected[-1],) and len(set(mixed.tolist())) > 1  # per-sample timesteps
    assert batcher.passes == 5


def test_flush_finishes_every_frame_in_flight(standard):
    batcher = batcher_of(standard)
    assert batcher.step() == [] and batcher.flush() == [] and batcher.passes == 0
    requests = [FrameRequest(textured_frame(64, 64, seed=i), "a watercolor", 0.7, 4, 7) for i in range(3)]
    for i, request in enumerate(requests):
        batcher.submit(request, f"frame{i}")  # no step between: all three start together
    assert batcher.in_flight == 3
    out = batcher.flush()
    assert [tag for tag, _ in out] == ["frame0", "frame1", "frame2"] and batcher.in_flight == 0
    assert batcher.passes == 3  # 4 x 0.7 runs 3 steps: three passes of batch 3
    for (_, image), request in zip(out, requests, strict=True):
        assert levels(image, standard.process_batch([request])[0]) <= MAX_LEVELS


def test_abandon_drops_a_streams_frames_and_the_rest_stay_exact(standard):
    batcher = batcher_of(standard)
    requests = [FrameRequest(textured_frame(64, 64, seed=i), "a watercolor", 0.7, 4, i) for i in range(4)]
    for i, request in enumerate(requests):
        batcher.submit(request, i, stream="gone" if i % 2 else "stays")
    batcher.step()
    assert batcher.abandon("gone") == [1, 3] and batcher.in_flight == 2
    out = batcher.flush()
    assert [tag for tag, _ in out] == [0, 2]
    for tag, image in out:
        assert levels(image, standard.process_batch([requests[tag]])[0]) <= MAX_LEVELS
    batcher.submit(requests[0], "again")
    assert batcher.abandon() == ["again"] and batcher.in_flight == 0 and batcher.step() == []


def test_config_change_leaves_frames_in_flight_on_their_own_config(standard):
    """A stream changes prompt, steps and strength mid-flight: the frames already in flight finish with the
    config they started with, the later ones use the new one, and the stream gets them back in order even
    though the new frames need fewer steps (no old-style frame after the first new one)."""
    old = dict(prompt="a watercolor", strength=1.0, num_steps=5, seed=4)  # 5 steps to run
    new = dict(prompt="an ink drawing", strength=0.5, num_steps=4, seed=4)  # 2 steps to run
    requests = [(FrameRequest(textured_frame(64, 64, seed=i), **(old if i < 3 else new)), "s") for i in range(6)]
    out, depth = run_live(batcher_of(standard), requests)
    assert [tag for tag, _ in out] == list(range(6))  # in order: frame 3 (2 steps) waited for frame 2 (5 steps)
    assert depth[3] == 4  # the first new frame entered with three old ones in flight
    for tag, image in out:
        request = requests[tag][0]
        assert levels(image, standard.process_batch([request])[0]) <= MAX_LEVELS
    # the old frames really are the old config's: the new config on the same image gives another picture
    last_old = requests[2][0]
    [restyled] = standard.process_batch([dataclasses.replace(last_old, **new)])
    assert levels(dict(out)[2], restyled) > 8 * MAX_LEVELS


def test_without_controlnet_and_mixed_lanes(standard):
    """Frames with and without the ControlNet: one pass per setting present, both exact."""
    unet = CountCalls(standard.unet)
    requests = [(FrameRequest(textured_frame(64, 64, seed=i), "a watercolor", 0.7, 4, i, i % 2 == 0), f"s{i}")
                for i in range(3)]
    out, _ = run_live(batcher_of(standard), requests)
    assert len(out) == 3
    for tag, image in out:
        assert levels(image, standard.process_batch([requests[tag][0]])[0]) <= MAX_LEVELS
    assert 2 in unet.batches and 4 in unet.batches  # a lane of one and a lane of two frames, CFG doubled


def test_only_the_standard_processor():
    from service.processors.stream_batch import StreamBatcher

    with pytest.raises(TypeError, match="standard"):
        StreamBatcher(object())


def test_passes_are_padded_and_split_to_the_fast_paths_batch_sizes(tiny_env):
    """With `compile` on, a pass is padded to one of `batch_sizes` (the CUDA graphs' shapes) and split past the
    largest; padding copies are dropped and every frame stays exact (`graphs` on CPU: no graphs, same shapes)."""
    proc = create_processor("standard", num_steps=6, width=64, height=64, compile="graphs", batch_sizes="1,2,4")
    unet = CountCalls(proc.unet)
    batcher = batcher_of(proc)
    requests = [(FrameRequest(textured_frame(64, 64, seed=i), "a watercolor", 0.7, 6, i), f"s{i % 2}")
                for i in range(6)]  # 5 steps each: up to 5 in flight, padded to 4 + 1 -> 4 + 1
    out, depth = run_live(batcher, requests)
    assert max(depth) == 5 and sorted(tag for tag, _ in out) == list(range(6))
    assert set(unet.batches) <= {2, 4, 8}  # batch sizes 1, 2, 4 with CFG doubling
    assert 8 in unet.batches and len(unet.batches) > batcher.passes  # 5 in flight: one pass, two calls
    for tag, image in out:
        assert levels(image, proc.process_batch([requests[tag][0]])[0]) <= MAX_LEVELS


def test_fast_mode_runs_fewer_samples_and_stays_near_the_exact_frames(tiny_env):
    """`cfg_every` N (the opt-in fast mode, residual CFG): a pass runs every frame's prompted half plus
    ceil(frames / N) unconditional samples instead of 2 x frames, a frame's first step always computes its own
    unconditional half, and the frames stay close to exact CFG's without being them."""
    steps, every = 8, 3  # 8 x 0.7 runs 6 steps: 6 frames in flight
    exact = create_processor("standard", style_prompt="a watercolor", num_steps=steps, width=64, height=64)
    fast = create_processor("standard", style_prompt="a watercolor", num_steps=steps, width=64, height=64,
                            cfg_every=every)
    unet = CountCalls(fast.unet)
    requests = [(FrameRequest(textured_frame(64, 64, seed=i), "a watercolor", 0.7, steps, 5), "s")
                for i in range(10)]
    out_fast, depth = run_live(batcher_of(fast), requests)
    out_exact, _ = run_live(batcher_of(exact), requests)
    assert [t for t, _ in out_fast] == [t for t, _ in out_exact] == list(range(10))
    full = [n for n in depth if n == 6]
    assert full and 6 + 2 in unet.batches  # a full pass: 6 prompted + ceil(6 / 3) unconditional, not 12
    assert max(unet.batches) < 2 * 6
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()
             for (_, a), (_, b) in zip(out_fast, out_exact, strict=True)]
    assert 0 < max(diffs) < 40, diffs  # not exact, not another picture
    with pytest.raises(ValueError, match="cfg_every"):
        create_processor("standard", num_steps=steps, width=64, height=64, cfg_every=0)


def test_warm_up_runs_the_steady_pass_first_and_every_pass_size(tiny_env):
    """The warm-up (graph captures, and the order compile=full compiles in) starts with the pass one stream runs
    all the time, then covers every batch size, with and without the ControlNet, without whole sequential batches
    of the big sizes (the VAE at batch 4 at most)."""
    proc = create_processor("standard", num_steps=6, width=64, height=64, compile="graphs", batch_sizes="1,2,4,8")
    assert proc.steady_size() == 8  # 6 x 0.7 runs 5 steps: 5 in flight, padded to 8
    unet, decoded = CountCalls(proc.unet), []
    proc.vae.decoder.register_forward_hook(lambda module, args, output: decoded.append(args[0].shape[0]))
    proc.warmup()
    assert unet.batches[0] == 2 * 8  # the steady pass first (CFG doubles it)
    assert {2, 4, 8, 16} <= set(unet.batches)  # every pass size
    assert decoded and max(decoded) <= 4

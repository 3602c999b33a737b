"""The GPU fast path of the diffusion processors, in one place: CUDA graphs, inductor, padded batches.

Option `compile` (env DREAMSTREAM_COMPILE), read once per processor:

| value | what runs | serves after |
| --- | --- | --- |
| `off` | plain eager PyTorch: the reference path, and the default on CPU | nothing |
| `graphs` | each model call replays a CUDA graph captured once per input shape (eager kernels) | seconds |
| `regional` (`on`) | `graphs`, plus inductor on repeated blocks and small calls, compiled first | ~2-3 min cold |
| `full` (CUDA default) | `graphs` at once; inductor compiles each whole call in the background | seconds |

In `full`, each shape's graph is swapped for the compiled one as it is ready (below).

Why it is built this way:
- Eager PyTorch at batch 1-8 is launch-bound (on an H100 the SDXL UNet call takes 81 ms eagerly, 13 ms
  when the same kernels replay from a CUDA graph): replaying a graph removes the CPU from the loop.
  The graphed functions are the model calls of one frame:
  `unet_with_control` (ControlNet and UNet captured together, so the ControlNet's residuals never
  leave the graph), `vae_encode`, `vae_decode` and `estimate_depth`. Each keeps one graph per input
  signature (shapes and dtypes, ControlNet present or not) with static input buffers; every call copies
  its inputs in, replays, and returns a clone of the outputs, so a later replay can never overwrite a
  result someone still holds (the graphs of one variant share one memory pool).
- A streamer should not wait minutes for inductor. `full` is the fastest variant (the SDXL UNet step
  ~16% faster than `regional` on an H100) but costs ~2 min of compiling per shape on a cold cache, so
  it is built while the server already serves from eager-kernel graphs (captured in seconds): the
  optimiser thread (`Accelerator._optimise`) compiles one shape after the other (batch 1 of the stream's
  default ControlNet setting first; `dynamic=None`, so the second batch size compiles a graph with a symbolic batch that
  serves every larger size too), captures its graph in a pool of its own, and publishes it. The serving
  thread picks the compiled graph up at its next call, and once every shape is compiled it drops the
  eager graphs and their memory. Progress is in the log, in `progress()` (shown by /healthz) and
  `wait_optimised()` blocks for whoever needs the final speed (benchmarks).
- Two threads, one GPU: every capture (either thread) holds `CAPTURE_LOCK` and uses
  `capture_error_mode="thread_local"` on a stream of its own, so the serving thread may allocate,
  copy and replay while the optimiser captures; only the serving thread replays graphs.
- `regional` compiles the UNet's and ControlNet's repeated transformer blocks in place (SDXL's 70 blocks
  come in 2 shapes, so a batch size costs 2 small compiles instead of a whole-UNet compile) and the small
  calls whole (VAE, depth); it compiles before serving, as in-place compiles cannot be swapped in under
  a serving thread.
- Graphs need static shapes: `batches` pads a batch to the next of `batch_sizes` (option or env
  DREAMSTREAM_BATCH_SIZES, default 1,2,4,8) by repeating its last frame and splits bigger ones, so a
  fixed set of graphs serves any number of streams. The processor's `warmup()` captures every size at
  start-up, so no viewer waits on a capture, and no eager-kernel capture ever runs beside other eager work:
  tried on the H200 (larger sizes captured by a background thread after "ready"), a capture while the serving
  thread ran eager cuBLAS calls failed (CUBLAS_STATUS_EXECUTION_FAILED, capture invalidated) and left the
  graph pool unusable ("already recording to mempool_id"). The optimiser's captures are of compiled code
  while the serving thread replays graphs.
- Inductor's compiled code is cached on disk (FX graph and Triton caches under TORCHINDUCTOR_CACHE_DIR,
  default ~/.cache/dreamstream/inductor; set before the first compile, since torch otherwise fills the
  variable with /tmp/torchinductor_USER the first time it looks), so a restart loads compiled code
  instead of generating it again.
- Weights may change in place (the lightning processor copies another step count's checkpoint into
  the same parameters): the graphs read parameters by address, so they stay valid.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from service.processors.compile_options import (
    configure_inductor,
    parse_batch_sizes,
    parse_mode,
)
from service.processors.fusion import fuse_projections

log = logging.getLogger("dreamstream.processors")

REPEATED_BLOCKS = ("BasicTransformerBlock",)  # diffusers' `_repeated_blocks` of the UNet, also in ControlNets
WARMUP_RUNS = 2  # eager runs before capture: cuDNN/cuBLAS autotuning and inductor's first call stay out of it
COMPILE_BACKEND = "inductor"  # torch.compile's backend; tests on CPU use "aot_eager" to skip C++ codegen
CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in this process (see the module docstring)
_sequence = itertools.count()  # order in which signatures were first seen: the optimiser's priority
_capture_streams = threading.local()  # one capture stream per thread: the caching allocator reuses a freed block
# only on the stream it was allocated on, so graphs captured on one stream into one pool share their scratch memory
OPTIMISING_SWITCH_S = 0.00025  # the GIL switch interval while compiling (default 5 ms), see Accelerator._optimise


def _signature(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device)
    return ("value", value)


def _batch_of(flat: list[Any]) -> int:
    return next((x.shape[0] for x in flat if isinstance(x, torch.Tensor) and x.dim()), 1)


@dataclass
class _Captured:
    """One CUDA graph of a function for one input signature: copy inputs in, replay, clone outputs out."""

    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # static input tensors (None where the leaf is not a tensor)
    outputs: Any  # static outputs, a pytree of tensors

    def __call__(self, flat: list[Any]) -> Any:
        for buffer, value in zip(self.inputs, flat, strict=True):
            if buffer is not None:
                buffer.copy_(value)
        self.graph.replay()
        return tree_map(lambda t: t.clone(), self.outputs)


@dataclass
class _Direct:
    """A function called as is for one signature (no CUDA graphs: on CPU)."""

    fn: Callable[..., Any]
    spec: Any

    def __call__(self, flat: list[Any]) -> Any:
        return self.fn(*tree_unflatten(flat, self.spec))


def capture(fn: Callable[..., Any], flat: list[Any], spec: Any, pool: Any, name: str) -> _Captured:
    """A CUDA graph of `fn` on static copies of `flat`, after WARMUP_RUNS runs (the first call of a compiled `fn`
    compiles: minutes, outside the lock) on this thread's capture stream."""
    started = time.perf_counter()
    stream = getattr(_capture_streams, "stream", None)
    if stream is None:
        stream = _capture_streams.stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        inputs = [torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)
                  if isinstance(x, torch.Tensor) else None for x in flat]
        args = tree_unflatten([b if b is not None else x for b, x in zip(inputs, flat, strict=True)], spec)
        for _ in range(WARMUP_RUNS):
            fn(*args)
    stream.synchronize()
    with CAPTURE_LOCK:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            outputs = fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
    shapes = ", ".join("x".join(map(str, x.shape)) for x in flat if isinstance(x, torch.Tensor))
    log.info("cuda graph %s captured for (%s) in %.1f s", name, shapes, time.perf_counter() - started)
    return _Captured(graph, inputs, outputs)


@dataclass
class _Example:
    """A signature the serving thread has used: what the optimiser compiles for, in `order`."""

    order: int
    spec: Any
    flat: list[Any]  # clones of one call's arguments


class AcceleratedFunction:
    """One model call as the mode runs it, per input signature: the runner serving now (`fast`), replaced by
    the optimiser's compiled runner (`better`) when it is ready. Only the serving thread calls it."""

    def __init__(self, name: str, fn: Callable[..., Any], serve_fn: Callable[..., Any], accel: Accelerator,
                 optimised_fn: Callable[..., Any] | None) -> None:
        self.name, self.fn, self.serve_fn, self.accel = name, fn, serve_fn, accel
        self.optimised_fn = optimised_fn  # compiled in the background (mode `full`), else None
        self.fast: dict[Hashable, Any] = {}
        self.better: dict[Hashable, Any] = {}
        self.examples: dict[Hashable, _Example] = {}
        self.failed: set[Hashable] = set()
        self.bypass = False  # True: call `fn` directly (profilers, FLOP counters, equivalence checks)

    def __call__(self, *args: Any) -> Any:
        if self.bypass:
            return self.fn(*args)
        flat, spec = tree_flatten(args)
        key = (spec, tuple(_signature(x) for x in flat))
        runner = self.better.get(key)
        if runner is not None:
            self.fast.pop(key, None)  # superseded: its last replay finished with the previous batch
        else:
            runner = self.fast.get(key)
            if runner is None:
                runner = self.fast[key] = self._runner(self.serve_fn, flat, spec, self.accel.pool, "")
            if (self.optimised_fn is not None and self.accel.recording and key not in self.examples
                    and key not in self.failed):
                clones = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
                self.examples[key] = _Example(next(_sequence), spec, clones)
                self.accel.start_optimising()  # again, if it had finished: a shape first used now
        return runner(flat)

    def _runner(self, fn: Callable[..., Any], flat: list[Any], spec: Any, pool: Any, variant: str) -> Any:
        if self.accel.uses_graphs:
            return capture(fn, flat, spec, pool, f"{self.name}{variant}")
        return _Direct(fn, spec)

    def todo(self) -> list[tuple[int, Hashable]]:
        return [(ex.order, key) for key, ex in list(self.examples.items())
                if key not in self.better and key not in self.failed]

    def optimise(self, key: Hashable, pool: Any) -> None:
        """Compile (first call) and capture the optimised variant for one signature, then publish it."""
        example = self.examples[key]
        assert self.optimised_fn is not None
        runner = self._runner(self.optimised_fn, example.flat, example.spec, pool, " (compiled)")
        if not self.accel.uses_graphs:
            runner(example.flat)  # compile now, not on the serving thread's next call
        self.better[key] = runner

    def drop_superseded(self) -> int:
        """Forget the fast runners that have a better one (serving thread only)."""
        stale = [key for key in list(self.fast) if key in self.better]
        for key in stale:
            del self.fast[key]
        return len(stale)


@dataclass
class Progress:
    state: str = "off"  # off | pending | running | done | failed
    done: int = 0
    total: int = 0
    started: float | None = None
    seconds: float | None = None
    errors: list[str] = field(default_factory=list)


class Accelerator:
    """One processor's fast path: which mode, which batch sizes, and the functions it has accelerated."""

    def __init__(self, mode: str, batch_sizes: tuple[int, ...], device: torch.device, why: str = "") -> None:
        self.mode, self.batch_sizes, self.device = mode, batch_sizes, torch.device(device)
        self.uses_graphs = mode != "off" and self.device.type == "cuda"
        self.background = mode == "full"  # serve first, compile in the background
        self.functions: dict[str, AcceleratedFunction] = {}
        self.cache_dir: Path | None = None
        self.pool = torch.cuda.graph_pool_handle() if self.uses_graphs else None
        self.progress_info = Progress("pending" if self.background else "off")
        self._thread: threading.Thread | None = None
        self._pool_better: Any = None  # the compiled graphs' memory pool (one, across optimiser runs)
        self._finished = threading.Event()
        self._release = False  # set by the optimiser when done: the serving thread drops the eager graphs
        # False while warm-up captures shapes nobody may use (the other ControlNet setting): those are
        # optimised only once real frames use them
        self.recording = True
        self._can_start = False  # set by the processor's warm-up: no optimising before it
        if mode in ("regional", "full"):
            self.cache_dir = configure_inductor()
        if self.uses_graphs:
            torch.backends.cudnn.benchmark = True  # shapes are static: the fastest convolution algorithm once
        if mode != "off":
            graphs = "CUDA graphs" if self.uses_graphs else "no CUDA graphs on CPU"
            when = "; serving at once, compiled in the background" if self.background else ""
            log.info("compile=%s (%s): %s, batches padded to %s%s%s", mode, why, graphs,
                     ",".join(map(str, batch_sizes)), when,
                     f"; inductor cache {self.cache_dir} (TORCHINDUCTOR_CACHE_DIR)" if self.cache_dir else "")

    @classmethod
    def from_options(cls, compile_option: Any, batch_sizes: Any, device: torch.device) -> Accelerator:
        mode, why = parse_mode(compile_option, torch.device(device))
        return cls(mode, parse_batch_sizes(batch_sizes), device, why)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def batches(self, count: int) -> list[tuple[int, int, int]]:
        """(start, stop, padded size) of each chunk a batch of `count` runs as; unpadded when off."""
        if not self.enabled:
            return [(0, count, count)]
        largest = self.batch_sizes[-1]
        chunks = []
        for start in range(0, count, largest):
            stop = min(count, start + largest)
            chunks.append((start, stop, next(s for s in self.batch_sizes if s >= stop - start)))
        return chunks

    def optimize(self, *modules: torch.nn.Module | None) -> None:
        """Channels-last weights for cuDNN, fused attention projections, and inductor on the repeated blocks
        (`regional`)."""
        if not self.enabled:
            return
        for module in modules:
            if module is None:
                continue
            if self.device.type == "cuda":
                module.to(memory_format=torch.channels_last)
            fused = fuse_projections(module)
            if fused:
                log.info("fused the q/k/v projections of %d attention layers of %s into one matmul each", fused,
                         type(module).__name__)
            if self.mode == "regional":
                blocks = [m for m in module.modules() if type(m).__name__ in REPEATED_BLOCKS]
                for block in blocks:
                    block.compile(fullgraph=True, dynamic=False)
                if blocks:
                    log.info("compile=regional: %d %s blocks of %s compiled on first use", len(blocks),
                             "/".join(REPEATED_BLOCKS), type(module).__name__)

    def function(self, name: str, fn: Callable[..., Any], has_blocks: bool = False) -> Callable[..., Any]:
        """`fn` as this mode runs it (see the module docstring's table).

        `has_blocks`: `fn` runs models whose repeated blocks `optimize` compiles in `regional` mode, so
        there it is not compiled whole (that is what `full` adds).
        """
        if not self.enabled:
            return fn
        serve_fn, optimised_fn = fn, None
        if self.mode == "regional" and not has_blocks:
            serve_fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)
        if self.mode == "full":
            optimised_fn = torch.compile(fn, fullgraph=True, dynamic=None, backend=COMPILE_BACKEND)
        wrapped = self.functions[name] = AcceleratedFunction(name, fn, serve_fn, self, optimised_fn)
        return wrapped

    # --- the background optimiser -----------------------------------------------------------------

    def start_optimising(self) -> None:
        """Compile the `full` variant of every signature recorded (and of later ones) in a daemon thread; called
        by the warm-up, and again when a new signature is first used after the thread finished."""
        if not self.background or not self._can_start or (self._thread is not None and self._thread.is_alive()):
            return
        done, total = self.progress_info.done, self.progress_info.total
        self.progress_info = Progress("running", done=done, total=total, started=time.monotonic())
        self._finished.clear()
        self._thread = threading.Thread(target=self._optimise, name="dreamstream-optimiser", daemon=True)
        self._thread.start()

    def allow_optimising(self) -> None:
        self._can_start = True
        self.start_optimising()

    def _optimise(self) -> None:
        info = self.progress_info
        if self._pool_better is None:
            self._pool_better = torch.cuda.graph_pool_handle() if self.uses_graphs else None
        pool = self._pool_better
        # Compiling is pure Python for minutes: with the default 5 ms GIL switch interval, the serving thread
        # and the event loop wait up to 5 ms each time they want the GIL back (dozens of times a frame).
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, OPTIMISING_SWITCH_S))
        log.info("optimising in the background: compiling every model call with inductor (compile=full); "
                 "frames are served meanwhile")
        try:
            with torch.inference_mode():
                while True:
                    todo = sorted((order, name, key) for name, fn in list(self.functions.items())
                                  for order, key in fn.todo())
                    info.total = info.done + len(todo)
                    if not todo:
                        break
                    _, name, key = todo[0]
                    fn = self.functions[name]
                    batch = _batch_of(fn.examples[key].flat)
                    started = time.monotonic()
                    try:
                        if self.device.type == "cuda":
                            with torch.cuda.stream(torch.cuda.Stream()):
                                fn.optimise(key, pool)
                        else:
                            fn.optimise(key, pool)
                    except Exception as exc:  # keep serving from the eager graph of this signature
                        fn.failed.add(key)
                        info.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
                        log.exception("optimising %s failed; that shape keeps its eager CUDA graph", name)
                        continue
                    info.done += 1
                    log.info("optimised %s for batch %d in %.0f s (%d/%d)", name, batch, time.monotonic() - started,
                             info.done, info.total)
        except Exception as exc:
            info.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            log.exception("the background optimiser stopped")
        sys.setswitchinterval(switch)
        info.seconds = time.monotonic() - (info.started or time.monotonic())
        info.state = "failed" if info.errors and not info.done else "done"
        self._release = True
        log.info("optimising done in %.0f s: %d of %d model calls compiled%s", info.seconds, info.done,
                 info.total, f", {len(info.errors)} failed (see above)" if info.errors else "")
        self._finished.set()

    def release_superseded(self) -> None:
        """On the serving thread, between batches: once optimising is done, free the eager graphs' memory."""
        if not self._release:
            return
        self._release = False
        dropped = sum(fn.drop_superseded() for fn in self.functions.values())
        for fn in self.functions.values():
            fn.examples = {k: v for k, v in fn.examples.items() if k not in fn.better}
        if self.uses_graphs:
            with CAPTURE_LOCK:
                torch.cuda.empty_cache()
        if dropped:
            log.info("released %d eager CUDA graphs superseded by compiled ones", dropped)

    def wait_optimised(self, timeout: float | None = None) -> bool:
        """Block until the background optimiser is done (True), or `timeout` passes (False)."""
        if self._thread is None:
            return True
        return self._finished.wait(timeout)

    def progress(self) -> dict[str, Any]:
        info = self.progress_info
        out: dict[str, Any] = {"state": info.state, "mode": self.mode, "done": info.done, "total": info.total}
        if info.started is not None:
            out["seconds"] = round(info.seconds if info.seconds is not None else time.monotonic() - info.started, 1)
        if info.errors:
            out["errors"] = info.errors[-3:]
        return out

    def bypass(self, on: bool = True) -> None:
        """Run the accelerated functions eagerly (or again from their graphs): for profilers and checks."""
        for fn in self.functions.values():
            fn.bypass = on

    def graph_count(self) -> int:
        return sum(isinstance(r, _Captured) for fn in self.functions.values()
                   for r in [*fn.fast.values(), *fn.better.values()])

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "cuda_graphs": self.uses_graphs, "batch_sizes": list(self.batch_sizes),
                "graphs_captured": self.graph_count(), "optimise": self.progress()}

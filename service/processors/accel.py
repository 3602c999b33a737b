"""The GPU fast path of the diffusion processors, in one place: CUDA graphs, inductor, padded batches.

Option `compile` (env DREAMSTREAM_COMPILE), read once per processor:

| value | what runs | start-up |
| --- | --- | --- |
| `off` | plain eager PyTorch: the reference path, and the default on CPU | none |
| `graphs` | every model call replays a CUDA graph captured once per input shape (eager kernels) | seconds |
| `regional` (`on`; CUDA default) | `graphs`, plus inductor on repeated blocks and small calls (below) | ~2-3 min |
| `full` | `graphs`, plus inductor on each whole call, ControlNet+UNet included: the fastest | ~2 min per shape |

Why it is built this way:
- Eager PyTorch at batch 1-8 is launch-bound (on an H100 the SDXL UNet call takes 81 ms eagerly, 13 ms
  when the same kernels replay from a CUDA graph): replaying a graph removes the CPU from the loop.
  The graphed functions are the model calls of one frame:
  `unet_with_control` (ControlNet and UNet captured together, so the ControlNet's residuals never
  leave the graph), `vae_encode`, `vae_decode` and `estimate_depth`. Each keeps one graph per input
  signature (shapes and dtypes, ControlNet present or not) with static input buffers; every call copies
  its inputs in, replays, and returns a clone of the outputs, so a later replay can never overwrite a
  result someone still holds (the graphs of a processor share one memory pool).
- These are our own graphs, not `torch.compile(mode="reduce-overhead")`'s: capture needs no inductor
  at all (`graphs` mode), and with inductor we choose how much to compile. `regional` compiles the
  UNet's and ControlNet's repeated transformer blocks (SDXL's 70 blocks come in 2 shapes, so a batch
  size costs 2 small compiles instead of a whole-UNet compile of ~2 minutes) and the small calls
  whole (VAE encode/decode: seconds; depth: ~20 s per shape); what stays eager (the UNet's ResNet
  blocks, up/down sampling) replays from the graph without launch cost. `full` also compiles
  ControlNet+UNet whole: measured on an H100, the SDXL UNet step is ~16% faster than `regional`, at
  ~2 min of start-up per batch shape (cached on disk for restarts). docs/sections/50-performance.md
  has the figures.
- Graphs need static shapes: `batches` pads a batch to the next of `batch_sizes` (option or env
  DREAMSTREAM_BATCH_SIZES, default 1,2,4,8) by repeating its last frame and splits bigger ones, so a
  fixed set of graphs serves any number of streams. The processor's `warmup()` captures (and compiles)
  every size at start-up, with progress in the log, so no viewer waits on a compile.
- Inductor's compiled code is cached on disk (FX graph and Triton caches under TORCHINDUCTOR_CACHE_DIR,
  default ~/.cache/dreamstream/inductor), so a restart loads compiled code instead of generating it
  again (the benchmark's figures are cold-cache start-ups; warm restarts were not measured).
- Weights may change in place (the lightning processor copies another step count's checkpoint into
  the same parameters): the graphs read parameters by address, so they stay valid.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

log = logging.getLogger("dreamstream.processors")

MODES = ("off", "graphs", "regional", "full")
REPEATED_BLOCKS = ("BasicTransformerBlock",)  # diffusers' `_repeated_blocks` of the UNet, also in ControlNets
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
WARMUP_RUNS = 2  # eager runs before capture: cuDNN/cuBLAS autotuning and inductor's first call stay out of it
_ON = {"1", "true", "yes", "on"}
_OFF = {"", "0", "false", "no", "off", "none", "eager"}


def parse_mode(value: Any, device: torch.device) -> tuple[str, str]:
    """(mode, why) from the `compile` option, DREAMSTREAM_COMPILE, or the device's default."""
    origin = "option compile"
    if value is None:
        raw = os.environ.get("DREAMSTREAM_COMPILE")
        value, origin = (raw, "env DREAMSTREAM_COMPILE") if raw is not None and raw.strip() else (None, "default")
    if value is None:
        return ("regional", "default on CUDA") if device.type == "cuda" else ("off", "default on CPU")
    text = str(value).strip().lower()
    if value is True or text in _ON:
        return ("regional" if device.type == "cuda" else "off"), f"{origin}={value}"
    if value is False or text in _OFF:
        return "off", f"{origin}={value}"
    if text not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)} (or on/off), got {value!r}")
    return text, f"{origin}={text}"


def parse_batch_sizes(value: Any) -> tuple[int, ...]:
    """`batch_sizes` option, DREAMSTREAM_BATCH_SIZES ("1,2,4,8") or the default: sorted, positive, unique."""
    if value is None:
        value = os.environ.get("DREAMSTREAM_BATCH_SIZES") or DEFAULT_BATCH_SIZES
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        sizes = sorted({int(v) for v in items if str(v) != ""})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"batch_sizes must be positive integers such as 1,2,4,8, got {value!r}") from exc
    if not sizes or sizes[0] < 1 or any(isinstance(v, bool) for v in items):
        raise ValueError(f"batch_sizes must be positive integers such as 1,2,4,8, got {value!r}")
    return tuple(sizes)


def configure_inductor() -> Path:
    """Inductor settings for inference, and its on-disk cache where a restart finds it (returns the folder)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreamstream" / "inductor"
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))
    inductor_config.fx_graph_cache = True
    inductor_config.conv_1x1_as_mm = True  # 1x1 convolutions (SD 1.5's attention projections) as matmuls
    # One compiled entry per (block shape, batch size) for two processors: far above the default of 8.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    return folder


def _signature(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device)
    return ("value", value)



@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # static input tensors (None where the leaf is not a tensor)
    outputs: Any  # static outputs, a pytree of tensors


class CudaGraphed:
    """`fn` of tensor arguments, replayed from one CUDA graph per input signature (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], name: str, pool: Any) -> None:
        self.fn, self.name, self.pool = fn, name, pool
        self.graphs: dict[Hashable, _Captured] = {}
        self.bypass = False  # True: call `fn` directly (profilers, FLOP counters, equivalence checks)

    def __call__(self, *args: Any) -> Any:
        if self.bypass:
            return self.fn(*args)
        flat, spec = tree_flatten(args)
        key = (spec, tuple(_signature(x) for x in flat))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(flat, spec)
        for buffer, value in zip(captured.inputs, flat, strict=True):
            if buffer is not None:
                buffer.copy_(value)
        captured.graph.replay()
        return tree_map(lambda t: t.clone(), captured.outputs)

    def _capture(self, flat: list[Any], spec: Any) -> _Captured:
        started = time.perf_counter()
        inputs = [torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x) if isinstance(x, torch.Tensor)
                  else None for x in flat]
        args = tree_unflatten([b if b is not None else x for b, x in zip(inputs, flat, strict=True)], spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.fn(*args)
        shapes = ", ".join("x".join(map(str, x.shape)) for x in flat if isinstance(x, torch.Tensor))
        log.info("cuda graph %s captured for (%s) in %.1f s", self.name, shapes, time.perf_counter() - started)
        return _Captured(graph, inputs, outputs)


class Accelerator:
    """One processor's fast path: which mode, which batch sizes, and the functions it has accelerated."""

    def __init__(self, mode: str, batch_sizes: tuple[int, ...], device: torch.device, why: str = "") -> None:
        self.mode, self.batch_sizes, self.device = mode, batch_sizes, torch.device(device)
        self.uses_graphs = mode != "off" and self.device.type == "cuda"
        self.functions: dict[str, Any] = {}
        self.cache_dir: Path | None = None
        self._pool = torch.cuda.graph_pool_handle() if self.uses_graphs else None
        if mode in ("regional", "full"):
            self.cache_dir = configure_inductor()
        if self.uses_graphs:
            torch.backends.cudnn.benchmark = True  # shapes are static: the fastest convolution algorithm once
        if mode != "off":
            graphs = "CUDA graphs" if self.uses_graphs else "no CUDA graphs on CPU"
            log.info("compile=%s (%s): %s, batches padded to %s%s", mode, why, graphs,
                     ",".join(map(str, batch_sizes)),
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
        """Channels-last weights for cuDNN, and inductor on the repeated blocks (`regional`)."""
        if not self.enabled:
            return
        for module in modules:
            if module is None:
                continue
            if self.device.type == "cuda":
                module.to(memory_format=torch.channels_last)
            if self.mode == "regional":
                blocks = [m for m in module.modules() if type(m).__name__ in REPEATED_BLOCKS]
                for block in blocks:
                    block.compile(fullgraph=True, dynamic=False)
                if blocks:
                    log.info("compile=regional: %d %s blocks of %s compiled on first use", len(blocks),
                             "/".join(REPEATED_BLOCKS), type(module).__name__)

    def function(self, name: str, fn: Callable[..., Any], has_blocks: bool = False) -> Callable[..., Any]:
        """`fn` as this mode runs it: itself, compiled whole, and replayed from CUDA graphs.

        `has_blocks`: `fn` runs models whose repeated blocks `optimize` compiles in `regional` mode, so
        there it is not compiled whole (that is what `full` adds).
        """
        if not self.enabled:
            return fn
        if self.mode == "full" or (self.mode == "regional" and not has_blocks):
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        if self.uses_graphs:
            fn = CudaGraphed(fn, name, self._pool)
        self.functions[name] = fn
        return fn

    def bypass(self, on: bool = True) -> None:
        """Run the graphed functions eagerly (or again from their graphs): for profilers and checks."""
        for fn in self.functions.values():
            if isinstance(fn, CudaGraphed):
                fn.bypass = on

    def graph_count(self) -> int:
        return sum(len(fn.graphs) for fn in self.functions.values() if isinstance(fn, CudaGraphed))

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "cuda_graphs": self.uses_graphs, "batch_sizes": list(self.batch_sizes),
                "graphs_captured": self.graph_count()}

"""`InMemoryMerger`: sources resident in device memory, one live model, merges without I/O.

Each source (and the base, for methods that need one) is read once into one row of an `[R, P]`
buffer (P = the live model's parameter count, in its parameter order). The live model is built on
the meta device and its parameters are then replaced by views into one flat `[P]` output buffer,
so a merge writes the next candidate in place: no allocation proportional to the model, no disk.

`apply(config)` takes a mergekit configuration (`search.mergeconfig`), resolves every tensor's
recipe exactly as `merge-search merge` does, and then, as the method's spec says
(`search.methods`, its `kernel` and `precompute`):
- an elementwise kernel (linear, task_arithmetic): consecutive tensors with the same recipe form
  one flat run, merged by one kernel call over the run with the op order of the method's tensor
  function (so the same bits). Kernels are `torch.compile`d for large models (checked bit for
  bit against the eager kernel on the spec's probe first, else eager); eager works in bounded
  chunks.
- a per-tensor kernel (ties): one call per tensor, over the cached work of `precompute` (TIES'
  magnitude ranks, which depend only on the task vectors: 4 bytes per element and model, at
  first use); where the kernel does not apply (ties with `rescale`), the tensor function.
- no kernel (dare_*, slerp): per tensor, through `search.methods.merge_tensor`.

When the rows do not fit the device budget, they stay in (pinned) host memory and each run is
streamed through a device staging buffer in chunks; still no disk.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from search.checkpoints import Checkpoint, model_layer_count
from search.errors import CheckpointError, MergeSearchError
from search.mergeconfig import MergeConfig, TensorRecipe, parse_merge_config, resolve
from search.methods import DTYPES, METHODS, FlatInputs, members, merge_tensor

log = logging.getLogger(__name__)

CHUNK = 1 << 22  # elements per eager step / per staging copy
COMPILE_MIN_PARAMS = 20_000_000  # below this, eager is fast enough and compiling costs seconds


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeSearchError(f"device {device!r} requested but no CUDA device is available")
    return torch.device(device)


@functools.lru_cache(maxsize=1024)  # called per tensor and model on every trial: no syscalls then
def model_key(path: str | Path) -> str:
    """How a model reference in a merge config is matched to a loaded source: its real path."""
    return os.path.realpath(os.path.expanduser(str(path)))


@dataclass(frozen=True)
class Segment:
    name: str  # tensor name in the checkpoints
    offset: int  # start in the flat buffer
    shape: tuple[int, ...]
    numel: int


class InMemoryMerger:
    """Merges of `sources` (+ `base`) into one live model, in place.

    sources: aligned checkpoints (see `search.checkpoints.assert_aligned`); the first one's config
    builds the model. budget_bytes: device memory the rows may take (default: all free memory on
    cuda, unbounded on cpu); past it they stream from host memory. compile: torch.compile the
    fused kernels (default: for models of at least COMPILE_MIN_PARAMS parameters).
    """

    def __init__(self, sources: Sequence[Checkpoint], *, base: Checkpoint | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 budget_bytes: int | None = None, compile: bool | None = None):
        if not sources:
            raise MergeSearchError("the merger needs at least one source")
        rows = list(sources) + ([base] if base is not None else [])
        self.keys = {model_key(ck.path): i for i, ck in enumerate(rows)}
        self.device, self.dtype = torch.device(device), dtype
        self.model = self._empty_model(rows[0])
        self.num_layers = model_layer_count(rows[0].config)
        self.segments = self._layout(self.model)
        self.numel = sum(s.numel for s in self.segments)
        row_bytes = self.numel * torch.empty((), dtype=dtype).element_size()
        if budget_bytes is None and self.device.type == "cuda":
            budget_bytes = int(torch.cuda.mem_get_info(self.device)[0] * 0.9) - row_bytes
        self.resident = budget_bytes is None or len(rows) * row_bytes <= budget_bytes
        host = self.device if self.resident else torch.device("cpu")
        self.buffer = torch.empty((len(rows), self.numel), dtype=dtype, device=host,
                                  pin_memory=not self.resident and self.device.type == "cuda")
        for r, ckpt in enumerate(rows):
            self._load_row(r, ckpt)
        self.out = torch.empty(self.numel, dtype=dtype, device=self.device)
        self._bind(self.model)
        largest = max(s.numel for s in self.segments)
        self._staging = None if self.resident else torch.empty(
            (len(rows), max(min(CHUNK, self.numel), largest)), dtype=dtype, device=self.device)
        if not self.resident:
            log.info("sources exceed the device budget: streaming from host memory")
        self._compile = self.numel >= COMPILE_MIN_PARAMS if compile is None else compile
        self._kernels: dict[str, object] = {}
        self._cache: dict[tuple, torch.Tensor] = {}  # MethodSpec.precompute results

    # --- loading ---------------------------------------------------------------------------

    @staticmethod
    def _empty_model(ckpt: Checkpoint):
        # Parameters on the meta device (no memory), buffers such as rotary tables real.
        config = AutoConfig.from_pretrained(ckpt.path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # tied parameters must be one object before they become views
        return model.eval()

    @staticmethod
    def _layout(model) -> list[Segment]:
        segments, offset = [], 0
        for name, p in model.named_parameters():  # tied parameters appear once
            segments.append(Segment(name, offset, tuple(p.shape), p.numel()))
            offset += p.numel()
        return segments

    def _load_row(self, row: int, ckpt: Checkpoint) -> None:
        missing = [s.name for s in self.segments if s.name not in ckpt.tensors]
        if missing:
            raise CheckpointError(
                f"{ckpt.path}: {len(missing)} tensors the model needs are missing, e.g. {missing[0]}")
        for s in self.segments:
            shape = ckpt.tensors[s.name].shape
            if tuple(shape) != s.shape:
                raise CheckpointError(
                    f"tensor {s.name}: shape {tuple(shape)} in {ckpt.path} but the model config asks for {s.shape}")
            dest = self.buffer[row, s.offset : s.offset + s.numel]
            ckpt.read_into(s.name, dest)
            if not bool(torch.isfinite(dest).all()):
                raise CheckpointError(f"tensor {s.name} in {ckpt.path} holds NaN or inf values")

    def _bind(self, model) -> None:
        """Replace every parameter (tied ones included) by a view into `self.out`."""
        views = {s.name: torch.nn.Parameter(self.out[s.offset : s.offset + s.numel].view(s.shape),
                                            requires_grad=False) for s in self.segments}
        by_id = {id(p): views[name] for name, p in model.named_parameters()}
        for module in model.modules():
            for pname, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[pname] = by_id[id(p)]
        model.to(self.device)  # buffers only: the parameters already live there

    # --- merging ---------------------------------------------------------------------------

    def recipes(self, config: MergeConfig | dict) -> list[TensorRecipe]:
        """Every live tensor's recipe under `config` (validated as `merge-search merge` does)."""
        cfg = config if isinstance(config, MergeConfig) else parse_merge_config(config)
        if cfg.slices:
            raise MergeSearchError("the in-memory merger takes `models:` configs, not `slices:`")
        out = []
        for s in self.segments:
            rec = resolve(cfg, s.name, self.num_layers)
            for ref in rec.models:
                if model_key(ref) not in self.keys:
                    raise MergeSearchError(f"merge config names model {ref!r}, which is not a loaded source")
            out.append(rec)
        return out

    @torch.inference_mode()
    def apply(self, config: MergeConfig | dict) -> None:
        """Merge in place: the live model's parameters become the merge `config` describes."""
        recipes = self.recipes(config)
        i = 0
        while i < len(recipes):
            rec = recipes[i]
            rows = tuple(self.keys[model_key(ref)] for ref in rec.models)
            kernel = METHODS[rec.method].kernel
            j = i + 1
            if kernel is not None and kernel.runs:  # elementwise: one call over the run of equal recipes
                key = _run_key(rec)
                while j < len(recipes) and _run_key(recipes[j]) == key:
                    j += 1
                seg_end = self.segments[j - 1]
                self._fused(rec, rows, self.segments[i].offset, seg_end.offset + seg_end.numel)
            else:
                self._per_tensor(rec, rows, self.segments[i], i)
            i = j

    def _slices(self, rows: Sequence[int], a: int, b: int) -> tuple[torch.Tensor, ...]:
        """Row slices [a, b) on the device: views when resident, else copied to staging."""
        if self.resident:
            return tuple(self.buffer[r, a:b] for r in rows)
        out = []
        for k, r in enumerate(rows):
            stage = self._staging[k, : b - a]
            stage.copy_(self.buffer[r, a:b], non_blocking=True)
            out.append(stage)
        return tuple(out)

    def _kernel(self, method: str):
        if method not in self._kernels:
            fn = METHODS[method].kernel.fn
            self._kernels[method] = self._compiled(method) if self._compile else fn
        return self._kernels[method]

    def _compiled(self, method: str):
        """torch.compile of the method's kernel, if it gives the eager bits on its probe; else
        the eager kernel (logged)."""
        kernel = METHODS[method].kernel
        try:
            compiled = torch.compile(kernel.fn, dynamic=True, options=dict(kernel.compile_options))
            g = torch.Generator(device="cpu").manual_seed(0)
            xs = tuple(torch.randn(100_003, generator=g).to(self.device, self.dtype) for _ in range(3))
            args = kernel.probe(xs, self.device)
            want, got = torch.empty_like(xs[0]), torch.empty_like(xs[0])
            kernel.fn(*args, want)
            compiled(*args, got)
            if torch.equal(want, got):
                return compiled
            log.warning("compiled %s kernel differs from eager in %.2f%% of elements: using eager",
                        method, 100 * (want != got).float().mean().item())
        except Exception as e:  # no compiler, unsupported device: eager is always correct
            log.warning("torch.compile unavailable for the %s kernel (%s): using eager", method, e)
        return kernel.fn

    def _flat(self, rec: TensorRecipe, flat: tuple[torch.Tensor, ...], numel: int, cache=None) -> FlatInputs:
        spec = METHODS[rec.method]
        idx = members(spec, rec)
        weights = (torch.tensor([float(rec.params[k]["weight"]) for k in idx], dtype=torch.float32, device=self.device)
                   if "weight" in spec.model_params else None)
        return FlatInputs(members=tuple(flat[k] for k in idx), base=flat[rec.base] if spec.needs_base else None,
                          weights=weights, recipe=rec, member_params=[rec.params[k] for k in idx],
                          cache=None if cache is None else [cache[k] for k in idx], numel=numel)

    def _fused(self, rec: TensorRecipe, rows: tuple[int, ...], a: int, b: int) -> None:
        spec = METHODS[rec.method]
        kernel = self._kernel(rec.method)
        step = b - a if (self._compile and self.resident) else CHUNK
        for c in range(a, b, step):
            e = min(c + step, b)
            kernel(*spec.kernel.args(self._flat(rec, self._slices(rows, c, e), e - c)), self.out[c:e])

    def _per_tensor(self, rec: TensorRecipe, rows: tuple[int, ...], seg: Segment, index: int) -> None:
        spec = METHODS[rec.method]
        flat = self._slices(rows, seg.offset, seg.offset + seg.numel)
        tensors = [x.view(seg.shape) for x in flat]
        cache = None
        if spec.precompute is not None:
            cache = [None if k == rec.base else self._cached(index, rows, k, rec, tensors) for k in range(len(rows))]
        if spec.kernel is not None:
            args = spec.kernel.args(self._flat(rec, flat, seg.numel, cache))
            if args is not None:
                self._kernel(rec.method)(*args, self.out[seg.offset : seg.offset + seg.numel])
                return
        group = None
        if spec.precompute_group is not None and spec.group_cache_when(rec.shared):
            key = (rec.method, "group", index, rows)
            if key not in self._cache:
                idx = members(spec, rec)
                rank, count = spec.precompute_group(tensors[rec.base] if rec.base is not None else None,
                                                    [tensors[k] for k in idx])
                self._cache[key] = (rank.to(self.buffer.device), count)
            rank, count = self._cache[key]
            group = (rank.to(self.device, non_blocking=True), count)
        merged = merge_tensor(rec, tensors, out_dtype=self.dtype, cache=cache, group_cache=group)
        self.out[seg.offset : seg.offset + seg.numel].copy_(merged.reshape(-1))

    def _cached(self, index: int, rows: tuple[int, ...], k: int, rec: TensorRecipe, tensors) -> object:
        """The method's precomputed work for one tensor and model (TIES' magnitude ranks):
        computed at first use and kept where the rows live; None where the model's parameters
        need none."""
        spec = METHODS[rec.method]
        if not spec.cache_when(rec.params[k]):
            return None
        key = (rec.method, index, rows[k], rows[rec.base] if rec.base is not None else -1)
        if key not in self._cache:
            base = tensors[rec.base] if rec.base is not None else None
            self._cache[key] = spec.precompute(base, tensors[k]).to(self.buffer.device)
        return self._cache[key].to(self.device, non_blocking=True)


def _run_key(rec: TensorRecipe) -> tuple:
    """Tensors merged by one fused run share method, models, base and every parameter value."""
    return (rec.method, rec.models, rec.base, tuple(tuple(sorted(p.items())) for p in rec.params),
            tuple(sorted(rec.shared.items())))

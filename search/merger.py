"""`InMemoryMerger`: sources resident in device memory, one live model, merges without I/O.

Each source (and the base, for methods that need one) is read once into one row of an `[R, P]`
buffer (P = the live model's parameter count, in its parameter order). The live model is built on
the meta device and its parameters are then replaced by views into one flat `[P]` output buffer,
so a merge writes the next candidate in place: no allocation proportional to the model, no disk.

`apply(config)` takes a mergekit configuration (`search.mergeconfig`), resolves every tensor's
recipe exactly as `merge-search merge` does, and then:
- linear / task_arithmetic: consecutive tensors with the same recipe form one flat run, merged by
  one kernel over the run with the same op order as `search.methods` (so the same bits). The
  kernel is `torch.compile`d for large models (checked bit for bit against `search.methods` on a
  probe first, else eager); eager works in bounded chunks.
- ties: per tensor, one kernel (compiled like the others) over the task vectors, trimmed by
  magnitude ranks that depend only on the task vectors and so are computed once and cached
  (4 bytes per element and model); with `rescale`, through `search.methods`.
- dare_* / slerp: per tensor, through `search.methods.merge_tensor`.

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
from search.methods import NORMALIZE_EPS, check_recipe, magnitude_rank, merge_tensor, topk_count

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FUSED = ("linear", "task_arithmetic")
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


# --- fused kernels: the op order of search.methods, over flat runs ---------------------------

def _linear_kernel(xs: tuple[torch.Tensor, ...], w: torch.Tensor, divisor: torch.Tensor | None,
                   out: torch.Tensor) -> None:
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for i in range(len(xs)):
        acc.addcmul_(xs[i], w[i])
    if divisor is not None:
        acc.div_(divisor)
    out.copy_(acc)


def _task_arithmetic_kernel(xs: tuple[torch.Tensor, ...], base: torch.Tensor, w: torch.Tensor,
                            divisor: torch.Tensor | None, lam: float, out: torch.Tensor) -> None:
    b = base.float()
    mixed = (xs[0].float() - b) * w[0]
    for i in range(1, len(xs)):
        mixed = mixed + (xs[i].float() - b) * w[i]
    if divisor is not None:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    out.copy_(b + mixed)


def _ties_kernel(xs: tuple[torch.Tensor, ...], base: torch.Tensor, ranks: tuple[torch.Tensor | None, ...],
                 ks: tuple[int, ...], w: torch.Tensor, normalize: bool, lam: float, out: torch.Tensor) -> None:
    """TIES (no rescale) on one tensor, flat: trim by cached rank, elect signs, disjoint mean."""
    b = base.float()
    ds = []
    for i in range(len(xs)):
        d = xs[i].float() - b
        if ranks[i] is not None:
            d = d * (ranks[i] < ks[i])
        ds.append(d * w[i])
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    majority = (total >= 0).to(torch.float32) * 2 - 1
    mixed, divisor = None, None
    for i in range(len(ds)):
        agree = ds[i].sign() == majority
        term, share = ds[i] * agree, w[i] * agree
        mixed = term if mixed is None else mixed + term
        divisor = share if divisor is None else divisor + share
    if normalize:
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    if lam != 1:
        mixed = mixed * lam
    out.copy_(b + mixed)


def _divisor(w: torch.Tensor, method: str) -> torch.Tensor:
    """The normalizing sum, computed eagerly as search.methods does (a compiled reduction may
    round it differently, and one ulp here changes every element)."""
    if method == "linear":
        return w.reshape(1, -1).sum(dim=1)
    divisor = w.sum(dim=0, keepdim=True)
    divisor[divisor.abs() < NORMALIZE_EPS] = 1
    return divisor


# linear's reference uses fused multiply-adds, so its compiled form must contract a + b*c too;
# task arithmetic's reference rounds every product, so its compiled form must not.
_COMPILE_OPTIONS = {"linear": {"cpp.enable_floating_point_contract_flag": "fast"}, "task_arithmetic": {},
                    "ties": {}}
_KERNELS = {"linear": _linear_kernel, "task_arithmetic": _task_arithmetic_kernel, "ties": _ties_kernel}


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
        self._ranks: dict[tuple[int, int, int], torch.Tensor] = {}

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
            j = i + 1
            if rec.method in FUSED:
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
            fn = _KERNELS[method]
            self._kernels[method] = self._compiled(method, fn) if self._compile else fn
        return self._kernels[method]

    def _compiled(self, method: str, fn):
        """torch.compile(fn), if it gives the eager bits on a probe; else fn (logged)."""
        try:
            compiled = torch.compile(fn, dynamic=True, options=_COMPILE_OPTIONS[method])
            g = torch.Generator(device="cpu").manual_seed(0)
            xs = tuple(torch.randn(100_003, generator=g).to(self.device, self.dtype) for _ in range(3))
            w = torch.tensor([0.31, 0.27, 0.55], device=self.device)
            if method == "linear":
                args = (xs, w, _divisor(w, method))
            elif method == "task_arithmetic":
                args = (xs[1:], xs[0], w[:2], _divisor(w[:2], method), 0.7)
            else:
                rank = magnitude_rank(xs[1].float() - xs[0].float())
                args = (xs[1:], xs[0], (rank, None), (40_000, 0), w[:2], True, 0.7)
            want, got = torch.empty_like(xs[0]), torch.empty_like(xs[0])
            fn(*args, want)
            compiled(*args, got)
            if torch.equal(want, got):
                return compiled
            log.warning("compiled %s kernel differs from eager in %.2f%% of elements: using eager",
                        method, 100 * (want != got).float().mean().item())
        except Exception as e:  # no compiler, unsupported device: eager is always correct
            log.warning("torch.compile unavailable for the %s kernel (%s): using eager", method, e)
        return fn

    def _fused(self, rec: TensorRecipe, rows: tuple[int, ...], a: int, b: int) -> None:
        kernel = self._kernel(rec.method)
        step = b - a if (self._compile and self.resident) else CHUNK
        members = [k for k in range(len(rows)) if k != rec.base]
        w = self._weights(rec, members)
        divisor = _divisor(w, rec.method) if rec.shared["normalize"] else None
        for c in range(a, b, step):
            e = min(c + step, b)
            xs = self._slices(rows, c, e)
            if rec.method == "linear":
                kernel(xs, w, divisor, self.out[c:e])
            else:
                kernel(tuple(xs[k] for k in members), xs[rec.base], w, divisor, float(rec.shared["lambda"]),
                       self.out[c:e])

    def _weights(self, rec: TensorRecipe, members: Sequence[int]) -> torch.Tensor:
        return torch.tensor([float(rec.params[k]["weight"]) for k in members], dtype=torch.float32, device=self.device)

    def _per_tensor(self, rec: TensorRecipe, rows: tuple[int, ...], seg: Segment, index: int) -> None:
        flat = self._slices(rows, seg.offset, seg.offset + seg.numel)
        tensors = [x.view(seg.shape) for x in flat]
        ranks = None
        if rec.method == "ties":
            ranks = [None if k == rec.base or rec.params[k].get("density", 1.0) >= 1
                     else self._rank(index, rows[k], rows[rec.base], tensors[k], tensors[rec.base])
                     for k in range(len(rows))]
            if not rec.shared["rescale"]:
                members = [k for k in range(len(rows)) if k != rec.base]
                check_recipe(rec)
                w = self._weights(rec, members)
                ks = tuple(topk_count(seg.numel, rec.params[k]["density"]) for k in members)
                self._kernel("ties")(tuple(flat[k] for k in members), flat[rec.base],
                                     tuple(ranks[k] for k in members), ks, w, bool(rec.shared["normalize"]),
                                     float(rec.shared["lambda"]), self.out[seg.offset : seg.offset + seg.numel])
                return
        merged = merge_tensor(rec, tensors, out_dtype=self.dtype, ranks=ranks)
        self.out[seg.offset : seg.offset + seg.numel].copy_(merged.reshape(-1))

    def _rank(self, index: int, row: int, base_row: int, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """TIES magnitude ranks of one task vector: computed once, cached where the rows live."""
        key = (index, row, base_row)
        if key not in self._ranks:
            self._ranks[key] = magnitude_rank(x.float() - base.float()).to(self.buffer.device)
        return self._ranks[key].to(self.device, non_blocking=True)


def _run_key(rec: TensorRecipe) -> tuple:
    """Tensors merged by one fused run share method, models, base and every parameter value."""
    return (rec.method, rec.models, rec.base, tuple(tuple(sorted(p.items())) for p in rec.params),
            tuple(sorted(rec.shared.items())))

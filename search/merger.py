"""`InMemoryMerger`: sources resident in device memory, one live model, merges without I/O.

Each source is read once into one row of a `[N, P]` buffer (P = parameters of the model, in the
live model's parameter order). The live model is built on the meta device and its parameters are
then replaced by views into one flat `[P]` output buffer, so a merge is a single fused op over the
sources (for `linear`, `out = w @ sources`): no allocation proportional to the model and no disk
I/O per trial, and the next forward pass sees the new weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from search.checkpoints import Checkpoint
from search.errors import CheckpointError, MergeSearchError

log = logging.getLogger(__name__)

# Elements per step when merging half-precision sources through the fp32 scratch.
_CHUNK = 1 << 22

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeSearchError(f"device {device!r} requested but no CUDA device is available")
    return torch.device(device)


@dataclass(frozen=True)
class Segment:
    name: str  # tensor name in the checkpoints
    offset: int  # start in the flat buffer
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class InMemoryMerger:
    """Linear merges of `sources` into one live model, in place.

    sources: aligned checkpoints (see `search.checkpoints.assert_aligned`); the first one's
    config builds the model. normalize: divide the weights by their sum, as mergekit's `linear`.
    """

    def __init__(
        self,
        sources: Sequence[Checkpoint],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        normalize: bool = True,
    ):
        if len(sources) < 1:
            raise MergeSearchError("the merger needs at least one source")
        self.sources, self.normalize = list(sources), normalize
        self.device, self.dtype = torch.device(device), dtype
        self.model = self._empty_model(self.sources[0])
        self.segments = self._layout(self.model)
        self.numel = sum(s.numel for s in self.segments)
        self.buffer = torch.empty((len(self.sources), self.numel), dtype=dtype, device=self.device)
        for row, ckpt in enumerate(self.sources):
            self._load_row(row, ckpt)
        self.out = torch.empty(self.numel, dtype=dtype, device=self.device)
        self._bind(self.model)
        # Weights and accumulation in fp32; half-precision sources are merged chunk by chunk into
        # a fixed fp32 scratch and rounded once (in-place bf16 chains mis-round).
        self._weights = torch.empty(len(self.sources), dtype=torch.float32, device=self.device)
        self._scratch = (
            None
            if dtype == torch.float32
            else torch.empty(min(self.numel, _CHUNK), dtype=torch.float32, device=self.device)
        )

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
            segments.append(Segment(name, offset, tuple(p.shape)))
            offset += p.numel()
        return segments

    def _load_row(self, row: int, ckpt: Checkpoint) -> None:
        missing = [s.name for s in self.segments if s.name not in ckpt.tensors]
        if missing:
            raise CheckpointError(
                f"{ckpt.path}: {len(missing)} tensors the model needs are missing, e.g. {missing[0]}"
            )
        for s in self.segments:
            t = ckpt.read(s.name)
            if tuple(t.shape) != s.shape:
                raise CheckpointError(
                    f"tensor {s.name}: shape {tuple(t.shape)} in {ckpt.path} but the model "
                    f"config asks for {s.shape}"
                )
            self.buffer[row, s.offset : s.offset + s.numel].copy_(t.reshape(-1))
            if not torch.isfinite(self.buffer[row, s.offset : s.offset + s.numel]).all():
                raise CheckpointError(f"tensor {s.name} in {ckpt.path} holds NaN or inf values")

    def _bind(self, model) -> None:
        """Replace every parameter (tied ones included) by a view into `self.out`."""
        views = {
            s.name: torch.nn.Parameter(self.out[s.offset : s.offset + s.numel].view(s.shape), requires_grad=False)
            for s in self.segments
        }
        by_id = {id(p): views[name] for name, p in model.named_parameters()}
        for module in model.modules():
            for pname, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[pname] = by_id[id(p)]
        model.to(self.device)  # buffers only: the parameters already live there

    def source_weights(self, index: int) -> list[float]:
        return [1.0 if i == index else 0.0 for i in range(len(self.sources))]

    def effective_weights(self, weights: Sequence[float]) -> list[float]:
        """The coefficients applied to each source (after normalization)."""
        if len(weights) != len(self.sources):
            raise MergeSearchError(f"expected {len(self.sources)} weights but got {len(weights)}")
        w = [float(x) for x in weights]
        if self.normalize:
            total = sum(w)
            if abs(total) < 1e-12:
                raise MergeSearchError(f"weights {w} sum to 0: cannot normalize")
            w = [x / total for x in w]
        return w

    @torch.inference_mode()
    def apply(self, weights: Sequence[float]) -> None:
        """Merge in place: the live model's parameters become sum_i w_i * source_i."""
        w = self.effective_weights(weights)
        self._weights.copy_(torch.tensor(w, dtype=torch.float64))
        if self._scratch is None:
            torch.mv(self.buffer.t(), self._weights, out=self.out)
            return
        for start in range(0, self.numel, _CHUNK):
            end = min(start + _CHUNK, self.numel)
            acc = self._scratch[: end - start]
            acc.copy_(self.buffer[0, start:end]).mul_(float(w[0]))
            for i in range(1, len(self.sources)):
                acc.add_(self.buffer[i, start:end], alpha=float(w[i]))
            self.out[start:end].copy_(acc)

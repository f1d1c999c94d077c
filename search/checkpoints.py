"""Open source checkpoints (a local folder or a hub id already cached) and check they can be merged.

    path = resolve_model_path("hfl/llama-3-chinese-8b-instruct-v2")   # never touches the network
    with open_checkpoint("inst-v2", path) as ck:
        w = ck.read("model.layers.0.mlp.up_proj.weight")
    assert_aligned([ck_v1, ck_v2, ck_meta])   # AlignmentError listing every mismatch

Only safetensors are read: the header is parsed here (names, dtypes, shapes, offsets), tensors
are read lazily through `safe_open`. Pickle weights are refused, since loading them can run code.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from search.errors import AlignmentError, CheckpointError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")
# Model config fields that must agree for tensors with the same names to mean the same thing.
CONFIG_FIELDS = (
    "model_type", "architectures", "num_hidden_layers", "hidden_size", "vocab_size",
    "intermediate_size", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings",
)
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit

# safetensors dtype code -> torch attribute name; looked up with getattr so an older torch that
# lacks one (or a code added later) leaves the raw code string instead of crashing.
_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
}
_MISSING = object()


class _Corrupt(Exception):
    """A safetensors header that does not parse; re-raised as CheckpointError naming the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives. `dtype` is the raw safetensors code (e.g. "F4") when torch has no match."""

    file: Path
    dtype: torch.dtype | str
    shape: tuple[int, ...]
    start: int = -1  # absolute byte offset of the data in `file` (-1: unknown)


class Checkpoint:
    """One source model: its config, a map of every tensor, and cached read handles per file."""

    def __init__(self, name: str, path: Path, config: dict, tensors: dict[str, TensorInfo]):
        self.name = name
        self.path = path
        self.config = config
        self.tensors = tensors  # ordered as stored: shard by shard, by offset within a shard
        self._handles: dict[tuple[Path, str], object] = {}

    def fingerprint(self) -> dict:
        """What identifies these weights without hashing gigabytes: the resolved folder, and per
        safetensors file its size and a sha256 of its header (every tensor's name, dtype, shape
        and offsets) with the first and last 64 KiB of its data. A retrained or swapped
        checkpoint at the same path changes it; reading it costs a few hundred KiB per file."""
        import hashlib
        import struct

        files = {}
        for file in sorted({info.file for info in self.tensors.values()}):
            size = Path(file).stat().st_size
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                digest = hashlib.sha256(f.read(n))
                digest.update(f.read(1 << 16))
                f.seek(max(8 + n, size - (1 << 16)))
                digest.update(f.read())
            files[Path(file).name] = {"bytes": size, "sha256_header_and_ends": digest.hexdigest()}
        return {"path": str(Path(self.path).resolve()), "files": files}

    def read(self, tensor_name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor `tensor_name`, read from disk onto `device`; the caller owns it (may modify it)."""
        info = self.tensors.get(tensor_name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {tensor_name!r}")
        key = (info.file, str(device))
        try:
            handle = self._handles.get(key)
            if handle is None:
                handle = self._handles[key] = safe_open(str(info.file), framework="pt", device=str(device))
            tensor = handle.get_tensor(tensor_name)
        except Exception as e:  # safetensors raises its own error types; name the file and tensor
            raise CheckpointError(f"{info.file}: cannot read tensor {tensor_name} ({e})") from e
        # On CPU, safetensors returns a view of its copy-on-write memory map that later reads of
        # the same handle share: an in-place edit by the caller would leak into them. Copy.
        return tensor.clone() if tensor.device.type == "cpu" else tensor

    def read_into(self, tensor_name: str, dest: torch.Tensor) -> None:
        """Read `tensor_name` into the flat `dest` (numel must match; dtype converted if needed).

        Same dtype into contiguous CPU memory: read straight from the file into `dest`, with no
        memory map and no intermediate copy, so loading N sources peaks at the rows themselves.
        """
        info = self.tensors.get(tensor_name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {tensor_name!r}")
        direct = (info.dtype == dest.dtype and info.start >= 0 and dest.device.type == "cpu"
                  and dest.is_contiguous() and math.prod(info.shape) == dest.numel())
        if not direct:
            dest.copy_(self.read(tensor_name).reshape(-1))
            return
        raw = dest.view(torch.uint8).numpy()
        try:
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.start)
                got = f.readinto(raw)
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {tensor_name} ({e})") from e
        if got != raw.nbytes:
            raise CheckpointError(f"{info.file}: tensor {tensor_name} is truncated ({got} of {raw.nbytes} bytes)")

    def close(self) -> None:
        """Release the open file handles (memory maps); `read` reopens them if called again."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {str(self.path)!r}, {len(self.tensors)} tensors)"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (not at import time)."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def resolve_model_path(path_or_id: str, base_dir: Path | None = None) -> Path:
    """A local model folder, or the cached snapshot folder of hub id "org/name"; never the network.

    Relative paths are taken against `base_dir` (e.g. the config file's folder) and `~` is expanded.
    """
    local = Path(path_or_id).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = Path(base_dir).expanduser() / local
    if local.is_dir():
        return local.resolve()
    cache = hub_cache_dir()
    detail = ""
    if path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import IncompleteSnapshotError

        try:
            return Path(snapshot_download(path_or_id, cache_dir=cache, local_files_only=True))
        except IncompleteSnapshotError as e:
            detail = f"; the cached snapshot is incomplete: {e}"
        except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, a bad id a ValueError
            pass
    raise CheckpointError(
        f"{path_or_id}: not a local folder and not in the local Hugging Face cache ({cache}){detail}"
    )


def open_checkpoint(name: str, path: Path) -> Checkpoint:
    """Open the model folder `path`: config.json plus `model.safetensors` or a sharded index.

    Only headers are read here; every shard the index names must exist and hold exactly the
    tensors the index assigns to it. Raises CheckpointError naming the folder or file at fault.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    files = sorted(p.name for p in path.iterdir())
    if not files:
        raise CheckpointError(f"{path}: empty folder, no model files")
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if not single.is_file() and not index.is_file():
        raise CheckpointError(_no_weights_message(path, files))
    config = _read_config(path / "config.json")
    tensors = _read_header(single) if single.is_file() else _read_index(index)
    logger.debug("opened %s: %d tensors", path, len(tensors))
    return Checkpoint(name, path, config, tensors)


def _no_weights_message(path: Path, files: list[str]) -> str:
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json")]
    if pickles:
        return (f"{path}: only pickle weights ({', '.join(pickles[:3])}); pickle checkpoints are refused "
                "(loading them can run code): convert to safetensors, e.g. load with transformers and "
                "save_pretrained(out, safe_serialization=True)")
    if "adapter_config.json" in files:
        return f"{path}: a PEFT adapter, not a full model; merge the adapter into its base model first"
    return f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}{_examples([f for f in files if '.safetensors' in f])}"


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; every source needs its model config")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object but got {type(config).__name__}")
    return config


def _read_index(index: Path) -> dict[str, TensorInfo]:
    """Tensors of a sharded checkpoint, shard by shard in file-name order (model-00001-of-… first)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(tensor)
    missing = [s for s in by_shard if Path(s).name != s or not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shard(s) not in the folder: {', '.join(missing)}")
    tensors: dict[str, TensorInfo] = {}
    for shard, expected in sorted(by_shard.items()):
        file = index.parent / shard
        held = _read_header(file)
        absent, extra = sorted(expected - held.keys()), sorted(held.keys() - expected)
        if absent or extra:
            raise CheckpointError(
                f"{file}: does not hold what {index.name} says ({len(absent)} listed tensors absent"
                f"{_examples(absent)}, {len(extra)} unlisted tensors present{_examples(extra)})"
            )
        tensors.update(held)
    return tensors


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header: 8-byte little-endian length, JSON, then the data region."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise _Corrupt(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise _Corrupt(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise _Corrupt("header is not a JSON object")
        data_len = size - 8 - n
        entries = []
        for name, entry in header.items():
            if name != "__metadata__":
                entries.append((name, *_parse_entry(name, entry, data_len)))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from e
    except (_Corrupt, ValueError) as e:  # ValueError covers JSON and UTF-8 decoding
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from e
    entries.sort(key=lambda e: e[3])  # storage order
    return {name: TensorInfo(file, dtype, shape, 8 + n + begin) for name, dtype, shape, begin in entries}


def _parse_entry(name: str, entry, data_len: int) -> tuple[torch.dtype | str, tuple[int, ...], int]:
    """(dtype, shape, data start) of one header entry, checked against the data region's length."""
    try:
        code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
        raise _Corrupt(f"tensor {name}: entry {entry!r} lacks dtype/shape/data_offsets") from e
    ints = all(type(x) is int for x in (*shape, begin, end))
    if not (isinstance(code, str) and ints and min((*shape, 0)) >= 0 and 0 <= begin <= end <= data_len):
        raise _Corrupt(f"tensor {name}: bad entry {entry!r} for a data region of {data_len} bytes")
    dtype = getattr(torch, _DTYPE_NAMES.get(code, ""), None)
    if not isinstance(dtype, torch.dtype):
        return code, shape, begin  # unknown to this torch: keep the code, don't crash
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise _Corrupt(f"tensor {name}: {end - begin} bytes stored but {code} {list(shape)} needs {nbytes}")
    return dtype, shape, begin


def _examples(items: list[str], k: int = 3) -> str:
    return f": {', '.join(items[:k])}{', ...' if len(items) > k else ''}" if items else ""


def model_layer_count(config: dict) -> int:
    """Number of transformer layers: `num_hidden_layers` (also looked up in a nested text_config)."""
    n = _config_value(config, "num_hidden_layers")
    if n is _MISSING:
        raise CheckpointError("model config has no 'num_hidden_layers' field; cannot count layers")
    if type(n) is not int or n < 1:
        raise CheckpointError(f"model config 'num_hidden_layers' must be a positive integer but got {n!r}")
    return n


def _config_value(config: dict, field: str) -> object:
    if field in config:
        return config[field]
    text = config.get("text_config")  # multimodal configs nest the language model's fields
    return text.get(field, _MISSING) if isinstance(text, dict) else _MISSING


def check_alignment(checkpoints: list[Checkpoint]) -> list[str]:
    """Every reason the checkpoints cannot be merged tensor by tensor, one line each; [] if none.

    Each source is compared with the first (the reference): config fields that fix the
    architecture, tokenizer (vocabulary and special tokens; loaded, never the model), and every
    tensor's presence, shape and dtype. Dtype differences are reported too, although the merger
    computes in one dtype and would cast: mixed dtypes usually mean a source is not what it seems.
    """
    if len(checkpoints) < 2:
        return []
    ref, problems, folders = checkpoints[0], [], {}
    for ck in checkpoints:  # one folder under two names would be merged with itself
        first = folders.setdefault(Path(ck.path).resolve(), ck)
        if first is not ck:
            problems.append(f"models {first.name!r} and {ck.name!r} are the same folder {Path(ck.path).resolve()}")
    tokenizers = [_load_tokenizer(ck) for ck in checkpoints]
    for ck, tok in zip(checkpoints, tokenizers):
        problems += _tokenizer_size_problems(ck, tok)
    for ck, tok in zip(checkpoints[1:], tokenizers[1:]):
        problems += _config_problems(ref, ck)
        problems += _tokenizer_problems(ref, tokenizers[0], ck, tok)
        problems += _tensor_problems(ref, ck)
    return problems


def check_finite_weights(ck: Checkpoint) -> None:
    """Read every floating-point tensor of `ck`, one at a time, and raise CheckpointError naming
    the file and the first tensor that holds NaN or inf (with a count of the others)."""
    bad = []
    try:
        for name, info in ck.tensors.items():
            if isinstance(info.dtype, torch.dtype) and info.dtype.is_floating_point:
                n = int((~torch.isfinite(ck.read(name))).sum())
                if n:
                    bad.append((name, info.file, n, math.prod(info.shape)))
    finally:
        ck.close()
    if bad:
        name, file, n, total = bad[0]
        more = f" ({len(bad) - 1} more tensors hold NaN/inf too)" if len(bad) > 1 else ""
        raise CheckpointError(f"{file}: tensor {name} holds {n} NaN/inf value{'s' if n > 1 else ''} "
                              f"of {total}{more}")


def assert_aligned(checkpoints: list[Checkpoint]) -> None:
    """Raise AlignmentError listing every problem of `check_alignment`, one per line."""
    problems = check_alignment(checkpoints)
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        head = f"{len(checkpoints)} sources are not aligned: {len(problems)} {noun}"
        raise AlignmentError("\n".join([head, *problems]))


def _config_problems(a: Checkpoint, b: Checkpoint) -> list[str]:
    problems = []
    for field in CONFIG_FIELDS:
        va, vb = _config_value(a.config, field), _config_value(b.config, field)
        if va != vb:
            show = lambda v: "missing" if v is _MISSING else repr(v)  # noqa: E731
            problems.append(f"config {field}: {show(va)} in {a.path} but {show(vb)} in {b.path}")
    return problems


def _tensor_problems(a: Checkpoint, b: Checkpoint) -> list[str]:
    problems = []
    for name, ia in a.tensors.items():
        ib = b.tensors.get(name)
        if ib is None:
            problems.append(f"tensor {name}: missing in {b.path} (present in {a.path})")
            continue
        if ia.shape != ib.shape:
            problems.append(f"tensor {name}: shape {_shape(ia.shape)} in {a.path} "
                            f"but {_shape(ib.shape)} in {b.path}")
        if ia.dtype != ib.dtype:
            problems.append(f"tensor {name}: dtype {ia.dtype} in {a.path} but {ib.dtype} in {b.path}")
    problems += [f"tensor {name}: missing in {a.path} (present in {b.path})"
                 for name in b.tensors if name not in a.tensors]
    return problems


def _shape(shape: tuple[int, ...]) -> str:
    return f"({', '.join(map(str, shape))})"


def _load_tokenizer(ck: Checkpoint) -> object:
    """The checkpoint's tokenizer, None if it has no tokenizer files, or the load error's text."""
    if not any((ck.path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # slow import; only needed here

    try:
        return AutoTokenizer.from_pretrained(str(ck.path), local_files_only=True)
    except Exception as e:  # any failure inside transformers is a property of this folder
        return f"{type(e).__name__}: {e}".splitlines()[0]


def _tokenizer_size_problems(ck: Checkpoint, tok: object) -> list[str]:
    if isinstance(tok, str):
        return [f"tokenizer: cannot be loaded from {ck.path} ({tok})"]
    rows = _config_value(ck.config, "vocab_size")
    if tok is None or type(rows) is not int:
        return []
    top = max(tok.get_vocab().values(), default=-1) + 1
    if top > rows:
        return [f"tokenizer: ids up to {top - 1} but the embedding has {rows} rows (vocab_size) in {ck.path}"]
    return []


def _tokenizer_problems(a: Checkpoint, ta: object, b: Checkpoint, tb: object) -> list[str]:
    if isinstance(ta, str) or isinstance(tb, str) or (ta is None and tb is None):
        return []  # load failures are reported once per checkpoint
    if ta is None or tb is None:
        missing, present = (a, b) if ta is None else (b, a)
        return [f"tokenizer: missing in {missing.path} (present in {present.path})"]
    problems = []
    va, vb = ta.get_vocab(), tb.get_vocab()
    only_a = sorted((t for t in va if t not in vb), key=va.get)
    only_b = sorted((t for t in vb if t not in va), key=vb.get)
    if only_a or only_b:
        eg = ", ".join(repr(t) for t in only_a[:2] + only_b[:2])
        problems.append(f"tokenizer: vocabulary differs ({len(only_a)} tokens only in {a.path}, "
                        f"{len(only_b)} only in {b.path}; e.g. {eg})")
    moved = sorted((t for t in va if t in vb and va[t] != vb[t]), key=va.get)
    if moved:
        t = moved[0]
        problems.append(f"tokenizer: {len(moved)} tokens have different ids, e.g. {t!r} is {va[t]} "
                        f"in {a.path} but {vb[t]} in {b.path}")
    for attr in SPECIAL_TOKENS:
        sa, sb = getattr(ta, attr, None), getattr(tb, attr, None)
        sa, sb = (None if s is None else str(s) for s in (sa, sb))
        if sa != sb:
            problems.append(f"tokenizer: special tokens differ: {attr} {sa!r} in {a.path} "
                            f"but {sb!r} in {b.path}")
    xa, xb = _extra_special_tokens(ta), _extra_special_tokens(tb)
    if xa != xb:
        problems.append(f"tokenizer: special tokens differ: additional {sorted(xa)} in {a.path} "
                        f"but {sorted(xb)} in {b.path}")
    return problems


def _extra_special_tokens(tok: object) -> set[str]:
    # transformers 5 calls them extra_special_tokens (a list, or a dict for named ones);
    # transformers 4 called them additional_special_tokens.
    extra = getattr(tok, "extra_special_tokens", None) or getattr(tok, "additional_special_tokens", None) or []
    if isinstance(extra, dict):
        extra = extra.values()
    return {str(t) for t in extra}

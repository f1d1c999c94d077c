"""The CLI merger: a mergekit YAML -> a verified Hugging Face model folder, streamed.

    merge-search merge best.yaml -o out/ [--shard-size 2GB] [--device cpu] [--force]
    manifest = merge_to_folder("best.yaml", "out/")

One output tensor at a time: read its inputs from the sources (never whole models), merge with
`search.methods` as `search.mergeconfig.resolve` says, write its bytes straight into the
safetensors shard it belongs to (the layout is planned up front, so nothing is buffered), then
the next. Everything goes to a hidden temporary folder beside OUT, which is verified (every
tensor present with the planned shape and dtype, all finite, `from_pretrained` finds every
weight) and then renamed to OUT; a failed or interrupted merge removes it, so no OUT appears
(a disk that fills up is one line naming OUT). A merge killed outright (SIGKILL, power) leaves
only that hidden folder, `.OUT.merge-tmp-PID`, which the next merge into OUT removes.

Rules: OUT may not be, contain or lie inside a source folder; an existing non-empty OUT is
replaced only with force=True (after the new folder is complete). Relative model paths are
taken against the current directory, as mergekit-yaml takes them. config.json and
generation_config.json come from base_model, else the first model listed (mergekit takes an
arbitrary referenced model then); tokenizer files from tokenizer_source ("base" or a model),
else the same model. Output dtype: out_dtype, else dtype, else the sources' dtype.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from search.checkpoints import (
    Checkpoint, assert_aligned, model_layer_count, open_checkpoint, resolve_model_path,
)
from search.errors import MergeSearchError
from search.mergeconfig import (
    LAYER_RE, MergeConfig, TensorRecipe, load_merge_config, output_layer_count, output_tensors, resolve,
)
from search.methods import DTYPES, SAFETENSORS_CODES, check_finite, merge_tensor

logger = logging.getLogger(__name__)

MANIFEST = "merge-manifest.json"
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from "2GB" (10^9), "500MiB" (2^20), "1.5gb" or a plain integer."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m[2].lower()
    if not m or unit not in _UNITS or float(m[1]) * _UNITS[unit] < 1:
        raise MergeSearchError(f"shard size must look like 2GB, 500MB or 1000000 (bytes) but got {text!r}")
    return int(float(m[1]) * _UNITS[unit])


def merge_to_folder(config_path: str | Path, out: str | Path, *, shard_size: int | str = "2GB",
                    device: str = "cpu", force: bool = False, seed: int = 0) -> dict:
    """Merge as the mergekit YAML `config_path` says into the new folder `out`; returns the manifest.

    seed: fixes dare_* drop masks (see search.methods). Raises MergeSearchError (one line) for
    bad input, before anything is written.
    """
    config_path, out = Path(config_path), Path(out)
    text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    cfg = load_merge_config(config_path)
    shard_bytes = parse_size(shard_size)
    paths = {ref: resolve_model_path(ref) for ref in _referenced(cfg)}
    if out.parent.is_dir():
        _clear_leftovers(out)
    _check_out(out, paths, config_path, force)
    sources = {ref: open_checkpoint(ref, path) for ref, path in paths.items()}
    try:
        assert_aligned(list(sources.values()))
        donor = sources[cfg.base_model or _first_model(cfg)]
        plan = _plan(cfg, donor, sources)
        tmp = out.parent / f".{out.name}.merge-tmp-{os.getpid()}"
        made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # parents this merge creates
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            files = _write_shards(tmp, plan, sources, cfg, shard_bytes, torch.device(device), seed)
            _write_config(tmp, donor, cfg, plan)
            _copy_tokenizer(tmp, cfg, sources, donor)
            _verify(tmp, plan)
            files.update({p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.name not in files})
            manifest = _manifest(cfg, config_path, text, paths, files, plan, shard_bytes, device, seed)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            _replace(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            for p in made:  # innermost first
                _rmdir_quietly(p)
            if isinstance(e, OSError):
                total = sum(math.prod(s) * d.itemsize for _, s, d in plan)
                why = (f"no space left on the device ({_gb(total)} of tensors to write)" if e.errno == errno.ENOSPC
                       else e.strerror or str(e))
                raise MergeSearchError(f"output {out}: writing failed: {why}; nothing was written") from None
            raise
    finally:
        for ck in sources.values():
            ck.close()
    logger.info("merged %d tensors into %s", len(plan), out)
    return manifest


def _referenced(cfg: MergeConfig) -> list[str]:
    refs = [m.model for m in cfg.models] if cfg.models else [s.model for sl in cfg.slices for s in sl.sources]
    refs += [sl.base_model for sl in cfg.slices or () if sl.base_model]
    if cfg.base_model:
        refs.append(cfg.base_model)
    if cfg.tokenizer_source and cfg.tokenizer_source != "base":
        refs.append(cfg.tokenizer_source)
    return list(dict.fromkeys(refs))


def _first_model(cfg: MergeConfig) -> str:
    return cfg.models[0].model if cfg.models else cfg.slices[0].sources[0].model


def _check_out(out: Path, paths: dict[str, Path], config_path: Path, force: bool) -> None:
    target = out.resolve()
    for ref, path in paths.items():
        src = path.resolve()
        if target == src or src in target.parents or target in src.parents:
            how = "is" if target == src else "is inside" if src in target.parents else "contains"
            raise MergeSearchError(f"output {out} {how} the folder of source {ref} ({src}); choose another -o")
    if target in config_path.resolve().parents:
        raise MergeSearchError(f"output {out} contains the config file {config_path}; choose another -o")
    if out.exists() and not out.is_dir():
        raise MergeSearchError(f"output {out} exists and is not a folder")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise MergeSearchError(f"output {out}: {blocker} is a file, not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MergeSearchError(f"output {out} exists and is not empty; pass --force to replace it")


def _plan(cfg: MergeConfig, donor: Checkpoint, sources: dict[str, Checkpoint]) -> list[tuple[TensorRecipe, tuple, torch.dtype]]:
    """(recipe, shape, output dtype) per output tensor; every input checked to exist."""
    num_layers = model_layer_count(donor.config)
    found = {int(m["index"]) for name in donor.tensors if (m := LAYER_RE.match(name))}
    if found != set(range(num_layers)):
        raise MergeSearchError(f"{donor.path}: tensors of layers {sorted(found)[:5]}... do not match "
                               f"num_hidden_layers={num_layers} (expected names like model.layers.<i>.*)")
    plan = []
    for name in output_tensors(cfg, list(donor.tensors), num_layers):
        recipe = resolve(cfg, name, num_layers)
        infos = []
        for ref, name_in in zip(recipe.models, recipe.inputs):
            info = sources[ref].tensors.get(name_in)
            if info is None:
                raise MergeSearchError(f"{sources[ref].path}: no tensor {name_in} (needed for {name})")
            if not isinstance(info.dtype, torch.dtype) or not info.dtype.is_floating_point:
                raise MergeSearchError(f"{info.file}: tensor {name_in} has dtype {info.dtype}; only "
                                       "floating-point tensors can be merged")
            infos.append(info)
        dtype = cfg.out_dtype or cfg.dtype
        if dtype is None:
            out_dtype = infos[0].dtype
            for info in infos[1:]:
                out_dtype = torch.promote_types(out_dtype, info.dtype)
        else:
            out_dtype = DTYPES[dtype]
        plan.append((recipe, infos[0].shape, out_dtype))
    return plan


def _shard_layout(plan: list, shard_bytes: int) -> list[list[int]]:
    shards, size = [[]], 0
    for i, (_, shape, dtype) in enumerate(plan):
        n = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_shards(tmp: Path, plan: list, sources: dict[str, Checkpoint], cfg: MergeConfig,
                  shard_bytes: int, device: torch.device, seed: int) -> dict[str, str]:
    """Write every shard (header first: the layout is known), tensor by tensor; sha256 per file."""
    layout = _shard_layout(plan, shard_bytes)
    names = _shard_names(len(layout))
    in_dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    digests, weight_map = {}, {}
    for shard, fname in zip(layout, names):
        header, offset = {}, 0
        for i in shard:
            recipe, shape, dtype = plan[i]
            n = math.prod(shape) * dtype.itemsize
            header[recipe.tensor] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[recipe.tensor] = fname
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
        digest = hashlib.sha256()
        with open(tmp / fname, "wb") as f:
            for chunk in (struct.pack("<Q", len(raw)), raw):
                f.write(chunk)
                digest.update(chunk)
            for i in shard:
                recipe, shape, dtype = plan[i]
                merged = _merge_one(recipe, sources, in_dtype, dtype, device, seed)
                data = merged.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                digest.update(data)
        digests[fname] = digest.hexdigest()
        logger.info("wrote %s (%d tensors)", fname, len(shard))
    if len(names) > 1:
        total = sum(math.prod(s) * d.itemsize for _, s, d in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return digests


def _merge_one(recipe: TensorRecipe, sources: dict[str, Checkpoint], in_dtype: torch.dtype | None,
               out_dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    tensors = []
    for ref, name in zip(recipe.models, recipe.inputs):
        ck = sources[ref]
        x = ck.read(name, device)
        check_finite(x, f"tensor {name} of {ref} ({ck.tensors[name].file})")
        tensors.append(x if in_dtype is None else x.to(in_dtype))
    with torch.inference_mode():
        merged = merge_tensor(recipe, tensors, out_dtype=out_dtype, seed=seed)
    check_finite(merged, f"merged tensor {recipe.tensor} (the merge overflowed)")
    return merged


def _write_config(tmp: Path, donor: Checkpoint, cfg: MergeConfig, plan: list) -> None:
    config = json.loads((donor.path / "config.json").read_text(encoding="utf-8"))
    common = Counter(dtype for _, _, dtype in plan).most_common(1)[0][0]
    dtype = cfg.out_dtype or cfg.dtype or str(common).removeprefix("torch.")
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    layers = output_layer_count(cfg, model_layer_count(donor.config))
    holder = config if "num_hidden_layers" in config else config.get("text_config", config)
    holder["num_hidden_layers"] = layers
    (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    gen = donor.path / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, tmp / gen.name)


def _copy_tokenizer(tmp: Path, cfg: MergeConfig, sources: dict[str, Checkpoint], donor: Checkpoint) -> None:
    src = cfg.tokenizer_source
    tok_donor = donor if src is None else sources[cfg.base_model if src == "base" else src]
    for name in TOKENIZER_FILES:
        if (tok_donor.path / name).is_file():
            shutil.copyfile(tok_donor.path / name, tmp / name)
    if cfg.chat_template is None:
        return
    from transformers import AutoTokenizer

    template = cfg.chat_template
    if template == "auto":  # the most common template among the sources, as mergekit
        found = [t.strip() for ck in sources.values() if (t := _chat_template(ck.path))]
        if not found:
            logger.warning("chat_template: auto, but no source has a chat template; none set")
            return
        template = Counter(found).most_common(1)[0][0]
    tokenizer = AutoTokenizer.from_pretrained(str(tok_donor.path))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(tmp))


def _chat_template(path: Path) -> str | None:
    from transformers import AutoTokenizer

    try:
        template = AutoTokenizer.from_pretrained(str(path)).chat_template
    except Exception:  # a source without a loadable tokenizer simply has no template
        return None
    return template.get("default") if isinstance(template, dict) else template


def _verify(tmp: Path, plan: list) -> None:
    """Read the written folder back: names, shapes, dtypes, finiteness; then from_pretrained."""
    expected = {r.tensor: (tuple(shape), dtype) for r, shape, dtype in plan}
    seen = set()
    for file in sorted(tmp.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name not in expected or (tuple(t.shape), t.dtype) != expected[name]:
                    raise MergeSearchError(f"{file}: tensor {name} was written wrong "
                                           f"({tuple(t.shape)} {t.dtype}, expected {expected.get(name)})")
                check_finite(t, f"{file}: tensor {name}")
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise MergeSearchError(f"{tmp}: {len(missing)} tensors missing after writing, e.g. {missing[0]}")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:  # on the meta device: checks names and shapes against the model without the memory
        _, info = AutoModelForCausalLM.from_pretrained(str(tmp), device_map="meta", output_loading_info=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise MergeSearchError(f"{tmp}: from_pretrained does not load the merged folder cleanly: {problems or info['error_msgs']}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(cfg: MergeConfig, config_path: Path, text: str | None, paths: dict, files: dict,
              plan: list, shard_bytes: int, device: str, seed: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        ours = version("merge-search")
    except PackageNotFoundError:  # run from a checkout: the version pyproject.toml declares
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        ours = tomllib.loads(pyproject.read_text())["project"]["version"] if pyproject.is_file() else "unknown"
    return {
        "tool": "merge-search merge",
        "versions": {"merge-search": ours, "torch": torch.__version__, "transformers": transformers.__version__},
        "config_file": str(config_path.resolve()),
        "config": text,
        "config_parsed": cfg.model_dump(mode="json", exclude_none=True),
        "sources": {ref: str(p) for ref, p in paths.items()},
        "options": {"shard_size": shard_bytes, "device": device, "seed": seed},
        "tensors": len(plan),
        "files": {name: {"sha256": files[name]} for name in sorted(files)},
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _clear_leftovers(out: Path) -> None:
    """What a merge into `out` killed on this machine left beside it: its temporary folder (never
    complete: removed), or, killed between the two renames of --force, the previous OUT (put
    back where OUT is missing, else removed). Folders of live merges are left alone."""
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.merge-*-*")):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.merge-(tmp|old)-(\d+)", path.name)
        if not m or not path.is_dir() or _pid_alive(int(m[2])):
            continue
        if m[1] == "old" and not out.exists():
            os.rename(path, out)
            logger.warning("put back %s, which a merge killed while replacing it had moved to %s", out, path)
        else:
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("removed %s, left by a merge into %s that was killed (pid %s)", path, out, m[2])


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (empty, or replaced under --force) goes only after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.merge-old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["MANIFEST", "merge_to_folder", "parse_size"]

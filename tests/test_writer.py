"""Tests of search/writer.py and `merge-search merge`: the folder it writes, sharding, atomicity,
refusals, and the CLI's one-line errors (exit 2, nothing written)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from search.errors import MergeSearchError
from search.mergeconfig import parse_merge_config, resolve
from search.methods import merge_tensor
from search.writer import MANIFEST, merge_to_folder, parse_size

UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    from tiny import save_tiny_model

    root = tmp_path_factory.mktemp("writer")
    out = {n: save_tiny_model(root / n, seed=20 + s) for s, n in enumerate(["m0", "m1", "m2", "base"])}
    nan = root / "nan"
    shutil.copytree(out["m1"], nan)
    tensors = load_file(nan / "model.safetensors")
    tensors[UP][0, 0] = float("nan")
    save_file(tensors, nan / "model.safetensors", {"format": "pt"})
    out["nan"] = nan
    return out


def write_cfg(path: Path, fam: dict[str, Path], **overrides) -> Path:
    data = {"merge_method": "linear", "models": [
        {"model": str(fam["m0"]), "parameters": {"weight": 0.6}},
        {"model": str(fam["m1"]), "parameters": {"weight": [0.1, 0.5]}},
        {"model": str(fam["m2"]), "parameters": {"weight": 0.3}}]}
    data.update(overrides)
    path.write_text(yaml.safe_dump(data))
    return path


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".merge-" in p.name]


def test_merge_writes_a_verified_folder(fam, tmp_path):
    cfg = write_cfg(tmp_path / "best.yaml", fam, out_dtype="bfloat16")
    out = tmp_path / "out"
    manifest = merge_to_folder(cfg, out)
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", MANIFEST} <= set(names)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == manifest and on_disk["config"] == cfg.read_text()
    assert set(on_disk["versions"]) == {"merge-search", "torch", "transformers"}
    for name, entry in on_disk["files"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    assert set(on_disk["files"]) == set(names) - {MANIFEST}
    # every tensor is what methods.merge_tensor makes from the recipe
    config = parse_merge_config(yaml.safe_load(cfg.read_text()))
    sources = {str(p): load_file(p / "model.safetensors") for p in fam.values()}
    merged = tensors_of(out)
    assert len(merged) == manifest["tensors"] == len(sources[str(fam["m0"])])
    for name, t in merged.items():
        r = resolve(config, name, 2)
        expect = merge_tensor(r, [sources[m][n] for m, n in zip(r.models, r.inputs)], out_dtype=torch.bfloat16)
        assert torch.equal(t, expect), name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight.data, merged[UP].to(model.dtype))
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_small_shards_get_an_index_and_the_same_tensors(fam, tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", fam)
    merge_to_folder(cfg, tmp_path / "one")
    merge_to_folder(cfg, tmp_path / "many", shard_size="5KB")
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    one, many = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "many")
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "many")


def test_slices_dtype_and_tokenizer_source(fam, tmp_path):
    m1 = shutil.copytree(fam["m1"], tmp_path / "m1")  # the same weights, another chat template
    (m1 / "chat_template.jinja").write_text("{{ messages[0]['content'] }} from m1")
    cfg = write_cfg(tmp_path / "s.yaml", fam, models=None, dtype="bfloat16", tokenizer_source=str(m1),
                    slices=[{"sources": [{"model": str(fam["m0"]), "layer_range": [0, 1]}]},
                            {"sources": [{"model": str(fam["m0"]), "layer_range": [0, 2]}]}],
                    parameters={"weight": 1.0})
    out = tmp_path / "sliced"
    merge_to_folder(cfg, out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["dtype"] == "bfloat16"
    merged, m0 = tensors_of(out), load_file(fam["m0"] / "model.safetensors")
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], m0[UP].bfloat16())
    assert "from m1" in (out / "chat_template.jinja").read_text()
    text = write_cfg(tmp_path / "t.yaml", fam, chat_template="{{ 'hello' }}")
    merge_to_folder(text, tmp_path / "templated")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "templated").chat_template == "{{ 'hello' }}"


@pytest.mark.parametrize("where,how", [("m0", "is"), ("m0/sub", "is inside"), (".", "contains")])
def test_refuses_an_output_over_a_source(fam, tmp_path, where, how):
    cfg = write_cfg(tmp_path / "c.yaml", fam)
    out = fam["m0"].parent / where
    before = sorted(p.name for p in fam["m0"].parent.rglob("*"))
    with pytest.raises(MergeSearchError, match=f"output .* {how} the folder of source"):
        merge_to_folder(cfg, out)
    assert sorted(p.name for p in fam["m0"].parent.rglob("*")) == before


def test_existing_output_needs_force_and_is_replaced_only_on_success(fam, tmp_path, monkeypatch):
    cfg = write_cfg(tmp_path / "c.yaml", fam)
    out = tmp_path / "out"
    out.mkdir()
    merge_to_folder(cfg, out)  # an empty folder is fine
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(MergeSearchError, match="exists and is not empty; pass --force"):
        merge_to_folder(cfg, out)
    import search.writer

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(search.writer, "_verify", crash)
    with pytest.raises(KeyboardInterrupt):
        merge_to_folder(cfg, out, force=True)
    assert (out / "mine.txt").read_text() == "keep me" and leftovers(tmp_path) == []
    monkeypatch.undo()
    merge_to_folder(cfg, out, force=True)
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_nan_source_is_named_and_leaves_nothing(fam, tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", fam, models=[
        {"model": str(fam["m0"]), "parameters": {"weight": 0.5}}, {"model": str(fam["nan"]), "parameters": {"weight": 0.5}}])
    with pytest.raises(MergeSearchError, match=rf"tensor {UP} of .*nan \(.*nan/model.safetensors\): 1 NaN/inf"):
        merge_to_folder(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5kb") == 1500 and parse_size(4096) == 4096
    with pytest.raises(MergeSearchError, match="shard size must look like"):
        parse_size("lots")


CLI_BAD = {
    "missing base": ({"merge_method": "ties"}, "ties needs a base_model"),
    "slerp with 3 models": ({"merge_method": "slerp", "base_model": "$m0", "parameters": {"t": 0.5},
                             "models": [{"model": "$m0"}, {"model": "$m1"}, {"model": "$m2"}]},
                            "slerp takes exactly 2 models"),
    "weights sum to 0": ({"models": [{"model": "$m0", "parameters": {"weight": 1}},
                                     {"model": "$m1", "parameters": {"weight": -1}}]}, "sum to 0"),
    "density out of range": ({"merge_method": "ties", "base_model": "$base",
                              "models": [{"model": "$m0", "parameters": {"weight": 1, "density": 1.5}}]},
                             "density must be in (0, 1] but got 1.5"),
    "unknown method": ({"merge_method": "model_soup"}, "unknown merge method 'model_soup'; known: linear"),
    "NaN source": ({"models": [{"model": "$nan", "parameters": {"weight": 1}}]}, "1 NaN/inf values"),
    "unsupported key": ({"tokenizer": {"source": "base"}}, "tokenizer: key not supported by merge-search merge"),
    "missing model": ({"models": [{"model": "$m0/../nowhere", "parameters": {"weight": 1}}]},
                      "not a local folder and not in the local Hugging Face cache"),
}


@pytest.mark.parametrize("case", sorted(CLI_BAD))
def test_cli_bad_inputs_exit_2_with_one_line_and_write_nothing(case, fam, tmp_path):
    from search.cli import main

    patch, message = CLI_BAD[case]
    text = yaml.safe_dump({"merge_method": "linear", "models": [{"model": "$m0", "parameters": {"weight": 1}}], **patch})
    for name, path in fam.items():
        text = text.replace(f"${name}", str(path))
    (tmp_path / "bad.yaml").write_text(text)
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_refuses_output_over_a_source_and_merges(fam, tmp_path):
    from search.cli import main

    cfg = write_cfg(tmp_path / "ok.yaml", fam)
    result = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(fam["m1"])])
    assert result.exit_code == 2 and "is the folder of source" in result.stderr
    result = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(tmp_path / "out"), "--shard-size", "10KB"])
    assert result.exit_code == 0, result.output
    assert "merged 21 tensors" in result.stdout and (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_a_sigkilled_merge_leaves_no_output_and_the_next_merge_clears_its_folder(fam, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = write_cfg(tmp_path / "c.yaml", fam)
    out = tmp_path / "out"
    for _ in range(5):  # a kill that lands after the rename is tried again
        proc = subprocess.Popen([sys.executable, "-m", "search.cli", "merge", str(cfg), "-o", str(out),
                                 "--shard-size", "20KB"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and not leftovers(tmp_path):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if leftovers(tmp_path) and not out.exists():
            break
        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.fail("could not kill the merge while it was writing")
    assert leftovers(tmp_path) == [f".out.merge-tmp-{proc.pid}"] and not out.exists()
    again = subprocess.run([sys.executable, "-m", "search.cli", "merge", str(cfg), "-o", str(out)],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, COLUMNS="400"))
    assert again.returncode == 0, again.stderr
    assert f"removed {tmp_path}/.out.merge-tmp-{proc.pid}, left by a merge into {out} that was killed" in again.stderr
    assert leftovers(tmp_path) == [] and (out / MANIFEST).is_file()


def test_a_live_merges_folder_is_left_alone(fam, tmp_path):
    import subprocess

    other = subprocess.Popen(["sleep", "60"])  # a live process: its merge may still be writing
    try:
        busy = tmp_path / f".out.merge-tmp-{other.pid}"
        busy.mkdir()
        merge_to_folder(write_cfg(tmp_path / "c.yaml", fam), tmp_path / "out")
        assert busy.is_dir() and (tmp_path / "out" / MANIFEST).is_file()
    finally:
        other.kill()
        other.wait()


def test_a_full_disk_is_one_line_and_leaves_no_output(fam, tmp_path, monkeypatch):
    """An OSError(ENOSPC) injected where the writer writes its shards (the boundary to the disk)."""
    import errno

    import search.writer
    from search.cli import main

    real_open = open

    def full_disk_open(path, mode="r", *args, **kw):
        if "w" in mode and str(path).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(search.writer, "open", full_disk_open, raising=False)
    out = tmp_path / "new" / "deeper" / "out"
    result = CliRunner().invoke(main, ["merge", str(write_cfg(tmp_path / "c.yaml", fam)), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"error: output {out}: writing failed: no space left on the device (")
    assert lines[0].endswith("MB of tensors to write); nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # not even the parents it made


def _size_limited_folder(path: Path, size: str):
    import subprocess

    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({done.stderr.decode().strip()[:80]}); "
                    "the injected ENOSPC test covers the writer")
    return path


def test_a_really_full_disk_is_one_line_and_leaves_no_output(fam, tmp_path):
    import subprocess
    import sys

    small = _size_limited_folder(tmp_path / "small", "12k")  # the tiny merge writes ~50 KB
    try:
        done = subprocess.run([sys.executable, "-m", "search.cli", "merge", str(write_cfg(tmp_path / "c.yaml", fam)),
                               "-o", str(small / "out")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "no space left on the device" in lines[0], done.stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)

"""`merge-search merge` == mergekit on the same YAML, on tiny models built here (3 sources + a base).

fp32: bit-identical for linear, task_arithmetic, ties, slerp, for global, per-layer (gradient
and slices) and filtered parameters. bf16: linear, task_arithmetic and slerp within one ulp
(mergekit computes task vectors in bf16, we in fp32: see `ulp_report`); ties in bf16 is only
reported. DARE: exact at density 1; drop rate and rescale checked statistically against
mergekit's. mergekit runs in-process through `mergekit.merge.run_merge` (what mergekit-yaml calls).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from search.writer import merge_to_folder

pytest.importorskip("mergekit")
LAYERS = 4


def build_family(root: Path, dtype: torch.dtype) -> dict[str, str]:
    """A base and three "fine-tunes" of it: base + scale * noise (scales 0.05, 0.3, 0.1), so task
    vectors are small next to the weights as in real use, and slerp meets both of its branches
    (parallel norm weights, non-parallel matrices)."""
    from safetensors.torch import save_file
    from tiny import save_tiny_model

    ref = save_tiny_model(root / "base", seed=10, num_hidden_layers=LAYERS)
    base = load_file(ref / "model.safetensors")
    g = torch.Generator().manual_seed(len(str(dtype)))
    for name, scale in {"m0": 0.05, "m1": 0.3, "m2": 0.1}.items():
        shutil.copytree(ref, root / name)
        noisy = {k: v + scale * max(v.std().item(), 0.02) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file({k: v.to(dtype) for k, v in noisy.items()}, root / name / "model.safetensors", {"format": "pt"})
    save_file({k: v.to(dtype) for k, v in base.items()}, ref / "model.safetensors", {"format": "pt"})
    return {n: str(root / n) for n in ("m0", "m1", "m2", "base")}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("parity")
    return {"float32": build_family(root / "fp32", torch.float32),
            "bfloat16": build_family(root / "bf16", torch.bfloat16)}


@pytest.fixture(scope="module")
def bf16_report():
    """Fractions of bf16 elements that differ from mergekit, per case, written to
    .pytest_cache/parity_bf16.json when the module's tests are done."""
    report: dict[str, dict] = {}
    yield report
    if report:
        path = Path(__file__).resolve().parent.parent / ".pytest_cache" / "parity_bf16.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def member_params(method: str, i: int, gran: str) -> dict:
    w = {"global": [0.45, 0.35, 0.3][i],
         "gradient": [[0.1, 0.8, 0.3], [0.6, 0.2], 0.3][i],
         "filtered": [[{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.2, 0.5]}, {"value": 0.4}],
                      0.3, [{"filter": "embed", "value": 1.0}, {"value": 0.2}]][i]}[gran]
    params = {"weight": w}
    if method in ("ties", "dare_ties", "dare_linear"):
        params["density"] = {"global": [0.5, 0.7, 0.3], "gradient": [[0.2, 0.9], 0.7, 0.4],
                             "filtered": [[{"filter": "mlp", "value": 0.3}, {"value": 0.8}], 0.5, 0.6]}[gran][i]
    return params


def make_config(method: str, gran: str, fam: dict[str, str], dtype: str, density_one: bool = False) -> dict:
    """A mergekit YAML (as a dict) for `method` with parameters of granularity `gran`."""
    slerp = method == "slerp"
    members = ["m0", "m1"] if slerp else ["m0", "m1", "m2"]
    base = "m0" if slerp else "base"
    cfg: dict = {"merge_method": method, "dtype": dtype}
    if method != "linear":
        cfg["base_model"] = fam[base]
    t = {"global": 0.3, "gradient": [0.1, 0.6, 0.9],
         "filtered": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.7}, {"value": 0.4}]}

    def params(i, g):
        p = member_params(method, i, g)
        return {**p, "density": 1.0} if density_one else p

    if gran == "slices":
        slices = []
        for k, (lo, hi) in enumerate([(0, 2), (2, 4)]):
            g = ["global", "gradient"][k]
            srcs = [{"model": fam[m], "layer_range": [lo, hi]} for m in members]
            if not slerp:
                for i, s in enumerate(srcs):
                    s["parameters"] = params(i, g)
                if method != "linear":
                    srcs.append({"model": fam[base], "layer_range": [lo, hi]})
            slices.append({"sources": srcs, **({"parameters": {"t": t[g]}} if slerp else {})})
        cfg["slices"] = slices
    elif slerp:
        cfg["models"] = [{"model": fam[m]} for m in members]
        cfg["parameters"] = {"t": t[gran]}
    else:
        cfg["models"] = [{"model": fam[m], "parameters": params(i, gran)} for i, m in enumerate(members)]
    if method == "task_arithmetic":
        cfg["parameters"] = {"lambda": 0.8}
    return cfg


def run_both(cfg: dict, tmp: Path) -> tuple[dict, dict]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp / "mk"),
              MergeOptions(quiet=True, write_model_card=False, random_seed=0))
    merge_to_folder(tmp / "cfg.yaml", tmp / "ours")
    return read_folder(tmp / "mk"), read_folder(tmp / "ours")


def read_folder(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).to(torch.int64)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between same-dtype floats (+0 and -0 are 0 apart)."""
    sign_bit = 1 << (8 * a.element_size() - 1)

    def ordered(x):
        i = bits(x)
        i = torch.where(i < 0, i + 2 * sign_bit, i)  # two's complement -> raw unsigned pattern
        return torch.where(i >= sign_bit, -(i - sign_bit), i)

    return (ordered(a) - ordered(b)).abs()


def compare(theirs: dict, ours: dict) -> tuple[int, int, int]:
    """(elements, elements differing in any bit, max ulp distance) over every tensor."""
    assert sorted(theirs) == sorted(ours)
    total = differ = worst = 0
    for name, t in theirs.items():
        o = ours[name]
        assert o.dtype == t.dtype and o.shape == t.shape, name
        d = ulp_distance(t, o)
        total += t.numel()
        differ += int((bits(t) != bits(o)).sum())
        worst = max(worst, int(d.max()))
    return total, differ, worst


GRANULARITIES = ["global", "gradient", "filtered", "slices"]


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp"])
def test_fp32_bit_identical_to_mergekit(method, gran, families, tmp_path):
    theirs, ours = run_both(make_config(method, gran, families["float32"], "float32"), tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"


@pytest.mark.parametrize("gran", ["global", "gradient", "filtered"])
@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_bf16_linear_and_slerp_bit_identical_to_mergekit(method, gran, families, tmp_path):
    """Both tools compute these in fp32 and round once: not just within one ulp, identical."""
    theirs, ours = run_both(make_config(method, gran, families["bfloat16"], "bfloat16"), tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"


def input_scale_ulps(cfg: dict, fam: dict[str, str], theirs: dict, ours: dict) -> tuple[float, int, int]:
    """(max |ours - mergekit| in bf16 ulps of the largest input magnitude, elements of ours not
    correctly rounded (task_arithmetic only), max ulps of ours from the correctly rounded value)."""
    from search.mergeconfig import parse_merge_config, resolve

    config = parse_merge_config(cfg)
    sources = {path: read_folder(Path(path)) for path in fam.values()}
    worst, off, off_ulps = 0.0, 0, 0
    for name, t in theirs.items():
        r = resolve(config, name, LAYERS)
        xs = [sources[m][name].double() for m in r.models]
        scale = torch.stack([x.abs() for x in xs]).amax(0).clamp_min(1e-30)
        ulp = torch.exp2(torch.floor(torch.log2(scale)) - 7)  # bf16 keeps 8 significant bits
        worst = max(worst, ((ours[name].double() - t.double()).abs() / ulp).max().item())
        if r.method == "task_arithmetic":
            b = xs[r.base]
            exact = b + r.shared["lambda"] * sum(p["weight"] * (x - b) for i, (p, x) in enumerate(zip(r.params, xs))
                                                 if i != r.base)
            rounded = exact.float().bfloat16()
            off += int((bits(ours[name]) != bits(rounded)).sum())
            off_ulps = max(off_ulps, int(ulp_distance(ours[name], rounded).max()))
    return worst, off, off_ulps


@pytest.mark.parametrize("gran", ["global", "gradient", "filtered"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_bf16_task_vector_methods_against_mergekit(method, gran, families, bf16_report, tmp_path):
    """mergekit computes task vectors in bf16 (three roundings), we in fp32 (one). Where the
    result cancels to far below the inputs, its error is many ulps *of the result*, so the bound
    is one of the inputs' scale; ours must be the correctly rounded value (within 1 ulp)."""
    fam = families["bfloat16"]
    cfg = make_config(method, gran, fam, "bfloat16")
    theirs, ours = run_both(cfg, tmp_path)
    total, differ, worst_result_ulps = compare(theirs, ours)
    worst_input_ulps, off, off_ulps = input_scale_ulps(cfg, fam, theirs, ours)
    bf16_report[f"{method}/{gran}"] = {
        "differ_from_mergekit": differ / total, "max_ulps_of_result": worst_result_ulps,
        "max_ulps_of_inputs": worst_input_ulps, "ours_not_correctly_rounded": off / total}
    if method == "ties":  # bf16 task vectors change which elements TIES keeps: report only
        assert differ / total < 0.5
        return
    assert worst_input_ulps <= 2, f"{differ}/{total} differ, up to {worst_input_ulps} ulps of the inputs"
    assert off_ulps <= 1 and off / total < 0.005, f"{off}/{total} not correctly rounded, up to {off_ulps} ulp"


@pytest.mark.parametrize("gran", ["global", "gradient"])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_density_1_is_exact(method, gran, families, tmp_path):
    cfg = make_config(method, gran, families["float32"], "float32", density_one=True)
    theirs, ours = run_both(cfg, tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drop_rate_and_rescale_match_mergekit_statistically(method, families, tmp_path):
    """One source, weight 1: an element equals the base where it was dropped; kept elements
    move by delta * (l1 rescale factor ~ 1/density)."""
    fam = families["float32"]
    cfg = {"merge_method": method, "base_model": fam["base"], "dtype": "float32",
           "models": [{"model": fam["m0"], "parameters": {"weight": 1.0, "density": 0.4}}]}
    theirs, ours = run_both(cfg, tmp_path)
    base, source = read_folder(Path(fam["base"])), read_folder(Path(fam["m0"]))
    stats = {}
    for who, merged in (("mergekit", theirs), ("ours", ours)):
        kept = total = 0
        factors = []
        for name, out in merged.items():
            delta = source[name] - base[name]
            moved = (out - base[name]) != 0
            kept += int(moved.sum())
            total += out.numel()
            factors.append(((out - base[name])[moved] / delta[moved]).mean().item())
        stats[who] = (kept / total, sum(factors) / len(factors))
    for who, (rate, factor) in stats.items():
        assert abs(rate - 0.4) < 0.03, (who, rate)
        assert abs(factor - 2.5) < 0.25, (who, factor)
    assert abs(stats["ours"][0] - stats["mergekit"][0]) < 0.04


def test_tied_embeddings_tokenizer_source_and_out_dtype(families, tmp_path):
    """Tied-embedding sources (no lm_head tensor), tokenizer_source: base, fp32 math saved as bf16."""
    from tiny import save_tiny_model

    fam = {n: str(save_tiny_model(tmp_path / n, seed=30 + s, tie_word_embeddings=True, num_hidden_layers=LAYERS))
           for s, n in enumerate(["m0", "m1", "base"])}
    cfg = {"merge_method": "ties", "base_model": fam["base"], "dtype": "float32", "out_dtype": "bfloat16",
           "tokenizer_source": "base",
           "models": [{"model": fam["m0"], "parameters": {"weight": [0.3, 0.9], "density": 0.5}},
                      {"model": fam["m1"], "parameters": {"weight": 0.6, "density": [{"filter": "embed", "value": 0.2},
                                                                                      {"value": 0.8}]}}]}
    (tmp_path / "run").mkdir()
    theirs, ours = run_both(cfg, tmp_path / "run")
    assert "lm_head.weight" not in ours
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ}/{total} elements differ"


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp"])
def test_exported_search_configs_merge_identically_in_mergekit(method, families, tmp_path):
    """What `export` writes (MergeSpace.to_config: per-layer gradients, filter lists) is valid
    mergekit configuration, and mergekit-yaml's model equals ours bit for bit (fp32)."""
    import optuna

    from search.space import MergeSpace

    fam = families["float32"]
    names = ["m0", "m1"] if method == "slerp" else ["m0", "m1", "m2"]
    space = MergeSpace(method, {n: fam[n] for n in names}, base=fam["base"], granularity=2,
                       filters=["self_attn"], num_layers=LAYERS)
    values = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7)).ask())
    theirs, ours = run_both(space.to_config(values), tmp_path)
    total, differ, _ = compare(theirs, ours)
    assert differ == 0, f"{differ} of {total} elements differ"

"""Merge weights -> a mergekit merge configuration (YAML) that `mergekit-yaml` accepts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml


def linear_config(
    paths: Sequence[str | Path],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    dtype: str = "float32",
) -> dict:
    """A mergekit `linear` configuration; model paths are made absolute."""
    if len(paths) != len(weights):
        raise ValueError(f"{len(paths)} model paths but {len(weights)} weights")
    return {
        "merge_method": "linear",
        "parameters": {"normalize": bool(normalize)},
        "dtype": dtype,
        "models": [
            {"model": str(Path(p).resolve()), "parameters": {"weight": float(w)}}
            for p, w in zip(paths, weights)
        ],
    }


def to_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)

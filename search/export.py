"""Merge configurations -> mergekit YAML (`best.yaml`), readable by `mergekit-yaml` and `merge-search merge`.

The configuration itself is built by `search.space.MergeSpace.to_config` and stored on every
trial, so what is exported is exactly what was merged and scored. Lists of numbers (per-layer
gradients) are written in flow style, one line each, as mergekit writes them.
"""

from __future__ import annotations

import yaml


class _Dumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = bool(data) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def to_yaml(config: dict) -> str:
    """The mergekit YAML text of `config` (keys in the given order)."""
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True)

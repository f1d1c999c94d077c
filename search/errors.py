"""The one error family of merge-search: user-facing problems, reported in one line."""


class MergeSearchError(Exception):
    """Bad input or an unmet precondition; the CLI prints the message and exits 2."""


class ConfigError(MergeSearchError):
    """A run config that does not validate; the message names the file and the field."""


class CheckpointError(MergeSearchError):
    """A source checkpoint that cannot be opened or read; the message names the folder/file."""


class AlignmentError(MergeSearchError):
    """Sources that cannot be merged with each other; the message lists every mismatch."""


def field_path(loc) -> str:
    """A validation error's location as the config spells it: `models[1].path` ("" at the top)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out

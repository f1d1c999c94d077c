"""The one error family of merge-search: user-facing problems, reported in one line."""


class MergeSearchError(Exception):
    """Bad input or an unmet precondition; the CLI prints the message and exits 2."""


class ConfigError(MergeSearchError):
    """A run config that does not validate; the message names the file and the field."""


class CheckpointError(MergeSearchError):
    """A source checkpoint that cannot be opened or read; the message names the folder/file."""


class AlignmentError(MergeSearchError):
    """Sources that cannot be merged with each other; the message lists every mismatch."""

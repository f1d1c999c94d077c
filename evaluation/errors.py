"""Errors of the evaluation package (which never imports `search`)."""


class EvalError(Exception):
    """Bad eval data or an unknown suite/task; the message names the file, line and field."""

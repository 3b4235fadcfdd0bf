"""Errors raised by the evaluation harness (ValueError subclasses so callers can catch bad input)."""


class EvalError(ValueError):
    """Bad evaluation input: unknown task, bad option, unusable client."""


class EvalDataError(EvalError):
    """A benchmark file is missing or malformed; the message names the file (and line)."""

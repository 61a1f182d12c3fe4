"""Exception types. The CLI maps each to an exit code and prints ``str(exc)`` as one line."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (whitespace runs collapsed), the message cut at ``limit`` characters:
    how every error message quotes an exception from onnxruntime, numpy or the user's code."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


class OnnxSlimError(Exception):
    """Base class for every error this project raises on purpose."""

    exit_code = 1


class InputError(OnnxSlimError):
    """Bad user input: missing/corrupt model, bad calibration data, bad option. Exit code 2."""

    exit_code = 2


class PassError(OnnxSlimError):
    """A pass failed unexpectedly; the message starts with the pass name."""

    exit_code = 1


class ParityError(OnnxSlimError):
    """The optimized model does not compute what the original computed. Exit code 3.

    ``report`` carries the full :class:`onnxslim_kit.report.Report` (or parity report) so callers
    can show which output failed.
    """

    exit_code = 3

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report

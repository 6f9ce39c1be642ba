"""One exception hierarchy for the package.

Every error a user can cause is a :class:`NormexportError`; the CLI prints it as a
single line (``normexport: error: ...``) and exits with status 2.
"""

from __future__ import annotations


class NormexportError(Exception):
    """Base class of every error normexport raises on purpose."""


class DataError(NormexportError):
    """A table, array or scaler is unusable (missing column, NaN, wrong width, ...)."""


class FormatError(NormexportError):
    """A file is not what it claims to be (bad JSON, wrong format tag, truncated params)."""


class GraphError(NormexportError):
    """A network graph cannot be spliced, folded or exported as asked."""


class MissingExtraError(NormexportError):
    """A verb needs an optional part that is not installed (MXNet, Dask): names the extra."""


class VerificationError(NormexportError):
    """Runtimes disagree beyond tolerance (the CLI maps this to exit status 1)."""


def first_line(exc: BaseException) -> str:
    """The first meaningful line of a (possibly native, multi-line) error message.

    MXNet errors carry a C++ stack trace after the message; a user only needs the line
    that says what went wrong.
    """
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "Stack trace", "[bt]", "File ")):
            return line
    return type(exc).__name__

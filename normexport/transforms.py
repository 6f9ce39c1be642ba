"""The non-linear per-column transforms (``log``, ``log1p``, ``asinh``), NumPy only.

A transformed column is normalized as ``affine(f(x))`` and de-normalized as
``f_inv(affine_inv(y))``. This module is the one registry of the transforms: their
names, their domains, their NumPy forward and inverse (the independent truth that
verification compares the graphs against) and the op each side of a graph applies.
The graph adapters (:mod:`normexport.onnx_affine`, :mod:`normexport.mx.graph`) build
their nodes from :func:`runs`.

=========  ==================  ============  =============
name       forward (inputs)    domain        inverse
=========  ==================  ============  =============
``log``    ``log(x)``          ``x > 0``     ``exp``
``log1p``  ``log(1 + x)``      ``x > -1``    ``expm1``
``asinh``  ``asinh(x)``        any ``x``     ``sinh``
=========  ==================  ============  =============
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from normexport.errors import DataError, FormatError

Kinds = tuple[str | None, ...]  # one transform name (or None) per column


@dataclass(frozen=True)
class Transform:
    name: str
    inverse: str  # the op that undoes it: the output side's op
    low: float | None  # values must be > low (None: any finite value)

    def in_domain(self, x: np.ndarray) -> np.ndarray:
        return np.ones(x.shape, bool) if self.low is None else x > self.low


TRANSFORMS = {
    t.name: t
    for t in (
        Transform("log", "exp", 0.0),
        Transform("log1p", "expm1", -1.0),
        Transform("asinh", "sinh", None),
    )
}
# The elementwise op of each side, in NumPy (the truth) by op name.
NUMPY_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "log": np.log,
    "log1p": np.log1p,
    "asinh": np.arcsinh,
    "exp": np.exp,
    "expm1": np.expm1,
    "sinh": np.sinh,
}
# Each op's name in an MXNet symbol (the adapter writes them; the NumPy reference reads them).
MXNET_OPS = {op: "arcsinh" if op == "asinh" else op for op in NUMPY_OPS}


def check_spec(spec: Any, source: str = "transform") -> dict[str, str]:
    """Validate ``{column: name}``; return it as a plain dict (empty for None)."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise DataError(
            f"{source} must map column names to transforms, e.g. {{'y2': 'log1p'}}; "
            f"got {type(spec).__name__}"
        )
    out = {}
    for column, name in spec.items():
        if not isinstance(column, str) or not column:
            raise DataError(f"{source}: column names must be non-empty strings, got {column!r}")
        if name not in TRANSFORMS:
            raise DataError(
                f"{source}: column {column!r}: unknown transform {name!r} "
                f"(known: {', '.join(TRANSFORMS)})"
            )
        out[column] = name
    return out


def kinds_for(spec: Mapping[str, str], columns: Sequence[str], source: str) -> Kinds:
    """Per-column transform names for ``columns``; every key of ``spec`` must be one."""
    unknown = [c for c in spec if c not in columns]
    if unknown:
        raise DataError(
            f"{source}: transform for column {unknown[0]!r}, which is not among the "
            f"columns ({', '.join(columns)})"
        )
    return tuple(spec.get(c) for c in columns)


def load_spec(obj: Any, columns: Sequence[str], source: str) -> Kinds:
    """Per-column names from a scalers file's ``transform`` object (FormatError if bad)."""
    try:
        return kinds_for(check_spec(obj, f"{source}: 'transform'"), columns, source)
    except DataError as exc:
        raise FormatError(str(exc)) from exc


def check_domain(X: np.ndarray, kinds: Kinds, columns: Sequence[str]) -> None:
    """Refuse the first value outside its column's domain (rows counted from 0)."""
    for j, name in enumerate(kinds):
        if name is None or TRANSFORMS[name].low is None:
            continue
        bad = ~TRANSFORMS[name].in_domain(X[:, j])
        if bad.any():
            row = int(np.argmax(bad))
            raise DomainError(row, columns[j], float(X[row, j]), name)


class DomainError(DataError):
    """A fitting value outside its transform's domain; ``row`` lets a caller name the
    file line it came from."""

    def __init__(self, row: int, column: str, value: float, name: str) -> None:
        self.row, self.column = row, column
        self.problem = (
            f"value {value:g} is outside the domain of {name} (needs > {TRANSFORMS[name].low:g})"
        )
        super().__init__(f"row {row}, column {column!r}: {self.problem}")


def out_of_domain(X: np.ndarray, kinds: Kinds) -> np.ndarray:
    """Per column, how many rows of ``X`` lie outside its transform's domain."""
    counts = np.zeros(len(kinds), dtype=np.int64)
    for j, name in enumerate(kinds):
        if name is not None and TRANSFORMS[name].low is not None:
            counts[j] = int(np.sum(~TRANSFORMS[name].in_domain(X[:, j])))
    return counts


def side_ops(kinds: Kinds, side: str) -> Kinds:
    """The op each column gets on a graph side: the transform on ``in``, its inverse on
    ``out``."""
    if side == "in":
        return kinds
    return tuple(None if k is None else TRANSFORMS[k].inverse for k in kinds)


def runs(ops: Kinds) -> list[tuple[int, int, str | None]]:
    """Contiguous column runs ``(start, stop, op)`` sharing one op (None: untouched)."""
    out: list[tuple[int, int, str | None]] = []
    for j, op in enumerate(ops):
        if out and out[-1][2] == op:
            out[-1] = (out[-1][0], j + 1, op)
        else:
            out.append((j, j + 1, op))
    return out


def apply(X: np.ndarray, ops: Kinds) -> np.ndarray:
    """Apply one op per column in NumPy (out-of-domain values give NaN or -inf, as in the
    graphs); columns without an op are returned as they are. ``X`` keeps its dtype."""
    if not any(ops):
        return X
    out = np.array(X, copy=True)
    with np.errstate(all="ignore"):
        for j, op in enumerate(ops):
            if op is not None:
                out[:, j] = NUMPY_OPS[op](X[:, j])
    return out


def describe(kinds: Kinds, columns: Sequence[str]) -> dict[str, str]:
    """``{column: name}`` for the transformed columns (what files and reports show)."""
    return {c: k for c, k in zip(columns, kinds, strict=True) if k is not None}

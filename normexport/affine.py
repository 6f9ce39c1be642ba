"""The format-free affine core: factor checks, the fold plan, and the fold arithmetic.

A per-column affine is a pair ``(scale, shift)``: ``x_norm = x * scale + shift`` on the
input side, ``y = y_norm * scale + shift`` on the output side. Both graph adapters (the
MXNet symbol in :mod:`normexport.mx.graph`, the ONNX graph in
:mod:`normexport.onnx_affine`) validate affines, plan folds and fold weights through the
functions here, so the two formats cannot drift apart.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normexport.errors import DataError, FormatError, NormexportError, first_line

Affine = tuple[np.ndarray, np.ndarray]  # (scale, shift), float64, one entry per column

PREFIX = "normexport_"
SIDES = ("in", "out")


def constant_name(side: str, part: str) -> str:
    """The name every format gives a spliced constant: ``normexport_in_scale``, ..."""
    return f"{PREFIX}{side}_{part}"


# ------------------------------------------------------------------------------ checks


def as_float64(affine: Any) -> Affine:
    """``(scale, shift)`` as two flat float64 vectors."""
    scale, shift = affine
    return (
        np.asarray(scale, dtype=np.float64).reshape(-1),
        np.asarray(shift, dtype=np.float64).reshape(-1),
    )


def check_values(
    scale: np.ndarray,
    shift: np.ndarray,
    names: Any,
    source: str,
    *,
    dtype: str | None = None,
    error: type[NormexportError] = DataError,
) -> None:
    """The one factor check: every scale finite and non-zero, every shift finite.

    With ``dtype``, the check also holds after casting to it: a float64 factor that
    overflows or underflows to 0 in float32 is refused, not baked into the file.
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    if scale.shape != shift.shape:
        raise error(f"{source}: {scale.size} scales but {shift.size} shifts")
    for i, name in enumerate(names):
        if not np.isfinite(scale[i]) or scale[i] == 0:
            raise error(f"{source}: {name}: scale {scale[i]} must be finite and non-zero")
        if not np.isfinite(shift[i]):
            raise error(f"{source}: {name}: shift {shift[i]} is not finite")
    if dtype is not None and dtype != "float64":
        with np.errstate(over="ignore", under="ignore"):
            cast_scale, cast_shift = scale.astype(dtype), shift.astype(dtype)
        for i, name in enumerate(names):
            if not np.isfinite(cast_scale[i]) or cast_scale[i] == 0:
                raise error(f"{source}: {name}: scale {scale[i]:g} does not fit in {dtype}")
            if not np.isfinite(cast_shift[i]):
                raise error(f"{source}: {name}: shift {shift[i]:g} does not fit in {dtype}")


def check_affine(
    side: str, affine: Any, width: int | None = None, *, dtype: str | None = None
) -> Affine:
    """Validate one side's affine against the graph's width; return it as float64."""
    scale, shift = as_float64(affine)
    if scale.shape != shift.shape or (width is not None and width != scale.size):
        raise NormexportError(
            f"the {side} side has {width} columns, but the affine has {scale.size} scales "
            f"and {shift.size} shifts"
        )
    check_values(
        scale, shift, [f"column {i}" for i in range(scale.size)], f"{side} affine", dtype=dtype
    )
    return scale, shift


# ------------------------------------------------------------------------------ factor files

MAX_FACTORS_BYTES = 16 * 1024 * 1024


def load_factors(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a side file of ``(scale, shift)`` rows: ``.npy`` (no pickles) or text.

    Text is what ``numpy.savetxt`` writes: one row per line, whitespace- or
    comma-separated, ``#`` comments.
    """
    from normexport.files import PICKLE_MAGIC, read_small_file

    path = Path(path)
    raw = read_small_file(path, MAX_FACTORS_BYTES)
    if path.suffix == ".npy" or raw.startswith(b"\x93NUMPY"):
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise FormatError(f"{path}: not a readable .npy array of numbers ({exc})") from exc
    else:
        if raw.startswith(PICKLE_MAGIC):
            raise FormatError(f"{path}: looks like a Python pickle; expected text or .npy")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: not a text file of numbers or a .npy array") from None
        if not any(line.split("#")[0].strip() for line in text.splitlines()):
            raise FormatError(f"{path}: empty, expected rows of (scale, shift)")
        try:
            delimiter = "," if "," in text else None
            array = np.loadtxt(text.splitlines(), delimiter=delimiter, ndmin=2)
        except ValueError as exc:
            raise FormatError(f"{path}: not a table of numbers ({first_line(exc)})") from exc
    return check_factors(array, str(path), error=FormatError)


def check_factors(
    factors: Any, source: str = "factors", *, error: type[NormexportError] = DataError
) -> np.ndarray:
    """Validate an array of ``(scale, shift)`` rows; return it as float64."""
    array = np.asarray(factors)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise error(f"{source}: holds {array.dtype} values, expected real numbers")
    array = array.astype(np.float64)
    if array.ndim == 1 and array.size == 2:
        array = array.reshape(1, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise error(
            f"{source}: expected rows of (scale, shift), shape (n_inputs + n_outputs, 2); "
            f"got shape {array.shape}"
        )
    rows = [f"row {i + 1}" for i in range(array.shape[0])]
    check_values(array[:, 0], array[:, 1], rows, source, error=error)
    return array


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class FoldPlan:
    """Which side went where: ``"folded"`` or ``"spliced"``, with the reason if spliced.

    ``input_node``/``output_node`` name the layer a folded side went into.
    """

    input: str
    output: str
    input_reason: str = ""
    output_reason: str = ""
    input_node: str = ""
    output_node: str = ""

    @classmethod
    def of(cls, first: Any, last: Any, label: Any = str) -> FoldPlan:
        """The plan from each side's match: a layer (folded into it) or a reason (spliced)."""
        return cls(
            "spliced" if isinstance(first, str) else "folded",
            "spliced" if isinstance(last, str) else "folded",
            first if isinstance(first, str) else "",
            last if isinstance(last, str) else "",
            "" if isinstance(first, str) else label(first),
            "" if isinstance(last, str) else label(last),
        )

    def to_dict(self) -> dict[str, str]:
        """The JSON form stored in the manifest and in ``metadata_props["normexport.fold"]``."""
        out = {"input": self.input, "output": self.output}
        for key in ("input_reason", "output_reason", "input_node", "output_node"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def messages(self) -> list[str]:
        """One line per side, for the terminal."""
        lines = []
        for side in ("input", "output"):
            if getattr(self, side) == "folded":
                lines.append(f"{side} affine folded into {getattr(self, side + '_node')}")
            else:
                reason = getattr(self, side + "_reason")
                lines.append(f"{side} affine spliced" + (f": {reason}" if reason else ""))
        return lines


SPLICED = FoldPlan("spliced", "spliced")


# ------------------------------------------------------------------------------ fold


def fold_dense(
    W: np.ndarray,
    C: np.ndarray | None,
    affine_in: Affine | None = None,
    affine_out: Affine | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Fold affines into a dense layer ``y = data @ W + C`` (``W`` is ``(K, N)``), in float64.

    Input side: ``(x*s + t) @ W + C = x @ (diag(s) W) + (t @ W + C)``. Output side:
    ``(data @ W + C)*s + t = data @ (W diag(s)) + (C*s + t)``. ``C`` is ``None`` (no
    bias) or 2-D, broadcastable to ``(batch, N)``; it stays ``None`` when nothing needs a
    bias, so a layer without one keeps having none where the shifts are zero.
    """
    W = np.asarray(W, dtype=np.float64)
    C = None if C is None else np.asarray(C, dtype=np.float64)
    if affine_in is not None:
        scale, shift = as_float64(affine_in)
        C = _plus(C, shift @ W)
        W = scale[:, None] * W
    if affine_out is not None:
        scale, shift = as_float64(affine_out)
        W = W * scale[None, :]
        C = _plus(None if C is None else C * scale[None, :], shift)
    return W, C


def _plus(C: np.ndarray | None, row: np.ndarray) -> np.ndarray | None:
    """``C + row`` (a row vector); stays None when there is no C and the row is zero."""
    row = row.reshape(1, -1)
    if C is None:
        return row.copy() if row.any() else None
    return C + row

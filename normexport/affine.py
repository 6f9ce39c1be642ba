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
from dataclasses import dataclass, replace
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
AFFINE_ONLY = (
    "factors files are affine only (scale, shift); for log, log1p or asinh columns "
    "give a scalers.json with --scalers"
)


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
            words = set(text.replace(",", " ").split())
            hint = f"; {AFFINE_ONLY}" if words & {"log", "log1p", "asinh"} else ""
            raise FormatError(f"{path}: not a table of numbers ({first_line(exc)}){hint}") from exc
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
        hint = f"; {AFFINE_ONLY}" if array.ndim == 2 and array.shape[1] == 3 else ""
        raise error(
            f"{source}: expected rows of (scale, shift), shape (n_inputs + n_outputs, 2); "
            f"got shape {array.shape}{hint}"
        )
    rows = [f"row {i + 1}" for i in range(array.shape[0])]
    check_values(array[:, 0], array[:, 1], rows, source, error=error)
    return array


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class FoldPlan:
    """Which side went where: ``"folded"`` or ``"spliced"``, with the reason if spliced.

    ``input_node``/``output_node`` name the layer a folded side went into;
    ``input_transforms``/``output_transforms`` the non-linear transforms that stay nodes
    at that edge of the graph (only an affine folds), e.g. ``"log(y)"``.
    """

    input: str
    output: str
    input_reason: str = ""
    output_reason: str = ""
    input_node: str = ""
    output_node: str = ""
    input_transforms: str = ""
    output_transforms: str = ""

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

    def keeping(self, inputs: dict[str, str], outputs: dict[str, str]) -> FoldPlan:
        """This plan, noting the transforms (``{column: name}`` per side) kept as nodes."""

        def spelled(transforms: dict[str, str]) -> str:
            return ", ".join(f"{name}({column})" for column, name in transforms.items())

        return replace(self, input_transforms=spelled(inputs), output_transforms=spelled(outputs))

    def to_dict(self) -> dict[str, str]:
        """The JSON form stored in the manifest and in ``metadata_props["normexport.fold"]``."""
        out = {"input": self.input, "output": self.output}
        for key in (
            *("input_reason", "output_reason", "input_node", "output_node"),
            *("input_transforms", "output_transforms"),
        ):
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
            kept = getattr(self, side + "_transforms")
            if kept:
                lines.append(f"{side} transforms kept as nodes (only the affine folds): {kept}")
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


def fold_scaler(offset: Any, scale: Any, affine_in: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Fold the input affine into a scaler ``y = (data - offset) * scale`` (``ai.onnx.ml``
    ``Scaler``), in float64: ``((x*s + t) - offset) * scale = (x - (offset - t)/s) * (s*scale)``.

    Returns the new ``(offset, scale)``, one entry per column.
    """
    s, t = as_float64(affine_in)
    offset = np.broadcast_to(np.asarray(offset, dtype=np.float64).reshape(-1), s.shape)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), s.shape)
    return (offset - t) / s, s * scale


def fold_leaves(
    weights: Any,
    targets: Any,
    affine_out: Affine,
    *,
    base: Any = None,
    shift_leaves: Any = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Fold the output affine into a tree ensemble, in float64: a tree's prediction for
    target ``j`` is a sum (or mean, min, max) of leaf weights plus ``base[j]``, so each
    weight takes the scale of its target, and ``base' = base*s + t``.

    An ensemble without base values takes the shift in its leaves instead:
    ``shift_leaves`` (one multiplier per leaf) adds ``multiplier * t`` of the leaf's target.
    Returns the new weights and base (None without ``base``).
    """
    s, t = as_float64(affine_out)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    new = np.asarray(weights, dtype=np.float64).reshape(-1) * s[targets]
    if shift_leaves is not None:
        new = new + np.asarray(shift_leaves, dtype=np.float64).reshape(-1) * t[targets]
    new_base = None if base is None else np.asarray(base, dtype=np.float64).reshape(-1) * s + t
    return new, new_base


# ------------------------------------------------------------------------------ tree splits

SPLIT_FLIP = {"LEQ": "GTE", "LT": "GT", "GTE": "LEQ", "GT": "LT"}


def apply(x: Any, scale: Any, shift: Any, dtype: str) -> np.ndarray:
    """``x * scale + shift`` computed in ``dtype`` exactly as the spliced affine and the
    scalers compute it (multiply, round, add, round): the normalization a fold must match."""
    x = np.asarray(x, dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return x * np.asarray(scale).astype(dtype) + np.asarray(shift).astype(dtype)


def fold_splits(
    thresholds: Any, modes: Any, scale: Any, shift: Any, dtype: str
) -> tuple[np.ndarray, list[str]]:
    """Move decision thresholds from normalized to raw space, exactly.

    A split compares the normalized value with a threshold: ``apply(x) <= θ`` (mode
    ``LEQ``; also ``LT``, ``GTE``, ``GT``). Each argument is one entry per split
    (``scale``/``shift`` of the split's column). The result is, per split, a raw-space
    threshold and a mode that select exactly the same ``x`` of ``dtype``, including
    ``±inf``; NaN compares false either way, so missing values take the same branch.
    ``(θ - t)/s`` rounded is not enough: ``x -> apply(x)`` is monotonic but rounds, so
    the boundary float is found by bisection over the representable values. A negative
    scale reverses the order and flips the mode (``LEQ``↔``GTE``, ``LT``↔``GT``).

    Returns float64 thresholds (each exactly a ``dtype`` value) and the modes.
    """
    theta = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    modes = list(modes)
    if not theta.size:
        return theta.copy(), []
    unknown = sorted({m for m in modes if m not in SPLIT_FLIP})
    if unknown:
        raise NormexportError(f"split modes {', '.join(unknown)} cannot move to raw space")
    below = np.array([m in ("LEQ", "GT") for m in modes])  # the set {apply(x) <= θ} decides
    up = scale > 0
    # A monotone predicate, true then false along the floats; its last true float (plus
    # one step where the boundary is the first float of the complementary set).
    step = np.where(up, ~below, below).astype(np.uint64)
    keys = _FloatKeys(dtype)
    lo = np.full(theta.shape, keys.lowest - 1, dtype=np.uint64)  # virtually true
    hi = np.full(theta.shape, keys.highest + 1, dtype=np.uint64)  # virtually false
    open_ = ~np.isnan(theta)
    while True:
        active = open_ & (hi - lo > 1)
        if not active.any():
            break
        mid = lo + (hi - lo) // np.uint64(2)
        x = keys.floats(np.where(active, mid, keys.highest))
        n = apply(x, scale, shift, dtype).astype(np.float64)
        with np.errstate(invalid="ignore"):
            pred = np.where(
                up,
                np.where(below, n <= theta, n < theta),
                np.where(below, n > theta, n >= theta),
            )
        lo = np.where(active & pred, mid, lo)
        hi = np.where(active & ~pred, mid, hi)
    raw = keys.floats(np.where(open_, lo + step, keys.highest)).astype(np.float64)
    raw[~open_] = np.nan
    new_modes = [m if u else SPLIT_FLIP[m] for m, u in zip(modes, up.tolist(), strict=True)]
    return raw, new_modes


class _FloatKeys:
    """The floats of a dtype as unsigned integers in the same order (NaN excluded)."""

    def __init__(self, dtype: str) -> None:
        self.dtype = np.dtype(dtype)
        bits = self.dtype.itemsize * 8
        self.uint = np.dtype(f"uint{bits}")
        self.sign = np.uint64(1 << (bits - 1))
        self.mask = np.uint64((1 << bits) - 1)
        self.lowest = int(self.keys(np.array([-np.inf]))[0])
        self.highest = int(self.keys(np.array([np.inf]))[0])

    def keys(self, x: np.ndarray) -> np.ndarray:
        bits = np.asarray(x, dtype=self.dtype).view(self.uint).astype(np.uint64)
        return np.where(bits & self.sign, ~bits & self.mask, bits | self.sign)

    def floats(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)
        bits = np.where(keys & self.sign, keys & ~self.sign, ~keys & self.mask)
        return bits.astype(self.uint).view(self.dtype)

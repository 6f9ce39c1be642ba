"""Per-column scalers (NumPy only), shaped like scikit-learn's.

Every scaler reduces to one affine map per column, ``x_norm = x * scale_ + shift_``, and
its exact inverse, ``x = x_norm * inverse_scale_ + inverse_shift_``, optionally after a
non-linear transform of chosen columns (``log``, ``log1p``, ``asinh``: see
:mod:`normexport.transforms`), which the inverse undoes last. ``transform`` and
``inverse_transform`` are implemented through exactly these arrays, which are also the
constants that the graph adapters write into the network, so the exported model
cannot drift from the Python one. Statistics are fitted in float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from normexport import transforms as tf
from normexport.affine import check_values
from normexport.errors import DataError, FormatError

SCALERS_FORMAT = "normexport.scalers/1"
# Written only when a column has a transform, so that a reader that knows only /1 refuses
# the file instead of ignoring the transform; affine-only files keep /1.
SCALERS_FORMAT_TRANSFORMS = "normexport.scalers/2"
SCALERS_FORMATS = (SCALERS_FORMAT, SCALERS_FORMAT_TRANSFORMS)
DTYPES = ("float32", "float64")


class NotFittedError(DataError, AttributeError):
    """A scaler is used before ``fit`` (an ``AttributeError`` too, so ``hasattr`` works)."""


class AffineScaler:
    """A fitted or given per-column affine map; the base of every scaler.

    Use :class:`MinMaxScaler` or :class:`StandardScaler` to fit one from data, or
    :meth:`from_affine` to wrap factors that were computed elsewhere.
    """

    kind: ClassVar[str] = "affine"

    scale_: np.ndarray
    shift_: np.ndarray
    inverse_scale_: np.ndarray
    inverse_shift_: np.ndarray
    columns_: list[str]
    n_features_in_: int
    transforms_: tf.Kinds  # per column: a transform name, or None
    transform_spec: dict[str, str] = {}  # noqa: RUF012 (replaced, never mutated)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_affine(
        cls,
        scale: Sequence[float] | np.ndarray,
        shift: Sequence[float] | np.ndarray,
        *,
        columns: Sequence[str] | None = None,
        inverse: bool = False,
    ) -> AffineScaler:
        """Wrap given factors. With ``inverse=True`` they are the de-normalization map
        (``y = y_norm * scale + shift``), kept bit-exact; the forward map is derived."""
        scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        shift = np.asarray(shift, dtype=np.float64).reshape(-1)
        if scale.shape != shift.shape:
            raise DataError(f"{scale.size} scales but {shift.size} shifts")
        names = _column_names(columns, scale.size)
        _check_factors(scale, shift, names)
        self = AffineScaler()
        if inverse:
            self._set_inverse(scale, shift)
        else:
            self._set_forward(scale, shift)
        self.columns_ = names
        self.n_features_in_ = scale.size
        self.transforms_ = (None,) * scale.size
        return self

    def _set_forward(self, scale: np.ndarray, shift: np.ndarray) -> None:
        self.scale_, self.shift_ = scale, shift
        self.inverse_scale_ = 1.0 / scale
        self.inverse_shift_ = -shift / scale

    def _set_inverse(self, scale: np.ndarray, shift: np.ndarray) -> None:
        self.inverse_scale_, self.inverse_shift_ = scale, shift
        self.scale_ = 1.0 / scale
        self.shift_ = -shift / scale

    # ---------------------------------------------------------------- the affine maps

    def __getattr__(self, name: str) -> Any:
        # Only reached when the attribute is missing: a fitted attribute (``columns_``,
        # ``scale_``, ...) of a scaler that was never fitted.
        if name.endswith("_") and not name.startswith("_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet (it has no {name}); "
                "call fit(X) before using it"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "scale_")

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, shift)`` in float64 with ``x_norm = x * scale + shift``."""
        self._check_fitted()
        return self.scale_, self.shift_

    def inverse_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, shift)`` in float64 with ``x = x_norm * scale + shift``."""
        self._check_fitted()
        return self.inverse_scale_, self.inverse_shift_

    def span(self) -> np.ndarray:
        """Each column's range in raw units: the yardstick for range-relative errors.

        The fitted data range (min-max and z-score scalers); for given factors, the raw
        width that maps onto one normalized unit. A constant column counts as 1.
        """
        data_range = self._data_range()
        if data_range is not None:
            return np.where(data_range > 0, data_range, 1.0)
        return np.abs(self.inverse_affine()[0]) * self._normalized_width()

    def _data_range(self) -> np.ndarray | None:
        return None

    def _normalized_width(self) -> float:
        return 1.0

    def transform(self, X: Any) -> np.ndarray:
        """Normalize ``X`` (rows × columns); the result has ``X``'s float dtype.

        Transformed columns go through their transform first; a value outside its
        domain (``<= 0`` under ``log``) gives NaN or ``-inf``, as in the exported graph.
        """
        X = self._checked(X)
        return self._affine(tf.apply(X, self.transforms_), *self.affine())

    def inverse_transform(self, X: Any, *, check_finite: bool = True) -> np.ndarray:
        """Map normalized values back to raw units; the result has ``X``'s float dtype.

        ``check_finite=False`` lets NaN and infinities through (a model's output for an
        input outside a transform's domain) instead of refusing them.
        """
        X = self._affine(self._checked(X, check_finite), *self.inverse_affine())
        return tf.apply(X, tf.side_ops(self.transforms_, "out"))

    @property
    def has_transforms(self) -> bool:
        return any(self.transforms_)

    def transforms(self) -> dict[str, str]:
        """``{column: transform}`` for the transformed columns (empty when none are)."""
        self._check_fitted()
        return tf.describe(self.transforms_, self.columns_)

    def fit_transform(self, X: Any, columns: Sequence[str] | None = None) -> np.ndarray:
        return self.fit(X, columns=columns).transform(X)

    def fit(
        self, X: Any, columns: Sequence[str] | None = None, *, target: bool = False
    ) -> AffineScaler:
        raise NotImplementedError(f"{type(self).__name__} holds given factors; it cannot fit")

    def _checked(self, X: Any, check_finite: bool = True) -> np.ndarray:
        X = _as_2d_float(X, f"{type(self).__name__} input")
        if X.shape[1] != self.n_features_in_:
            raise DataError(
                f"X has {X.shape[1]} columns, but this {type(self).__name__} was fitted on "
                f"{self.n_features_in_} ({', '.join(self.columns_)})"
            )
        if check_finite:
            _check_finite(X, self.columns_)
        return X

    @staticmethod
    def _affine(X: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
        # Same arithmetic as the graph: constants cast to the data's dtype, multiply, add.
        with np.errstate(invalid="ignore"):  # -inf from log(0) stays -inf (or NaN)
            return X * scale.astype(X.dtype) + shift.astype(X.dtype)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(X) before using it"
            )

    def check_target(self) -> None:
        """Refuse constant columns: a target with zero range leaves nothing to learn."""
        for name in getattr(self, "constant_columns_", []):
            raise DataError(f"target column {name!r} is constant; there is nothing to learn")

    def _finish_fit(
        self,
        scale: np.ndarray,
        shift: np.ndarray,
        names: list[str],
        constant: np.ndarray,
        target: bool,
        kinds: tf.Kinds,
    ) -> None:
        with np.errstate(over="ignore"):
            spans = self.data_max_ - self.data_min_
        for name, span in zip(names, spans, strict=True):
            if not np.isfinite(span):  # e.g. -1e308 .. 1e308: every later step overflows
                raise DataError(
                    f"column {name!r}: its range {span} overflows float64; rescale the column"
                )
        check_values(scale, shift, [f"column {n!r}" for n in names], "fitted scaler")
        self.columns_ = names
        self.n_features_in_ = len(names)
        self.transforms_ = kinds
        self.constant_columns_ = [n for n, c in zip(names, constant, strict=True) if c]
        if target:
            self.check_target()
        if self.constant_columns_:
            warnings.warn(
                f"constant column(s) {', '.join(self.constant_columns_)}: scale set to 1",
                UserWarning,
                stacklevel=3,
            )
        self._set_forward(scale, shift)

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description; floats round-trip bit-exactly."""
        self._check_fitted()
        out: dict[str, Any] = {"kind": self.kind, "columns": list(self.columns_)}
        out.update(self._settings())
        if self.has_transforms:
            out["transform"] = self.transforms()
        out.update({k: v.tolist() for k, v in self._statistics().items()})
        for key in self._optional_statistics:
            value = getattr(self, key + "_", None)
            if value is not None:
                out[key] = value.tolist()
        out.update(
            scale=self.scale_.tolist(),
            shift=self.shift_.tolist(),
            inverse_scale=self.inverse_scale_.tolist(),
            inverse_shift=self.inverse_shift_.tolist(),
        )
        return out

    @staticmethod
    def from_dict(obj: Any, source: str = "scaler") -> AffineScaler:
        """Rebuild a scaler from :meth:`to_dict` output, validating every field."""
        if not isinstance(obj, dict):
            raise FormatError(f"{source}: expected an object, got {type(obj).__name__}")
        kind = obj.get("kind")
        classes = {c.kind: c for c in (AffineScaler, MinMaxScaler, StandardScaler)}
        if kind not in classes:
            known = ", ".join(classes)
            raise FormatError(f"{source}: unknown scaler kind {kind!r} (known: {known})")
        cls = classes[kind]
        columns = obj.get("columns")
        if (
            not isinstance(columns, list)
            or not columns
            or not all(isinstance(c, str) and c for c in columns)
        ):
            raise FormatError(f"{source}: 'columns' must be a non-empty list of names")
        n = len(columns)
        arrays = {
            key: _vector(obj, key, n, source)
            for key in ("scale", "shift", "inverse_scale", "inverse_shift", *cls._statistic_names)
        }
        _check_factors(arrays["scale"], arrays["shift"], columns, source)
        _check_factors(arrays["inverse_scale"], arrays["inverse_shift"], columns, source)
        product = arrays["scale"] * arrays["inverse_scale"]
        if not np.allclose(product, 1.0, rtol=0, atol=1e-9):
            raise FormatError(f"{source}: 'inverse_scale' is not the inverse of 'scale'")
        self = cls.__new__(cls)
        self._load_settings(obj, source)
        for key in cls._statistic_names:
            setattr(self, key + "_", arrays[key])
        for key in cls._optional_statistics:
            setattr(self, key + "_", _vector(obj, key, n, source) if key in obj else None)
        self.scale_, self.shift_ = arrays["scale"], arrays["shift"]
        self.inverse_scale_ = arrays["inverse_scale"]
        self.inverse_shift_ = arrays["inverse_shift"]
        self.columns_ = list(columns)
        self.n_features_in_ = n
        self.transforms_ = tf.load_spec(obj.get("transform"), self.columns_, source)
        self.transform_spec = self.transforms()
        self.constant_columns_ = self._constant_columns()
        return self

    _statistic_names: ClassVar[tuple[str, ...]] = ()
    _optional_statistics: ClassVar[tuple[str, ...]] = ()

    def _statistics(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k + "_") for k in self._statistic_names}

    def _settings(self) -> dict[str, Any]:
        return {}

    def _load_settings(self, obj: dict[str, Any], source: str) -> None:
        pass

    def _constant_columns(self) -> list[str]:
        return []

    def _fit_transformed(
        self, X: Any, columns: Sequence[str] | None
    ) -> tuple[np.ndarray, np.ndarray, list[str], tf.Kinds]:
        """Validate ``X``: the raw float64 array, its transformed values, names, kinds."""
        X, names = _prepare_fit(X, columns, type(self).__name__)
        kinds = tf.kinds_for(self.transform_spec, names, f"{type(self).__name__}.fit")
        tf.check_domain(X, kinds, names)
        return X, tf.apply(X, kinds), names, kinds

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        if self.transform_spec:
            settings += (", " if settings else "") + f"transform={self.transform_spec!r}"
        state = f" fitted on {self.columns_}" if self.is_fitted else ""
        return f"{type(self).__name__}({settings}){state}"


class MinMaxScaler(AffineScaler):
    """Scale each column from its ``[min, max]`` to ``feature_range`` (default 0…1).

    A constant column gets scale 1 (it is only shifted), with a warning; as a target
    (``fit(..., target=True)``) it is an error.

    Examples
    --------
    >>> import numpy as np
    >>> sc = MinMaxScaler().fit(np.array([[0.0, 10.0], [2.0, 30.0]]), columns=["a", "b"])
    >>> sc.transform(np.array([[1.0, 20.0]]))
    array([[0.5, 0.5]])
    >>> sc.inverse_transform(np.array([[0.0, 1.0]]))
    array([[ 0., 30.]])

    ``transform`` names columns to transform before scaling; ``data_min_`` and
    ``data_max_`` stay in raw units, the map spans their transformed values:

    >>> sc = MinMaxScaler(transform={"y": "log"}).fit(np.array([[1.0], [100.0]]), columns=["y"])
    >>> sc.transform(np.array([[10.0]]))
    array([[0.5]])
    """

    kind: ClassVar[str] = "minmax"
    _statistic_names = ("data_min", "data_max")
    data_min_: np.ndarray
    data_max_: np.ndarray

    def __init__(
        self,
        feature_range: tuple[float, float] = (0.0, 1.0),
        *,
        transform: dict[str, str] | None = None,
    ) -> None:
        self.feature_range = _check_feature_range(feature_range, "feature_range")
        self.transform_spec = tf.check_spec(transform)

    def fit(
        self, X: Any, columns: Sequence[str] | None = None, *, target: bool = False
    ) -> MinMaxScaler:
        X, _, names, kinds = self._fit_transformed(X, columns)
        self.data_min_, self.data_max_ = X.min(axis=0), X.max(axis=0)
        # every transform is increasing: the transformed extremes are those of the raw data
        t_min, t_max = tf.apply(np.stack([self.data_min_, self.data_max_]), kinds)
        data_range = t_max - t_min
        low, high = self.feature_range
        constant = data_range == 0
        scale = (high - low) / np.where(constant, 1.0, data_range)
        scale[constant] = 1.0
        self._finish_fit(scale, low - t_min * scale, names, constant, target, kinds)
        return self

    @property
    def data_range_(self) -> np.ndarray:
        return self.data_max_ - self.data_min_

    def _data_range(self) -> np.ndarray:
        return self.data_range_

    def _settings(self) -> dict[str, Any]:
        return {"feature_range": list(self.feature_range)}

    def _normalized_width(self) -> float:
        return self.feature_range[1] - self.feature_range[0]

    def _load_settings(self, obj: dict[str, Any], source: str) -> None:
        self.feature_range = _check_feature_range(obj.get("feature_range"), source)

    def _constant_columns(self) -> list[str]:
        return [c for c, r in zip(self.columns_, self.data_range_, strict=True) if r == 0]


class StandardScaler(AffineScaler):
    """Z-score each column: ``(x - mean) / std`` (population std, as scikit-learn).

    With ``transform`` (as for :class:`MinMaxScaler`), ``mean_`` and ``std_`` are those of
    the transformed values.

    Examples
    --------
    >>> import numpy as np
    >>> sc = StandardScaler().fit(np.array([[1.0], [3.0]]))
    >>> sc.transform(np.array([[1.0], [3.0]]))
    array([[-1.],
           [ 1.]])
    """

    kind: ClassVar[str] = "standard"
    _statistic_names = ("mean", "std")
    _optional_statistics = ("data_min", "data_max")  # absent from files of version 0.1
    mean_: np.ndarray
    std_: np.ndarray
    data_min_: np.ndarray | None
    data_max_: np.ndarray | None

    def __init__(self, *, transform: dict[str, str] | None = None) -> None:
        self.transform_spec = tf.check_spec(transform)

    def fit(
        self, X: Any, columns: Sequence[str] | None = None, *, target: bool = False
    ) -> StandardScaler:
        X, Xt, names, kinds = self._fit_transformed(X, columns)
        # mean and std of the transformed values (they define the map)
        self.mean_, self.std_ = Xt.mean(axis=0), Xt.std(axis=0)
        # the raw range is not part of the map, but it is each column's yardstick for errors
        self.data_min_, self.data_max_ = X.min(axis=0), X.max(axis=0)
        constant = self.std_ == 0
        scale = 1.0 / np.where(constant, 1.0, self.std_)
        self._finish_fit(scale, -self.mean_ * scale, names, constant, target, kinds)
        return self

    def _constant_columns(self) -> list[str]:
        return [c for c, s in zip(self.columns_, self.std_, strict=True) if s == 0]

    def _data_range(self) -> np.ndarray | None:
        if self.data_min_ is None or self.data_max_ is None:
            return None  # a scalers file written before the range was recorded: one std
        return self.data_max_ - self.data_min_


# ------------------------------------------------------------------------ the scalers file


def scalers_to_dict(
    in_scaler: AffineScaler, out_scaler: AffineScaler, dtype: str
) -> dict[str, Any]:
    """The ``scalers.json`` document: format ``normexport.scalers/1``, or ``/2`` when a
    column has a transform."""
    if dtype not in DTYPES:
        raise DataError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    transformed = in_scaler.has_transforms or out_scaler.has_transforms
    return {
        "format": SCALERS_FORMAT_TRANSFORMS if transformed else SCALERS_FORMAT,
        "dtype": dtype,
        "inputs": in_scaler.to_dict(),
        "outputs": out_scaler.to_dict(),
    }


def scalers_from_dict(obj: Any, source: str = "scalers") -> tuple[AffineScaler, AffineScaler, str]:
    """Parse a ``scalers.json`` document into ``(in_scaler, out_scaler, dtype)``."""
    if not isinstance(obj, dict) or obj.get("format") not in SCALERS_FORMATS:
        found = obj.get("format") if isinstance(obj, dict) else None
        expected = " or ".join(repr(f) for f in SCALERS_FORMATS)
        raise FormatError(f"{source}: format tag is {found!r}, expected {expected}")
    dtype = obj.get("dtype")
    if dtype not in DTYPES:
        raise FormatError(f"{source}: 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
    in_scaler = AffineScaler.from_dict(obj.get("inputs"), f"{source}: inputs")
    out_scaler = AffineScaler.from_dict(obj.get("outputs"), f"{source}: outputs")
    try:
        out_scaler.check_target()
    except DataError as exc:
        raise FormatError(f"{source}: outputs: {exc}") from exc
    return in_scaler, out_scaler, dtype


def factors_to_scalers(
    factors: Any,
    n_inputs: int,
    n_outputs: int,
    source: str = "factors",
    *,
    inputs: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
) -> tuple[AffineScaler, AffineScaler]:
    """Split a side-file array of ``(scale, shift)`` rows into the two scalers.

    The first ``n_inputs`` rows normalize the inputs; the rest de-normalize the outputs.
    ``inputs`` and ``targets`` name the columns (a factors file holds no names); without
    them they are ``x0, x1, ...`` and ``y0, y1, ...`` (see :func:`unnamed_hint`).
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim == 1 and factors.size == 2:
        factors = factors.reshape(1, 2)
    if factors.ndim != 2 or factors.shape[1] != 2:
        raise DataError(f"{source}: expected rows of (scale, shift), got shape {factors.shape}")
    if factors.shape[0] != n_inputs + n_outputs:
        raise DataError(
            f"{source}: {factors.shape[0]} rows, but the network has {n_inputs} inputs and "
            f"{n_outputs} outputs ({n_inputs + n_outputs} rows expected)"
        )
    in_names = _given_names(inputs, n_inputs, "inputs", "input", source, n_inputs + n_outputs)
    out_names = _given_names(targets, n_outputs, "targets", "output", source, n_inputs + n_outputs)
    if inputs is not None and targets is not None:
        both = set(in_names) & set(out_names)
        if both:
            raise DataError(f"column {sorted(both)[0]!r} is named both an input and a target")
    ins, outs = factors[:n_inputs], factors[n_inputs:]
    in_sc = AffineScaler.from_affine(ins[:, 0], ins[:, 1], columns=in_names)
    out_sc = AffineScaler.from_affine(outs[:, 0], outs[:, 1], columns=out_names, inverse=True)
    return in_sc, out_sc


def _given_names(
    names: Sequence[str] | None, n: int, option: str, side: str, source: str, rows: int
) -> list[str]:
    if names is None:
        return _default_names("x" if side == "input" else "y", n)
    if isinstance(names, str):
        raise DataError(f"{option} must be a list of names, not a single string")
    names = [str(c) for c in names]
    if len(names) != n:
        raise DataError(
            f"--{option} names {len(names)} column(s) ({', '.join(names)}), but the network "
            f"has {n} {side}(s) ({source}: {rows} rows of factors)"
        )
    if len(set(names)) != n or not all(names):
        raise DataError(f"--{option}: names must be distinct and non-empty, got {names}")
    return names


def unnamed_hint(inputs: Sequence[str], targets: Sequence[str]) -> str | None:
    """How to name the columns, when ``inputs`` or ``targets`` are the placeholder names
    of a factors file (``x0, x1, ...`` and ``y0, y1, ...``); None when they have real
    names. One line, for the end of an export or bake and for ``predict`` when a table
    lacks those columns."""
    inputs, targets = list(inputs), list(targets)
    if inputs != _default_names("x", len(inputs)) and targets != _default_names("y", len(targets)):
        return None
    ins = ",".join(f"IN{i + 1}" for i in range(len(inputs)))
    outs = ",".join(f"OUT{i + 1}" for i in range(len(targets)))
    return (
        f"the model's columns carry placeholder names ({', '.join(inputs)} -> "
        f"{', '.join(targets)}), as a factors file has none; name them by "
        f"exporting (or baking) with --inputs {ins} --targets {outs}, in the factors file's "
        "row order"
    )


# ------------------------------------------------------------------------ validation


def _prepare_fit(X: Any, columns: Sequence[str] | None, who: str) -> tuple[np.ndarray, list[str]]:
    X = _as_2d_float(X, f"{who}.fit input").astype(np.float64)
    if X.shape[0] == 0:
        raise DataError(f"{who}.fit: X has no rows")
    names = _column_names(columns, X.shape[1])
    _check_finite(X, names)
    return X, names


def _as_2d_float(X: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(X)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what}: not an array ({exc})") from exc
    if arr.ndim != 2:
        raise DataError(
            f"{what}: expected a 2-D array (rows, columns), got {arr.ndim}-D shape "
            f"{arr.shape}; use X.reshape(-1, 1) for a single column"
        )
    if arr.shape[1] == 0:
        raise DataError(f"{what}: X has no columns")
    if not np.issubdtype(arr.dtype, np.floating):
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise DataError(f"{what}: expected real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    return arr


def _check_finite(X: np.ndarray, names: Sequence[str]) -> None:
    bad = ~np.isfinite(X)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"row {row}, column {names[col]!r}: value {X[row, col]} is not finite")


def _column_names(columns: Sequence[str] | None, n: int) -> list[str]:
    if columns is None:
        return _default_names("x", n)
    if isinstance(columns, str):
        raise DataError("columns must be a list of names, not a single string")
    names = [str(c) for c in columns]
    if len(names) != n:
        raise DataError(f"{len(names)} column names given for {n} columns")
    if len(set(names)) != n:
        raise DataError(f"duplicate column names in {names}")
    return names


def _default_names(stem: str, n: int) -> list[str]:
    return [f"{stem}{i}" for i in range(n)]


def _check_factors(
    scale: np.ndarray, shift: np.ndarray, names: Sequence[str], source: str = "factors"
) -> None:
    check_values(scale, shift, [f"column {name!r}" for name in names], source)


def _vector(obj: dict[str, Any], key: str, n: int, source: str) -> np.ndarray:
    value = obj.get(key)
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise FormatError(f"{source}: {key!r} must be a list of {n} numbers")
    arr = np.asarray(value, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise FormatError(f"{source}: {key!r} holds a non-finite number")
    return arr


def _check_feature_range(value: Any, source: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"{source}: feature_range must be two numbers (low, high)") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise DataError(f"{source}: feature_range must satisfy low < high, got ({low}, {high})")
    return (low, high)

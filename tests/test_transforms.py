"""Non-linear per-column transforms in the scalers: the maps, domains, files, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import normexport as nx
from normexport.errors import DataError, FormatError
from normexport.scaling import scalers_from_dict, scalers_to_dict
from normexport.transforms import DomainError

SCALERS = [nx.MinMaxScaler, nx.StandardScaler]
COLUMNS = ["pos", "mag", "signed"]


def physics_table(n: int = 200, seed: int = 0) -> np.ndarray:
    """A positive column spanning 6 decades, one >= 0 and one crossing zero."""
    rng = np.random.default_rng(seed)
    pos = 10.0 ** rng.uniform(-3, 3, n)
    mag = rng.exponential(5.0, n)
    signed = rng.normal(0, 1, n) * 10.0 ** rng.uniform(0, 4, n)
    return np.column_stack([pos, mag, signed])


SPEC = {"pos": "log", "mag": "log1p", "signed": "asinh"}
TRUTH = {"log": np.log, "log1p": np.log1p, "asinh": np.arcsinh}


@pytest.mark.parametrize("cls", SCALERS)
def test_transform_is_the_affine_of_the_transformed_column(cls):
    X = physics_table()
    sc = cls(transform=SPEC).fit(X, columns=COLUMNS)
    # the truth written out: each column through its NumPy function, then the affine
    Xt = np.column_stack([TRUTH[SPEC[c]](X[:, j]) for j, c in enumerate(COLUMNS)])
    scale, shift = sc.affine()
    np.testing.assert_allclose(sc.transform(X), Xt * scale + shift, rtol=0, atol=1e-14)
    # in transformed space the scaler is an ordinary one: min-max to [0, 1] or z-scores
    plain = cls().fit(Xt, columns=COLUMNS)
    np.testing.assert_allclose(sc.transform(X), plain.transform(Xt), rtol=0, atol=1e-12)
    # the raw range stays each column's yardstick for errors
    np.testing.assert_array_equal(sc.span(), X.max(axis=0) - X.min(axis=0))


@pytest.mark.parametrize("cls", SCALERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inverse_undoes_transform(cls, dtype):
    X = physics_table()
    sc = cls(transform=SPEC).fit(X, columns=COLUMNS)
    back = sc.inverse_transform(sc.transform(X.astype(dtype)))
    assert back.dtype == dtype
    # relative to each value: exp/sinh turn an absolute error of the normalized value
    # (a few ulps of the dtype) into a relative one, times the column's log-range
    rtol = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(back, X, rtol=rtol * 20)


def test_untransformed_columns_are_unchanged():
    X = physics_table()
    sc = nx.MinMaxScaler(transform={"pos": "log"}).fit(X, columns=COLUMNS)
    plain = nx.MinMaxScaler().fit(X, columns=COLUMNS)
    np.testing.assert_array_equal(sc.transform(X)[:, 1:], plain.transform(X)[:, 1:])
    assert sc.transforms() == {"pos": "log"}
    assert plain.transforms() == {} and not plain.has_transforms


@pytest.mark.parametrize(
    ("name", "bad"), [("log", 0.0), ("log", -2.0), ("log1p", -1.0), ("log1p", -5.0)]
)
@pytest.mark.parametrize("cls", SCALERS)
def test_fitting_out_of_domain_names_row_and_column(cls, name, bad):
    X = physics_table(20)
    X[7, 1] = bad
    with pytest.raises(DomainError) as info:
        cls(transform={"mag": name}).fit(X, columns=COLUMNS)
    assert str(info.value) == (
        f"row 7, column 'mag': value {bad:g} is outside the domain of {name} "
        f"(needs > {-1 if name == 'log1p' else 0})"
    )
    assert (info.value.row, info.value.column) == (7, "mag")


def test_asinh_takes_any_finite_value():
    X = np.array([[-1e6], [0.0], [3.0]])
    sc = nx.MinMaxScaler(transform={"x0": "asinh"}).fit(X)
    t = np.arcsinh(X[:, 0])
    np.testing.assert_allclose(sc.transform(X)[:, 0], (t - t[0]) / (t[2] - t[0]), atol=1e-15)


def test_inference_out_of_domain_is_nan_as_in_the_graph():
    sc = nx.MinMaxScaler(transform={"x0": "log"}).fit(np.array([[1.0], [100.0]]))
    out = sc.transform(np.array([[-1.0], [0.0]]))
    assert np.isnan(out[0, 0]) and out[1, 0] == -np.inf


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"a": "sqrt"}, "column 'a': unknown transform 'sqrt' (known: log, log1p, asinh)"),
        (["a"], "transform must map column names to transforms"),
        ({"": "log"}, "column names must be non-empty strings"),
        ({"a": None}, "unknown transform None"),
    ],
)
def test_bad_transform_spec_is_one_line(spec, message):
    with pytest.raises(DataError) as info:
        nx.MinMaxScaler(transform=spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_transform_for_unknown_column():
    with pytest.raises(DataError, match="transform for column 'y9', which is not among"):
        nx.StandardScaler(transform={"y9": "log"}).fit(physics_table(), columns=COLUMNS)


# ---------------------------------------------------------------------------- the file


def test_scalers_file_records_transforms_under_format_2():
    X = physics_table()
    in_sc = nx.MinMaxScaler(transform={"pos": "log"}).fit(X, columns=COLUMNS)
    out_sc = nx.StandardScaler(transform={"y": "log1p"}).fit(X[:, 1:2], columns=["y"])
    doc = json.loads(json.dumps(scalers_to_dict(in_sc, out_sc, "float64")))
    assert doc["format"] == "normexport.scalers/2"
    assert doc["inputs"]["transform"] == {"pos": "log"}
    assert doc["outputs"]["transform"] == {"y": "log1p"}
    back_in, back_out, _ = scalers_from_dict(doc)
    assert back_in.transforms() == {"pos": "log"} and back_out.transforms() == {"y": "log1p"}
    np.testing.assert_array_equal(back_in.transform(X), in_sc.transform(X))
    Yn = out_sc.transform(X[:, 1:2])
    np.testing.assert_array_equal(back_out.inverse_transform(Yn), out_sc.inverse_transform(Yn))


def test_affine_only_file_keeps_format_1_and_no_transform_key():
    X = physics_table()
    doc = scalers_to_dict(nx.MinMaxScaler().fit(X), nx.MinMaxScaler().fit(X[:, :1]), "float32")
    assert doc["format"] == "normexport.scalers/1"
    assert "transform" not in doc["inputs"] and "transform" not in doc["outputs"]


# A scalers.json as version 0.1 wrote it (before transforms, and before StandardScaler
# recorded data_min/data_max): it must load unchanged.
OLD_FILE = """{
  "format": "normexport.scalers/1",
  "dtype": "float32",
  "inputs": {"kind": "minmax", "columns": ["a", "b"], "feature_range": [0.0, 1.0],
             "data_min": [0.0, 10.0], "data_max": [2.0, 30.0],
             "scale": [0.5, 0.05], "shift": [0.0, -0.5],
             "inverse_scale": [2.0, 20.0], "inverse_shift": [0.0, 10.0]},
  "outputs": {"kind": "standard", "columns": ["y"], "mean": [4.0], "std": [2.0],
              "scale": [0.5], "shift": [-2.0], "inverse_scale": [2.0], "inverse_shift": [4.0]}
}"""


def test_old_scalers_file_loads_unchanged():
    in_sc, out_sc, dtype = scalers_from_dict(json.loads(OLD_FILE))
    assert dtype == "float32"
    assert in_sc.transforms() == {} and out_sc.transforms() == {}
    np.testing.assert_array_equal(in_sc.transform(np.array([[1.0, 20.0]])), [[0.5, 0.5]])
    np.testing.assert_array_equal(out_sc.inverse_transform(np.array([[1.0]])), [[6.0]])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["inputs"].__setitem__("transform", {"a": "cube"}), "unknown transform 'cube'"),
        (lambda d: d["inputs"].__setitem__("transform", {"zz": "log"}), "column 'zz'"),
        (lambda d: d["inputs"].__setitem__("transform", "log"), "must map column names"),
        (lambda d: d.__setitem__("format", "normexport.scalers/3"), "format tag"),
    ],
)
def test_bad_transform_in_file_is_a_format_error(edit, message):
    doc = json.loads(OLD_FILE)
    edit(doc)
    with pytest.raises(FormatError, match=message):
        scalers_from_dict(doc, "scalers.json")

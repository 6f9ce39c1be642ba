"""Scalers: round trips, properties, JSON, refusals."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import normexport as nx
from normexport.errors import DataError, FormatError
from normexport.scaling import (
    AffineScaler,
    factors_to_scalers,
    scalers_from_dict,
    scalers_to_dict,
)

SCALERS = [nx.MinMaxScaler, nx.StandardScaler]
# Round-trip tolerance relative to each column's magnitude: a few ulps of the dtype.
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


@st.composite
def tables(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rows = draw(st.integers(2, 40))
    cols = draw(st.integers(1, 5))
    # Columns live at magnitudes from 1e-6 to 1e6, with spans of a similar order.
    centers = draw(hnp.arrays(np.float64, cols, elements=st.floats(-6, 6)))
    spans = draw(hnp.arrays(np.float64, cols, elements=st.floats(-6, 6)))
    unit = draw(hnp.arrays(np.float64, (rows, cols), elements=st.floats(0, 1)))
    # Keep each column resolvable in its dtype: span >= magnitude * 1e-3 (float32) / 1e-9.
    floor = 3 if dtype is np.float32 else 9
    spans = np.maximum(spans, np.abs(centers) - floor)
    X = np.sign(centers) * 10.0 ** np.abs(centers) + unit * 10.0**spans
    for j in range(cols):  # make every column non-constant
        X[0, j], X[1, j] = X[:, j].min() - 10.0 ** spans[j], X[:, j].max() + 10.0 ** spans[j]
    return X.astype(dtype)


@pytest.mark.parametrize("cls", SCALERS)
@settings(max_examples=60, deadline=None)
@given(X=tables())
def test_transform_then_inverse_returns_input(cls, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float32 rounding can make a column constant
        sc = cls().fit(X)
    Z = sc.transform(X)
    assert Z.dtype == X.dtype
    back = sc.inverse_transform(Z)
    assert back.dtype == X.dtype
    # Errors are relative to each column's magnitude (normalizing subtracts the offset).
    magnitude = np.abs(X.astype(np.float64)).max(axis=0)
    err = np.abs(back.astype(np.float64) - X) / magnitude
    assert err.max() <= 64 * RTOL[X.dtype.type], err.max()


@settings(max_examples=40, deadline=None)
@given(X=tables())
def test_minmax_maps_range_to_feature_range(X):
    X = X.astype(np.float64)
    Z = nx.MinMaxScaler(feature_range=(-1, 2)).fit(X).transform(X)
    np.testing.assert_allclose(Z.min(axis=0), -1, atol=1e-9)
    np.testing.assert_allclose(Z.max(axis=0), 2, atol=1e-9)


def test_standard_scaler_gives_zero_mean_unit_std():
    rng = np.random.default_rng(0)
    X = rng.normal(5, 3, size=(500, 3))
    Z = nx.StandardScaler().fit(X).transform(X)
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Z.std(axis=0), 1, atol=1e-12)


@pytest.mark.parametrize("cls", SCALERS)
def test_json_round_trip_is_bit_exact(cls):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3)) * [1e-6, 1.0, 1e6] + [3.0, -7.0, 1e5]
    sc = cls().fit(X, columns=["a", "b", "c"])
    back = AffineScaler.from_dict(json.loads(json.dumps(sc.to_dict())))
    assert type(back) is cls
    assert back.columns_ == ["a", "b", "c"]
    for got, want in zip(back.affine() + back.inverse_affine(), sc.affine() + sc.inverse_affine()):
        assert got.tobytes() == want.tobytes()
    assert back.transform(X).tobytes() == sc.transform(X).tobytes()


def test_transform_is_the_affine():
    X = np.array([[1.0, 4.0], [3.0, 8.0]])
    sc = nx.MinMaxScaler().fit(X)
    scale, shift = sc.affine()
    np.testing.assert_array_equal(sc.transform(X), X * scale + shift)
    inv_scale, inv_shift = sc.inverse_affine()
    np.testing.assert_array_equal(inv_scale, 1 / scale)
    np.testing.assert_array_equal(inv_shift, -shift / scale)


def test_scalers_document_round_trip():
    X = np.array([[0.0, 1.0], [2.0, 5.0]])
    Y = np.array([[10.0], [30.0]])
    doc = scalers_to_dict(nx.MinMaxScaler().fit(X), nx.MinMaxScaler().fit(Y), "float32")
    assert doc["format"] == "normexport.scalers/1"
    in_sc, out_sc, dtype = scalers_from_dict(json.loads(json.dumps(doc)))
    assert dtype == "float32"
    np.testing.assert_array_equal(out_sc.inverse_transform(np.array([[0.5]])), [[20.0]])


def test_factors_split_into_normalize_and_denormalize():
    factors = np.array([[0.5, 0.0], [0.1, -1.0], [20.0, 10.0]])
    in_sc, out_sc = factors_to_scalers(factors, 2, 1)
    np.testing.assert_array_equal(in_sc.transform(np.array([[2.0, 20.0]])), [[1.0, 1.0]])
    # output rows are the de-normalization, kept exactly
    assert out_sc.inverse_affine()[0].tolist() == [20.0]
    assert out_sc.inverse_affine()[1].tolist() == [10.0]
    with pytest.raises(DataError, match="3 rows, but the network has 2 inputs and 2 outputs"):
        factors_to_scalers(factors, 2, 2)


# ---------------------------------------------------------------------------- refusals


def test_constant_input_column_gets_scale_one_with_warning():
    X = np.array([[1.0, 5.0], [2.0, 5.0]])
    with pytest.warns(UserWarning, match="constant column.*b"):
        sc = nx.MinMaxScaler().fit(X, columns=["a", "b"])
    assert sc.affine()[0][1] == 1.0
    np.testing.assert_array_equal(sc.inverse_transform(sc.transform(X)), X)


@pytest.mark.parametrize("cls", SCALERS)
def test_constant_target_is_an_error(cls):
    Y = np.array([[1.0, 5.0], [2.0, 5.0]])
    with pytest.raises(DataError, match="target column 'v' is constant"):
        cls().fit(Y, columns=["u", "v"], target=True)


@pytest.mark.parametrize(
    ("X", "message"),
    [
        (np.array([[1.0, np.nan], [2.0, 3.0]]), "row 0, column 'b': value nan is not finite"),
        (np.array([[1.0, 2.0], [np.inf, 3.0]]), "row 1, column 'a': value inf is not finite"),
        (np.zeros((0, 2)), "X has no rows"),
        (np.array([1.0, 2.0]), "expected a 2-D array"),
        (np.array([["a", "b"]]), "expected real numbers"),
    ],
)
def test_fit_refuses_bad_data(X, message):
    with pytest.raises(DataError, match=message):
        nx.MinMaxScaler().fit(X, columns=["a", "b"][: X.shape[-1]] if X.ndim == 2 else None)


def test_unfitted_scaler_refuses():
    with pytest.raises(DataError, match="not fitted yet"):
        nx.StandardScaler().transform(np.ones((2, 2)))


def test_wrong_column_count_names_the_columns():
    sc = nx.MinMaxScaler().fit(np.array([[0.0, 1, 2], [1, 2, 3]]), columns=["t", "s", "f"])
    with pytest.raises(
        DataError, match=r"X has 4 columns, but this MinMaxScaler was fitted on 3 \(t, s, f\)"
    ):
        sc.transform(np.ones((1, 4)))


def test_transform_refuses_nan_naming_the_column():
    sc = nx.MinMaxScaler().fit(np.array([[0.0, 1], [1, 2]]), columns=["t", "s"])
    with pytest.raises(DataError, match="column 's'"):
        sc.transform(np.array([[0.5, np.nan]]))


@pytest.mark.parametrize("bad", [(1, 1), (2, 1), (0, np.inf), "ab"])
def test_bad_feature_range(bad):
    with pytest.raises(DataError, match="feature_range"):
        nx.MinMaxScaler(feature_range=bad)


def _doc():
    X = np.array([[0.0, 1.0], [2.0, 5.0]])
    return scalers_to_dict(nx.MinMaxScaler().fit(X), nx.MinMaxScaler().fit(X), "float64")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other/1"), "format tag is 'other/1'"),
        (lambda d: d.update(dtype="int8"), "'dtype' must be one of"),
        (lambda d: d["inputs"].update(kind="robust"), "unknown scaler kind 'robust'"),
        (lambda d: d["inputs"].update(scale=[1.0]), "'scale' must be a list of 2 numbers"),
        (lambda d: d["inputs"].update(scale=[0.0, 1.0]), "scale 0.0 must be finite and non-zero"),
        (lambda d: d["outputs"].update(shift=["x", 1.0]), "'shift' must be a list of 2 numbers"),
        (lambda d: d["inputs"].update(inverse_scale=[3.0, 3.0]), "not the inverse of 'scale'"),
        (lambda d: d["inputs"].update(columns=[]), "'columns' must be a non-empty list"),
    ],
)
def test_scalers_document_refusals(edit, message):
    doc = _doc()
    edit(doc)
    with pytest.raises((DataError, FormatError), match=message):
        scalers_from_dict(doc, "scalers.json")


@pytest.mark.parametrize("scaler", [nx.MinMaxScaler, nx.StandardScaler])
def test_a_range_that_overflows_float64_is_refused_naming_the_column(scaler):
    X = np.array([[1e308, 0.0], [-1e308, 1.0]])
    with pytest.raises(nx.DataError, match="column 'a': its range inf overflows float64"):
        scaler().fit(X, columns=["a", "b"])

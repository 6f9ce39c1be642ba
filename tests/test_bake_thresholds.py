"""A split threshold is a decision: a row at a split takes the same branch after folding as
the original on the normalized row, for every split, mode, sign of scale and dtype."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_models import run, tree_ensemble, tree_regressor

from normexport import onnx_affine
from normexport.affine import apply, fold_splits

DTYPES = ["float32", "float64"]
COMPARE = {
    "LEQ": np.less_equal,
    "LT": np.less,
    "GTE": np.greater_equal,
    "GT": np.greater,
}


def wild_affine(n: int, seed: int):
    """Scales over six decades of both signs and shifts of a few units: rounding in
    x*s + t moves boundaries by several floats."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-3, 3, n)
    return scale, rng.uniform(-5, 5, n)


def boundary_rows(model, in_affine, dtype, seed=0):
    """For every split: a row with its feature exactly at the raw boundary float, one ulp
    below and one above, and the same around the naive (θ - t)/s; other columns random."""
    splits = onnx_affine.tree_splits(model)
    features = np.array([f for f, _ in splits])
    theta = np.array([t for _, t in splits])
    scale, shift = in_affine
    values = []
    for mode in ("LEQ", "LT"):
        raw, _ = fold_splits(theta, [mode] * len(theta), scale[features], shift[features], dtype)
        values.append(raw.astype(dtype))
    values.append(((theta - shift[features]) / scale[features]).astype(dtype))
    columns = []
    for value in values:
        columns += [np.nextafter(value, np.array(-np.inf, dtype)), value]
        columns.append(np.nextafter(value, np.array(np.inf, dtype)))
    column = np.concatenate(columns)
    where = np.tile(features, len(columns))
    rng = np.random.default_rng(seed)
    rows = ((rng.uniform(0, 1, (len(column), 3)) - shift) / scale).astype(dtype)
    rows[np.arange(len(column)), where] = column
    return rows


def original_on_normalized(model, X, in_affine, dtype):
    return run(model, apply(X, in_affine[0], in_affine[1], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "build",
    [tree_regressor, lambda dtype: tree_regressor(dtype, as_tensor=True), tree_ensemble],
    ids=["TreeEnsembleRegressor", "as_tensor", "TreeEnsemble"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_at_every_threshold_take_the_same_branch(build, dtype, seed):
    model = build(dtype)
    in_affine = wild_affine(3, seed)
    identity = (np.ones(2), np.zeros(2))  # leaves unchanged: outputs equal bit for bit
    folded, plan = onnx_affine.fold(model, in_affine, identity)
    assert plan.input == "folded"
    X = boundary_rows(model, in_affine, dtype, seed)
    assert len(X) == 9 * len(onnx_affine.tree_splits(model))
    np.testing.assert_array_equal(
        run(folded, X), original_on_normalized(model, X, in_affine, dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_missing_and_infinite_values_take_the_same_branch(dtype):
    model = tree_regressor(dtype)
    in_affine = wild_affine(3, 5)
    folded, _ = onnx_affine.fold(model, in_affine, (np.ones(2), np.zeros(2)))
    rows = []
    for j in range(3):
        for special in (np.nan, np.inf, -np.inf):
            row = np.full(3, 0.5)
            row[j] = special
            rows.append(row)
    X = np.array(rows, dtype)
    np.testing.assert_array_equal(
        run(folded, X), original_on_normalized(model, X, in_affine, dtype)
    )


def test_naive_rounding_of_thresholds_is_not_enough():
    """(θ - t)/s rounded to the nearest float puts some rows on the wrong side: the search
    is what makes the fold exact."""
    theta = np.linspace(0.01, 0.99, 400).astype(np.float32).astype(np.float64)
    scale, shift = wild_affine(400, 7)
    wrong = 0
    for mode in ("LEQ", "LT"):
        naive = ((theta - shift) / scale).astype(np.float32)
        exact, modes = fold_splits(theta, [mode] * 400, scale, shift, "float32")
        for x in (
            naive,
            np.nextafter(naive, np.float32(-np.inf)),
            np.nextafter(naive, np.float32(np.inf)),
        ):
            want = COMPARE[mode](apply(x, scale, shift, "float32"), theta)
            naive_mode = [
                m if s > 0 else {"LEQ": "GTE", "LT": "GT"}[m]
                for m, s in zip([mode] * 400, scale, strict=True)
            ]
            naive_got = np.array(
                [COMPARE[m](xi, ni) for m, xi, ni in zip(naive_mode, x, naive, strict=True)]
            )
            got = np.array([COMPARE[m](xi, ei) for m, xi, ei in zip(modes, x, exact, strict=True)])
            np.testing.assert_array_equal(got, want)
            wrong += int((naive_got != want).sum())
    assert wrong > 0


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    theta=finite,
    magnitude=st.floats(1e-4, 1e4),
    negative=st.booleans(),
    shift=st.floats(-100, 100),
    mode=st.sampled_from(sorted(COMPARE)),
    dtype=st.sampled_from(DTYPES),
)
def test_fold_splits_selects_exactly_the_same_floats(
    theta, magnitude, negative, shift, mode, dtype
):
    scale = -magnitude if negative else magnitude
    (raw,), (new_mode,) = fold_splits([theta], [mode], [scale], [shift], dtype)
    assert new_mode == (
        mode if scale > 0 else {"LEQ": "GTE", "LT": "GT", "GTE": "LEQ", "GT": "LT"}[mode]
    )
    r = np.array(raw, dtype)
    assert float(r) == raw  # exactly a float of the data's dtype
    candidates = [
        r,
        np.nextafter(r, np.array(-np.inf, dtype)),
        np.nextafter(r, np.array(np.inf, dtype)),
    ]
    near = np.array((theta - shift) / scale, dtype)
    candidates += [
        near,
        np.nextafter(near, np.array(-np.inf, dtype)),
        np.nextafter(near, np.array(np.inf, dtype)),
    ]
    candidates += [np.array(v, dtype) for v in (-np.inf, np.inf, 0.0)]
    for x in candidates:
        want = COMPARE[mode](float(apply(x, scale, shift, dtype)), theta)
        assert COMPARE[new_mode](float(x), raw) == want, (x, raw)

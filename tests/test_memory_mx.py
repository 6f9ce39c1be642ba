"""Export's memory floor, MXNet side: checkpoints are filled in place, the MXNet runtime
runs on the loaded arrays, and no caller keeps the weights alive past the ONNX write.

Peak memory itself is measured by ``scripts/bench`` (export section).
"""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import weakref

import mxnet as mx
import numpy as np
from conftest import mxnet_predict, random_net

from normexport import mxparams
from normexport.modeldir import MODEL_PREFIX, NET_PREFIX, params_file, symbol_file
from normexport.mx import checkpoint, exporting, graph
from normexport.mx.runtime import mxnet_runtime


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_checkpoint_filled_in_blocks_equals_mxnets_own_load(tmp_path, monkeypatch, dtype):
    net = random_net("tanh", dtype, hidden=(13, 7))
    checkpoint.save_checkpoint(graph.from_block(net), tmp_path, NET_PREFIX)
    monkeypatch.setattr(mxparams, "CHUNK_BYTES", 2 * 3 * 8)  # a few rows per block
    _, args, aux = checkpoint.load_checkpoint(
        symbol_file(tmp_path, NET_PREFIX), params_file(tmp_path, NET_PREFIX)
    )
    saved = mx.nd.load(str(params_file(tmp_path, NET_PREFIX)))
    assert sorted(f"arg:{k}" for k in args) + sorted(f"aux:{k}" for k in aux) == sorted(saved)
    for key, want in saved.items():
        got = args[key.split(":", 1)[1]]
        assert isinstance(got, mx.nd.NDArray) and got.dtype == want.dtype
        np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mxnet_runtime_agrees_with_symbolblock_imports(tmp_path, dtype):
    """The runtime runs the graph as a CachedOp on the loaded arrays; users load the same
    files with SymbolBlock.imports. Same kernels, so the outputs are identical."""
    net = random_net("sigmoid", dtype, hidden=(16, 8))
    checkpoint.save_checkpoint(graph.from_block(net), tmp_path, MODEL_PREFIX)
    X = np.random.default_rng(0).uniform(-2, 2, (64, 3)).astype(dtype)
    got = mxnet_runtime(tmp_path, dtype)(X)
    np.testing.assert_array_equal(got, mxnet_predict(tmp_path, MODEL_PREFIX, X, dtype))


class _Params(dict):
    """A params dict that a weak reference can watch."""


@pytest.mark.parametrize("side", ["scalers", "factors"])
def test_export_files_frees_the_checkpoint_before_the_checker(tmp_path, scalers, monkeypatch, side):
    """export --symbol/--params: once model.onnx is written, nothing holds the loaded
    weights while onnx.checker and verification load the model again."""
    in_sc, out_sc = scalers
    net = random_net("sigmoid", "float32")
    checkpoint.save_checkpoint(graph.from_block(net), tmp_path, NET_PREFIX)
    nx_scalers = tmp_path / "scalers.json"
    from normexport import files
    from normexport.scaling import scalers_to_dict

    files.write_json(nx_scalers, scalers_to_dict(in_sc, out_sc, "float32"))
    factors = tmp_path / "factors.txt"
    sides = (in_sc.affine(), out_sc.inverse_affine())
    np.savetxt(factors, np.vstack([np.column_stack(s) for s in sides]))

    watched: list[weakref.ref] = []
    load = checkpoint.load_checkpoint

    def watched_load(*args, **kwargs):
        symbol, arg_params, aux_params = load(*args, **kwargs)
        arg_params = _Params(arg_params)
        watched.append(weakref.ref(arg_params))
        return graph.Checkpoint(symbol, arg_params, aux_params)

    alive_at_check = []
    check = exporting.check

    def watched_check(path, **kwargs):
        alive_at_check.append(watched[0]() is not None)
        return check(path, **kwargs)

    monkeypatch.setattr(checkpoint, "load_checkpoint", watched_load)
    monkeypatch.setattr(exporting, "check", watched_check)
    side_file = {"scalers": nx_scalers, "factors": factors}[side]
    exporting.export_files(
        symbol_file(tmp_path, NET_PREFIX),
        params_file(tmp_path, NET_PREFIX),
        tmp_path / "out",
        **{side: side_file},
    )
    assert len(watched) == 1 and alive_at_check == [False]
    assert (tmp_path / "out" / "model.onnx").is_file()

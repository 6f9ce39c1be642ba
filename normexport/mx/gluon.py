"""The Gluon ``Normalized`` block: a network with its fixed normalization, trained in
normalized space and exported raw in, raw out.

``Normalized(inner, in_scaler, out_scaler)`` wraps any single-input Gluon
``HybridBlock``:

- ``block(x_raw)`` returns raw outputs: ``de-normalize(inner(normalize(x_raw)))``;
- ``block.loss(x_raw, y_raw)`` is the loss of ``inner(normalize(x_raw))`` against
  ``normalize(y_raw)``, so every target carries equal weight, whatever its range (the
  raw-unit loss of ``NormDense``/``DenormDense`` layers weights each target by the
  square of its range: ``docs/why-custom-layers-stall.md``);
- the four constants are Gluon ``Constant`` parameters (``grad_req='null'``): no
  gradient reaches them and a ``Trainer`` never changes them;
- scalers with non-linear transforms (``MinMaxScaler(transform={"y": "log"})``) work
  as they are: the forward pass, the targets of the loss and the export apply them;
- ``block.export(prefix)`` writes an ordinary MXNet checkpoint, raw in and raw out,
  made by :func:`normexport.mx.graph.splice` (or ``fold``) on the inner network, the
  same step ``nx.export`` runs, so the nodes are the ones every normexport model has
  (``normexport_in_scale`` ..., ``normexport_in_mul`` ...).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from normexport.errors import DataError, GraphError
from normexport.mx import graph
from normexport.mx.checkpoint import save_checkpoint
from normexport.scaling import DTYPES, AffineScaler
from normexport.transforms import side_ops

MODES = ("splice", "fold")


class Normalized(gluon.HybridBlock):
    """``inner`` between a fixed input normalization and a fixed output de-normalization.

    ``in_scaler`` and ``out_scaler`` are fitted normexport scalers
    (:class:`~normexport.MinMaxScaler`, :class:`~normexport.StandardScaler`,
    :class:`~normexport.AffineScaler`); the constants are stored in ``dtype`` (default:
    the dtype of ``inner``'s parameters, float32 when it has none yet). ``inner`` may be
    initialized before or after wrapping; :meth:`initialize` initializes only ``inner``
    (the constants are set here, once).
    """

    def __init__(
        self,
        inner: gluon.HybridBlock,
        in_scaler: AffineScaler,
        out_scaler: AffineScaler,
        *,
        dtype: str | None = None,
        prefix: str | None = None,
    ) -> None:
        if not isinstance(inner, gluon.HybridBlock):
            raise DataError(
                f"inner must be a Gluon HybridBlock, got {type(inner).__name__}; "
                "a plain Block cannot be exported as a graph"
            )
        for name, scaler in (("in_scaler", in_scaler), ("out_scaler", out_scaler)):
            if not isinstance(scaler, AffineScaler):
                raise DataError(f"{name} must be a normexport scaler, got {type(scaler).__name__}")
            if not scaler.is_fitted:
                raise DataError(f"{name} ({type(scaler).__name__}) is not fitted; call fit first")
        out_scaler.check_target()
        dtype = _dtype_of(inner) if dtype is None else np.dtype(dtype).name
        if dtype not in DTYPES:
            raise DataError(f"dtype must be float32 or float64, got {dtype}")
        super().__init__(prefix=prefix)
        self._in_scaler, self._out_scaler, self._dtype = in_scaler, out_scaler, dtype
        with self.name_scope():
            self.inner = inner
            with warnings.catch_warnings():
                # MXNet registers one initializer per Constant and says so each time.
                warnings.filterwarnings("ignore", message=".*overriding existing initializer")
                self.in_scale = self._constant("in_scale", in_scaler.affine()[0])
                self.in_shift = self._constant("in_shift", in_scaler.affine()[1])
                self.out_scale = self._constant("out_scale", out_scaler.inverse_affine()[0])
                self.out_shift = self._constant("out_shift", out_scaler.inverse_affine()[1])
        for constant in self._constants():
            constant.initialize()
        # The targets' forward map, for the loss only: data, not part of the graph.
        self._target = tuple(_row(v, dtype) for v in out_scaler.affine())

    def _constant(self, name: str, values: np.ndarray) -> gluon.Constant:
        return self.params.get_constant(name, _row(values, self._dtype))

    # ------------------------------------------------------------------ properties

    @property
    def in_scaler(self) -> AffineScaler:
        return self._in_scaler

    @property
    def out_scaler(self) -> AffineScaler:
        return self._out_scaler

    @property
    def dtype(self) -> str:
        return self._dtype

    # ------------------------------------------------------------------ computing

    def hybrid_forward(
        self, F: Any, x: Any, in_scale: Any, in_shift: Any, out_scale: Any, out_shift: Any
    ) -> Any:
        """Raw inputs in, raw outputs out."""
        y = self.inner(_affine(F, self._transform(F, x, "in"), in_scale, in_shift))
        return self._transform(F, _affine(F, y, out_scale, out_shift), "out")

    def _transform(self, F: Any, x: Any, side: str) -> Any:
        """The scalers' non-linear transforms (if any) on one side, as in the export."""
        if side == "in":
            return graph.apply_transforms(F, x, side, self._in_scaler.transforms_)
        return graph.apply_transforms(F, x, side, side_ops(self._out_scaler.transforms_, side))

    def forward(self, x: Any, *args: Any) -> Any:
        if isinstance(x, mx.nd.NDArray):
            self._check_width(x, self._in_scaler, "x_raw")
        return super().forward(x, *args)

    def normalized(self, x_raw: mx.nd.NDArray) -> mx.nd.NDArray:
        """``inner(normalize(x_raw))``: the inner network's output, in normalized units."""
        self._check_width(x_raw, self._in_scaler, "x_raw")
        ctx = x_raw.context
        scale, shift = self.in_scale.data(ctx), self.in_shift.data(ctx)
        return self.inner(_affine(mx.nd, self._transform(mx.nd, x_raw, "in"), scale, shift))

    def normalize_targets(self, y_raw: mx.nd.NDArray) -> mx.nd.NDArray:
        """``out_scaler.transform(y_raw)`` in MXNet, in the block's dtype."""
        self._check_width(y_raw, self._out_scaler, "y_raw")
        ctx = y_raw.context
        scale, shift = (v.as_in_context(ctx) for v in self._target)
        targets = graph.apply_transforms(mx.nd, y_raw, "in", self._out_scaler.transforms_)
        return _affine(mx.nd, targets, scale, shift)

    def loss(self, x_raw: mx.nd.NDArray, y_raw: mx.nd.NDArray, loss: Any = None) -> mx.nd.NDArray:
        """Per-row loss of the inner network in normalized space (default ``L2Loss``).

        ``loss(inner(normalize(x_raw)), normalize(y_raw))``: the loss a plain network
        trained on ``in_scaler.transform(X)`` and ``out_scaler.transform(Y)`` sees, so no
        target is weighted by its range. Call it inside ``autograd.record()``.
        """
        loss = gluon.loss.L2Loss() if loss is None else loss
        return loss(self.normalized(x_raw), self.normalize_targets(y_raw))

    def _check_width(self, x: mx.nd.NDArray, scaler: AffineScaler, name: str) -> None:
        if len(x.shape) != 2 or x.shape[1] != scaler.n_features_in_:
            raise DataError(
                f"{name} has shape {x.shape}; expected (rows, {scaler.n_features_in_}) "
                f"for the columns {', '.join(scaler.columns_)}"
            )

    # ------------------------------------------------------------------ Gluon plumbing

    def initialize(
        self,
        init: Any = None,
        ctx: Any = None,
        verbose: bool = False,
        force_reinit: bool = False,
    ) -> None:
        """Initialize ``inner`` (the constants already hold their values)."""
        init = mx.init.Uniform() if init is None else init
        self.inner.initialize(init, ctx, verbose, force_reinit)
        if ctx is not None:
            for constant in self._constants():
                constant.reset_ctx(ctx)

    def trainable_params(self) -> gluon.ParameterDict:
        """The parameters a ``Trainer`` should get: ``inner``'s, never the constants.

        (``Trainer(block.collect_params(), ...)`` is also safe: it skips parameters
        whose ``grad_req`` is ``'null'``.)
        """
        return self.inner.collect_params()

    def cast(self, dtype: Any) -> None:
        super().cast(dtype)
        self._dtype = np.dtype(dtype).name
        self._target = tuple(v.astype(self._dtype) for v in self._target)

    def _constants(self) -> tuple[gluon.Constant, ...]:
        return (self.in_scale, self.in_shift, self.out_scale, self.out_shift)

    # ------------------------------------------------------------------ export

    def checkpoint(self) -> graph.Checkpoint:
        """``(symbol, arg_params, aux_params)`` of the inner network (normalized space):
        what ``nx.export(block.checkpoint(), block.in_scaler, block.out_scaler, dir)``
        takes. The inner network must have run forward once."""
        return graph.from_block(self.inner)

    def raw_checkpoint(self, mode: str = "splice") -> graph.Checkpoint:
        """The raw-in/raw-out checkpoint that :meth:`export` writes.

        The inner network in its inference form (:func:`normexport.mx.graph.for_inference`)
        with the scalers spliced around it, or folded into its first and last layers
        (``mode="fold"``; a side that cannot be folded is spliced, with a warning saying
        why), exactly as ``nx.export`` builds ``model-*``.
        """
        if mode not in MODES:
            raise DataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        inner = self.checkpoint()
        info = graph.describe(inner, self._in_scaler.n_features_in_)
        if info.dtype != self._dtype:
            raise GraphError(
                f"the inner network is {info.dtype} but the block's constants are "
                f"{self._dtype}; build Normalized(..., dtype={info.dtype!r}) or cast both"
            )
        if info.n_outputs != self._out_scaler.n_features_in_:
            raise GraphError(
                f"the inner network has {info.n_outputs} outputs, but the output scaler "
                f"has {self._out_scaler.n_features_in_} columns"
            )
        inference = graph.for_inference(inner, info.n_inputs)
        in_affine, out_affine = self._in_scaler.affine(), self._out_scaler.inverse_affine()
        transforms = (self._in_scaler.transforms_, side_ops(self._out_scaler.transforms_, "out"))
        if mode == "splice":
            return graph.splice_transforms(
                graph.splice(inference, in_affine, out_affine), *transforms
            )
        model, plan = graph.fold(inference, in_affine, out_affine)
        model = graph.splice_transforms(model, *transforms)
        for side, how, reason in (
            ("input", plan.input, plan.input_reason),
            ("output", plan.output, plan.output_reason),
        ):
            if how == "spliced":
                warnings.warn(
                    f"fold: the {side} affine was spliced, not folded: {reason}",
                    UserWarning,
                    stacklevel=3,
                )
        return model

    def export(
        self,
        path: str | os.PathLike[str],
        epoch: int = 0,
        remove_amp_cast: bool = True,
        *,
        mode: str = "splice",
    ) -> tuple[str, str]:
        """Write ``path-symbol.json`` and ``path-0000.params``: raw in, raw out.

        An ordinary MXNet checkpoint (input ``data``), loadable with
        ``gluon.SymbolBlock.imports(f"{path}-symbol.json", ["data"],
        f"{path}-0000.params")`` or ``mx.mod.Module``; see :meth:`raw_checkpoint`.
        Returns the two file names.
        """
        if epoch != 0:
            raise DataError(f"normexport writes epoch 0 checkpoints only, got epoch={epoch}")
        path = Path(path)
        save_checkpoint(self.raw_checkpoint(mode), path.parent, path.name)
        return f"{path}-symbol.json", f"{path}-0000.params"


def _affine(F: Any, x: Any, scale: Any, shift: Any) -> Any:
    """``x * scale + shift`` per column, the arithmetic of the spliced graph."""
    return F.broadcast_add(F.broadcast_mul(x, scale), shift)


def _row(values: np.ndarray, dtype: str) -> mx.nd.NDArray:
    return mx.nd.array(np.asarray(values, dtype=np.float64).reshape(1, -1), dtype=dtype)


def _dtype_of(inner: gluon.HybridBlock) -> str:
    dtypes = {np.dtype(p.dtype).name for p in inner.collect_params().values()}
    if len(dtypes) > 1:
        raise DataError(
            f"the inner network mixes parameter dtypes ({', '.join(sorted(dtypes))}); "
            "cast it to one"
        )
    return dtypes.pop() if dtypes else "float32"

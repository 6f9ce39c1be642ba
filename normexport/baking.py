"""Bake normalization into any ONNX regression model: ``normexport bake``.

A model exported by any framework (PyTorch, Keras via tf2onnx, scikit-learn via
skl2onnx, MXNet, ...) that was trained on normalized data becomes a raw-in/raw-out file:
the input affine goes in front, the output affine after, spliced or folded into the first
and last dense layer (:mod:`normexport.onnx_affine`). Then the result is checked with
``onnx.checker`` (full check) and verified in onnxruntime against the original file run
on NumPy-normalized rows, de-normalized with NumPy.

Everything the user gives is validated here, before anything is written, with messages
that name the file and the fault. The output (and its external data file, if any) is
built in a temporary directory beside the target, checked and verified there, then
renamed into place (or copied into a FIFO or device, which is never replaced): an error
or a failed verification leaves nothing behind. One bake at a time writes a target
(:func:`normexport.files.target_lock`), and the next one clears what a killed one left.
Every run of a model (onnxruntime, silent but for its exceptions) shares one wall-clock
limit, so a model that never finishes ends in one line naming the node that was running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from normexport import files, onnx_affine, onnx_transforms, onnxkit, passes, tables, transforms
from normexport.affine import SPLICED, FoldPlan, check_factors, fold_splits, load_factors
from normexport.errors import (
    DataError,
    FormatError,
    GraphError,
    NormexportError,
    VerificationError,
    first_line,
)
from normexport.runtimes import session_options
from normexport.scaling import (
    AffineScaler,
    factors_to_scalers,
    scalers_from_dict,
    scalers_to_dict,
    unnamed_hint,
)
from normexport.verification import (
    RANDOM_ROWS,
    Runtime,
    VerificationReport,
    check_rows,
    random_rows,
)

MODES = ("splice", "fold")
MIN_OPSET = onnx_affine.MIN_BN_OPSET
EXTERNAL_MIN_BYTES = 1024  # with external data, smaller tensors stay inline (as onnx does)
DEFAULT_TIMEOUT = 300.0  # seconds: all of bake's runs of a model together (probe, verification)
MAX_FIXED_BATCH = 4096  # rows: a model with a larger fixed batch is not run


@dataclass
class BakeResult:
    """What :func:`bake` did."""

    path: Path
    plan: dict[str, str]
    report: VerificationReport | None
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    hint: str | None = None  # how to name placeholder columns (see scaling.unnamed_hint)


def bake(
    onnx_in: str | os.PathLike[str],
    onnx_out: str | os.PathLike[str],
    *,
    factors: str | os.PathLike[str] | np.ndarray | None = None,
    scalers: str | os.PathLike[str] | dict[str, Any] | None = None,
    mode: str = "splice",
    opset: int | None = None,
    rename: bool = False,
    verify: bool = True,
    data: str | os.PathLike[str] | None = None,
    rtol: float | None = None,
    repair: bool = False,
    timeout: float | None = None,
    inputs: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    strict: bool = False,
) -> BakeResult:
    """Write ``onnx_out``: ``onnx_in`` with input normalization and output
    de-normalization baked in (raw in, raw out).

    Parameters
    ----------
    onnx_in
        Any ONNX model with one 2-D float32/float64 input ``[batch, n_in]`` and one output
        of ``n_out`` values per row, trained on normalized data.
    onnx_out
        The file to write (plus ``<name>.data`` beside it when the input used external
        data or the weights exceed 64 MiB).
    factors, scalers
        Exactly one: a side file (text or ``.npy``) or array of ``(scale, shift)`` rows
        (``n_in`` normalizing the inputs, then ``n_out`` de-normalizing the outputs), or
        a ``scalers.json`` path or document.
    mode
        ``"splice"`` adds one affine node per side; ``"fold"`` folds into the first and
        last dense layer where the pattern allows and splices the other side(s), saying
        why in ``result.plan`` and with a warning.
    opset
        Convert to this opset first (default: keep the model's, lifted to the opset the
        spliced affine needs if it is older, or added if the file imports none).
    rename
        Name the input ``input`` and the output ``output`` (default: keep the model's).
    verify
        Compare the baked file with the original in onnxruntime (default); raise
        :class:`~normexport.errors.VerificationError` and write nothing on a mismatch.
    data
        A CSV whose rows are used for verification (the input columns by name, or all of
        its columns if it has exactly ``n_in``); default: random rows over the input range
        the factors imply, plus edge rows.
    rtol
        Tolerance on the error relative to each output's span (default: 1e-5 for float32,
        1e-12 for float64).
    repair
        Repair an output ``Reshape(-1, 1)`` that interleaves the outputs of each row into
        rows of one (skl2onnx's multi-output MLPRegressor) to ``Reshape(-1, n_out)``;
        without it such a file is refused, naming the node.
    timeout
        Seconds that bake may spend running models, all runs together (the probe of the
        output width and the verification; default :data:`DEFAULT_TIMEOUT`, 300;
        ``math.inf`` for no limit). A model still running then is stopped and refused,
        naming the node that was running.
    inputs, targets
        With ``factors``: the column names, in the file's row order (default ``x0, ...``
        and ``y0, ...``); they go into the metadata and name the columns of ``data``.
    strict
        Refuse (and write nothing) when verification raises a sanity warning: outputs
        constant over the verification rows, or ``data`` rows that normalize far outside
        the usual range, both signs of wrong factors. Without it each warning is issued
        as a ``UserWarning`` and the model is written.

    ``onnx_out`` may be a FIFO or a device (written to as a stream, never replaced) or a
    symbolic link (the file it names is replaced; the link stays). While a bake writes a
    target, another bake into it fails at once: ``another bake into OUT is running (pid
    N)``.

    Everything changed besides the affine itself (a declared output shape, a repaired
    Reshape, an opset, a MatMul turned Gemm) is listed in ``result.changes`` and in the
    ``normexport.changes`` metadata.

    Examples
    --------
    >>> import normexport as nx  # doctest: +SKIP
    >>> result = nx.bake("model.onnx", "baked.onnx", factors="factors.txt", mode="fold")
    ... # doctest: +SKIP
    >>> result.plan  # doctest: +SKIP
    {'input': 'folded', 'output': 'spliced', 'output_reason': 'an activation ...'}
    """
    src, dst = Path(onnx_in), Path(onnx_out)
    _check_options(factors, scalers, mode, opset, rtol, timeout)
    if strict and not verify:
        raise DataError("strict needs verification: its checks run on the verification rows")
    if dst.is_dir():
        raise NormexportError(f"{dst}: is a directory; --out needs a file name")
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise NormexportError(f"{dst}: is the input model; write the baked model elsewhere")
    target = files.resolve_target(dst)
    # NumPy's warnings would print lines before bake's one-line error: every non-finite
    # value that matters is checked or reported instead.
    with np.errstate(all="ignore"):
        return _bake(
            src,
            dst,
            target,
            _Runner(DEFAULT_TIMEOUT if timeout is None else timeout),
            factors,
            scalers,
            mode,
            opset,
            rename,
            verify,
            data,
            rtol,
            repair,
            (inputs, targets),
            strict,
        )


def _bake(
    src: Path,
    dst: Path,
    target: files.Target,
    runner: _Runner,
    factors: Any,
    scalers: Any,
    mode: str,
    opset: int | None,
    rename: bool,
    verify: bool,
    data: str | os.PathLike[str] | None,
    rtol: float | None,
    repair: bool,
    names: tuple[Sequence[str] | None, Sequence[str] | None],
    strict: bool,
) -> BakeResult:
    model = load_model(src)
    if _reads_itself(src, model):
        runner.views[src] = model
    shape = describe(src, model)
    source = _load_source(factors, scalers)
    model, shape, changes, regroup = resolve_output(
        src, model, shape, source.n_out(shape), repair, runner=runner
    )
    if verify:
        check_fixed_batch(src, shape, "verify it", hint=", or bake with --no-verify")
    in_scaler, out_scaler = _scalers(src, shape, source, *names)
    rows = _data_rows(data, in_scaler) if verify and data is not None else None
    external = _uses_external_data(model) or _weight_bytes(model) > onnxkit.EXTERNAL_DATA_THRESHOLD
    if external and target.stream:
        raise NormexportError(
            f"{dst}: is {target.kind}, which bake writes as a stream, but the baked model "
            "keeps its weights in an external data file beside it; give a file name"
        )
    if external and dst.is_symlink() and Path(os.path.realpath(dst.parent)) != target.path.parent:
        raise NormexportError(
            f"{dst}: is a symbolic link to {target.path}, in another directory; the baked "
            "model keeps its weights in an external data file beside that file, which a "
            "model opened through the link would not find; give the real path"
        )

    baked, plan = _transform(src, model, shape, in_scaler, out_scaler, mode, opset, rename, changes)
    notes = plan.messages() if mode == "fold" else []
    for side in ("input", "output"):
        if mode == "fold" and getattr(plan, side) == "spliced":
            warnings.warn(
                f"{src}: {side} affine spliced, not folded: {getattr(plan, side + '_reason')}",
                UserWarning,
                stacklevel=3,
            )

    with files.target_lock(dst, what="bake"):
        files.remove_stale(target)  # what a killed bake into this target left behind
        staging = files.staging_dir(target)
        try:
            staged = _save(baked, staging / target.path.name, src.parent, external)
            report = None
            with _naming(src, staging):
                onnxkit.check(staged[0], label=f"{src}: the baked model")
                if verify:
                    splits = _split_rows(model, in_scaler, shape.in_dtype)
                    report = verify_bake(
                        src,
                        staged[0],
                        in_scaler,
                        out_scaler,
                        shape,
                        rows=rows,
                        rtol=rtol,
                        extra=splits,
                        regroup=regroup,
                        runner=runner,
                    )
            if report is not None and not report.ok:
                raise VerificationError(
                    f"{src}: the baked model disagrees with the original beyond tolerance; "
                    f"nothing written\n{report.table()}"
                )
            if strict and report is not None and report.warnings:
                raise DataError(f"{src}: --strict: {report.warnings[0]}; nothing written")
            written = []
            for path in reversed(staged):  # the data file first, the model (which names it) last
                where = (
                    target
                    if path.name == target.path.name
                    else files.Target(target.path.parent / path.name)
                )
                written.append(files.publish(path, where))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for line in report.warnings if report is not None else []:
        warnings.warn(f"{src}: {line}", UserWarning, stacklevel=3)
    hint = unnamed_hint(in_scaler.columns_, out_scaler.columns_)
    return BakeResult(dst, plan.to_dict(), report, written[::-1], notes, changes, hint)


@contextlib.contextmanager
def _naming(src: Path, staging: Path) -> Iterator[None]:
    """Errors about the staged copy name the user's file, never the temporary path."""
    try:
        yield
    except NormexportError as exc:
        message = str(exc)
        for path in sorted({str(p) for p in staging.iterdir()} | {str(staging)}, key=len)[::-1]:
            message = message.replace(path, f"{src} (baked)")
        if message == str(exc):
            raise
        raise type(exc)(message) from exc


# ------------------------------------------------------------------------------ options


def _check_options(
    factors: Any,
    scalers: Any,
    mode: str,
    opset: int | None,
    rtol: float | None,
    timeout: float | None = None,
) -> None:
    if (factors is None) == (scalers is None):
        raise DataError("give either factors or scalers (exactly one of them)")
    if mode not in MODES:
        raise DataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    newest = onnxkit.newest_opset()
    if opset is not None and (
        isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest
    ):
        raise DataError(
            f"opset {opset} is not supported: choose {MIN_OPSET} to {newest} "
            f"(onnx {onnx.__version__} knows opsets up to {newest})"
        )
    if rtol is not None and not (np.isfinite(rtol) and rtol > 0):
        raise DataError(f"rtol must be a positive number, got {rtol}")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not timeout > 0  # NaN too; math.inf is no limit
    ):
        raise DataError(f"timeout must be a positive number of seconds, got {timeout}")


# ------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModelShape:
    """The interface of the model to bake."""

    input_name: str
    output_name: str
    n_in: int
    n_out: int
    in_dtype: str
    out_dtype: str
    batch: int | None  # a fixed batch size, or None for a symbolic one
    inner_float32: bool = False  # float64 in and out, but float32 somewhere inside

    @property
    def dtype(self) -> str:
        """The loosest precision the model computes in: it sets the verification tolerance."""
        if self.inner_float32 or "float32" in (self.in_dtype, self.out_dtype):
            return "float32"
        return "float64"


def load_model(path: Path) -> onnx.ModelProto:
    """Load and validate an ONNX file (weights stay where they are: a large file's inline
    weights too, read as external data of the file itself, see
    :func:`normexport.onnxkit.read_inline_view`)."""
    # (not through a symbolic link: its name is not the name of the file it points to)
    large = (
        path.is_file()
        and not path.is_symlink()
        and path.stat().st_size > onnxkit.EXTERNAL_DATA_THRESHOLD
    )
    try:
        model = onnxkit.load_onnx(
            path, with_weights=False, leave_in_file=EXTERNAL_MIN_BYTES if large else None
        )
    except GraphError as exc:
        raise FormatError(str(exc)) from exc
    if model.ir_version > onnx.IR_VERSION:
        raise FormatError(
            f"{path}: IR version {model.ir_version} is newer than onnx {onnx.__version__} "
            f"supports ({onnx.IR_VERSION}); upgrade onnx or export with an older version"
        )
    opset = onnxkit.opset_of(model)
    newest = onnxkit.newest_opset()
    if opset == 0 and (
        not model.opset_import
        or any(n.domain in ("", "ai.onnx") for g in onnx_affine.graphs(model.graph) for n in g.node)
    ):
        raise FormatError(f"{path}: imports no ONNX (default domain) opset")
    if opset > newest:
        raise FormatError(
            f"{path}: opset {opset} is newer than onnx {onnx.__version__} supports (up to "
            f"{newest}); upgrade onnx or export with opset {newest} or older"
        )
    _check_external_data(path, model)
    try:
        if large:
            onnx.checker.check_model(_graph_only(model))
        else:
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise FormatError(
            f"{path}: not a valid ONNX model (truncated or damaged?): {first_line(exc)}"
        ) from exc
    return model


def _reads_itself(path: Path, model: onnx.ModelProto) -> bool:
    """Whether ``model`` was loaded as a view that leaves inline weights in ``path``."""
    return any(
        e.key == "location" and e.value == path.name
        for t in model.graph.initializer
        for e in t.external_data
    )


def _graph_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for the checker without reading its large tensors: each initializer in
    external data becomes a graph input of its type and shape. (The checker would read a
    file with inline weights whole, holding them twice; their placement and sizes are
    checked by :func:`normexport.onnxkit.validate` when the file is loaded.)"""
    checked = onnxkit.copy_model(model)
    graph = checked.graph
    external = [t for t in graph.initializer if uses_external_data(t)]
    kept = [t for t in graph.initializer if not uses_external_data(t)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = {v.name for v in graph.input}
    for tensor in external:
        if tensor.name not in inputs:
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    return checked


def _check_external_data(path: Path, model: onnx.ModelProto) -> None:
    """External data is read only for the main graph's initializers (everything else
    about it, where it is and that it holds what the dims declare, is checked when the
    file is loaded: :func:`normexport.onnxkit.validate`)."""
    for graph in onnx_affine.graphs(model.graph):
        if graph is model.graph:
            continue
        for tensor in graph.initializer:
            if uses_external_data(tensor):
                raise FormatError(
                    f"{path}: tensor {tensor.name!r} in a subgraph uses external data, "
                    "which bake does not support"
                )


def describe(path: Path, model: onnx.ModelProto) -> ModelShape:
    """Validate the interface: one 2-D float input, one output of n values per row."""
    try:
        io_ = onnx_affine.interface(model)
    except GraphError as exc:
        raise GraphError(f"{path}: {exc}") from exc
    if io_.input_name == io_.output_name:
        raise GraphError(f"{path}: the output {io_.output_name!r} is the input itself")
    in_dtype = _float_type(path, "input", io_.input)
    out_dtype = _float_type(path, "output", io_.output)
    dims = onnx_affine.tensor_dims(io_.input)
    if dims is None or len(dims) != 2:
        shown = "no declared shape" if dims is None else f"shape {_show(dims)} ({len(dims)}-D)"
        raise GraphError(f"{path}: input {io_.input_name!r} has {shown}; bake needs [batch, n_in]")
    if not isinstance(dims[1], int) or dims[1] < 1:
        raise GraphError(
            f"{path}: input {io_.input_name!r} has shape {_show(dims)} with no fixed width; "
            "bake needs [batch, n_in] with n_in fixed"
        )
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    shape = ModelShape(
        io_.input_name,
        io_.output_name,
        dims[1],
        0,
        in_dtype,
        out_dtype,
        batch,
        inner_float32=_computes_in_float32(model),
    )
    return _with_output_width(path, model, io_, shape)


def _with_output_width(
    path: Path, model: onnx.ModelProto, io_: onnx_affine.Interface, shape: ModelShape
) -> ModelShape:
    """The declared output width (shape inference filling in what is missing); 0 when it
    stays open, for :func:`resolve_output` to find out."""
    typed = onnx_affine.typed_output(model, io_.output)
    dims = onnx_affine.tensor_dims(typed)
    if dims is not None and len(dims) not in (1, 2):
        raise GraphError(
            f"{path}: output {io_.output_name!r} has shape {_show(dims)}; bake needs "
            "[batch, n_out] (or [batch] for one value per row)"
        )
    n_out = 0
    if dims is not None and len(dims) == 1:
        n_out = 1
    elif dims is not None and isinstance(dims[1], int) and dims[1] > 0:
        n_out = dims[1]
    return dataclasses.replace(shape, n_out=n_out)


PROBE_ROWS = 3


def resolve_output(
    path: Path,
    model: onnx.ModelProto,
    shape: ModelShape,
    wanted: int | None,
    repair: bool = False,
    *,
    runner: _Runner | None = None,
) -> tuple[onnx.ModelProto, ModelShape, list[str], bool]:
    """The output width is the width the model returns.

    The declared width is trusted unless it is open, disagrees with ``wanted`` (the width
    the factors or scalers give), the output comes from a ``Reshape(-1, 1)`` of wider
    data, or the graph has ``ai.onnx.ml`` ops. Then the model runs once on a few rows: a
    wrong declaration is repaired in the baked file; a model that returns ``k`` rows of
    one value per input row (its ``Reshape(-1, 1)`` interleaves the targets) is refused,
    or with ``repair`` given a ``Reshape(-1, k)``. Returns the model, the shape, what was
    changed, and whether the original's outputs must be regrouped to ``k`` per row to
    compare with the baked ones.
    """
    declared = shape.n_out
    suspect = onnx_affine.interleaving_reshape(model)
    # ai.onnx.ml converters are known to declare widths their ops do not return.
    foreign = any(n.domain == onnx_affine.ML for n in model.graph.node)
    if declared and wanted in (None, declared) and suspect is None and not foreign:
        return model, shape, [], False
    check_fixed_batch(path, shape, "find the width it returns")
    rows = shape.batch or PROBE_ROWS
    out = _probe(path, shape, rows, runner or _Runner(DEFAULT_TIMEOUT))
    name = shape.output_name
    dims = onnx_affine.tensor_dims(model.graph.output[0])
    shown = "no declared shape" if dims is None else f"declared shape {_show(dims)}"
    if out.ndim in (1, 2) and out.shape[0] == rows:
        n_out = 1 if out.ndim == 1 else int(out.shape[1])
        changes = []
        if out.ndim == 2 and (dims is None or len(dims) != 2 or dims[1] != n_out):
            model = onnx_affine.declare_output(model, n_out)
            changes.append(
                f"output {name!r}: {shown} -> [batch, {n_out}], the width it returns "
                f"({n_out} values per row)"
            )
        return model, dataclasses.replace(shape, n_out=n_out), changes, False
    per_row = out.shape[0] // rows if out.ndim in (1, 2) else 0
    if per_row > 1 and out.shape[0] == per_row * rows and out.size == out.shape[0]:
        node = suspect[0] if suspect is not None else onnx_affine.output_reshape(model)
        where = f"{onnx_affine.node_label(node)}" if node is not None else "the output"
        cause = (
            f"{path}: {where} returns {per_row} rows of one value per input row (shape "
            f"{list(out.shape)} for {rows} rows): it interleaves the {per_row} outputs of "
            "each row into rows, so the file is wrong as exported (skl2onnx writes this "
            "for a multi-output MLPRegressor)"
        )
        if node is None:
            raise GraphError(f"{cause}; bake finds no constant Reshape to repair")
        if not repair:
            raise GraphError(f"{cause}; bake --repair makes it Reshape(-1, {per_row})")
        model, label = onnx_affine.regroup_output(model, per_row)
        change = (
            f"{label}: Reshape(-1, 1) -> Reshape(-1, {per_row}), so each row's {per_row} "
            f"outputs stay in its row (the original interleaved them into {per_row} rows)"
        )
        return model, dataclasses.replace(shape, n_out=per_row), [change], True
    raise GraphError(
        f"{path}: output {name!r} has shape {list(out.shape)} for {rows} input rows; bake "
        "needs one row of outputs per input row"
    )


def _probe(path: Path, shape: ModelShape, rows: int, runner: _Runner) -> np.ndarray:
    """The original's output for ``rows`` rows of zeros (normalized 0: inside any range)."""
    run = runner.runtime(path, str(path))
    return np.asarray(run(np.zeros((rows, shape.n_in), dtype=shape.in_dtype)))


def check_fixed_batch(path: Path, shape: ModelShape, why: str, hint: str = "") -> None:
    """A model with a fixed batch is run in batches of exactly that size; one beyond
    :data:`MAX_FIXED_BATCH` rows is refused before anything is allocated (2^27 rows of
    a few columns are gigabytes, and not what anyone exported on purpose)."""
    if shape.batch is not None and shape.batch > MAX_FIXED_BATCH:
        raise GraphError(
            f"{path}: input {shape.input_name!r} has a fixed batch of {shape.batch} rows; "
            f"bake runs such a model in batches of exactly that size to {why}, and only up "
            f"to {MAX_FIXED_BATCH} rows (export it with a dynamic batch axis{hint})"
        )


def _computes_in_float32(model: onnx.ModelProto) -> bool:
    """Whether some value inside is float32: an ai.onnx.ml regressor or Scaler (they write
    FLOAT whatever they read), a Cast to FLOAT or a FLOAT constant."""
    for graph in onnx_affine.graphs(model.graph):
        if any(t.data_type == TensorProto.FLOAT for t in graph.initializer):
            return True
        for node in graph.node:
            if node.domain == onnx_affine.ML and node.op_type in onnx_affine.FLOAT_ML_OPS:
                return True
            if node.op_type == "Cast" and any(
                a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute
            ):
                return True
    return False


def _float_type(path: Path, side: str, value: onnx.ValueInfoProto) -> str:
    if not value.type.HasField("tensor_type"):
        raise GraphError(f"{path}: {side} {value.name!r} is not a tensor")
    elem = value.type.tensor_type.elem_type
    if elem in onnx_affine.FLOAT_TYPES:
        return onnx_affine.FLOAT_TYPES[elem]
    kind = TensorProto.DataType.Name(elem) if elem else "of unknown type"
    if elem in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        raise GraphError(f"{path}: {side} {value.name!r} is {kind}; bake supports FLOAT and DOUBLE")
    raise GraphError(
        f"{path}: {side} {value.name!r} is {kind}, not floating point; bake needs FLOAT or DOUBLE"
    )


def _show(dims: list[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


# ------------------------------------------------------------------------------ scalers


@dataclass
class _Source:
    """The factors or scalers the user gave, read and checked once."""

    label: str
    factors: np.ndarray | None = None
    scalers: tuple[AffineScaler, AffineScaler] | None = None

    def n_out(self, shape: ModelShape) -> int | None:
        """The output width these factors or scalers are for (None if they cannot say)."""
        if self.scalers is not None:
            return int(self.scalers[1].n_features_in_)
        assert self.factors is not None
        extra = self.factors.shape[0] - shape.n_in
        return extra if extra > 0 else None


def _load_source(factors: Any, scalers: Any) -> _Source:
    if factors is not None:
        if isinstance(factors, (str, os.PathLike)):
            return _Source(str(factors), factors=load_factors(factors))
        return _Source("factors", factors=_factor_array(factors))
    if isinstance(scalers, dict):
        source, doc = "scalers", scalers
    else:
        source, doc = str(scalers), files.read_json(scalers)
    in_scaler, out_scaler, _ = scalers_from_dict(doc, source)
    return _Source(source, scalers=(in_scaler, out_scaler))


def _scalers(
    src: Path,
    shape: ModelShape,
    source: _Source,
    inputs: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
) -> tuple[AffineScaler, AffineScaler]:
    if source.factors is not None:
        return factors_to_scalers(
            source.factors, shape.n_in, shape.n_out, source.label, inputs=inputs, targets=targets
        )
    if inputs is not None or targets is not None:
        raise DataError("--inputs and --targets name the columns of --factors; --scalers has them")
    assert source.scalers is not None
    in_scaler, out_scaler = source.scalers
    for side, scaler, width, name in (
        ("input", in_scaler, shape.n_in, shape.input_name),
        ("output", out_scaler, shape.n_out, shape.output_name),
    ):
        if scaler.n_features_in_ != width:
            raise DataError(
                f"{source.label}: {scaler.n_features_in_} {side} columns "
                f"({', '.join(scaler.columns_)}), but {src}'s {side} {name!r} has {width}"
            )
    return in_scaler, out_scaler


def _factor_array(factors: Any) -> np.ndarray:
    try:
        array = np.asarray(factors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"factors: not an array of numbers ({exc})") from exc
    return check_factors(array, "factors")


def _data_rows(data: str | os.PathLike[str], in_scaler: AffineScaler) -> np.ndarray:
    """The input columns of a CSV: by name, or all columns when there are exactly n_in."""
    header = tables.read_header(data)
    columns = in_scaler.columns_
    if not all(c in header for c in columns):
        if len(header) != len(columns):
            raise DataError(
                f"{data}: needs the input columns {', '.join(columns)} (or exactly "
                f"{len(columns)} columns); it has {', '.join(header)}"
            )
        columns = header
    return tables.load_columns(data, columns)


# ------------------------------------------------------------------------------ transform


def _transform(
    src: Path,
    model: onnx.ModelProto,
    shape: ModelShape,
    in_scaler: AffineScaler,
    out_scaler: AffineScaler,
    mode: str,
    opset: int | None,
    rename: bool,
    changes: list[str],
) -> tuple[onnx.ModelProto, FoldPlan]:
    """Opset first (so the new nodes are written for the final opset), then splice or
    fold, then :func:`normexport.passes.post_process`, the ordered list that export
    runs too (names, redundant ops, metadata describing the result). Anything changed
    besides the affine is appended to ``changes``."""
    try:
        if opset is not None:
            model = set_opset(model, opset, changes)
        in_affine, out_affine = in_scaler.affine(), out_scaler.inverse_affine()
        base_dir = str(src.parent)

        def load(tensor: TensorProto) -> np.ndarray:
            return numpy_helper.to_array(tensor, base_dir=base_dir)

        spliced = mode == "splice"
        if not spliced:
            plan = onnx_affine.plan_fold(model, in_affine, out_affine, load=load)
            spliced = "spliced" in (plan.input, plan.output)
        if spliced:  # new nodes: they need a default-domain opset that has them
            model = opset_for_affine(model, changes)
        if mode == "fold":
            model, plan = onnx_affine.fold(model, in_affine, out_affine, load=load, changes=changes)
            plan = plan.keeping(in_scaler.transforms(), out_scaler.transforms())
        else:
            model, plan = onnx_affine.splice(model, in_affine, out_affine), SPLICED
        model = onnx_transforms.splice_transforms(
            model, in_scaler.transforms_, transforms.side_ops(out_scaler.transforms_, "out")
        )
        if rename:
            _check_rename(model, shape)
        doc = scalers_to_dict(in_scaler, out_scaler, shape.in_dtype)
        entries = onnxkit.metadata_entries(mode, doc, plan.to_dict())
        if changes:
            entries["normexport.changes"] = json.dumps(changes)
        model = passes.post_process(
            model,
            metadata=entries,
            rename=rename,
            batch=None if shape.batch else passes.BATCH,
            own_graph=False,
        )
    except GraphError as exc:
        raise GraphError(f"{src}: {exc}") from exc
    return model, plan


# ------------------------------------------------------------------------------ opsets


def set_opset(model: onnx.ModelProto, opset: int, changes: list[str]) -> onnx.ModelProto:
    """``--opset``: the model at the default-domain ``opset``. A file that imports none
    gets the import; a newer opset is reached by :func:`lift_opset`, an older one through
    ``onnx.version_converter``."""
    current = onnxkit.opset_of(model)
    if current == opset:
        return model
    if current == 0:
        return _add_default_opset(model, opset, "as --opset asks", changes)
    if opset > current:
        return lift_opset(model, opset, changes)
    converted = onnxkit.convert_opset(model, opset)
    changes.append(f"opset {current} -> {opset} (onnx.version_converter, as --opset asks)")
    return converted


def opset_for_affine(model: onnx.ModelProto, changes: list[str]) -> onnx.ModelProto:
    """A default-domain opset that has the spliced affine's ops: added to a file that
    imports only other domains (XGBoost through onnxmltools), lifted from an older one
    (LightGBM through onnxmltools writes opset 8)."""
    current = onnxkit.opset_of(model)
    if current == 0:
        return _add_default_opset(model, MIN_OPSET, "for the spliced affine", changes)
    if current < MIN_OPSET:
        return lift_opset(model, MIN_OPSET, changes, why="for the spliced affine")
    return model


def lift_opset(
    model: onnx.ModelProto, opset: int, changes: list[str], why: str = "as --opset asks"
) -> onnx.ModelProto:
    """The model at a newer default-domain ``opset``, for the ops it uses: when none of
    them changes between the two opsets the import is only restamped (nothing else
    changes); otherwise ``onnx.version_converter`` converts the graph."""
    current = onnxkit.opset_of(model)
    used = sorted(
        {
            node.op_type
            for graph in onnx_affine.graphs(model.graph)
            for node in graph.node
            if node.domain in ("", "ai.onnx")
        }
    )
    changed = [op for op in used if _since(op, current) != _since(op, opset)]
    if changed:
        converted = onnxkit.convert_opset(model, opset)
        changes.append(
            f"opset {current} -> {opset} {why} (onnx.version_converter: "
            f"{', '.join(changed)} changed between them)"
        )
        return converted
    model = onnxkit.copy_model(model)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    ops = ", ".join(used) if used else "it has no default-domain ops"
    changes.append(f"opset {current} -> {opset} {why} (the ops it uses are the same: {ops})")
    return model


def _since(op: str, opset: int) -> int:
    try:
        return int(onnx.defs.get_schema(op, opset, "").since_version)
    except onnx.defs.SchemaError:
        return -1


def _add_default_opset(
    model: onnx.ModelProto, opset: int, why: str, changes: list[str]
) -> onnx.ModelProto:
    model = onnxkit.copy_model(model)
    domains = ", ".join(sorted({o.domain for o in model.opset_import})) or "none"
    model.opset_import.append(helper.make_opsetid("", opset))
    changes.append(
        f"added the default-domain opset {opset} import {why} (the file imported only {domains})"
    )
    return model


def _check_rename(model: onnx.ModelProto, shape: ModelShape) -> None:
    wanted = {passes.INPUT: shape.input_name, passes.OUTPUT: shape.output_name}
    names = onnx_affine.value_names(model)
    for new, old in wanted.items():
        if new != old and new in names:
            raise GraphError(f"cannot rename to {new!r}: the graph already has a value so named")


# ------------------------------------------------------------------------------ writing


def _save(model: onnx.ModelProto, path: Path, source_dir: Path, external: bool) -> list[Path]:
    """Write the model; with ``external``, tensors of 1 KiB or more go to ``<name>.data``.

    Tensors that already live in external data are copied from their file through a
    memory map, never all loaded at once.
    """
    if not external:
        return onnxkit.save_model(model, path)
    model = onnxkit.copy_model(model)
    params: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        array = _external_array(tensor, source_dir) if uses_external_data(tensor) else None
        if array is None and _nbytes(tensor) >= EXTERNAL_MIN_BYTES and _plain_dtype(tensor):
            array = numpy_helper.to_array(tensor, base_dir=str(source_dir))
        if array is None:
            if uses_external_data(tensor):  # small or exotic: bring it inline
                tensor.CopyFrom(
                    numpy_helper.from_array(
                        numpy_helper.to_array(tensor, base_dir=str(source_dir)), tensor.name
                    )
                )
            continue
        tensor.ClearField("raw_data")
        params[tensor.name] = array
    if not params:
        return onnxkit.save_model(model, path)
    return onnxkit.write_model(model, path, params, external=path.name + ".data")


def _external_array(tensor: TensorProto, source_dir: Path) -> np.ndarray | None:
    """A read-only memory map of an external tensor's bytes (None when it should be inline)."""
    if _nbytes(tensor) < EXTERNAL_MIN_BYTES or not _plain_dtype(tensor):
        return None
    info = {e.key: e.value for e in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<")
    return np.memmap(
        source_dir / info["location"],
        dtype=dtype,
        mode="r",
        offset=int(info.get("offset", 0)),
        shape=tuple(tensor.dims),
    )


def _plain_dtype(tensor: TensorProto) -> bool:
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError):
        return False
    return dtype.kind in "biufc" and tensor.data_type not in (
        TensorProto.BFLOAT16,
        TensorProto.STRING,
    )


def _nbytes(tensor: TensorProto) -> int:
    if not _plain_dtype(tensor):
        return 0
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(_nbytes(t) for t in model.graph.initializer)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in model.graph.initializer)


# ------------------------------------------------------------------------------ verification


def verify_bake(
    original: str | os.PathLike[str],
    baked: str | os.PathLike[str],
    in_scaler: AffineScaler,
    out_scaler: AffineScaler,
    shape: ModelShape,
    *,
    rows: np.ndarray | None = None,
    rtol: float | None = None,
    seed: int = 0,
    extra: np.ndarray | None = None,
    regroup: bool = False,
    runner: _Runner | None = None,
) -> VerificationReport:
    """The baked file on raw rows against the original file on the NumPy-normalized rows,
    de-normalized with NumPy, both in onnxruntime.

    Rows: edge rows of the input range plus ``rows`` (or random rows over the range) plus
    ``extra`` (rows at the decision thresholds of tree ensembles). With ``regroup`` the
    original's outputs (``n_out`` rows of one value per input row) are regrouped to
    ``n_out`` per row, as the repaired Reshape does; the baked file must return exactly
    ``(rows, n_out)``. Both files run under ``runner``'s wall-clock limit (default:
    :data:`DEFAULT_TIMEOUT` seconds for all runs together).
    """
    runner = runner or _Runner(DEFAULT_TIMEOUT)
    data = random_rows(in_scaler, RANDOM_ROWS, seed) if rows is None else rows
    if extra is not None and len(extra):
        data = np.concatenate([data, extra])
    out_scale, out_shift = out_scaler.inverse_affine()
    label = Path(original)
    baked_label = f"{label} (baked)" if Path(baked) != label else str(label)

    def original_scaled() -> Runtime:
        run_original = _per_row(
            runner.runtime(original, str(label)), shape, original, regroup=regroup
        )

        def run(X: np.ndarray) -> np.ndarray:
            Y = run_original(in_scaler.transform(X))
            # The de-normalization, written out rather than through inverse_transform, which
            # refuses a non-finite value: here that is a result to report, not an input error.
            Y = Y * out_scale.astype(Y.dtype) + out_shift.astype(Y.dtype)
            return transforms.apply(Y, transforms.side_ops(out_scaler.transforms_, "out"))

        return run

    runtimes: dict[str, Callable[[], Runtime]] = {
        "baked": lambda: _per_row(runner.runtime(baked, baked_label), shape, baked),
        "original+numpy": original_scaled,
    }
    return check_rows(
        runtimes,
        data,
        in_scaler,
        out_scaler,
        dtype=shape.dtype,
        rtol=rtol,
        input_dtype=shape.in_dtype,
    )


def _per_row(
    run: Runtime, shape: ModelShape, path: str | os.PathLike[str], *, regroup: bool = False
) -> Runtime:
    """Outputs as ``(rows, n_out)``; a model with a fixed batch size runs in batches of it.

    The output must have one row per input row (``[rows]`` for one value per row), or,
    with ``regroup``, ``n_out`` rows of one value per input row. Only the last batch of a
    fixed-batch model is filled up (with copies of its last row, whose outputs are
    dropped), so at most ``batch - 1`` rows more are run than asked for.
    """

    def one(X: np.ndarray) -> np.ndarray:
        out = np.asarray(run(X))
        n = X.shape[0]
        fits = out.shape in ((n, shape.n_out), (n,) if shape.n_out == 1 else ())
        if not fits and not (regroup and out.shape in ((n * shape.n_out, 1), (n * shape.n_out,))):
            raise FormatError(
                f"{path}: returned shape {list(out.shape)} for {n} rows; expected "
                f"[{n}, {shape.n_out}]"
            )
        return out.reshape(n, shape.n_out)

    def call(X: np.ndarray) -> np.ndarray:
        if shape.batch is None:
            return one(X)
        check_fixed_batch(Path(path), shape, "verify it")
        size = shape.batch
        parts = []
        for start in range(0, X.shape[0], size):
            chunk = X[start : start + size]
            if len(chunk) < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
            parts.append(one(chunk)[: min(size, X.shape[0] - start)])
        return np.concatenate(parts)

    return call


# ------------------------------------------------------------------------------ running


class _Runner:
    """Bake's onnxruntime sessions, all under one wall-clock budget.

    Every run gets a watchdog (a timer thread) for what is left of the budget; when it
    fires it sets the run's ``RunOptions.terminate``, which onnxruntime checks between
    nodes and inside ``Loop``/``Scan`` bodies, so even a ``Loop`` with a trip count of
    2^62 stops. The time spent inside runs is what counts. The sessions log nothing
    (``log_severity_level`` 4, fatal only): their failures are exceptions, which become
    one line naming the user's file; onnxruntime's own coloured log line never precedes
    it.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = None if timeout is None or timeout == float("inf") else float(timeout)
        self.used = 0.0
        # Files loaded as a view that leaves their inline weights in the file: onnxruntime
        # gets the view and reads the weights from the file (it would hold them twice).
        self.views: dict[Path, onnx.ModelProto] = {}

    def runtime(self, path: str | os.PathLike[str], label: str) -> Runtime:
        """A runtime for ``path``; errors name ``label`` (the user's file)."""
        import onnxruntime as ort

        options = session_options(path)
        view = self.views.get(Path(path))
        model: Any = str(path)
        if view is not None:
            model = view.SerializeToString()
            folder = os.path.abspath(Path(path).parent)
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", folder
            )
        try:
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise FormatError(
                f"{label}: onnxruntime cannot load the model: {first_line(exc)}"
            ) from exc
        run_options = ort.RunOptions()
        run_options.log_severity_level = 4
        name = session.get_inputs()[0].name

        def stop() -> None:
            run_options.terminate = True

        def run(X: np.ndarray) -> np.ndarray:
            left = None if self.timeout is None else self.timeout - self.used
            if left is not None and left <= 0:
                raise self._timed_out(label, path, None)
            run_options.terminate = False
            watchdog = None if left is None else threading.Timer(left, stop)
            started = time.monotonic()
            if watchdog is not None:
                watchdog.daemon = True
                watchdog.start()
            try:
                return session.run(None, {name: X}, run_options)[0]
            except Exception as exc:  # ORT's own exception types
                if run_options.terminate:
                    raise self._timed_out(label, path, exc) from exc
                raise FormatError(
                    f"{label}: onnxruntime failed to run the model: {first_line(exc)}"
                ) from exc
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                self.used += time.monotonic() - started

        return run

    def _timed_out(
        self, label: str, path: str | os.PathLike[str], exc: Exception | None
    ) -> GraphError:
        running = _running_node(exc) or _unbounded_nodes(path)
        where = f" ({running})" if running else ""
        return GraphError(
            f"{label}: the model did not finish within bake's {self.timeout:g} s limit on "
            f"running it{where}; give a larger timeout if it needs longer"
        )


_RUNNING = re.compile(r"while running (\w+) node\. Name:'([^']*)'")


def _running_node(exc: Exception | None) -> str:
    """The node onnxruntime names as running when it stopped ("while running Loop node.
    Name:'loop'"), or ""."""
    found = _RUNNING.search(str(exc)) if exc is not None else None
    return f"{found.group(1)} {found.group(2)!r} was running" if found else ""


def _unbounded_nodes(path: str | os.PathLike[str]) -> str:
    """The nodes that can run without bound (``Loop``, ``Scan``), when onnxruntime did not
    say which one was running."""
    with contextlib.suppress(Exception):
        model = onnx.load(str(path), load_external_data=False)
        loops = [
            onnx_affine.node_label(n)
            for g in onnx_affine.graphs(model.graph)
            for n in g.node
            if n.op_type in ("Loop", "Scan")
        ]
        if loops:
            return "it has " + ", ".join(loops[:3]) + (", ..." if len(loops) > 3 else "")
    return ""


MAX_SPLIT_ROWS = 30000


def _split_rows(
    model: onnx.ModelProto, in_scaler: AffineScaler, dtype: str, seed: int = 1
) -> np.ndarray | None:
    """Rows at the decisions of the original's tree ensembles: for each split, the raw
    values on either side of its boundary (the boundary float itself and one float beyond
    it, for ``<=`` and ``<`` alike), each in an otherwise random row of the input range.
    A fold that moved a threshold by one float is caught here."""
    splits = onnx_affine.tree_splits(model)
    n_in = in_scaler.n_features_in_
    splits = [(f, t) for f, t in splits if 0 <= f < n_in and np.isfinite(t)]
    if not splits:
        return None
    features = np.array([f for f, _ in splits], dtype=np.int64)
    thresholds = np.array([t for _, t in splits])
    scale, shift = in_scaler.affine()
    values = []
    for mode in ("LEQ", "LT"):
        raw, _ = fold_splits(
            thresholds, [mode] * len(splits), scale[features], shift[features], dtype
        )
        raw = raw.astype(dtype)
        with np.errstate(over="ignore"):
            for toward in (-np.inf, np.inf):
                values.append(np.nextafter(raw, np.array(toward, dtype)))
        values.append(raw)
    column = np.concatenate(values).astype(np.float64)
    where = np.tile(features, len(values))
    # a transformed column's splits are transformed values: back to raw ones
    for j, op in enumerate(transforms.side_ops(in_scaler.transforms_, "out")):
        if op is not None:
            with np.errstate(all="ignore"):
                column[where == j] = transforms.NUMPY_OPS[op](column[where == j])
    keep = np.isfinite(column)
    column, where = column[keep], where[keep]
    pairs = np.unique(np.column_stack([where, column]), axis=0)
    rng = np.random.default_rng(seed)
    if len(pairs) > MAX_SPLIT_ROWS:
        pairs = pairs[np.sort(rng.choice(len(pairs), MAX_SPLIT_ROWS, replace=False))]
    rows = random_rows(in_scaler, len(pairs), seed)
    rows[np.arange(len(pairs)), pairs[:, 0].astype(np.int64)] = pairs[:, 1]
    return rows

"""The ONNX runtimes that verification runs: onnxruntime and onnx.reference."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from normexport.errors import FormatError, first_line

Runtime = Callable[[np.ndarray], np.ndarray]


PREPACK_MAX_BYTES = 64 * 1024 * 1024


def _model_bytes(path: str | os.PathLike[str]) -> int:
    """The model file and its external data files (named after it), in bytes."""
    return sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*"))


def session_options(path: str | os.PathLike[str]) -> Any:
    """onnxruntime's session options for verifying ``path``: quiet, and for a large model
    without prepacking, which copies every Gemm/MatMul weight into MLAS's layout (a
    second copy of the model beside the mapped external data)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: failures are exceptions, each one line
    # idle pool threads would spin after each run, taking a core from the table reader and
    # the other runtimes that verification runs between two calls
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if _model_bytes(path) > PREPACK_MAX_BYTES:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def onnxruntime_runtime(path: str | os.PathLike[str]) -> Runtime:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(
            str(path), session_options(path), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own exception types for bad files
        from normexport.onnxkit import load_onnx

        load_onnx(path, with_weights=False)  # names the fault when it is the file's

        raise FormatError(f"{path}: onnxruntime cannot load the model: {first_line(exc)}") from exc
    name = session.get_inputs()[0].name

    def run(X: np.ndarray) -> np.ndarray:
        try:
            return session.run(None, {name: X})[0]
        except Exception as exc:  # ORT's own exception types, e.g. a shape that fails at run time
            raise FormatError(
                f"{path}: onnxruntime failed to run the model: {first_line(exc)}"
            ) from exc

    return run


REFERENCE_MAX_BYTES = 64 * 1024 * 1024


def onnx_reference_runtime(path: str | os.PathLike[str]) -> Runtime:
    import onnx
    from onnx.reference import ReferenceEvaluator

    size = _model_bytes(path)
    if size > REFERENCE_MAX_BYTES:
        # It holds the weights two to three times over (proto, arrays, transposed copies).
        raise NotImplementedError(
            f"the model is {size >> 20} MiB; onnx.reference runs models up to "
            f"{REFERENCE_MAX_BYTES >> 20} MiB (it copies the weights)"
        )

    from normexport.onnx_affine import reference_ops

    model = onnx.load(str(path))
    # inference-mode BatchNormalization: the reference's opset 9-13 kernel uses batch stats
    evaluator = ReferenceEvaluator(model, new_ops=reference_ops())
    name = model.graph.input[0].name
    return lambda X: next(iter(evaluator.run(None, {name: X})))

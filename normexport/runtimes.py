"""The ONNX runtimes that verification runs: onnxruntime and onnx.reference."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from normexport.errors import FormatError, first_line

Runtime = Callable[[np.ndarray], np.ndarray]


def onnxruntime_runtime(path: str | os.PathLike[str]) -> Runtime:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: failures are exceptions, each one line
    # idle pool threads would spin after each run, taking a core from the table reader and
    # the other runtimes that verification runs between two calls
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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

    size = sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*"))
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

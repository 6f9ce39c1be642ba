"""The MXNet adapter: training, symbol surgery, checkpoints and MXNet's ONNX exporter.

Installed with ``pip install "normexport[mxnet]"``. The core never imports this package;
:func:`require` turns a missing MXNet into one clear line naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from normexport.errors import MissingExtraError

EXTRA = 'pip install "normexport[mxnet]"'


def require(module: str) -> ModuleType:
    """Import ``normexport.mx.<module>``, or say which extra provides MXNet."""
    try:
        import mxnet  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            f"this needs MXNet, which is not installed here ({exc}); {EXTRA} (Python 3.11)"
        ) from exc
    return importlib.import_module(f"normexport.mx.{module}")

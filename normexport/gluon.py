"""The public name of the Gluon ``Normalized`` block (needs the ``[mxnet]`` extra).

``from normexport.gluon import Normalized``: a Gluon ``HybridBlock`` that holds a
network between its fixed input normalization and output de-normalization, trains it
in normalized space (``block.loss``) and exports it raw in, raw out (``block.export``).
It lives in the MXNet adapter (:mod:`normexport.mx.gluon`); without MXNet, importing
this module raises :class:`~normexport.errors.MissingExtraError` naming
``pip install "normexport[mxnet]"``. See ``docs/gluon.md``.
"""

from __future__ import annotations

from normexport.mx import require

Normalized = require("gluon").Normalized

__all__ = ["Normalized"]

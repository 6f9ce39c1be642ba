"""Read MXNet ``.params`` files with NumPy alone.

The format (``mx.nd.save`` of a dict, MXNet 1.x): a list header, the arrays, then their
names. Reading it here keeps two promises: the NumPy reference in verification is
built without MXNet, and a hostile or truncated file is refused by Python code with a
clear message instead of reaching MXNet's C++ parser, which can abort the process.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections.abc import Callable
from io import BufferedReader
from pathlib import Path
from typing import Any

import numpy as np

from normexport.errors import FormatError

LIST_MAGIC = 0x112
ARRAY_MAGICS = (0xF993FAC9, 0xF993FACA)  # NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC
DTYPES: dict[int, np.dtype[Any]] = {0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2")}
MAX_NDIM = 8
MAX_ARRAYS = 100_000  # as many as a symbol may have nodes (mx.checkpoint.MAX_NODES)
MAX_ELEMENTS = 2**34  # as checkpoint.MAX_ELEMENTS: no regression net has a larger tensor
MAX_DIM = 2**31 - 1  # MXNet 1.x (no large-tensor build) keeps each dimension in 32 bits
MAX_NAME_BYTES = 4096
CHUNK_BYTES = 16 << 20  # the read buffer when filling arrays allocated by the caller


def read_params(
    path: str | os.PathLike[str],
    convert: Callable[[np.ndarray], Any] | None = None,
    *,
    empty: Callable[[tuple[int, ...], np.dtype[Any]], Any] | None = None,
) -> dict[str, Any]:
    """Every named array in a ``.params`` file, keys as stored (``arg:``/``aux:`` kept).

    The file is read twice, both times as a stream: first every header and name is
    checked (the data is skipped, nothing is allocated but a small record per array),
    then each array is read and handed over before the next is read. A hostile or
    damaged file is therefore refused before any array exists.

    By default each array is read into its own NumPy buffer, passed through ``convert``
    if given. With ``empty(shape, dtype)``, the caller allocates each destination (an
    MXNet NDArray, say) and it is filled in blocks of rows of at most
    :data:`CHUNK_BYTES` through ``dest[a:b][:] = block``: the contents are then held
    once, in the caller's arrays, never beside a whole NumPy copy.
    """
    if convert is not None and empty is not None:
        raise ValueError("give convert or empty, not both")
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise FormatError(f"{path}: is a directory, expected a params file")
        if not stat.S_ISREG(info.st_mode):
            # A FIFO or device would block or never end: only regular files are read.
            raise FormatError(f"{path}: not a regular file, expected a params file")
        size = info.st_size
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except PermissionError:
        raise FormatError(f"{path}: permission denied") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        reader = _Reader(handle, size, path)
        if reader.u64() != LIST_MAGIC:
            raise FormatError(f"{path}: not an MXNet params file (bad magic number)")
        reader.u64()  # reserved
        records = [reader.header(i) for i in range(reader.count("arrays"))]
        names = [reader.name() for _ in range(reader.count("names"))]
        if handle.read(1):
            raise FormatError(f"{path}: trailing bytes after the last name")
        if not names:
            raise FormatError(f"{path}: holds unnamed arrays; expected named parameters")
        if len(names) != len(records):
            raise FormatError(f"{path}: {len(records)} arrays but {len(names)} names")
        if len(set(names)) != len(names):
            raise FormatError(f"{path}: duplicate parameter names")
        out: dict[str, Any] = {}
        for name, record in zip(names, records, strict=True):
            if empty is not None:
                out[name] = reader.fill(record, empty)
                continue
            array = reader.data(record)
            out[name] = array if convert is None else convert(array)
        return out


class _Reader:
    def __init__(self, handle: BufferedReader, size: int, path: Path) -> None:
        self.handle, self.size, self.path = handle, size, path

    def take(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) != n:
            raise FormatError(f"{self.path}: truncated (ends inside a record)")
        return data

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def i32(self) -> int:
        return int(struct.unpack("<i", self.take(4))[0])

    def count(self, what: str) -> int:
        n = self.u64()
        if n > MAX_ARRAYS or n > self.size:
            limit = min(MAX_ARRAYS, self.size)
            raise FormatError(
                f"{self.path}: declares {n} {what}, more than the file can hold or "
                f"normexport reads (at most {limit})"
            )
        return n

    def header(self, index: int) -> tuple[int, tuple[int, ...], np.dtype[Any] | None]:
        """One array's header, checked; its data is skipped. Returns where the data
        starts, the shape and the element type (None for MXNet's empty V2 record)."""
        where = f"{self.path}: array {index}"
        magic = struct.unpack("<I", self.take(4))[0]
        if magic not in ARRAY_MAGICS:
            raise FormatError(f"{where}: unsupported array format (magic {magic:#x})")
        if self.i32() != 0:
            raise FormatError(f"{where}: sparse storage is not supported")
        ndim = self.i32()
        if not 0 <= ndim <= MAX_NDIM:
            raise FormatError(f"{where}: {ndim} dimensions")
        shape = tuple(struct.unpack(f"<{ndim}q", self.take(8 * ndim))) if ndim else ()
        if any(d < 0 for d in shape):
            raise FormatError(f"{where}: negative dimension in shape {shape}")
        count = math.prod(shape)  # a Python int: no int64 wrap-around on hostile shapes
        if count > MAX_ELEMENTS:
            raise FormatError(f"{where}: shape {shape} has more than {MAX_ELEMENTS} elements")
        if any(d > MAX_DIM for d in shape):
            raise FormatError(
                f"{where}: shape {shape} has a dimension of more than {MAX_DIM} (MXNet 1.x "
                "keeps each dimension in 32 bits)"
            )
        if ndim == 0 and magic == ARRAY_MAGICS[0]:
            return self.handle.tell(), (0,), None  # V2 writes nothing more for an empty array
        self.take(8)  # context: device type and id
        flag = self.i32()
        if flag not in DTYPES:
            raise FormatError(f"{where}: element type {flag} is not a float type")
        dtype = DTYPES[flag]
        start = self.handle.tell()
        nbytes = count * dtype.itemsize
        if nbytes > self.size - start:
            raise FormatError(f"{where}: shape {shape} needs more bytes than the file has left")
        self.handle.seek(nbytes, os.SEEK_CUR)
        return start, shape, dtype

    def data(self, record: tuple[int, tuple[int, ...], np.dtype[Any] | None]) -> np.ndarray:
        """The array a checked header describes, read straight into its own buffer."""
        start, shape, dtype = record
        if dtype is None:
            return np.zeros(shape, np.float32)
        array = np.empty(shape, dtype=dtype)
        if array.nbytes:
            self.handle.seek(start)
            buffer: Any = array  # an ndarray is a writable buffer
            if self.handle.readinto(memoryview(buffer).cast("B")) != array.nbytes:
                raise FormatError(f"{self.path}: truncated (changed while being read?)")
        return array.astype(dtype.newbyteorder("="), copy=False)

    def fill(
        self,
        record: tuple[int, tuple[int, ...], np.dtype[Any] | None],
        empty: Callable[[tuple[int, ...], np.dtype[Any]], Any],
    ) -> Any:
        """The array a checked header describes, in a destination from ``empty``,
        read in blocks of rows through one reused buffer."""
        start, shape, dtype = record
        if dtype is None or math.prod(shape) == 0 or len(shape) == 0:
            array = self.data(record)
            dest = empty(array.shape, array.dtype)
            if array.size:
                dest[:] = array
            return dest
        native = dtype.newbyteorder("=")
        dest = empty(shape, native)
        rows = shape[0]
        step = max(1, CHUNK_BYTES // (math.prod(shape[1:]) * dtype.itemsize))
        buffer = np.empty((min(step, rows), *shape[1:]), dtype=dtype)
        self.handle.seek(start)
        for first in range(0, rows, step):
            block = buffer[: min(step, rows - first)]
            view: Any = block  # an ndarray is a writable buffer
            if self.handle.readinto(memoryview(view).cast("B")) != block.nbytes:
                raise FormatError(f"{self.path}: truncated (changed while being read?)")
            dest[first : first + len(block)][:] = block.astype(native, copy=False)
        return dest

    def name(self) -> str:
        n = self.u64()
        if n > MAX_NAME_BYTES:
            raise FormatError(f"{self.path}: a parameter name of {n} bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: a parameter name is not UTF-8") from None

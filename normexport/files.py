"""Write files atomically, hash them in a stream, and read small JSON documents safely.

The one atomic-write mechanism for files: a temporary file beside the target, fsynced,
then ``os.replace``d over it. (Directories have theirs in :mod:`normexport.modeldir`.)
A target that is not a regular file (a FIFO, ``/dev/null``, ``/dev/stdout``) is written
to as a stream, never replaced; a symbolic link is followed, so the file it names is
replaced and the link stays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from normexport.errors import FormatError, NormexportError

MAX_JSON_BYTES = 64 * 1024 * 1024  # scalers, manifests and symbols are small; refuse absurd ones
MAX_JSON_DEPTH = 64  # our documents nest 4 deep; deeper ones are hostile (RecursionError)
MAX_INT_DIGITS = 30  # integers in our documents are counts and sizes
PICKLE_MAGIC = b"\x80"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``.

    For writers that insist on a file name (``mx.nd.save``, ``onnx.save``). If the block
    raises, the temporary file is removed and ``path`` is untouched.
    """
    given = Path(path)
    if given.is_dir():
        raise NormexportError(f"{given}: is a directory; give a file name")
    if given.exists() and not given.is_file():  # a device or a FIFO: a stream, not a file
        yield given
        return
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise NormexportError(f"{target.parent}: cannot write here ({exc.strerror})") from exc
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched, so a
    reader never sees half a file.
    """
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- JSON


def dump_json(obj: Any) -> str:
    """Canonical JSON text: stable key order as given, two-space indent, final newline."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes(path, dump_json(obj).encode("utf-8"))


def read_json(path: str | os.PathLike[str], format_tag: str | None = None) -> Any:
    """Read a JSON document; with ``format_tag``, require ``obj["format"] == format_tag``."""
    path = Path(path)
    raw = read_small_file(path, MAX_JSON_BYTES)
    if raw.startswith(PICKLE_MAGIC):
        raise FormatError(f"{path}: looks like a Python pickle; normexport reads JSON only")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
    obj = parse_json(text, str(path))
    if format_tag is not None:
        found = obj.get("format") if isinstance(obj, dict) else None
        if found != format_tag:
            raise FormatError(f"{path}: format tag is {found!r}, expected {format_tag!r}")
    return obj


def parse_json(text: str, source: str) -> Any:
    """Parse JSON text from an untrusted place (a file, ONNX metadata) with bounded cost:
    nesting depth, integer digits and NaN/Infinity are refused with one line."""
    depth = _nesting_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise FormatError(f"{source}: JSON nested {depth} deep (the limit is {MAX_JSON_DEPTH})")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=_bounded_int)
    except (json.JSONDecodeError, ValueError) as exc:
        raise FormatError(f"{source}: not valid JSON ({exc})") from exc


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting outside strings (JSON's parser recurses once a level)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (the limit is {MAX_INT_DIGITS})")
    return int(text)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def read_small_file(path: Path, limit: int) -> bytes:
    """Read a whole file that must exist and be at most ``limit`` bytes."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise FormatError(f"{path}: is a directory, expected a file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device blocks or never ends
            raise FormatError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise FormatError(f"{path}: {info.st_size} bytes, larger than the {limit}-byte limit")
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise FormatError(f"{path}: larger than the {limit}-byte limit")
        return data
    except FileNotFoundError as exc:
        raise NormexportError(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise NormexportError(f"{path}: permission denied") from exc

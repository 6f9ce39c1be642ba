"""Write files atomically, hash them in a stream, and read small JSON documents safely.

The one atomic-write mechanism for files: a temporary file beside the target, fsynced,
then ``os.replace``d over it. (Directories have theirs in :mod:`normexport.modeldir`.)
Where a file lands is decided once, by :func:`resolve_target`: a target that is not a
regular file (a FIFO, ``/dev/null``, ``/dev/stdout``) is written to as a stream, never
replaced; a symbolic link is followed, so the file it names is replaced and the link
stays. Writers that stage several files (bake) use :func:`staging_dir` and
:func:`publish`; :func:`target_lock` keeps two processes from writing one target at once,
and temporary names carry the writer's PID, so :func:`remove_stale` can clear what a
killed writer left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Target:
    """Where a write lands: ``path`` is replaced atomically, or, with ``stream``, written
    to in place (an existing FIFO, device or socket, which must never be replaced). A
    name of one of this process's file descriptors (``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``) is a stream written through that descriptor (``fd``), whatever
    it is open on: the shell's ``> file`` or ``>> log`` is honoured, never replaced."""

    path: Path
    stream: bool = False
    kind: str = "file"
    fd: int | None = None


def resolve_target(path: str | os.PathLike[str]) -> Target:
    """The one decision of where an output goes.

    A directory is refused; a name of one of our file descriptors, or an existing
    non-regular file (``/dev/null``, a FIFO), is a stream; a symbolic link is followed to
    the file it names (which is replaced, while the link stays); anything else is the
    path itself.
    """
    given = Path(path)
    if given.is_dir():
        raise NormexportError(f"{given}: is a directory; give a file name")
    fd = _descriptor(given)
    if fd is not None:
        return Target(given, stream=True, kind=file_kind(given), fd=fd)
    if given.exists() and not given.is_file():  # a device or a FIFO: a stream, not a file
        return Target(given, stream=True, kind=file_kind(given))
    if given.is_symlink():
        return Target(Path(os.path.realpath(given)))
    return Target(given)


_STANDARD = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
_FD_NAME = re.compile(r"/(?:dev/fd|proc/self/fd|proc/(\d+)/fd)/(\d+)")


def _descriptor(path: Path) -> int | None:
    """The file descriptor of ours that ``path`` names, through any symbolic links
    (``/dev/stdout`` -> ``/proc/self/fd/1``), or None."""
    hop = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        if hop in _STANDARD:
            return _STANDARD[hop]
        found = _FD_NAME.fullmatch(hop)
        if found:
            pid = found.group(1)
            return int(found.group(2)) if pid is None or int(pid) == os.getpid() else None
        if not os.path.islink(hop):
            return None
        hop = os.path.normpath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
    return None


def file_kind(path: str | os.PathLike[str]) -> str:
    """What a path is, in words for a message: "a FIFO", "a character device", ..."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a special file"


def _temp_prefix(target: Path) -> str:
    """``.NAME.PID.``: a temporary name that says which process made it."""
    return f".{target.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``.

    For writers that insist on a file name (``mx.nd.save``, ``onnx.save``). If the block
    raises, the temporary file is removed and ``path`` is untouched. A stream target
    (see :func:`resolve_target`) is yielded itself and written in place.
    """
    resolved = resolve_target(path)
    if resolved.stream:
        yield resolved.path
        return
    target = resolved.path
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
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


# --------------------------------------------------------------------------- staging and locks


def staging_dir(target: Target) -> Path:
    """A fresh directory ``.NAME.PID.XXXXXXXX.tmp`` to build a target's files in: beside
    the target, so that :func:`publish` is a rename on one file system (a stream
    target's live in the system's temporary directory). The PID lets
    :func:`remove_stale` tell a dead writer's leftovers from a live one's."""
    parent = _staging_parent(target)
    try:
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(target.path), suffix=".tmp", dir=parent))
    except FileNotFoundError as exc:
        raise NormexportError(f"{parent}: no such directory") from exc
    except OSError as exc:
        raise NormexportError(f"{parent}: cannot write here ({exc.strerror})") from exc


def _staging_parent(target: Target) -> Path:
    return Path(tempfile.gettempdir()) if target.stream else target.path.parent


def publish(staged: Path, target: Target) -> Path:
    """Put a finished, staged file in place: renamed over ``target.path`` (atomic), or
    copied into a stream target, which is never replaced."""
    if not target.stream:
        os.replace(staged, target.path)
        return target.path
    try:
        if target.fd in (1, 2):  # what was printed before comes first
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        with (
            open(staged, "rb") as source,
            (
                open(target.path, "wb") if target.fd is None else os.fdopen(os.dup(target.fd), "wb")
            ) as sink,
        ):
            shutil.copyfileobj(source, sink, 1 << 20)
    except OSError as exc:
        raise NormexportError(
            f"{target.path}: cannot write to {target.kind} ({exc.strerror or exc})"
        ) from exc
    return target.path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Target) -> list[Path]:
    """Remove the temporary files and staging directories of ``target`` (named
    ``.NAME.PID.*.tmp`` by :func:`atomic_path` and :func:`staging_dir`) whose process
    is gone: what a killed writer left behind. A live process's are never touched."""
    parent = _staging_parent(target)
    prefix = f".{target.path.name}."
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix) : -len(".tmp")].split(".")
        if len(parts) != 2 or not parts[0].isdigit() or len(parts[0]) > 9:
            continue  # not ours (another target's name may extend this one's)
        if pid_alive(int(parts[0])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()  # a file, or a symbolic link (never followed)
            removed.append(path)
    return removed


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of a target: ``.NAME.lock`` beside the file (or directory) it names."""
    given = Path(path)
    real = Path(os.path.realpath(given)) if given.is_symlink() else given
    return real.parent / f".{real.name}.lock"


@contextlib.contextmanager
def target_lock(
    path: str | os.PathLike[str], *, what: str = "bake", wait: float = 0.0
) -> Iterator[Path | None]:
    """Hold the lock of one output target (a file or a model directory) for the block.

    The lock is ``fcntl.flock`` on ``.NAME.lock`` beside the target (beside the file a
    symbolic link names). If another process holds it, wait up to ``wait`` seconds, then
    raise one line: ``another bake into OUT is running (pid N)``. The kernel releases the
    lock when its holder dies, so a killed run never blocks the next; the file is
    removed on release. A stream target (a FIFO, a device) is not replaced, so it is not
    locked (yields None), nor is anything where ``fcntl`` does not exist.
    """
    given = Path(path)
    if _descriptor(given) is not None or (
        given.exists() and not given.is_file() and not given.is_dir()
    ):
        yield None
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield None
        return
    lock = lock_path(given)
    deadline = time.monotonic() + max(wait, 0.0)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_UMASK)
        except FileNotFoundError as exc:
            raise NormexportError(f"{lock.parent}: no such directory") from exc
        except OSError as exc:
            raise NormexportError(f"{lock.parent}: cannot write here ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            who = f" (pid {holder})" if holder else ""
            raise NormexportError(f"another {what} into {given} is running{who}") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # its holder removed it after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a waiter then sees a new file
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and len(text) < 10 else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


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

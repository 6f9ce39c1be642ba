"""The model directory as a unit: file names, staging and atomic swap, repair, manifest.

A directory is written in a staging directory beside it and swapped into place only
when complete (manifest last), so a crash or a kill leaves either the previous complete
directory or the new one. This is the one atomic-write mechanism for directories.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from normexport import __version__, files
from normexport.errors import NormexportError
from normexport.scaling import AffineScaler, scalers_from_dict

# The files (see docs/model-directory.md).
SCALERS_FILE = "scalers.json"
NET_PREFIX = "net"
MODEL_PREFIX = "model"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
REPORT_DIR = "report"
_STAGING, _OLD = ".staging-", ".old-"


def symbol_file(directory: str | os.PathLike[str], prefix: str) -> Path:
    return Path(directory) / f"{prefix}-symbol.json"


def params_file(directory: str | os.PathLike[str], prefix: str) -> Path:
    return Path(directory) / f"{prefix}-0000.params"


MANIFEST_FORMAT = "normexport.manifest/1"


def load_scalers(path: str | os.PathLike[str]) -> tuple[AffineScaler, AffineScaler, str]:
    return scalers_from_dict(files.read_json(path), str(path))


def write_manifest(stage: Path, fields: dict[str, Any]) -> None:
    """Write ``manifest.json`` last: ``fields``, versions, and the sha256 of every file."""
    listing = {}
    nested = {d.name for d in stage.iterdir() if is_model_directory(d)}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        rel = path.relative_to(stage).as_posix()
        if rel != MANIFEST_FILE and rel.split("/")[0] not in nested:
            listing[rel] = {"sha256": files.sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "format": MANIFEST_FORMAT,
        "normexport_version": __version__,
        "versions": _versions(),
        **fields,
        "files": listing,
    }
    files.write_json(stage / MANIFEST_FILE, manifest)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("mxnet", "numpy", "onnx", "onnxruntime"):
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[package] = importlib_metadata.version(package)
    return versions


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / MANIFEST_FILE
    return files.read_json(path, MANIFEST_FORMAT) if path.is_file() else None


@contextlib.contextmanager
def model_directory(out_dir: str | os.PathLike[str], *, keep: Sequence[str] = ()) -> Iterator[Path]:
    """Stage a model directory beside ``out_dir`` and swap it in when the block succeeds.

    The stage starts empty, or holding the entries of the existing directory that
    ``keep`` names (relative paths, hard-linked); :func:`carry_over` adds more later.
    Nothing else of the old directory survives the swap, so its manifest lists only what
    was written or kept on purpose. A failure removes the stage and leaves ``out_dir`` as
    it was.
    """
    target = _checked_target(out_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # the lock file lives there
    except OSError as exc:
        raise NormexportError(f"{target.parent}: cannot create ({exc.strerror})") from exc
    with files.target_lock(target, what="export"):  # one writer per directory at a time
        yield from _staged(target, keep)


def _checked_target(out_dir: str | os.PathLike[str]) -> Path:
    """The directory to write: ``.``/``..`` refused, a symbolic link followed (the link
    stays and the directory it names is replaced)."""
    given = Path(out_dir)
    if given.name in ("", ".", ".."):
        raise NormexportError(
            f"{given}: name the model directory itself (not '.' or '..'), e.g. --out my_model"
        )
    return Path(os.path.realpath(given)) if given.is_symlink() else given


def _staged(target: Path, keep: Sequence[str]) -> Iterator[Path]:
    repair(target)
    if target.exists() and not target.is_dir():
        raise NormexportError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not is_model_directory(target):
        raise NormexportError(
            f"{target}: exists and is not a normexport model directory; choose another --out"
        )
    stage = target.parent / f".{target.name}{_STAGING}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        carry_over(target, stage, keep)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise NormexportError(f"{target.parent}: cannot write here ({exc.strerror})") from exc
    try:
        yield stage
        _swap_in(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def carry_over(source: Path, stage: Path, names: Iterable[str]) -> list[str]:
    """Hard-link (or copy) the files or directories ``names`` (relative to ``source``)
    into ``stage``; returns the names that existed. Names that leave ``source`` are
    ignored."""
    carried = []
    for name in names:
        src = source / name
        if ".." in Path(name).parts or Path(name).is_absolute() or not src.exists():
            continue
        dst = stage / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True)
        else:
            dst.unlink(missing_ok=True)
            _link_or_copy(str(src), str(dst))
        carried.append(name)
    return carried


def _link_or_copy(src: str, dst: str) -> None:
    # Files are replaced (never modified in place), so a hard link is a safe, free copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the call or the flag is unsupported (other systems, some
    file systems), so the caller falls back to two renames.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(stage: Path, target: Path) -> None:
    # One atomic exchange where possible: DIR is the old or the new directory at every
    # instant, never absent; the stage path then holds the old one and is removed.
    if target.is_dir() and _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)
        return
    old = target.parent / f".{target.name}{_OLD}{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(stage, target)
    shutil.rmtree(old, ignore_errors=True)


def is_model_directory(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST_FILE).is_file() or (path / SCALERS_FILE).is_file())


def repair(target: Path) -> None:
    """Finish or undo what an interrupted run left beside ``target``.

    Stages are incomplete by definition and are removed. An ``.old-`` directory is the
    previous complete one: if ``target`` is missing (killed between the two renames) it
    is put back, otherwise it is removed.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    for leftover in sorted(parent.glob(f".{target.name}{_STAGING}*")):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and files.pid_alive(int(pid)) and int(pid) != os.getpid():
            continue  # another export's live stage (it holds the lock); not ours to remove
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(parent.glob(f".{target.name}{_OLD}*")):
        if not target.exists() and (old / MANIFEST_FILE).is_file():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def describe_directory(model_dir: str | os.PathLike[str]) -> str:
    """A few lines for the terminal: mode, verification, files and sizes."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir) or {}
    lines = [f"model directory {model_dir}/"]
    if "mode" in manifest:
        fold = manifest.get("fold") or {}
        sides = ", ".join(
            f"{k} {v}" for k, v in fold.items() if not k.endswith(("_reason", "_transforms"))
        )
        lines.append(
            f"  mode {manifest['mode']} ({sides}), opset {manifest.get('opset')}, "
            f"{manifest.get('dtype')}"
        )
        for side in ("input", "output"):
            reason = fold.get(f"{side}_reason")
            if reason:
                lines.append(f"  {side} side spliced, not folded: {reason}")
            kept = fold.get(f"{side}_transforms")
            if kept:
                lines.append(f"  {side} transforms kept as nodes (only the affine folds): {kept}")
    check = manifest.get("verification")
    if check:
        against = f" against {check['reference']} (float64)" if check.get("reference") else ""
        loosened = f", loosened from {check['rtol_default']:g}" if check.get("loosened") else ""
        lines.append(
            f"  verified on {check['rows']} rows with {', '.join(check['runtimes'])}{against}: "
            f"max range-relative error {check['max_rel_error']:.3g} "
            f"(tolerance {check['rtol']:g}{loosened}) {'PASS' if check['ok'] else 'FAIL'}"
        )
        for warning in check.get("warnings", []):
            lines.append(f"  warning: {warning}")
    for name, entry in sorted(manifest.get("files", {}).items()):
        lines.append(f"  {name:<24} {_human(entry['bytes']):>10}")
    return "\n".join(lines)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def model_scalers(path: Path, model: Any = None) -> tuple[AffineScaler, AffineScaler, str]:
    """Scalers of a model directory (``scalers.json``) or ONNX file (its metadata; pass
    the ``model`` already loaded to spare reading the file again)."""
    if path.is_dir():
        return load_scalers(path / SCALERS_FILE)
    from normexport.onnxkit import load_onnx, read_metadata

    meta = read_metadata(model if model is not None else load_onnx(path, with_weights=False))
    if "normexport.scalers" not in meta:
        raise NormexportError(f"{path}: has no normexport.scalers metadata; bake it first")
    doc = files.parse_json(meta["normexport.scalers"], f"{path}: metadata normexport.scalers")
    return scalers_from_dict(doc, f"{path}: metadata normexport.scalers")

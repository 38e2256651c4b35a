"""Atomic file writes.

Every artefact (reports, JSON summaries, plots, checkpoints' side files) is written to a
temporary file in the *same directory* as the target and then moved into place with
:func:`os.replace`, which is atomic on POSIX and Windows. A reader therefore sees either
the old file or the complete new one, never a half-written file, and a crash leaves at
most a hidden ``.<name>.<pid>.*.tmp`` file behind (removed on any Python exception; after a
kill, :func:`remove_stale_temps` removes it on the next start, because its writer is gone).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "ensure_writable_dir",
           "remove_stale_temps", "to_jsonable"]

_FILE_MODE = 0o644
# .<target name>.<writer pid>.<8 mkstemp chars>.tmp<suffix>; files of older versions have no pid
_TEMP_RE = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp(?:\.[^.]+)?$")
_LEGACY_TEMP_AGE_S = 600.0


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on clean exit move it onto ``path``.

    The temporary name keeps the target's suffix (``.png`` stays ``.png``) so tools that
    infer the format from the extension (``matplotlib.savefig``) work. On an exception the
    temporary file is removed and the target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                                    suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) is not a probe there: assume alive, the age rule applies
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's live process, or no way to ask (Windows)
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike[str], names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove temporary files that :func:`atomic_output` left in ``directory`` when its process was killed.

    A temp file is stale when the process that wrote it no longer runs (its pid is in the name), or,
    for files from versions without the pid (and off POSIX, where a pid cannot be probed), when it is
    older than 10 minutes. ``names`` limits the clean-up to temps of those target names. A missing
    directory is fine. Returns what was removed.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for f in entries:
        m = _TEMP_RE.match(f.name)
        if m is None or (names is not None and m["name"] not in names) or not f.is_file():
            continue
        try:
            old = now - f.stat().st_mtime > _LEGACY_TEMP_AGE_S
            stale = (not _pid_alive(int(m["pid"])) or (old and os.name != "posix")) if m["pid"] else old
            if stale:
                f.unlink()
                removed.append(f)
        except FileNotFoundError:  # removed meanwhile
            continue
    return removed


def ensure_writable_dir(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` if needed and prove it is writable by creating and removing a file there.

    Raises the :class:`OSError` of the failing step (naming the path), so a command can refuse *before*
    it spends minutes loading data. Works for root too, for whom permission bits do not apply: a
    read-only mount or a parent that is a file still fail here.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=directory, prefix=f".qdrank-write-check.{os.getpid()}.")
    os.close(fd)
    os.unlink(probe)
    return directory


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
    """Recursively convert ``obj`` into plain JSON types.

    numpy scalars/arrays and torch tensors become Python numbers/lists, non-finite floats
    (NaN, +-inf) become ``None`` (JSON ``null``), paths become strings, sets/tuples become
    lists, datetimes become ISO strings, dataclass-like objects with ``to_dict`` use it.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor without importing torch
        return to_jsonable(obj.detach().cpu().tolist())
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically; NaN/inf -> ``null``, numpy types converted."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out`` (same filesystem), replacing any directory there:
    the old one is renamed aside first and deleted last, so ``out`` is never half-written."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)

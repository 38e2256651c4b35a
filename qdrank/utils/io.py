"""Atomic file writes.

Every artefact (reports, JSON summaries, plots, checkpoints' side files) is written to a
temporary file in the *same directory* as the target and then moved into place with
:func:`os.replace`, which is atomic on POSIX and Windows. A reader therefore sees either
the old file or the complete new one, never a half-written file, and a crash leaves at
most a hidden ``.<name>.*.tmp`` file behind (removed on any Python exception).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "to_jsonable"]

_FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on clean exit move it onto ``path``.

    The temporary name keeps the target's suffix (``.png`` stays ``.png``) so tools that
    infer the format from the extension (``matplotlib.savefig``) work. On an exception the
    temporary file is removed and the target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
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

"""Small shared utilities (atomic file writes, ...)."""

from qdrank.utils.io import (
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    remove_stale_temps,
    to_jsonable,
)

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "ensure_writable_dir",
           "remove_stale_temps", "to_jsonable"]

"""Small shared utilities (atomic file writes, ...)."""

from qdrank.utils.io import (
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    to_jsonable,
)

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "to_jsonable"]

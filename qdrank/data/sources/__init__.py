"""Converters from public logs to the canonical dataset format.

Each module exposes ``prepare(input, out, *, seed=0, **options) -> ValidationReport``; modules are
imported lazily so that ``qdrank`` does not pay for (or depend on) converters it does not use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from qdrank.data.schema import ValidationReport

SOURCES: dict[str, str] = {
    "synthetic": "qdrank.data.sources.synthetic",
    "trivago": "qdrank.data.sources.trivago",
    "movielens": "qdrank.data.sources.movielens",
    "jdsearch": "qdrank.data.sources.jdsearch",
    "aliexpress": "qdrank.data.sources.aliexpress",
}
# Sources generated from nothing: their ``prepare`` takes ``input=None``.
NO_INPUT = ("synthetic",)


def prepare_source(name: str, input: Path | str | None, out: Path | str, **options) -> ValidationReport:
    """Convert source ``name`` found at ``input`` (a directory) into a canonical dataset at ``out``.

    Raises ``ValueError`` for an unknown source and ``FileNotFoundError`` (naming the expected files)
    when ``input`` lacks the source's files.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; choose one of: {', '.join(sorted(SOURCES))}")
    if name not in NO_INPUT:
        if input is None:
            raise FileNotFoundError(f"data source {name!r} needs an input directory (got none)")
        input = Path(input)
        if not input.exists():
            raise FileNotFoundError(f"{name}: input directory {input} does not exist")
    module = importlib.import_module(SOURCES[name])
    return module.prepare(None if input is None else Path(input), Path(out), **options)

"""Converters from public logs to the canonical dataset format.

Each module exposes ``prepare(input, out, *, seed=0, **options) -> ValidationReport``; modules are
imported lazily so that ``qdrank`` does not pay for (or depend on) converters it does not use.
"""

from __future__ import annotations

import importlib
import inspect
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
    options = _check_options(name, module.prepare, options)
    return module.prepare(None if input is None else Path(input), Path(out), **options)


def _check_options(name: str, fn, options: dict) -> dict:
    """Reject unknown option names and values of the wrong type before any work starts."""
    params = {p.name: p for p in inspect.signature(fn).parameters.values()
              if p.kind == p.KEYWORD_ONLY}
    out = {}
    for key, value in options.items():
        if key not in params:
            raise ValueError(f"{name}: unknown option {key!r}; options: {', '.join(sorted(params))}")
        default = params[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = True
        if not ok:
            raise ValueError(f"{name}: option {key!r} expects {type(default).__name__}, got {value!r}")
        out[key] = value
    return out

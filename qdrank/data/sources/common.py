"""Helpers shared by the source converters (``qdrank.data.sources.*``).

Everything here is vectorised (pyarrow compute / numpy) so the converters scale to the full public
data sets (tens of millions of rows) without per-row Python loops.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from qdrank.data.schema import (
    BEHAVIORS,
    IMPRESSIONS,
    REQUESTS,
    RESERVED,
    DatasetError,
    ValidationReport,
    write_dataset,
)

LIST_OF_STRINGS = pa.list_(pa.string())


# ----------------------------------------------------------------------------- input files

def require_columns(df: pd.DataFrame | Sequence[str], columns: Iterable[str], file: str | Path) -> None:
    """Raise :class:`DatasetError` naming the file and the first missing column."""
    have = list(df.columns) if isinstance(df, pd.DataFrame) else list(df)
    for col in columns:
        if col not in have:
            raise DatasetError(Path(file).name, f"required source column missing (has: {', '.join(map(str, have))})",
                               col)


def read_atomic(path: Path) -> pd.DataFrame:
    """Read a RecBole atomic file (tab separated, ``name:type`` headers) with the type suffixes removed.

    ``token`` / ``token_seq`` columns are read as strings, ``float`` columns as float64.
    """
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    renamed = {}
    for col in df.columns:
        name, _, kind = str(col).partition(":")
        renamed[col] = name
        if kind == "float":
            df[col] = pd.to_numeric(df[col].replace("", None), errors="raise")
    return df.rename(columns=renamed)


# ----------------------------------------------------------------------------- string lists

def _to_arrow_strings(values: pd.Series) -> pa.Array:
    """Strings as a pyarrow array with null for missing and for empty strings."""
    arr = pa.array(values.to_numpy(dtype=object, na_value=None), type=pa.string(), from_pandas=True)
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)


def split_explode(values: pd.Series, sep: str) -> tuple[np.ndarray, np.ndarray, pd.Series, np.ndarray]:
    """Split each string of ``values`` on ``sep`` and flatten.

    Returns ``(parent, pos, flat, lengths)``: for every element its row (0-based position in
    ``values``) and 0-based index in its list, the element strings (a ``str`` Series), and each row's
    list length (missing or empty strings give empty lists).
    """
    lists = pc.split_pattern(_to_arrow_strings(values), sep)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64)
    parent = pc.list_parent_indices(lists).to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    pos = np.arange(len(parent), dtype=np.int64) - starts[parent]
    flat = pc.list_flatten(lists).to_pandas()
    return parent, pos, pd.Series(flat, dtype="str"), lengths


def list_column(values: pd.Series, sep: str) -> pd.Series:
    """A Parquet ``list<string>`` column from separator-joined strings (missing/empty -> ``[]``)."""
    lists = pc.split_pattern(_to_arrow_strings(values), sep)
    lists = pc.fill_null(lists, pa.scalar([], LIST_OF_STRINGS))
    return as_list_column(lists, values.index)


def as_list_column(lists: pa.Array | pa.ChunkedArray | Sequence[list[str]], index: pd.Index | None = None) -> pd.Series:
    """An object Series of string arrays, which ``DataFrame.to_parquet`` writes as ``list<string>``.

    (A pandas ``ArrowDtype(list<string>)`` column would be smaller, but its dtype name in the Parquet
    pandas metadata cannot be parsed back by ``pd.read_parquet``; plain object columns round-trip.)
    """
    if not isinstance(lists, pa.Array | pa.ChunkedArray):
        lists = pa.array(list(lists), type=LIST_OF_STRINGS)
    return pd.Series(lists.to_pandas().to_numpy(dtype=object), index=index, dtype=object)


# ----------------------------------------------------------------------------- tables

def empty_behaviors(user_dtype: str, item_dtype: str) -> pd.DataFrame:
    """A behaviors table with no rows and the contract's column types."""
    return pd.DataFrame({
        "user_id": pd.Series([], dtype=user_dtype),
        "item_id": pd.Series([], dtype=item_dtype),
        "timestamp": pd.Series([], dtype="int64"),
        "action": pd.Series([], dtype="str"),
    })


def check_spec(tables: dict[str, pd.DataFrame], spec: dict) -> None:
    """Every non-reserved column of every table must have a declared feature type in ``spec``."""
    declared = spec.get("features", {})
    for name, df in tables.items():
        for col in df.columns:
            if col not in RESERVED[name] and col not in declared:
                raise ValueError(f"{name}: column '{col}' has no feature type in the dataset spec")
    for g in spec.get("gate", []):
        if g not in declared:
            raise ValueError(f"gate feature '{g}' is not a declared feature")


def finish(out: Path | str, tables: dict[str, pd.DataFrame], spec: dict, source: str, started: float,
           notes: Sequence[str] = ()) -> ValidationReport:
    """Check the spec, write the dataset atomically (validated), and print a one-paragraph summary."""
    check_spec(tables, spec)
    report = write_dataset(out, tables, spec)
    imp = tables[IMPRESSIONS]
    lines = [f"[{source}] wrote {out}: {len(tables[REQUESTS]):,} requests, {len(imp):,} impressions "
             f"({int(imp['click'].sum()):,} clicks), {len(tables[BEHAVIORS]):,} behaviours, "
             f"tables {', '.join(report.tables)} in {time.perf_counter() - started:.1f}s"]
    lines += [f"[{source}]   {n}" for n in notes]
    lines += [f"[{source}]   warning: {w}" for w in report.warnings]
    print("\n".join(lines), file=sys.stderr)
    return report


def progress(iterable: Iterable, desc: str, total: int | None = None) -> Iterator:
    """A tqdm progress bar on stderr, silent when stderr is not a terminal."""
    return iter(tqdm(iterable, desc=desc, total=total, disable=None, file=sys.stderr, leave=False))


def seeded_rng(seed: int, *salt: int) -> np.random.Generator:
    """A numpy Generator for ``seed``; ``salt`` separates independent streams of one converter."""
    return np.random.default_rng([seed, *salt])


def shuffle_within_groups(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permutation that sorts rows by ``groups`` (stable groups) and shuffles rows inside each group."""
    return np.lexsort((rng.random(len(groups)), groups))


def rank_within_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """0-based rank of each row inside its group, for rows already sorted by group."""
    n = len(sorted_groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = sorted_groups[1:] != sorted_groups[:-1]
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, n))
    return np.arange(n, dtype=np.int64) - np.repeat(starts, counts)

"""The canonical search-log format: table contracts, validation, and atomic writing.

A dataset is a directory of Parquet tables (see README "Data format"). Every loader calls
:func:`validate_dataset`, so a bad file fails early with the file, column and an offending row
named, instead of silently producing empty histories or wrong labels later.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REQUESTS = "requests.parquet"
IMPRESSIONS = "impressions.parquet"
BEHAVIORS = "behaviors.parquet"
ITEMS = "items.parquet"
USERS = "users.parquet"
SPEC = "dataset.yaml"

REQUIRED_TABLES = (REQUESTS, IMPRESSIONS, BEHAVIORS)
OPTIONAL_TABLES = (ITEMS, USERS)

# Columns with a meaning in the contract; every other column of a table is a feature.
RESERVED = {
    REQUESTS: ("request_id", "user_id", "timestamp", "query", "split"),
    IMPRESSIONS: ("request_id", "item_id", "position", "click", "purchase"),
    BEHAVIORS: ("user_id", "item_id", "timestamp", "action", "query"),
    ITEMS: ("item_id",),
    USERS: ("user_id",),
}
REQUIRED_COLUMNS = {
    REQUESTS: ("request_id", "user_id", "timestamp", "query"),
    IMPRESSIONS: ("request_id", "item_id", "click"),
    BEHAVIORS: ("user_id", "item_id", "timestamp", "action"),
    ITEMS: ("item_id",),
    USERS: ("user_id",),
}
# Which role the extra columns of each table play.
TABLE_ROLE = {REQUESTS: "context", IMPRESSIONS: "candidate", BEHAVIORS: "behavior", ITEMS: "item", USERS: "user"}
SPLITS = ("train", "valid", "test")
FEATURE_TYPES = ("categorical", "numeric", "list", "text", "ignore")
# Ground-truth columns of simulated data: never features, used for the oracle ceiling.
ORACLE_COLUMNS = ("true_ctr", "true_cvr")


class DatasetError(ValueError):
    """A dataset breaks the format contract. The message names file, column and a row."""

    def __init__(self, file: str, message: str, column: str | None = None, row: int | None = None,
                 value: object = None):
        where = file
        if column is not None:
            where += f", column '{column}'"
        if row is not None:
            where += f", row {row}"
            if value is not None:
                where += f" (value {value!r})"
        super().__init__(f"{where}: {message}")
        self.file, self.column, self.row = file, column, row


@dataclass
class ValidationReport:
    path: Path
    n_requests: int
    n_impressions: int
    n_behaviors: int
    tables: list[str]
    has_split: bool
    has_purchase: bool
    warnings: list[str] = field(default_factory=list)


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_type(file: str, table: pa.Table, column: str, kinds: tuple[str, ...]) -> None:
    t = table.schema.field(column).type
    ok = ("int" in kinds and _is_int(t)) or ("str" in kinds and _is_str(t))
    if not ok:
        want = " or ".join({"int": "int64", "str": "string"}[k] for k in kinds)
        raise DatasetError(file, f"has type {t}, expected {want}", column)


def _check_not_null(file: str, df: pd.DataFrame, column: str) -> None:
    nulls = df[column].isna().to_numpy()
    if nulls.any():
        raise DatasetError(file, "null value (not allowed)", column, _first_row(nulls))


def _check_binary(file: str, df: pd.DataFrame, column: str, allow_null: bool) -> None:
    s = df[column]
    nulls = s.isna().to_numpy()
    if nulls.any() and not allow_null:
        raise DatasetError(file, "null label (labels must be 0 or 1)", column, _first_row(nulls))
    vals = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    bad = ~nulls & ~np.isin(vals, (0.0, 1.0))
    if bad.any():
        r = _first_row(bad)
        raise DatasetError(file, "label must be 0 or 1", column, r, s.iloc[r])


def _check_unique(file: str, df: pd.DataFrame, column: str) -> None:
    dup = df[column].duplicated().to_numpy()
    if dup.any():
        r = _first_row(dup)
        raise DatasetError(file, "duplicate key", column, r, df[column].iloc[r])


def read_table(path: Path, name: str) -> pa.Table:
    f = path / name
    try:
        return pq.read_table(f)
    except Exception as e:  # pyarrow raises several types for corrupt/non-parquet files
        raise DatasetError(name, f"cannot be read as Parquet ({type(e).__name__}: {e})") from e


def load_spec(path: Path) -> dict:
    f = path / SPEC
    if not f.exists():
        return {}
    try:
        spec = yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as e:
        raise DatasetError(SPEC, f"is not valid YAML: {e}") from e
    if not isinstance(spec, dict):
        raise DatasetError(SPEC, "must be a mapping with keys 'features' and/or 'gate'")
    feats = spec.get("features", {}) or {}
    if not isinstance(feats, dict):
        raise DatasetError(SPEC, "'features' must map feature name -> {type: ..., role: ...}")
    for name, decl in feats.items():
        if isinstance(decl, str):
            decl = {"type": decl}
            feats[name] = decl
        if decl.get("type") not in FEATURE_TYPES:
            raise DatasetError(SPEC, f"feature '{name}': type must be one of {FEATURE_TYPES}, got {decl.get('type')!r}")
    spec["features"] = feats
    return spec


def read_tables(path: str | os.PathLike) -> dict[str, pa.Table]:
    """Every table of the dataset that exists, read once (callers validate, then convert)."""
    path = Path(path)
    return {n: read_table(path, n) for n in REQUIRED_TABLES + OPTIONAL_TABLES if (path / n).exists()}


def validate_dataset(path: str | os.PathLike, tables: dict[str, pa.Table] | None = None) -> ValidationReport:
    """Check every rule of the format; raise :class:`DatasetError` on the first violation.

    ``tables`` (from :func:`read_tables`) avoids reading the files a second time.
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(str(path), "dataset directory does not exist")
    for name in REQUIRED_TABLES:
        if not (path / name).exists():
            raise DatasetError(name, f"required table missing from {path}")
    load_spec(path)
    if tables is None:
        tables = read_tables(path)
    for name, tab in tables.items():
        for col in REQUIRED_COLUMNS[name]:
            if col not in tab.column_names:
                raise DatasetError(name, f"required column missing (has: {', '.join(tab.column_names)})", col)

    req_t, imp_t, beh_t = tables[REQUESTS], tables[IMPRESSIONS], tables[BEHAVIORS]
    warnings: list[str] = []

    # requests
    _check_type(REQUESTS, req_t, "request_id", ("int",))
    _check_type(REQUESTS, req_t, "user_id", ("int", "str"))
    _check_type(REQUESTS, req_t, "timestamp", ("int",))
    _check_type(REQUESTS, req_t, "query", ("str",))
    req = req_t.select([c for c in ("request_id", "user_id", "timestamp", "split") if c in req_t.column_names]).to_pandas()
    for c in ("request_id", "user_id", "timestamp"):
        _check_not_null(REQUESTS, req, c)
    _check_unique(REQUESTS, req, "request_id")
    if "split" in req.columns:
        _check_type(REQUESTS, req_t, "split", ("str",))
        bad = ~req["split"].isin(SPLITS).to_numpy()
        if bad.any():
            r = _first_row(bad)
            raise DatasetError(REQUESTS, f"split must be one of {SPLITS}", "split", r, req["split"].iloc[r])

    # impressions
    _check_type(IMPRESSIONS, imp_t, "request_id", ("int",))
    _check_type(IMPRESSIONS, imp_t, "item_id", ("int", "str"))
    cols = [c for c in ("request_id", "item_id", "position", "click", "purchase") if c in imp_t.column_names]
    imp = imp_t.select(cols).to_pandas()
    _check_not_null(IMPRESSIONS, imp, "request_id")
    _check_not_null(IMPRESSIONS, imp, "item_id")
    _check_binary(IMPRESSIONS, imp, "click", allow_null=False)
    if "purchase" in imp.columns:
        _check_binary(IMPRESSIONS, imp, "purchase", allow_null=True)
    if "position" in imp.columns:
        _check_type(IMPRESSIONS, imp_t, "position", ("int",))
    unknown = ~imp["request_id"].isin(req["request_id"]).to_numpy()
    if unknown.any():
        r = _first_row(unknown)
        raise DatasetError(IMPRESSIONS, "impression of an unknown request (not in requests.parquet)",
                           "request_id", r, imp["request_id"].iloc[r])
    no_imp = ~req["request_id"].isin(imp["request_id"]).to_numpy()
    if no_imp.any():
        warnings.append(f"{int(no_imp.sum())} requests have no impressions (ignored in training)")

    # behaviors
    _check_type(BEHAVIORS, beh_t, "user_id", ("int", "str"))
    _check_type(BEHAVIORS, beh_t, "item_id", ("int", "str"))
    _check_type(BEHAVIORS, beh_t, "timestamp", ("int",))
    _check_type(BEHAVIORS, beh_t, "action", ("str",))
    if "query" in beh_t.column_names:
        _check_type(BEHAVIORS, beh_t, "query", ("str",))
    beh = beh_t.select(["user_id", "item_id", "timestamp", "action"]).to_pandas()
    for c in ("user_id", "item_id", "timestamp", "action"):
        _check_not_null(BEHAVIORS, beh, c)

    # cross-table key types: a string user_id in one table and int in another joins to nothing.
    def kind(t: pa.Table, c: str) -> str:
        return "int" if _is_int(t.schema.field(c).type) else "str"

    if len(beh) and kind(beh_t, "user_id") != kind(req_t, "user_id"):
        raise DatasetError(BEHAVIORS, f"user_id is {kind(beh_t, 'user_id')} but requests.parquet user_id is "
                           f"{kind(req_t, 'user_id')}: the tables would not join", "user_id")
    if len(beh) and kind(beh_t, "item_id") != kind(imp_t, "item_id"):
        raise DatasetError(BEHAVIORS, f"item_id is {kind(beh_t, 'item_id')} but impressions.parquet item_id is "
                           f"{kind(imp_t, 'item_id')}: the tables would not join", "item_id")
    for name, key, other, other_name in ((ITEMS, "item_id", imp_t, IMPRESSIONS), (USERS, "user_id", req_t, REQUESTS)):
        if name in tables:
            t = tables[name]
            _check_type(name, t, key, ("int", "str"))
            if kind(t, key) != kind(other, key):
                raise DatasetError(name, f"{key} is {kind(t, key)} but {other_name} {key} is {kind(other, key)}", key)
            df = t.select([key]).to_pandas()
            _check_not_null(name, df, key)
            _check_unique(name, df, key)

    return ValidationReport(
        path=path, n_requests=len(req), n_impressions=len(imp), n_behaviors=len(beh), tables=sorted(tables),
        has_split="split" in req.columns,
        has_purchase="purchase" in imp.columns and bool(imp["purchase"].notna().any()), warnings=warnings,
    )


@contextmanager
def atomic_dataset_dir(out: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success validate it and rename it to ``out``.

    A failure at any point (bad data, full disk, Ctrl-C) leaves no half-written dataset behind and
    an existing dataset at ``out`` untouched. Writers that stream chunks use this directly.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        validate_dataset(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_dataset(out: str | os.PathLike, tables: dict[str, pd.DataFrame], spec: dict | None = None,
                  overwrite: bool = True) -> ValidationReport:
    """Write in-memory tables (+ optional dataset.yaml spec) as a validated dataset, atomically."""
    with atomic_dataset_dir(out, overwrite) as tmp:
        for name, df in tables.items():
            if name not in REQUIRED_TABLES + OPTIONAL_TABLES:
                raise ValueError(f"unknown table {name}; expected one of {REQUIRED_TABLES + OPTIONAL_TABLES}")
            df.to_parquet(tmp / name, index=False)
        if spec:
            (tmp / SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))
    return validate_dataset(out)

"""The canonical search-log format: table contracts, validation, and atomic writing.

A dataset is a directory of Parquet tables (see README "Data format"). Every loader calls
:func:`validate_dataset`, so a bad file fails early with the file, column and an offending row
named, and a fix, instead of silently producing empty histories, leaked labels or wrong features
later. What can only be a mistake raises :class:`DatasetError`; what is merely suspicious becomes a
warning of the report (README "Validation" lists both).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from qdrank.data.features import ROLES
from qdrank.utils.io import replace_dir

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
ORACLE_COLUMNS = ("true_ctr", "true_cvr", "true_rel")
# Keys of dataset.yaml and of one feature declaration; anything else is a typo and an error.
SPEC_KEYS = ("features", "gate", "category")
FEATURE_KEYS = ("type", "role")
# Longest string id (user_id, item_id, action) and feature name that serving accepts: the one
# definition, read by qdrank.serving. A longer id in the data could never be served.
MAX_ID_CHARS = 256
# |timestamp| in unix seconds that serving accepts (about year 36,800): a timestamp in ms is beyond.
TS_LIMIT = 2**40
# Positions are 0-based ranks; anything above this is a unit or join mistake.
MAX_POSITION_VALUE = 10**6
# A numeric feature value this large is a sentinel (e.g. -1e300 for "missing") or a unit mistake.
MAX_NUMERIC_VALUE = 1e15


class DatasetError(ValueError):
    """A dataset breaks the format contract. The message names file, column and a row, and how to fix it."""

    def __init__(self, file: str, message: str, column: str | None = None, row: int | None = None,
                 value: object = None, hint: str | None = None):
        super().__init__(_where(file, column, row, value) + f": {message}" + (f"; fix: {hint}" if hint else ""))
        self.file, self.column, self.row = file, column, row


def _where(file: str, column: str | None = None, row: int | None = None, value: object = None) -> str:
    where = file
    if column is not None:
        where += f", column '{column}'"
    if row is not None:
        where += f", row {row}"
        if value is not None:
            r = repr(value.item() if isinstance(value, np.generic) else value)
            where += f" (value {r[:60] + '...' if len(r) > 60 else r})"
    return where


def _warning(file: str, message: str, column: str | None = None, row: int | None = None, value: object = None,
             hint: str | None = None) -> str:
    return _where(file, column, row, value) + f": {message}" + (f"; fix: {hint}" if hint else "")


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
    if pa.types.is_dictionary(t):
        return _is_str(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _kind(t: pa.DataType) -> str:
    """Coarse kind of an Arrow type: float, int, bool, str, list, binary, null or other."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_boolean(t):
        return "bool"
    if _is_str(t):
        return "str"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "list"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_null(t):
        return "null"
    return "other"


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


_TYPE_HINT = {
    "timestamp": "store unix seconds as int64, e.g. (df['timestamp'] - pd.Timestamp(0)) // pd.Timedelta('1s')",
    "position": "store int64; with missing positions use pandas' nullable dtype: df['position'].astype('Int64')",
}


def _check_type(file: str, table: pa.Table, column: str, kinds: tuple[str, ...]) -> None:
    t = table.schema.field(column).type
    ok = ("int" in kinds and _is_int(t)) or ("str" in kinds and _is_str(t))
    if not ok:
        want = " or ".join({"int": "int64", "str": "string"}[k] for k in kinds)
        raise DatasetError(file, f"has type {t}, expected {want}", column, hint=_TYPE_HINT.get(column))


def _check_not_null(file: str, df: pd.DataFrame, column: str) -> None:
    nulls = df[column].isna().to_numpy()
    if nulls.any():
        raise DatasetError(file, "null value (not allowed)", column, _first_row(nulls))


def _check_binary(file: str, table: pa.Table, df: pd.DataFrame, column: str, allow_null: bool) -> None:
    t = table.schema.field(column).type
    if _kind(t) not in ("int", "float", "bool", "null"):
        nn = df[column].notna().to_numpy()
        r = _first_row(nn) if nn.any() else None
        raise DatasetError(file, f"labels stored as {t}, expected integers 0/1", column, r,
                           None if r is None else df[column].iloc[r], hint=f"cast with df['{column}'].astype('int8')")
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


def _check_id_strings(file: str, table: pa.Table, column: str) -> None:
    """String ids (and actions) must be servable: 1..MAX_ID_CHARS characters."""
    if not _is_str(table.schema.field(column).type) or table.num_rows == 0:
        return
    col = table.column(column)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    n = pc.utf8_length(col).to_numpy(zero_copy_only=False)
    n = np.nan_to_num(n.astype(float), nan=1.0)
    bad = (n > MAX_ID_CHARS) | (n == 0)
    if bad.any():
        r = _first_row(bad)
        v = col[r].as_py()
        what = "empty string" if v == "" else f"{len(v)} characters, longer than the {MAX_ID_CHARS} serving accepts"
        raise DatasetError(file, f"{what} (serving could never accept this {column})", column, r, v,
                           hint="map long keys to short ones (e.g. a hash) in every table alike" if v
                           else "use null-free, non-empty keys")


def read_table(path: Path, name: str) -> pa.Table:
    f = path / name
    try:
        return pq.read_table(f)
    except Exception as e:  # pyarrow raises several types for corrupt/non-parquet files
        raise DatasetError(name, f"cannot be read as Parquet ({type(e).__name__}: {e})") from e


def _unknown_keys(given, valid: tuple[str, ...], where: str) -> None:
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise DatasetError(SPEC, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                           f"{' in ' + where if where else ''}; valid keys: {', '.join(valid)}",
                           hint="fix the spelling (an unknown key would be ignored silently)")


def load_spec(path: Path) -> dict:
    """Parse dataset.yaml and check its keys and types (names are checked against the tables by
    :func:`check_spec`). Unknown keys are errors, as for ``--set``: a typo must not be ignored."""
    f = path / SPEC
    if not f.exists():
        return {}
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(SPEC, f"cannot be read ({type(e).__name__}: {e})", hint="write it as a UTF-8 YAML file") from e
    try:
        spec = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise DatasetError(SPEC, f"is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(spec, dict):
        raise DatasetError(SPEC, f"must be a mapping with keys {', '.join(SPEC_KEYS)}")
    _unknown_keys(spec, SPEC_KEYS, "")
    feats = spec.get("features", {}) or {}
    if not isinstance(feats, dict):
        raise DatasetError(SPEC, "'features' must map feature name -> {type: ..., role: ...}")
    for name, decl in feats.items():
        if isinstance(decl, str):
            decl = {"type": decl}
            feats[name] = decl
        if not isinstance(decl, dict):
            raise DatasetError(SPEC, f"feature '{name}': expected a type name or {{type: ..., role: ...}}, got {decl!r}")
        _unknown_keys(decl, FEATURE_KEYS, f"feature '{name}'")
        if decl.get("type") not in FEATURE_TYPES:
            raise DatasetError(SPEC, f"feature '{name}': type must be one of {FEATURE_TYPES}, got {decl.get('type')!r}")
        if "role" in decl and decl["role"] not in ROLES:
            raise DatasetError(SPEC, f"feature '{name}': role must be one of {ROLES}, got {decl['role']!r}")
    spec["features"] = feats
    gate = spec.get("gate")
    if gate is not None and not (isinstance(gate, list) and all(isinstance(g, str) for g in gate)):
        raise DatasetError(SPEC, f"'gate' must be a list of feature names, got {gate!r}")
    cat = spec.get("category")
    if cat is not None and not isinstance(cat, str):
        raise DatasetError(SPEC, f"'category' must be the name of an item feature, got {cat!r}")
    return spec


def feature_roles(columns: dict[str, list[str]], spec: dict) -> dict[str, tuple[str, str, str]]:
    """Feature name -> (table, role, declared type or '') as the feature map will build it (ids
    included, ``ignore``-d and reserved columns excluded). ``columns``: table -> column names."""
    declared = spec.get("features", {})
    out = {"user_id": (USERS, "user", ""), "item_id": (ITEMS, "item", ""), "action": (BEHAVIORS, "behavior", "")}
    for table in REQUIRED_TABLES + OPTIONAL_TABLES:
        for col in columns.get(table, ()):
            if col in RESERVED[table] or col in ORACLE_COLUMNS:
                continue
            decl = declared.get(col, {})
            if decl.get("type") == "ignore":
                continue
            if col in out:
                raise DatasetError(table, f"feature name '{col}' is used by two tables ({out[col][0]} too)", col,
                                   hint="rename one of them")
            out[col] = (table, decl.get("role", TABLE_ROLE[table]), decl.get("type", ""))
    return out


def check_spec(spec: dict, columns: dict[str, list[str]]) -> None:
    """Every name in dataset.yaml must exist in the tables: declared features, gate, category."""
    reserved = {c: t for t in columns for c in RESERVED[t] if c in columns[t]}
    present = {c for cols in columns.values() for c in cols}
    for name in spec.get("features", {}):
        if name in reserved and name not in ("user_id", "item_id", "action"):
            raise DatasetError(SPEC, f"feature '{name}' is a reserved column of {reserved[name]}, not a feature",
                               hint=f"remove '{name}' from features")
        if name not in present:
            raise DatasetError(SPEC, f"feature '{name}' is declared but no table has a column '{name}'",
                               hint="fix the name or remove the declaration")
    feats = feature_roles(columns, spec)
    unknown = [g for g in spec.get("gate") or [] if g not in feats]
    if unknown:
        raise DatasetError(SPEC, f"gate names unknown features {unknown}; known: {sorted(feats)}")
    cat = spec.get("category")
    if cat is not None:
        item_feats = sorted(n for n, (_, role, _t) in feats.items() if role == "item")
        if cat not in feats or feats[cat][1] != "item":
            raise DatasetError(SPEC, f"category {cat!r} is not an item feature; item features: {item_feats}",
                               hint="name a column of items.parquet (or a feature declared with role: item)")
        if feats[cat][2] not in ("", "categorical", "list"):
            raise DatasetError(SPEC, f"category {cat!r} has type {feats[cat][2]}, expected categorical or list")


def read_tables(path: str | os.PathLike) -> dict[str, pa.Table]:
    """Every table of the dataset that exists, read once (callers validate, then convert)."""
    path = Path(path)
    return {n: read_table(path, n) for n in REQUIRED_TABLES + OPTIONAL_TABLES if (path / n).exists()}


def validate_dataset(path: str | os.PathLike, tables: dict[str, pa.Table] | None = None,
                     split: tuple[float, float, float] | None = None) -> ValidationReport:
    """Check every rule of the format; raise :class:`DatasetError` on the first violation and
    collect warnings for what is suspicious (see README "Validation" for the list).

    ``tables`` (from :func:`read_tables`) avoids reading the files a second time; ``split`` are
    the time-split fractions used to check that no split is empty (default: ``DataConfig``'s).
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(str(path), "dataset directory does not exist")
    for name in REQUIRED_TABLES:
        if not (path / name).exists():
            raise DatasetError(name, f"required table missing from {path}")
    spec = load_spec(path)
    if tables is None:
        tables = read_tables(path)
    for name, tab in tables.items():
        for col in REQUIRED_COLUMNS[name]:
            if col not in tab.column_names:
                raise DatasetError(name, f"required column missing (has: {', '.join(tab.column_names)})", col)
    columns = {n: t.column_names for n, t in tables.items()}
    check_spec(spec, columns)

    req_t, imp_t, beh_t = tables[REQUESTS], tables[IMPRESSIONS], tables[BEHAVIORS]
    warnings: list[str] = []

    # requests
    if req_t.num_rows == 0:
        raise DatasetError(REQUESTS, "has no rows", hint="write at least the requests of the train/valid/test period")
    _check_type(REQUESTS, req_t, "request_id", ("int",))
    _check_type(REQUESTS, req_t, "user_id", ("int", "str"))
    _check_type(REQUESTS, req_t, "timestamp", ("int",))
    _check_type(REQUESTS, req_t, "query", ("str",))
    req = req_t.select([c for c in ("request_id", "user_id", "timestamp", "split") if c in req_t.column_names]).to_pandas()
    for c in ("request_id", "user_id", "timestamp"):
        _check_not_null(REQUESTS, req, c)
    _check_unique(REQUESTS, req, "request_id")
    _check_id_strings(REQUESTS, req_t, "user_id")
    if "split" in req.columns:
        _check_type(REQUESTS, req_t, "split", ("str",))
        bad = ~req["split"].isin(SPLITS).to_numpy()
        if bad.any():
            r = _first_row(bad)
            raise DatasetError(REQUESTS, f"split must be one of {SPLITS}", "split", r, req["split"].iloc[r])

    # impressions
    if imp_t.num_rows == 0:
        raise DatasetError(IMPRESSIONS, "has no rows: nothing to train or evaluate on",
                           hint="write one row per candidate shown in each request")
    _check_type(IMPRESSIONS, imp_t, "request_id", ("int",))
    _check_type(IMPRESSIONS, imp_t, "item_id", ("int", "str"))
    cols = [c for c in ("request_id", "item_id", "position", "click", "purchase") if c in imp_t.column_names]
    imp = imp_t.select(cols).to_pandas()
    _check_not_null(IMPRESSIONS, imp, "request_id")
    _check_not_null(IMPRESSIONS, imp, "item_id")
    _check_id_strings(IMPRESSIONS, imp_t, "item_id")
    _check_binary(IMPRESSIONS, imp_t, imp, "click", allow_null=False)
    click = imp["click"].to_numpy(dtype=np.float64)
    if "purchase" in imp.columns:
        _check_binary(IMPRESSIONS, imp_t, imp, "purchase", allow_null=True)
        bought = (imp["purchase"].to_numpy(dtype=np.float64, na_value=0.0) == 1) & (click == 0)
        if bought.any():
            raise DatasetError(IMPRESSIONS, f"purchase 1 on an impression with click 0 ({int(bought.sum())} such rows): "
                               "purchase is post-click conversion, so it would be ignored", "purchase",
                               _first_row(bought), hint="set click=1 on purchased impressions (or purchase=null)")
    if not (click == 1).any() or not (click == 0).any():
        raise DatasetError(IMPRESSIONS, f"every impression has click={int(click[0])}: nothing to learn",
                           "click", hint="write the shown-but-not-clicked candidates too" if click[0] == 1
                           else "check the label join (clicks are missing)")
    if "position" in imp.columns:
        _check_type(IMPRESSIONS, imp_t, "position", ("int",))
        pos = imp["position"].to_numpy(dtype=np.float64, na_value=0.0)
        for bad, what in ((pos < 0, "negative"), (pos > MAX_POSITION_VALUE, f"larger than {MAX_POSITION_VALUE:,}")):
            if bad.any():
                r = _first_row(bad)
                raise DatasetError(IMPRESSIONS, f"position {what}: positions are 0-based ranks in the result list",
                                   "position", r, imp["position"].iloc[r],
                                   hint="write the rank (0 = top) or null when unknown")
    unknown = ~imp["request_id"].isin(req["request_id"]).to_numpy()
    if unknown.any():
        r = _first_row(unknown)
        raise DatasetError(IMPRESSIONS, "impression of an unknown request (not in requests.parquet)",
                           "request_id", r, imp["request_id"].iloc[r])
    has_imp = req["request_id"].isin(imp["request_id"]).to_numpy()
    if not has_imp.all():
        warnings.append(_warning(REQUESTS, f"{int((~has_imp).sum())} requests have no impressions (ignored in "
                                 "training)", "request_id", _first_row(~has_imp), req["request_id"].iloc[_first_row(~has_imp)]))
    (rc, _), (ic, items) = pd.factorize(imp["request_id"]), pd.factorize(imp["item_id"])
    pair = np.sort(rc.astype(np.int64) * len(items) + ic)  # one int per pair: sorting beats hashing here
    if (pair[1:] == pair[:-1]).any():
        dup = imp.duplicated(["request_id", "item_id"]).to_numpy()
        r = _first_row(dup)
        warnings.append(_warning(IMPRESSIONS, f"{int(dup.sum())} impressions repeat an item already shown in the "
                                 "same request", "item_id", r, imp["item_id"].iloc[r],
                                 hint="keep one row per (request_id, item_id)"))

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
    for c in ("user_id", "item_id", "action"):
        _check_id_strings(BEHAVIORS, beh_t, c)

    # cross-table key types: a string user_id in one table and int in another joins to nothing.
    def kind(t: pa.Table, c: str) -> str:
        return "int" if _is_int(t.schema.field(c).type) else "str"

    if len(beh) and kind(beh_t, "user_id") != kind(req_t, "user_id"):
        raise DatasetError(BEHAVIORS, f"user_id is {kind(beh_t, 'user_id')} but requests.parquet user_id is "
                           f"{kind(req_t, 'user_id')}: the tables would not join", "user_id")
    if len(beh) and kind(beh_t, "item_id") != kind(imp_t, "item_id"):
        raise DatasetError(BEHAVIORS, f"item_id is {kind(beh_t, 'item_id')} but impressions.parquet item_id is "
                           f"{kind(imp_t, 'item_id')}: the tables would not join", "item_id")
    if len(beh):
        _warn_no_overlap(warnings, BEHAVIORS, beh_t.column("user_id"), REQUESTS, req_t.column("user_id"), "user_id",
                         "no request has a history")
    for name, key, other, other_name in ((ITEMS, "item_id", imp_t, IMPRESSIONS), (USERS, "user_id", req_t, REQUESTS)):
        if name in tables:
            t = tables[name]
            _check_type(name, t, key, ("int", "str"))
            if kind(t, key) != kind(other, key):
                raise DatasetError(name, f"{key} is {kind(t, key)} but {other_name} {key} is {kind(other, key)}", key)
            df = t.select([key]).to_pandas()
            _check_not_null(name, df, key)
            _check_unique(name, df, key)
            _check_id_strings(name, t, key)
            if len(df):
                _warn_no_overlap(warnings, name, t.column(key), other_name, other.column(key),
                                 key, "its features never reach a candidate" if name == ITEMS
                                 else "its profiles never reach a request")

    _check_timestamps(req["timestamp"].to_numpy(dtype=np.int64), beh["timestamp"].to_numpy(dtype=np.int64), warnings)
    labels = {"click": click}
    if "purchase" in imp.columns:
        labels["purchase"] = imp["purchase"].to_numpy(dtype=np.float64, na_value=0.0)
    _check_features(tables, spec, labels, warnings)
    _check_splits(req, imp, has_imp, click, split, warnings)

    return ValidationReport(
        path=path, n_requests=len(req), n_impressions=len(imp), n_behaviors=len(beh), tables=sorted(tables),
        has_split="split" in req.columns,
        has_purchase="purchase" in imp.columns and bool(imp["purchase"].notna().any()), warnings=warnings,
    )


def _warn_no_overlap(warnings: list[str], file: str, keys: pa.ChunkedArray, other_file: str,
                     other: pa.ChunkedArray, column: str, consequence: str) -> None:
    """Keys of two tables that share no value at all: formatted differently (e.g. 'u1' vs '1')."""
    a, b = pc.unique(keys).cast(pa.string()), pc.unique(other).cast(pa.string())
    if not pc.any(pc.is_in(a, value_set=b)).as_py():
        warnings.append(_warning(file, f"no value matches a {column} of {other_file}: {consequence}", column, 0,
                                 keys[0].as_py(), hint=f"write {column} the same way in both tables"))


def _year(ts: float) -> str:
    return f"year {1970 + ts / 31_556_952:.0f}"


def _check_timestamps(req_ts: np.ndarray, beh_ts: np.ndarray, warnings: list[str]) -> None:
    """Units (seconds everywhere), range (what serving accepts) and alignment of the two clocks."""
    tables = [(REQUESTS, req_ts)] + ([(BEHAVIORS, beh_ts)] if len(beh_ts) else [])
    if len(tables) == 2:
        (fa, a), (fb, b) = tables
        ma, mb = abs(float(np.median(a))), abs(float(np.median(b)))
        ratio = max(ma, mb) / max(min(ma, mb), 1.0)
        overlap = a.min() <= b.max() and b.min() <= a.max()
        if ratio >= 300 and not overlap:
            big, small = (fa, fb) if ma > mb else (fb, fa)
            raise DatasetError(big, f"timestamps are ~{10 ** round(np.log10(ratio)):,}x larger than those of {small} "
                               f"(median {max(ma, mb):.3g} vs {min(ma, mb):.3g}): the tables use different time "
                               "units (ms vs s?), so histories would take future behaviours (a label leak)",
                               "timestamp", hint="convert both to unix seconds, e.g. "
                               "(df['t'] - pd.Timestamp(0)) // pd.Timedelta('1s')")
    for file, ts in tables:
        far = np.abs(ts) >= TS_LIMIT
        if far.any():
            r = _first_row(far)
            v = int(ts[r])
            unit = next((u for u, k in (("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9))
                         if abs(v) / k < TS_LIMIT), "no known unit")
            raise DatasetError(file, f"timestamp beyond {_year(TS_LIMIT)} (what serving accepts): looks like "
                               f"{unit}; the format is unix seconds", "timestamp", r, v,
                               hint=f"convert to seconds (divide by {1000 if unit == 'milliseconds' else 'the unit'})")
        future = ts > time.time() + 366 * 86400
        if future.any():
            r = int(np.argmax(ts))
            warnings.append(_warning(file, f"{int(future.sum())} timestamps lie more than a year in the future "
                                     f"(latest: {_year(float(ts[r]))})", "timestamp", r, int(ts[r]),
                                     hint="check the time unit and epoch (unix seconds)"))
    if len(beh_ts):
        late = beh_ts > req_ts.max()
        if late.mean() >= 0.05:
            warnings.append(_warning(BEHAVIORS, f"{int(late.sum()):,} of {len(beh_ts):,} behaviours "
                                     f"({late.mean():.0%}) are later than the last request: they never enter a "
                                     "history", "timestamp", _first_row(late), int(beh_ts[_first_row(late)]),
                                     hint="check that both tables use the same clock (unit, epoch, time zone)"))


def _check_features(tables: dict[str, pa.Table], spec: dict, labels: dict[str, np.ndarray], warnings: list[str]) -> None:
    """Each feature column holds what its (declared or inferred) type needs."""
    declared = spec.get("features", {})
    for table, tab in tables.items():
        for col in tab.column_names:
            if col in RESERVED[table] or col in ORACLE_COLUMNS:
                continue
            ftype = declared.get(col, {}).get("type", "")
            if ftype == "ignore":
                continue
            if len(col) > MAX_ID_CHARS:
                raise DatasetError(table, f"feature name longer than the {MAX_ID_CHARS} characters serving accepts",
                                   col[:40] + "...", hint="rename the column")
            t = tab.schema.field(col).type
            kind = _kind(t)
            how = "declared" if ftype else "inferred"
            ftype = ftype or {"float": "numeric", "list": "list"}.get(kind, "categorical")
            if tab.num_rows == 0:
                continue
            series = tab.column(col).to_pandas()
            nn = series.notna().to_numpy()
            if kind == "other" or (kind == "list" and _kind(t.value_type) in ("list", "other", "null")):
                raise DatasetError(table, f"unsupported type {t} for a feature", col,
                                   hint="convert it to numbers, strings or a list of strings, or declare it "
                                   "`type: ignore` in dataset.yaml")
            if ftype == "list" and kind not in ("list", "null"):
                r = _first_row(nn) if nn.any() else None
                raise DatasetError(table, f"declared a list feature but holds {t} values, not lists", col, r,
                                   None if r is None else series.iloc[r],
                                   hint=f"store a list<string> column, e.g. df['{col}'] = df['{col}'].str.split('|')")
            if ftype != "list" and kind == "list":
                raise DatasetError(table, f"{how} {ftype} but holds lists", col,
                                   hint=f"declare it `{col}: {{type: list}}` in dataset.yaml")
            if ftype == "numeric":
                _check_numeric(table, col, series, kind, warnings)
            if not nn.any():
                warnings.append(_warning(table, "holds no value (all null): the feature carries nothing", col,
                                         hint=f"fill it, or declare `{col}: {{type: ignore}}` in dataset.yaml"))
            elif table == IMPRESSIONS:
                _check_label_leak(col, series, nn, labels, warnings)


def _check_numeric(table: str, col: str, series: pd.Series, kind: str, warnings: list[str]) -> None:
    nn = series.notna().to_numpy()
    x = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    junk = nn & np.isnan(x)
    if junk.any():
        r = _first_row(junk)
        raise DatasetError(table, f"numeric feature holds non-numeric values ({int(junk.sum())} such rows)", col, r,
                           series.iloc[r], hint="clean the column (null for missing), or declare it categorical")
    inf = np.isinf(x)
    if inf.any():
        r = _first_row(inf)
        if not np.isfinite(x).any():
            raise DatasetError(table, "numeric feature has no finite value (all inf/null)", col, r, x[r],
                               hint="fix the computation that produced it, or declare it `type: ignore`")
        warnings.append(_warning(table, f"{int(inf.sum())} values are +/-inf (they are read as missing)", col, r, x[r],
                                 hint="write null for a missing value"))
    huge = np.isfinite(x) & (np.abs(x) >= MAX_NUMERIC_VALUE)
    if huge.any():
        r = _first_row(huge)
        warnings.append(_warning(table, f"{int(huge.sum())} values of magnitude >= {MAX_NUMERIC_VALUE:.0e} (a sentinel "
                                 "or unit mistake?): they swamp the standardisation of the others", col, r, x[r],
                                 hint="write null for a missing value, or rescale the column"))


def _check_label_leak(col: str, series: pd.Series, nn: np.ndarray, labels: dict[str, np.ndarray],
                      warnings: list[str]) -> None:
    """A candidate feature that is set only on clicked (purchased) rows, or recodes the label, leaks it."""
    hint = f"drop it, or declare `{col}: {{type: ignore}}` if it is not a feature"
    for label, y in labels.items():
        pos, neg = y == 1, y == 0
        if pos.sum() < 5 or neg.sum() < 5:
            continue
        done = "clicked" if label == "click" else "purchased"
        if nn.all() and not isinstance(series.iloc[0], list | tuple | np.ndarray):
            codes, uniq = pd.factorize(series)
            if len(uniq) <= 2 and all(np.ptp(y[codes == k]) == 0 for k in range(len(uniq))):
                warnings.append(_warning(IMPRESSIONS, f"the feature is a copy of the {label} label (each value occurs "
                                         f"with one {label} value only): the model would read the label", col, hint=hint))
                return
        elif (nn == pos).all() or (nn == neg).all():
            which = done if (nn == pos).all() else f"un{done}"
            warnings.append(_warning(IMPRESSIONS, f"the feature is set on {which} impressions only (a label-only "
                                     f"column, known only once {done}): the model would read the label", col, hint=hint))
            return


def _check_splits(req: pd.DataFrame, imp: pd.DataFrame, has_imp: np.ndarray, click: np.ndarray,
                  fractions: tuple[float, float, float] | None, warnings: list[str]) -> None:
    """Warn for an empty split, a single training request, and a split with only one label value."""
    codes, source = split_codes(req, fractions)
    counts = {s: int(((codes == i) & has_imp).sum()) for i, s in enumerate(SPLITS)}
    for s in SPLITS:
        if counts[s] == 0:
            warnings.append(_warning(REQUESTS, f"the {s} split is empty ({source}): `qdrank train` refuses to "
                                     "start", "split" if "split" in req.columns else "timestamp", hint=_split_hint(req)))
        elif s == "train" and counts[s] == 1:
            warnings.append(_warning(REQUESTS, f"the train split holds a single request ({source}): "
                                     "`qdrank train` refuses to start", hint=_split_hint(req)))
    imp_split = codes[pd.Index(req["request_id"]).get_indexer(imp["request_id"])]
    for i, s in enumerate(SPLITS):
        c = click[imp_split == i]
        if len(c) and (c.min() == c.max()):
            warnings.append(_warning(IMPRESSIONS, f"every impression of the {s} split has click={int(c[0])}: "
                                     "AUC is undefined there", "click"))


def split_codes(req: pd.DataFrame, fractions: tuple[float, float, float] | None) -> tuple[np.ndarray, str]:
    """Split code per request (0 train, 1 valid, 2 test) and where it comes from, as the loader does."""
    if "split" in req.columns:
        return req["split"].map({s: i for i, s in enumerate(SPLITS)}).to_numpy(dtype=np.int64), "from the split column"
    from qdrank.data.dataset import split_by_time  # the loader's rule; imported late (dataset imports schema)

    if fractions is None:
        from qdrank.config import DataConfig

        fractions = DataConfig().split
    ts = req["timestamp"].to_numpy(dtype=np.int64)
    return split_by_time(ts, fractions), (f"time split {'/'.join(f'{f:g}' for f in fractions)} of "
                                          f"{len(np.unique(ts)):,} distinct request timestamps")


def _split_hint(req: pd.DataFrame) -> str:
    if "split" in req.columns:
        return "assign requests with impressions to every split in the split column"
    return ("add a split column, change data.split, or add requests: a time split needs requests at several "
            "distinct timestamps")


def require_splits(req: pd.DataFrame, imp: pd.DataFrame, fractions: tuple[float, float, float] | None) -> None:
    """Training needs a non-empty train (2+ requests), valid (early stopping) and test split (the
    final report); called by the loader before fitting so `qdrank train` fails before any work."""
    codes, source = split_codes(req, fractions)
    has_imp = req["request_id"].isin(imp["request_id"]).to_numpy()
    for i, s in enumerate(SPLITS):
        n = int(((codes == i) & has_imp).sum())
        if n == 0 or (s == "train" and n < 2):
            raise DatasetError(REQUESTS, f"the {s} split holds {n} request{'' if n == 1 else 's'} with impressions "
                               f"({source}); training needs train (2+), valid and test",
                               "split" if "split" in req.columns else "timestamp", hint=_split_hint(req))


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
        replace_dir(tmp, out)
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

"""The canonical search-log format: table contracts, validation, and atomic writing.

A dataset is a directory of Parquet tables (see README "Data format"). Every loader calls
:func:`validate_dataset`, so a bad file fails early with the file, column and an offending row
named, and a fix, instead of silently producing empty histories, leaked labels or wrong features
later. What can only be a mistake raises :class:`DatasetError`; what is merely suspicious becomes a
warning of the report (README "Validation" lists both). Validation streams each table in batches
of rows and keeps only per-request, per-user and per-item state, so a 10M-impression log
validates in about the memory of a 1M one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
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
    BEHAVIORS: ("user_id", "item_id", "timestamp", "action", "query", "session"),
    ITEMS: ("item_id",),
    USERS: ("user_id",),
}
# behaviors.parquet's optional session id (int or string; null = unknown): it cuts histories into
# sessions (Batch.hist_session), never a feature (a test session is an id no training row has)
SESSION = "session"
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


# Rows per batch read by validation: its memory is a batch of the columns it reads plus per-request,
# per-user and per-item state, never a whole table.
BATCH_ROWS = 1 << 18


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _value_at(values: object, i: int) -> object:
    if isinstance(values, pd.Series):
        return values.iloc[i]
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values[i].as_py()
    return values[i]  # type: ignore[index]


class _Hit:
    """First offending row (with its value) and how many rows offend, accumulated over batches."""

    __slots__ = ("row", "value", "count")

    def __init__(self) -> None:
        self.row: int | None = None
        self.value: object = None
        self.count = 0

    def add(self, start: int, mask: np.ndarray, values: object = None) -> None:
        n = int(np.count_nonzero(mask))
        if n and self.row is None:
            i = _first_row(mask)
            self.row, self.value = start + i, None if values is None else _value_at(values, i)
        self.count += n

    def __bool__(self) -> bool:
        return self.count > 0


class _Table:
    """One table of a dataset, read in batches of rows: a Parquet file (row group by row group) or
    an Arrow table already in memory. Its schema and row count come from the file's metadata."""

    def __init__(self, name: str, source: Path | pa.Table):
        self.name = name
        self._table: pa.Table | None = source if isinstance(source, pa.Table) else None
        self._path = None if self._table is not None else Path(source)
        if self._table is None:
            with self._open() as f:
                self.schema, self.num_rows = f.schema_arrow, f.metadata.num_rows
        else:
            self.schema, self.num_rows = self._table.schema, self._table.num_rows
        self.column_names: list[str] = self.schema.names

    def _guard(self, read):
        try:
            return read()
        except Exception as e:  # pyarrow raises several types for corrupt/non-parquet files
            raise DatasetError(self.name, f"cannot be read as Parquet ({type(e).__name__}: {e})") from e

    def _open(self) -> pq.ParquetFile:
        # a reader holds its last row group's buffers: each pass opens (and closes) its own
        return self._guard(lambda: pq.ParquetFile(self._path))

    def type(self, column: str) -> pa.DataType:
        return self.schema.field(column).type

    def pandas_value(self, column: str, value: object, has_null: bool) -> object:
        """``value`` as the whole column's pandas form shows it (named in messages): an int column
        holding a null is float64 there, unless the file's pandas metadata makes it Int64."""
        field = self.schema.field(column)
        try:
            one = pa.table([pa.array([value] + [None] * has_null, field.type)],
                           schema=pa.schema([field], metadata=self.schema.metadata))
            return one.to_pandas()[column].iloc[0]
        except (pa.ArrowException, TypeError, ValueError, KeyError):
            return value

    def batches(self, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(index of its first row, batch) over ``columns``, in row order."""
        if self._table is not None:
            yield from _numbered(iter(self._table.select(columns).to_batches(max_chunksize=BATCH_ROWS)), lambda f: f())
            return
        with self._open() as f:
            it = self._guard(lambda: f.iter_batches(batch_size=BATCH_ROWS, columns=columns))
            yield from _numbered(it, self._guard)
            del it

    def read(self, columns: list[str]) -> pa.Table:
        """Whole columns: only for per-id keys (items, users) and the fallbacks that need them."""
        if self._table is not None:
            return self._table.select(columns)
        with self._open() as f:
            return self._guard(lambda: f.read(columns=columns))


def _numbered(it: Iterator[pa.RecordBatch], guard: Callable) -> Iterator[tuple[int, pa.RecordBatch]]:
    start = 0
    while (b := guard(lambda: next(it, None))) is not None:
        yield start, b
        start += b.num_rows


class _Uniques:
    """Distinct values of a column seen over batches (compacted as they come): per-id state."""

    def __init__(self) -> None:
        self._parts: list[pa.Array] = []
        self._n = 0

    def add(self, col: pa.Array) -> None:
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        u = pc.unique(col)
        self._parts.append(u)
        self._n += len(u)
        if len(self._parts) > 8 and self._n > 2 * len(self._parts[0]):
            self._parts = [self.values()]
            self._n = len(self._parts[0])

    def values(self) -> pa.Array:
        if not self._parts:
            return pa.array([], pa.string())
        if len(self._parts) == 1:
            return self._parts[0]
        return pc.unique(pa.chunked_array(self._parts).combine_chunks())


_TYPE_HINT = {
    "timestamp": "store unix seconds as int64, e.g. (df['timestamp'] - pd.Timestamp(0)) // pd.Timedelta('1s')",
    "position": "store int64; with missing positions use pandas' nullable dtype: df['position'].astype('Int64')",
    SESSION: "store int64 or string ids, null for an unknown session; integer ids with nulls: "
             "df['session'].astype('Int64')",
}


def _check_type(file: str, table: _Table | pa.Table, column: str, kinds: tuple[str, ...]) -> None:
    t = table.schema.field(column).type
    ok = ("int" in kinds and _is_int(t)) or ("str" in kinds and _is_str(t))
    if not ok:
        want = " or ".join({"int": "int64", "str": "string"}[k] for k in kinds)
        raise DatasetError(file, f"has type {t}, expected {want}", column, hint=_TYPE_HINT.get(column))


def _raise_null(file: str, column: str, hit: _Hit) -> None:
    if hit:
        raise DatasetError(file, "null value (not allowed)", column, hit.row)


def _nulls(col: pa.Array) -> np.ndarray:
    """Null mask as pandas sees it (NaN of a float column is null too)."""
    return pc.is_null(col, nan_is_null=True).to_numpy(zero_copy_only=False)


class _Labels:
    """A 0/1 label column (click, purchase) checked batch by batch, as one column would be."""

    def __init__(self, table: _Table, column: str, allow_null: bool):
        self.table, self.file, self.column, self.allow_null = table, table.name, column, allow_null
        self.type = table.type(column)
        self.numeric = _kind(self.type) in ("int", "float", "bool", "null")
        self.non_null, self.null, self.bad = _Hit(), _Hit(), _Hit()

    def add(self, start: int, col: pa.Array) -> np.ndarray:
        """Check a batch; its values as float (NaN for null or junk)."""
        s = col.to_pandas()
        nulls = s.isna().to_numpy()
        self.non_null.add(start, ~nulls, s)
        if not self.numeric:
            return np.full(len(s), np.nan)
        self.null.add(start, nulls)
        vals = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        self.bad.add(start, ~nulls & ~np.isin(vals, (0.0, 1.0)), s)
        return vals

    def check(self) -> None:
        if not self.numeric:
            r = self.non_null.row
            raise DatasetError(self.file, f"labels stored as {self.type}, expected integers 0/1", self.column, r,
                               self.non_null.value, hint=f"cast with df['{self.column}'].astype('int8')")
        if self.null and not self.allow_null:
            raise DatasetError(self.file, "null label (labels must be 0 or 1)", self.column, self.null.row)
        if self.bad:
            raise DatasetError(self.file, "label must be 0 or 1", self.column, self.bad.row,
                               self.table.pandas_value(self.column, self.bad.value, bool(self.null)))


def _check_unique(file: str, df: pd.DataFrame, column: str) -> None:
    dup = df[column].duplicated().to_numpy()
    if dup.any():
        r = _first_row(dup)
        raise DatasetError(file, "duplicate key", column, r, df[column].iloc[r])


class _IdStrings:
    """String ids (and actions) must be servable: 1..MAX_ID_CHARS characters."""

    def __init__(self, table: _Table | pa.Table, column: str):
        self.column, self.hit = column, _Hit()
        self.active = _is_str(table.schema.field(column).type)

    def add(self, start: int, col: pa.Array) -> None:
        if not self.active or len(col) == 0:
            return
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        n = np.nan_to_num(pc.utf8_length(col).to_numpy(zero_copy_only=False).astype(float), nan=1.0)
        self.hit.add(start, (n > MAX_ID_CHARS) | (n == 0), col)

    def check(self, file: str) -> None:
        if not self.hit:
            return
        v, column = self.hit.value, self.column
        what = "empty string" if v == "" else f"{len(v)} characters, longer than the {MAX_ID_CHARS} serving accepts"
        raise DatasetError(file, f"{what} (serving could never accept this {column})", column, self.hit.row, v,
                           hint="map long keys to short ones (e.g. a hash) in every table alike" if v
                           else "write null for an unknown session" if column == SESSION
                           else "use null-free, non-empty keys")


def _check_id_strings(file: str, table: pa.Table, column: str) -> None:
    ids = _IdStrings(table, column)
    ids.add(0, table.column(column).combine_chunks())
    ids.check(file)


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

    The tables are streamed in batches of :data:`BATCH_ROWS` rows, so memory is bounded by a batch
    plus per-request / per-user / per-item state (ids, timestamps, split codes), not by the log.
    ``tables`` (from :func:`read_tables`) validates tables already in memory instead of reading the
    files; ``split`` are the time-split fractions used to check that no split is empty (default:
    ``DataConfig``'s).
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(str(path), "dataset directory does not exist")
    for name in REQUIRED_TABLES:
        if not (path / name).exists():
            raise DatasetError(name, f"required table missing from {path}")
    spec = load_spec(path)
    if tables is None:
        src = {n: _Table(n, path / n) for n in REQUIRED_TABLES + OPTIONAL_TABLES if (path / n).exists()}
    else:
        src = {n: _Table(n, t) for n, t in tables.items()}
    for name, tab in src.items():
        for col in REQUIRED_COLUMNS[name]:
            if col not in tab.column_names:
                raise DatasetError(name, f"required column missing (has: {', '.join(tab.column_names)})", col)
    check_spec(spec, {n: t.column_names for n, t in src.items()})

    warnings: list[str] = []
    req = _Requests(src[REQUESTS])
    imp = _Impressions(src[IMPRESSIONS], req, split, keep_items=ITEMS in src, warnings=warnings)
    beh = _Behaviors(src[BEHAVIORS], req, imp, warnings)
    for name, key, other, other_name in ((ITEMS, "item_id", src[IMPRESSIONS], IMPRESSIONS),
                                         (USERS, "user_id", src[REQUESTS], REQUESTS)):
        if name in src:
            _check_key_table(src[name], key, other, other_name,
                             imp.item_ids.values() if name == ITEMS else req.user_ids.values(), warnings)

    _check_timestamps(req.clock, beh.clock, warnings, beh.late)
    _check_features(src, spec, imp, warnings)
    _check_splits(req, imp, warnings)
    pa.default_memory_pool().release_unused()  # the batches' pages: give them back before the caller's work

    return ValidationReport(
        path=path, n_requests=src[REQUESTS].num_rows, n_impressions=src[IMPRESSIONS].num_rows,
        n_behaviors=src[BEHAVIORS].num_rows, tables=sorted(src), has_split=req.has_split,
        has_purchase=imp.purchase is not None and bool(imp.purchase.non_null), warnings=warnings,
    )


class _Clock:
    """Streaming statistics of a timestamp column: what the unit, range and alignment checks need.
    The median (needed only when two tables' clocks do not overlap) is found by selection passes."""

    def __init__(self, file: str, now: float, reread: Callable[[], Iterator[np.ndarray]] | None = None):
        self.file, self.reread, self.now = file, reread, now
        self.n, self.lo, self.hi, self.hi_row = 0, 0, 0, 0
        self.far, self.future = _Hit(), 0
        self.values: np.ndarray | None = None  # kept when small (per-request state)

    def add(self, start: int, ts: np.ndarray) -> None:
        if not len(ts):
            return
        i = int(np.argmax(ts))
        if self.n == 0 or ts[i] > self.hi:
            self.hi, self.hi_row = int(ts[i]), start + i
        self.lo = int(ts.min()) if self.n == 0 else min(self.lo, int(ts.min()))
        self.n += len(ts)
        self.far.add(start, np.abs(ts) >= TS_LIMIT, ts)
        self.future += int(np.count_nonzero(ts > self.now + 366 * 86400))

    def median(self) -> float:
        if self.values is not None:
            return float(np.median(self.values))
        k = (self.n - 1) // 2
        a = self._kth(k)
        return float(a) if self.n % 2 else (float(a) + float(self._kth(k + 1))) / 2

    def _kth(self, k: int) -> int:
        """The k-th smallest value (0-based): narrow [lo, hi] by 2^16 buckets per pass over the column,
        then select among the few values left."""
        lo, hi, below = self.lo, self.hi, 0
        while lo < hi:
            shift = max(0, (hi - lo).bit_length() - 16)
            counts = np.zeros(((hi - lo) >> shift) + 1, np.int64)
            inside: list[np.ndarray] = []
            n_in = 0
            for ts in self.reread():
                v = ts[(ts >= lo) & (ts <= hi)]
                d = (v.astype(np.uint64) - np.uint64(lo % 2**64)) >> np.uint64(shift)
                counts += np.bincount(d.astype(np.int64), minlength=len(counts))
                n_in += len(v)
                if n_in <= BATCH_ROWS:
                    inside.append(v)
            if n_in <= BATCH_ROWS:
                return int(np.partition(np.concatenate(inside), k - below)[k - below])
            cum = np.cumsum(counts)
            b = int(np.searchsorted(cum, k - below, side="right"))
            below += int(cum[b - 1]) if b else 0
            lo, hi = lo + (b << shift), min(hi, lo + ((b + 1) << shift) - 1)
        return lo


class _Requests:
    """requests.parquet, streamed; keeps per-request ids, timestamps and split codes."""

    def __init__(self, t: _Table):
        if t.num_rows == 0:
            raise DatasetError(REQUESTS, "has no rows", hint="write at least the requests of the train/valid/test period")
        _check_type(REQUESTS, t, "request_id", ("int",))
        _check_type(REQUESTS, t, "user_id", ("int", "str"))
        _check_type(REQUESTS, t, "timestamp", ("int",))
        _check_type(REQUESTS, t, "query", ("str",))
        self.table = t
        self.has_split = "split" in t.column_names
        split_ok = self.has_split and _is_str(t.type("split"))
        nulls = {c: _Hit() for c in ("request_id", "user_id", "timestamp")}
        uid, bad_split = _IdStrings(t, "user_id"), _Hit()
        self.user_ids = _Uniques()
        ids, ts, splits = [], [], []
        for start, b in t.batches([c for c in ("request_id", "user_id", "timestamp", "split") if c in t.column_names]):
            for c, hit in nulls.items():
                hit.add(start, _nulls(b.column(c)))
            uid.add(start, b.column("user_id"))
            self.user_ids.add(b.column("user_id"))
            ids.append(pc.fill_null(b.column("request_id"), 0).to_numpy().astype(np.int64, copy=False))
            ts.append(pc.fill_null(b.column("timestamp"), 0).to_numpy().astype(np.int64, copy=False))
            if split_ok:
                s = b.column("split").to_pandas()
                bad = ~s.isin(SPLITS).to_numpy()
                bad_split.add(start, bad, s)
                splits.append(pd.Categorical(s.where(~bad), categories=SPLITS).codes.astype(np.int8))
        for c, hit in nulls.items():
            _raise_null(REQUESTS, c, hit)
        self.ids, self.ts = np.concatenate(ids), np.concatenate(ts)
        del ids, ts
        self.order = np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids[self.order]
        if (self.sorted_ids[1:] == self.sorted_ids[:-1]).any():  # then find the row as pandas names it
            _check_unique(REQUESTS, pd.DataFrame({"request_id": self.ids}), "request_id")
        uid.check(REQUESTS)
        if self.has_split:
            _check_type(REQUESTS, t, "split", ("str",))
            if bad_split:
                raise DatasetError(REQUESTS, f"split must be one of {SPLITS}", "split", bad_split.row, bad_split.value)
        self.clock = _Clock(REQUESTS, time.time())
        self.clock.add(0, self.ts)
        self.clock.values = self.ts
        frame = {"request_id": self.ids, "timestamp": self.ts}
        if self.has_split:
            frame["split"] = pd.Categorical.from_codes(np.concatenate(splits), categories=SPLITS)
        self.frame = pd.DataFrame(frame)  # the per-request columns split_codes and require_splits read

    def index(self, rid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Position of each request id among the sorted ids, and whether it is known."""
        i = np.minimum(np.searchsorted(self.sorted_ids, rid), len(self.sorted_ids) - 1)
        return i, self.sorted_ids[i] == rid


class _RepeatedItems:
    """Impressions repeating a (request_id, item_id) pair. When each request's rows are contiguous
    (as every writer here produces) only the current request's rows are kept across batches;
    otherwise the two key columns are read whole and checked at once."""

    def __init__(self, n_requests: int):
        self.ended = np.zeros(n_requests, bool)
        self.grouped = True
        self.hit = _Hit()
        self.carry_req = np.zeros(0, np.int64)
        self.carry_item: pd.Series = pd.Series([], dtype=object)

    def add(self, start: int, req: np.ndarray, item: pd.Series) -> None:
        if not self.grouped or not len(req):
            return
        r = np.concatenate([self.carry_req, req])
        it = pd.concat([self.carry_item, item], ignore_index=True) if len(self.carry_req) else item.reset_index(drop=True)
        starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
        runs = r[starts]
        if self.ended[runs].any() or len(np.unique(runs)) != len(runs):
            self.grouped = False  # a request's rows are split: fall back to the whole-column check
            return
        self.ended[runs[:-1]] = True
        run_of_row = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(r)]))
        dup = pd.DataFrame({"r": run_of_row, "i": it}).duplicated().to_numpy()[len(self.carry_req):]
        self.hit.add(start, dup, item)
        self.carry_req, self.carry_item = r[starts[-1]:], it.iloc[starts[-1]:].reset_index(drop=True)

    def result(self, t: _Table) -> _Hit:
        if self.grouped:
            return self.hit
        imp = t.read(["request_id", "item_id"]).to_pandas()
        (rc, _), (ic, items) = pd.factorize(imp["request_id"]), pd.factorize(imp["item_id"])
        pair = np.sort(rc.astype(np.int64) * len(items) + ic)  # one int per pair: sorting beats hashing here
        hit = _Hit()
        if (pair[1:] == pair[:-1]).any():
            hit.add(0, imp.duplicated(["request_id", "item_id"]).to_numpy(), imp["item_id"])
        return hit


class _Impressions:
    """impressions.parquet, streamed: labels, positions, keys, and the per-split label statistics."""

    def __init__(self, t: _Table, req: _Requests, fractions: tuple[float, float, float] | None, keep_items: bool,
                 warnings: list[str]):
        if t.num_rows == 0:
            raise DatasetError(IMPRESSIONS, "has no rows: nothing to train or evaluate on",
                               hint="write one row per candidate shown in each request")
        _check_type(IMPRESSIONS, t, "request_id", ("int",))
        _check_type(IMPRESSIONS, t, "item_id", ("int", "str"))
        self.table = t
        cols = [c for c in ("request_id", "item_id", "position", "click", "purchase") if c in t.column_names]
        has_pos = "position" in cols
        pos_ok = has_pos and _is_int(t.type("position"))
        self.click = _Labels(t, "click", allow_null=False)
        self.purchase = _Labels(t, "purchase", allow_null=True) if "purchase" in cols else None
        null_rid, null_item, unknown, bought = _Hit(), _Hit(), _Hit(), _Hit()
        neg_pos, big_pos, pos_null = _Hit(), _Hit(), 0
        item_ids = _IdStrings(t, "item_id")
        self.item_ids = _Uniques()
        self.first_click: float = np.nan
        # label counts (for the label-leak check) and per-split click range (for the AUC warning)
        self.pos = {"click": 0, "purchase": 0}
        self.neg = {"click": 0, "purchase": 0}
        self.split_codes, self.split_source = split_codes(req.frame, fractions)
        codes_sorted = self.split_codes[req.order]
        self.split_click = [[0, np.inf, -np.inf, np.nan] for _ in SPLITS]  # count, min, max, first
        has_imp = np.zeros(len(req.ids), bool)
        repeated = _RepeatedItems(len(req.ids))
        for start, b in t.batches(cols):
            rid_col, item_col = b.column("request_id"), b.column("item_id")
            null_rid.add(start, _nulls(rid_col))
            null_item.add(start, _nulls(item_col))
            item_ids.add(start, item_col)
            if keep_items:
                self.item_ids.add(item_col)
            click = self.click.add(start, b.column("click"))
            if start == 0 and len(click):
                self.first_click = click[0]
            buy = None
            if self.purchase is not None:
                buy = self.purchase.add(start, b.column("purchase"))
                bought.add(start, (np.nan_to_num(buy, nan=0.0) == 1) & (click == 0))
            for label, y in (("click", click), ("purchase", buy)):
                if y is not None:
                    self.pos[label] += int(np.count_nonzero(y == 1))
                    self.neg[label] += int(np.count_nonzero((y == 0) | (np.isnan(y) if label == "purchase" else False)))
            if pos_ok:
                p = b.column("position")
                pos_null += p.null_count
                pf = pc.fill_null(p, 0).to_numpy().astype(np.float64)
                if (pf < 0).any() or (pf > MAX_POSITION_VALUE).any():
                    ps = p.to_pandas()
                    neg_pos.add(start, pf < 0, ps)
                    big_pos.add(start, pf > MAX_POSITION_VALUE, ps)
            rid = pc.fill_null(rid_col, 0).to_numpy().astype(np.int64, copy=False)
            idx, known = req.index(rid)
            unknown.add(start, ~known, rid)
            has_imp[idx[known]] = True
            for i in range(len(SPLITS)):
                c = click[known & (codes_sorted[idx] == i)]
                if len(c):
                    acc = self.split_click[i]
                    if acc[0] == 0:
                        acc[3] = c[0]
                    acc[0] += len(c)
                    acc[1], acc[2] = min(acc[1], c.min()), max(acc[2], c.max())
            repeated.add(start, idx, item_col.to_pandas())

        _raise_null(IMPRESSIONS, "request_id", null_rid)
        _raise_null(IMPRESSIONS, "item_id", null_item)
        item_ids.check(IMPRESSIONS)
        self.click.check()
        if self.purchase is not None:
            self.purchase.check()
            if bought:
                raise DatasetError(IMPRESSIONS, f"purchase 1 on an impression with click 0 ({bought.count} such rows): "
                                   "purchase is post-click conversion, so it would be ignored", "purchase",
                                   bought.row, hint="set click=1 on purchased impressions (or purchase=null)")
        if not self.pos["click"] or not self.neg["click"]:
            first = int(self.first_click)
            raise DatasetError(IMPRESSIONS, f"every impression has click={first}: nothing to learn",
                               "click", hint="write the shown-but-not-clicked candidates too" if first == 1
                               else "check the label join (clicks are missing)")
        if has_pos:
            _check_type(IMPRESSIONS, t, "position", ("int",))
            for bad, what in ((neg_pos, "negative"), (big_pos, f"larger than {MAX_POSITION_VALUE:,}")):
                if bad:
                    raise DatasetError(IMPRESSIONS, f"position {what}: positions are 0-based ranks in the result list",
                                       "position", bad.row, t.pandas_value("position", bad.value, pos_null > 0),
                                       hint="write the rank (0 = top) or null when unknown")
        if unknown:
            raise DatasetError(IMPRESSIONS, "impression of an unknown request (not in requests.parquet)",
                               "request_id", unknown.row, unknown.value)
        self.has_imp = has_imp[np.argsort(req.order)]  # back to the requests' row order
        if not self.has_imp.all():
            r = _first_row(~self.has_imp)
            warnings.append(_warning(REQUESTS, f"{int((~self.has_imp).sum())} requests have no impressions (ignored in "
                                     "training)", "request_id", r, req.ids[r]))
        dup = repeated.result(t)
        if dup:
            warnings.append(_warning(IMPRESSIONS, f"{dup.count} impressions repeat an item already shown in the "
                                     "same request", "item_id", dup.row, dup.value,
                                     hint="keep one row per (request_id, item_id)"))


class _Behaviors:
    """behaviors.parquet, streamed: keys, actions and the clock."""

    def __init__(self, t: _Table, req: _Requests, imp: _Impressions, warnings: list[str]):
        _check_type(BEHAVIORS, t, "user_id", ("int", "str"))
        _check_type(BEHAVIORS, t, "item_id", ("int", "str"))
        _check_type(BEHAVIORS, t, "timestamp", ("int",))
        _check_type(BEHAVIORS, t, "action", ("str",))
        if "query" in t.column_names:
            _check_type(BEHAVIORS, t, "query", ("str",))
        has_session = SESSION in t.column_names
        if has_session:
            _check_session_type(t)
        cols = ["user_id", "item_id", "timestamp", "action"]
        nulls = {c: _Hit() for c in cols}
        ids = {c: _IdStrings(t, c) for c in ("user_id", "item_id", "action") + ((SESSION,) if has_session else ())}
        cols += [SESSION] if has_session else []
        self.clock = _Clock(BEHAVIORS, req.clock.now, lambda: (
            pc.fill_null(b.column("timestamp"), 0).to_numpy().astype(np.int64, copy=False)
            for _, b in t.batches(["timestamp"])))
        self.late = _Hit()
        req_users = req.user_ids.values().cast(pa.string())
        first_user, matched = None, False
        for start, b in t.batches(cols):
            for c, hit in nulls.items():
                hit.add(start, _nulls(b.column(c)))
            for c, check in ids.items():
                check.add(start, b.column(c))
            ts = pc.fill_null(b.column("timestamp"), 0).to_numpy().astype(np.int64, copy=False)
            self.clock.add(start, ts)
            self.late.add(start, ts > req.clock.hi, ts)
            users = b.column("user_id")
            if start == 0 and len(users):
                first_user = users[0].as_py()
            if not matched and len(users):
                matched = pc.any(pc.is_in(_unique_str(users), value_set=req_users)).as_py()
        for c, hit in nulls.items():
            _raise_null(BEHAVIORS, c, hit)
        for check in ids.values():
            check.check(BEHAVIORS)

        # cross-table key types: a string user_id in one table and int in another joins to nothing.
        if t.num_rows and _key_kind(t, "user_id") != _key_kind(req.table, "user_id"):
            raise DatasetError(BEHAVIORS, f"user_id is {_key_kind(t, 'user_id')} but requests.parquet user_id is "
                               f"{_key_kind(req.table, 'user_id')}: the tables would not join", "user_id")
        if t.num_rows and _key_kind(t, "item_id") != _key_kind(imp.table, "item_id"):
            raise DatasetError(BEHAVIORS, f"item_id is {_key_kind(t, 'item_id')} but impressions.parquet item_id is "
                               f"{_key_kind(imp.table, 'item_id')}: the tables would not join", "item_id")
        if t.num_rows and not matched:
            warnings.append(_no_overlap(BEHAVIORS, "user_id", first_user, REQUESTS, "no request has a history"))


def _check_session_type(t: _Table) -> None:
    """behaviors.parquet ``session``: int or string ids, nulls allowed (an all-null column too)."""
    kind = _kind(t.type(SESSION))
    if kind in ("int", "str", "null"):
        return
    row, value = None, None
    for start, b in t.batches([SESSION]):
        col = b.column(SESSION)
        ok = ~_nulls(col)
        if ok.any():
            row, value = start + _first_row(ok), col[_first_row(ok)].as_py()
            break
    raise DatasetError(BEHAVIORS, f"session ids stored as {t.type(SESSION)}, expected int64 or string",
                       SESSION, row, value, hint=_TYPE_HINT[SESSION])


def _key_kind(t: _Table, column: str) -> str:
    return "int" if _is_int(t.type(column)) else "str"


def _unique_str(col: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return pc.unique(col).cast(pa.string())


def _no_overlap(file: str, column: str, first: object, other_file: str, consequence: str) -> str:
    """Keys of two tables that share no value at all: formatted differently (e.g. 'u1' vs '1')."""
    return _warning(file, f"no value matches a {column} of {other_file}: {consequence}", column, 0, first,
                    hint=f"write {column} the same way in both tables")


def _check_key_table(t: _Table, key: str, other: _Table, other_name: str, other_keys: pa.Array,
                     warnings: list[str]) -> None:
    """items.parquet / users.parquet: one row per id (read whole: per-id state), ids the other table uses."""
    name = t.name
    _check_type(name, t, key, ("int", "str"))
    if _key_kind(t, key) != _key_kind(other, key):
        raise DatasetError(name, f"{key} is {_key_kind(t, key)} but {other_name} {key} is {_key_kind(other, key)}", key)
    col = t.read([key])
    df = col.to_pandas()
    nulls = df[key].isna().to_numpy()
    if nulls.any():
        raise DatasetError(name, "null value (not allowed)", key, _first_row(nulls))
    _check_unique(name, df, key)
    _check_id_strings(name, col, key)
    if len(df) and not pc.any(pc.is_in(_unique_str(col.column(key).combine_chunks()),
                                       value_set=_unique_str(other_keys))).as_py():
        warnings.append(_no_overlap(name, key, col.column(key)[0].as_py(), other_name,
                                    "its features never reach a candidate" if name == ITEMS
                                    else "its profiles never reach a request"))


def _year(ts: float) -> str:
    return f"year {1970 + ts / 31_556_952:.0f}"


def _check_timestamps(req: _Clock, beh: _Clock, warnings: list[str], late: _Hit | None = None) -> None:
    """Units (seconds everywhere), range (what serving accepts) and alignment of the two clocks."""
    clocks = [req] + ([beh] if beh.n else [])
    if len(clocks) == 2 and not (req.lo <= beh.hi and beh.lo <= req.hi):  # overlapping clocks share a unit
        ma, mb = abs(req.median()), abs(beh.median())
        ratio = max(ma, mb) / max(min(ma, mb), 1.0)
        if ratio >= 300:
            big, small = (req.file, beh.file) if ma > mb else (beh.file, req.file)
            raise DatasetError(big, f"timestamps are ~{10 ** round(np.log10(ratio)):,}x larger than those of {small} "
                               f"(median {max(ma, mb):.3g} vs {min(ma, mb):.3g}): the tables use different time "
                               "units (ms vs s?), so histories would take future behaviours (a label leak)",
                               "timestamp", hint="convert both to unix seconds, e.g. "
                               "(df['t'] - pd.Timestamp(0)) // pd.Timedelta('1s')")
    for c in clocks:
        if c.far:
            v = int(c.far.value)
            unit = next((u for u, k in (("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9))
                         if abs(v) / k < TS_LIMIT), "no known unit")
            raise DatasetError(c.file, f"timestamp beyond {_year(TS_LIMIT)} (what serving accepts): looks like "
                               f"{unit}; the format is unix seconds", "timestamp", c.far.row, v,
                               hint=f"convert to seconds (divide by {1000 if unit == 'milliseconds' else 'the unit'})")
        if c.future:
            warnings.append(_warning(c.file, f"{c.future} timestamps lie more than a year in the future "
                                     f"(latest: {_year(float(c.hi))})", "timestamp", c.hi_row, c.hi,
                                     hint="check the time unit and epoch (unix seconds)"))
    if late is not None and beh.n and late.count / beh.n >= 0.05:
        warnings.append(_warning(BEHAVIORS, f"{late.count:,} of {beh.n:,} behaviours "
                                 f"({late.count / beh.n:.0%}) are later than the last request: they never enter a "
                                 "history", "timestamp", late.row, int(late.value),
                                 hint="check that both tables use the same clock (unit, epoch, time zone)"))


class _FeatureStats:
    """What the checks of one feature column need, accumulated over batches."""

    def __init__(self, numeric: bool, leak: tuple[str, ...], hashable: bool):
        self.numeric, self.hashable = numeric, hashable
        self.n = 0
        self.non_null = _Hit()
        self.junk, self.inf, self.huge, self.finite = _Hit(), _Hit(), _Hit(), False
        self.leak = leak
        self.same_as = {label: [True, True] for label in leak}  # non-null rows == positive rows / == negative rows
        self.values: dict[object, dict[str, set]] | None = {}  # up to 2 distinct values -> label values seen

    def add(self, start: int, series: pd.Series, labels: dict[str, np.ndarray]) -> None:
        nn = series.notna().to_numpy()
        self.n += len(nn)
        self.non_null.add(start, nn, series)
        if self.numeric:
            x = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            self.junk.add(start, nn & np.isnan(x), series)
            self.inf.add(start, np.isinf(x), x)
            fin = np.isfinite(x)
            self.finite |= bool(fin.any())
            self.huge.add(start, fin & (np.abs(x) >= MAX_NUMERIC_VALUE), x)
        for label in self.leak:
            y = labels[label]
            same = self.same_as[label]
            same[0] &= bool((nn == (y == 1)).all())
            same[1] &= bool((nn == (y == 0)).all())
        if self.leak and self.hashable and self.values is not None and nn.all():
            codes, uniq = pd.factorize(series)
            keys = [v.item() if isinstance(v, np.generic) else v for v in uniq[:3]]
            if len(uniq) > 2 or len(set(self.values) | set(keys)) > 2:
                self.values = None  # more than two values: not a recoded label
                return
            for k, key in enumerate(keys):
                seen = self.values.setdefault(key, {label: set() for label in self.leak})
                for label in self.leak:
                    seen[label].update(np.unique(labels[label][codes == k]).tolist())


def _check_features(src: dict[str, _Table], spec: dict, imp: _Impressions, warnings: list[str]) -> None:
    """Each feature column holds what its (declared or inferred) type needs: one streamed pass per
    table over its feature columns, then each column's checks in column order."""
    declared = spec.get("features", {})
    for table, tab in src.items():
        plan: list[tuple[str, str, str, str, pa.DataType]] = []  # column, kind, ftype, how, type
        for col in tab.column_names:
            if col in RESERVED[table] or col in ORACLE_COLUMNS:
                continue
            ftype = declared.get(col, {}).get("type", "")
            if ftype == "ignore":
                continue
            t = tab.type(col)
            kind = _kind(t)
            how = "declared" if ftype else "inferred"
            plan.append((col, kind, ftype or {"float": "numeric", "list": "list"}.get(kind, "categorical"), how, t))
        # labels as the leak check reads them: click, and purchase with null as 0
        labels = [lab for lab in ("click", "purchase") if table == IMPRESSIONS and
                  imp.pos.get(lab, 0) >= 5 and imp.neg.get(lab, 0) >= 5 and lab in tab.column_names]
        stats = {col: _FeatureStats(ftype == "numeric" and kind not in ("list", "other"), tuple(labels), kind != "list")
                 for col, kind, ftype, _, _ in plan if kind != "other"}
        if stats and tab.num_rows:
            for start, b in tab.batches(list(stats) + [lab for lab in labels if lab not in stats]):
                ys = {lab: b.column(lab).to_pandas().to_numpy(dtype=np.float64, na_value=0.0) for lab in labels}
                for col, st in stats.items():
                    st.add(start, b.column(col).to_pandas(), ys)
        for col, kind, ftype, how, t in plan:
            if len(col) > MAX_ID_CHARS:
                raise DatasetError(table, f"feature name longer than the {MAX_ID_CHARS} characters serving accepts",
                                   col[:40] + "...", hint="rename the column")
            if tab.num_rows == 0:
                continue
            if kind == "other" or (kind == "list" and _kind(t.value_type) in ("list", "other", "null")):
                raise DatasetError(table, f"unsupported type {t} for a feature", col,
                                   hint="convert it to numbers, strings or a list of strings, or declare it "
                                   "`type: ignore` in dataset.yaml")
            st = stats[col]
            if ftype == "list" and kind not in ("list", "null"):
                raise DatasetError(table, f"declared a list feature but holds {t} values, not lists", col,
                                   st.non_null.row, tab.pandas_value(col, st.non_null.value, st.non_null.count < st.n),
                                   hint=f"store a list<string> column, e.g. df['{col}'] = df['{col}'].str.split('|')")
            if ftype != "list" and kind == "list":
                raise DatasetError(table, f"{how} {ftype} but holds lists", col,
                                   hint=f"declare it `{col}: {{type: list}}` in dataset.yaml")
            if ftype == "numeric":
                _check_numeric(table, col, st, warnings)
            if not st.non_null:
                warnings.append(_warning(table, "holds no value (all null): the feature carries nothing", col,
                                         hint=f"fill it, or declare `{col}: {{type: ignore}}` in dataset.yaml"))
            elif table == IMPRESSIONS:
                _check_label_leak(col, kind, st, warnings)


def _check_numeric(table: str, col: str, st: _FeatureStats, warnings: list[str]) -> None:
    if st.junk:
        raise DatasetError(table, f"numeric feature holds non-numeric values ({st.junk.count} such rows)", col,
                           st.junk.row, st.junk.value, hint="clean the column (null for missing), or declare it categorical")
    if st.inf:
        if not st.finite:
            raise DatasetError(table, "numeric feature has no finite value (all inf/null)", col, st.inf.row, st.inf.value,
                               hint="fix the computation that produced it, or declare it `type: ignore`")
        warnings.append(_warning(table, f"{st.inf.count} values are +/-inf (they are read as missing)", col, st.inf.row,
                                 st.inf.value, hint="write null for a missing value"))
    if st.huge:
        warnings.append(_warning(table, f"{st.huge.count} values of magnitude >= {MAX_NUMERIC_VALUE:.0e} (a sentinel "
                                 "or unit mistake?): they swamp the standardisation of the others", col, st.huge.row,
                                 st.huge.value, hint="write null for a missing value, or rescale the column"))


def _check_label_leak(col: str, kind: str, st: _FeatureStats, warnings: list[str]) -> None:
    """A candidate feature that is set only on clicked (purchased) rows, or recodes the label, leaks it."""
    hint = f"drop it, or declare `{col}: {{type: ignore}}` if it is not a feature"
    for label in st.leak:
        done = "clicked" if label == "click" else "purchased"
        if st.non_null.count == st.n and kind != "list":
            if st.values is not None and all(len(seen[label]) == 1 for seen in st.values.values()):
                warnings.append(_warning(IMPRESSIONS, f"the feature is a copy of the {label} label (each value occurs "
                                         f"with one {label} value only): the model would read the label", col, hint=hint))
                return
        elif any(st.same_as[label]):
            which = done if st.same_as[label][0] else f"un{done}"
            warnings.append(_warning(IMPRESSIONS, f"the feature is set on {which} impressions only (a label-only "
                                     f"column, known only once {done}): the model would read the label", col, hint=hint))
            return


def _check_splits(req: _Requests, imp: _Impressions, warnings: list[str]) -> None:
    """Warn for an empty split, a single training request, and a split with only one label value."""
    codes, source = imp.split_codes, imp.split_source
    counts = {s: int(((codes == i) & imp.has_imp).sum()) for i, s in enumerate(SPLITS)}
    for s in SPLITS:
        if counts[s] == 0:
            warnings.append(_warning(REQUESTS, f"the {s} split is empty ({source}): `qdrank train` refuses to "
                                     "start", "split" if req.has_split else "timestamp", hint=_split_hint(req.frame)))
        elif s == "train" and counts[s] == 1:
            warnings.append(_warning(REQUESTS, f"the train split holds a single request ({source}): "
                                     "`qdrank train` refuses to start", hint=_split_hint(req.frame)))
    for i, s in enumerate(SPLITS):
        n, lo, hi, first = imp.split_click[i]
        if n and lo == hi:
            warnings.append(_warning(IMPRESSIONS, f"every impression of the {s} split has click={int(first)}: "
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

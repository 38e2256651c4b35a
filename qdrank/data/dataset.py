"""Load a validated dataset directory into id arrays, split it by time, and cut batches.

Batches are request-major: a batch holds whole requests (user, query, context, history) and all
their candidates, with ``cand_req`` pointing each candidate at its request row. Models encode the
request side once and score every candidate against it, exactly as serving does.

History rule: the history of request r is the behaviours of r's user with timestamp strictly
earlier than r's timestamp, the most recent ``max_history`` of them. A request's own click logged
at the same second never enters (see :func:`history_bounds`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qdrank.config import DataConfig
from qdrank.data import schema
from qdrank.data.batch import (
    MAX_POSITION,
    NO_SESSION,
    Batch,
    batch_input,
    batch_inputs,
    session_codes,
    session_ordinals,
)
from qdrank.data.features import Feature, FeatureMap, canonical_key, infer_type

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
BEHAVIOR_QUERY_TOKENS = 4


def history_bounds(beh_user: np.ndarray, beh_ts: np.ndarray, req_user: np.ndarray, req_ts: np.ndarray,
                   max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) into behaviours sorted by (user, timestamp) for each request.

    ``end`` is the first behaviour of the user at or after the request time (side='left'), so
    behaviours at the request's own second are excluded: no label leak.
    """
    if len(beh_user) == 0:
        z = np.zeros(len(req_user), dtype=np.int64)
        return z, z
    t0 = min(int(beh_ts.min()), int(req_ts.min()))
    span = max(int(beh_ts.max()), int(req_ts.max())) - t0 + 2
    n_users = int(max(beh_user.max(), req_user.max())) + 1
    if span * n_users >= 2**62:  # cannot pack into one int64 key
        raise ValueError("timestamp range x users too large to index; rebase timestamps")
    beh_key = beh_user.astype(np.int64) * span + (beh_ts - t0)
    req_key = req_user.astype(np.int64) * span + (req_ts - t0)
    end = np.searchsorted(beh_key, req_key, side="left")
    first = np.searchsorted(beh_key, req_user.astype(np.int64) * span, side="left")
    start = np.maximum(first, end - max_history)
    return start.astype(np.int64), end.astype(np.int64)


def time_bucket(gap_seconds: np.ndarray, n_buckets: int) -> np.ndarray:
    """1 + floor(log2(1 + gap)), capped; 0 is reserved for padding."""
    g = np.maximum(gap_seconds, 0).astype(np.float64)
    return (1 + np.minimum(np.floor(np.log2(1 + g)), n_buckets - 2)).astype(np.int64)


def concat_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The indices of the ranges [starts[i], ends[i]) one after another, vectorised."""
    counts = ends - starts
    first = np.cumsum(counts) - counts  # where each range begins in the output
    return np.repeat(starts - first, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def item_rows(item_index: pd.Index, item_ids: pd.Series) -> np.ndarray:
    """External item ids -> item rows (2.. known, 1 unknown); each distinct id is looked up once."""
    codes, uniq = pd.factorize(pd.Series(item_ids))
    idx = item_index.get_indexer(pd.Index(uniq).map(str))[codes] if len(uniq) else np.full(len(codes), -1)
    idx[codes < 0] = -1
    return np.where(idx >= 0, idx + 2, 1).astype(np.int64)


def encode_texts(fmap: FeatureMap, texts, max_tokens: int) -> np.ndarray:
    """:meth:`FeatureMap.encode_text`, tokenising each distinct string once (hashing, not sorting)."""
    s = pd.Series(texts, dtype=object).fillna("").astype(str)
    codes, uniq = pd.factorize(s)
    return fmap.encode_text(pd.Series(uniq, dtype=object), max_tokens)[codes]


def user_profiles(user_keys, users: pd.DataFrame | None) -> pd.DataFrame:
    """One profile row per key of ``user_keys`` (string user ids), NaN where users.parquet lacks one."""
    prof = pd.DataFrame({"user_id": pd.Series(user_keys, dtype=object).to_numpy()})
    if users is not None:
        u = users.copy()
        u["user_id"] = u["user_id"].map(str)
        prof = prof.merge(u, on="user_id", how="left")
    return prof


def encode_requests(fmap: FeatureMap, cfg: DataConfig, req: pd.DataFrame) -> dict[str, np.ndarray]:
    """Request-side ids: hashed query tokens, context sparse ids and numerics."""
    return {"query": encode_texts(fmap, req["query"], cfg.max_query_tokens),
            "ctx_sparse": fmap.encode_sparse("context", req), "ctx_dense": fmap.encode_numeric("context", req)}


def encode_impressions(fmap: FeatureMap, item_index: pd.Index, imp: pd.DataFrame) -> dict:
    """Candidate arrays of impression rows (labels, shown position, item rows, features, oracle)."""
    if "position" in imp.columns:
        pos = imp["position"].fillna(-1).to_numpy(dtype=np.int64)
        position = np.where(pos >= 0, np.minimum(pos + 1, MAX_POSITION - 1), 0)
    else:
        position = np.zeros(len(imp), dtype=np.int64)
    if "purchase" in imp.columns:
        purchase = imp["purchase"].astype("float32").fillna(-1).to_numpy(dtype=np.float32)
    else:
        purchase = np.full(len(imp), -1, dtype=np.float32)
    return {"cand_item": item_rows(item_index, imp["item_id"]), "cand_sparse": fmap.encode_sparse("candidate", imp),
            "cand_dense": fmap.encode_numeric("candidate", imp), "position": position,
            "click": imp["click"].to_numpy(dtype=np.float32), "purchase": purchase,
            "oracle": {c: imp[c].to_numpy(dtype=np.float64) for c in schema.ORACLE_COLUMNS if c in imp.columns}}


def encode_behaviors(fmap: FeatureMap, item_index: pd.Index, beh: pd.DataFrame) -> dict[str, np.ndarray]:
    """Behaviour arrays (item rows, features, hashed query of the search it came from, time, and
    ``beh_session`` codes when the table has a ``session`` column)."""
    out = {"beh_ts": beh["timestamp"].to_numpy(dtype=np.int64), "beh_item": item_rows(item_index, beh["item_id"]),
           "beh_sparse": fmap.encode_sparse("behavior", beh), "beh_dense": fmap.encode_numeric("behavior", beh),
           "beh_query": (encode_texts(fmap, beh["query"], BEHAVIOR_QUERY_TOKENS) if "query" in beh.columns
                         else np.zeros((len(beh), BEHAVIOR_QUERY_TOKENS), dtype=np.int64))}
    if schema.SESSION in beh.columns:
        out["beh_session"] = session_codes(beh[schema.SESSION])
    return out


def pack_groups(counts: np.ndarray, batch_size: int, base: int = 0) -> list[np.ndarray]:
    """Cut positions 0..n-1 (requests with ``counts`` candidates, in order) into groups of whole
    requests with ~batch_size impressions. ``base`` = impressions before position 0, so a stream
    packed piece by piece (carrying the last, open group over) cuts exactly where one pass would."""
    csum = base + np.cumsum(counts)
    group = (csum - 1) // max(batch_size, 1)
    cuts = np.flatnonzero(np.diff(group)) + 1
    return [g for g in np.split(np.arange(len(counts)), cuts) if len(g)]


class RequestTable:
    """Encoded requests, their candidates and the behaviours their histories point into, as flat
    arrays; cuts :class:`Batch` es from request rows. :class:`SearchLogDataset` is one over a whole
    dataset; a streamed shard block (:mod:`qdrank.data.shards`) is one over a few thousand requests
    whose history windows were precomputed. Registered batch inputs receive a RequestTable.

    Arrays: per request ``request_id req_ts req_user query ctx_sparse ctx_dense imp_start imp_end
    hist_start hist_end``; per user row ``user_sparse user_dense``; per impression ``cand_item
    cand_sparse cand_dense position click purchase`` and ``oracle`` (dict); per behaviour ``beh_ts
    beh_item beh_sparse beh_dense beh_query`` and, when the log has sessions, ``beh_session``
    (:func:`~qdrank.data.batch.session_codes`).
    """

    beh_session: np.ndarray | None = None

    cfg: DataConfig
    fmap: FeatureMap

    def __init__(self, cfg: DataConfig, fmap: FeatureMap, **arrays):
        self.cfg, self.fmap = cfg, fmap
        self.__dict__.update(arrays)

    def n_impressions(self, rows: np.ndarray) -> int:
        return int((self.imp_end[rows] - self.imp_start[rows]).sum())

    def make_batch(self, rows: np.ndarray, extra_inputs: tuple[str, ...] = ()) -> Batch:
        """Gather requests ``rows`` (and all their candidates) into tensors, plus the registered
        inputs named in ``extra_inputs`` (see :mod:`qdrank.data.batch`)."""
        rows = np.asarray(rows, dtype=np.int64)
        L = self.cfg.max_history
        hs, he = self.hist_start[rows], self.hist_end[rows]
        # most recent L, chronological, left-aligned
        idx = hs[:, None] + np.arange(L)[None, :]
        valid = idx < he[:, None]
        idx = np.where(valid, idx, 0)
        n_beh = len(self.beh_ts)
        if n_beh == 0:
            valid[:] = False
            idx[:] = 0
            beh_item = np.zeros((1,), dtype=np.int64)
            beh_sparse = np.zeros((1, self.beh_sparse.shape[1]), dtype=np.int64)
            beh_dense = np.zeros((1, self.beh_dense.shape[1]), dtype=np.float32)
            beh_query = np.zeros((1, BEHAVIOR_QUERY_TOKENS), dtype=np.int64)
            beh_ts = np.zeros(1, dtype=np.int64)
            beh_session = None
        else:
            beh_item, beh_sparse, beh_dense = self.beh_item, self.beh_sparse, self.beh_dense
            beh_query, beh_ts, beh_session = self.beh_query, self.beh_ts, self.beh_session
        hist_item = np.where(valid, beh_item[idx], 0)
        hist_sparse = beh_sparse[idx] * valid[..., None]
        hist_dense = beh_dense[idx] * valid[..., None]
        hist_query = beh_query[idx] * valid[..., None]
        gap = self.req_ts[rows][:, None] - beh_ts[idx]
        hist_time = np.where(valid, time_bucket(gap, self.cfg.time_buckets), 0)
        hist_age = np.where(valid, gap, 0).astype(np.float32)
        hist_session = (session_ordinals(beh_session[idx], valid) if beh_session is not None
                        else np.full(idx.shape, NO_SESSION, dtype=np.int64))

        counts = self.imp_end[rows] - self.imp_start[rows]
        cand_req = np.repeat(np.arange(len(rows)), counts)
        cand = self.candidate_index(rows)
        ur = self.req_user[rows]
        t = torch.from_numpy
        return Batch(
            request_id=t(self.request_id[rows]),
            user_sparse=t(self.user_sparse[ur]), user_dense=t(self.user_dense[ur]),
            ctx_sparse=t(self.ctx_sparse[rows]), ctx_dense=t(self.ctx_dense[rows]),
            query=t(self.query[rows]),
            hist_item=t(hist_item), hist_sparse=t(hist_sparse), hist_dense=t(hist_dense.astype(np.float32)),
            hist_query=t(hist_query), hist_time=t(hist_time), hist_age=t(hist_age),
            hist_session=t(hist_session), hist_len=t(valid.sum(1).astype(np.int64)),
            cand_req=t(cand_req.astype(np.int64)), cand_item=t(self.cand_item[cand]),
            cand_sparse=t(self.cand_sparse[cand]), cand_dense=t(self.cand_dense[cand]),
            position=t(self.position[cand]), click=t(self.click[cand]), purchase=t(self.purchase[cand]),
            extra=self.extra_tensors(extra_inputs, rows, cand),
        )

    def extra_tensors(self, names: tuple[str, ...], rows: np.ndarray, cand: np.ndarray) -> dict[str, torch.Tensor]:
        builders = batch_inputs()
        unknown = [n for n in names if n not in builders]
        if unknown:
            raise KeyError(f"unknown batch input(s) {unknown}; registered: {sorted(builders)}")
        return {n: torch.as_tensor(builders[n](self, rows, cand)) for n in names}

    def candidate_index(self, rows: np.ndarray) -> np.ndarray:
        """Impression indices of ``rows``, in the order make_batch emits candidates."""
        return concat_ranges(self.imp_start[rows], self.imp_end[rows])

    def pack(self, rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Cut ``rows`` (in order) into groups of whole requests with ~batch_size impressions."""
        return [rows[g] for g in pack_groups(self.imp_end[rows] - self.imp_start[rows], batch_size)]


def _oracle_input(name: str):
    def build(table: RequestTable, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
        col = table.oracle.get(name)
        return col[cand] if col is not None else np.full(len(cand), np.nan)
    return build


# the simulator's true probabilities, for the oracle rows of evaluation (never a model input)
for _name in schema.ORACLE_COLUMNS:
    batch_input(_name)(_oracle_input(_name))


class SearchLogDataset(RequestTable):
    """A dataset directory encoded with a :class:`FeatureMap` (fitted on its training split)."""

    def __init__(self, path: str | Path, cfg: DataConfig, fmap: FeatureMap | None = None,
                 log: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.cfg = cfg
        log = log or (lambda m: print(m, file=sys.stderr))
        arrow = schema.read_tables(self.path)
        self.report = schema.validate_dataset(self.path, arrow, cfg.split)
        for w in self.report.warnings:
            log(f"warning: {w}")
        spec = schema.load_spec(self.path)
        tables = {n: t.to_pandas() for n, t in arrow.items()}
        del arrow
        self._items = tables.get(schema.ITEMS)  # item side features, for item_tables()
        req = tables[schema.REQUESTS].reset_index(drop=True)
        imp = tables[schema.IMPRESSIONS]
        beh = tables[schema.BEHAVIORS]

        # ---- split by time (or the given split column) -----------------------------------
        split = request_splits(req, cfg)
        self.split = split
        if fmap is None:  # training needs every split: refuse before any work
            schema.require_splits(req, imp, cfg.split)
        train_req = req[split == 0]
        if len(train_req) == 0:
            raise schema.DatasetError(schema.REQUESTS, "no request falls in the train split")
        cutoff = int(train_req["timestamp"].max()) + 1
        imp_train = imp[imp["request_id"].isin(train_req["request_id"])]
        beh_fit = beh[beh["timestamp"] < cutoff]

        # ---- feature map ------------------------------------------------------------------
        if fmap is None:
            fmap = fit_feature_map(tables, spec, cfg, train_req, imp_train, beh_fit, log)
        self.fmap = fmap

        # ---- entity rows ------------------------------------------------------------------
        user_keys = pd.Index(pd.unique(pd.concat([req["user_id"], beh["user_id"]], ignore_index=True).map(str)))
        self.user_keys = user_keys
        req_user = user_keys.get_indexer(req["user_id"].map(str)) + 1
        beh_user = user_keys.get_indexer(beh["user_id"].map(str)) + 1
        item_index = pd.Index(fmap.item_vocab)
        self._item_index = item_index

        # users: profile rows aligned with user_keys (row 0 = unknown user)
        prof = user_profiles(user_keys, tables.get(schema.USERS))
        prof = pd.concat([prof.iloc[:0].reindex([0]), prof], ignore_index=True)
        self.user_sparse = fmap.encode_sparse("user", prof)
        self.user_sparse[0] = 0
        self.user_dense = fmap.encode_numeric("user", prof)

        # ---- requests ---------------------------------------------------------------------
        order = np.lexsort((req["request_id"].to_numpy(), req["timestamp"].to_numpy()))
        req = req.iloc[order].reset_index(drop=True)
        self.split = self.split[order]
        req_user = req_user[order]
        self.request_id = req["request_id"].to_numpy(dtype=np.int64)
        self.req_ts = req["timestamp"].to_numpy(dtype=np.int64)
        self.req_user = req_user.astype(np.int64)
        self.__dict__.update(encode_requests(fmap, cfg, req))

        # ---- impressions, grouped by request row -----------------------------------------
        rid_index = pd.Index(self.request_id)
        imp_row = rid_index.get_indexer(imp["request_id"])
        imp_order = np.argsort(imp_row, kind="stable")
        imp = imp.iloc[imp_order].reset_index(drop=True)
        imp_row = imp_row[imp_order]
        counts = np.bincount(imp_row, minlength=len(req))
        self.imp_end = np.cumsum(counts).astype(np.int64)
        self.imp_start = self.imp_end - counts
        self.__dict__.update(encode_impressions(fmap, item_index, imp))

        # ---- behaviours, sorted by (user, time) -------------------------------------------
        b_order = np.lexsort((beh["timestamp"].to_numpy(), beh_user))
        beh = beh.iloc[b_order].reset_index(drop=True)
        self.beh_user = beh_user[b_order].astype(np.int64)
        self.__dict__.update(encode_behaviors(fmap, item_index, beh))
        self.hist_start, self.hist_end = history_bounds(self.beh_user, self.beh_ts, self.req_user, self.req_ts,
                                                        cfg.max_history)

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def oracle_columns(self) -> tuple[str, ...]:
        return tuple(self.oracle)

    def item_rows(self, item_ids: pd.Series) -> np.ndarray:
        """External item ids -> item rows (2.. known, 1 unknown)."""
        return item_rows(self._item_index, item_ids)

    def item_tables(self, tables_path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Item side-feature tables aligned with item rows (row 0 pad, row 1 unknown)."""
        return encode_item_tables(self.fmap, self._items)

    def requests_of(self, split: str) -> np.ndarray:
        rows = np.flatnonzero((self.split == SPLIT_CODES[split]) & (self.imp_end > self.imp_start))
        return rows

    def iter_batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, rank: int = 0,
                     world: int = 1, extra_inputs: tuple[str, ...] = ()) -> Iterator[Batch]:
        """The batches of one pass over ``split`` (the API :class:`~qdrank.data.shards.ShardedDataset`
        shares): requests in time order, or permuted from ``seed`` when ``shuffle``."""
        for rows in self.batch_rows(split, batch_size, shuffle, seed, rank, world):
            yield self.make_batch(rows, extra_inputs)

    def batch_rows(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, rank: int = 0,
                   world: int = 1) -> list[np.ndarray]:
        """Request-row groups for one pass. With ``world`` > 1 each rank gets its own share; in
        training (shuffle) every rank gets the same number of batches so collectives line up."""
        rows = self.requests_of(split)
        if shuffle:
            rows = np.random.default_rng(seed).permutation(rows)
        groups = self.pack(rows, batch_size)
        if world > 1:
            if shuffle:
                n = len(groups) // world
                groups = groups[rank * n:(rank + 1) * n] if n else groups[:1]
            else:
                groups = groups[rank::world]
        return groups


def encode_item_tables(fmap: FeatureMap, items_table: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
    """Item side-feature tables aligned with item rows (row 0 pad, row 1 unknown)."""
    items = pd.DataFrame({"item_id": fmap.item_vocab})
    if items_table is not None:
        side = items_table.copy()
        side["item_id"] = side["item_id"].map(str)
        items = items.merge(side, on="item_id", how="left")
    pad = pd.DataFrame({"item_id": [None, "\x00__unknown__"]})
    items = pd.concat([pad, items], ignore_index=True)
    sparse = fmap.encode_sparse("item", items)
    sparse[0] = 0
    return sparse, fmap.encode_numeric("item", items)


def request_splits(req: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    """Split code (0 train, 1 valid, 2 test) of each request: its ``split`` column, else by time."""
    if "split" in req.columns:
        return req["split"].map(SPLIT_CODES).to_numpy(dtype=np.int64)
    return split_by_time(req["timestamp"].to_numpy(), cfg.split)


def split_by_time(ts: np.ndarray, fractions: tuple[float, float, float]) -> np.ndarray:
    """Train = earliest requests, valid = next, test = latest; boundaries fall between timestamps
    so no two requests of the same second land in different splits."""
    s = np.sort(ts)
    n = len(s)
    t1 = s[min(int(n * fractions[0]), n - 1)]
    t2 = s[min(int(n * (fractions[0] + fractions[1])), n - 1)]
    out = np.where(ts < t1, 0, np.where(ts < t2, 1, 2))
    return out.astype(np.int64)


def fit_feature_map(tables: dict[str, pd.DataFrame], spec: dict, cfg: DataConfig, train_req: pd.DataFrame,
                    imp_train: pd.DataFrame, beh_fit: pd.DataFrame, log: Callable[[str], None]) -> FeatureMap:
    """Declare/infer every feature, then fit vocabularies and statistics on training rows only.

    The in-memory form of the streaming fit in :mod:`qdrank.data.shards`: both run
    :func:`declare_features` and feed a :class:`FeatureFitter`, here with each table as one chunk.
    """
    fit_rows = {schema.REQUESTS: train_req, schema.IMPRESSIONS: imp_train, schema.BEHAVIORS: beh_fit}
    users = tables.get(schema.USERS)
    if users is not None:
        fit_rows[schema.USERS] = users[users["user_id"].map(str).isin(set(train_req["user_id"].map(str)))]
    if schema.ITEMS in tables:
        fit_rows[schema.ITEMS] = tables[schema.ITEMS]
    features = declare_features(spec, {t: {c: tables[t][c] for c in tables[t].columns} for t in fit_rows}, log)
    fitter = FeatureFitter(features, cfg)
    for table, df in fit_rows.items():
        fitter.update(table, df)
    for table in (schema.IMPRESSIONS, schema.BEHAVIORS, schema.ITEMS):
        if table in tables:
            fitter.see_all(table, tables[table])
    return fitter.finish(spec)


def declare_features(spec: dict, columns: dict[str, dict[str, pd.Series]], log: Callable[[str], None],
                     ) -> dict[str, Feature]:
    """Every feature with its role and type: declared in dataset.yaml, else inferred from the column.

    ``columns``: table -> column -> a Series with the column's pandas dtype and its first non-null
    value (the whole column, or a probe of it), in the tables' order requests, impressions,
    behaviours, users, items.
    """
    declared = spec.get("features", {})
    features: dict[str, Feature] = {}
    inferred: list[str] = []
    # entity ids are categorical features of their role
    features["user_id"] = Feature("user_id", "user", "categorical")
    features["item_id"] = Feature("item_id", "item", "categorical")
    features["action"] = Feature("action", "behavior", "categorical")
    for table, cols in columns.items():
        role = schema.TABLE_ROLE[table]
        for col, series in cols.items():
            if col in schema.RESERVED[table] or col in schema.ORACLE_COLUMNS:
                continue
            if col in features:
                raise schema.DatasetError(table, f"feature name '{col}' is used by two tables; rename one", col)
            decl = declared.get(col, {})
            ftype = decl.get("type") or infer_type(series)
            if "type" not in decl:
                inferred.append(f"{col}={ftype}")
            if ftype == "ignore":
                continue
            features[col] = Feature(col, decl.get("role", role), ftype)
    if inferred:
        log("inferred feature types (declare them in dataset.yaml to change): " + ", ".join(inferred))
    return features


class _Moments:
    """Count, mean and sum of squared deviations of finite values, mergeable chunk by chunk (Chan
    et al.); one chunk gives exactly numpy's mean and std."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        n_b, mean_b = len(x), float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else 0.0


class _NumericStats:
    """What a numeric feature's standardisation needs: min, max, moments of x and of log1p(x)."""

    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf
        self.raw, self.log = _Moments(), _Moments()

    def add(self, values: pd.Series) -> None:
        x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        x = x[np.isfinite(x)]
        if len(x) == 0:
            return
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        self.raw.add(x)
        if self.lo >= 0:  # log statistics only matter while every value is >= 0
            self.log.add(np.log1p(x))

    def apply(self, f: Feature) -> None:
        """Rule: log1p first when every value is >= 0 and the largest exceeds 1000."""
        if self.raw.n == 0:
            return
        f.log = bool(self.lo >= 0 and self.hi > 1000)
        m = self.log if f.log else self.raw
        f.mean = float(m.mean)
        f.std = m.std or 1.0


class FeatureFitter:
    """Vocabularies and numeric statistics accumulated over chunks of training rows.

    ``update(table, rows)`` takes fit rows (training requests, their impressions, behaviours before
    the train cutoff, training users' profiles, all items); ``see_all(table, rows)`` takes every row
    of impressions, behaviours and items, in that order, for the item rows and the label flags.
    """

    def __init__(self, features: dict[str, Feature], cfg: DataConfig):
        self.features, self.cfg = features, cfg
        self.counts: dict[str, pd.Series] = {}
        self.numeric: dict[str, _NumericStats] = {n: _NumericStats() for n, f in features.items()
                                                  if f.type == "numeric"}
        self.items: dict[str, None] = {}  # insertion-ordered set of item keys (first appearance)
        self.user_key_type = self.item_key_type = "str"
        self.has_purchase = self.has_position = False

    def _count(self, name: str, values: pd.Series) -> None:
        f = self.features[name]
        if f.type == "list":
            values = values.dropna().explode()
        values = values.dropna()
        if len(values) == 0:
            return
        raw = values.value_counts(sort=False)  # count raw values, then merge 1, 1.0 and "1"
        c = raw.groupby(raw.index.map(canonical_key)).sum()
        old = self.counts.get(name)
        self.counts[name] = c if old is None else old.add(c, fill_value=0)

    def update(self, table: str, df: pd.DataFrame) -> None:
        ids = {schema.REQUESTS: ("user_id",), schema.IMPRESSIONS: ("item_id",),
               schema.BEHAVIORS: ("action", "item_id")}.get(table, ())
        if table == schema.REQUESTS and len(df):
            self.user_key_type = "int" if pd.api.types.is_integer_dtype(df["user_id"]) else "str"
        for name in ids:
            self._count(name, df[name])
        for col in df.columns:
            f = self.features.get(col)
            if f is None or col in schema.RESERVED[table] or col in schema.ORACLE_COLUMNS:
                continue
            if f.type in ("categorical", "list"):
                self._count(col, df[col])
            elif f.type == "numeric":
                self.numeric[col].add(df[col])

    def see_all(self, table: str, df: pd.DataFrame) -> None:
        for key in pd.unique(df["item_id"]):
            self.items.setdefault(str(key))
        if table == schema.IMPRESSIONS:
            self.item_key_type = "int" if pd.api.types.is_integer_dtype(df["item_id"]) else "str"
            self.has_position = "position" in df.columns
            if "purchase" in df.columns and bool(df["purchase"].notna().any()):
                self.has_purchase = True

    def finish(self, spec: dict) -> FeatureMap:
        cfg, features = self.cfg, self.features
        offset = 1
        for name, f in features.items():
            if f.type in ("categorical", "list"):
                min_count = cfg.min_count if name != "user_id" else 1
                counts = self.counts.get(name, pd.Series(dtype=np.int64))
                f.vocab = sorted(counts[counts >= min_count].index.tolist())
                f.slots = 1 if f.type == "categorical" else cfg.max_list_len
                f.offset = offset
                offset += 1 + len(f.vocab)
            elif f.type == "text":
                f.slots = cfg.max_list_len
            elif f.type == "numeric":
                self.numeric[name].apply(f)
        gate = spec.get("gate") or [f.name for f in features.values()
                                     if f.role in ("user", "context") and f.name != "user_id"]
        unknown = [g for g in gate if g not in features]
        if unknown:
            raise schema.DatasetError(schema.SPEC, f"gate names unknown features {unknown}; known: {sorted(features)}")
        category = next((c for c in ("category", "cate_id_1", "cate_id_3", "genres", "properties")
                         if c in features and features[c].role == "item"), None)
        if spec.get("category"):
            category = spec["category"]
        return FeatureMap(
            features=features, text_offset=offset, query_buckets=cfg.query_buckets,
            max_query_tokens=cfg.max_query_tokens, max_list_len=cfg.max_list_len, time_buckets=cfg.time_buckets,
            vocab_size=offset + cfg.query_buckets, gate=list(gate), user_key_type=self.user_key_type,
            item_key_type=self.item_key_type, has_purchase=self.has_purchase, has_position=self.has_position,
            max_position=MAX_POSITION, item_vocab=list(self.items), has_category=category,
        )

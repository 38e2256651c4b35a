"""Request-major Parquet shards: a prepared dataset written, and streamed back, with bounded memory.

``write_shards(DIR, OUT)`` (``qdrank data shard``) turns a dataset directory into Parquet shards
whose rows are whole requests: the encoded request side (user profile, context, query), every
candidate with its labels, and the request's history window, already cut (strictly earlier
behaviours, most recent ``max_history``: :func:`~qdrank.data.dataset.history_bounds`) and encoded,
as list columns in row groups. Beside them: ``feature_map.json``, ``items.safetensors`` (item
side-feature tables) and ``manifest.json`` (data config, split counts, shard list).

The dataset is first validated (:func:`~qdrank.data.schema.validate_dataset`, streamed too), so
shards refuse what training refuses. Memory is bounded by the chunk and bucket sizes, not by the
log: every table is read in record batches; vocabularies and numeric statistics are fitted in a streaming pass over the training
split (:class:`~qdrank.data.dataset.FeatureFitter`, the same code the in-memory loader runs);
histories need behaviours sorted by (user, time), so requests, impressions and behaviours are first
partitioned into user-hash buckets on disk and each bucket is windowed on its own. Only per-request
keys (id, time, split, bucket: ~20 bytes a request) and the user/item tables stay in memory.
The split (:func:`~qdrank.data.dataset.request_splits`), the history rule, the encoders and the
request order inside a split (time, then request id) are the in-memory loader's, so a
:class:`ShardedDataset` yields the very batches :class:`~qdrank.data.dataset.SearchLogDataset` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qdrank.config import DataConfig
from qdrank.data import schema
from qdrank.data.batch import Batch
from qdrank.data.dataset import (
    BEHAVIOR_QUERY_TOKENS,
    SPLIT_CODES,
    FeatureFitter,
    RequestTable,
    SearchLogDataset,
    concat_ranges,
    declare_features,
    encode_behaviors,
    encode_impressions,
    encode_item_tables,
    encode_requests,
    history_bounds,
    pack_groups,
    request_splits,
    user_profiles,
)
from qdrank.data.features import FeatureMap, stable_hash
from qdrank.utils.io import replace_dir

MANIFEST = "manifest.json"
FEATURE_MAP = "feature_map.json"
ITEM_TABLES = "items.safetensors"
FORMAT = "qdrank-shards"
VERSION = 1
READ_ROWS = 65_536          # source rows per record batch
BUCKET_ROWS = 1_000_000     # target impressions (and behaviours) per user bucket
STREAM_ROWS = 4_096         # requests read at a time when streaming shards in order
SHUFFLE_BUFFER = 16_384     # requests shuffled together when streaming shards shuffled
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}


def is_shard_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_dataset(path: str | os.PathLike, cfg: DataConfig, fmap: FeatureMap | None = None,
                 log: Callable[[str], None] | None = None) -> SearchLogDataset | ShardedDataset:
    """A shard directory (it has a manifest) streams; a dataset directory loads into memory."""
    if is_shard_dir(path):
        return ShardedDataset(path, cfg, fmap=fmap, log=log)
    return SearchLogDataset(path, cfg, fmap=fmap, log=log)


# ---------------------------------------------------------------------------------- writing

def _parquet(path: Path, name: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path / name)
    except Exception as e:  # pyarrow raises several types for corrupt/non-parquet files
        raise schema.DatasetError(name, f"cannot be read as Parquet ({type(e).__name__}: {e})") from e


def _batches(f: pq.ParquetFile, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    yield from f.iter_batches(batch_size=READ_ROWS, columns=columns)


def _bucket(keys: pd.Series | np.ndarray, n: int) -> np.ndarray:
    """User-hash bucket of each user id (ints hashed as ints, strings as strings: the tables agree)."""
    keys = pd.Series(keys)
    if pd.api.types.is_integer_dtype(keys):
        h = pd.util.hash_array(keys.to_numpy(dtype=np.int64))
    else:
        codes, uniq = pd.factorize(keys)
        h = stable_hash(pd.Index(uniq).map(str).to_numpy(dtype=object))[codes]
    return (h % np.uint64(n)).astype(np.int64)


def _probe(f: pq.ParquetFile) -> dict[str, pd.Series]:
    """Per column, a short Series with the dtype and first non-null value pandas would give the
    whole column (an int column holding a null converts to float): what type inference reads."""
    names = f.schema_arrow.names
    first: dict[str, pa.Table] = {}
    null: dict[str, pa.Table] = {}
    for batch in _batches(f):
        t = pa.Table.from_batches([batch])
        for c in names:
            arr = batch.column(c)
            if c not in first and arr.null_count < len(arr):
                first[c] = t.select([c]).slice(int(np.argmax(pc.is_valid(arr).to_numpy(zero_copy_only=False))), 1)
            if c not in null and arr.null_count:
                null[c] = t.select([c]).slice(int(np.argmax(~pc.is_valid(arr).to_numpy(zero_copy_only=False))), 1)
    out = {}
    for c in names:
        parts = [p[c] for p in (first, null) if c in p]
        t = pa.concat_tables(parts) if parts else f.schema_arrow.empty_table().select([c])
        out[c] = t.to_pandas()[c]
    return out


class _Writers:
    """One Arrow IPC stream per key, opened on first write (bucket and piece files on disk)."""

    def __init__(self, pattern: Path):
        self.pattern, self.open = pattern, {}

    def write(self, key: int, table: pa.Table) -> None:
        w = self.open.get(key)
        if w is None:
            path = Path(str(self.pattern).format(key))
            path.parent.mkdir(parents=True, exist_ok=True)
            w = self.open[key] = pa.ipc.new_stream(path, table.schema)
        w.write_table(table)

    def close(self) -> None:
        for w in self.open.values():
            w.close()


def _read_ipc(path: Path) -> pa.Table | None:
    if not path.exists():
        return None
    with pa.ipc.open_stream(path) as r:
        return r.read_all()


def _matrix_columns(prefix: str, a: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{prefix}.{j}": a[:, j] for j in range(a.shape[1])}


def _matrix(t: pa.Table, prefix: str, width: int, dtype) -> np.ndarray:
    if width == 0:
        return np.zeros((t.num_rows, 0), dtype=dtype)
    return np.stack([t.column(f"{prefix}.{j}").to_numpy() for j in range(width)], axis=1).astype(dtype)


def _list(offsets: np.ndarray, values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values.ravel(), dtype))


def _offsets(counts: np.ndarray, width: int = 1) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts * width)]).astype(np.int64)


def write_shards(data: str | os.PathLike, out: str | os.PathLike, cfg: DataConfig, rows_per_shard: int = 20_000,
                 row_group_size: int = 1_024, bucket_rows: int = BUCKET_ROWS,
                 log: Callable[[str], None] | None = None) -> dict:
    """Write the request-major shards of dataset ``data`` to ``out`` (atomically); return the manifest."""
    log = log or (lambda m: print(m, file=sys.stderr))
    data, out = Path(data), Path(out)
    if rows_per_shard < 1 or row_group_size < 1:
        raise ValueError("--rows-per-shard and the row group size must be >= 1")
    # the format's every rule, streamed (as `qdrank data validate`): shards refuse what training refuses
    for w in schema.validate_dataset(data, split=cfg.split).warnings:
        log(f"warning: {w}")
    spec = schema.load_spec(data)
    files = {n: _parquet(data, n) for n in schema.REQUIRED_TABLES + schema.OPTIONAL_TABLES if (data / n).exists()}
    req_f, imp_f, beh_f = files[schema.REQUESTS], files[schema.IMPRESSIONS], files[schema.BEHAVIORS]
    n_imp, n_beh = imp_f.metadata.num_rows, beh_f.metadata.num_rows
    # a bucket holds ~bucket_rows impressions, behaviours and history-window entries at most
    n_buckets = max(1, -(-max(n_imp, n_beh, req_f.metadata.num_rows * cfg.max_history) // max(bucket_rows, 1)))

    # ---- pass 1: request keys (id, time, split, user bucket), in file order --------------------
    has_split = "split" in req_f.schema_arrow.names
    cols = ["request_id", "user_id", "timestamp"] + (["split"] if has_split else [])
    rid_l, ts_l, split_l, bucket_l = [], [], [], []
    for batch in _batches(req_f, cols):
        df = batch.to_pandas()
        rid_l.append(df["request_id"].to_numpy(dtype=np.int64))
        ts_l.append(df["timestamp"].to_numpy(dtype=np.int64))
        bucket_l.append(_bucket(df["user_id"], n_buckets))
        if has_split:
            split_l.append(df["split"].to_numpy(dtype=object))
    rid, ts = np.concatenate(rid_l), np.concatenate(ts_l)
    req_bucket = np.concatenate(bucket_l)
    keys = pd.DataFrame({"timestamp": ts, **({"split": np.concatenate(split_l)} if has_split else {})})
    split = request_splits(keys, cfg)
    del rid_l, ts_l, split_l, bucket_l, keys
    by_rid = np.argsort(rid, kind="stable")
    rid_sorted = rid[by_rid]
    if not (split == 0).any():
        raise schema.DatasetError(schema.REQUESTS, "no request falls in the train split")
    cutoff = int(ts[split == 0].max()) + 1

    def request_pos(ids: np.ndarray) -> np.ndarray:
        """File-order position of each request id; every id is known (validated)."""
        return by_rid[np.minimum(np.searchsorted(rid_sorted, ids), len(rid_sorted) - 1)]

    # ---- pass 2: candidates per request -> shard of each request (time order within a split) ----
    counts = np.zeros(len(rid), dtype=np.int64)
    for batch in _batches(imp_f, ["request_id"]):
        counts += np.bincount(request_pos(batch.column(0).to_numpy()), minlength=len(rid))
    shard_of = np.full(len(rid), -1, dtype=np.int64)
    shards: list[dict] = []
    splits_info = {}
    for code, name in SPLIT_NAMES.items():
        rows = np.flatnonzero((split == code) & (counts > 0))
        rows = rows[np.lexsort((rid[rows], ts[rows]))]
        k = np.arange(len(rows)) // rows_per_shard
        shard_of[rows] = len(shards) + k
        info = {"requests": int(len(rows)), "impressions": int(counts[rows].sum()), "shards": []}
        for j in range(int(k.max()) + 1 if len(rows) else 0):
            sel = rows[k == j]
            entry = {"file": f"{name}-{j:05d}.parquet", "requests": int(len(sel)),
                     "impressions": int(counts[sel].sum())}
            shards.append(entry)
            info["shards"].append(entry)
        splits_info[name] = info

    # ---- pass 3: streaming feature fit over the training split ---------------------------------
    features = declare_features(spec, {n: _probe(files[n]) for n in
                                       (schema.REQUESTS, schema.IMPRESSIONS, schema.BEHAVIORS, schema.USERS,
                                        schema.ITEMS) if n in files}, log)
    fitter = FeatureFitter(features, cfg)
    train_users: set[str] = set()
    row = 0
    for batch in _batches(req_f):
        df = batch.to_pandas()
        train = split[row:row + len(df)] == 0
        fitter.update(schema.REQUESTS, df[train])
        train_users.update(df["user_id"][train].map(str))
        row += len(df)
    for batch in _batches(imp_f):
        df = batch.to_pandas()
        fitter.see_all(schema.IMPRESSIONS, df)
        fitter.update(schema.IMPRESSIONS, df[split[request_pos(df["request_id"].to_numpy())] == 0])
    for batch in _batches(beh_f):
        df = batch.to_pandas()
        fitter.see_all(schema.BEHAVIORS, df)
        fitter.update(schema.BEHAVIORS, df[df["timestamp"].to_numpy() < cutoff])
    users = files[schema.USERS].read().to_pandas() if schema.USERS in files else None
    items = files[schema.ITEMS].read().to_pandas() if schema.ITEMS in files else None
    if users is not None:
        fitter.update(schema.USERS, users[users["user_id"].map(str).isin(train_users)])
    if items is not None:
        fitter.update(schema.ITEMS, items)
        fitter.see_all(schema.ITEMS, items)
    del train_users
    fmap = fitter.finish(spec)
    log(f"feature map fitted on {splits_info['train']['requests']:,} training requests (streaming)")
    item_index = pd.Index(fmap.item_vocab)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _scatter(tmp, files, fmap, cfg, users, item_index, shard_of, req_bucket, request_pos, n_buckets)
        del users
        max_cands = _window_buckets(tmp, fmap, cfg, n_buckets, schema.SESSION in beh_f.schema_arrow.names)
        _assemble(tmp, shards, row_group_size)
        shutil.rmtree(tmp / "_work")
        sparse, dense = encode_item_tables(fmap, items)
        from safetensors.numpy import save_file
        save_file({"sparse": np.ascontiguousarray(sparse), "dense": np.ascontiguousarray(dense)}, str(tmp / ITEM_TABLES))
        (tmp / FEATURE_MAP).write_text(json.dumps(fmap.to_dict()))
        manifest = {"format": FORMAT, "version": VERSION, "source": str(data.resolve()),
                    "data_config": dataclasses.asdict(cfg), "n_requests": int(len(rid)),
                    "n_impressions": int(n_imp), "n_behaviors": int(n_beh), "rows_per_shard": rows_per_shard,
                    "max_candidates": max_cands,
                    "oracle_columns": [c for c in schema.ORACLE_COLUMNS if c in imp_f.schema_arrow.names],
                    "splits": splits_info}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _scatter(tmp: Path, files: dict, fmap: FeatureMap, cfg: DataConfig, users: pd.DataFrame | None,
             item_index: pd.Index, shard_of: np.ndarray, req_bucket: np.ndarray, request_pos, n_buckets: int) -> None:
    """Encode every table chunk by chunk into per-bucket files (requests, impressions, behaviours)."""
    work = tmp / "_work"
    req_w, imp_w, beh_w = (_Writers(work / "b{:05d}" / f"{n}.arrow") for n in ("req", "imp", "beh"))
    try:
        row = 0
        for batch in _batches(files[schema.REQUESTS]):
            df = batch.to_pandas()
            pos = np.arange(row, row + len(df))
            row += len(df)
            keep = shard_of[pos] >= 0
            df, pos = df[keep].reset_index(drop=True), pos[keep]
            prof = user_profiles(df["user_id"].map(str), users)
            enc = encode_requests(fmap, cfg, df)
            cols = {"request_id": df["request_id"].to_numpy(dtype=np.int64), "user": df["user_id"].to_numpy(),
                    "timestamp": df["timestamp"].to_numpy(dtype=np.int64), "shard": shard_of[pos],
                    **_matrix_columns("user_sparse", fmap.encode_sparse("user", prof)),
                    **_matrix_columns("user_dense", fmap.encode_numeric("user", prof)),
                    **{k2: v2 for k, v in enc.items() for k2, v2 in _matrix_columns(k, v).items()}}
            _scatter_table(req_w, pa.table(cols), req_bucket[pos])
        for batch in _batches(files[schema.IMPRESSIONS]):
            df = batch.to_pandas()
            pos = request_pos(df["request_id"].to_numpy())
            enc = encode_impressions(fmap, item_index, df)
            cols = {"request_id": df["request_id"].to_numpy(dtype=np.int64), "cand_item": enc["cand_item"],
                    "position": enc["position"], "click": enc["click"], "purchase": enc["purchase"],
                    **_matrix_columns("cand_sparse", enc["cand_sparse"]),
                    **_matrix_columns("cand_dense", enc["cand_dense"]), **enc["oracle"]}
            _scatter_table(imp_w, pa.table(cols), req_bucket[pos])
        for batch in _batches(files[schema.BEHAVIORS]):
            df = batch.to_pandas()
            enc = encode_behaviors(fmap, item_index, df)
            cols = {"user": df["user_id"].to_numpy(), "beh_ts": enc["beh_ts"], "beh_item": enc["beh_item"],
                    **{k2: v2 for k in ("beh_sparse", "beh_dense", "beh_query")
                       for k2, v2 in _matrix_columns(k, enc[k]).items()},
                    **({"beh_session": enc["beh_session"]} if "beh_session" in enc else {})}
            _scatter_table(beh_w, pa.table(cols), _bucket(df["user_id"], n_buckets))
    finally:
        for w in (req_w, imp_w, beh_w):
            w.close()


def _scatter_table(writers: _Writers, t: pa.Table, bucket: np.ndarray) -> None:
    order = np.argsort(bucket, kind="stable")  # stable: file order is kept inside a bucket
    b = bucket[order]
    cuts = np.flatnonzero(np.diff(b)) + 1
    for part in np.split(np.arange(len(b)), cuts):
        if len(part):
            writers.write(int(b[part[0]]), t.take(pa.array(order[part])))


def _window_buckets(tmp: Path, fmap: FeatureMap, cfg: DataConfig, n_buckets: int, sessions: bool) -> int:
    """Per user bucket: sort behaviours by (user, time), cut each request's window, group its
    candidates, and write the finished request rows into per-shard piece files (with the windows'
    session codes, ``hist_session``, when the behaviours have a ``session`` column)."""
    work = tmp / "_work"
    pieces = _Writers(work / "s{:05d}.arrow")
    widths = {"user_sparse": fmap.n_slots("user"), "user_dense": fmap.n_numeric("user"),
              "ctx_sparse": fmap.n_slots("context"), "ctx_dense": fmap.n_numeric("context"),
              "query": cfg.max_query_tokens}
    max_cands = 0
    try:
        for b in range(n_buckets):
            req = _read_ipc(work / f"b{b:05d}" / "req.arrow")
            if req is None:
                continue
            imp = _read_ipc(work / f"b{b:05d}" / "imp.arrow")
            beh = _read_ipc(work / f"b{b:05d}" / "beh.arrow")
            n_req = req.num_rows
            # users: one code per distinct id in this bucket (requests and behaviours agree on type)
            req_users = req.column("user").to_numpy(zero_copy_only=False)
            beh_users = (beh.column("user").to_numpy(zero_copy_only=False) if beh is not None
                         else req_users[:0])
            codes, _ = pd.factorize(pd.Series(np.concatenate([req_users, beh_users])))
            req_user, beh_user = codes[:n_req].astype(np.int64), codes[n_req:].astype(np.int64)
            req_ts = req.column("timestamp").to_numpy()
            if beh is not None:
                beh_ts = beh.column("beh_ts").to_numpy()
                order = np.lexsort((beh_ts, beh_user))
                beh, beh_user, beh_ts = beh.take(pa.array(order)), beh_user[order], beh_ts[order]
            else:
                beh_ts = np.zeros(0, dtype=np.int64)
            hs, he = history_bounds(beh_user, beh_ts, req_user, req_ts, cfg.max_history)
            win = concat_ranges(hs, he)
            hist_n = he - hs
            # candidates grouped by request row, file order inside a request
            imp_row = pd.Index(req.column("request_id").to_numpy()).get_indexer(imp.column("request_id").to_numpy())
            imp_order = np.argsort(imp_row, kind="stable")
            imp = imp.take(pa.array(imp_order))
            n_c = np.bincount(imp_row, minlength=n_req)
            max_cands = max(max_cands, int(n_c.max()) if n_req else 0)
            cols: dict[str, pa.Array] = {"request_id": req.column("request_id").combine_chunks(),
                                         "timestamp": req.column("timestamp").combine_chunks()}
            one = _offsets(np.ones(n_req, dtype=np.int64))
            for name, w in widths.items():
                dtype = pa.float32() if name.endswith("dense") else pa.int32()
                cols[name] = _list(one * w, _matrix(req, name, w, np.float32 if name.endswith("dense") else np.int64),
                                   dtype)
            ho, co = _offsets(hist_n), _offsets(n_c)
            if beh is not None:
                cols["hist_item"] = _list(ho, beh.column("beh_item").to_numpy()[win], pa.int32())
                cols["hist_ts"] = _list(ho, beh_ts[win], pa.int64())
                for name, w, dt, npdt in (("beh_sparse", fmap.n_slots("behavior"), pa.int32(), np.int64),
                                          ("beh_dense", fmap.n_numeric("behavior"), pa.float32(), np.float32),
                                          ("beh_query", BEHAVIOR_QUERY_TOKENS, pa.int32(), np.int64)):
                    cols["hist_" + name[4:]] = _list(_offsets(hist_n, w), _matrix(beh, name, w, npdt)[win], dt)
                if sessions:
                    cols["hist_session"] = _list(ho, beh.column("beh_session").to_numpy()[win], pa.int64())
            else:
                for name, dt in (("hist_item", pa.int32()), ("hist_ts", pa.int64()), ("hist_sparse", pa.int32()),
                                 ("hist_dense", pa.float32()), ("hist_query", pa.int32()),
                                 *((("hist_session", pa.int64()),) if sessions else ())):
                    cols[name] = _list(ho, np.zeros(0), dt)
            cols["cand_item"] = _list(co, imp.column("cand_item").to_numpy(), pa.int32())
            cols["cand_sparse"] = _list(_offsets(n_c, fmap.n_slots("candidate")),
                                        _matrix(imp, "cand_sparse", fmap.n_slots("candidate"), np.int64), pa.int32())
            cols["cand_dense"] = _list(_offsets(n_c, fmap.n_numeric("candidate")),
                                       _matrix(imp, "cand_dense", fmap.n_numeric("candidate"), np.float32), pa.float32())
            for name, dt in (("position", pa.int32()), ("click", pa.float32()), ("purchase", pa.float32())):
                cols[name] = _list(co, imp.column(name).to_numpy(), dt)
            for name in schema.ORACLE_COLUMNS:
                if name in imp.column_names:
                    cols[name] = _list(co, imp.column(name).to_numpy(), pa.float64())
            shard = req.column("shard").to_numpy()
            del req, imp, beh
            _scatter_table(pieces, pa.table(cols), shard)
            del cols
    finally:
        pieces.close()
    return max_cands


def _assemble(tmp: Path, shards: list[dict], row_group_size: int) -> None:
    """Each shard: its pieces from every bucket, in (time, request id) order, as one Parquet file."""
    for s, entry in enumerate(shards):
        t = _read_ipc(tmp / "_work" / f"s{s:05d}.arrow")
        t = t.sort_by([("timestamp", "ascending"), ("request_id", "ascending")])
        pq.write_table(t, tmp / entry["file"], row_group_size=row_group_size)
        (tmp / "_work" / f"s{s:05d}.arrow").unlink()


# --------------------------------------------------------------------------------- streaming

class ShardedDataset:
    """Shards streamed as batches, with the batching API of :class:`SearchLogDataset`.

    Memory: the item tables, the feature map and one buffer of requests (``shuffle_buffer`` when
    shuffled, else a few thousand), whatever the size of the log.
    """

    def __init__(self, path: str | os.PathLike, cfg: DataConfig, fmap: FeatureMap | None = None,
                 log: Callable[[str], None] | None = None, shuffle_buffer: int = SHUFFLE_BUFFER):
        self.path, self.cfg, self.shuffle_buffer = Path(path), cfg, shuffle_buffer
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise schema.DatasetError(MANIFEST, f"cannot be read in {self.path} ({e})") from e
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise schema.DatasetError(MANIFEST, f"not a {FORMAT} v{VERSION} manifest; re-run `qdrank data shard`")
        built = self.manifest["data_config"]
        for key, want in dataclasses.asdict(cfg).items():
            have = built.get(key)
            if (list(have) if isinstance(have, list | tuple) else have) != (list(want) if isinstance(want, tuple)
                                                                            else want):
                raise schema.DatasetError(MANIFEST, f"shards were built with data.{key}={have}, this run has "
                                          f"{want}; re-shard with the run's data settings")
        self.fmap = FeatureMap.from_dict(json.loads((self.path / FEATURE_MAP).read_text()))
        if fmap is not None and fmap.to_dict() != self.fmap.to_dict():
            raise schema.DatasetError(FEATURE_MAP, "the shards were encoded with another feature map than the "
                                      "run's; shard the dataset again or evaluate on the dataset directory")
        self.splits = self.manifest["splits"]
        self.max_candidates = int(self.manifest["max_candidates"])

    @property
    def oracle_columns(self) -> tuple[str, ...]:
        return tuple(self.manifest["oracle_columns"])

    def item_tables(self, tables_path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        from safetensors.numpy import load_file

        t = load_file(str(self.path / ITEM_TABLES))
        return t["sparse"], t["dense"]

    def n_requests(self, split: str) -> int:
        return int(self.splits[split]["requests"])

    def shard_files(self, split: str, shuffle: bool = False, seed: int = 0, rank: int = 0,
                    world: int = 1) -> list[dict]:
        """The shards rank ``rank`` of ``world`` reads (every world-th of the seeded shard order)."""
        shards = self.splits[split]["shards"]
        order = np.random.default_rng([seed, 1]).permutation(len(shards)) if shuffle else np.arange(len(shards))
        return [shards[i] for i in order[rank::world]]

    def iter_batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, rank: int = 0,
                     world: int = 1, extra_inputs: tuple[str, ...] = ()) -> Iterator[Batch]:
        """One pass over ``split``: shards in order (or in a seeded order, each buffer of
        ``shuffle_buffer`` requests permuted), cut into groups of whole requests exactly as
        :meth:`SearchLogDataset.pack` cuts the same sequence. Each rank reads only its shards; in
        training (shuffle, world > 1) every rank stops after the same number of batches, a bound
        every rank computes from the manifest, so collectives line up."""
        if world > 1 and shuffle and len(self.splits[split]["shards"]) < world:  # a rank without data
            raise ValueError(f"{split} has {len(self.splits[split]['shards'])} shards for {world} ranks; "
                             "re-shard with a smaller --rows-per-shard")
        mine = self.shard_files(split, shuffle, seed, rank, world)
        limit = None
        if world > 1 and shuffle:
            limit = min(sum(s["impressions"] for s in self.shard_files(split, True, seed, r, world))
                        for r in range(world)) // (batch_size + self.max_candidates)
            limit = max(limit, 1)
        rng = np.random.default_rng(seed)
        carry: pa.Table | None = None
        base = emitted = 0
        for table in self._buffers(mine, self.shuffle_buffer if shuffle else STREAM_ROWS):
            n_carry = 0 if carry is None else carry.num_rows
            if carry is not None:
                table = pa.concat_tables([carry, table])
            # the carried rows first, then the new rows (permuted when shuffling)
            order = np.arange(table.num_rows)
            if shuffle:
                order[n_carry:] = n_carry + rng.permutation(table.num_rows - n_carry)
            block = self.block(table)
            counts = (block.imp_end - block.imp_start)[order]
            groups = pack_groups(counts, batch_size, base)
            for g in groups[:-1]:
                if limit is not None and emitted >= limit:
                    return
                yield block.make_batch(order[g], extra_inputs)
                emitted += 1
            base += int(counts[: groups[-1][0]].sum())
            carry = table.take(pa.array(order[groups[-1]]))
        if carry is not None and carry.num_rows and (limit is None or emitted < limit):
            yield self.block(carry).make_batch(np.arange(carry.num_rows), extra_inputs)

    def _buffers(self, shards: list[dict], rows: int) -> Iterator[pa.Table]:
        buf: list[pa.RecordBatch] = []
        n = 0
        for s in shards:
            for batch in pq.ParquetFile(self.path / s["file"]).iter_batches(batch_size=min(rows, STREAM_ROWS)):
                buf.append(batch)
                n += batch.num_rows
                if n >= rows:
                    yield pa.Table.from_batches(buf)
                    buf, n = [], 0
        if buf:
            yield pa.Table.from_batches(buf)

    def block(self, t: pa.Table) -> RequestTable:
        """Shard rows as a :class:`RequestTable` (its behaviours: the windows, one after another)."""
        fmap, cfg, n = self.fmap, self.cfg, t.num_rows

        def flat(name: str, dtype) -> np.ndarray:
            return pc.list_flatten(t.column(name)).to_numpy().astype(dtype, copy=False)

        def lengths(name: str) -> np.ndarray:
            return pc.list_value_length(t.column(name)).to_numpy().astype(np.int64)

        hist_n, n_c = lengths("hist_item"), lengths("cand_item")
        hist_end, imp_end = np.cumsum(hist_n), np.cumsum(n_c)
        n_hist = int(hist_n.sum())
        n_cand = int(n_c.sum())

        def rows_mat(name: str, width: int, dtype, count: int) -> np.ndarray:
            return flat(name, dtype).reshape(count, width) if width else np.zeros((count, 0), dtype=dtype)

        return RequestTable(
            cfg, fmap, request_id=t.column("request_id").to_numpy(), req_ts=t.column("timestamp").to_numpy(),
            req_user=np.arange(n), user_sparse=rows_mat("user_sparse", fmap.n_slots("user"), np.int64, n),
            user_dense=rows_mat("user_dense", fmap.n_numeric("user"), np.float32, n),
            query=rows_mat("query", cfg.max_query_tokens, np.int64, n),
            ctx_sparse=rows_mat("ctx_sparse", fmap.n_slots("context"), np.int64, n),
            ctx_dense=rows_mat("ctx_dense", fmap.n_numeric("context"), np.float32, n),
            imp_start=imp_end - n_c, imp_end=imp_end, hist_start=hist_end - hist_n, hist_end=hist_end,
            cand_item=flat("cand_item", np.int64),
            cand_sparse=rows_mat("cand_sparse", fmap.n_slots("candidate"), np.int64, n_cand),
            cand_dense=rows_mat("cand_dense", fmap.n_numeric("candidate"), np.float32, n_cand),
            position=flat("position", np.int64), click=flat("click", np.float32),
            purchase=flat("purchase", np.float32),
            oracle={c: flat(c, np.float64) for c in self.oracle_columns},
            beh_ts=flat("hist_ts", np.int64), beh_item=flat("hist_item", np.int64),
            beh_sparse=rows_mat("hist_sparse", fmap.n_slots("behavior"), np.int64, n_hist),
            beh_dense=rows_mat("hist_dense", fmap.n_numeric("behavior"), np.float32, n_hist),
            beh_query=rows_mat("hist_query", BEHAVIOR_QUERY_TOKENS, np.int64, n_hist),
            beh_session=flat("hist_session", np.int64) if "hist_session" in t.column_names else None,
        )

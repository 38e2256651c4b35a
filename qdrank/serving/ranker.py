"""Rank requests: raw JSON -> checked dict -> :class:`Batch` -> encode once, score all candidates.

    ranker = Ranker.load("runs/din", store="history.sqlite")
    resp = ranker.rank({"user_id": 7, "query": "running shoes", "context": {"device": "app"},
                        "candidates": [{"item_id": 12, "price": 59.0}, {"item_id": 40}]})
    resp.candidates[0].item_id, resp.candidates[0].score

The request path is column-wise: :mod:`qdrank.serving.schemas` checks the body a column at a time,
the encoder looks each candidate feature column up in per-feature dicts built once from the feature
map (the same id rules as :meth:`FeatureMap.encode_sparse` / ``encode_numeric`` / ``encode_text``;
the tests check both paths give identical ids), and the response is built from numpy arrays.
The history rule is the training loader's: behaviours strictly earlier than the request time, the
most recent ``max_history``, chronological and left-aligned, time gaps bucketed with
:func:`time_bucket`.

:meth:`Ranker.rank_many` scores several requests in one forward (the HTTP server's micro-batches);
``backend="onnx"`` scores with an ONNX Runtime session of the exported model instead of PyTorch.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdrank.config import DataConfig, RunConfig
from qdrank.data.batch import NO_SESSION, TENSOR_FIELDS, Batch, history_session_ordinals
from qdrank.data.dataset import BEHAVIOR_QUERY_TOKENS, time_bucket
from qdrank.data.features import Feature, FeatureMap, canonical_key, standardize_numeric
from qdrank.serving.schemas import (
    NUMBER_RE,
    RankedItem,
    RankRequest,
    RankResponse,
    RequestError,
    check_events,
    check_rank_request,
)
from qdrank.serving.store import HistoryStore
from qdrank.training import checkpoint as ckpt

FORMULAS = ("ctr", "ctr_cvr")
BACKENDS = ("torch", "onnx")
__all__ = ["Ranker", "RequestEncoder", "RequestError", "ServingConfig", "encode_request", "concat_batches"]


@dataclass
class ServingConfig:
    """Serving knobs (``Ranker.load(..., **overrides)``, ``qdrank serve --set key=value``)."""

    formula: str = "auto"            # ctr | ctr_cvr | auto (ctr_cvr when the run has a CVR task)
    alpha: float = 1.0               # score = ctr * cvr ** alpha
    backend: str = "torch"           # torch | onnx (ONNX Runtime session of the exported model)
    onnx_path: str | None = None     # backend onnx: an exported model.onnx (default: export at load)
    num_threads: int = 1             # torch / ONNX Runtime intra-op threads; 0 = leave the library's default
    denoise_steps: int = 1           # passed to model configs that have `denoise_steps` (diffusion)
    max_candidates: int = 2000       # more -> 413
    max_history_inline: int = 10000  # more inline behaviours -> 413
    max_events: int = 10000          # per POST /v1/events call -> 413
    max_body_bytes: int = 32 * 2**20  # HTTP bodies larger than this -> 413
    body_timeout_s: float = 10.0     # HTTP: a body not fully received by then -> 408, connection closed
    batch_wait_ms: float = 1.0       # HTTP micro-batching: gather concurrent requests this long at most
    max_batch: int = 32              # HTTP micro-batching: requests per forward at most
    max_history: int = 0             # 0 = the run's data.max_history (only raise it for models without
    #                                   length-bound parameters; benchmarks use it)
    store: str | None = None         # SQLite file; None = an in-memory store (events still work)
    trace_encoder: bool = True       # torch backend: run the request encoding as a TorchScript trace,
    #                                   checked against eager at load (eager when it differs or fails)
    gc_freeze: bool = True           # after loading, move the process's objects out of the cyclic GC's
    #                                   reach (gc.freeze): full collections then skip the model's heap

    @classmethod
    def build(cls, base: ServingConfig | dict | None = None, **overrides) -> ServingConfig:
        if isinstance(base, ServingConfig):
            base = dataclasses.asdict(base)
        values = {**(base or {}), **{k: v for k, v in overrides.items() if v is not None}}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown serving option(s) {sorted(unknown)}; valid: {', '.join(sorted(names))}")
        cfg = cls(**values)
        if cfg.formula not in (*FORMULAS, "auto"):
            raise ValueError(f"serving formula must be one of ctr, ctr_cvr, auto; got {cfg.formula!r}")
        if cfg.backend not in BACKENDS:
            raise ValueError(f"serving backend must be one of {', '.join(BACKENDS)}; got {cfg.backend!r}")
        if not math.isfinite(float(cfg.alpha)) or cfg.alpha < 0:
            raise ValueError(f"serving alpha must be a finite number >= 0, got {cfg.alpha!r}")
        for k in ("max_candidates", "max_history_inline", "max_events", "max_body_bytes", "max_batch"):
            if int(getattr(cfg, k)) < 1:
                raise ValueError(f"serving {k} must be >= 1")
        for k in ("body_timeout_s", "batch_wait_ms"):
            if not math.isfinite(float(getattr(cfg, k))) or float(getattr(cfg, k)) < 0:
                raise ValueError(f"serving {k} must be a finite number >= 0")
        return cfg


# ---- encoding ------------------------------------------------------------------------------------
@dataclass
class Encoded:
    batch: Batch
    unknown_items: int
    unknown_user: bool
    unknown_history_items: int
    history_used: int
    history_source: str
    timestamp: int
    item_known: np.ndarray = field(repr=False)
    item_ids: list = field(default_factory=list, repr=False)


def _row_loc(loc: tuple, i: int) -> tuple:
    return (*loc, i) if loc and loc[-1] in ("candidates", "history") else loc


class RequestEncoder:
    """Per-feature lookup tables built once from a :class:`FeatureMap`; encodes checked requests."""

    TEXT_CACHE = 100_000

    def __init__(self, fmap: FeatureMap, data_cfg: DataConfig, max_history: int | None = None):
        self.fmap, self.data_cfg = fmap, data_cfg
        self.L = int(max_history or data_cfg.max_history)
        self.item_row = {k: i + 2 for i, k in enumerate(fmap.item_vocab)}
        self.tables: dict[str, dict[str, int]] = {}
        for f in fmap.features.values():
            if f.type in ("categorical", "list"):
                self.tables[f.name] = {v: f.offset + 1 + i for i, v in enumerate(f.vocab)}
        roles = ("user", "context", "candidate", "behavior")
        self.sparse_layout = {r: fmap.slot_layout(r) for r in roles}
        self.numeric = {r: fmap.role_features(r, sparse=False) for r in roles}
        self.n_slots = {r: fmap.n_slots(r) for r in roles}
        self.user_vocab = self.tables.get("user_id", {})
        self._text: dict[tuple[str, int], np.ndarray] = {}
        self._text_lock = threading.Lock()

    def known_features(self) -> dict[str, dict[str, str]]:
        """role -> {feature name: type}: what the published request schema lists."""
        return {r: {f.name: f.type for f, _, _ in self.sparse_layout[r]} | {f.name: f.type for f in self.numeric[r]}
                for r in self.sparse_layout}

    # ---- value encoders -------------------------------------------------------------------------
    def text(self, s: str | None, width: int) -> np.ndarray:
        key = ("" if s is None else str(s), width)
        ids = self._text.get(key)
        if ids is None:
            ids = self.fmap.encode_text([key[0]], width)[0]
            with self._text_lock:
                if len(self._text) >= self.TEXT_CACHE:
                    self._text.clear()
                self._text[key] = ids
        return ids

    def _cat(self, f: Feature, v: Any, loc: tuple) -> int:
        if v is None:
            return 0
        if isinstance(v, list | dict):
            raise RequestError(loc, f"feature '{f.name}' is categorical: expected a single value, got a "
                               f"{type(v).__name__}")
        try:
            key = canonical_key(v)
        except ValueError:  # an integer too long to print: no training value looks like it
            return f.offset
        return self.tables[f.name].get(key, f.offset)

    def _cat_column(self, f: Feature, col: list, loc: tuple) -> np.ndarray:
        table, oov = self.tables[f.name], f.offset
        types = set(map(type, col))
        if types <= {str, int}:  # canonical_key of both is str()
            return np.fromiter(map(table.get, map(str, col), repeat(oov)), dtype=np.int64, count=len(col))
        if types <= {str, int, type(None)}:
            get = table.get
            return np.fromiter((0 if v is None else get(str(v), oov) for v in col), dtype=np.int64, count=len(col))
        return np.fromiter((self._cat(f, v, (*_row_loc(loc, i), f.name)) for i, v in enumerate(col)),
                           dtype=np.int64, count=len(col))

    def _num_column(self, f: Feature, col: list, loc: tuple) -> np.ndarray:
        """Raw values -> standardised float32, missing = 0, clipped to +/- NUMERIC_Z_CLIP."""
        types = set(map(type, col))
        if not types <= {int, float, type(None), bool}:
            col = list(col)
            for i, v in enumerate(col):
                t = type(v)
                if t is str:
                    if not NUMBER_RE.match(v):
                        raise RequestError((*_row_loc(loc, i), f.name), f"feature '{f.name}' is numeric: "
                                           f"{v[:40]!r} is not a number")
                    col[i] = float(v)
                elif not (t is int or t is float or t is bool or v is None):
                    raise RequestError((*_row_loc(loc, i), f.name), f"feature '{f.name}' is numeric: expected "
                                       f"a number, got {type(v).__name__}")
        try:
            x = np.array(col, dtype=np.float64)
        except OverflowError:  # integers beyond float range
            x = np.array([None if v is None else ((math.inf if v > 0 else -math.inf) if abs(v) > 1e308 else float(v))
                          for v in col], dtype=np.float64)
        return standardize_numeric(f, x)

    def text_column(self, col: list, width: int) -> np.ndarray:
        """Strings (a falsy value = no text) -> [n, width] token ids, each distinct string encoded once."""
        distinct = dict.fromkeys(col)
        pos = {v: i for i, v in enumerate(distinct)}
        idx = np.fromiter(map(pos.__getitem__, col), dtype=np.int64, count=len(col))
        zeros = np.zeros(width, dtype=np.int64)
        table = np.stack([self.text(v, width) if v else zeros for v in distinct]) if distinct else zeros[None]
        return table[idx]

    def role_rows(self, role: str, rows: list[dict[str, Any]] | dict[str, list], loc: tuple
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of one role (context, candidates, behaviours, ...), as dicts or as columns (name -> values,
        a missing name = no value) -> (sparse ids, dense values), by column."""
        if isinstance(rows, dict):
            n = len(next(iter(rows.values()))) if rows else 0

            def column(name: str) -> list | None:
                return rows.get(name)
        else:
            n = len(rows)

            def column(name: str) -> list | None:
                return list(map(dict.get, rows, repeat(name)))
        sp = np.zeros((n, self.n_slots[role]), dtype=np.int64)
        de = np.zeros((n, len(self.numeric[role])), dtype=np.float32)
        for f, start, width in self.sparse_layout[role]:
            name = f.name
            col = column(name)
            if col is None or col.count(None) == n:
                continue
            if f.type == "categorical":
                sp[:, start] = self._cat_column(f, col, loc)
            elif f.type == "list":
                for i, v in enumerate(col):
                    if v is not None:
                        vs = v if isinstance(v, list) else [v]
                        for j, x in enumerate(vs[:width]):
                            sp[i, start + j] = self._cat(f, x, (*_row_loc(loc, i), name))
            else:  # text
                for i, v in enumerate(col):
                    if v is not None and not isinstance(v, str):
                        raise RequestError((*_row_loc(loc, i), name), f"feature '{name}' is text: expected a string")
                sp[:, start:start + width] = self.text_column(col, width)
        for j, f in enumerate(self.numeric[role]):
            col = column(f.name)
            if col is not None and col.count(None) != n:
                de[:, j] = self._num_column(f, col, loc)
        return sp, de

    def item_rows(self, ids: list) -> np.ndarray:
        get = self.item_row.get
        if set(map(type, ids)) <= {str, int}:  # canonical_key of both is str()
            return np.fromiter(map(get, map(str, ids), repeat(1)), dtype=np.int64, count=len(ids))
        return np.fromiter((get(i if isinstance(i, str) else canonical_key(i), 1) for i in ids), dtype=np.int64,
                           count=len(ids))

    # ---- a request ----------------------------------------------------------------------------------
    def encode(self, req: dict[str, Any] | RankRequest, store: HistoryStore | None = None,
               now: int | None = None) -> Encoded:
        """A request (a dict checked by :func:`check_rank_request`, or a :class:`RankRequest`) -> Batch."""
        if isinstance(req, RankRequest):
            req = check_rank_request(req.to_plain())
        ts = req["timestamp"]
        ts = int(ts if ts is not None else (now if now is not None else time.time()))
        L = self.L
        user_id = req["user_id"]

        # user profile: store row, overridden by the request's profile; user_id always the request's
        prof: dict[str, Any] = {}
        if store is not None:
            prof.update(store.profile(user_id) or {})
        if req["profile"]:
            prof.update(req["profile"])
        prof["user_id"] = user_id
        unknown_user = canonical_key(user_id) not in self.user_vocab
        loc = ("body", "profile") if req["profile"] else ("body", "user_id")
        user_sp, user_de = self.role_rows("user", [prof], loc)
        ctx_sp, ctx_de = self.role_rows("context", [req["context"] or {}], ("body", "context"))
        query = self.text(req["query"], self.data_cfg.max_query_tokens)[None, :]

        # history: strictly earlier than the request, most recent L, chronological; behaviours as dicts
        # (inline) or as columns (the store's read: no dict per behaviour)
        inline = req["history"]
        hist: list[dict[str, Any]] | dict[str, list]
        if inline is not None:
            source = "inline"
            tss = np.fromiter(map(itemgetter("timestamp"), inline), dtype=np.int64, count=len(inline))
            keep = np.flatnonzero(tss < ts)
            keep = keep[np.argsort(tss[keep], kind="stable")][-L:] if L > 0 else keep[:0]
            hist = [inline[i] for i in keep.tolist()]
            n = len(hist)
        elif store is not None:
            hist = store.history_columns(user_id, ts, L)
            source = "store"
            n = len(hist["item_id"])
        else:
            hist = []
            source = "none"
            n = 0
        hist_item = np.zeros((1, L), dtype=np.int64)
        hist_sparse = np.zeros((1, L, self.n_slots["behavior"]), dtype=np.int64)
        hist_dense = np.zeros((1, L, len(self.numeric["behavior"])), dtype=np.float32)
        hist_query = np.zeros((1, L, BEHAVIOR_QUERY_TOKENS), dtype=np.int64)
        hist_time = np.zeros((1, L), dtype=np.int64)
        hist_age = np.zeros((1, L), dtype=np.float32)
        hist_session = np.full((1, L), NO_SESSION, dtype=np.int64)
        unknown_hist = 0
        if n:
            if isinstance(hist, dict):
                items, queries, times = hist["item_id"], hist["query"], hist["timestamp"]
            else:
                items, queries = [h["item_id"] for h in hist], [h.get("query") for h in hist]
                times = [h["timestamp"] for h in hist]
            rows = self.item_rows(items)
            unknown_hist = int((rows == 1).sum())
            hist_item[0, :n] = rows
            sp, de = self.role_rows("behavior", hist, ("body", "history"))
            hist_sparse[0, :n], hist_dense[0, :n] = sp, de
            hist_query[0, :n] = self.text_column(queries, BEHAVIOR_QUERY_TOKENS)
            gaps = ts - np.fromiter(times, dtype=np.int64, count=n)
            hist_time[0, :n] = time_bucket(gaps, self.fmap.time_buckets)
            hist_age[0, :n] = np.maximum(gaps, 0)
            sessions = hist.get("session") if isinstance(hist, dict) else [h.get("session") for h in hist]
            if sessions is not None and sessions.count(None) != n:
                hist_session[0, :n] = history_session_ordinals(sessions)

        # candidates
        cands = req["candidates"]
        N = len(cands)
        ids = [c["item_id"] for c in cands]
        cand_item = self.item_rows(ids)
        known = cand_item > 1
        cand_sp, cand_de = self.role_rows("candidate", cands, ("body", "candidates"))
        t = torch.from_numpy
        batch = Batch(
            request_id=torch.zeros(1, dtype=torch.long),
            user_sparse=t(user_sp), user_dense=t(user_de), ctx_sparse=t(ctx_sp), ctx_dense=t(ctx_de),
            query=t(query), hist_item=t(hist_item), hist_sparse=t(hist_sparse), hist_dense=t(hist_dense),
            hist_query=t(hist_query), hist_time=t(hist_time), hist_age=t(hist_age), hist_session=t(hist_session),
            hist_len=torch.tensor([n], dtype=torch.long),
            cand_req=torch.zeros(N, dtype=torch.long), cand_item=t(cand_item), cand_sparse=t(cand_sp),
            cand_dense=t(cand_de), position=torch.zeros(N, dtype=torch.long), click=torch.zeros(N),
            purchase=torch.full((N,), -1.0),
        )
        return Encoded(batch, int(N - known.sum()), unknown_user, unknown_hist, n, source, ts, known, ids)


def concat_batches(batches: list[Batch]) -> Batch:
    """Requests of one-request batches (equal history length) -> one batch of R requests."""
    if len(batches) == 1:
        return batches[0]
    out: dict[str, torch.Tensor] = {}
    for name in TENSOR_FIELDS:
        if name != "cand_req":
            out[name] = torch.cat([getattr(b, name) for b in batches])
    out["request_id"] = torch.arange(len(batches))
    out["cand_req"] = torch.cat([torch.full((b.cand_item.shape[0],), i, dtype=torch.long)
                                 for i, b in enumerate(batches)])
    extra = {k: torch.cat([b.extra[k] for b in batches]) for k in batches[0].extra}
    return Batch(**out, extra=extra)


_ENCODERS: dict[int, tuple[FeatureMap, DataConfig, RequestEncoder]] = {}


def encode_request(fmap: FeatureMap, data_cfg: DataConfig, request: RankRequest | dict,
                   store: HistoryStore | None = None) -> tuple[Batch, int, bool]:
    """Raw request -> (Batch with R=1, number of unknown candidate items, whether the user is unknown).

    The lookup tables are built once per (feature map, data config) and cached."""
    req = check_rank_request(request.to_plain() if isinstance(request, RankRequest) else request)
    hit = _ENCODERS.get(id(fmap))
    if hit is None or hit[0] is not fmap or hit[1] is not data_cfg:
        hit = (fmap, data_cfg, RequestEncoder(fmap, data_cfg))
        _ENCODERS[id(fmap)] = hit
    enc = hit[2].encode(req, store)
    return enc.batch, enc.unknown_items, enc.unknown_user


# ---- backends ------------------------------------------------------------------------------------
class OnnxScorer:
    """An ONNX Runtime session of the run's exported scoring function (one request per call).

    Threads are set explicitly (intra-op = ``num_threads``, inter-op 1, sequential execution): the
    server runs one process per core, so the library's own pools would only oversubscribe."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, fmap: FeatureMap, path: str | Path | None,
                 num_threads: int, max_history: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("serving backend onnx needs onnxruntime: pip install 'qdrank[onnx]' (or use "
                             "backend=torch)") from None

        from qdrank.serving.export import example_batch, export_model

        self._tmp = None
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="qdrank-onnx-")
            path = export_model(model, example_batch(fmap, cfg, max_history=max_history),
                                Path(self._tmp.name) / "model.onnx", "onnx", cfg.model_name)
        so = ort.SessionOptions()
        if num_threads > 0:
            so.intra_op_num_threads = int(num_threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        widths = {i.shape[1] for i in self.session.get_inputs() if i.name.startswith("hist_") and len(i.shape) > 1}
        if widths and widths != {max_history}:
            raise ValueError(f"{path}: the ONNX model was exported for histories of {sorted(widths)} behaviours, "
                             f"but serving pads histories to {max_history}; export it again with the serving "
                             "max_history, or leave onnx_path unset to export at load")

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ctr, cvr = self.session.run(None, {n: getattr(batch, n).numpy() for n in self.inputs})
        return torch.from_numpy(ctr), torch.from_numpy(cvr)


# ---- traced request encoding -------------------------------------------------------------------------
#: the Batch fields of the request side (what ``encode_request`` may read)
REQUEST_FIELDS = ("request_id", "user_sparse", "user_dense", "ctx_sparse", "ctx_dense", "query", "hist_item",
                  "hist_sparse", "hist_dense", "hist_query", "hist_time", "hist_age", "hist_session", "hist_len")


class _RequestSide(torch.nn.Module):
    """``model.encode_request`` of a batch's request-side tensors (no candidates), for the tracer."""

    def __init__(self, model: torch.nn.Module, cand_sparse: int, cand_dense: int):
        super().__init__()
        self.model, self.widths = model, (cand_sparse, cand_dense)

    def forward(self, *request: torch.Tensor) -> dict[str, torch.Tensor]:
        z = request[0].new_zeros(0)
        b = Batch(**dict(zip(REQUEST_FIELDS, request)), cand_req=z, cand_item=z,
                  cand_sparse=z.new_zeros(0, self.widths[0]), cand_dense=torch.zeros(0, self.widths[1]),
                  position=z, click=torch.zeros(0), purchase=torch.zeros(0))
        return dict(self.model.encode_request(b))


class TracedRequestEncoder:
    """The model's request encoding (``encode_request``) for one request as a TorchScript trace.

    Why: at serving sizes the request side is a few hundred tiny ops (DiffusionGS: 4 layers over 100
    tokens), and eager PyTorch spends more time dispatching them from Python than computing them;
    the trace runs the same ops without the interpreter (measured ~2x faster for that encoder).
    Used at the history width it was traced at, and only after it gave the eager encoder's state
    (every key, |diff| <= 1e-5) on probe requests of several history lengths (none, one, half,
    full): a model whose encoder branches on the data in Python is then caught at load and served
    eagerly. Batches of several requests (micro-batches) use it only if it also gave the eager
    state of the probes batched together (``batches``). The trace shares the model's parameters (not frozen copies). Candidates
    are never read: a model whose request state depends on them fails the check."""

    TOL = 1e-5

    def __init__(self, model: torch.nn.Module, probes: list[Batch]):
        if getattr(model, "extra_inputs", ()) or not getattr(model, "gradient_trained", True):
            raise ValueError("not a neural request encoder")
        b0 = probes[0]
        self.width = int(b0.hist_item.shape[1])
        wrapper = _RequestSide(model, int(b0.cand_sparse.shape[1]), int(b0.cand_dense.shape[1])).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings: what they warn about is what the probes check
            self.module = torch.jit.trace(wrapper, self._inputs(b0), check_trace=False, strict=False)
        emb = getattr(model, "emb", None)
        if emb is not None and hasattr(emb, "_items_cache"):
            emb._items_cache = None  # the tracer's tensors
        with torch.inference_mode():
            for b in probes:
                bad = self._differs(model.encode_request(b), self.module(*self._inputs(b)))
                if bad:
                    raise ValueError(f"the trace differs from the eager encoder on {bad} "
                                     f"(history of {int(b.hist_len[0])} behaviours)")
            # several requests in one batch (micro-batches): the same trace, if it gives their eager state
            many = concat_batches(probes)
            self.batches = not self._differs(model.encode_request(many), self.module(*self._inputs(many)))

    @classmethod
    def _differs(cls, ref: dict, got: dict) -> list[str]:
        """Keys whose traced value is not the eager one (missing, extra, or apart by more than TOL)."""
        bad = [k for k, v in ref.items() if not isinstance(v, torch.Tensor) or k not in got or not cls._close(got[k], v)]
        return bad or sorted(set(got) ^ set(ref))

    @classmethod
    def _close(cls, a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        return not a.numel() or float((a - b).abs().max()) <= cls.TOL

    @staticmethod
    def _inputs(b: Batch) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(b, n) for n in REQUEST_FIELDS)

    def accepts(self, b: Batch) -> bool:
        return (b.n_requests == 1 or self.batches) and b.hist_item.shape[1] == self.width and not b.extra

    def __call__(self, b: Batch) -> dict[str, torch.Tensor]:
        return dict(self.module(*self._inputs(b)))


def probe_batches(fmap: FeatureMap, cfg: RunConfig, width: int) -> list[Batch]:
    """Requests of known items whose histories hold width, none, one and about half the behaviours."""
    from qdrank.serving.export import example_batch

    return [example_batch(fmap, cfg, n_candidates=3, n_history=n, max_history=width)
            for n in dict.fromkeys((width, 0, 1, max(width // 2, 1) + 1))]


# ---- the ranker ----------------------------------------------------------------------------------
class Ranker:
    """A trained run ready to rank requests. Thread-safe: the model is read-only at inference."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, fmap: FeatureMap,
                 serving: ServingConfig | None = None, store: HistoryStore | None = None,
                 run_dir: Path | None = None):
        self.model, self.cfg, self.fmap = model, cfg, fmap
        self.serving = serving or ServingConfig()
        self.run_dir = run_dir
        s = self.serving
        self.formula = ("ctr_cvr" if fmap.has_purchase else "ctr") if s.formula == "auto" else s.formula
        if self.formula == "ctr_cvr" and not fmap.has_purchase:
            raise ValueError("serving formula ctr_cvr needs a CVR task, but the run's data has no purchase "
                             "labels; use formula=ctr")
        self.alpha = float(s.alpha)
        self.store = store if store is not None else HistoryStore(None)
        self.encoder = RequestEncoder(fmap, cfg.data, s.max_history or None)
        self.known = self.encoder.known_features()
        if s.num_threads > 0:
            torch.set_num_threads(int(s.num_threads))
        model.eval()
        self.onnx = OnnxScorer(model, cfg, fmap, s.onnx_path, s.num_threads, self.encoder.L) if s.backend == "onnx" else None
        if self.onnx is None and getattr(model, "gradient_trained", False) and hasattr(model, "freeze_item_cache"):
            model.freeze_item_cache()  # candidate-side vectors of every known item, now rather than on request 1
        self.traced: TracedRequestEncoder | None = None
        self.trace_status = "off" if self.onnx is not None or not s.trace_encoder else "eager"
        if self.trace_status == "eager":
            try:
                self.traced = TracedRequestEncoder(model, probe_batches(fmap, cfg, self.encoder.L))
                self.trace_status = "traced"
            except Exception as e:  # noqa: BLE001 - any failure: serve eagerly, say why in /v1/model
                self.trace_status = f"eager ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        if s.gc_freeze:
            # a full collection walks every tracked object: with the model, tables and libraries loaded
            # that cost ~200 ms of CPU now and then (measured on 10,000-behaviour requests, whose
            # allocations trigger it); what is alive now stays alive, so take it out of the GC's reach
            gc.collect()
            gc.freeze()

    @classmethod
    def load(cls, run_dir: str | Path, store: str | Path | HistoryStore | None = None,
             config: ServingConfig | dict | None = None, **overrides) -> Ranker:
        serving = ServingConfig.build(config, **overrides)
        store = store if store is not None else serving.store
        if store is not None and not isinstance(store, HistoryStore):
            serving = dataclasses.replace(serving, store=str(store))
            store = HistoryStore(store)
        model, cfg, fmap = ckpt.load_model(
            run_dir, model_overrides={"denoise_steps": int(serving.denoise_steps)} if serving.denoise_steps else None)
        return cls(model, cfg, fmap, serving, store, Path(run_dir))

    # ---- ranking ------------------------------------------------------------------------------------
    def check(self, request: RankRequest | dict) -> dict[str, Any]:
        """Checks a request (shape, types, sizes: RequestError naming the field) -> its plain dict."""
        s = self.serving
        body = request.to_plain() if isinstance(request, RankRequest) else request
        return check_rank_request(body, s.max_candidates, s.max_history_inline, self.known)

    def check_limits(self, req: RankRequest | dict) -> None:  # kept for callers of the old API
        self.check(req)

    def encode(self, request: RankRequest | dict) -> Encoded:
        return self.encoder.encode(self.check(request), self.store)

    @torch.inference_mode()
    def logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each request once, score every candidate (what ``forward(use_position=False)`` does)."""
        if self.onnx is not None:
            if batch.n_requests == 1:
                return self.onnx(batch)
            raise ValueError("the ONNX backend scores one request per call")
        tr = self.traced
        state = tr(batch) if tr is not None and tr.accepts(batch) else self.model.encode_request(batch)
        return self.model.score(state, batch)

    def scores(self, ctr_logit: torch.Tensor, cvr_logit: torch.Tensor):
        ctr = torch.sigmoid(ctr_logit.double()).numpy()
        cvr = torch.sigmoid(cvr_logit.double()).numpy()
        score = ctr * cvr ** self.alpha if self.formula == "ctr_cvr" else ctr
        return ctr, cvr, score

    def rank(self, request: RankRequest | dict) -> RankResponse:
        enc = self.encode(request)
        return self.respond(enc, *self.logits(enc.batch))

    def rank_many(self, requests: list[RankRequest | dict]) -> list[RankResponse | RequestError]:
        """Several requests, one forward (torch backend): a request's error is its result, not the batch's.

        Scores equal :meth:`rank`'s up to float rounding (tested)."""
        encoded: list[Encoded | RequestError] = []
        for r in requests:
            try:
                encoded.append(self.encode(r))
            except RequestError as e:
                encoded.append(e)
            except (ValueError, TypeError, KeyError, OverflowError, IndexError) as e:
                # the input reached a case the encoder did not anticipate: still the input's fault
                encoded.append(RequestError(("body",), f"could not encode the request: {type(e).__name__}: "
                                            f"{str(e)[:200]}"))
        ok = [e for e in encoded if isinstance(e, Encoded)]
        out: dict[int, RankResponse] = {}
        if ok and (self.onnx is not None or len(ok) == 1):
            for e in ok:
                out[id(e)] = self.respond(e, *self.logits(e.batch))
        elif ok:
            ctr, cvr = self.logits(concat_batches([e.batch for e in ok]))
            sizes = [e.batch.cand_item.shape[0] for e in ok]
            for e, c, v in zip(ok, ctr.split(sizes), cvr.split(sizes)):
                out[id(e)] = self.respond(e, c, v)
        return [out[id(e)] if isinstance(e, Encoded) else e for e in encoded]

    def respond(self, enc: Encoded, ctr_l: torch.Tensor, cvr_l: torch.Tensor) -> RankResponse:
        """Scores of an encoded request -> the ranked response (built from arrays, no per-field work)."""
        ctr, cvr, score = self.scores(ctr_l, cvr_l)
        order = np.argsort(-score, kind="stable")
        ids = enc.item_ids
        show_cvr = self.fmap.has_purchase
        o = order.tolist()
        cvr_l = cvr[order].tolist() if show_cvr else [None] * len(o)
        items = list(map(RankedItem, [ids[i] for i in o], ctr[order].tolist(), cvr_l, score[order].tolist(),
                         enc.item_known[order].tolist()))
        return RankResponse(
            model=self.cfg.model_name, timestamp=enc.timestamp, formula=self.formula, alpha=self.alpha,
            candidates=items, unknown_items=enc.unknown_items, unknown_user=enc.unknown_user,
            unknown_users=int(enc.unknown_user), unknown_history_items=enc.unknown_history_items,
            history_used=enc.history_used, history_source=enc.history_source)

    # ---- store & info -----------------------------------------------------------------------------------
    def append_events(self, events: list | dict) -> int:
        """Events (dicts or :class:`~qdrank.serving.schemas.Event`) -> appended count; checked first."""
        evs = [e if isinstance(e, dict) else e.model_dump() for e in events]
        return self.store.append(check_events({"events": evs}, self.serving.max_events, self.known["behavior"]))

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` shows: no absolute paths (run and store by name only)."""
        metrics = None
        if self.run_dir is not None and (self.run_dir / "result.json").exists():
            try:
                metrics = json.loads((self.run_dir / "result.json").read_text())
            except (OSError, ValueError):
                metrics = None
        feats = {}
        for role in ("user", "context", "candidate", "item", "behavior"):
            fs = self.fmap.role_features(role)
            if fs:
                feats[role] = [{"name": f.name, "type": f.type,
                                **({"n_values": len(f.vocab)} if f.type in ("categorical", "list") else {})}
                               for f in fs]
        serving = {**dataclasses.asdict(self.serving), "formula": self.formula, "request_encoder": self.trace_status}
        for k in ("store", "onnx_path"):
            serving[k] = Path(serving[k]).name if serving[k] else None
        return {
            "model": self.cfg.model_name, "run": self.run_dir.name if self.run_dir else None,
            "config": _strip_paths(self.cfg.to_dict()), "serving": serving,
            "metrics": _strip_paths(metrics), "features": feats,
            "schema": {"has_purchase": self.fmap.has_purchase, "max_history": self.encoder.L,
                       "max_query_tokens": self.cfg.data.max_query_tokens, "n_items": len(self.fmap.item_vocab),
                       "n_users": len(self.encoder.user_vocab), "user_key_type": self.fmap.user_key_type,
                       "item_key_type": self.fmap.item_key_type},
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
        }


def _strip_paths(v: Any) -> Any:
    """Absolute paths in configs / results -> their last component (the server's layout stays private)."""
    if isinstance(v, dict):
        return {k: _strip_paths(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_strip_paths(x) for x in v]
    if isinstance(v, str) and (v.startswith("/") or (len(v) > 2 and v[1] == ":" and v[2] in "\\/")):
        return Path(v).name
    return v

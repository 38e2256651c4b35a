"""Rank one request: raw JSON -> :class:`Batch` (R=1) -> encode once, score all candidates.

    ranker = Ranker.load("runs/din", store="history.sqlite")
    resp = ranker.rank({"user_id": 7, "query": "running shoes", "context": {"device": "app"},
                        "candidates": [{"item_id": 12, "price": 59.0}, {"item_id": 40}]})
    resp.candidates[0].item_id, resp.candidates[0].score

Encoding uses per-feature lookup dicts built once from the feature map (the same id rules as
:meth:`FeatureMap.encode_sparse` / ``encode_numeric`` / ``encode_text``, without building pandas
frames per request); the tests check both paths give identical ids. The history rule is the
training loader's: behaviours strictly earlier than the request time, the most recent
``max_history``, chronological and left-aligned, time gaps bucketed with :func:`time_bucket`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdrank.config import DataConfig, RunConfig
from qdrank.data.dataset import BEHAVIOR_QUERY_TOKENS, Batch, time_bucket
from qdrank.data.features import Feature, FeatureMap, canonical_key
from qdrank.serving.schemas import Behavior, RankedItem, RankRequest, RankResponse
from qdrank.serving.store import HistoryStore
from qdrank.training import checkpoint as ckpt

FORMULAS = ("ctr", "ctr_cvr")


class RequestError(ValueError):
    """The request is at fault. ``loc`` names the field (as pydantic does); ``status`` is the HTTP code."""

    def __init__(self, loc: tuple, msg: str, status: int = 422, kind: str = "value_error"):
        super().__init__(f"{'.'.join(str(x) for x in loc)}: {msg}")
        self.loc, self.msg, self.status, self.kind = tuple(loc), msg, status, kind


@dataclass
class ServingConfig:
    """Serving knobs (``Ranker.load(..., **overrides)``, ``qdrank serve --set key=value``)."""

    formula: str = "auto"            # ctr | ctr_cvr | auto (ctr_cvr when the run has a CVR task)
    alpha: float = 1.0               # score = ctr * cvr ** alpha
    num_threads: int = 1             # torch.set_num_threads; 0 = leave torch's default
    denoise_steps: int = 1           # passed to model configs that have `denoise_steps` (diffusion)
    max_candidates: int = 2000       # more -> 413
    max_history_inline: int = 10000  # more inline behaviours -> 413
    max_events: int = 10000          # per POST /v1/events call -> 413
    max_body_bytes: int = 32 * 2**20  # HTTP bodies larger than this -> 413
    max_history: int = 0             # 0 = the run's data.max_history (only raise it for models without
    #                                   length-bound parameters; benchmarks use it)
    store: str | None = None         # SQLite file; None = an in-memory store (events still work)

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
        if not math.isfinite(float(cfg.alpha)) or cfg.alpha < 0:
            raise ValueError(f"serving alpha must be a finite number >= 0, got {cfg.alpha!r}")
        for k in ("max_candidates", "max_history_inline", "max_events", "max_body_bytes"):
            if int(getattr(cfg, k)) < 1:
                raise ValueError(f"serving {k} must be >= 1")
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


class RequestEncoder:
    """Per-feature lookup tables built once from a :class:`FeatureMap`; encodes single requests."""

    TEXT_CACHE = 100_000

    def __init__(self, fmap: FeatureMap, data_cfg: DataConfig, max_history: int | None = None):
        self.fmap, self.data_cfg = fmap, data_cfg
        self.L = int(max_history or data_cfg.max_history)
        self.item_row = {k: i + 2 for i, k in enumerate(fmap.item_vocab)}
        self.tables: dict[str, dict[str, int]] = {}
        for f in fmap.features.values():
            if f.type in ("categorical", "list"):
                self.tables[f.name] = {v: f.offset + 1 + i for i, v in enumerate(f.vocab)}
        self.sparse_layout = {r: fmap.slot_layout(r) for r in ("user", "context", "candidate", "behavior")}
        self.numeric = {r: fmap.role_features(r, sparse=False) for r in ("user", "context", "candidate", "behavior")}
        self.n_slots = {r: fmap.n_slots(r) for r in self.sparse_layout}
        self.user_vocab = self.tables.get("user_id", {})
        self._text: dict[tuple[str, int], np.ndarray] = {}
        self._text_lock = threading.Lock()

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
        return self.tables[f.name].get(canonical_key(v), f.offset)

    def sparse_row(self, role: str, values: dict[str, Any], out: np.ndarray, loc: tuple) -> None:
        for f, start, width in self.sparse_layout[role]:
            v = values.get(f.name)
            if v is None:
                continue
            where = (*loc, f.name)
            if f.type == "categorical":
                out[start] = self._cat(f, v, where)
            elif f.type == "list":
                vs = v if isinstance(v, list) else [v]
                for j, x in enumerate(vs[:width]):
                    out[start + j] = self._cat(f, x, where)
            else:  # text
                if not isinstance(v, str):
                    raise RequestError(where, f"feature '{f.name}' is text: expected a string")
                out[start:start + width] = self.text(v, width)

    def numeric_row(self, role: str, values: dict[str, Any], out: np.ndarray, loc: tuple) -> None:
        for j, f in enumerate(self.numeric[role]):
            v = values.get(f.name)
            if v is None:
                continue
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise RequestError((*loc, f.name), f"feature '{f.name}' is numeric: {v[:40]!r} is not a "
                                       "number") from None
            elif not isinstance(v, int | float):
                raise RequestError((*loc, f.name), f"feature '{f.name}' is numeric: expected a number, got "
                                   f"{type(v).__name__}")
            x = float(v)
            if f.log:
                x = math.log1p(max(x, 0.0))
            x = (x - f.mean) / f.std
            out[j] = x if math.isfinite(x) else 0.0

    def role_rows(self, role: str, rows: list[dict[str, Any]], loc: tuple) -> tuple[np.ndarray, np.ndarray]:
        sp = np.zeros((len(rows), self.n_slots[role]), dtype=np.int64)
        de = np.zeros((len(rows), len(self.numeric[role])), dtype=np.float32)
        has_sparse, has_num = bool(self.sparse_layout[role]), bool(self.numeric[role])
        for i, r in enumerate(rows):
            where = (*loc, i) if len(loc) and loc[-1] in ("candidates", "history") else loc
            if has_sparse:
                self.sparse_row(role, r, sp[i], where)
            if has_num:
                self.numeric_row(role, r, de[i], where)
        return sp, de

    def item_rows(self, ids: list) -> np.ndarray:
        get = self.item_row.get
        return np.fromiter((get(i if isinstance(i, str) else canonical_key(i), 1) for i in ids), dtype=np.int64,
                           count=len(ids))

    # ---- a request ----------------------------------------------------------------------------------
    def encode(self, req: RankRequest, store: HistoryStore | None = None, now: int | None = None) -> Encoded:
        ts = int(req.timestamp if req.timestamp is not None else (now if now is not None else time.time()))
        L = self.L

        # user profile: store row, overridden by the request's profile; user_id always the request's
        prof: dict[str, Any] = {}
        if store is not None:
            prof.update(store.profile(req.user_id) or {})
        if req.profile:
            prof.update(req.profile)
        prof["user_id"] = req.user_id
        unknown_user = canonical_key(req.user_id) not in self.user_vocab
        loc = ("body", "profile") if req.profile else ("body", "user_id")
        user_sp, user_de = self.role_rows("user", [prof], loc)
        ctx_sp, ctx_de = self.role_rows("context", [req.context or {}], ("body", "context"))
        query = self.text(req.query, self.data_cfg.max_query_tokens)[None, :]

        # history: strictly earlier than the request, most recent L, chronological
        if req.history is not None:
            source = "inline"
            hist = [b for b in req.history if b.timestamp < ts]
            hist.sort(key=_ts)  # stable: equal timestamps keep the given order
            hist = [_behavior_dict(b) for b in hist[max(len(hist) - L, 0):]]
        elif store is not None:
            hist = store.history(req.user_id, ts, L)
            source = "store"
        else:
            hist = []
            source = "none"
        n = len(hist)
        hist_item = np.zeros((1, L), dtype=np.int64)
        hist_sparse = np.zeros((1, L, self.n_slots["behavior"]), dtype=np.int64)
        hist_dense = np.zeros((1, L, len(self.numeric["behavior"])), dtype=np.float32)
        hist_query = np.zeros((1, L, BEHAVIOR_QUERY_TOKENS), dtype=np.int64)
        hist_time = np.zeros((1, L), dtype=np.int64)
        unknown_hist = 0
        if n:
            rows = self.item_rows([h["item_id"] for h in hist])
            unknown_hist = int((rows == 1).sum())
            hist_item[0, :n] = rows
            sp, de = self.role_rows("behavior", hist, ("body", "history"))
            hist_sparse[0, :n], hist_dense[0, :n] = sp, de
            for j, h in enumerate(hist):
                q = h.get("query")
                if q:
                    hist_query[0, j] = self.text(q, BEHAVIOR_QUERY_TOKENS)
            gaps = ts - np.fromiter((h["timestamp"] for h in hist), dtype=np.int64, count=n)
            hist_time[0, :n] = time_bucket(gaps, self.fmap.time_buckets)

        # candidates
        cands = req.candidates
        N = len(cands)
        cand_item = self.item_rows([c.item_id for c in cands])
        known = cand_item > 1
        cand_sp, cand_de = self.role_rows("candidate", [c.model_extra or {} for c in cands],
                                          ("body", "candidates"))
        t = torch.from_numpy
        batch = Batch(
            request_id=torch.zeros(1, dtype=torch.long),
            user_sparse=t(user_sp), user_dense=t(user_de), ctx_sparse=t(ctx_sp), ctx_dense=t(ctx_de),
            query=t(query), hist_item=t(hist_item), hist_sparse=t(hist_sparse), hist_dense=t(hist_dense),
            hist_query=t(hist_query), hist_time=t(hist_time), hist_len=torch.tensor([n], dtype=torch.long),
            cand_req=torch.zeros(N, dtype=torch.long), cand_item=t(cand_item), cand_sparse=t(cand_sp),
            cand_dense=t(cand_de), position=torch.zeros(N, dtype=torch.long), click=torch.zeros(N),
            purchase=torch.full((N,), -1.0),
        )
        return Encoded(batch, int(N - known.sum()), unknown_user, unknown_hist, n, source, ts, known)


def _ts(b: Behavior) -> int:
    return b.timestamp


def _behavior_dict(b: Behavior) -> dict[str, Any]:
    d = dict(b.model_extra or {})
    d.update(item_id=b.item_id, timestamp=b.timestamp, action=b.action, query=b.query)
    return d


_ENCODERS: dict[int, tuple[FeatureMap, DataConfig, RequestEncoder]] = {}


def encode_request(fmap: FeatureMap, data_cfg: DataConfig, request: RankRequest | dict,
                   store: HistoryStore | None = None) -> tuple[Batch, int, bool]:
    """Raw request -> (Batch with R=1, number of unknown candidate items, whether the user is unknown).

    The lookup tables are built once per (feature map, data config) and cached."""
    if not isinstance(request, RankRequest):
        request = RankRequest.model_validate(request)
    hit = _ENCODERS.get(id(fmap))
    if hit is None or hit[0] is not fmap or hit[1] is not data_cfg:
        hit = (fmap, data_cfg, RequestEncoder(fmap, data_cfg))
        _ENCODERS[id(fmap)] = hit
    enc = hit[2].encode(request, store)
    return enc.batch, enc.unknown_items, enc.unknown_user


# ---- model loading -------------------------------------------------------------------------------
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
        if s.num_threads > 0:
            torch.set_num_threads(int(s.num_threads))
        model.eval()

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
    def check_limits(self, req: RankRequest) -> None:
        s = self.serving
        if len(req.candidates) > s.max_candidates:
            raise RequestError(("body", "candidates"), f"{len(req.candidates)} candidates; at most "
                               f"{s.max_candidates} per request (serving max_candidates)", 413, "too_large")
        if req.history is not None and len(req.history) > s.max_history_inline:
            raise RequestError(("body", "history"), f"{len(req.history)} inline behaviours; at most "
                               f"{s.max_history_inline} (serving max_history_inline)", 413, "too_large")

    def encode(self, request: RankRequest | dict) -> Encoded:
        req = request if isinstance(request, RankRequest) else RankRequest.model_validate(request)
        self.check_limits(req)
        return self.encoder.encode(req, self.store)

    @torch.inference_mode()
    def logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the request once, score every candidate (what ``forward(use_position=False)`` does)."""
        state = self.model.encode_request(batch)
        return self.model.score(state, batch)

    def scores(self, ctr_logit: torch.Tensor, cvr_logit: torch.Tensor):
        ctr = torch.sigmoid(ctr_logit.double()).numpy()
        cvr = torch.sigmoid(cvr_logit.double()).numpy()
        score = ctr * cvr ** self.alpha if self.formula == "ctr_cvr" else ctr
        return ctr, cvr, score

    def rank(self, request: RankRequest | dict) -> RankResponse:
        req = request if isinstance(request, RankRequest) else RankRequest.model_validate(request)
        return self.respond(req, self.encode(req))

    def respond(self, req: RankRequest, enc: Encoded) -> RankResponse:
        """Score an encoded request and build the ranked response."""
        ctr_l, cvr_l = self.logits(enc.batch)
        ctr, cvr, score = self.scores(ctr_l, cvr_l)
        order = np.argsort(-score, kind="stable")
        show_cvr = self.fmap.has_purchase
        cands = req.candidates
        items = [RankedItem.model_construct(item_id=cands[i].item_id, ctr=float(ctr[i]),
                                            cvr=float(cvr[i]) if show_cvr else None, score=float(score[i]),
                                            known=bool(enc.item_known[i])) for i in order.tolist()]
        return RankResponse.model_construct(
            model=self.cfg.model_name, timestamp=enc.timestamp, formula=self.formula, alpha=self.alpha,
            candidates=items, unknown_items=enc.unknown_items, unknown_user=enc.unknown_user,
            unknown_users=int(enc.unknown_user), unknown_history_items=enc.unknown_history_items,
            history_used=enc.history_used, history_source=enc.history_source)

    # ---- store & info -----------------------------------------------------------------------------------
    def append_events(self, events: list) -> int:
        if len(events) > self.serving.max_events:
            raise RequestError(("body", "events"), f"{len(events)} events; at most {self.serving.max_events} "
                               "per call (serving max_events)", 413, "too_large")
        return self.store.append([e if isinstance(e, dict) else e.model_dump() for e in events])

    def info(self) -> dict[str, Any]:
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
        return {
            "model": self.cfg.model_name, "run_dir": str(self.run_dir) if self.run_dir else None,
            "config": self.cfg.to_dict(), "serving": {**dataclasses.asdict(self.serving), "formula": self.formula},
            "metrics": metrics, "features": feats,
            "schema": {"has_purchase": self.fmap.has_purchase, "max_history": self.encoder.L,
                       "max_query_tokens": self.cfg.data.max_query_tokens, "n_items": len(self.fmap.item_vocab),
                       "n_users": len(self.encoder.user_vocab), "user_key_type": self.fmap.user_key_type,
                       "item_key_type": self.fmap.item_key_type},
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
        }

"""The tensors of one request-major batch, and the registry of optional model inputs.

A batch holds R whole requests (user, query, context, history) and their N candidates, with
``cand_req`` pointing each candidate at its request row. The fixed fields below are what every
model may read. A model that needs one more input does not touch this class, the dataset, the
trainer or serving: it registers a builder with :func:`batch_input` and lists its name in
``RankModel.extra_inputs``; the builder's output arrives in ``batch.extra[name]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from qdrank.data.features import canonical_key, stable_hash

if TYPE_CHECKING:
    from qdrank.data.dataset import SearchLogDataset

MAX_POSITION = 64

@dataclass
class Batch:
    """Tensors of a group of requests and their candidates (R requests, N candidates, L history)."""

    request_id: torch.Tensor     # [R] original request ids
    user_sparse: torch.Tensor    # [R, Su] profile ids (user_id included)
    user_dense: torch.Tensor     # [R, Nu]
    ctx_sparse: torch.Tensor     # [R, Sc] request context ids
    ctx_dense: torch.Tensor      # [R, Nc]
    query: torch.Tensor          # [R, Q] hashed query word/bigram ids, 0 = pad
    hist_item: torch.Tensor      # [R, L] item rows, chronological, left-aligned, 0 = pad
    hist_sparse: torch.Tensor    # [R, L, Sb] behaviour feature ids (action, ...)
    hist_dense: torch.Tensor     # [R, L, Nb]
    hist_query: torch.Tensor     # [R, L, Qb] hashed ids of the query each behaviour came from
    hist_time: torch.Tensor      # [R, L] log2 bucket of (request time - behaviour time), 0 = pad
    hist_age: torch.Tensor       # [R, L] float seconds from each behaviour to the request, 0 = pad
    hist_session: torch.Tensor   # [R, L] session ordinal, 0 = the request's most recent session; -1 = pad
    #                              or unknown (no ``session`` column, or only nulls so far): see session_ordinals
    hist_len: torch.Tensor       # [R] true history length
    cand_req: torch.Tensor       # [N] request row of each candidate
    cand_item: torch.Tensor      # [N] item rows
    cand_sparse: torch.Tensor    # [N, Sk] candidate (impression) feature ids
    cand_dense: torch.Tensor     # [N, Nk]
    position: torch.Tensor       # [N] shown position + 1, 0 = unknown (serving)
    click: torch.Tensor          # [N] float 0/1
    purchase: torch.Tensor       # [N] float 0/1, -1 = unknown
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # registered inputs (batch_input)

    def to(self, device: torch.device | str) -> Batch:
        moved: dict[str, Any] = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                                 for f in fields(self) if f.name != "extra"}
        return Batch(**moved, extra={k: v.to(device, non_blocking=True) for k, v in self.extra.items()})

    @property
    def n_requests(self) -> int:
        return int(self.request_id.shape[0])

    @property
    def hist_mask(self) -> torch.Tensor:
        return self.hist_item > 0


TENSOR_FIELDS = [f.name for f in fields(Batch) if f.name != "extra"]

# name -> builder(dataset, request rows, impression indices of their candidates) -> array
BatchInputBuilder = Callable[["SearchLogDataset", np.ndarray, np.ndarray], np.ndarray]
_INPUTS: dict[str, BatchInputBuilder] = {}


def batch_input(name: str) -> Callable[[BatchInputBuilder], BatchInputBuilder]:
    """Register an optional batch input, built only for models that list ``name`` in ``extra_inputs``."""

    def register(fn: BatchInputBuilder) -> BatchInputBuilder:
        if name in _INPUTS and _INPUTS[name] is not fn:
            raise ValueError(f"batch input {name!r} is registered twice")
        _INPUTS[name] = fn
        return fn

    return register


def batch_inputs() -> dict[str, BatchInputBuilder]:
    return dict(_INPUTS)


TRIM_MIN_SHARE = 0.75  # trim only when at most this share of the history columns is kept
HISTORY_FIELDS = ("hist_item", "hist_sparse", "hist_dense", "hist_query", "hist_time", "hist_age", "hist_session")
NO_SESSION = -1  # session code of a behaviour without a session id (and hist_session of padding)


def trim_history(b: Batch, extra_ok: bool = False) -> Batch:
    """``b`` without the history columns that are padding in every request (histories are
    left-aligned, so those beyond the batch's longest history). Every model is invariant to
    padding columns (tests/test_speed.py), so this is the same function on less work: at
    ``data.max_history=1000`` on synthetic ``small`` a batch's longest history is ~300-420, and
    every per-token layer ran on ~3x more padding than behaviours. Only when at most
    ``TRIM_MIN_SHARE`` of the columns are kept; a batch with extra inputs (whose layout is a model's
    own) is left as it is unless ``extra_ok`` (the caller knows they are not per history column:
    evaluation's oracle columns). Training (``TrainStep``) and evaluation both trim."""
    L = b.hist_item.shape[1]
    if (b.extra and not extra_ok) or L == 0:
        return b
    width = max(int(b.hist_len.max()), 1) if b.hist_len.numel() else 1
    if width > TRIM_MIN_SHARE * L:  # a few columns less do not pay for the copies (DNN at history 50: x0.9)
        return b
    return dataclasses.replace(b, **{f: getattr(b, f)[:, :width].contiguous() for f in HISTORY_FIELDS})


PER_REQUEST_FIELDS = ("request_id", "user_sparse", "user_dense", "ctx_sparse", "ctx_dense", "query", *HISTORY_FIELDS,
                      "hist_len")
PER_CANDIDATE_FIELDS = ("cand_item", "cand_sparse", "cand_dense", "position", "click", "purchase")


def select_requests(b: Batch, keep: torch.Tensor) -> Batch:
    """The requests ``keep`` [R] (bool) of ``b`` with their candidates, ``cand_req`` renumbered.
    A batch with extra inputs is refused: their layout is a model's own."""
    if b.extra:
        raise ValueError(f"select_requests: extra inputs {sorted(b.extra)} have no known layout")
    new_row = torch.cumsum(keep.long(), 0) - 1
    cand = keep[b.cand_req]
    out = {f: getattr(b, f)[keep] for f in PER_REQUEST_FIELDS}
    out.update({f: getattr(b, f)[cand] for f in PER_CANDIDATE_FIELDS})
    return Batch(**out, cand_req=new_row[b.cand_req[cand]])


def session_codes(values) -> np.ndarray:
    """Session ids (any values; None / NaN / NA = unknown) -> int64 codes, equal exactly where the
    ids are (1, 1.0 and "1" are one id, as for categorical features), :data:`NO_SESSION` where
    unknown. A process-independent hash, so shards coded chunk by chunk agree with the whole table."""
    s = pd.Series(values, dtype=object)
    known = s.notna().to_numpy()
    out = np.full(len(s), NO_SESSION, dtype=np.int64)
    if known.any():
        codes, uniq = pd.factorize(s[known])
        keys = np.array([canonical_key(v) for v in uniq], dtype=object)
        out[known] = (stable_hash(keys) >> np.uint64(1)).astype(np.int64)[codes]  # >= 0: never NO_SESSION
    return out


def session_ordinals(codes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[R, L] session codes of chronological, left-aligned histories -> ``Batch.hist_session``.

    A new session starts where a behaviour's session id differs from that of the behaviour before it
    with a known id; a behaviour without an id (``NO_SESSION``) continues the session before it
    (there is no evidence of a new one), and one before any known id stays ``-1``. The ordinal counts
    sessions back from the request: 0 = the most recent session of the window, 1 = the one before,
    ...; padding is -1. It depends on the window only, never on the batch (serving builds the same)."""
    R, L = codes.shape
    known = valid & (codes != NO_SESSION)
    pos = np.broadcast_to(np.arange(L), (R, L))
    last = np.maximum.accumulate(np.where(known, pos, -1), axis=1)      # last known position <= j
    filled = np.where(last >= 0, np.take_along_axis(codes, np.maximum(last, 0), 1), NO_SESSION)
    filled = np.where(valid, filled, NO_SESSION)
    has = filled != NO_SESSION
    prev = np.concatenate([np.full((R, 1), NO_SESSION, dtype=np.int64), filled[:, :-1]], 1)
    start = has & (prev != NO_SESSION) & (filled != prev)                # a session change at j
    n = np.cumsum(start, axis=1)
    out = n[:, -1:] - n if L else n
    return np.where(has, out, -1).astype(np.int64)


def history_session_ordinals(values: list) -> np.ndarray:
    """:func:`session_ordinals` of one chronological history given as its session ids (ints,
    strings or None), for serving: ids are compared as their canonical strings, as in training."""
    n = len(values)
    if not set(map(type, values)) <= {str, type(None)}:  # the store's are strings already
        values = [None if v is None else canonical_key(v) for v in values]
    # only a known id against the previous known one matters: number the runs of equal ids
    ids = np.array(values, dtype=object)
    known = np.not_equal(ids, None)
    ids = ids[known]
    codes = np.full(n, NO_SESSION, dtype=np.int64)
    codes[known] = np.concatenate([np.zeros(min(len(ids), 1), dtype=np.int64), np.cumsum(ids[1:] != ids[:-1])])
    return session_ordinals(codes[None, :], np.ones((1, n), dtype=bool))[0]

"""The one interface every ranker implements.

A model encodes the request side once (user, query, context, history) with
:meth:`RankModel.encode_request`, then scores all candidates of the request against that state
with :meth:`RankModel.score`. Training, evaluation and serving all go through these two calls, so
serving's "encode once, score hundreds of candidates" is the same code path that was evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.layers import (
    CrossFeatures,
    FeatureEmbedder,
    HeadPart,
    PositionBias,
    Scaled,
    TwoTaskHead,
    gather_rows,
    masked_mean,
    materialize,
)

if TYPE_CHECKING:
    from qdrank.data.dataset import SearchLogDataset

RequestState = dict[str, torch.Tensor]


@dataclass
class ModelOutput:
    ctr_logit: torch.Tensor          # [N]
    cvr_logit: torch.Tensor          # [N] post-click conversion logit
    aux_loss: torch.Tensor | None = None


def request_softmax_loss(logit: torch.Tensor, label: torch.Tensor, cand_req: torch.Tensor,
                         n_requests: int) -> torch.Tensor:
    """Listwise (ListNet-style) loss: per request, the cross-entropy between its clicks spread evenly
    and the softmax of its candidates' logits; the mean over requests with at least one click.

    logit, label [N]; ``cand_req`` [N] the request row of each candidate. A request without a click
    says nothing about its order and is left out; one with every candidate clicked costs a constant.
    """
    logit = logit.float()
    ninf = torch.full((n_requests,), float("-inf"), device=logit.device)
    top = ninf.scatter_reduce(0, cand_req, logit.detach(), "amax", include_self=True)
    z = torch.zeros(n_requests, device=logit.device).index_add(0, cand_req, torch.exp(logit - top[cand_req]))
    log_p = logit - top[cand_req] - torch.log(z)[cand_req]                     # log softmax in the request
    clicks = torch.zeros(n_requests, device=logit.device).index_add(0, cand_req, label)
    ce = torch.zeros(n_requests, device=logit.device).index_add(0, cand_req, -label * log_p)
    has = clicks > 0
    if not bool(has.any()):
        return logit.sum() * 0.0
    return (ce[has] / clicks[has]).mean()


class RankModel(nn.Module):
    """Base ranker: owns the feature embedder, the position tower, the cross features, the head and
    the loss.

    Subclasses set ``config_class``, implement :meth:`encode` (their request encoding) and, if they
    have per-candidate vectors (target attention, a candidate token...), :meth:`candidate_vectors`,
    and call :meth:`build_head` once in ``__init__``. The base class assembles every head input the
    same way (README "Models")::

        request part   [R]: [model's request vectors | query | user & context fields]
        candidate part [N]: [candidate | model's candidate vectors | candidate * model's interest
                             | CrossFeatures (model.cross)]

    and scores with the head's first layer split between the two parts (:meth:`TwoTaskHead.forward_split`).
    Public calls: :meth:`encode_request` (once per request) and :meth:`score` (all candidates).
    """

    config_class: type[ModelConfig] = ModelConfig
    extra_inputs: tuple[str, ...] = ()  # registered batch inputs this model reads (qdrank.data.batch)
    # False for fitted baselines (qdrank/models/baselines): the trainer calls fit_data once, no epochs
    gradient_trained: bool = True
    # False when the scoring function is not a torch graph (scores outside torch): export refuses it
    exportable: bool = True
    # True for a model whose scores read the logged position (the ``logged_order`` baseline): it
    # cannot rank a live request, so it is reported in the as-shown metric family only.
    uses_logged_position: bool = False

    def __init__(self, fmap: FeatureMap, cfg: ModelConfig):
        super().__init__()
        self.fmap = fmap
        self.cfg = cfg
        self.emb = FeatureEmbedder(fmap, cfg.dim)
        self.position = PositionBias() if cfg.position_bias and fmap.has_position else None
        self.cross_features = (CrossFeatures(fmap, cfg.dim, cfg.cross_history, cfg.cross_category, cfg.cross_rank)
                               if cfg.cross else None)
        self._item_cache: dict | None = None

    # ---- to implement --------------------------------------------------------------------
    def encode(self, batch: Batch) -> RequestState:
        """The model's own request encoding. Keys the base class reads, all optional:

        ``req`` [R, k * d]: the model's request vectors for the head (k = ``n_request_vectors``);
        ``interest`` [R, d]: its request-level user state, crossed with the candidate
        (``build_head(interest=True)``); ``tokens``: ``emb.history(batch)`` if the model computed
        it (reused, not recomputed, for the cross features); ``aux_loss``.
        """
        raise NotImplementedError

    def candidate_vectors(self, state: RequestState, batch: Batch, c: torch.Tensor) -> list[torch.Tensor]:
        """The model's own per-candidate vectors ([N, d] each; ``n_candidate_vectors`` of them)."""
        return []

    def fit_data(self, ds: SearchLogDataset, seed: int = 0) -> None:
        """Fit statistics from the TRAINING split of ``ds`` (baselines); gradient-trained models
        learn in the trainer's epochs instead, so this is a no-op for them. ``seed`` is the run's
        ``train.seed``: a baseline with randomness (gbdt's folds and feature sampling) follows it,
        so a benchmark's seeds are seeds for the baselines too."""

    # ---- the head ---------------------------------------------------------------------------
    def build_head(self, n_request_vectors: int = 0, n_candidate_vectors: int = 0, interest: bool = False,
                   query: bool = True) -> None:
        """The CTR/CVR head over the request and candidate parts (see the class docstring).

        ``n_request_vectors`` / ``n_candidate_vectors`` count the model's own vectors only; the
        query, the profile fields, the candidate and the cross features are added here. ``query``
        False leaves the query vector out of the request part (an ablation switch: DiffusionGS's
        ``query_in_head``); the cross features still carry the query unless ``model.cross`` is off.
        """
        d = self.cfg.dim
        n_fields = self.emb.n_fields("user") + self.emb.n_fields("context")
        self._interest = interest
        self._query_in_head = query
        self._n_request_vectors = n_request_vectors
        req_w = d * (n_request_vectors + int(query) + n_fields)
        cand_w = d * (1 + n_candidate_vectors + int(interest))
        cross_w = self.cross_features.width if self.cross_features is not None else 0
        self.head_widths = (req_w, cand_w, cross_w)
        self.head = TwoTaskHead(req_w + cand_w + cross_w, self.cfg.mlp, self.cfg.dropout)

    def head_layout(self) -> dict[str, slice]:
        """Column ranges of :meth:`head_input`: ``request``, ``candidate`` and (model.cross) ``cross``."""
        req_w, cand_w, cross_w = self.head_widths
        out = {"request": slice(0, req_w), "candidate": slice(req_w, req_w + cand_w)}
        if cross_w:
            out["cross"] = slice(req_w + cand_w, req_w + cand_w + cross_w)
        return out

    def profile(self, batch: Batch) -> torch.Tensor:
        """User-profile and context fields flattened: [R, (Fu + Fc) * d]."""
        f = torch.cat([self.emb.user(batch), self.emb.context(batch)], dim=-2)
        return f.flatten(-2)

    def encode_request(self, batch: Batch) -> RequestState:
        """The model's :meth:`encode` plus the request inputs every head shares (``x_*`` keys)."""
        state = self.encode(batch)
        state["x_query"] = self.emb.query(batch)
        state["x_profile"] = self.profile(batch)
        if self.cross_features is not None:
            tokens = state.get("tokens")
            if tokens is None:
                tokens = self.emb.history(batch)
            state["x_hist"] = masked_mean(tokens, batch.hist_mask, 1)
        return state

    def head_parts(self, state: RequestState, batch: Batch) -> tuple[torch.Tensor, list[HeadPart]]:
        """-> (request part [R, Dr], candidate part: its column blocks in order, Dc + cross columns).

        Columns that are the candidate vector times a per-request vector stay unmaterialised
        (:class:`~qdrank.models.layers.Scaled`): :func:`~qdrank.models.layers.materialize` gives
        the [N, Dc] input, the head folds them at inference."""
        own = state.get("req")
        parts = [] if own is None else [own]
        if self._query_in_head:
            parts.append(state["x_query"])
        req = torch.cat([*parts, state["x_profile"]], -1)
        if req.shape[-1] != self.head_widths[0]:
            raise ValueError(f"{type(self).__name__}: request part has {req.shape[-1]} columns, the head "
                             f"expects {self.head_widths[0]} (n_request_vectors={self._n_request_vectors})")
        c = self.candidate(batch)
        cand: list[HeadPart] = [Scaled(c, None), *self.candidate_vectors(state, batch, c)]
        if self._interest:
            cand.append(Scaled(c, state["interest"]))
        if self.cross_features is not None:
            cf = self.cross_features
            cat = (cf.category_vectors(self.emb.table, self.emb.item_sparse, batch.cand_item)
                   if cf.category_slots else None)
            ranks = (cf.request_ranks(batch.cand_dense, self.emb.item_dense[batch.cand_item], batch.cand_req)
                     if cf.n_rank else None)
            cand += cf.parts(c, state["x_query"], state["x_hist"], self.overlap(batch),
                             cf.history_match(batch, self.emb.item_sparse), cat, ranks)
        return req, cand

    def head_input(self, state: RequestState, batch: Batch) -> torch.Tensor:
        """The concatenated head input [N, Dr + Dc] (reference form; :meth:`score` never builds it)."""
        req, cand = self.head_parts(state, batch)
        return torch.cat([req[batch.cand_req], materialize(cand, batch.cand_req)], -1)

    def score(self, state: RequestState, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ctr_logit [N], cvr_logit [N]) of every candidate against its request's ``state``."""
        req, cand = self.head_parts(state, batch)
        return self.head.forward_split(req, cand, batch.cand_req)

    # ---- candidate side and its inference cache ----------------------------------------------
    def candidate(self, batch: Batch) -> torch.Tensor:
        """Candidate vectors [N, d] (= ``emb.candidate``); known items' part from the cache at inference."""
        cache = self._cached_items()
        if cache is None:
            return self.emb.candidate(batch)
        impression = self.emb.fields("candidate", batch.cand_sparse, batch.cand_dense).sum(-2)
        return gather_rows(cache["vec"], batch.cand_item) + impression

    def overlap(self, batch: Batch) -> torch.Tensor:
        """Query-candidate token overlap [N, 4] (see :class:`CrossFeatures`)."""
        cf = self.cross_features
        assert cf is not None
        cache = self._cached_items()
        if cache is None:
            text_i, side_i = cf.tokens("item", self.emb.item_sparse[batch.cand_item])
        else:
            text_i, side_i = gather_rows(cache["text"], batch.cand_item), gather_rows(cache["side"], batch.cand_item)
        if cf.has_tokens["candidate"]:
            text_c, side_c = cf.tokens("candidate", batch.cand_sparse)
            text_i, side_i = torch.cat([text_i, text_c], -1), torch.cat([side_i, side_c], -1)
        return cf.overlap_request(batch.query, batch.cand_req, text_i, side_i)

    @property
    def device(self) -> torch.device:
        """Where the model lives: every model, a baseline too, holds the item tables (``emb.item_sparse``)."""
        return self.emb.item_sparse.device

    def train(self, mode: bool = True) -> RankModel:
        self._item_cache = None
        return super().train(mode)

    def freeze_item_cache(self) -> None:
        """Compute the candidate-side vectors (and cross-feature tokens) of every known item now.

        Used at inference only (eval mode, no autograd): serving calls it once at load, so the first
        request does not pay for it. The cache is also built lazily on the first such call, and it
        is rebuilt whenever an embedding parameter or item table changes (their version counters)
        and dropped by ``train()``.
        """
        with torch.no_grad():
            self._item_cache = self._build_item_cache()

    def _cache_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in (*self.emb.parameters(), *self.emb.buffers()))

    def _build_item_cache(self, chunk: int = 65536) -> dict:
        n = self.emb.item_sparse.shape[0]
        dev = self.emb.item_sparse.device
        rows = torch.arange(n, device=dev)
        out = {"key": self._cache_key(), "vec": torch.cat([self.emb.item(rows[i:i + chunk]) for i in range(0, n, chunk)])}
        if self.cross_features is not None:
            out["text"], out["side"] = self.cross_features.tokens("item", self.emb.item_sparse)
        return out

    def _cached_items(self) -> dict | None:
        """The item cache when it may be used: inference (eval, no grad) and still current."""
        if self.training or torch.is_grad_enabled():
            return None
        cache = self._item_cache
        if cache is not None and cache["key"] == self._cache_key():
            return cache
        if torch.jit.is_tracing():  # an export traces the direct lookup unless frozen beforehand
            return None
        self._item_cache = self._build_item_cache()
        return self._item_cache

    def forward(self, batch: Batch, use_position: bool = True) -> ModelOutput:
        state = self.encode_request(batch)
        ctr, cvr = self.score(state, batch)
        if self.position is not None and use_position:
            ctr = ctr + self.position(batch.position)
        return ModelOutput(ctr, cvr, state.get("aux_loss"))

    def loss(self, batch: Batch, out: ModelOutput, cvr_weight: float = 1.0,
             listwise_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
        """BCE on clicks + listwise_weight * in-request softmax loss on clicks + cvr_weight * BCE on
        purchases of clicked impressions (+ model aux loss).

        CVR is post-click conversion: trained and evaluated on clicked impressions whose purchase
        is known (not ESMM); see README "CTR and CVR". The listwise term (:func:`request_softmax_loss`)
        trains the order *within* a request, which is what GAUC and a live ranking measure; BCE
        alone also spends capacity on differences between requests.
        """
        ctr = F.binary_cross_entropy_with_logits(out.ctr_logit, batch.click)
        total = ctr
        parts = {"ctr_bce": float(ctr.detach())}
        if listwise_weight > 0:
            lw = request_softmax_loss(out.ctr_logit, batch.click, batch.cand_req, batch.n_requests)
            total = total + listwise_weight * lw
            parts["listwise"] = float(lw.detach())
        m = (batch.click > 0) & (batch.purchase >= 0)
        if cvr_weight > 0 and bool(m.any()):
            cvr = F.binary_cross_entropy_with_logits(out.cvr_logit[m], batch.purchase[m])
            total = total + cvr_weight * cvr
            parts["cvr_bce"] = float(cvr.detach())
        if out.aux_loss is not None:
            total = total + out.aux_loss
            parts["aux"] = float(out.aux_loss.detach())
        return total, parts

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def n_dense_parameters(self) -> int:
        """Trainable parameters outside the embedder's lookup tables: the model's own size, which
        does not grow with the vocabularies (README "Models")."""
        tables = {id(p) for m in self.emb.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)
                  for p in m.parameters()}
        return sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in tables)

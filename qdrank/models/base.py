"""The one interface every ranker implements.

A model encodes the request side once (user, query, context, history) with
:meth:`RankModel.encode_request`, then scores all candidates of the request against that state
with :meth:`RankModel.score`. Training, evaluation and serving all go through these two calls, so
serving's "encode once, score hundreds of candidates" is the same code path that was evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.layers import FeatureEmbedder, PositionBias, TwoTaskHead

RequestState = dict[str, torch.Tensor]


@dataclass
class ModelOutput:
    ctr_logit: torch.Tensor          # [N]
    cvr_logit: torch.Tensor          # [N] post-click conversion logit
    aux_loss: torch.Tensor | None = None


class RankModel(nn.Module):
    """Base ranker: owns the feature embedder, the position tower, the head and the loss.

    Subclasses set ``config_class`` and implement ``encode_request`` and ``score``; most build
    the head input with :meth:`head_input` and call ``self.head``.
    """

    config_class: type[ModelConfig] = ModelConfig
    extra_inputs: tuple[str, ...] = ()  # registered batch inputs this model reads (qdrank.data.batch)

    def __init__(self, fmap: FeatureMap, cfg: ModelConfig):
        super().__init__()
        self.fmap = fmap
        self.cfg = cfg
        self.emb = FeatureEmbedder(fmap, cfg.dim)
        self.position = PositionBias() if cfg.position_bias and fmap.has_position else None

    # ---- to implement --------------------------------------------------------------------
    def encode_request(self, batch: Batch) -> RequestState:
        raise NotImplementedError

    def score(self, state: RequestState, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------
    def build_head(self, n_request_vectors: int, n_candidate_vectors: int) -> None:
        """The CTR/CVR head over [request vectors, user & context fields, candidate vectors]."""
        d = self.cfg.dim
        n_fields = self.emb.n_fields("user") + self.emb.n_fields("context")
        self.head = TwoTaskHead(d * (n_request_vectors + n_fields + n_candidate_vectors), self.cfg.mlp,
                                self.cfg.dropout)

    def profile(self, batch: Batch) -> torch.Tensor:
        """User-profile and context fields flattened: [R, (Fu + Fc) * d]."""
        f = torch.cat([self.emb.user(batch), self.emb.context(batch)], dim=-2)
        return f.flatten(-2)

    def head_input(self, batch: Batch, request_vecs: list[torch.Tensor], cand_vecs: list[torch.Tensor]
                   ) -> torch.Tensor:
        """Gather request-level vectors to candidates and concatenate with candidate vectors."""
        req = torch.cat(request_vecs, dim=-1)[batch.cand_req]
        return torch.cat([req, *cand_vecs], dim=-1)

    def forward(self, batch: Batch, use_position: bool = True) -> ModelOutput:
        state = self.encode_request(batch)
        ctr, cvr = self.score(state, batch)
        if self.position is not None and use_position:
            ctr = ctr + self.position(batch.position)
        return ModelOutput(ctr, cvr, state.get("aux_loss"))

    def loss(self, batch: Batch, out: ModelOutput, cvr_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        """BCE on clicks + cvr_weight * BCE on purchases of clicked impressions (+ model aux loss).

        CVR is post-click conversion: trained and evaluated on clicked impressions whose purchase
        is known (not ESMM); see README "CTR and CVR".
        """
        ctr = F.binary_cross_entropy_with_logits(out.ctr_logit, batch.click)
        total = ctr
        parts = {"ctr_bce": float(ctr.detach())}
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

"""SIM (Pi et al., CIKM 2020): search-based user interest modelling over a long history.

Two cascaded stages per candidate:

* **General Search Unit** picks the top-``topk`` behaviours relevant to the candidate out of the
  whole loaded history (set it long with ``--set data.max_history=...``; the model uses every
  behaviour the data loader provides).

  - ``gsu: hard`` — behaviours of the same category as the candidate (the item feature
    ``fmap.has_category``; for a list feature, sharing any value). The most recent ``topk`` of them
    are kept. Needs an item category feature.
  - ``gsu: soft`` (default, works on any data) — inner product of separately projected candidate
    and behaviour embeddings; the ``topk`` highest are kept. Top-K is not differentiable, so as in
    the paper the projections are trained by an auxiliary CTR task on the softmax(GSU-score)
    weighted sum of the *whole* history (weight ``aux_weight``, training only).

  Ties are broken towards the more recent behaviour, so the selection is deterministic.
* **Exact Search Unit** — multi-head softmax target attention with the candidate as query over
  the K selected behaviour tokens. The paper concatenates a time-gap embedding to each behaviour;
  our behaviour tokens already contain the time-gap bucket embedding (summed).

Like the paper's deployed model, a short-term interest (mean of the last ``short_len`` behaviours,
0 disables it) is fed to the head beside the long-term one.

Head: the short-term interest is the model's request vector and interest (crossed with the
candidate), the ESU interest its candidate vector; the query, the profile, the candidate and the
shared cross features come from :class:`~qdrank.models.base.RankModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RankModel, RequestState
from qdrank.models.layers import MLP, masked_mean, request_bmm
from qdrank.models.transformer import MultiHeadTargetAttention, gather_tokens, masked_softmax, masked_topk

GSU_MODES = ("soft", "hard")


@dataclass
class SIMConfig(ModelConfig):
    gsu: str = "soft"            # soft | hard (same category as the candidate)
    topk: int = 20               # behaviours kept per candidate by the GSU
    heads: int = 2               # ESU attention heads
    short_len: int = 5           # short-term interest over the last behaviours (0 = off)
    aux_weight: float = 1.0      # soft GSU: weight of the auxiliary CTR loss training the GSU


def last_positions(hist_len: torch.Tensor, L: int, n: int) -> torch.Tensor:
    """[R, L] mask of the last ``n`` valid positions of left-aligned histories."""
    ar = torch.arange(L, device=hist_len.device)
    return (ar < hist_len.unsqueeze(1)) & (ar >= (hist_len - n).unsqueeze(1))


class SIM(RankModel):
    config_class = SIMConfig

    def __init__(self, fmap: FeatureMap, cfg: SIMConfig):
        super().__init__(fmap, cfg)
        if cfg.topk < 1:
            raise ValueError(f"model.topk must be >= 1, got {cfg.topk}")
        self.esu = MultiHeadTargetAttention(cfg.dim, cfg.heads, cfg.dropout)
        # GSU scores and the aux pooling as one matmul per request (False: history gathered per candidate)
        self.fast = True
        self.build_gsu(fmap, cfg)
        self.build_head(n_request_vectors=1, n_candidate_vectors=1, interest=True)

    def build_gsu(self, fmap: FeatureMap, cfg: SIMConfig) -> None:
        """The General Search Unit's own parameters (peers with another GSU override this)."""
        if cfg.gsu not in GSU_MODES:
            raise ValueError(f"model.gsu must be one of {GSU_MODES}, got {cfg.gsu!r}")
        self.gsu = cfg.gsu
        if cfg.gsu == "hard":
            self.cat_slots = self._category_slots(fmap)
        else:
            self.gsu_cand = nn.Linear(cfg.dim, cfg.dim)
            self.gsu_beh = nn.Linear(cfg.dim, cfg.dim)
            self.aux_head = MLP(3 * cfg.dim, (cfg.dim,), out_dim=1)

    def gsu_state(self, hist: torch.Tensor, batch: Batch) -> RequestState:
        """Per-request GSU inputs computed once (behaviour keys or categories)."""
        if self.gsu == "hard":
            return {"cat": self.emb.item_sparse[batch.hist_item][..., self.cat_slots]}
        return {"gsu_keys": self.gsu_beh(hist)}

    @staticmethod
    def _category_slots(fmap: FeatureMap) -> slice:
        name = fmap.has_category
        if name is None:
            raise ValueError("SIM with gsu=hard needs an item category feature (a categorical/list item "
                             "feature named category, or `category:` in dataset.yaml), and this dataset has "
                             "none; use --set model.gsu=soft")
        for f, start, width in fmap.slot_layout("item"):
            if f.name == name and f.type in ("categorical", "list"):
                return slice(start, start + width)
        raise ValueError(f"SIM with gsu=hard needs a categorical/list item category feature; {name!r} is "
                         "not one; use --set model.gsu=soft")

    # ---- GSU ----------------------------------------------------------------------------------
    def gsu_scores(self, state: RequestState, batch: Batch, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scores [N, L], selectable [N, L]) of every behaviour for every candidate."""
        r = batch.cand_req
        valid = state["mask"][r]
        if self.gsu == "hard":
            cat_c = self.emb.item_sparse[batch.cand_item][:, self.cat_slots]          # [N, w]
            cat_h = state["cat"][r]                                                   # [N, L, w]
            eq = (cat_h.unsqueeze(-1) == cat_c[:, None, None, :]) & (cat_c > 0)[:, None, None, :]
            same = eq.any(-1).any(-1)
            return same.to(c.dtype), valid & same
        cq = self.gsu_cand(c)
        scores = request_bmm(cq.unsqueeze(1), state["gsu_keys"].transpose(1, 2), r, self.fast).squeeze(1)
        return scores, valid

    def select(self, state: RequestState, batch: Batch, c: torch.Tensor):
        """GSU top-K: (idx [N, K], keep [N, K], scores [N, L])."""
        scores, selectable = self.gsu_scores(state, batch, c)
        idx, keep = masked_topk(scores, selectable, self.cfg.topk)
        return idx, keep, scores

    # ---- model --------------------------------------------------------------------------------
    def encode(self, batch: Batch) -> RequestState:
        tokens = self.emb.history(batch)
        mask = batch.hist_mask
        if self.cfg.short_len > 0:
            short = masked_mean(tokens, last_positions(batch.hist_len, mask.shape[1], self.cfg.short_len), 1)
        else:
            short = tokens.new_zeros(tokens.shape[0], tokens.shape[-1])
        st = {"req": short, "interest": short, "tokens": tokens, "mask": mask}
        st.update(self.gsu_state(tokens, batch))
        return st

    def candidate_vectors(self, state: RequestState, batch: Batch, c: torch.Tensor) -> list[torch.Tensor]:
        r = batch.cand_req
        idx, keep, scores = self.select(state, batch, c)
        keys = gather_tokens(state["tokens"], r, idx)
        interest = self.esu(c, keys, keep)
        if self.gsu == "soft" and self.training and self.cfg.aux_weight > 0:
            state["aux_loss"] = self.cfg.aux_weight * self._aux_loss(state, batch, c, scores)
        return [interest]

    def _aux_loss(self, state: RequestState, batch: Batch, c: torch.Tensor, scores: torch.Tensor):
        """Soft GSU training signal: CTR from the GSU-score weighted sum of the whole history."""
        w = masked_softmax(scores, state["mask"][batch.cand_req])
        u = request_bmm(w.unsqueeze(1), state["tokens"], batch.cand_req, self.fast).squeeze(1)
        logit = self.aux_head(torch.cat([u, c, u * c], -1)).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logit, batch.click)

"""DIEN (Zhou et al., AAAI 2019): interest extractor GRU + interest evolution with AUGRU.

* Interest extractor: a GRU over the behaviour tokens; its hidden state h_t is the interest after
  behaviour t. The auxiliary loss makes h_t discriminate the real next behaviour e_{t+1} from a
  negative (the token at the same step of another request in the batch, rolled by one row), with
  a small MLP on [h_t, e], as in the paper (weight ``aux_weight``; training only).
* Interest evolution: for each candidate, attention scores a_t = softmax_t(h_t W c) over valid
  steps, then an AUGRU (GRU whose update gate is scaled by a_t) runs over h_1..h_T; its final
  state is the evolved interest. Padded steps keep the state unchanged. The loop is over time
  steps (history length), vectorised over candidates.
* Fast form (``DIEN.fast``, the default; the same function, tests/test_speed.py): the attention
  scores and the AUGRU's input projection depend only on the request's extractor states, so they
  are computed once per request behaviour, not per candidate; only the recurrent projection runs
  per (candidate, step). Measured x1.46-1.65 on the training step (``bench_train.py --models dien
  --variants=-layers,copy``). A fused autograd Function for the recurrence measured slower (x0.93):
  the step is bound by its element-wise work, not by autograd.
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
from qdrank.models.layers import MLP, per_request, request_bmm
from qdrank.models.transformer import masked_softmax


@dataclass
class DIENConfig(ModelConfig):
    aux_weight: float = 1.0      # weight of the next-behaviour auxiliary loss


class AUGRUCell(nn.Module):
    """GRU cell whose update gate is multiplied by an attention score (DIEN eq. 7-8)."""

    def __init__(self, dim: int):
        super().__init__()
        self.x2h = nn.Linear(dim, 3 * dim)
        self.h2h = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return self.step(self.x2h(x), h, att)

    def step(self, xp: torch.Tensor, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """One step from the input's projection ``x2h(x)`` (precomputed once per request)."""
        xr, xz, xn = xp.chunk(3, -1)
        hr, hz, hn = self.h2h(h).chunk(3, -1)
        r = torch.sigmoid(xr + hr)
        u = torch.sigmoid(xz + hz) * att.unsqueeze(-1)
        n = torch.tanh(xn + r * hn)
        return (1 - u) * h + u * n


class DIEN(RankModel):
    config_class = DIENConfig

    def __init__(self, fmap: FeatureMap, cfg: DIENConfig):
        super().__init__(fmap, cfg)
        d = cfg.dim
        self.extractor = nn.GRU(d, d, batch_first=True)
        self.aux_net = MLP(2 * d, (d,), out_dim=1)
        self.att = nn.Linear(d, d, bias=False)
        self.augru = AUGRUCell(d)
        self.fast = True  # per-request scores and input projections (False: per-candidate gathered states)
        self.build_head(n_candidate_vectors=1)

    def encode(self, batch: Batch) -> RequestState:
        e, mask = self.emb.history(batch), batch.hist_mask
        states = self.extractor(e)[0] * mask.unsqueeze(-1).to(e.dtype)            # [R, L, d]
        st: RequestState = {"states": states, "mask": mask, "tokens": e}
        if self.training and self.cfg.aux_weight > 0 and e.shape[1] > 1:
            st["aux_loss"] = self.cfg.aux_weight * self._aux_loss(states, e, mask)
        return st

    def _aux_loss(self, states: torch.Tensor, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = mask[:, 1:] & mask[:, :-1]
        if not bool(valid.any()):
            return states.new_zeros(())
        h, pos = states[:, :-1][valid], e[:, 1:][valid]
        neg = e.roll(1, dims=0)[:, 1:][valid]
        logits = torch.cat([self.aux_net(torch.cat([h, pos], -1)), self.aux_net(torch.cat([h, neg], -1))]).squeeze(-1)
        labels = torch.cat([torch.ones(len(h)), torch.zeros(len(h))]).to(logits)
        return F.binary_cross_entropy_with_logits(logits, labels)

    def candidate_vectors(self, state: RequestState, batch: Batch, c: torch.Tensor) -> list[torch.Tensor]:
        """The evolved interest: AUGRU over the extractor states, gated by attention to ``c``."""
        states, mask, r = state["states"], state["mask"], batch.cand_req
        if not per_request(self.fast):
            return [self._evolve_reference(states, mask, c, r)]
        att = masked_softmax(request_bmm(self.att(c).unsqueeze(1), states.transpose(1, 2), r).squeeze(1), mask[r])
        xs = self.augru.x2h(states).transpose(0, 1).contiguous()                     # [L, R, 3d]
        h = torch.zeros_like(c)
        for t in range(states.shape[1]):  # attention 0 at padding: u = 0 keeps the state, no mask needed
            h = self.augru.step(xs[t].index_select(0, r), h, att[:, t])
        return [h]

    def _evolve_reference(self, states: torch.Tensor, mask: torch.Tensor, c: torch.Tensor,
                          r: torch.Tensor) -> torch.Tensor:
        """The literal form: every request's states gathered per candidate, projected in the loop."""
        states, mask = states[r], mask[r]                                            # [N, L, d], [N, L]
        att = masked_softmax(torch.bmm(states, self.att(c).unsqueeze(-1)).squeeze(-1), mask)
        h = torch.zeros_like(c)
        for t in range(states.shape[1]):
            h = torch.where(mask[:, t : t + 1], self.augru(states[:, t], h, att[:, t]), h)
        return h

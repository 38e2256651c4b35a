"""TWIN (Chang et al., KDD 2023): two-stage interest network with a Consistency-Preserved GSU.

SIM's search unit measures relevance with its own projections, so what it retrieves is not what
the attention would have weighted. TWIN's CP-GSU scores every behaviour with the *same* target
attention as the Exact Search Unit: the ESU's query and key projections, scaled dot product
averaged over heads. The ``topk`` best go to the ESU (multi-head target attention). The paper's
split of behaviour features into inherent (pre-computed) and cross parts is an inference
optimisation for hundreds of thousands of behaviours; here keys are projected once per request.
"""

from __future__ import annotations

import torch

from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RequestState
from qdrank.models.layers import request_bmm
from qdrank.models.sim import SIM, SIMConfig


class TWIN(SIM):
    config_class = SIMConfig

    def build_gsu(self, fmap: FeatureMap, cfg: SIMConfig) -> None:
        self.gsu = "consistent"

    def gsu_state(self, hist: torch.Tensor, batch: Batch) -> RequestState:
        return {"gsu_keys": self.esu.attn.k(hist)}

    def gsu_scores(self, state: RequestState, batch: Batch, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ESU's attention logits, averaged over heads (the mean of per-head dot products)."""
        r = batch.cand_req
        attn = self.esu.attn
        q = attn.q(c)                                                             # [N, d]
        scale = (q.shape[-1] // attn.heads) ** 0.5
        scores = request_bmm(q.unsqueeze(1), state["gsu_keys"].transpose(1, 2), r, self.fast).squeeze(1) \
            / (scale * attn.heads)
        return scores, state["mask"][r]

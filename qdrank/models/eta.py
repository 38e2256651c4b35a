"""ETA (Chen et al., 2021): end-to-end target attention over a long history with SimHash retrieval.

The General Search Unit of SIM is replaced by locality-sensitive hashing: candidate and behaviour
embeddings are signed random projections (``hash_bits`` bits, a fixed seeded projection stored as
a buffer, so checkpoints and exports agree); the ``topk`` behaviours with the smallest Hamming
distance to the candidate are kept, then the Exact Search Unit (multi-head target attention)
reads them. Hashing the same embeddings the ESU uses is ETA's point: retrieval is end to end,
with no separately trained GSU. Everything else (short-term interest, head) is SIM's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RequestState
from qdrank.models.sim import SIM, SIMConfig

HASH_SEED = 1729


@dataclass
class ETAConfig(SIMConfig):
    hash_bits: int = 32          # SimHash signature length


def simhash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Signs of random projections as 0/1 floats: [..., d] x [d, bits] -> [..., bits]."""
    return (x @ planes.to(x.dtype) > 0).to(x.dtype)


class ETA(SIM):
    config_class = ETAConfig

    def build_gsu(self, fmap: FeatureMap, cfg: ETAConfig) -> None:
        if cfg.hash_bits < 1:
            raise ValueError(f"model.hash_bits must be >= 1, got {cfg.hash_bits}")
        self.gsu = "simhash"
        g = torch.Generator().manual_seed(HASH_SEED)
        self.register_buffer("planes", torch.randn(cfg.dim, cfg.hash_bits, generator=g))

    def gsu_state(self, hist: torch.Tensor, batch: Batch) -> RequestState:
        return {"codes": simhash(hist.detach(), self.planes)}

    def gsu_scores(self, state: RequestState, batch: Batch, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score = number of equal signature bits (= bits - Hamming distance)."""
        r = batch.cand_req
        cc = simhash(c.detach(), self.planes)                                     # [N, bits]
        h = state["codes"][r]                                                     # [N, L, bits]
        same = (h * cc[:, None, :] + (1 - h) * (1 - cc[:, None, :])).sum(-1)
        return same, state["mask"][r]

"""SDIM (Cao et al., 2022): sampling-based deep interest modelling with hash buckets.

Instead of attention weights, SDIM gathers the behaviours that fall into the candidate's hash
bucket: ``hashes`` independent SimHash signatures of ``bits`` bits each (fixed seeded random
projections, stored as a buffer) are computed for the candidate and every behaviour; for each
signature the behaviours with exactly the candidate's code are averaged, and the interest is the
mean over signatures, L2-normalised as in the paper. A behaviour similar to the candidate shares
its bucket in more signatures, so this approximates target attention with an angular kernel at
linear cost and without a per-candidate softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.features import FeatureMap
from qdrank.models.base import RankModel, RequestState
from qdrank.models.layers import masked_mean

HASH_SEED = 4242


@dataclass
class SDIMConfig(ModelConfig):
    hashes: int = 48             # independent signatures (m)
    bits: int = 3                # bits per signature (tau): 2^bits buckets each


def bucket_codes(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """x [..., d], planes [m, d, bits] -> integer bucket codes [..., m]."""
    bits = planes.shape[-1]
    signs = (torch.einsum("...d,mdb->...mb", x, planes.to(x.dtype)) > 0).long()
    return (signs << torch.arange(bits, device=x.device)).sum(-1)


class SDIM(RankModel):
    config_class = SDIMConfig

    def __init__(self, fmap: FeatureMap, cfg: SDIMConfig):
        super().__init__(fmap, cfg)
        if cfg.hashes < 1 or not 1 <= cfg.bits <= 16:
            raise ValueError(f"model.hashes must be >= 1 and model.bits in 1..16, got {cfg.hashes}, {cfg.bits}")
        g = torch.Generator().manual_seed(HASH_SEED)
        self.register_buffer("planes", torch.randn(cfg.hashes, cfg.dim, cfg.bits, generator=g))
        self.build_head(n_request_vectors=1, n_candidate_vectors=1)

    def encode(self, batch: Batch) -> RequestState:
        hist, mask = self.emb.history(batch), batch.hist_mask
        return {"req": masked_mean(hist, mask, 1), "tokens": hist, "mask": mask,
                "codes": bucket_codes(hist, self.planes)}

    def interest(self, state: RequestState, batch: Batch, c: torch.Tensor) -> torch.Tensor:
        """[N, d]: per hash, the mean of the behaviours in the candidate's bucket; averaged, normalised."""
        r = batch.cand_req
        same = (state["codes"][r] == bucket_codes(c, self.planes)[:, None, :]) & state["mask"][r][..., None]
        w = same.to(c.dtype)                                                        # [N, L, m]
        per_hash = torch.einsum("nlm,nld->nmd", w, state["tokens"][r]) / w.sum(1).clamp_min(1.0)[..., None]
        return F.normalize(per_hash.mean(1), dim=-1)

    def candidate_vectors(self, state: RequestState, batch: Batch, c: torch.Tensor) -> list[torch.Tensor]:
        return [self.interest(state, batch, c)]

"""DiffuRec (Li et al., TOIS 2023) adapted to CTR ranking, as the iFusion paper compares it.

DiffuRec differs from DreamRec in its approximator: instead of an MLP on a pooled condition,
the noisy target x_t (plus the step embedding) is added to every behaviour token and a
Transformer over that sequence reconstructs x_0 at the last valid position, so the history and
the noisy target interact token by token. It uses no classifier-free guidance (``guidance: 0``).
Training target, generation and the head are DreamRec's (see :mod:`qdrank.models.dreamrec`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdrank.data.batch import Batch
from qdrank.models.diffusion import timestep_embedding
from qdrank.models.dreamrec import DreamRec, DreamRecConfig
from qdrank.models.sasrec import state_at


@dataclass
class DiffuRecConfig(DreamRecConfig):
    guidance: float = 0.0


class DiffuRec(DreamRec):
    config_class = DiffuRecConfig

    def condition(self, batch: Batch, length: torch.Tensor) -> torch.Tensor:
        return self.null.new_zeros(len(length), self.cfg.dim)   # the history enters in denoise()

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, batch: Batch,
                length: torch.Tensor) -> torch.Tensor:
        temb = self.step_mlp(timestep_embedding(t, x.shape[-1]))
        return state_at(self.sequence(batch, add=x + temb, length=length), length)

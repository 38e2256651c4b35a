"""DreamRec (Yang et al., NeurIPS 2023) adapted to CTR ranking, as the iFusion paper compares it.

DreamRec generates the embedding of the item a user would like next ("oracle item") with a
guided diffusion model conditioned on the history, instead of scoring negatives. Adapted to
ranking: the generated oracle vector is the user's interest and feeds the shared CTR/CVR head
beside the candidate.

* Guidance encoder: SASRec's causal Transformer over the history; the state at the last valid
  behaviour conditions the generation of the next one.
* Generative loss (weight ``gen_weight``): the history minus its last behaviour conditions an
  x0-predicting MLP denoiser, whose target is that last behaviour's item vector (detached, so the
  target cannot collapse); condition dropout ``cond_drop`` trains the unconditional branch.
* Generation (training and inference alike, so the head sees what serving produces): from a fixed
  stored noise vector at t = T, ``denoise_steps`` classifier-free-guided calls
  ``(1 + w) f(x, t, c) - w f(x, t, null)`` with DDPM posterior means between them; deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qdrank.data.batch import Batch
from qdrank.models.base import RequestState
from qdrank.models.diffusion import DiffusionSchedule, fixed_noise, guided, timestep_embedding
from qdrank.models.layers import MLP
from qdrank.models.sasrec import SASRec, SASRecConfig, state_at

START_NOISE_SEED = 777


@dataclass
class DreamRecConfig(SASRecConfig):
    schedule: str = "linear"      # linear | cosine | sqrt
    diffusion_steps: int = 50     # T
    denoise_steps: int = 1        # generation calls (1 = single step)
    guidance: float = 2.0         # w of classifier-free guidance (0 = conditional only)
    cond_drop: float = 0.1        # condition dropout in the generative loss
    gen_weight: float = 1.0       # weight of the x0-prediction loss


class DreamRec(SASRec):
    config_class = DreamRecConfig

    def build_extra(self, cfg: DreamRecConfig) -> None:
        d = cfg.dim
        self.schedule = DiffusionSchedule.named(cfg.schedule, cfg.diffusion_steps)
        if not 1 <= cfg.denoise_steps <= cfg.diffusion_steps:
            raise ValueError(f"model.denoise_steps={cfg.denoise_steps} must be in 1..{cfg.diffusion_steps}")
        self.null = nn.Parameter(torch.zeros(d))
        self.step_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.denoiser = MLP(3 * d, (2 * d,), cfg.dropout, out_dim=d, act=nn.SiLU)
        self.register_buffer("start_noise", fixed_noise(1, d, START_NOISE_SEED)[0], persistent=False)

    # ---- the parts DiffuRec replaces ---------------------------------------------------------------
    def condition(self, batch: Batch, length: torch.Tensor) -> torch.Tensor:
        """Guidance from the first ``length`` behaviours of each history: [R, d]."""
        return state_at(self.sequence(batch, length=length), length)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, batch: Batch,
                length: torch.Tensor) -> torch.Tensor:
        """x0-prediction f(x_t, t, c): an MLP on [x_t, step embedding, condition]."""
        temb = self.step_mlp(timestep_embedding(t, x.shape[-1]))
        return self.denoiser(torch.cat([x, temb, cond], -1))

    def guided_x0(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, batch: Batch,
                  length: torch.Tensor) -> torch.Tensor:
        f_c = self.denoise(x, t, cond, batch, length)
        if self.cfg.guidance == 0:
            return f_c
        f_u = self.denoise(x, t, self.null.expand_as(cond), batch, length)
        return guided(f_u, [f_c], [1.0 + self.cfg.guidance])

    # ---- shared -----------------------------------------------------------------------------------------
    def generate(self, batch: Batch, length: torch.Tensor) -> torch.Tensor:
        cond = self.condition(batch, length)
        sch = self.schedule
        x = self.start_noise.to(cond.dtype).expand_as(cond)
        x0 = x
        steps = sch.reverse_steps(self.cfg.denoise_steps)
        for t, s in zip(steps[:-1], steps[1:]):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            x0 = self.guided_x0(x, tt, cond, batch, length)
            x = sch.posterior_mean(x0, x, t, s)
        return x0

    def generative_loss(self, batch: Batch) -> torch.Tensor:
        """Predict each history's last behaviour from the ones before it (x0-MSE)."""
        length = batch.hist_len.clamp(0, batch.hist_mask.shape[1])
        has = length >= 2
        if not bool(has.any()):
            return self.null.new_zeros(())
        rows = torch.arange(len(length), device=length.device)
        target = self.emb.item(batch.hist_item[rows, (length - 1).clamp_min(0)]).detach()
        prev = length - 1
        cond = self.condition(batch, prev)
        drop = torch.rand(len(cond), 1, device=cond.device) < self.cfg.cond_drop
        cond = torch.where(drop, self.null.expand_as(cond), cond)
        t = self.schedule.sample_t(len(cond), cond.device)
        x_t = self.schedule.q_sample(target, t, torch.randn_like(target))
        x0 = self.denoise(x_t, t, cond, batch, prev)
        return F.mse_loss(x0[has], target[has])

    def encode(self, batch: Batch) -> RequestState:
        oracle = self.generate(batch, batch.hist_len.clamp(0, batch.hist_mask.shape[1]))
        st: RequestState = {"req": oracle, "interest": oracle}
        if self.training and self.cfg.gen_weight > 0:
            st["aux_loss"] = self.cfg.gen_weight * self.generative_loss(batch)
        return st

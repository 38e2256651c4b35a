"""DDPM helpers shared by the diffusion rankers (DiffusionGS, iFusion); model-agnostic.

Conventions
-----------
* Steps are 1-indexed like the DDPM paper: ``t = 1..T``; ``t = 0`` means "clean" (alpha_bar = 1).
* The schedule holds ``alpha_bar[0..T]`` as a non-persistent buffer: it follows ``.to()`` /
  ``.double()`` but never enters a checkpoint (it is rebuilt from the config).
* Denoisers are x0-parameterised: ``denoise_fn(x_t, t) -> (x0_hat, aux)``. The reverse chain moves
  from ``x_t`` to ``x_s`` (``s < t``) with the mean of the DDPM posterior ``q(x_s | x_t, x0_hat)``;
  for ``s = t - 1`` this is exactly the DDPM posterior mean, for larger jumps it is the same
  Gaussian-posterior formula over the strided schedule (as in respaced DDPM samplers). No variance
  is sampled on the way down unless a caller adds :meth:`DiffusionSchedule.posterior_std` times its
  own (fixed) noise, so the reverse chain is deterministic given ``x_T``.
* Schedules: ``linear`` (DDPM's betas), ``cosine`` (Nichol & Dhariwal 2021) and ``sqrt``
  (Diffusion-LM), all built by :meth:`DiffusionSchedule.named`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# name -> (T, beta_1, beta_T); "none" (no diffusion) is handled by the model
NOISE_PRESETS: dict[str, tuple[int, float, float]] = {
    "default": (50, 0.005, 0.01),   # the paper's setting (Sec. 5.1.3)
    "heavy": (2000, 0.005, 0.1),    # "heavy noise" ablation (Table 5)
}


class DiffusionSchedule(nn.Module):
    """A beta schedule ``beta_1..beta_T`` and its cumulative products (linear unless ``betas``)."""

    def __init__(self, steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                 betas: torch.Tensor | None = None):
        super().__init__()
        if steps < 1:
            raise ValueError(f"diffusion steps must be >= 1, got {steps}")
        if betas is None:
            if not 0 < beta_start <= beta_end < 1:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
            betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.shape != (steps,) or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas must be {steps} values in (0, 1)")
        self.steps = steps
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)  # [T + 1], index = t

    @classmethod
    def preset(cls, name: str) -> DiffusionSchedule:
        if name not in NOISE_PRESETS:
            raise ValueError(f"unknown noise preset {name!r}; allowed: {', '.join(NOISE_PRESETS)}")
        return cls(*NOISE_PRESETS[name])

    @classmethod
    def named(cls, kind: str, steps: int) -> DiffusionSchedule:
        """``linear`` (DDPM's 1e-4..0.02 over 1000 steps, rescaled to ``steps``), ``cosine`` or ``sqrt``."""
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        if kind == "linear":
            scale = 1000.0 / steps
            return cls(steps, betas=torch.linspace(1e-4 * scale, min(0.02 * scale, 0.999), steps, dtype=torch.float64))
        if kind == "cosine":
            s = 0.008
            f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
            abar = f / f[0]
        elif kind == "sqrt":
            abar = 1.0 - torch.sqrt(t + 1e-4)
        else:
            raise ValueError(f"unknown noise schedule {kind!r}; allowed: linear, cosine, sqrt")
        betas = (1.0 - abar[1:] / abar[:-1].clamp_min(1e-12)).clamp(1e-6, 0.999)
        return cls(steps, betas=betas)

    def _ab(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at ``t`` ([R] or scalar) shaped to broadcast against ``like`` [R, ...]."""
        if not torch.is_tensor(t):
            t = torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)
        ab = self.alpha_bar.to(like.dtype)[t.to(self.alpha_bar.device)].to(like.device)
        return ab.view(-1, *([1] * (like.dim() - 1)))

    def sample_t(self, n: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform steps in 1..T drawn on the CPU (global RNG unless ``generator``), then moved."""
        return torch.randint(1, self.steps + 1, (n,), generator=generator).to(device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 4: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def posterior_mean(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                       s: torch.Tensor | int) -> torch.Tensor:
        """Mean of ``q(x_s | x_t, x0)`` for ``0 <= s < t``; ``s = 0`` returns ``x0_hat``."""
        a_t, a_s = self._ab(t, x_t), self._ab(s, x_t)
        a_ts = a_t / a_s
        denom = (1.0 - a_t).clamp_min(1e-12)
        c0 = a_s.sqrt() * (1.0 - a_ts) / denom
        ct = a_ts.sqrt() * (1.0 - a_s) / denom
        return c0 * x0_hat + ct * x_t

    def posterior_std(self, t: torch.Tensor | int, s: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """Standard deviation of ``q(x_s | x_t, x0)`` (the stochastic reverse term, sqrt(beta~))."""
        a_t, a_s = self._ab(t, like), self._ab(s, like)
        var = (1.0 - a_s) / (1.0 - a_t).clamp_min(1e-12) * (1.0 - a_t / a_s)
        return var.clamp_min(0.0).sqrt()

    def reverse_steps(self, n_steps: int) -> list[int]:
        """``n_steps + 1`` evenly spaced, strictly decreasing steps from T to 0 (n_steps <= T)."""
        if not 1 <= n_steps <= self.steps:
            raise ValueError(f"denoise steps must be in 1..{self.steps}, got {n_steps}")
        return [int(v) for v in torch.linspace(self.steps, 0, n_steps + 1, dtype=torch.float64).round()]

    def reverse(self, denoise_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, object]],
                x_T: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, object]:
        """Run the reverse chain from ``x_T`` in ``n_steps`` denoiser calls.

        Returns the last call's ``(x0_hat, aux)`` (the call at the smallest t > 0).
        """
        steps = self.reverse_steps(n_steps)
        x = x_T
        out: tuple[torch.Tensor, object] = (x_T, None)
        for t, s in zip(steps[:-1], steps[1:]):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            out = denoise_fn(x, tt)
            x = self.posterior_mean(out[0], x, t, s)
        return out


def fixed_noise(n_rows: int, dim: int, seed: int, chunk: int = 256, dtype=torch.float32) -> torch.Tensor:
    """A deterministic ``[n_rows, dim]`` standard-normal table, generated on the CPU in chunks of
    ``chunk`` rows each seeded with ``seed + chunk_index``, so row ``i`` is the same whatever
    ``n_rows`` is asked for (the table can grow without changing earlier rows)."""
    parts = []
    for k in range((n_rows + chunk - 1) // chunk):
        g = torch.Generator().manual_seed(seed + k)
        parts.append(torch.randn(chunk, dim, generator=g, dtype=torch.float64))
    if not parts:
        return torch.zeros(0, dim, dtype=dtype)
    return torch.cat(parts)[:n_rows].to(dtype)


def guided(uncond: torch.Tensor, conds: list[torch.Tensor], gammas: list[float]) -> torch.Tensor:
    """Classifier-free guidance with one or more conditions (iFusion eq. 7 and 14):
    ``f_u + sum_j gamma_j (f_j - f_u)``."""
    out = uncond
    for f, g in zip(conds, gammas, strict=True):
        out = out + g * (f - uncond)
    return out


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer) diffusion steps ``t`` [R] -> [R, dim]."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(max_period, dtype=torch.float64))
                      * torch.arange(half, dtype=torch.float64) / max(half, 1)).to(t.device)
    args = t.to(torch.float64)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.float()


def token_kl(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Mean over valid tokens of ``KL(softmax(pred/tau) || softmax(target/tau))`` over the last dim."""
    logp = F.log_softmax(pred / tau, dim=-1)
    logq = F.log_softmax(target / tau, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)

"""DiffusionGS: query-conditioned DDPM denoising of the behaviour sequence (paper sec. 4).

Pipeline (per request, all inside :meth:`DiffusionGS.encode`)::

    x0    = MLP(emb.history) + PosEmb(recency)                 eq. 1-2 (TimeEmb is in emb.history)
    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps              eq. 3-4
    h     = UDL_1..UDL_L(x_t + StepEmb(t)), query injected mid   sec. 4.3-4.4
    s, d  = static_head(h), dynamic_head(h);  x0_hat = s + d
    u     = masked_mean(d): the interest (request vector, crossed with the candidate)

Choices where the paper is ambiguous (README "DiffusionGS"):

* Tokens: positive and negative engagements (every logged action) are tokens. PosEmb is learned
  and indexed by recency (0 = most recent behaviour), capped at ``max_positions - 1``.
* UDL (eq. 8-11): ``H = (Q K^T / n) V * U``, multi-head, no softmax, padded keys masked, n = the
  request's true history length. ``U = SiLU(W_U g)`` with g = the gate features, broadcast over
  positions. Gate features are the user and context fields whose names are in ``fmap.gate`` (a
  role's dense field is included when any of its numeric features is named); if none are named, g
  is a constant and U a learned vector. Each layer: output projection, residual, LayerNorm, FFN,
  residual, LayerNorm (post-norm: keeps the un-normalised attention of deep stacks bounded);
  padding rows are re-zeroed after every layer. ``attention_impl: linear`` computes
  ``Q (K^T V) / n`` (O(n d^2)), ``quadratic`` the reference ``(Q K^T / n) V`` (O(n^2 d)); they
  are the same function.
* ``gate: learnt`` is HSTU's ``U = SiLU(X W_U)`` per token; ``gate: none`` is plain softmax
  self-attention (scaled by 1/sqrt(d_head)) without a gate: softmax has no linear-time form, so
  ``attention_impl`` does not apply there.
* Query injection: ``add`` (paper) adds a zero-initialised projection of q to every valid token
  between layer L//2 and L//2 + 1; ``cat`` appends q as an extra token at the input (n counts it);
  ``cross`` turns the last layer into cross-attention with q as the single attention query and
  the sequence as keys/values; its [R, d] output is added (residually) to every token.
* Diffusion step embedding: sinusoidal -> MLP, added to every valid input token.
* Prediction (eq. 13 departs): ``sigmoid(mean_t d_t)`` cannot see the candidate, so the CTR/CVR
  head gets the interest ``mean_t d_t`` as the model's request vector and crossed with the
  candidate; the query, the user/context fields, the candidate and the shared cross features
  (candidate x query among them) come from :class:`~qdrank.models.base.RankModel` like in every
  other model.
* KL (eq. 12): ``KL(softmax((s+d)/tau) || softmax(x0/tau))`` per valid token, averaged; x0 is
  detached in the target (a reconstruction target, so the KL cannot be lowered by collapsing the
  input tokens; x0 is still trained through the prediction path). Training only.
* Training draws one step t per request (uniform 1..T, torch's global RNG, which the trainer
  seeds per epoch) and makes one denoiser call on x_t.
* Inference is deterministic and batch-independent: x0 is noised to step T with a fixed noise
  table indexed by (recency, dim), generated from a constant seed (``infer_noise: fixed``), or
  with no noise at all (``infer_noise: mean``: x_T = sqrt(abar_T) x0). Then ``denoise_steps``
  denoiser calls from T to 0 on evenly spaced steps, moving between them with DDPM posterior
  means (strided for jumps, see :mod:`qdrank.models.diffusion`); 1 step = the paper's online mode.
  ``model.denoise_steps`` (the attribute, initialised from the config) may be changed at run time.
  The dynamic tokens of the last call are the interest.
* ``noise: none`` skips diffusion: x0 goes straight through the denoiser (step 0), in training
  and inference alike.
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
from qdrank.models.diffusion import (
    NOISE_PRESETS,
    DiffusionSchedule,
    fixed_noise,
    timestep_embedding,
    token_kl,
)
from qdrank.models.layers import Dropout, masked_mean

INFER_NOISE_SEED = 20250917
ALLOWED = {
    "injection": ("add", "cat", "cross"),
    "gate": ("user", "learnt", "none"),
    "noise": ("default", "none", "heavy"),
    "attention_impl": ("linear", "quadratic"),
    "infer_noise": ("fixed", "mean"),
    "token_norm": ("rms", "none"),
    "denoise_loss": ("x0", "eps", "none"),
    "static": ("tokenwise", "shared"),
    "dynamic": ("free", "gated"),
}


@dataclass
class DiffusionGSConfig(ModelConfig):
    layers: int = 2                # stacked User-aware Denoising Layers (2..8, Figure 4; README "Models")
    heads: int = 2
    injection: str = "add"         # add | cat | cross (Table 3)
    gate: str = "user"             # user | learnt | none (Table 4)
    noise: str = "default"         # default (50 steps, 0.005..0.01) | none | heavy (2000, ..0.1) (Table 5)
    denoise_steps: int = 1         # reverse-chain denoiser calls at inference (1 = online mode, T = full)
    attention_impl: str = "linear"  # linear: Q(K^T V)/n | quadratic: (QK^T/n)V
    kl_weight: float = 0.1         # lambda of eq. 15; 0 disables the KL term
    kl_tau: float = 1.0            # softmax temperature of P(.) in the KL
    ffn_mult: int = 2
    max_positions: int = 512       # recency positions with their own embedding (older share the last)
    infer_noise: str = "fixed"     # fixed: constant-seed noise table by recency | mean: no noise at inference
    token_norm: str = "rms"        # rms: x0 tokens scaled to unit RMS, so the betas mean what they say | none
    denoise_loss: str = "x0"       # x0 | eps: MSE of the denoiser on valid tokens | none (the paper: KL only)
    denoise_weight: float = 1.0    # weight of that MSE
    static: str = "tokenwise"      # tokenwise: s from each noisy token alone, shrunk by sqrt(abar_t) (no query, no context)
                                   # | shared: s and d two linear heads on the same UDL state (the paper)
    dynamic: str = "free"          # free: d = dynamic_head(h) | gated: d scaled per token by sigmoid(<W q, K h_t>), the
                                   # token's relevance to the query (so ||d_t|| can follow it, the paper's Figure 3)
    query_in_head: bool = True     # the query vector in the CTR head beside the interest (eq. 13 has none)
    train_steps: int = 1           # denoiser calls per training example from its step t down to 0


def validate_config(cfg: DiffusionGSConfig) -> None:
    for key, allowed in ALLOWED.items():
        v = getattr(cfg, key)
        if v not in allowed:
            raise ValueError(f"model.{key}={v!r} is not allowed; choose one of: {', '.join(allowed)}")
    if not 1 <= cfg.layers <= 64:
        raise ValueError(f"model.layers={cfg.layers} must be in 1..64 (the paper studies 2..8)")
    if cfg.heads < 1 or cfg.dim % cfg.heads:
        raise ValueError(f"model.heads={cfg.heads} must be >= 1 and divide model.dim={cfg.dim}")
    if cfg.kl_weight < 0 or cfg.denoise_weight < 0:
        raise ValueError(f"model.kl_weight={cfg.kl_weight} and model.denoise_weight={cfg.denoise_weight} must be >= 0")
    if cfg.train_steps < 1:
        raise ValueError(f"model.train_steps={cfg.train_steps} must be >= 1")
    if cfg.kl_tau <= 0:
        raise ValueError(f"model.kl_tau={cfg.kl_tau} must be > 0")
    if cfg.ffn_mult < 1 or cfg.max_positions < 1:
        raise ValueError("model.ffn_mult and model.max_positions must be >= 1")
    if cfg.noise != "none":
        T = NOISE_PRESETS[cfg.noise][0]
        if not 1 <= cfg.denoise_steps <= T:
            raise ValueError(f"model.denoise_steps={cfg.denoise_steps} must be in 1..{T} for model.noise={cfg.noise}")
    elif cfg.denoise_steps < 1:
        raise ValueError(f"model.denoise_steps={cfg.denoise_steps} must be >= 1")


# ---- attention ------------------------------------------------------------------------------------
def length_normalized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                                impl: str = "linear") -> torch.Tensor:
    """``(Q K^T / n) V`` without softmax. q [R,H,Lq,dh], k/v [R,H,L,dh], key_mask [R,L] -> [R,H,Lq,dh].

    n = number of valid keys per request (>= 1). ``linear`` evaluates ``Q (K^T V) / n`` in
    O(L dh^2) per head; ``quadratic`` materialises the [Lq, L] score matrix.
    """
    m = key_mask[:, None, :, None].to(k.dtype)
    n = key_mask.sum(1).clamp_min(1).to(k.dtype)[:, None, None, None]
    k = k * m
    if impl == "linear":
        return q @ ((k.transpose(-1, -2) @ (v * m)) / n)
    if impl == "quadratic":
        return ((q @ k.transpose(-1, -2)) / n) @ v
    raise ValueError(f"model.attention_impl={impl!r}; choose one of: linear, quadratic")


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Plain masked softmax attention (the ``gate: none`` ablation); rows with no key give 0."""
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return s.softmax(-1).nan_to_num(0.0) @ v


class UserAwareDenoisingLayer(nn.Module):
    """One UDL (eq. 8-11), or with ``cross=True`` its cross-attention form (one query vector)."""

    def __init__(self, dim: int, heads: int, gate: str, gate_dim: int, impl: str, ffn_mult: int,
                 dropout: float, cross: bool = False):
        super().__init__()
        self.heads, self.gate, self.impl, self.cross = heads, gate, impl, cross
        self.w_q, self.w_k, self.w_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.w_u = nn.Linear(gate_dim if gate == "user" else dim, dim) if gate != "none" else None
        self.out = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.SiLU(), Dropout(dropout),
                                 nn.Linear(ffn_mult * dim, dim))
        self.drop = Dropout(dropout)
        # the user-gated linear-attention branch folded into one [d, d] matrix per request (see
        # :meth:`folded_attention`); False: the reference form (set_fast_layers)
        self.fast = True

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        R, L, d = x.shape
        return x.view(R, L, self.heads, d // self.heads).transpose(1, 2)

    def folded_attention(self, x: torch.Tensor, mask: torch.Tensor, gate_in: torch.Tensor) -> torch.Tensor:
        """``out(gate * attention(x))`` for the user gate and linear attention, as ``x A_r + c_r``.

        Everything between the tokens and the output projection is linear in the query tokens with
        per-request coefficients: per head ``Q_h (K_h^T V_h / n)``, i.e. ``Q BD(M)`` with ``M = K^T V / n``
        [d, d] kept on its head blocks; the user gate scales columns; so the branch is
        ``x (W_q^T BD(M) diag(U) W_o^T) + (b_q BD(M) diag(U) W_o^T + b_o)``. The [d, d] matrix is
        built once per request, so per token only the K and V projections and one [d, d] product
        remain instead of four projections, the per-head products, head transposes and the gate; the same function as the reference form (tests/test_speed.py). Used for histories
        longer than the width, where it pays."""
        d = x.shape[-1]
        m = mask.unsqueeze(-1).to(x.dtype)
        n = mask.sum(1).clamp_min(1).to(x.dtype)[:, None, None]
        k, v = self.w_k(x) * m, self.w_v(x)          # (k m)^T v = (k m)^T (v m): the mask is 0/1
        head = torch.arange(d, device=x.device) // (d // self.heads)
        blocks = (head[:, None] == head[None, :]).to(k.dtype)
        u = F.silu(self.w_u(gate_in)).to(k.dtype)
        b = torch.bmm(k.transpose(1, 2), v) * (blocks / n) * u[:, None, :]       # [R, d, d]
        a = torch.matmul(torch.matmul(self.w_q.weight.t().to(b.dtype), b), self.out.weight.t().to(b.dtype))
        c = F.linear(torch.matmul(self.w_q.bias.to(b.dtype), b), self.out.weight, self.out.bias)
        return torch.baddbmm(c.unsqueeze(1).to(a.dtype), x.to(a.dtype), a)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, gate_in: torch.Tensor,
                query: torch.Tensor | None = None) -> torch.Tensor:
        """x [R, L, d], mask [R, L], gate_in [R, G], query [R, d] (cross only) -> [R, L, d]."""
        # folded only where it pays: its per-request [d, d] products cost ~d^3 per request, the
        # per-token work it saves ~d^2 per token (measured: x0.92 at history 50, x1.07 at 100,
        # x1.24 at 1,000, width 64). Also under a trace (serving's request encoder, an export): the
        # choice reads only the history width, which a trace fixes anyway, and either form is the same
        # function (bench_serving.py traced_fast_layers, history 10,000: x1.12 per request in CPU time)
        if (self.gate == "user" and self.impl == "linear" and not self.cross and self.fast
                and x.shape[1] > x.shape[2]):
            m = mask.unsqueeze(-1).to(x.dtype)
            x = self.norm1(x + self.drop(self.folded_attention(x, mask, gate_in)))
            x = self.norm2(x + self.drop(self.ffn(x)))
            return x * m
        src = query[:, None, :] if self.cross else x               # attention queries [R, Lq, d]
        q, k, v = self._split(self.w_q(src)), self._split(self.w_k(x)), self._split(self.w_v(x))
        if self.gate == "none":
            h = softmax_attention(q, k, v, mask)
        else:
            h = length_normalized_attention(q, k, v, mask, self.impl)
        h = h.transpose(1, 2).reshape(src.shape)                   # [R, Lq, d]
        if self.gate == "user":
            h = h * F.silu(self.w_u(gate_in))[:, None, :]
        elif self.gate == "learnt":
            h = h * F.silu(self.w_u(src))
        m = mask.unsqueeze(-1).to(x.dtype)
        x = self.norm1(x + self.drop(self.out(h)))                  # cross: [R, 1, d] broadcast
        x = self.norm2(x + self.drop(self.ffn(x)))
        return x * m


# ---- model ----------------------------------------------------------------------------------------
class DiffusionGS(RankModel):
    config_class = DiffusionGSConfig

    def __init__(self, fmap: FeatureMap, cfg: DiffusionGSConfig):
        validate_config(cfg)
        super().__init__(fmap, cfg)
        d = cfg.dim
        self.token_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.pos = nn.Embedding(cfg.max_positions, d)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.q_proj = nn.Linear(d, d)
        self.step_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.schedule = DiffusionSchedule.preset(cfg.noise) if cfg.noise != "none" else None
        self._gate_index = self._gate_fields(fmap)
        gate_dim = len(self._gate_index) * d if self._gate_index else 1
        L = cfg.layers
        self.layers = nn.ModuleList([
            UserAwareDenoisingLayer(d, cfg.heads, cfg.gate, gate_dim, cfg.attention_impl, cfg.ffn_mult,
                                    cfg.dropout, cross=(cfg.injection == "cross" and i == L - 1))
            for i in range(L)])
        self.inject_after = max(L // 2 - 1, 0)  # 0-based: between layer L//2 and L//2 + 1 (1-based)
        if cfg.injection == "add":
            self.inject = nn.Linear(d, d)
            nn.init.zeros_(self.inject.weight)
            nn.init.zeros_(self.inject.bias)
        elif cfg.injection == "cat":
            self.inject = nn.Linear(d, d)
        self.static_head = nn.Linear(d, d)
        self.dynamic_head = nn.Linear(d, d)
        if cfg.dynamic == "gated":
            self.relevance_q, self.relevance_k = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.denoise_steps = cfg.denoise_steps
        # Inference noise as a stored constant, not a generator call, so ONNX / TorchScript export sees a
        # tensor and every history length reads the same rows (recency is capped at max_positions - 1).
        self.register_buffer("infer_noise_table", fixed_noise(cfg.max_positions, d, INFER_NOISE_SEED))
        self.rebuildable_state = ("infer_noise_table",)  # runs saved before it was stored: rebuilt from the seed
        self.build_head(n_request_vectors=1, interest=True, query=cfg.query_in_head)

    # ---- pieces -------------------------------------------------------------------------------
    def _gate_fields(self, fmap: FeatureMap) -> list[int]:
        """Indices into cat([emb.user, emb.context], -2) of the fields named by ``fmap.gate``."""
        names = set(fmap.gate)
        out, base = [], 0
        for role in ("user", "context"):
            layout = fmap.slot_layout(role)
            out += [base + i for i, (f, _, _) in enumerate(layout) if f.name in names]
            if fmap.n_numeric(role):
                if any(f.name in names for f in fmap.role_features(role, sparse=False)):
                    out.append(base + len(layout))
            base += self.emb.n_fields(role)
        return out

    def gate_input(self, b: Batch, fields: torch.Tensor | None = None) -> torch.Tensor:
        if fields is None:
            fields = torch.cat([self.emb.user(b), self.emb.context(b)], dim=-2)
        if not self._gate_index:
            return fields.new_ones(fields.shape[0], 1)
        return fields[:, self._gate_index].flatten(1)

    def tokens(self, b: Batch, raw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (x0 [R, L, d], mask [R, L], recency index [R, L]); ``raw`` = ``emb.history(b)`` if computed."""
        mask = b.hist_mask
        n = mask.sum(1, keepdim=True)
        rec = (n - 1 - torch.arange(mask.shape[1], device=mask.device)[None]).clamp(0, self.cfg.max_positions - 1)
        x0 = self.token_mlp(self.emb.history(b) if raw is None else raw) + self.pos(rec)
        if self.cfg.token_norm == "rms":
            x0 = x0 * torch.rsqrt(x0.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x0 * mask.unsqueeze(-1).to(x0.dtype), mask, rec

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, q: torch.Tensor, gate_in: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One denoiser call: -> (x0_hat = s + d, (s, d)), all [R, L, d], zero at padding."""
        m = mask.unsqueeze(-1).to(x_t.dtype)
        h = x_t + self.step_mlp(timestep_embedding(t, self.cfg.dim).to(x_t.dtype))[:, None, :] * m
        inj = self.cfg.injection
        if inj == "cat":
            h = torch.cat([h, self.inject(q)[:, None, :]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, gate_in, query=q if layer.cross else None)
            if inj == "add" and i == self.inject_after:
                h = h + self.inject(q)[:, None, :] * mask.unsqueeze(-1).to(h.dtype)
        if inj == "cat":
            h = h[:, :-1]
        if self.cfg.static == "tokenwise":
            # the static part sees one noisy token at a time, shrunk to E[x0 | x_t] = sqrt(abar_t) x_t
            # (unit-variance tokens): it cannot depend on the query or the other behaviours, so d
            # alone carries the query-dependent interest
            ab = self.schedule._ab(t, x_t) if self.schedule is not None else x_t.new_ones(x_t.shape[0], 1, 1)
            s = self.static_head(x_t * ab.sqrt()) * m
        else:
            s = self.static_head(h) * m
        d = self.dynamic_head(h) * m
        if self.cfg.dynamic == "gated":
            rel = (self.relevance_q(q)[:, None, :] * self.relevance_k(h)).sum(-1, keepdim=True)
            d = d * torch.sigmoid(rel * self.cfg.dim ** -0.5)
        return s + d, (s, d)

    def _inference_noise(self, rec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Fixed noise per (recency, dim): a lookup in the stored table, [R, L] -> [R, L, d]."""
        return self.infer_noise_table[rec].to(like.dtype)

    def train_chain(self, x_t: torch.Tensor, t: torch.Tensor, q: torch.Tensor, gate_in: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``train_steps`` denoiser calls from each request's own step t down to 0 (strided), with
        DDPM posterior means between them: training sees the multi-step regime inference uses."""
        k = self.cfg.train_steps
        x, out = x_t, self.denoise(x_t, t, q, gate_in, mask)
        for j in range(1, k):
            cur = (t * (k - j + 1) + k - 1) // k
            nxt = (t * (k - j)) // k
            x = self.schedule.posterior_mean(out[0], x, cur, nxt) * mask.unsqueeze(-1).to(x.dtype)
            step = nxt.clamp_min(1)
            out = self.denoise(x, step, q, gate_in, mask)
        return out

    def run_diffusion(self, b: Batch, q: torch.Tensor, gate_in: torch.Tensor, raw: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (x0, x0_hat, d tokens, mask). Training: a chain from a random step; eval: reverse chain.

        In training the denoising loss (``denoise_loss``) is stored in ``self._denoise_loss``."""
        x0, mask, rec = self.tokens(b, raw)
        m = mask.unsqueeze(-1).to(x0.dtype)
        R = x0.shape[0]
        sch = self.schedule
        self._denoise_loss = None
        if sch is None:
            x0_hat, (_, d) = self.denoise(x0, torch.zeros(R, dtype=torch.long, device=x0.device), q, gate_in, mask)
        elif self.training:
            t = sch.sample_t(R, x0.device)
            eps = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device)
            x_t = sch.q_sample(x0, t, eps) * m
            x0_hat, (_, d) = self.train_chain(x_t, t, q, gate_in, mask)
            if self.cfg.denoise_loss != "none" and self.cfg.denoise_weight > 0:
                target = x0.detach()
                if self.cfg.denoise_loss == "eps":
                    ab = sch._ab(t, x0)
                    x0_hat_eps = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
                    err, target = x0_hat_eps, eps
                else:
                    err = x0_hat
                per_tok = (err - target).pow(2).mean(-1)
                self._denoise_loss = (per_tok * mask).sum() / mask.sum().clamp_min(1)
        else:
            eps = self._inference_noise(rec, x0) if self.cfg.infer_noise == "fixed" else torch.zeros_like(x0)
            x_T = sch.q_sample(x0, sch.steps, eps) * m
            x0_hat, (_, d) = sch.reverse(lambda x, t: self.denoise(x, t, q, gate_in, mask), x_T,
                                         self.denoise_steps)
        return x0, x0_hat, d, mask

    # ---- RankModel ----------------------------------------------------------------------------
    def encode(self, batch: Batch) -> RequestState:
        q = self.q_proj(self.emb.query(batch))
        raw = self.emb.history(batch)
        x0, x0_hat, d, mask = self.run_diffusion(batch, q, self.gate_input(batch), raw)
        interest = masked_mean(d, mask, 1)
        state = {"req": interest, "interest": interest, "tokens": raw}
        if self.training:
            aux = []
            if self.cfg.kl_weight > 0:
                aux.append(self.cfg.kl_weight * token_kl(x0_hat, x0.detach(), mask, self.cfg.kl_tau))
            if self._denoise_loss is not None:
                aux.append(self.cfg.denoise_weight * self._denoise_loss)
            if aux:
                state["aux_loss"] = torch.stack(aux).sum()
        return state

    @torch.no_grad()
    def reconstruction(self, batch: Batch) -> dict[str, float]:
        """Mean squared error against x0 on valid tokens at t = T (eval mode, inference noise): the
        denoiser's estimate s + d, and the reference of merely rescaling the noisy input
        x_T / sqrt(abar_T). A denoiser that denoises beats the reference."""
        if self.schedule is None:
            raise ValueError("model.noise=none has no noisy input to reconstruct")
        was = self.training
        self.eval()
        try:
            q = self.q_proj(self.emb.query(batch))
            gate_in = self.gate_input(batch)
            x0, mask, rec = self.tokens(batch)
            m = mask.unsqueeze(-1).to(x0.dtype)
            sch = self.schedule
            eps = self._inference_noise(rec, x0) if self.cfg.infer_noise == "fixed" else torch.zeros_like(x0)
            x_T = sch.q_sample(x0, sch.steps, eps) * m
            x0_hat, _ = sch.reverse(lambda x, t: self.denoise(x, t, q, gate_in, mask), x_T, self.denoise_steps)
            n = mask.sum().clamp_min(1)

            def mse(a: torch.Tensor) -> float:
                return float(((a - x0).pow(2).mean(-1) * mask).sum() / n)

            return {"model": mse(x0_hat), "rescaled_input": mse(x_T / sch.alpha_bar[sch.steps].sqrt()),
                    "noise_std_at_T": float((1 - sch.alpha_bar[sch.steps]).sqrt()),
                    "token_rms": float((x0.pow(2).mean(-1) * mask).sum().div(n).sqrt())}
        finally:
            self.train(was)

    @torch.no_grad()
    def dynamic_interest(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoised dynamic part per history token in eval mode -> (d [R, L, d], mask [R, L])."""
        was = self.training
        self.eval()
        try:
            q = self.q_proj(self.emb.query(batch))
            _, _, d, mask = self.run_diffusion(batch, q, self.gate_input(batch))
        finally:
            self.train(was)
        return d, mask

"""iFusion (diffusion-based fusion of long- and short-term interests; ``shared/papers/ifusion.txt``).

Pipeline, per request (all inside :meth:`IFusion.encode_request`)::

    tokens          = emb.history                       (left-aligned, chronological)
    short window    = the last ``short_len`` behaviours, cut into <= K sessions (session ids or gap rule)
    long window     = every behaviour before the short window (the issue's "the M before")
    h^L             = MLP(attention pool of the long window, query-aware)          x_0 of the diffusion
    g_cp[k], g_tf[k]= core (avg-pool + strongly regularised MLP) and transient (attention + MLP)
                      guidance of session k                                        DCFG, eq. 9-10
    train:  x_t = q_sample(h^L, t, eps), t ~ U(1..T)
    MARN:   x <- f_hat(x, t, g[k]) for the sessions k = 1..K in order (AR); NAR: one call, sessions pooled
    f_hat   = f_u + gamma_cp (f_cp - f_u) + gamma_tf (f_tf - f_u)                  eq. 14 (cfg: eq. 7)
    infer:  x_T = h^L (Algorithm 2), ``denoise_steps`` calls from T to 0 (1 = single step, default)
    head:   the shared head (RankModel) with the fused interest as the model's request vector and
            interest (crossed with the candidate), beside the query, profile and cross features
    loss:   CTR/CVR BCE + l1 L_Evol + l2 L_Dist + l3 L_cons                          eq. 18

Where the paper is ambiguous, and what was chosen:

* Sessions (the paper's "K sessions", ``session_source``): ``column`` takes them from the log's
  session ids (``Batch.hist_session``, the behaviours' ``session`` column: Trivago's session_id);
  ``gap`` starts a new session where two consecutive behaviours are more than ``session_gap``
  seconds apart (``Batch.hist_age`` holds each behaviour's age; ``session_gap: 0`` cuts the short
  window into K equal chunks instead); ``auto`` (default) uses the ids for a request whose short
  window has any, the gap rule for the others (per request, so a request's sessions never depend
  on the batch it is in). Either way only the most recent K sessions keep their own slot; older
  behaviours of the short window join the oldest slot, and so does a behaviour with no known
  session before it (``hist_session`` -1) in ``column`` mode. Sessions fill slots from the right
  (the most recent session is slot K-1).
* MARN step noise level: every session's denoiser call uses the same step ``t``; the output after
  session k (an x_0 estimate) is the "noisy" input of session k+1, as the paper says.
* Training combination: the paper's Algorithm 1 averages the two conditional predictions
  (``train_combine: average``); by default the model is trained with the same guided formula
  it is served with (``train_combine: guided``), condition dropout teaching the unconditional
  branch. Both are switches.
* L_Evol: MARN over all sessions but the most recent predicts the most recent session's interest
  (mean of its encoded tokens, detached); cosine distance, requests with >= 2 sessions only.
* L_Dist: mean squared cosine similarity of g_cp[k] and g_tf[k] over valid sessions (Table 5's
  "cosine similarity minimisation"; the squared dot product of eq. 18 would shrink the norms).
* L_cons: the fused interest at two random noise levels of the same request, mean squared error
  (eq. 15); a second MARN pass, training only.
* Inference is deterministic: Algorithm 2 starts from x_T = h^L (``infer_start: long``;
  ``noised`` starts from sqrt(abar_T) h^L, the forward process's mean); the stochastic term
  sqrt(beta~) z of eq. 19 is off by default and, when on (``reverse_noise: true``), uses a fixed
  stored noise table, so serving stays deterministic and exportable.
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
from qdrank.models.diffusion import DiffusionSchedule, fixed_noise, guided, timestep_embedding
from qdrank.models.layers import MLP, masked_mean
from qdrank.models.transformer import MultiHeadTargetAttention, masked_softmax

REVERSE_NOISE_SEED = 20251122
ALLOWED = {
    "schedule": ("cosine", "linear", "sqrt"),
    "guidance": ("dcfg", "cfg"),
    "fusion": ("ar", "nar"),
    "train_combine": ("guided", "average"),
    "infer_start": ("long", "noised"),
    "session_source": ("auto", "column", "gap"),
}


@dataclass
class IFusionConfig(ModelConfig):
    short_len: int = 20            # most recent behaviours forming the short-term window
    sessions: int = 4              # K: short-term sessions with their own guidance
    session_gap: int = 1800        # seconds between behaviours that open a new session; 0 = K equal chunks
    schedule: str = "cosine"       # cosine | linear | sqrt (Figure 4a)
    diffusion_steps: int = 50      # T
    denoise_steps: int = 1         # denoiser calls at inference: 1 = single step (default), T = full chain
    guidance: str = "dcfg"         # dcfg (two conditions, eq. 14) | cfg (one condition, one gamma, eq. 7)
    gamma_cp: float = 2.0          # DCFG core-preference strength
    gamma_tf: float = 1.0          # DCFG transient strength
    gamma: float = 1.0             # plain CFG strength
    cond_drop: float = 0.1         # probability of dropping each condition in training (-> null)
    fusion: str = "ar"             # ar: MARN, sessions injected one after another | nar: pooled at once
    train_combine: str = "guided"  # guided (as served) | average (Algorithm 1's normalised average)
    evol_weight: float = 0.1       # lambda1 (0 = off)
    dist_weight: float = 0.01      # lambda2 (0 = off)
    cons_weight: float = 0.1       # lambda3 (0 = off)
    core_dropout: float = 0.5      # the core-preference path's strong regularisation
    heads: int = 2                 # attention heads of the long-term encoder
    infer_start: str = "long"      # long: x_T = h^L (Algorithm 2) | noised: x_T = sqrt(abar_T) h^L
    reverse_noise: bool = False    # add the fixed stochastic term of eq. 19 on multi-step inference
    session_source: str = "auto"   # column: the log's session ids | gap: session_gap rule | auto: ids where a
    #                                request's short window has any, else the gap rule


def validate_config(cfg: IFusionConfig) -> None:
    for key, allowed in ALLOWED.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"model.{key}={getattr(cfg, key)!r} is not allowed; choose one of: {', '.join(allowed)}")
    if cfg.sessions < 1 or cfg.short_len < 1:
        raise ValueError("model.sessions and model.short_len must be >= 1")
    if cfg.session_gap < 0:
        raise ValueError(f"model.session_gap={cfg.session_gap} must be >= 0 seconds")
    if not 1 <= cfg.denoise_steps <= cfg.diffusion_steps:
        raise ValueError(f"model.denoise_steps={cfg.denoise_steps} must be in 1..{cfg.diffusion_steps}")
    if not 0 <= cfg.cond_drop < 1:
        raise ValueError(f"model.cond_drop={cfg.cond_drop} must be in [0, 1)")
    if min(cfg.evol_weight, cfg.dist_weight, cfg.cons_weight) < 0:
        raise ValueError("model.evol_weight, dist_weight and cons_weight must be >= 0")
    if cfg.dim % cfg.heads:
        raise ValueError(f"model.heads={cfg.heads} must divide model.dim={cfg.dim}")


def session_slots(hist_len: torch.Tensor, L: int, short_len: int, k: int, age: torch.Tensor | None,
                  gap: int, session: torch.Tensor | None = None, source: str = "gap") -> torch.Tensor:
    """[R, L] session slot (0..k-1, most recent = k-1) of each short-window token; -1 elsewhere.

    ``source``: ``gap`` (the ``gap`` rule on ``age``, or k equal chunks), ``column`` (the session
    ordinals ``session`` = ``Batch.hist_session``) or ``auto`` (column for the requests whose short
    window has a session id, gap for the others)."""
    pos = torch.arange(L, device=hist_len.device)
    n = hist_len.unsqueeze(1)
    start = (n - short_len).clamp_min(0)
    in_window = (pos >= start) & (pos < n)
    if source == "gap" or session is None:
        slot = _gap_slots(pos, n, start, in_window, k, age, gap)
    else:
        # ordinals count sessions back from the request: the window's most recent one -> slot k-1
        known = in_window & (session >= 0)
        newest = torch.where(known, session, torch.full_like(session, L + 1)).min(1, keepdim=True).values
        col = torch.where(known, (k - 1 - (session - newest)).clamp_min(0), torch.zeros_like(session))
        slot = col if source == "column" else torch.where(known.any(1, keepdim=True), col, _gap_slots(
            pos, n, start, in_window, k, age, gap))
    return torch.where(in_window, slot, torch.full_like(slot, -1))


def _gap_slots(pos: torch.Tensor, n: torch.Tensor, start: torch.Tensor, in_window: torch.Tensor, k: int,
               age: torch.Tensor | None, gap: int) -> torch.Tensor:
    """:func:`session_slots` by the gap rule (or k equal chunks), before masking to the window."""
    if age is not None and gap > 0:
        prev = torch.cat([age[:, :1], age[:, :-1]], 1)
        boundary = in_window & (pos > start) & ((prev - age) > gap)
        sid = torch.cumsum(boundary.long(), 1)                        # 0 = first session of the window
        last = (sid * in_window).max(1, keepdim=True).values
        slot = (k - 1 - (last - sid)).clamp_min(0)
    else:
        size = (n - start).clamp_min(1)
        slot = (pos - start).clamp_min(0) * k // size                 # k equal chunks, right-aligned
        slot = slot + (k - 1 - ((size - 1) * k // size))
        slot = slot.clamp(0, k - 1)
    return slot


class IFusion(RankModel):
    config_class = IFusionConfig
    # train.autocast=auto keeps fp32: bf16 made its step ~20% slower on CPU (many small denoiser
    # calls whose casts cost more than their matmuls gain; README "Training throughput")
    bf16_pays = False

    def __init__(self, fmap: FeatureMap, cfg: IFusionConfig):
        validate_config(cfg)
        super().__init__(fmap, cfg)
        d = cfg.dim
        self.long_query = nn.Parameter(torch.zeros(d))
        self.long_q_proj = nn.Linear(d, d)
        self.long_attn = MultiHeadTargetAttention(d, cfg.heads, cfg.dropout)
        self.long_mlp = MLP(2 * d, (d,), cfg.dropout, out_dim=d)
        self.session_enc = nn.Sequential(nn.Linear(d, d), nn.SiLU())
        self.core = MLP(d, (d,), cfg.core_dropout, out_dim=d)          # low-pass: pooled, strongly regularised
        self.tf_score = nn.Linear(d, 1)
        self.transient = MLP(d, (d,), cfg.dropout, out_dim=d)          # high-pass: attention, weakly regularised
        self.null = nn.Parameter(torch.zeros(d))                       # the empty condition
        self.step_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.denoiser = MLP(3 * d, (2 * d,), cfg.dropout, out_dim=d, act=nn.SiLU)
        self.schedule = DiffusionSchedule.named(cfg.schedule, cfg.diffusion_steps)
        self.register_buffer("reverse_noise", fixed_noise(cfg.diffusion_steps + 1, d, REVERSE_NOISE_SEED),
                             persistent=False)
        self.denoise_steps = cfg.denoise_steps
        self.build_head(n_request_vectors=1, interest=True)

    # ---- interests ------------------------------------------------------------------------------
    def long_term(self, tokens: torch.Tensor, mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        aq = self.long_query + self.long_q_proj(q)
        pooled = self.long_attn(aq, tokens, mask)
        return self.long_mlp(torch.cat([pooled, masked_mean(tokens, mask, 1)], -1))

    def guidance(self, tokens: torch.Tensor, slots: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> g_cp [R, K, d], g_tf [R, K, d], session interest [R, K, d], session valid [R, K]."""
        K = self.cfg.sessions
        member = slots.unsqueeze(1) == torch.arange(K, device=slots.device)[None, :, None]   # [R, K, L]
        enc = self.session_enc(tokens)                                                        # [R, L, d]
        w = member.to(enc.dtype)
        interest = (w @ enc) / w.sum(-1, keepdim=True).clamp_min(1.0)
        att = masked_softmax(self.tf_score(enc).squeeze(-1).unsqueeze(1).expand(-1, K, -1), member)
        valid = member.any(-1)
        g_cp = self.core(interest)
        g_tf = self.transient(att @ enc)
        return g_cp, g_tf, interest, valid

    # ---- denoising ------------------------------------------------------------------------------
    def f(self, x: torch.Tensor, t: torch.Tensor, conds: list[torch.Tensor]) -> list[torch.Tensor]:
        """x0-predictions f_theta(x, t, g) for each condition in ``conds`` (one batched call)."""
        n = len(conds)
        temb = self.step_mlp(timestep_embedding(t, x.shape[-1]))
        inp = torch.cat([x.repeat(n, 1), temb.repeat(n, 1), torch.cat(conds)], -1)
        return list(self.denoiser(inp).chunk(n))

    def _drop(self, g: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cfg.cond_drop <= 0:
            return g
        keep = torch.rand(g.shape[0], 1, device=g.device) >= self.cfg.cond_drop
        return torch.where(keep, g, self.null.expand_as(g))

    def f_hat(self, x: torch.Tensor, t: torch.Tensor, g_cp: torch.Tensor, g_tf: torch.Tensor) -> torch.Tensor:
        """One guided denoiser step with the conditions of one session (or the pooled sessions)."""
        c, null = self.cfg, self.null.expand_as(x)
        if c.guidance == "cfg":
            f_u, f_g = self.f(x, t, [null, self._drop(g_cp + g_tf)])
            return guided(f_u, [f_g], [c.gamma])
        g_cp, g_tf = self._drop(g_cp), self._drop(g_tf)
        if self.training and c.train_combine == "average":
            f_cp, f_tf = self.f(x, t, [g_cp, g_tf])
            return (c.gamma_cp * f_cp + c.gamma_tf * f_tf) / (c.gamma_cp + c.gamma_tf)
        f_u, f_cp, f_tf = self.f(x, t, [null, g_cp, g_tf])
        return guided(f_u, [f_cp, f_tf], [c.gamma_cp, c.gamma_tf])

    def fuse(self, x: torch.Tensor, t: torch.Tensor, g_cp: torch.Tensor, g_tf: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor:
        """MARN (AR): sessions in order, each output the next input; NAR: sessions pooled, one call."""
        if self.cfg.fusion == "nar":
            w = valid.unsqueeze(-1).to(x.dtype)
            n = w.sum(1).clamp_min(1.0)
            pooled_cp = torch.where(valid.any(1, keepdim=True), (g_cp * w).sum(1) / n, self.null.expand_as(x))
            pooled_tf = torch.where(valid.any(1, keepdim=True), (g_tf * w).sum(1) / n, self.null.expand_as(x))
            return self.f_hat(x, t, pooled_cp, pooled_tf)
        for k in range(g_cp.shape[1]):
            step = self.f_hat(x, t, g_cp[:, k], g_tf[:, k])
            x = torch.where(valid[:, k : k + 1], step, x)
        return x

    def denoise(self, h_long: torch.Tensor, g_cp: torch.Tensor, g_tf: torch.Tensor, valid: torch.Tensor
                ) -> torch.Tensor:
        """Inference (Algorithm 2): from x_T = h^L down to x_0 in ``denoise_steps`` guided calls."""
        sch = self.schedule
        T = sch.steps
        x = h_long if self.cfg.infer_start == "long" else sch.q_sample(h_long, T, torch.zeros_like(h_long))
        steps = sch.reverse_steps(self.denoise_steps)
        x0 = x
        for t, s in zip(steps[:-1], steps[1:]):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            x0 = self.fuse(x, tt, g_cp, g_tf, valid)
            x = sch.posterior_mean(x0, x, t, s)
            if self.cfg.reverse_noise and s > 0:
                x = x + sch.posterior_std(t, s, x) * self.reverse_noise[t].to(x.dtype)
        return x0

    # ---- RankModel ------------------------------------------------------------------------------
    def encode(self, batch: Batch) -> RequestState:
        c = self.cfg
        tokens, mask = self.emb.history(batch), batch.hist_mask
        q = self.emb.query(batch)
        slots = session_slots(batch.hist_len, mask.shape[1], c.short_len, c.sessions,
                              batch.hist_age, c.session_gap, batch.hist_session, c.session_source)
        long_mask = mask & (slots < 0) & (torch.arange(mask.shape[1], device=mask.device)[None]
                                          < (batch.hist_len - c.short_len).clamp_min(0)[:, None])
        h_long = self.long_term(tokens, long_mask, q)
        g_cp, g_tf, interest, valid = self.guidance(tokens, slots)
        state: RequestState = {"tokens": tokens}
        if self.training:
            R = h_long.shape[0]
            t = self.schedule.sample_t(R, h_long.device)
            fused = self.fuse(self.schedule.q_sample(h_long, t, torch.randn_like(h_long)), t, g_cp, g_tf, valid)
            aux = fused.new_zeros(())
            if c.evol_weight > 0:
                prev = valid.clone()
                prev[:, -1] = False
                has = prev.any(1) & valid[:, -1]
                if bool(has.any()):
                    pred = self.fuse(self.schedule.q_sample(h_long, t, torch.randn_like(h_long)), t, g_cp, g_tf, prev)
                    target = interest[:, -1].detach()
                    aux = aux + c.evol_weight * (1 - F.cosine_similarity(pred[has], target[has], dim=-1)).mean()
            if c.dist_weight > 0 and bool(valid.any()):
                cos = F.cosine_similarity(g_cp[valid], g_tf[valid], dim=-1)
                aux = aux + c.dist_weight * (cos**2).mean()
            if c.cons_weight > 0:
                t2 = self.schedule.sample_t(R, h_long.device)
                other = self.fuse(self.schedule.q_sample(h_long, t2, torch.randn_like(h_long)), t2, g_cp, g_tf, valid)
                aux = aux + c.cons_weight * F.mse_loss(fused, other)
            state["aux_loss"] = aux
        else:
            fused = self.denoise(h_long, g_cp, g_tf, valid)
        state["fused"] = state["req"] = state["interest"] = fused
        return state

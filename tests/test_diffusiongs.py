"""DiffusionGS: attention paths agree, padding/batch invariance, conditioning, determinism, switches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_config

from qdrank.data.batch import Batch
from qdrank.models.diffusion import DiffusionSchedule, fixed_noise
from qdrank.models.diffusiongs import DiffusionGS, UserAwareDenoisingLayer, length_normalized_attention
from qdrank.training.trainer import build_model


def make_model(tiny_dataset, *overrides: str) -> tuple[DiffusionGS, object]:
    _, ds = tiny_dataset
    cfg = tiny_config("diffusiongs", "model.layers=2", "model.dropout=0.0", *overrides)
    return build_model(cfg, ds), cfg


def first_batch(tiny_dataset, n: int = 24) -> Batch:
    _, ds = tiny_dataset
    rows = ds.requests_of("train")
    rows = rows[ds.hist_end[rows] > ds.hist_start[rows]][:n]  # requests with some history
    return ds.make_batch(rows)


def eval_scores(model, b: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(b, use_position=False)
    return torch.stack([out.ctr_logit, out.cvr_logit])


def randomize_injection(model) -> None:
    """The additive injection is zero-initialised; give it weights so the query reaches the tokens."""
    with torch.no_grad():
        if hasattr(model, "inject"):
            model.inject.weight.normal_(0, 0.3)


# ---- attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_linear_and_quadratic_attention_agree(dtype, tol):
    g = torch.Generator().manual_seed(0)
    R, H, L, dh = 5, 2, 13, 8
    q, k, v = (torch.randn(R, H, L, dh, generator=g, dtype=dtype) for _ in range(3))
    lens = torch.tensor([13, 7, 1, 0, 4])
    mask = torch.arange(L)[None] < lens[:, None]
    lin = length_normalized_attention(q, k, v, mask, "linear")
    quad = length_normalized_attention(q, k, v, mask, "quadratic")
    assert (lin - quad).abs().max() < tol
    # padded keys contribute nothing, n is the true length
    ref = (q[1] @ k[1, :, :7].transpose(-1, -2) / 7) @ v[1, :, :7]
    assert (quad[1] - ref).abs().max() < tol

    # a whole layer (user gate) with random padded inputs, both paths, same weights
    torch.manual_seed(1)
    a = UserAwareDenoisingLayer(16, 2, "user", 6, "linear", 2, 0.0).to(dtype).eval()
    b = UserAwareDenoisingLayer(16, 2, "user", 6, "quadratic", 2, 0.0).to(dtype).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(R, L, 16, generator=g, dtype=dtype) * mask[..., None]
    gate = torch.randn(R, 6, generator=g, dtype=dtype)
    assert (a(x, mask, gate) - b(x, mask, gate)).abs().max() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_model_linear_equals_quadratic(tiny_dataset, dtype, tol):
    lin, _ = make_model(tiny_dataset, "model.attention_impl=linear", "model.layers=4")
    quad, _ = make_model(tiny_dataset, "model.attention_impl=quadratic", "model.layers=4")
    quad.load_state_dict(lin.state_dict())
    lin.to(dtype), quad.to(dtype)
    b = first_batch(tiny_dataset)
    b = dataclasses.replace(b, user_dense=b.user_dense.to(dtype), ctx_dense=b.ctx_dense.to(dtype),
                            cand_dense=b.cand_dense.to(dtype), hist_dense=b.hist_dense.to(dtype))
    diff = (eval_scores(lin, b) - eval_scores(quad, b)).abs().max()
    assert diff < tol
    dl, _ = lin.dynamic_interest(b)
    dq, _ = quad.dynamic_interest(b)
    assert (dl - dq).abs().max() < tol


# ---- invariances --------------------------------------------------------------------------------
def pad_history(b: Batch, L: int) -> Batch:
    extra = L - b.hist_item.shape[1]

    def pad(x):
        shape = list(x.shape)
        shape[1] = extra
        return torch.cat([x, x.new_zeros(shape)], dim=1)

    return dataclasses.replace(b, hist_item=pad(b.hist_item), hist_sparse=pad(b.hist_sparse),
                               hist_dense=pad(b.hist_dense), hist_query=pad(b.hist_query),
                               hist_time=pad(b.hist_time), hist_age=pad(b.hist_age))


@pytest.mark.parametrize("injection", ["add", "cat", "cross"])
def test_padding_invariance(tiny_dataset, injection):
    model, _ = make_model(tiny_dataset, f"model.injection={injection}", "model.denoise_steps=3")
    randomize_injection(model)
    b20 = first_batch(tiny_dataset)
    assert b20.hist_item.shape[1] == 20
    b30 = pad_history(b20, 30)
    assert torch.allclose(eval_scores(model, b20), eval_scores(model, b30), atol=1e-5)
    d20, _ = model.dynamic_interest(b20)
    d30, m30 = model.dynamic_interest(b30)
    assert torch.allclose(d20, d30[:, :20], atol=1e-5)
    assert not m30[:, 20:].any() and d30[:, 20:].abs().max() == 0


def test_inference_is_deterministic_and_batch_independent(tiny_dataset):
    model, _ = make_model(tiny_dataset)
    _, ds = tiny_dataset
    rows = ds.requests_of("valid")[:12]
    full = eval_scores(model, ds.make_batch(rows))
    assert torch.equal(full, eval_scores(model, ds.make_batch(rows)))
    # the same requests scored in a smaller batch get the same scores
    n_first = int(ds.imp_end[rows[5]] - ds.imp_start[rows[5]])
    part = eval_scores(model, ds.make_batch(rows[5:6]))
    start = int((ds.imp_end[rows[:5]] - ds.imp_start[rows[:5]]).sum())
    assert torch.allclose(part, full[:, start:start + n_first], atol=1e-6)
    # training mode is stochastic (random step and noise), inference is not
    model.train()
    b = ds.make_batch(rows)
    torch.manual_seed(0)
    s1 = model.encode_request(b)["interest"]
    s2 = model.encode_request(b)["interest"]
    assert not torch.allclose(s1, s2)


def test_fixed_noise_rows_do_not_depend_on_table_size():
    a, b = fixed_noise(10, 4, seed=3), fixed_noise(700, 4, seed=3)
    assert torch.equal(a, b[:10])
    assert not torch.equal(b[:256], b[256:512])


def test_schedule_posterior_and_steps():
    s = DiffusionSchedule(50, 0.005, 0.01)
    assert s.reverse_steps(1) == [50, 0]
    steps = s.reverse_steps(50)
    assert steps == list(range(50, -1, -1))
    assert len(s.reverse_steps(7)) == 8 and all(a > b for a, b in zip(s.reverse_steps(7), s.reverse_steps(7)[1:]))
    x0, xt = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.allclose(s.posterior_mean(x0, xt, 9, 0), x0)
    # one-step posterior matches the DDPM formula
    ab, beta = s.alpha_bar, s.betas
    t = 9
    ref = (ab[t - 1].sqrt() * beta[t - 1] / (1 - ab[t])) * x0 + ((1 - beta[t - 1]).sqrt() * (1 - ab[t - 1]) / (1 - ab[t])) * xt
    assert torch.allclose(s.posterior_mean(x0, xt, t, t - 1), ref, atol=1e-6)
    # alpha_bar follows the linear betas
    assert abs(float(ab[-1]) - float(torch.prod(1 - torch.linspace(0.005, 0.01, 50)))) < 1e-6


# ---- conditioning -------------------------------------------------------------------------------
@pytest.mark.parametrize("injection", ["add", "cat", "cross"])
def test_query_changes_dynamic_interest_and_scores(tiny_dataset, injection):
    model, _ = make_model(tiny_dataset, f"model.injection={injection}")
    randomize_injection(model)
    b = first_batch(tiny_dataset)
    other = dataclasses.replace(b, query=torch.roll(b.query, 1, dims=0))
    assert not torch.equal(b.query, other.query)
    d1, _ = model.dynamic_interest(b)
    d2, m = model.dynamic_interest(other)
    # the denoised tokens themselves (not only the head) see the query
    assert (d1 - d2)[m].abs().max() > 1e-4
    assert (eval_scores(model, b) - eval_scores(model, other)).abs().max() > 1e-4


@pytest.mark.parametrize("gate,changes", [("user", True), ("learnt", False), ("none", False)])
def test_user_gate_reaches_tokens(tiny_dataset, gate, changes):
    model, _ = make_model(tiny_dataset, f"model.gate={gate}")
    b = first_batch(tiny_dataset)
    other = dataclasses.replace(b, user_sparse=torch.roll(b.user_sparse, 1, dims=0),
                                user_dense=torch.roll(b.user_dense, 1, dims=0))
    d1, m = model.dynamic_interest(b)
    d2, _ = model.dynamic_interest(other)
    moved = float((d1 - d2)[m].abs().max())
    assert (moved > 1e-4) == changes, moved


def test_gradients_reach_query_gate_and_embeddings(tiny_dataset):
    model, _ = make_model(tiny_dataset)
    # the injection starts at zero, so q_proj (its only input) gets a gradient once it has moved
    with torch.no_grad():
        model.inject.weight.normal_(0, 0.02)
    model.train()
    b = first_batch(tiny_dataset)
    torch.manual_seed(0)
    out = model(b)
    loss, parts = model.loss(b, out)
    assert "aux" in parts and parts["aux"] > 0
    loss.backward()
    for name in ("q_proj.weight", "inject.weight", "layers.0.w_u.weight", "layers.1.w_u.weight",
                 "emb.table.weight", "pos.weight", "token_mlp.0.weight", "step_mlp.0.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_kl_weight_zero_turns_the_term_off(tiny_dataset):
    model, _ = make_model(tiny_dataset, "model.kl_weight=0", "model.denoise_loss=none")
    model.train()
    assert "aux_loss" not in model.encode_request(first_batch(tiny_dataset))
    model, _ = make_model(tiny_dataset)
    model.eval()
    assert "aux_loss" not in model.encode_request(first_batch(tiny_dataset))


# ---- checkpoint, config -------------------------------------------------------------------------
def test_checkpoint_round_trip(tiny_dataset, tmp_path):
    from qdrank.training.checkpoint import load_model, save_model

    model, cfg = make_model(tiny_dataset, "model.injection=cat", "model.denoise_steps=2")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    b = first_batch(tiny_dataset)
    before = eval_scores(model, b)
    save_model(tmp_path, model, cfg, tiny_dataset[1].fmap)
    loaded, cfg2, _ = load_model(tmp_path)
    assert isinstance(loaded, DiffusionGS) and cfg2.model.injection == "cat"
    assert torch.equal(before, eval_scores(loaded, b))


@pytest.mark.parametrize("override,key", [("model.injection=concat", "injection"), ("model.gate=hstu", "gate"),
                                          ("model.noise=loud", "noise"), ("model.attention_impl=flash", "attention_impl"),
                                          ("model.denoise_steps=51", "denoise_steps"), ("model.heads=3", "heads"),
                                          ("model.kl_tau=0", "kl_tau")])
def test_invalid_switches_raise(tiny_dataset, override, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        make_model(tiny_dataset, override)


# ---- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    ("model.injection=add",), ("model.injection=cat",), ("model.injection=cross",),
    ("model.gate=learnt",), ("model.gate=none",),
    ("model.noise=none",), ("model.noise=heavy", "model.denoise_steps=4"),
    ("model.layers=2",), ("model.layers=8",), ("model.attention_impl=quadratic",),
])
def test_every_switch_trains(tiny_dataset, overrides):
    _, ds = tiny_dataset
    model, cfg = make_model(tiny_dataset, *overrides)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    groups = ds.batch_rows("train", 256, shuffle=True, seed=0)[:4]
    losses = []
    torch.manual_seed(0)
    model.train()
    for rows in groups:
        b = ds.make_batch(rows)
        loss, _ = model.loss(b, model(b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, start[k])]
    for name in ("layers.0.w_q.weight", f"layers.{cfg.model.layers - 1}.w_v.weight", "dynamic_head.weight",
                 "emb.table.weight", "head.ctr.weight"):
        assert name in changed, name
    s = eval_scores(model, ds.make_batch(ds.requests_of("valid")[:8]))
    assert torch.isfinite(s).all()


def test_one_step_and_full_chain_agree_after_training(tiny_dataset, tmp_path):
    from qdrank.evaluation.evaluate import predict
    from qdrank.evaluation.metrics import RankingMetrics
    from qdrank.training.trainer import Trainer

    cfg_run, ds = tiny_dataset
    cfg = tiny_config("diffusiongs", "train.max_epochs=1", "train.max_steps_per_epoch=8", "model.layers=2")
    trainer = Trainer(cfg, ds, tmp_path / "run", log=lambda m: None)
    trainer.fit()
    model = trainer.model
    preds = {}
    for steps in (1, 50):
        model.denoise_steps = steps
        preds[steps] = predict(model, ds, "valid", 4096)
    a, b = preds[1]["serving_ctr"], preds[50]["serving_ctr"]
    assert not np.allclose(a, b)          # the chains really differ
    corr = np.corrcoef(a, b)[0, 1]
    assert corr > 0.9, corr
    click = preds[1]["click"]
    aucs = []
    for steps in (1, 50):
        m = RankingMetrics(scores_are_logits=True)
        m.update(click, preds[steps]["serving_ctr"], np.zeros(len(click), dtype=np.int64))
        aucs.append(m.compute()["auc"])
    assert abs(aucs[0] - aucs[1]) < 0.05, aucs


def test_gate_uses_only_the_features_named_in_fmap_gate(tiny_dataset):
    _, ds = tiny_dataset
    cfg = tiny_config("diffusiongs", "model.layers=2", "model.dropout=0.0")
    fmap = dataclasses.replace(ds.fmap, gate=["device"])  # a context feature only
    torch.manual_seed(0)
    model = DiffusionGS(fmap, cfg.model)
    model.emb.set_item_tables(*ds.item_tables())
    assert len(model._gate_index) == 1
    b = first_batch(tiny_dataset)
    users = dataclasses.replace(b, user_sparse=torch.roll(b.user_sparse, 1, dims=0),
                                user_dense=torch.roll(b.user_dense, 1, dims=0))
    ctx = dataclasses.replace(b, ctx_sparse=torch.roll(b.ctx_sparse, 1, dims=0))
    d0, m = model.dynamic_interest(b)
    assert torch.equal(d0, model.dynamic_interest(users)[0])          # profile not in the gate
    assert (d0 - model.dynamic_interest(ctx)[0])[m].abs().max() > 1e-4  # device is


# ---- issue #10: a denoiser that denoises, identifiable parts, query paths ------------------------
def with_query(b: Batch, other: Batch) -> Batch:
    return dataclasses.replace(b, query=other.query.roll(1, dims=0))


def test_rms_tokens_have_unit_scale(tiny_dataset):
    model, _ = make_model(tiny_dataset)
    b = first_batch(tiny_dataset)
    x0, mask, _ = model.tokens(b)
    rms = x0.pow(2).mean(-1).sqrt()[mask]
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    raw, _ = make_model(tiny_dataset, "model.token_norm=none")
    assert not torch.allclose(raw.tokens(b)[0].pow(2).mean(-1).sqrt()[mask], rms, atol=1e-2)


def test_tokenwise_static_part_ignores_the_query(tiny_dataset):
    model, _ = make_model(tiny_dataset)
    randomize_injection(model)
    model.eval()
    b = first_batch(tiny_dataset)
    b2 = with_query(b, b)
    q1, q2 = model.q_proj(model.emb.query(b)), model.q_proj(model.emb.query(b2))
    g = model.gate_input(b)
    x0, mask, _ = model.tokens(b)
    t = torch.full((b.n_requests,), 10, dtype=torch.long)
    with torch.no_grad():
        _, (s1, d1) = model.denoise(x0, t, q1, g, mask)
        _, (s2, d2) = model.denoise(x0, t, q2, g, mask)
    assert torch.equal(s1, s2), "the static part must not see the query"
    assert not torch.allclose(d1, d2), "the dynamic part must"


def test_query_in_head_false_leaves_only_the_diffusion_path(tiny_dataset):
    b = first_batch(tiny_dataset)
    b2 = with_query(b, b)
    off, _ = make_model(tiny_dataset, "model.query_in_head=false", "model.cross=false")  # the cross carries q too
    # zero-initialised injection: the query has no path at all yet
    torch.testing.assert_close(eval_scores(off, b), eval_scores(off, b2))
    randomize_injection(off)
    assert not torch.allclose(eval_scores(off, b), eval_scores(off, b2))
    on, _ = make_model(tiny_dataset)
    assert not torch.allclose(eval_scores(on, b), eval_scores(on, b2))


def test_gated_dynamic_part_is_scaled_per_token_by_query_relevance(tiny_dataset):
    """``model.dynamic=gated``: d_t = sigmoid(<W q, K h_t> / sqrt(dim)) * dynamic_head(h_t), a
    factor in (0, 1) per token that follows the query."""
    model, _ = make_model(tiny_dataset, "model.dynamic=gated")
    randomize_injection(model)
    model.eval()
    b = first_batch(tiny_dataset)
    g = model.gate_input(b)
    x0, mask, _ = model.tokens(b)
    t = torch.full((b.n_requests,), 10, dtype=torch.long)

    def dyn(batch, dynamic):
        model.cfg.dynamic = dynamic
        with torch.no_grad():
            return model.denoise(x0, t, model.q_proj(model.emb.query(batch)), g, mask)[1][1]

    free, gated = dyn(b, "free"), dyn(b, "gated")
    ratio = (gated.norm(dim=-1) / free.norm(dim=-1).clamp_min(1e-12))[mask]
    assert ratio.min() > 0 and ratio.max() < 1 and ratio.std() > 1e-3
    ratio2 = (dyn(with_query(b, b), "gated").norm(dim=-1) / dyn(with_query(b, b), "free").norm(dim=-1).clamp_min(1e-12))[mask]
    assert not torch.allclose(ratio, ratio2), "the factor must follow the query"
    with torch.no_grad():
        model.relevance_k.weight.zero_()
    torch.testing.assert_close(dyn(b, "gated"), 0.5 * dyn(b, "free"))


@pytest.mark.parametrize("overrides", [("model.denoise_loss=x0",), ("model.denoise_loss=eps",),
                                       ("model.train_steps=3",), ("model.static=shared",)])
def test_denoising_objectives_train(tiny_dataset, overrides):
    model, _ = make_model(tiny_dataset, "model.kl_weight=0", *overrides)
    model.train()
    b = first_batch(tiny_dataset)
    torch.manual_seed(0)
    st = model.encode_request(b)
    assert "aux_loss" in st and torch.isfinite(st["aux_loss"]) and float(st["aux_loss"].detach()) > 0
    st["aux_loss"].backward()
    assert model.dynamic_head.weight.grad.abs().sum() > 0


def test_reconstruction_report_compares_with_the_rescaled_input(tiny_dataset):
    model, _ = make_model(tiny_dataset)
    rep = model.reconstruction(first_batch(tiny_dataset))
    assert set(rep) == {"model", "rescaled_input", "noise_std_at_T", "token_rms"}
    ab = float(model.schedule.alpha_bar[-1])
    assert rep["noise_std_at_T"] == pytest.approx((1 - ab) ** 0.5)
    # the reference's error is the scaled noise: E||eps||^2/d * (1 - ab)/ab, about (1 - ab)/ab
    assert 0.3 * (1 - ab) / ab < rep["rescaled_input"] < 3 * (1 - ab) / ab
    assert rep["token_rms"] == pytest.approx(1.0, abs=1e-3)

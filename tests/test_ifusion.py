"""iFusion: sessions, schedules, guidance, AR vs NAR, determinism, every switch trains."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from qdrank.models.diffusion import DiffusionSchedule, guided
from qdrank.models.ifusion import session_slots


def build(tiny_dataset, *overrides: str):
    from qdrank.training.trainer import build_model

    _, ds = tiny_dataset
    model = build_model(tiny_config("ifusion", "model.dropout=0.0", *overrides), ds)
    return model, ds


def batch_of(model, ds, n: int = 16):
    rows = ds.requests_of("train")
    rows = rows[(ds.hist_end[rows] - ds.hist_start[rows]) >= 5][:n]
    return ds.make_batch(rows)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sqrt"])
def test_schedules_are_monotone_and_reach_noise(kind):
    s = DiffusionSchedule.named(kind, 50)
    ab = s.alpha_bar
    assert ab[0] == 1 and bool((ab[1:] < ab[:-1]).all())
    assert float(ab[-1]) < 0.1, "t = T must be (almost) pure noise"
    std = s.posterior_std(10, 9, torch.zeros(2, 3))
    assert std.shape == (2, 1) and bool((std > 0).all())


def test_guidance_formula():
    u, a, b = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(guided(u, [a, b], [2.0, 1.0]), torch.full((2, 3), 4.0))
    assert torch.equal(guided(u, [a], [0.0]), u)


def test_session_slots_gap_rule():
    # history of 6 behaviours; ages (s): two sessions in the short window of 4 (gap 1800)
    age = torch.tensor([[9000.0, 8000.0, 5000.0, 4990.0, 100.0, 50.0, 0, 0]])
    slots = session_slots(torch.tensor([6]), 8, short_len=4, k=3, age=age, gap=1800)
    assert slots.tolist() == [[-1, -1, 1, 1, 2, 2, -1, -1]]
    # more sessions than slots: older ones merge into slot 0
    age = torch.tensor([[9000.0, 6000.0, 3000.0, 0.0]])
    assert session_slots(torch.tensor([4]), 4, 4, 2, age, 1800).tolist() == [[0, 0, 0, 1]]
    # count rule: equal chunks, most recent in the last slot
    s = session_slots(torch.tensor([6]), 8, 4, 2, None, 0)
    assert s.tolist() == [[-1, -1, 0, 0, 1, 1, -1, -1]]


def test_hist_age_matches_history(tiny_dataset):
    model, ds = build(tiny_dataset)
    b = batch_of(model, ds)
    age = b.hist_age
    assert age.shape == b.hist_item.shape
    assert bool((age[b.hist_mask] > 0).all()), "history behaviours are strictly earlier than the request"
    assert bool((age[~b.hist_mask] == 0).all())
    # chronological: ages never increase along a history
    d = age[:, 1:] - age[:, :-1]
    both = b.hist_mask[:, 1:] & b.hist_mask[:, :-1]
    assert bool((d[both] <= 0).all())


@pytest.mark.parametrize("overrides", [
    (), ("model.guidance=cfg",), ("model.fusion=nar",), ("model.train_combine=average",),
    ("model.schedule=linear",), ("model.schedule=sqrt",), ("model.session_gap=0",),
    ("model.evol_weight=0", "model.dist_weight=0", "model.cons_weight=0"),
])
def test_every_switch_trains(tiny_dataset, overrides):
    model, ds = build(tiny_dataset, *overrides)
    b = batch_of(model, ds)
    model.train()
    torch.manual_seed(0)
    out = model(b)
    loss, parts = model.loss(b, out)
    assert torch.isfinite(loss)
    if "model.evol_weight=0" not in overrides:
        assert "aux" in parts and parts["aux"] > 0
    loss.backward()
    assert model.denoiser[0].weight.grad is not None
    assert model.core[0].weight.grad.abs().sum() > 0


def test_inference_is_deterministic_and_batch_independent(tiny_dataset):
    model, ds = build(tiny_dataset, "model.denoise_steps=5", "model.reverse_noise=true")
    model.eval()
    rows = ds.requests_of("valid")[:8]
    with torch.no_grad():
        full = model(ds.make_batch(rows), use_position=False).ctr_logit
        again = model(ds.make_batch(rows), use_position=False).ctr_logit
        part = model(ds.make_batch(rows[3:4]), use_position=False).ctr_logit
    assert torch.equal(full, again)
    n = ds.imp_end[rows] - ds.imp_start[rows]
    s = int(n[:3].sum())
    torch.testing.assert_close(part, full[s:s + int(n[3])], atol=1e-5, rtol=1e-5)


def test_sessions_steer_the_fused_interest(tiny_dataset):
    """The short-term sessions must change the output (guidance is not a no-op), and AR != NAR."""
    model, ds = build(tiny_dataset)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    b = batch_of(model, ds)
    with torch.no_grad():
        st = model.encode_request(b)
        shuffled = b.hist_item.clone()
        shuffled[:, :] = shuffled[torch.randperm(len(shuffled), generator=g)]
        import dataclasses
        st2 = model.encode_request(dataclasses.replace(b, hist_item=shuffled))
        assert not torch.allclose(st["fused"], st2["fused"])
        model.cfg.fusion = "nar"
        st3 = model.encode_request(b)
        assert not torch.allclose(st["fused"], st3["fused"])


def test_more_steps_change_nothing_when_asked_for_one(tiny_dataset):
    model, ds = build(tiny_dataset)
    model.eval()
    b = batch_of(model, ds)
    with torch.no_grad():
        one = model.encode_request(b)["fused"]
        model.denoise_steps = model.cfg.diffusion_steps
        many = model.encode_request(b)["fused"]
    assert one.shape == many.shape and bool(torch.isfinite(many).all())
    assert not torch.allclose(one, many), "T-step inference must run the chain, not repeat one step"


def test_bad_config_is_refused():
    from qdrank.config import ConfigError, build_config
    from qdrank.models.ifusion import validate_config

    for ov in (["model.fusion=tree"], ["model.denoise_steps=51"], ["model.cond_drop=1.0"]):
        cfg = build_config("ifusion", overrides=ov)
        with pytest.raises(ValueError, match=ov[0].split("=")[0].split(".")[1]):
            validate_config(cfg.model)
    with pytest.raises(ConfigError):
        build_config("ifusion", overrides=["model.sesions=3"])

"""Generative peers: HSTU and MTGR (shapes, masking, padding, training, checkpoints, cached path)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

MODELS = ["hstu", "mtgr"]


def build(model_name: str, tiny_dataset, *overrides: str):
    from qdrank.training.trainer import build_model

    _, ds = tiny_dataset
    cfg = tiny_config(model_name, "model.dropout=0.0", "model.layers=2", "model.heads=2", *overrides)
    model = build_model(cfg, ds)
    model.eval()
    return model, cfg


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its init (zero-initialised biases included) so all of them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def rows_with_history(ds, n: int, min_hist: int = 3, min_cands: int = 2):
    rows = ds.requests_of("train")
    keep = rows[((ds.hist_end[rows] - ds.hist_start[rows]) >= min_hist)
                & ((ds.imp_end[rows] - ds.imp_start[rows]) >= min_cands)]
    assert len(keep) >= n
    return keep[:n]


def select_candidates(b, idx):
    """The batch restricted to candidates ``idx`` (requests unchanged)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    names = ("cand_req", "cand_item", "cand_sparse", "cand_dense", "position", "click", "purchase")
    return dataclasses.replace(b, **{k: getattr(b, k)[idx] for k in names})


def blank_request(b, r: int, history: bool = True, query: bool = True):
    """Request ``r`` with its history and/or query removed."""
    ch = {}
    if history:
        for k in ("hist_item", "hist_sparse", "hist_dense", "hist_query", "hist_time", "hist_age"):
            t = getattr(b, k).clone()
            t[r] = 0
            ch[k] = t
        hl = b.hist_len.clone()
        hl[r] = 0
        ch["hist_len"] = hl
    if query:
        q = b.query.clone()
        q[r] = 0
        ch["query"] = q
    return dataclasses.replace(b, **ch)


def scores(model, b):
    with torch.no_grad():
        o = model(b, use_position=False)
    return o.ctr_logit, o.cvr_logit


@pytest.mark.parametrize("name", MODELS)
def test_shapes_finite_and_empty_inputs(name, tiny_dataset):
    _, ds = tiny_dataset
    model, _ = build(name, tiny_dataset)
    b = ds.make_batch(rows_with_history(ds, 4))
    b = blank_request(blank_request(b, 1, history=True, query=False), 2, history=True, query=True)
    b = blank_request(b, 3, history=False, query=True)
    assert int(b.hist_len[1]) == 0 and int(b.query[2].abs().sum()) == 0
    ctr, cvr = scores(model, b)
    n = len(b.cand_item)
    assert ctr.shape == (n,) and cvr.shape == (n,)
    assert torch.isfinite(ctr).all() and torch.isfinite(cvr).all()
    # gradients stay finite with empty history / query
    model.train()
    out = model(b)
    loss, _ = model.loss(b, out)
    loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", MODELS)
def test_padding_invariance(name, tiny_dataset):
    _, ds = tiny_dataset
    model, _ = build(name, tiny_dataset)
    randomize(model)
    b = ds.make_batch(rows_with_history(ds, 5))
    extra = 7
    ch = {}
    for k in ("hist_item", "hist_sparse", "hist_dense", "hist_query", "hist_time", "hist_age"):
        t = getattr(b, k)
        ch[k] = torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], 1)
    b2 = dataclasses.replace(b, **ch)
    assert b2.hist_item.shape[1] == b.hist_item.shape[1] + extra
    for x, y in zip(scores(model, b), scores(model, b2)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_candidates_do_not_see_each_other(name, tiny_dataset):
    _, ds = tiny_dataset
    model, _ = build(name, tiny_dataset)
    randomize(model)
    rows = rows_with_history(ds, 3)
    one = ds.make_batch(rows[:1])
    a_only = scores(model, select_candidates(one, [0]))
    a_and_b = scores(model, select_candidates(one, [0, 1]))
    for x, y in zip(a_only, a_and_b):
        torch.testing.assert_close(x[0], y[0], atol=1e-6, rtol=0)
    # and requests do not see each other: request 0 scored alone == scored inside a bigger batch
    many = ds.make_batch(rows)
    n0 = len(one.cand_item)
    for x, y in zip(scores(model, one), scores(model, many)):
        torch.testing.assert_close(x, y[:n0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_query_candidate_and_history_change_output(name, tiny_dataset):
    _, ds = tiny_dataset
    model, _ = build(name, tiny_dataset)
    randomize(model)
    b = ds.make_batch(rows_with_history(ds, 2))
    base, _ = scores(model, b)
    m0 = b.cand_req == 0
    # query
    q = b.query.clone()
    q[0] = torch.roll(q[1], 1) if bool((q[1] > 0).any()) else q[0] * 0
    q[0, 0] = int(ds.fmap.text_offset) + 7
    new, _ = scores(model, dataclasses.replace(b, query=q))
    assert (new[m0] - base[m0]).abs().max() > 1e-4
    torch.testing.assert_close(new[~m0], base[~m0], atol=1e-6, rtol=0)
    # candidate item
    ci = b.cand_item.clone()
    n_items = len(ds.fmap.item_vocab)
    ci[0] = 2 + (int(ci[0]) - 2 + 1) % n_items       # the next known item row
    assert ci[0] != b.cand_item[0]
    new, _ = scores(model, dataclasses.replace(b, cand_item=ci))
    assert abs(float(new[0] - base[0])) > 1e-4
    torch.testing.assert_close(new[1:], base[1:], atol=1e-6, rtol=0)
    # one history behaviour (through the attention path)
    hi = b.hist_item.clone()
    hi[0, 0] = 2 + (int(hi[0, 0]) - 2 + 1) % n_items
    new, _ = scores(model, dataclasses.replace(b, hist_item=hi))
    assert (new[m0] - base[m0]).abs().max() > 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_few_steps_lower_loss(name, tiny_dataset):
    _, ds = tiny_dataset
    torch.manual_seed(0)
    model, _ = build(name, tiny_dataset)
    model.train()
    b = ds.make_batch(rows_with_history(ds, 8, min_hist=1, min_cands=1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = model.loss(b, model(b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip(name, tiny_dataset, tmp_path):
    from qdrank.training.checkpoint import load_model, save_model

    _, ds = tiny_dataset
    model, cfg = build(name, tiny_dataset, "model.layers=3", "model.pos_buckets=12")
    randomize(model, seed=3)
    save_model(tmp_path, model, cfg, ds.fmap)
    loaded, cfg2, _ = load_model(tmp_path)
    assert type(loaded) is type(model) and cfg2.model == cfg.model
    b = ds.make_batch(rows_with_history(ds, 4))
    for x, y in zip(scores(model, b), scores(loaded, b)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


# ---- the HSTU stack: cached candidate path == naive full sequence with the candidate appended ----
def naive_candidate(stack, x, pos, time, static, valid, group, cand_x, cand_group):
    """One candidate, one request, explicit loops: keep valid request tokens, append the candidate,
    run every layer over the whole sequence, return the candidate's final representation."""
    from qdrank.models.hstu_layers import CANDIDATE_TIME_BUCKET, position_bucket

    keep = [i for i in range(len(valid)) if valid[i]]
    n_seq = sum(1 for i in keep if not static[i])
    toks = [x[i] for i in keep] + [cand_x]
    P = [int(pos[i]) for i in keep] + [n_seq]
    Tm = [int(time[i]) for i in keep] + [CANDIDATE_TIME_BUCKET]
    S = [bool(static[i]) for i in keep] + [False]
    G = [int(group[i]) for i in keep] + [cand_group]
    n = len(toks)

    def gln(norm, v, g):
        return F.layer_norm(v, v.shape[-1:], eps=norm.eps) * norm.weight[g] + norm.bias[g]

    for layer, rab in zip(stack.layers, stack.rab):
        H, dh = layer.heads, layer.head_dim
        uvqk = [F.silu(layer.f1(gln(layer.in_norm, t, g))) for t, g in zip(toks, G)]
        u = [z.chunk(4)[0] for z in uvqk]
        v = [z.chunk(4)[1].view(H, dh) for z in uvqk]
        q = [z.chunk(4)[2].view(H, dh) for z in uvqk]
        k = [z.chunk(4)[3].view(H, dh) for z in uvqk]
        new = []
        for i in range(n):
            y = torch.zeros(H, dh, dtype=x.dtype)
            for j in range(n):
                visible = S[j] or (not S[i] and P[j] <= P[i])
                if not visible:
                    continue
                pb = stack.pos_buckets if (S[i] or S[j]) else int(position_bucket(torch.tensor(P[i] - P[j]),
                                                                                  stack.pos_buckets))
                bias = rab.pos.weight[pb] + rab.time.weight[Tm[i] * rab.n_time + Tm[j]]
                s = (q[i] * k[j]).sum(-1) / math.sqrt(dh) + bias
                y = y + (F.silu(s) / n).unsqueeze(-1) * v[j]
            new.append(toks[i] + layer.f2(u[i] * gln(layer.attn_norm, y.reshape(-1), G[i])))
        toks = new
    return gln(stack.final_norm, toks[-1], cand_group)


@pytest.mark.parametrize("n_static", [0, 3])
def test_cached_candidate_path_equals_full_sequence(n_static):
    from qdrank.models.hstu_layers import HSTUStack

    torch.manual_seed(0)
    d, L, T = 8, 6, 7
    n_groups = 1 if n_static == 0 else 4
    stack = HSTUStack(d, layers=2, heads=2, head_dim=3, time_buckets=T, pos_buckets=6, dropout=0.0,
                      n_groups=n_groups).double().eval()
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hist_len = torch.tensor([6, 3, 0, 1])
    R = len(hist_len)
    S = n_static
    hist_valid = torch.arange(L)[None, :] < hist_len[:, None]
    valid = torch.cat([torch.ones(R, S, dtype=torch.bool), hist_valid], 1)
    static = torch.cat([torch.ones(R, S, dtype=torch.bool), torch.zeros(R, L, dtype=torch.bool)], 1)
    pos = torch.cat([torch.zeros(R, S, dtype=torch.long), torch.arange(L).expand(R, L)], 1)
    hist_time = torch.randint(1, T, (R, L)) * hist_valid
    time = torch.cat([torch.zeros(R, S, dtype=torch.long), hist_time], 1)
    x = torch.randn(R, S + L, d, dtype=torch.float64) * valid.unsqueeze(-1)
    if n_groups == 1:
        group, cand_group = torch.zeros(S + L, dtype=torch.long), 0
    else:
        group, cand_group = torch.tensor([0] * (S - 1) + [1] + [2] * L), 3
    cand_req = torch.tensor([0, 0, 1, 2, 2, 3])
    cand_x = torch.randn(len(cand_req), d, dtype=torch.float64)
    with torch.no_grad():
        cache = stack.encode(x, pos, time, static, valid, group if n_groups > 1 else 0, valid.sum(-1) + 1)
        fast = stack.candidates(cache, cand_x, cand_req, cand_group)
        for c, r in enumerate(cand_req.tolist()):
            slow = naive_candidate(stack, x[r], pos[r], time[r], static[r], valid[r], group, cand_x[c], cand_group)
            torch.testing.assert_close(fast[c], slow, atol=1e-5, rtol=0)

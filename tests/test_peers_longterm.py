"""What makes each of iFusion's Table-1 peers itself (the shared battery is in test_peers_dlrm.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from qdrank.models.registry import model_class


def make(name: str, ds, *overrides: str):
    cfg = tiny_config(name, "model.dropout=0.0", *overrides)
    torch.manual_seed(0)
    model = model_class(name)(ds.fmap, cfg.model)
    model.emb.set_item_tables(*ds.item_tables())
    model.eval()
    return model


@pytest.fixture(scope="module")
def batch(tiny_dataset):
    _, ds = tiny_dataset
    return ds.make_batch(ds.requests_of("train")[:16])


def test_eta_keeps_the_behaviours_nearest_in_hamming_distance(tiny_dataset, batch):
    from qdrank.models.eta import simhash

    _, ds = tiny_dataset
    m = make("eta", ds, "model.topk=3", "model.hash_bits=8")
    with torch.no_grad():
        st = m.encode_request(batch)
        c = m.emb.candidate(batch)
        idx, keep, scores = m.select(st, batch, c)
        hist = st["tokens"][batch.cand_req]
        ham = (simhash(hist, m.planes) != simhash(c, m.planes)[:, None, :]).sum(-1)
    for n in range(len(c)):
        valid = st["mask"][batch.cand_req[n]]
        if int(valid.sum()) <= 3:
            continue
        chosen = ham[n, idx[n][keep[n]]]
        rest = ham[n][valid].sort().values[: len(chosen)]
        assert torch.equal(chosen.sort().values, rest)


def test_twin_gsu_is_the_esu_attention(tiny_dataset, batch):
    _, ds = tiny_dataset
    m = make("twin", ds, "model.topk=4")
    with torch.no_grad():
        st = m.encode_request(batch)
        c = m.emb.candidate(batch)
        scores, _ = m.gsu_scores(st, batch, c)
        a = m.esu.attn
        N, L, d = len(c), st["tokens"].shape[1], c.shape[-1]
        h, dh = a.heads, d // a.heads
        qh = a.q(c).view(N, 1, h, dh).transpose(1, 2)
        kh = a.k(st["tokens"][batch.cand_req]).view(N, L, h, dh).transpose(1, 2)
        per_head = (qh @ kh.transpose(-1, -2)).squeeze(2) / dh**0.5        # the ESU's logits
    torch.testing.assert_close(scores, per_head.mean(1))


def test_sdim_interest_is_the_bucket_mean(tiny_dataset, batch):
    from qdrank.models.sdim import bucket_codes

    _, ds = tiny_dataset
    m = make("sdim", ds, "model.hashes=4", "model.bits=2")
    with torch.no_grad():
        st = m.encode_request(batch)
        c = m.emb.candidate(batch)
        got = m.interest(st, batch, c)
        hc, hh = bucket_codes(c, m.planes), bucket_codes(st["tokens"], m.planes)
    for n in range(0, len(c), 7):
        r = int(batch.cand_req[n])
        ref = []
        for j in range(4):
            sel = st["mask"][r] & (hh[r, :, j] == hc[n, j])
            ref.append(st["tokens"][r][sel].mean(0) if bool(sel.any()) else torch.zeros(c.shape[-1]))
        expect = torch.nn.functional.normalize(torch.stack(ref).mean(0), dim=-1)
        torch.testing.assert_close(got[n], expect, atol=1e-5, rtol=1e-5)


def test_dien_attention_gates_the_evolution(tiny_dataset):
    from qdrank.models.dien import AUGRUCell

    cell = AUGRUCell(4)
    x, h = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(cell(x, h, torch.zeros(3)), h), "zero attention must leave the interest unchanged"
    assert not torch.allclose(cell(x, h, torch.ones(3)), h)


def test_dien_aux_loss_trains_the_extractor(tiny_dataset, batch):
    _, ds = tiny_dataset
    m = make("dien", ds)
    m.train()
    st = m.encode_request(batch)
    assert "aux_loss" in st and float(st["aux_loss"].detach()) > 0
    st["aux_loss"].backward()
    assert m.extractor.weight_hh_l0.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["dreamrec", "diffurec"])
def test_generation_is_deterministic_conditioned_and_multi_step(tiny_dataset, batch, name):
    _, ds = tiny_dataset
    m = make(name, ds)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        one = m.encode_request(batch)["interest"]
        assert torch.equal(one, m.encode_request(batch)["interest"])
        empty = m.generate(batch, torch.zeros_like(batch.hist_len))
        assert not torch.allclose(one, empty), "the history must condition the generation"
        m.cfg.denoise_steps = 10
        ten = m.encode_request(batch)["interest"]
    assert not torch.allclose(one, ten)
    m.train()
    loss = m.generative_loss(batch)
    assert float(loss.detach()) > 0
    loss.backward()
    assert m.step_mlp[0].weight.grad is not None

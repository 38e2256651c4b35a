"""The shared battery of the attention/sequence peers: DNN, DIN, SASRec, SIM (soft and hard GSU),
QIN, and iFusion's Table-1 peers (DIEN, ETA, SDIM, TWIN, DiffuRec, DreamRec) and iFusion itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

from qdrank.models.registry import model_class
from qdrank.models.transformer import masked_softmax, masked_topk
from qdrank.training.checkpoint import load_model, save_model

# small top-K values so the selection stages really select on 20-long histories
VARIANTS = {
    "dnn": ("dnn", []),
    "din": ("din", []),
    "sasrec": ("sasrec", []),
    "sim_soft": ("sim", ["model.topk=5"]),
    "sim_hard": ("sim", ["model.gsu=hard", "model.topk=5"]),
    "qin": ("qin", ["model.query_topk=6", "model.target_topk=3"]),
    "dien": ("dien", []),
    "eta": ("eta", ["model.topk=5", "model.hash_bits=16"]),
    "sdim": ("sdim", ["model.hashes=8", "model.bits=2"]),
    "twin": ("twin", ["model.topk=5"]),
    "dreamrec": ("dreamrec", []),
    "diffurec": ("diffurec", []),
    "ifusion": ("ifusion", ["model.session_gap=0", "model.short_len=8", "model.sessions=3"]),
}


def make(variant, ds, *extra):
    name, overrides = VARIANTS[variant]
    cfg = tiny_config(name, "model.dropout=0.0", *overrides, *extra)
    torch.manual_seed(0)
    model = model_class(name)(ds.fmap, cfg.model)
    model.emb.set_item_tables(*ds.item_tables())
    return model, cfg


@pytest.fixture(scope="module")
def batch(tiny_dataset):
    _, ds = tiny_dataset
    b = ds.make_batch(ds.requests_of("train")[:24])
    assert int(b.hist_len.max()) == b.hist_item.shape[1]      # some full histories
    assert bool((b.hist_len < b.hist_item.shape[1]).any())     # and some padded ones
    return b


def scores(model, b):
    model.eval()
    with torch.no_grad():
        o = model(b, use_position=False)
    return o.ctr_logit, o.cvr_logit


def replace(b, **kw):
    return dataclasses.replace(b, **kw)


def without_history(b, rows):
    """Requests ``rows`` lose their whole history (and their query)."""
    keep = torch.ones(b.n_requests, dtype=torch.bool)
    keep[rows] = False
    k2, k3 = keep[:, None], keep[:, None, None]
    return replace(b, hist_item=b.hist_item * k2, hist_sparse=b.hist_sparse * k3,
                   hist_dense=b.hist_dense * k3, hist_query=b.hist_query * k3, hist_time=b.hist_time * k2, hist_age=b.hist_age * k2,
                   hist_session=torch.where(k2, b.hist_session, -1), hist_len=b.hist_len * keep, query=b.query * k2)


def pad_history(b, extra):
    def pad(x, value=0):
        z = x.new_full((x.shape[0], extra, *x.shape[2:]), value)
        return torch.cat([x, z], dim=1)
    return replace(b, hist_item=pad(b.hist_item), hist_sparse=pad(b.hist_sparse), hist_dense=pad(b.hist_dense),
                   hist_query=pad(b.hist_query), hist_time=pad(b.hist_time),
                   hist_age=pad(b.hist_age), hist_session=pad(b.hist_session, -1))


def truncate_history(b, n):
    """Keep the first ``n`` history columns (still left-aligned, chronological)."""
    return replace(b, hist_item=b.hist_item[:, :n], hist_sparse=b.hist_sparse[:, :n], hist_dense=b.hist_dense[:, :n],
                   hist_query=b.hist_query[:, :n], hist_time=b.hist_time[:, :n], hist_age=b.hist_age[:, :n],
                   hist_session=b.hist_session[:, :n], hist_len=b.hist_len.clamp_max(n))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_finite_and_empty_history(tiny_dataset, batch, variant):
    _, ds = tiny_dataset
    model, _ = make(variant, ds)
    n = batch.cand_item.shape[0]
    for b in (batch, without_history(batch, [0, 3, 5]), without_history(batch, list(range(batch.n_requests)))):
        ctr, cvr = scores(model, b)
        assert ctr.shape == (n,) and cvr.shape == (n,)
        assert torch.isfinite(ctr).all() and torch.isfinite(cvr).all()
    # gradients stay finite with empty histories too
    model.train()
    b = without_history(batch, [0, 3, 5])
    loss, _ = model.loss(b, model(b))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sasrec_empty_history_zero_state(tiny_dataset, batch):
    _, ds = tiny_dataset
    model, _ = make("sasrec", ds)
    model.eval()
    u = model.user_state(without_history(batch, [0, 3]))
    assert torch.equal(u[[0, 3]], torch.zeros_like(u[[0, 3]]))
    assert bool((u[[1, 2]].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_extra_padding_columns_change_nothing(tiny_dataset, batch, variant):
    _, ds = tiny_dataset
    model, _ = make(variant, ds)
    # also a batch whose history is shorter than the top-K sizes, so padding enters the selection
    for b in (batch, without_history(truncate_history(batch, 3), [1])):
        ctr, cvr = scores(model, b)
        ctr2, cvr2 = scores(model, pad_history(b, 7))
        torch.testing.assert_close(ctr2, ctr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cvr2, cvr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_history_matters(tiny_dataset, batch, variant):
    """The control for the padding test: dropping real behaviours does change the scores."""
    _, ds = tiny_dataset
    model, _ = make(variant, ds)
    ctr, _ = scores(model, batch)
    ctr2, _ = scores(model, without_history(batch, [0]))
    first = batch.cand_req == 0
    assert (ctr2[first] - ctr[first]).abs().max() > 1e-6
    torch.testing.assert_close(ctr2[~first], ctr[~first])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_query_and_candidate_change_output(tiny_dataset, batch, variant):
    _, ds = tiny_dataset
    model, _ = make(variant, ds)
    ctr, _ = scores(model, batch)
    assert bool((batch.query > 0).any(-1).all())
    other_query = replace(batch, query=batch.query.roll(1, dims=0))
    other_cand = replace(batch, cand_item=batch.cand_item.roll(1, dims=0))
    for b in (other_query, other_cand):
        ctr2, _ = scores(model, b)
        assert (ctr2 - ctr).abs().max() > 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_steps_lower_loss(tiny_dataset, batch, variant):
    _, ds = tiny_dataset
    model, _ = make(variant, ds)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()

    def loss_now():
        return model.loss(batch, model(batch))[0]

    with torch.no_grad():
        before = float(loss_now())
    for _ in range(30):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_now())
    assert after < before - 0.05, (before, after)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_round_trip(tiny_dataset, batch, variant, tmp_path):
    _, ds = tiny_dataset
    model, cfg = make(variant, ds)
    ctr, cvr = scores(model, batch)
    save_model(tmp_path, model, cfg, ds.fmap)
    torch.manual_seed(123)  # the loaded model starts from different random weights
    loaded, cfg2, _ = load_model(tmp_path)
    assert type(loaded) is type(model) and cfg2.model == cfg.model
    ctr2, cvr2 = scores(loaded, batch)
    assert torch.equal(ctr, ctr2) and torch.equal(cvr, cvr2)


# ---- SIM ---------------------------------------------------------------------------------------
def _category_of(model, rows):
    return model.emb.item_sparse[rows][..., model.cat_slots].squeeze(-1)


def test_sim_hard_selects_most_recent_same_category(tiny_dataset, batch):
    _, ds = tiny_dataset
    assert ds.fmap.has_category == "category"
    model, _ = make("sim_hard", ds)
    model.eval()
    with torch.no_grad():
        state = model.encode_request(batch)
        idx, keep, _ = model.select(state, batch, model.emb.candidate(batch))
    r = batch.cand_req
    hist_cat = _category_of(model, batch.hist_item)[r]                    # [N, L]
    cand_cat = _category_of(model, batch.cand_item)                        # [N]
    same = (hist_cat == cand_cat[:, None]) & batch.hist_mask[r] & (cand_cat[:, None] > 0)
    assert keep.any() and not keep.all()
    # every kept behaviour has the candidate's category, and the kept ones are the most recent K
    assert bool((hist_cat.gather(1, idx) == cand_cat[:, None])[keep].all())
    k = model.cfg.topk
    for n in range(idx.shape[0]):
        pos = torch.nonzero(same[n]).flatten()
        expect = set(pos[-k:].tolist())
        assert set(idx[n][keep[n]].tolist()) == expect


def test_sim_hard_without_category_raises(tiny_dataset):
    _, ds = tiny_dataset
    fmap = dataclasses.replace(ds.fmap, has_category=None)
    name, overrides = VARIANTS["sim_hard"]
    cfg = tiny_config(name, *overrides)
    with pytest.raises(ValueError, match="needs an item category feature.*gsu=soft"):
        model_class(name)(fmap, cfg.model)
    model_class(name)(fmap, tiny_config("sim").model)   # soft mode is fine without one


def test_sim_soft_gsu_learns_through_aux_loss(tiny_dataset, batch):
    _, ds = tiny_dataset
    model, _ = make("sim_soft", ds)
    model.train()
    out = model(batch)
    assert out.aux_loss is not None
    model.loss(batch, out)[0].backward()
    assert model.gsu_cand.weight.grad.abs().sum() > 0
    model.eval()
    assert model(batch).aux_loss is None


# ---- QIN ---------------------------------------------------------------------------------------
def test_qin_relevance_search_follows_the_query(tiny_dataset, batch):
    _, ds = tiny_dataset
    model, _ = make("qin", ds)
    model.eval()
    with torch.no_grad():
        no_query = model.encode_request(replace(batch, query=torch.zeros_like(batch.query)))
        with_query = model.encode_request(batch)
    # without a query every relevance is 0: the RSU keeps the most recent behaviours
    L, k = batch.hist_item.shape[1], model.cfg.query_topk
    for r in range(batch.n_requests):
        n = int(batch.hist_len[r])
        kept = no_query["sub"][r][no_query["sub_keep"][r]]
        expect = model.emb.history(batch)[r, max(0, n - k):n]
        assert kept.shape[0] == min(n, k) and torch.allclose(kept.sum(0), expect.sum(0), atol=1e-6)
    # with the query it picks other behaviours for some requests (query-dominant)
    full = batch.hist_len > k
    assert bool(full.any()) and L > k
    differs = (with_query["sub"] - no_query["sub"]).abs().sum((-1, -2)) > 1e-6
    assert bool(differs[full].any())


# ---- shared layers -----------------------------------------------------------------------------
def test_masked_topk_deterministic_ties_and_mask():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    idx, keep = masked_topk(s, m, 3)
    assert idx[0].tolist() == [2, 1, 3] and keep[0].all()       # tie 3.0: later position first
    assert idx[1, :2].tolist() == [1, 0] and keep[1].tolist() == [True, True, False]
    idx, keep = masked_topk(s, m, 10)
    assert idx.shape == (2, 5)


def test_masked_softmax_empty_rows_are_zero():
    w = masked_softmax(torch.randn(2, 4), torch.tensor([[True, False, True, False], [False] * 4]))
    assert torch.isfinite(w).all() and w[1].eq(0).all() and w[0, [1, 3]].eq(0).all()
    torch.testing.assert_close(w[0].sum(), torch.tensor(1.0))


def test_heads_must_divide_dim(tiny_dataset):
    _, ds = tiny_dataset
    with pytest.raises(ValueError, match="multiple of model.heads"):
        make("sasrec", ds, "model.heads=3")


@pytest.mark.parametrize("variant", ["sim_hard", "qin"])
def test_onnx_export_keeps_top_k_selection(tiny_dataset, batch, variant, tmp_path):
    """ONNX has no stable sort: the exported top-K must pick (and tie-break) the same behaviours."""
    ort = pytest.importorskip("onnxruntime")
    from qdrank.serving.export import export_model, onnx_feed

    _, ds = tiny_dataset
    rows = ds.requests_of("train")[:24]
    full = int(torch.nonzero(batch.hist_len == batch.hist_item.shape[1])[0, 0])
    one = ds.make_batch(rows[[full]])    # a request with a full history: top-K really selects
    model, _ = make(variant, ds)
    out = export_model(model, one, tmp_path / "m.onnx", "onnx", variant)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for b in (one, replace(one, query=torch.zeros_like(one.query))):   # no query: all QIN relevances tie
        ref, _ = scores(model, b)
        ctr, _ = sess.run(None, onnx_feed(sess, b))
        assert abs(ctr - ref.numpy()).max() < 1e-5

"""Equal inputs and the serving model path, for every neural model of the registry.

* the head input holds the shared cross block exactly when ``model.cross`` is on, its columns are
  the candidate x query / x pooled-history products and the query-item token overlap (checked
  against a plain-Python reference), and the model trains both ways;
* the split head (request share once per request) equals the concatenated head;
* the inference item cache gives the same scores as the direct lookup and follows parameter changes;
* every model trains with the in-request softmax (listwise) term.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import tiny_config

from qdrank.models.base import RankModel
from qdrank.models.layers import SIDE_VALUE_TOKENS, TwoTaskHead, masked_mean
from qdrank.models.registry import available_models, model_class


def neural_models() -> list[str]:
    out = []
    for name in available_models():
        cls = model_class(name)
        if issubclass(cls, RankModel) and getattr(cls, "gradient_trained", True):
            out.append(name)
    return out


NEURAL = neural_models()


def build(name: str, ds, *overrides: str) -> RankModel:
    cfg = tiny_config(name, "model.dropout=0.0", *overrides)
    torch.manual_seed(0)
    model = model_class(name)(ds.fmap, cfg.model)
    model.emb.set_item_tables(*ds.item_tables())
    return model


def randomize(model: torch.nn.Module) -> None:
    """Move every parameter off its init (zero-initialised ones included) so all of them matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


@pytest.fixture(scope="module")
def batch(tiny_dataset):
    """Train requests with histories; two of them get a query made of their first candidate's words."""
    _, ds = tiny_dataset
    rows = ds.requests_of("train")
    rows = rows[(ds.hist_end[rows] - ds.hist_start[rows]) >= 2][:16]
    b = ds.make_batch(rows)
    fmap = ds.fmap
    q = b.query.clone()
    cat = next(f for f in fmap.role_features("item") if f.name == "category")
    title = next(f for f, s, w in fmap.slot_layout("item") if f.type == "text")
    for r, kind in ((0, "title"), (1, "category")):
        item = int(b.cand_item[(b.cand_req == r).nonzero()[0, 0]])
        q[r] = 0
        if kind == "title":
            start = next(s for f, s, w in fmap.slot_layout("item") if f is title)
            toks = ds.item_tables()[0][item, start:start + 2]
            q[r, :2] = torch.as_tensor(toks)
        else:
            start = next(s for f, s, w in fmap.slot_layout("item") if f.name == "category")
            cid = int(ds.item_tables()[0][item, start])
            q[r, :SIDE_VALUE_TOKENS] = torch.as_tensor(fmap.encode_text([cat.vocab[cid - cat.offset - 1]],
                                                                         SIDE_VALUE_TOKENS)[0])
    return dataclasses.replace(b, query=q)


def reference_overlap(model: RankModel, b) -> torch.Tensor:
    """[N, 4] by plain Python: query tokens vs the candidate's text tokens and side-value words."""
    fmap = model.fmap
    item_sparse = model.emb.item_sparse
    out = []
    for n in range(b.cand_item.shape[0]):
        q = [int(t) for t in b.query[int(b.cand_req[n])] if int(t) > 0]
        text, side = set(), set()
        for role, ids in (("item", item_sparse[int(b.cand_item[n])]), ("candidate", b.cand_sparse[n])):
            for f, start, width in fmap.slot_layout(role):
                vals = [int(v) for v in ids[start:start + width] if int(v) > 0]
                if f.type == "text":
                    text.update(vals)
                elif f.type in ("categorical", "list") and f.name != "item_id":
                    for v in vals:
                        if v > f.offset:  # not the OOV id
                            words = fmap.encode_text([f.vocab[v - f.offset - 1]], SIDE_VALUE_TOKENS)[0]
                            side.update(int(w) for w in words if w > 0)
        row = []
        for toks in (text, side):
            hits = sum(t in toks for t in q)
            row += [hits / max(len(q), 1), float(hits > 0)]
        out.append(row)
    return torch.tensor(out)


def reference_history_match(model: RankModel, b) -> torch.Tensor:
    """[N, n_history] by plain Python: per candidate, for its item then each item side feature, log1p of
    the number of earlier behaviours with the same value over log1p(50), and the share of the weights
    0.9 ** (later behaviours) on those behaviours; then the same log-scaled count per action type."""
    fmap, item_sparse = model.fmap, model.emb.item_sparse
    feats = [(s, w) for f, s, w in fmap.slot_layout("item") if f.type in ("categorical", "list") and f.name != "item_id"]
    act = fmap.features["action"]
    slot = next(s for f, s, _ in fmap.slot_layout("behavior") if f.name == "action")
    out = []
    for n in range(b.cand_item.shape[0]):
        r, item = int(b.cand_req[n]), int(b.cand_item[n])
        length = int(b.hist_len[r])
        hist = [int(x) for x in b.hist_item[r, :length]]
        action = [act.vocab[int(a) - act.offset - 1] for a in b.hist_sparse[r, :length, slot]]
        row = []
        tests = [lambda h, item=item: item > 1 and h == item]
        for s, w in feats:
            mine = {int(v) for v in item_sparse[item, s:s + w] if int(v) > 0}
            tests.append(lambda h, s=s, w=w, mine=mine: bool(mine & {int(v) for v in item_sparse[h, s:s + w]}))
        total = max(sum(0.9 ** a for a in range(length)), 1e-6)
        for hit in tests:
            ages = [length - 1 - j for j, h in enumerate(hist) if hit(h)]
            row += [math.log1p(len(ages)) / math.log1p(50), sum(0.9 ** a for a in ages) / total]
            row += [math.log1p(sum(hit(h) and a == name for h, a in zip(hist, action))) / math.log1p(50)
                    for name in act.vocab]
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("name", NEURAL)
def test_cross_block_in_head_input_iff_model_cross(name, tiny_dataset, batch):
    _, ds = tiny_dataset
    on, off = build(name, ds, "model.cross_rank=true"), build(name, ds, "model.cross=false")
    on.eval()
    off.eval()
    with torch.no_grad():
        x_on = on.head_input(on.encode_request(batch), batch)
        x_off = off.head_input(off.encode_request(batch), batch)
    d = on.cfg.dim
    cf = on.cross_features
    # + query x category (the tiny data declares a category) + each numeric candidate / item feature's rank
    width = 2 * d + 4 + cf.n_history + d + cf.n_rank
    assert cf.category_slots is not None and cf.n_rank == ds.fmap.n_numeric("candidate") + ds.fmap.n_numeric("item") > 0
    n_actions = len(ds.fmap.features["action"].vocab)
    assert on.cross_features.n_history == (2 + n_actions) * (1 + len(on.cross_features.history_slots)) > 2
    assert "cross" in on.head_layout() and "cross" not in off.head_layout()
    assert x_on.shape[1] == x_off.shape[1] + width == on.head.trunk[0].in_features
    assert x_off.shape[1] == off.head.trunk[0].in_features
    # the cross columns are c * q, c * h (mean of the history tokens), and the token overlap
    cross = x_on[:, on.head_layout()["cross"]]
    r = batch.cand_req
    with torch.no_grad():
        c = on.emb.candidate(batch)
        q = on.emb.query(batch)[r]
        h = masked_mean(on.emb.history(batch), batch.hist_mask, 1)[r]
    torch.testing.assert_close(cross[:, :d], c * q, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cross[:, d:2 * d], c * h, atol=1e-6, rtol=1e-5)
    ref = reference_overlap(on, batch)
    torch.testing.assert_close(cross[:, 2 * d:2 * d + 4], ref, atol=1e-6, rtol=0)
    hist = reference_history_match(on, batch)
    end = 2 * d + 4 + cf.n_history
    torch.testing.assert_close(cross[:, 2 * d + 4:end], hist, atol=1e-5, rtol=1e-5)
    # query x the embedding of the candidate's category value
    s, _ = cf.category_slots
    with torch.no_grad():
        cat = on.emb.table(on.emb.item_sparse[batch.cand_item, s])
    torch.testing.assert_close(cross[:, end:end + d], cat * q, atol=1e-6, rtol=1e-5)
    # rank within the request: share of the request's other candidates with a smaller value
    values = torch.cat([batch.cand_dense, on.emb.item_dense[batch.cand_item]], -1).tolist()
    req = batch.cand_req.tolist()
    ranks = [[sum(req[j] == req[i] and values[j][k] < values[i][k] for j in range(len(req)))
              / max(req.count(req[i]) - 1, 1) for k in range(cf.n_rank)] for i in range(len(req))]
    torch.testing.assert_close(cross[:, end + d:], torch.tensor(ranks), atol=1e-6, rtol=0)
    assert cross[:, end + d:].max() > 0.5
    assert hist[:, 0].max() > 0 and hist[:, 2 + n_actions].max() > 0  # repeats of an item and of a side value occur
    assert ref[:, 0].max() > 0 and ref[:, 2].max() > 0   # the test batch has text and side matches
    off_rank = build(name, ds)  # the default: no rank columns
    assert off_rank.cross_features.width == cf.width - cf.n_rank
    # both request parts are the same inputs: everything but the cross block is identical
    torch.testing.assert_close(x_on[:, :x_off.shape[1]], x_off, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cross", ["true", "false"])
@pytest.mark.parametrize("name", NEURAL)
def test_trains_with_and_without_cross(name, cross, tiny_dataset, batch):
    _, ds = tiny_dataset
    model = build(name, ds, f"model.cross={cross}")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(25):
        loss, _ = model.loss(batch, model(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("rank", ["false", "true"])
@pytest.mark.parametrize("name", NEURAL)
def test_split_head_equals_concatenated_head(name, rank, tiny_dataset, batch):
    _, ds = tiny_dataset
    model = build(name, ds, f"model.cross_rank={rank}")
    randomize(model)
    model.eval()
    with torch.no_grad():
        state = model.encode_request(batch)
        split = model.score(state, batch)
        concat = model.head(model.head_input(state, batch))
    for a, b in zip(split, concat):
        assert float((a - b).abs().max()) < 1e-5


@pytest.mark.parametrize("hidden", [(), (8,), (8, 4)])
def test_two_task_head_split_form(hidden):
    torch.manual_seed(0)
    head = TwoTaskHead(12, hidden, 0.0).eval()
    req, cand = torch.randn(3, 5), torch.randn(7, 7)
    cand_req = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    ref = head(torch.cat([req[cand_req], cand], -1))
    got = head.forward_split(req, cand, cand_req)
    for a, b in zip(got, ref):
        assert float((a - b).detach().abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["din", "diffusiongs", "mtgr"])
def test_item_cache_matches_direct_lookup_and_follows_changes(name, tiny_dataset, batch):
    _, ds = tiny_dataset
    model = build(name, ds)
    randomize(model)
    model.eval()

    def cached():
        with torch.inference_mode():
            return model(batch, use_position=False).ctr_logit.clone()

    def direct():  # autograd on: the cache is never used
        return model(batch, use_position=False).ctr_logit.detach()

    a = cached()
    assert model._item_cache is not None
    torch.testing.assert_close(a, direct(), atol=1e-5, rtol=0)
    # an in-place parameter change (an optimiser step, load_state_dict) invalidates the cache
    with torch.no_grad():
        model.emb.table.weight.mul_(1.5)
    b = cached()
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(b, direct(), atol=1e-5, rtol=0)
    model.freeze_item_cache()
    torch.testing.assert_close(cached(), b, atol=1e-6, rtol=0)
    model.train()
    assert model._item_cache is None


def test_dense_parameters_do_not_grow_with_vocabularies(tiny_data):
    from qdrank.config import build_config
    from qdrank.data.dataset import SearchLogDataset

    counts = []
    for buckets in (2000, 4000):
        cfg = build_config("din", overrides=[f"data.query_buckets={buckets}", "data.max_history=20"])
        ds = SearchLogDataset(tiny_data, cfg.data, log=lambda m: None)
        m = model_class("din")(ds.fmap, cfg.model)
        counts.append((m.n_parameters(), m.n_dense_parameters()))
    (all1, dense1), (all2, dense2) = counts
    assert all2 - all1 == 2000 * 64 and dense1 == dense2 < all1


@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_split_equals_concatenated_mlp(softmax):
    from qdrank.models.layers import TargetAttention

    torch.manual_seed(0)
    att = TargetAttention(8, (6, 4), softmax=softmax)
    randomize(att)
    keys, mask = torch.randn(3, 5, 8), torch.rand(3, 5) > 0.3
    q, cand_req = torch.randn(7, 8), torch.tensor([0, 0, 1, 2, 2, 2, 1])
    k, m = keys[cand_req], mask[cand_req]
    qe = q.unsqueeze(1).expand_as(k)
    w = att.mlp(torch.cat([qe, k, qe - k, qe * k], -1)).squeeze(-1)       # the reference form
    w = w.masked_fill(~m, float("-inf")).softmax(-1).nan_to_num(0.0) if softmax else w * m
    ref = (w.unsqueeze(-1) * k).sum(1)
    with torch.no_grad():
        torch.testing.assert_close(att(q, keys, mask, cand_req), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(att(q, k, m), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NEURAL)
def test_every_neural_model_trains_with_the_listwise_term(name, tiny_dataset, batch):
    _, ds = tiny_dataset
    model = build(name, ds)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    first = last = None
    for _ in range(25):
        out = model(batch)
        loss, parts = model.loss(batch, out, listwise_weight=1.0)
        assert "listwise" in parts
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = parts["listwise"] if first is None else first
        last = parts["listwise"]
    assert math.isfinite(last) and last < first, (first, last)


@pytest.mark.parametrize("name", ["dnn", "diffusiongs"])
def test_cross_category_switch_drops_only_the_query_category_columns(name, tiny_dataset, batch):
    _, ds = tiny_dataset
    on, off = build(name, ds, "model.cross_rank=true"), build(name, ds, "model.cross_rank=true",
                                                             "model.cross_category=false")
    assert off.cross_features.category_slots is None
    assert on.cross_features.width == off.cross_features.width + on.cfg.dim
    on.eval()
    off.eval()
    no_rank = build(name, ds)  # the default: no rank columns
    no_rank.eval()
    with torch.no_grad():   # same seed: every parameter but the head's is the same
        x_on = on.head_input(on.encode_request(batch), batch)
        x_off = off.head_input(off.encode_request(batch), batch)
        x_no_rank = no_rank.head_input(no_rank.encode_request(batch), batch)
    d, cf = on.cfg.dim, on.cross_features
    start = on.head_layout()["cross"].start + 2 * d + 4 + cf.n_history   # the q x category block
    torch.testing.assert_close(torch.cat([x_on[:, :start], x_on[:, start + d:]], 1), x_off, atol=1e-6, rtol=0)
    # model.cross_rank=false drops only the rank columns (the block's last)
    torch.testing.assert_close(x_on[:, :x_on.shape[1] - cf.n_rank], x_no_rank, atol=1e-6, rtol=0)

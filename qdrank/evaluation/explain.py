"""``qdrank explain``: the paper's Figure 3 for one request.

Bars: the model's click probability, under the request's query, for each history item (the
paper's "query-item (category) click probability": each history item is scored as a candidate
of this very request). Line: the l2 norm of the dynamic interest d_t of that history token.
Items sorted by ascending probability. If the query steers the dynamic interest, the line rises
with the bars.

``qdrank explain RUN --steering N`` measures the same thing over N requests instead of showing one:
per request, the correlation between ||d_t|| and each history item's relevance to the query, then
their mean. Relevance is ground truth where the data has it (a ``true_intent`` request column, as
the synthetic generator writes: 1 when the item's category is the intent) and otherwise the share
of the query's words found in the item's text features and category name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch


def explain_request(run: Path, data: Path | None, request_id: int, out: Path) -> dict:
    model, cfg, fmap, ds, data = _load(run, data)
    rows = np.flatnonzero(ds.request_id == request_id)
    if len(rows) == 0:
        raise ValueError(f"request_id {request_id} not found in {data}/requests.parquet")
    b = ds.make_batch(rows)
    n = int(b.hist_len[0])
    if n == 0:
        raise ValueError(f"request {request_id} has an empty history (no behaviour strictly before it)")
    with torch.inference_mode():
        d_tokens, mask = model.dynamic_interest(b)
        norms = d_tokens[0, :n].norm(dim=-1).numpy()
        items = b.hist_item[0, :n]
        cand = dataclasses.replace(
            b, cand_req=torch.zeros(n, dtype=torch.long), cand_item=items,
            cand_sparse=torch.zeros(n, b.cand_sparse.shape[1], dtype=torch.long),
            cand_dense=torch.zeros(n, b.cand_dense.shape[1]), position=torch.zeros(n, dtype=torch.long),
            click=torch.zeros(n), purchase=torch.full((n,), -1.0))
        prob = torch.sigmoid(model(cand, use_position=False).ctr_logit).numpy()
    labels = _item_labels(fmap, model, items)
    order = np.argsort(prob, kind="stable")
    query = _query_text(data, request_id)
    corr = _pearson(prob, norms)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n + 2), 4))
    x = np.arange(n)
    ax.bar(x, prob[order], color="#9ecae1", label="P(click | query, item)")
    ax.set_ylabel("predicted click probability")
    ax.set_xticks(x)
    ax.set_xticklabels([labels[i] for i in order], rotation=70, fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(x, norms[order], color="#d62728", marker="o", ms=3, label="‖d_t‖ (dynamic interest)")
    ax2.set_ylabel("l2 norm of dynamic interest")
    fig.legend(loc="upper left", bbox_to_anchor=(0.08, 0.95), fontsize=8)
    ax.set_title(f"request {request_id}: query “{query}”  (corr {corr:.2f})", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from qdrank.utils.io import atomic_output

    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return {"request_id": request_id, "query": query, "items": [labels[i] for i in order],
            "probability": prob[order].tolist(), "d_norm": norms[order].tolist(), "correlation": corr,
            "plot": str(out)}


def _load(run: Path, data: Path | None):
    import json

    from qdrank.data.dataset import SearchLogDataset
    from qdrank.training import checkpoint as ckpt

    model, cfg, fmap = ckpt.load_model(run)
    if not hasattr(model, "dynamic_interest"):
        raise ValueError(f"model {cfg.model_name!r} has no dynamic interest to explain (use a diffusiongs run)")
    data = data or Path(json.loads((Path(run) / "data.json").read_text())["path"])
    return model, cfg, fmap, SearchLogDataset(data, cfg.data, fmap=fmap, log=lambda m: None), Path(data)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _relevance(fmap, model, b, intents: list[str | None]) -> tuple[torch.Tensor, str]:
    """[R, L] relevance of each history item to its request's query, and where it came from."""
    items = b.hist_item
    cats = _item_categories(fmap, model, items.flatten())
    if cats is not None and any(i is not None for i in intents):
        rel = torch.tensor([[float(c is not None and c == intents[r]) for c in cats[r * items.shape[1]:(r + 1) * items.shape[1]]]
                            for r in range(items.shape[0])])
        return rel, "ground truth (true_intent)"
    slots = [slice(s, s + w) for f, s, w in fmap.slot_layout("item") if f.type == "text"]
    toks = [model.emb.item_sparse[items][..., sl] for sl in slots]
    if cats is not None:
        names = fmap.encode_text(["" if c is None else c for c in cats], fmap.max_list_len)
        toks.append(torch.from_numpy(names).view(*items.shape, -1))
    if not toks:
        raise ValueError("no ground truth (true_intent) and no item text or category to measure relevance")
    tok = torch.cat(toks, -1)                                                     # [R, L, T]
    q = b.query                                                                   # [R, Q]
    hit = (q[:, None, :, None] == tok[:, :, None, :]).any(-1) & (q[:, None, :] > 0)
    rel = hit.sum(-1).float() / (q > 0).sum(-1, keepdim=True).clamp_min(1).float()
    return rel, "query-word overlap with item text and category"


def steering(run: Path, data: Path | None, n_requests: int, out: Path, split: str = "test",
             min_history: int = 3) -> dict:
    """Mean per-request correlation of ||d_t|| with the history items' relevance to the query."""
    import pandas as pd

    model, cfg, fmap, ds, data = _load(run, data)
    rows = ds.requests_of(split)
    rows = rows[(ds.hist_end[rows] - ds.hist_start[rows]) >= min_history]
    if len(rows) == 0:
        raise ValueError(f"no {split} request has a history of >= {min_history} behaviours")
    rows = rows[np.linspace(0, len(rows) - 1, min(n_requests, len(rows))).round().astype(int)]
    req = pd.read_parquet(data / "requests.parquet")
    intent = dict(zip(req["request_id"], req["true_intent"])) if "true_intent" in req.columns else {}
    corrs: list[float] = []
    source = ""
    for chunk in np.array_split(rows, max(1, len(rows) // 256)):
        b = ds.make_batch(chunk, model.extra_inputs)
        with torch.inference_mode():
            d_tokens, mask = model.dynamic_interest(b)
            rel, source = _relevance(fmap, model, b, [intent.get(int(r)) for r in b.request_id])
        norms = d_tokens.norm(dim=-1)
        for r in range(b.n_requests):
            n = int(b.hist_len[r])
            corrs.append(_pearson(norms[r, :n].numpy(), rel[r, :n].numpy()))
    vals = np.array([c for c in corrs if c == c])
    res = {"requests": len(rows), "measured": int(len(vals)), "relevance": source,
           "mean_correlation": float(vals.mean()) if len(vals) else float("nan"),
           "std_correlation": float(vals.std()) if len(vals) else float("nan"),
           "share_positive": float((vals > 0).mean()) if len(vals) else float("nan"), "plot": str(out)}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qdrank.utils.io import atomic_output

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(vals, bins=30, range=(-1, 1), color="#6baed6")
    ax.axvline(res["mean_correlation"], color="#d62728", label=f"mean {res['mean_correlation']:.3f}")
    ax.set_xlabel("per-request correlation of ‖d_t‖ with relevance to the query")
    ax.set_ylabel("requests")
    ax.set_title(f"query steering over {len(vals)} {split} requests ({source})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(Path(out)) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return res


def _query_text(data: Path, request_id: int) -> str:
    import pandas as pd

    req = pd.read_parquet(Path(data) / "requests.parquet", columns=["request_id", "query"])
    q = req.loc[req["request_id"] == request_id, "query"]
    return str(q.iloc[0]) if len(q) else ""


def _item_categories(fmap, model, items: torch.Tensor) -> list[str | None] | None:
    """Category value of each item row (None where unknown); None when the data has no category."""
    cat = fmap.has_category
    start = next((s for ff, s, _ in fmap.slot_layout("item") if ff.name == cat), None)  # None: not an item feature
    if start is None or fmap.features[cat].type not in ("categorical", "list"):
        return None
    f = fmap.features[cat]
    out: list[str | None] = []
    for gid in model.emb.item_sparse[items, start].tolist():
        local = gid - f.offset - 1
        out.append(f.vocab[local] if 0 <= local < len(f.vocab) else None)
    return out


def _item_labels(fmap, model, items: torch.Tensor) -> list[str]:
    """Category name of each history item where the data has one, else its id."""
    ids = [fmap.item_vocab[i - 2] if i >= 2 else "?" for i in items.tolist()]
    cats = _item_categories(fmap, model, items)
    if cats is None:
        return ids
    return [f"{c}·{i}" if c is not None else i for c, i in zip(cats, ids)]

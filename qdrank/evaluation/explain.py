"""``qdrank explain``: the paper's Figure 3 for one request.

Bars: the model's click probability, under the request's query, for each history item (the
paper's "query-item (category) click probability": each history item is scored as a candidate
of this very request). Line: the l2 norm of the dynamic interest d_t of that history token.
Items sorted by ascending probability. If the query steers the dynamic interest, the line rises
with the bars.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch


def explain_request(run: Path, data: Path | None, request_id: int, out: Path) -> dict:
    import json

    from qdrank.data.dataset import SearchLogDataset
    from qdrank.training import checkpoint as ckpt

    model, cfg, fmap = ckpt.load_model(run)
    if not hasattr(model, "dynamic_interest"):
        raise ValueError(f"model {cfg.model_name!r} has no dynamic interest to explain (use a diffusiongs run)")
    data = data or Path(json.loads((Path(run) / "data.json").read_text())["path"])
    ds = SearchLogDataset(data, cfg.data, fmap=fmap, log=lambda m: None)
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
    corr = float(np.corrcoef(prob, norms)[0, 1]) if n > 2 and prob.std() > 0 and norms.std() > 0 else float("nan")

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


def _query_text(data: Path, request_id: int) -> str:
    import pandas as pd

    req = pd.read_parquet(Path(data) / "requests.parquet", columns=["request_id", "query"])
    q = req.loc[req["request_id"] == request_id, "query"]
    return str(q.iloc[0]) if len(q) else ""


def _item_labels(fmap, model, items: torch.Tensor) -> list[str]:
    """Category name of each history item where the data has one, else its id."""
    cat = fmap.has_category
    names = []
    start = next((s for ff, s, _ in fmap.slot_layout("item") if ff.name == cat), None)  # None: not an item feature
    if start is not None and fmap.features[cat].type in ("categorical", "list"):
        f = fmap.features[cat]
        ids = model.emb.item_sparse[items, start].tolist()
        for i, gid in zip(items.tolist(), ids):
            local = gid - f.offset - 1
            names.append(f"{f.vocab[local]}·{fmap.item_vocab[i - 2]}" if 0 <= local < len(f.vocab)
                         else fmap.item_vocab[i - 2] if i >= 2 else "?")
        return names
    return [fmap.item_vocab[i - 2] if i >= 2 else "?" for i in items.tolist()]

"""``qdrank data inspect``: the counts a ranking engineer checks before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qdrank.config import DataConfig
from qdrank.data import schema
from qdrank.data.dataset import SPLIT_CODES, history_bounds, split_by_time


def _stat(x: np.ndarray, f, default: float = float("nan")) -> float:
    """``f(x)`` or ``default`` for an empty array (numpy raises on min/max/percentile of nothing)."""
    return float(f(x)) if len(x) else default


def inspect_dataset(path: Path, cfg: DataConfig | None = None) -> dict:
    """Validate (a broken dataset raises :class:`schema.DatasetError`, never a numpy error), then count."""
    cfg = cfg or DataConfig()
    arrow = schema.read_tables(path)
    rep = schema.validate_dataset(path, arrow, cfg.split)
    req = arrow[schema.REQUESTS].to_pandas()
    imp = arrow[schema.IMPRESSIONS].to_pandas()
    beh = arrow[schema.BEHAVIORS].select(["user_id", "item_id", "timestamp", "action"]).to_pandas()
    split = (req["split"].map(SPLIT_CODES).to_numpy() if "split" in req.columns
             else split_by_time(req["timestamp"].to_numpy(), cfg.split))
    users = pd.Index(pd.unique(pd.concat([req["user_id"], beh["user_id"]]).map(str)))
    ru = users.get_indexer(req["user_id"].map(str))
    bu = users.get_indexer(beh["user_id"].map(str))
    order = np.lexsort((beh["timestamp"].to_numpy(), bu))
    s, e = history_bounds(bu[order], beh["timestamp"].to_numpy()[order], ru, req["timestamp"].to_numpy(),
                          max_history=10**9)
    hist = e - s
    per_req = imp.groupby("request_id").size()
    out = {
        "path": str(path), "tables": rep.tables,
        "requests": len(req), "impressions": len(imp), "behaviors": len(beh),
        "users": int(req["user_id"].nunique()),
        "items": int(pd.concat([imp["item_id"], beh["item_id"]]).nunique()),
        "candidates_per_request": {"mean": _stat(per_req, np.mean), "min": int(_stat(per_req, np.min, 0)),
                                   "max": int(_stat(per_req, np.max, 0))},
        "positives": {"click": int(imp["click"].astype("float64").sum())},
        "ctr": _stat(imp["click"].to_numpy(dtype=np.float64), np.mean),
        "queries_empty_fraction": float((req["query"].fillna("") == "").mean()),
        "history_length": {"mean": _stat(hist, np.mean), "p50": _stat(hist, lambda h: np.percentile(h, 50)),
                           "p90": _stat(hist, lambda h: np.percentile(h, 90)), "max": int(_stat(hist, np.max, 0)),
                           "zero_fraction": _stat(hist == 0, np.mean),
                           f"truncated_at_{cfg.max_history}": _stat(hist > cfg.max_history, np.mean)},
        "split": {name: int((split == code).sum()) for name, code in SPLIT_CODES.items()},
        "split_source": "column" if "split" in req.columns else f"by time {list(cfg.split)}",
        "actions": {str(k): int(v) for k, v in beh["action"].value_counts().items()},
        "warnings": rep.warnings,
    }
    if "purchase" in imp.columns:
        purchase = imp["purchase"].astype("float64")
        out["positives"]["purchase"] = int(purchase.fillna(0).sum())
        clicked = purchase[imp["click"].to_numpy() == 1]
        out["cvr_on_clicks"] = float(clicked.mean()) if clicked.notna().any() else float("nan")
    return out


def format_inspection(d: dict) -> str:
    h = d["history_length"]
    lines = [
        f"dataset {d['path']}  (tables: {', '.join(d['tables'])})",
        f"  requests     {d['requests']:>12,}   users {d['users']:,}   items {d['items']:,}",
        f"  impressions  {d['impressions']:>12,}   per request mean {d['candidates_per_request']['mean']:.1f}"
        f" (min {d['candidates_per_request']['min']}, max {d['candidates_per_request']['max']})",
        f"  behaviors    {d['behaviors']:>12,}   actions: " + ", ".join(f"{k} {v:,}" for k, v in d["actions"].items()),
        "  positives    " + ", ".join(f"{k} {v:,}" for k, v in d["positives"].items())
        + f"   CTR {d['ctr']:.4f}" + (f"   CVR|click {d['cvr_on_clicks']:.4f}" if "cvr_on_clicks" in d else ""),
        f"  empty queries {d['queries_empty_fraction']:.1%}",
        f"  history (strictly earlier behaviours) mean {h['mean']:.1f}  p50 {h['p50']:.0f}  p90 {h['p90']:.0f}"
        f"  max {h['max']}  empty {h['zero_fraction']:.1%}",
        "  split " + ", ".join(f"{k} {v:,}" for k, v in d["split"].items()) + f"  ({d['split_source']})",
    ]
    lines += [f"  warning: {w}" for w in d["warnings"]]
    return "\n".join(lines)

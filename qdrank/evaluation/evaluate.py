"""The evaluation loop: score a split with the model's serving path and compute its metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from qdrank.data.dataset import SearchLogDataset
from qdrank.data.shards import ShardedDataset
from qdrank.evaluation.metrics import RankingMetrics
from qdrank.models.base import RankModel
from qdrank.utils.runtime import SINGLE_PROCESS, DistContext


@torch.inference_mode()
def predict(model: RankModel, ds: SearchLogDataset | ShardedDataset, split: str, batch_size: int,
            device: torch.device, ctx: DistContext = SINGLE_PROCESS, progress: bool = False) -> dict[str, np.ndarray]:
    """Scores and labels of every impression of ``split`` (gathered over ranks): ctr/cvr logits,
    click, purchase, group (request id) and the oracle columns the data has, in request-id order."""
    model.eval()
    oracle = tuple(ds.oracle_columns)
    keys = ("ctr", "cvr", "click", "purchase", "group", *oracle)
    out: dict[str, list] = {k: [] for k in keys}
    batches = ds.iter_batches(split, batch_size, rank=ctx.rank, world=ctx.world,
                              extra_inputs=tuple(dict.fromkeys(model.extra_inputs + oracle)))
    for b in tqdm(batches, desc=f"eval {split}", disable=not progress, leave=False):
        o = model(b.to(device))  # logged positions known: full model (see PositionBias)
        out["ctr"].append(o.ctr_logit.float().cpu().numpy())
        out["cvr"].append(o.cvr_logit.float().cpu().numpy())
        out["click"].append(b.click.numpy())
        out["purchase"].append(b.purchase.numpy())
        out["group"].append(b.request_id[b.cand_req].numpy())
        for c in oracle:
            out[c].append(b.extra[c].numpy())
    res = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    if ctx.world > 1:
        parts: list = [None] * ctx.world
        dist.all_gather_object(parts, res)
        res = {k: np.concatenate([p[k] for p in parts]) for k in res}
    order = np.argsort(res["group"], kind="stable")  # the same order whatever the number of ranks
    return {k: v[order] for k, v in res.items()}


def metrics_from_predictions(ds: SearchLogDataset | ShardedDataset, pred: dict[str, np.ndarray]) -> dict:
    """CTR metrics on all impressions; CVR on clicked impressions with a known purchase."""
    groups, click, purchase = pred["group"], pred["click"], pred["purchase"]
    out = {}
    m = RankingMetrics(scores_are_logits=True)
    m.update(click, pred["ctr"], groups)
    out.update({f"ctr_{k}": v for k, v in m.compute().items()})
    cm = (click > 0) & (purchase >= 0)
    if ds.fmap.has_purchase and cm.any():
        m = RankingMetrics(scores_are_logits=True)
        m.update(purchase[cm], pred["cvr"][cm], groups[cm])
        out.update({f"cvr_{k}": v for k, v in m.compute().items()})
    if "true_ctr" in pred:
        m = RankingMetrics()
        m.update(click, pred["true_ctr"], groups, probs=pred["true_ctr"])
        out.update({f"oracle_ctr_{k}": v for k, v in m.compute().items() if k in ("auc", "gauc", "gauc_w")})
        if "true_cvr" in pred and cm.any():
            m = RankingMetrics()
            p = pred["true_cvr"][cm]
            m.update(purchase[cm], p, groups[cm], probs=p)
            out.update({f"oracle_cvr_{k}": v for k, v in m.compute().items() if k in ("auc", "gauc", "gauc_w")})
    return out


def evaluate(model: RankModel, ds: SearchLogDataset | ShardedDataset, split: str, batch_size: int, device: torch.device,
             ctx: DistContext = SINGLE_PROCESS, progress: bool = False) -> dict:
    return metrics_from_predictions(ds, predict(model, ds, split, batch_size, device, ctx, progress))


def selection_metric(metrics: dict) -> float:
    """Validation GAUC (unweighted); AUC where no request has mixed labels."""
    for key in ("ctr_gauc", "ctr_auc"):
        v = metrics.get(key, float("nan"))
        if v == v:
            return float(v)
    return -0.5  # nothing measurable: keep the first epoch, then stop on patience

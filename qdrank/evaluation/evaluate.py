"""The evaluation loop: score a split with the model's serving path and compute its metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from qdrank.data.dataset import SearchLogDataset
from qdrank.evaluation.metrics import RankingMetrics
from qdrank.models.base import RankModel
from qdrank.utils.runtime import SINGLE_PROCESS, DistContext


@torch.inference_mode()
def predict(model: RankModel, ds: SearchLogDataset, split: str, batch_size: int, device: torch.device,
            ctx: DistContext = SINGLE_PROCESS, progress: bool = False) -> dict[str, np.ndarray]:
    """Scores of every impression of ``split`` (gathered over ranks): logits, labels, groups."""
    model.eval()
    out: dict[str, list] = {k: [] for k in ("ctr", "cvr", "imp")}
    groups = ds.batch_rows(split, batch_size, rank=ctx.rank, world=ctx.world)
    for rows in tqdm(groups, desc=f"eval {split}", disable=not progress, leave=False):
        b = ds.make_batch(rows, model.extra_inputs).to(device)
        o = model(b)  # logged positions known: full model (see PositionBias)
        out["ctr"].append(o.ctr_logit.float().cpu().numpy())
        out["cvr"].append(o.cvr_logit.float().cpu().numpy())
        out["imp"].append(ds.candidate_index(rows))
    res = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    if ctx.world > 1:
        parts: list = [None] * ctx.world
        dist.all_gather_object(parts, res)
        res = {k: np.concatenate([p[k] for p in parts]) for k in res}
    order = np.argsort(res["imp"], kind="stable")
    return {k: v[order] for k, v in res.items()}


def metrics_from_predictions(ds: SearchLogDataset, pred: dict[str, np.ndarray]) -> dict:
    """CTR metrics on all impressions; CVR on clicked impressions with a known purchase."""
    imp = pred["imp"].astype(np.int64)
    req_of_imp = np.repeat(np.arange(len(ds.imp_start)), ds.imp_end - ds.imp_start)
    groups = req_of_imp[imp]
    click = ds.click[imp]
    out = {}
    m = RankingMetrics(scores_are_logits=True)
    m.update(click, pred["ctr"], groups)
    out.update({f"ctr_{k}": v for k, v in m.compute().items()})
    cm = (click > 0) & (ds.purchase[imp] >= 0)
    if ds.fmap.has_purchase and cm.any():
        m = RankingMetrics(scores_are_logits=True)
        m.update(ds.purchase[imp][cm], pred["cvr"][cm], groups[cm])
        out.update({f"cvr_{k}": v for k, v in m.compute().items()})
    if "true_ctr" in ds.oracle:
        m = RankingMetrics()
        m.update(click, ds.oracle["true_ctr"][imp], groups, probs=ds.oracle["true_ctr"][imp])
        out.update({f"oracle_ctr_{k}": v for k, v in m.compute().items() if k in ("auc", "gauc", "gauc_w")})
        if "true_cvr" in ds.oracle and cm.any():
            m = RankingMetrics()
            p = ds.oracle["true_cvr"][imp][cm]
            m.update(ds.purchase[imp][cm], p, groups[cm], probs=p)
            out.update({f"oracle_cvr_{k}": v for k, v in m.compute().items() if k in ("auc", "gauc", "gauc_w")})
    return out


def evaluate(model: RankModel, ds: SearchLogDataset, split: str, batch_size: int, device: torch.device,
             ctx: DistContext = SINGLE_PROCESS, progress: bool = False) -> dict:
    return metrics_from_predictions(ds, predict(model, ds, split, batch_size, device, ctx, progress))


def selection_metric(metrics: dict) -> float:
    """Validation GAUC (unweighted); AUC where no request has mixed labels."""
    for key in ("ctr_gauc", "ctr_auc"):
        v = metrics.get(key, float("nan"))
        if v == v:
            return float(v)
    return -0.5  # nothing measurable: keep the first epoch, then stop on patience

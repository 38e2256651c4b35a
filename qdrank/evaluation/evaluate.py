"""The evaluation loop: score a split in two metric families and compute sum-reducible metrics.

Metric families (the same names in the CLI, ``result.json``, ``metrics.jsonl``, Markdown, plots):

* ``serving`` (primary): the model called with ``use_position=False``, i.e. exactly the scores
  :meth:`qdrank.serving.ranker.Ranker.rank` gives a live request, which has no position. Early
  stopping, ``selection_metric``, the benchmark search and its verdicts use ``serving_ctr_gauc``.
* ``as_shown`` (secondary): the logged position added through the PAL position tower, i.e. the
  click probability of the impression where the old ranker showed it. It answers "how well does
  the model explain the log", not "how well would it rank", and is inflated by the logged
  ranker's own ordering.

A model whose scores read the logged position itself (``RankModel.uses_logged_position``, e.g.
the ``logged_order`` baseline) has no serving family: it cannot rank a live request.

Keys: ``{family}_ctr_{auc,gauc,gauc_w,logloss,n,n_groups,pos_rate}`` and ``{family}_cvr_*``
(post-click CVR on clicked impressions with a known purchase; its score has no position input,
so both families hold the same CVR figures). On simulated data (oracle columns present):
``oracle_{family}_ctr_{auc,gauc,gauc_w}`` (serving oracle ranks by ``true_rel``, the
position-free true click probability; as-shown by ``true_ctr``), ``oracle_{family}_cvr_*``, and
``serving_rel_gauc`` / ``serving_rel_ndcg10``: the model's serving ranking against ``true_rel``
as graded relevance (pairwise AUC within a request and NDCG@10), free of click noise and of the
logged ranker's bias.

Under ``torchrun`` every rank scores its own requests and the metric states are all-reduced
(sums of per-request AUCs, score histograms; see :mod:`qdrank.evaluation.metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from qdrank.data.batch import trim_history
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.shards import ShardedDataset
from qdrank.evaluation.metrics import GradedRankingMetrics, RankingMetrics, SumState, logit
from qdrank.models.base import RankModel
from qdrank.utils.runtime import SINGLE_PROCESS, DistContext

FAMILIES = ("serving", "as_shown")
PRIMARY = "serving_ctr_gauc"          # early stopping, search, verdicts
ORACLE_KEYS = ("auc", "gauc", "gauc_w")
REL_K = 10                            # NDCG@10 against true_rel


def family_logits(model: RankModel, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{family: (ctr_logit, cvr_logit)}`` of one batch.

    ``serving`` is ``model(batch, use_position=False)`` (what the Ranker computes); ``as_shown``
    adds the position tower's offset for the logged position, i.e. ``model(batch)``.
    """
    if getattr(model, "uses_logged_position", False):
        o = model(batch)
        return {"as_shown": (o.ctr_logit, o.cvr_logit)}
    o = model(batch, use_position=False)
    shown = o.ctr_logit if model.position is None else o.ctr_logit + model.position(batch.position)
    return {"serving": (o.ctr_logit, o.cvr_logit), "as_shown": (shown, o.cvr_logit)}


class Evaluator:
    """Sum-reducible metric states for one split: both families, CVR, oracle, true_rel.

    ``update`` takes one chunk of whole requests as arrays (labels, request ids, oracle columns,
    logits), so any batch source can feed it; ``all_reduce`` sums the states over ranks;
    ``compute`` returns the flat metric dict described in the module docstring.
    """

    def __init__(self, has_purchase: bool, oracle_columns: tuple[str, ...] = (),
                 families: tuple[str, ...] = FAMILIES):
        self.families, self.has_cvr, self.oracle = tuple(families), bool(has_purchase), tuple(oracle_columns)
        self.m: dict[str, SumState] = {}
        for fam in self.families:
            self.m[f"{fam}_ctr"] = RankingMetrics(scores_are_logits=True)
            if self.has_cvr:
                self.m[f"{fam}_cvr"] = RankingMetrics(scores_are_logits=True)
        if "serving" in self.families and "true_rel" in self.oracle:
            self.m["serving_rel"] = GradedRankingMetrics(REL_K)
        for fam, col in (("serving", "true_rel"), ("as_shown", "true_ctr")):
            if col in self.oracle:
                self.m[f"oracle_{fam}_ctr"] = RankingMetrics()
        if self.has_cvr and "true_cvr" in self.oracle:
            self.m["oracle_cvr"] = RankingMetrics()

    def update(self, click: np.ndarray, purchase: np.ndarray, groups: np.ndarray,
               oracle: Mapping[str, np.ndarray], logits: Mapping[str, tuple]) -> None:
        """One chunk of whole requests: per impression ``click``, ``purchase`` (-1 = unknown), request
        id ``groups``, the oracle columns, and ``{family: (ctr_logit, cvr_logit)}`` (family_logits)."""
        m = self.m
        click, purchase, groups = (np.asarray(_np(x)) for x in (click, purchase, groups))
        cm = (click > 0) & (purchase >= 0) if self.has_cvr else None
        for fam in self.families:
            ctr, cvr = (_np(x) for x in logits[fam])
            m[f"{fam}_ctr"].update(click, ctr, groups)
            if cm is not None and cm.any():
                m[f"{fam}_cvr"].update(purchase[cm], cvr[cm], groups[cm])
            if fam == "serving" and "serving_rel" in m:
                m["serving_rel"].update(_np(oracle["true_rel"]), ctr, groups)
        for fam, col in (("serving", "true_rel"), ("as_shown", "true_ctr")):
            if f"oracle_{fam}_ctr" in m:
                p = _np(oracle[col])
                m[f"oracle_{fam}_ctr"].update(click, logit(p), groups, probs=p)
        if "oracle_cvr" in m and cm is not None and cm.any():
            p = _np(oracle["true_cvr"])[cm]
            m["oracle_cvr"].update(purchase[cm], logit(p), groups[cm], probs=p)

    def all_reduce(self, ctx: DistContext, device: torch.device) -> None:
        """Sum every state over the ranks (one all-reduce of one flat float64 tensor)."""
        if ctx.world <= 1:
            return
        states = [(name, k, v) for name, met in self.m.items() for k, v in met.state().items()]
        flat = torch.from_numpy(np.concatenate([v.reshape(-1) for _, _, v in states])).to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu().numpy()
        new: dict[str, dict] = {name: {} for name in self.m}
        at = 0
        for name, k, v in states:
            new[name][k] = flat[at:at + v.size].reshape(v.shape)
            at += v.size
        for name, met in self.m.items():
            met.load_state(new[name])

    def compute(self) -> dict:
        out: dict = {}
        for fam in self.families:
            out.update({f"{fam}_ctr_{k}": v for k, v in self.m[f"{fam}_ctr"].compute().items()})
            if f"{fam}_cvr" in self.m and len(self.m[f"{fam}_cvr"]):
                out.update({f"{fam}_cvr_{k}": v for k, v in self.m[f"{fam}_cvr"].compute().items()})
        if "serving_rel" in self.m:
            r = self.m["serving_rel"].compute()
            out["serving_rel_gauc"], out[f"serving_rel_ndcg{REL_K}"] = r["gauc"], r[f"ndcg{REL_K}"]
        for fam in FAMILIES:  # the oracle is reported in both families, whatever the model
            if f"oracle_{fam}_ctr" in self.m:
                r = self.m[f"oracle_{fam}_ctr"].compute()
                out.update({f"oracle_{fam}_ctr_{k}": r[k] for k in ORACLE_KEYS})
            if "oracle_cvr" in self.m and len(self.m["oracle_cvr"]):
                r = self.m["oracle_cvr"].compute()
                out.update({f"oracle_{fam}_cvr_{k}": r[k] for k in ORACLE_KEYS})
        return out


def _np(x) -> np.ndarray:
    """Tensor (any device or dtype) or array -> numpy (float64 for floating tensors)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return x.double().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def dataset_evaluator(ds: SearchLogDataset | ShardedDataset, families: tuple[str, ...] = FAMILIES) -> Evaluator:
    return Evaluator(ds.fmap.has_purchase, tuple(ds.oracle_columns), families)


def model_families(model: RankModel) -> tuple[str, ...]:
    return ("as_shown",) if getattr(model, "uses_logged_position", False) else FAMILIES


def split_impressions(ds: SearchLogDataset | ShardedDataset, split: str) -> int:
    """Impressions (labelled candidates) of ``split``: 0 means there is nothing to evaluate."""
    if isinstance(ds, ShardedDataset):
        return int(ds.splits.get(split, {}).get("impressions", 0))
    rows = ds.requests_of(split)
    return int((ds.imp_end[rows] - ds.imp_start[rows]).sum())


def require_split(ds: SearchLogDataset | ShardedDataset, split: str, data: object) -> None:
    """Refuse an empty split by name: its metrics would all be NaN, which reads like a result."""
    if split_impressions(ds, split) == 0:
        raise ValueError(f"split {split!r} of dataset {data} is empty (no request with labelled impressions): "
                         "nothing to evaluate; pick another --split or a dataset whose split has requests")


def _batches(model: RankModel, ds, split: str, batch_size: int, ctx: DistContext, progress: bool, desc: str):
    """Batches of ``split`` for this rank, with the oracle columns as batch inputs."""
    extra = tuple(dict.fromkeys(model.extra_inputs + tuple(ds.oracle_columns)))
    batches = ds.iter_batches(split, batch_size, rank=ctx.rank, world=ctx.world, extra_inputs=extra)
    if not model.extra_inputs:  # the oracle columns are per candidate: trimming leaves them alone
        batches = map(lambda b: trim_history(b, extra_ok=True), batches)
    # disable=None: no per-batch bar when stderr is not a terminal (logs get the epoch lines only)
    return tqdm(batches, desc=f"{desc} {split}", disable=None if progress else True, leave=False)


@torch.inference_mode()
def evaluate(model: RankModel, ds: SearchLogDataset | ShardedDataset, split: str, batch_size: int,
             device: torch.device | None = None, ctx: DistContext = SINGLE_PROCESS, progress: bool = False) -> dict:
    """Metrics of ``split`` in both families; each rank scores its own requests, states all-reduced.
    Batches go to ``device`` (default: the model's, :attr:`RankModel.device`)."""
    device = device or model.device
    model.eval()
    ev = dataset_evaluator(ds, model_families(model))
    for b in _batches(model, ds, split, batch_size, ctx, progress, "eval"):
        logits = family_logits(model, b.to(device))
        ev.update(b.click, b.purchase, b.request_id[b.cand_req], {c: b.extra[c] for c in ds.oracle_columns}, logits)
    ev.all_reduce(ctx, device)
    return ev.compute()


@torch.inference_mode()
def predict(model: RankModel, ds: SearchLogDataset | ShardedDataset, split: str, batch_size: int,
            device: torch.device | None = None, ctx: DistContext = SINGLE_PROCESS, progress: bool = False) -> dict[str, np.ndarray]:
    """Raw scores and labels of every impression of ``split`` (gathered over ranks, for analyses;
    :func:`evaluate` never gathers): ``serving_ctr`` / ``as_shown_ctr`` / ``cvr`` logits (a family the
    model lacks is absent), ``click``, ``purchase``, ``group`` (request id) and the oracle columns,
    in request-id order (a request's impressions in their logged order). Batches go to ``device``
    (default: the model's, :attr:`RankModel.device`)."""
    device = device or model.device
    model.eval()
    oracle = tuple(ds.oracle_columns)
    out: dict[str, list] = {}
    for b in _batches(model, ds, split, batch_size, ctx, progress, "predict"):
        fl = family_logits(model, b.to(device))
        for fam, (ctr, _) in fl.items():
            out.setdefault(f"{fam}_ctr", []).append(_np(ctr))
        out.setdefault("cvr", []).append(_np(next(iter(fl.values()))[1]))
        out.setdefault("click", []).append(b.click.numpy())
        out.setdefault("purchase", []).append(b.purchase.numpy())
        out.setdefault("group", []).append(b.request_id[b.cand_req].numpy())
        for c in oracle:
            out.setdefault(c, []).append(_np(b.extra[c]))
    res = {k: np.concatenate(v) for k, v in out.items()}
    if ctx.world > 1:
        parts: list = [None] * ctx.world
        dist.all_gather_object(parts, res)
        res = {k: np.concatenate([p[k] for p in parts if k in p]) for k in set().union(*parts)}
    if "group" not in res:
        return {"group": np.zeros(0, np.int64), "click": np.zeros(0), "purchase": np.zeros(0)}
    order = np.argsort(res["group"], kind="stable")  # the same order whatever the number of ranks
    return {k: v[order] for k, v in res.items()}


def metrics_from_predictions(ds: SearchLogDataset | ShardedDataset, pred: dict[str, np.ndarray]) -> dict:
    """The metrics of :func:`evaluate` from :func:`predict`'s arrays (one process)."""
    fams = tuple(f for f in FAMILIES if f"{f}_ctr" in pred)
    ev = Evaluator(ds.fmap.has_purchase, tuple(c for c in ds.oracle_columns if c in pred), fams)
    if len(pred["group"]):
        ev.update(pred["click"], pred["purchase"], pred["group"], {c: pred[c] for c in ds.oracle_columns if c in pred},
                  {f: (pred[f"{f}_ctr"], pred["cvr"]) for f in fams})
    return ev.compute()


def format_families(m: dict) -> str:
    """One line for logs: ``serving AUC .. GAUC .. | as_shown AUC .. GAUC ..``."""
    parts = []
    for fam in FAMILIES:
        if f"{fam}_ctr_auc" in m:
            parts.append(f"{fam} AUC {m[f'{fam}_ctr_auc']:.4f} GAUC {m.get(f'{fam}_ctr_gauc', float('nan')):.4f}")
        else:
            parts.append(f"{fam} n/a")
    return " | ".join(parts)


def selection_metric(metrics: dict) -> float:
    """Validation serving CTR GAUC (unweighted); then serving AUC; as-shown only for a model that
    has no serving family (it reads the logged position)."""
    fam = "serving" if PRIMARY in metrics else "as_shown"
    for key in (f"{fam}_ctr_gauc", f"{fam}_ctr_auc"):
        v = metrics.get(key, float("nan"))
        if v == v:
            return float(v)
    return -0.5  # nothing measurable: keep the first epoch, then stop on patience

"""``gbdt``: LightGBM LambdaRank over :mod:`gbdt_features` -- what search teams deploy today.

Groups are requests, the label is the click; trees are added until ``trees`` or until the
validation split's GAUC (the selection metric every model is early-stopped on; ``stop_metric=ndcg``
for LightGBM's NDCG@10) stops improving for ``early_stopping`` rounds. The booster is kept as its
LightGBM model string in a uint8 buffer, so it is saved in ``model.safetensors`` with the rest and
reloaded with ``lightgbm.Booster(model_str=...)``: no pickle anywhere. Scoring does not call LightGBM:
the booster's trees are converted (at fit and at load) into a :class:`~.trees.TreeEnsemble`, a torch
graph, so evaluation, serving and the ONNX / TorchScript export score with the same tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import torch

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch, select_requests
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.features import FeatureMap
from qdrank.data.shards import ShardedDataset
from qdrank.evaluation.metrics import gauc
from qdrank.models.baselines.common import Baseline
from qdrank.models.baselines.gbdt_features import GBDTFeatures, LabelCounts
from qdrank.models.baselines.trees import TreeEnsemble


@dataclass
class GBDTConfig(ModelConfig):
    trees: int = 300              # boosting rounds at most
    leaves: int = 31              # leaves per tree
    lr: float = 0.05              # shrinkage
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    early_stopping: int = 50      # rounds without validation gain; 0 = off
    stop_metric: str = "gauc"     # gauc (the project's selection metric) | ndcg (NDCG@10, LightGBM's)
    max_cat_values: int = 1000    # categorical features with more values enter via statistics only
    decay: float = 0.9            # recency decay of the history-match feature
    num_threads: int = 0          # LightGBM threads; 0 = its default
    folds: int = 5                # out-of-fold click statistics for the training rows
    #                               (fold assignment and feature sampling follow the run's train.seed)


#: per-batch click counts of a fold are merged into one every this many batches (see _train_matrix)
COUNT_MERGE_EVERY = 16


def request_folds(request_id: torch.Tensor, seed: int, k: int) -> torch.Tensor:
    """[R] fold 0..k-1 of each request: a hash of (request id, seed), the same wherever it is read."""
    x = request_id.cpu().numpy().astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    with np.errstate(over="ignore"):  # splitmix64: wrapping multiplication is the point
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return torch.from_numpy((x % np.uint64(k)).astype(np.int64)).to(request_id.device)


def valid_gauc(group_sizes: np.ndarray):
    """LightGBM eval function: GAUC over the validation requests (group sizes in row order)."""
    groups = np.repeat(np.arange(len(group_sizes)), group_sizes)

    def feval(scores: np.ndarray, data: lgb.Dataset) -> tuple[str, float, bool]:
        return "gauc", float(gauc(data.get_label(), scores, groups)["gauc"]), True

    return feval


class GBDT(Baseline):
    config_class = GBDTConfig
    booster_fast_path = True  # eager scoring by LightGBM's predict; traced/exported graphs use ``trees``

    def __init__(self, fmap: FeatureMap, cfg: GBDTConfig):
        super().__init__(fmap, cfg)
        self.features = GBDTFeatures(fmap, cfg.max_cat_values, cfg.decay)
        self.register_buffer("booster_model", torch.zeros(0, dtype=torch.uint8))
        self.trees = TreeEnsemble()  # the booster as tensors (rebuilt from booster_model, never saved)
        self._booster: lgb.Booster | None = None
        self._lock = threading.Lock()

    # ---- the booster, from its model string ---------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "booster_model")
        if saved is not None and saved.shape != self.booster_model.shape:
            self.booster_model = torch.empty(saved.shape, dtype=torch.uint8, device=self.booster_model.device)
        self._booster = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.booster_model.numel():
            self.trees.load(self.booster.dump_model())

    @property
    def booster(self) -> lgb.Booster:
        if self._booster is None:
            with self._lock:
                if self._booster is None:
                    if self.booster_model.numel() == 0:
                        raise RuntimeError("gbdt has no fitted booster: train it with `qdrank train --model gbdt`")
                    text = bytes(self.booster_model.cpu().numpy()).decode("utf-8")
                    self._booster = lgb.Booster(model_str=text)
        return self._booster

    # ---- fitting --------------------------------------------------------------------------------
    def _matrix(self, ds: SearchLogDataset | ShardedDataset, split: str, rows: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._matrix_of(b for b, _ in self.batches(ds, split, rows))

    def _matrix_of(self, batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xs, ys, groups = [], [], []
        for b in batches:
            xs.append(self.features(b, self.emb.item_sparse, self.emb.item_dense).cpu().numpy())
            ys.append(b.click.cpu().numpy())
            groups.append(torch.bincount(b.cand_req, minlength=b.n_requests).cpu().numpy())
        if not xs:
            return np.zeros((0, len(self.features.names)), np.float32), np.zeros(0), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)

    def _train_matrix(self, ds: SearchLogDataset | ShardedDataset, seed: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training rows with their click statistics computed out of fold: the rows of fold k see
        popularity and query-category affinity fitted on the other folds only, so the booster learns
        how these statistics generalise instead of reading each row's own label from them.

        A request's fold is a hash of its id and the seed (:func:`request_folds`), so data in memory
        and streamed shards fold alike. One pass counts the statistics per fold; the counts are
        additive, so fold k's are ``total - fold k``; a second pass builds each batch's rows fold by
        fold. The feature matrix is held in memory for LightGBM (4 bytes per feature per impression)."""
        k = max(int(self.cfg.folds), 2)
        item_sparse = self.emb.item_sparse
        parts: dict[int, list[LabelCounts]] = {}
        n_rows = n_requests = 0
        for b, _ in self.batches(ds, "train"):
            n_rows, n_requests = n_rows + b.cand_item.shape[0], n_requests + b.n_requests
            fold = request_folds(b.request_id, seed, k)
            for i in fold.unique().tolist():
                p = parts.setdefault(i, [])
                p.append(self.features.label_counts(select_requests(b, fold == i), item_sparse))
                if len(p) >= COUNT_MERGE_EVERY:  # each part holds whole per-item / per-token tables:
                    p[:] = [LabelCounts.sum(p)]  # merged as they come, memory stays flat in the log's length
        if not parts:
            raise ValueError("gbdt: the training split has no requests to fit on")
        per_fold = {i: LabelCounts.sum(p) for i, p in parts.items()}
        total = LabelCounts.sum(list(per_fold.values()))
        states = {}
        for i, c in per_fold.items():
            self.features.set_label_counts(LabelCounts.sum([total, c], [1.0, -1.0]))
            states[i] = self.features.label_state()
        self.features.set_label_counts(total)  # all of train, for scoring
        final = self.features.label_state()
        # filled in place (not a list of parts concatenated at the end: that held the matrix twice)
        xs = np.empty((n_rows, len(self.features.names)), np.float32)
        ys, groups = np.empty(n_rows, np.float32), np.empty(n_requests, np.int64)
        row = req = 0
        try:
            for b, _ in self.batches(ds, "train"):
                fold = request_folds(b.request_id, seed, k)
                for i in fold.unique().tolist():
                    self.features.set_label_state(states[i])
                    x, y, g = self._matrix_of([select_requests(b, fold == i)])
                    if row + len(y) > n_rows or req + len(g) > n_requests:
                        raise ValueError("gbdt: the training split changed between two passes over it")
                    xs[row:row + len(y)], ys[row:row + len(y)], groups[req:req + len(g)] = x, y, g
                    row, req = row + len(y), req + len(g)
        finally:
            self.features.set_label_state(final)
        if (row, req) != (n_rows, n_requests):
            raise ValueError("gbdt: the training split changed between two passes over it")
        return xs, ys, groups

    def fit_data(self, ds: SearchLogDataset | ShardedDataset, seed: int = 0) -> None:
        cfg = self.cfg
        self.features.fit(ds, self.batches(ds, "train"))
        x, y, g = self._train_matrix(ds, seed)
        if cfg.stop_metric not in ("gauc", "ndcg"):
            raise ValueError(f"gbdt: model.stop_metric must be gauc or ndcg, got {cfg.stop_metric!r}")
        params = {"objective": "lambdarank", "learning_rate": cfg.lr,
                  **({"metric": "ndcg", "eval_at": [10]} if cfg.stop_metric == "ndcg" else {"metric": "None"}),
                  "num_leaves": cfg.leaves, "min_data_in_leaf": cfg.min_data_in_leaf,
                  "feature_fraction": cfg.feature_fraction, "seed": seed, "deterministic": True,
                  "num_threads": cfg.num_threads, "verbose": -1}
        kw = {"feature_name": self.features.names, "categorical_feature": self.features.categorical,
              "free_raw_data": True}
        train = lgb.Dataset(x, y.astype(np.int32), group=g, **kw)
        valid_sets, callbacks = [], []
        xv, yv, gv = self._matrix(ds, "valid")
        if cfg.early_stopping > 0 and len(yv) and yv.sum() > 0:
            valid_sets = [lgb.Dataset(xv, yv.astype(np.int32), group=gv, reference=train, **kw)]
            callbacks = [lgb.early_stopping(cfg.early_stopping, verbose=False)]
        feval = valid_gauc(gv) if valid_sets and cfg.stop_metric == "gauc" else None
        booster = lgb.train(params, train, num_boost_round=cfg.trees, valid_sets=valid_sets, feval=feval,
                            callbacks=callbacks)
        text = booster.model_to_string(num_iteration=booster.best_iteration or None)
        self.booster_model = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(self.device)
        self._booster = None
        self.trees.load(self.booster.dump_model())

    # ---- scoring ----------------------------------------------------------------------------------
    def candidate_scores(self, batch: Batch) -> torch.Tensor:
        if self.booster_model.shape[0] == 0:
            raise RuntimeError("gbdt has no fitted booster: train it with `qdrank train --model gbdt`")
        x = self.features(batch, self.emb.item_sparse, self.emb.item_dense)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or not self.booster_fast_path:
            return self.trees(x)
        # eager: LightGBM's own predict, 5-8x faster on CPU than the tensor walk; the two agree to
        # < 1e-5 (tests/test_baselines.py), and the export parity tests compare one with the other
        if x.shape[0] == 0:
            return x.new_zeros(0)
        s = self.booster.predict(x.detach().cpu().numpy(), raw_score=True, num_threads=self.cfg.num_threads or 1)
        return torch.as_tensor(np.asarray(s, dtype=np.float32), device=x.device)

    def summary(self) -> dict:
        """Trees and leaves (a booster has no parameters in the torch sense) and top features by gain."""
        if self.booster_model.numel() == 0:
            return {"trees": 0}
        b = self.booster
        dump = b.dump_model()
        leaves = sum(t["num_leaves"] for t in dump["tree_info"])
        gain = b.feature_importance("gain")
        top = np.argsort(-gain)[:10]
        total = float(gain.sum()) or 1.0
        return {"trees": b.num_trees(), "leaves": int(leaves), "features": len(self.features.names),
                "top_features_by_gain": {self.features.names[i]: round(float(gain[i]) / total, 4)
                                         for i in top if gain[i] > 0}}

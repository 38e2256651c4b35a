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
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import torch

from qdrank.config import ModelConfig
from qdrank.data.batch import Batch
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.features import FeatureMap
from qdrank.evaluation.metrics import gauc
from qdrank.models.baselines.common import Baseline
from qdrank.models.baselines.gbdt_features import GBDTFeatures
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


def valid_gauc(group_sizes: np.ndarray):
    """LightGBM eval function: GAUC over the validation requests (group sizes in row order)."""
    groups = np.repeat(np.arange(len(group_sizes)), group_sizes)

    def feval(scores: np.ndarray, data: lgb.Dataset) -> tuple[str, float, bool]:
        return "gauc", float(gauc(data.get_label(), scores, groups)["gauc"]), True

    return feval


class GBDT(Baseline):
    config_class = GBDTConfig
    in_memory_only = "its out-of-fold click statistics are fitted on folds of the training requests"
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
    def _matrix(self, ds: SearchLogDataset, split: str, rows: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xs, ys, groups = [], [], []
        for b, _ in self.batches(ds, split, rows):
            xs.append(self.features(b, self.emb.item_sparse, self.emb.item_dense).cpu().numpy())
            ys.append(b.click.cpu().numpy())
            groups.append(torch.bincount(b.cand_req, minlength=b.n_requests).cpu().numpy())
        if not xs:
            return np.zeros((0, len(self.features.names)), np.float32), np.zeros(0), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)

    def _train_matrix(self, ds: SearchLogDataset, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training rows with their click statistics computed out of fold: the rows of fold k see
        popularity and query-category affinity fitted on the other folds only, so the booster learns
        how these statistics generalise instead of reading each row's own label from them."""
        rows = ds.requests_of("train")
        k = max(int(self.cfg.folds), 2)
        fold = np.random.default_rng(seed).integers(0, k, len(rows))
        parts = []
        for i in range(k):
            self.features.fit_label_statistics(ds, self.emb.item_sparse, rows[fold != i])
            parts.append(self._matrix(ds, "train", rows[fold == i]))
        self.features.fit_label_statistics(ds, self.emb.item_sparse)  # all of train, for scoring
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]

    def fit_data(self, ds: SearchLogDataset, seed: int = 0) -> None:
        cfg = self.cfg
        self.features.fit(ds, self.emb.item_sparse, self.batches(ds, "train"))
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

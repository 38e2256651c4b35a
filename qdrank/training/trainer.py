"""One trainer for every model: Adam, early stopping on validation GAUC, atomic checkpoints,
exact resume, and multi-process data parallelism under ``torchrun``.

Determinism: every epoch reseeds torch and the batch order from ``(seed, epoch)``, so a run
resumed from the state saved after epoch k continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from qdrank.config import RunConfig, TrainConfig
from qdrank.data.batch import Batch
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.shards import ShardedDataset
from qdrank.evaluation.evaluate import evaluate, selection_metric
from qdrank.models.base import RankModel
from qdrank.models.registry import model_class
from qdrank.training import checkpoint as ckpt
from qdrank.training.optim import build_optimizer, clip_grad_norm
from qdrank.training.prefetch import prefetch
from qdrank.utils.io import to_jsonable
from qdrank.utils.runtime import init_distributed, resolve_device, seed_everything


def build_model(cfg: RunConfig, ds: SearchLogDataset | ShardedDataset) -> RankModel:
    seed_everything(cfg.train.seed)
    model = model_class(cfg.model_name)(ds.fmap, cfg.model)
    model.emb.set_item_tables(*ds.item_tables())
    return model


AUTOCAST = {"none": None, "bf16": torch.bfloat16}


class TrainStep:
    """The inner step (forward, loss, backward, clip, update) with TrainConfig's speed switches:
    bf16 autocast (fp32 master weights), ``torch.compile`` of the forward, and the optimizer of
    :func:`qdrank.training.optim.build_optimizer` (row-sparse table gradients unless ``net`` is
    data-parallel). Shared by :class:`Trainer` and ``benchmarks/bench_train.py``."""

    def __init__(self, model: RankModel, t: TrainConfig, device: torch.device, data_parallel: bool = False):
        if t.autocast not in AUTOCAST:
            raise ValueError(f"train.autocast={t.autocast!r}; choose one of: {', '.join(AUTOCAST)}")
        self.model, self.t, self.device = model, t, device
        self.optimizer = build_optimizer(model, t, sparse_grad=not data_parallel)
        self.set_net(model)

    def set_net(self, net: torch.nn.Module) -> None:
        """The module to call forward on (the model, or its DistributedDataParallel wrapper)."""
        self.forward = torch.compile(net, dynamic=True) if self.t.compile else net

    def __call__(self, b: Batch) -> torch.Tensor:
        """One update on batch ``b``; returns the detached loss."""
        dtype = AUTOCAST[self.t.autocast]
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = self.forward(b)
            loss, _ = self.model.loss(b, out, self.t.cvr_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.t.grad_clip > 0:
            clip_grad_norm(self.model.parameters(), self.t.grad_clip)
        self.optimizer.step()
        return loss.detach()


class Trainer:
    def __init__(self, cfg: RunConfig, ds: SearchLogDataset | ShardedDataset, run_dir: Path, resume: bool = False,
                 log=print):
        self.cfg, self.ds, self.run_dir, self.log = cfg, ds, Path(run_dir), log
        t = cfg.train
        if t.num_threads > 0:
            torch.set_num_threads(t.num_threads)
        self.device = resolve_device(t.device)
        self.ctx = init_distributed(self.device)
        self.model = build_model(cfg, ds).to(self.device)
        # fitted baselines (gradient_trained False) have no parameters, so no step and no optimizer
        self.step = TrainStep(self.model, t, self.device, data_parallel=self.ctx.world > 1) \
            if self.model.gradient_trained else None
        self.optimizer = self.step.optimizer if self.step is not None else None
        self.start_epoch, self.best, self.best_epoch, self.bad_epochs = 0, -1.0, -1, 0
        state_file = self.run_dir / ckpt.STATE_DIR / ckpt.STATE_JSON
        if state_file.exists() and not resume:
            raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it or "
                                  "choose another --out")
        if resume and self.optimizer is not None:
            info = ckpt.load_train_state(self.run_dir, self.model, self.optimizer)
            if info is None:
                self.log(f"nothing to resume in {self.run_dir}: starting from scratch")
            else:
                self.start_epoch = info["epoch"] + 1
                self.best, self.best_epoch, self.bad_epochs = info["best"], info["best_epoch"], info["bad_epochs"]
                self.log(f"resuming after epoch {info['epoch']} (best valid GAUC {self.best:.4f})")
        self.net = self.model
        if self.ctx.world > 1 and self.model.gradient_trained:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
            self.step.set_net(self.net)

    def fit(self) -> dict:
        cfg, t, ds = self.cfg, self.cfg.train, self.ds
        if self.ctx.main:
            ckpt.write_json(self.run_dir / ckpt.CONFIG, cfg.to_dict())
            ckpt.write_json(self.run_dir / ckpt.FEATURE_MAP, ds.fmap.to_dict())
            ckpt.write_json(self.run_dir / "data.json", {"path": str(ds.path.resolve())})
            if self.start_epoch == 0:
                (self.run_dir / ckpt.METRICS).unlink(missing_ok=True)
        if not self.model.gradient_trained:
            return self.fit_baseline()
        # a run resumed after its early stop trains no further epoch
        first_epoch = self.start_epoch if self.bad_epochs <= t.patience else t.max_epochs
        for epoch in range(first_epoch, t.max_epochs):
            seed_everything(t.seed * 1009 + epoch)
            self.net.train()
            batches = ds.iter_batches("train", t.batch_size, shuffle=True, seed=t.seed * 1009 + epoch,
                                      rank=self.ctx.rank, world=self.ctx.world, extra_inputs=self.model.extra_inputs)
            if t.max_steps_per_epoch:
                batches = itertools.islice(batches, t.max_steps_per_epoch)
            t0, n_seen, loss_sum = time.perf_counter(), 0, 0.0
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t.max_epochs}", disable=not (t.progress and self.ctx.main),
                       unit="batch", dynamic_ncols=True)
            for b in prefetch(bar, t.prefetch):  # batches are built in a worker thread, in order
                b = b.to(self.device)
                loss = self.step(b)
                n_seen += len(b.click)
                loss_sum += float(loss.detach()) * len(b.click)
                bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}",
                                samples_s=f"{n_seen * self.ctx.world / (time.perf_counter() - t0):.0f}")
            train_time = time.perf_counter() - t0
            valid = evaluate(self.model, ds, "valid", t.eval_batch_size, self.device, self.ctx)
            score = selection_metric(valid)
            improved = score > self.best
            if improved:
                self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            else:
                self.bad_epochs += 1
            record = {"epoch": epoch, "train_loss": loss_sum / max(n_seen, 1),
                      "samples_per_s": n_seen * self.ctx.world / max(train_time, 1e-9),
                      "train_seconds": train_time, "valid": valid, "best_epoch": self.best_epoch}
            if self.ctx.main:
                if improved:
                    ckpt.save_tensors(self.run_dir / ckpt.WEIGHTS, ckpt.model_tensors(self.model))
                with open(self.run_dir / ckpt.METRICS, "a") as f:
                    f.write(json.dumps(to_jsonable(record)) + "\n")
                ckpt.save_train_state(self.run_dir, epoch, self.model, self.optimizer,
                                      {"best": self.best, "best_epoch": self.best_epoch,
                                       "bad_epochs": self.bad_epochs})
                self.log(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  valid AUC {valid.get('ctr_auc', float('nan')):.4f}"
                         f"  GAUC {valid.get('ctr_gauc', float('nan')):.4f}  {record['samples_per_s']:.0f} samples/s"
                         + ("  *" if improved else ""))
            if self.ctx.world > 1:
                dist.barrier()
            if self.bad_epochs > t.patience:
                self.log(f"early stop: no validation GAUC gain for {self.bad_epochs} epochs")
                break
        # reload the best weights for the final report
        if (self.run_dir / ckpt.WEIGHTS).exists():
            from safetensors.torch import load_file
            self.model.load_state_dict(load_file(str(self.run_dir / ckpt.WEIGHTS), device=str(self.device)))
        result = {"best_epoch": self.best_epoch, "best_valid_gauc": self.best,
                  "valid": evaluate(self.model, ds, "valid", t.eval_batch_size, self.device, self.ctx),
                  "test": evaluate(self.model, ds, "test", t.eval_batch_size, self.device, self.ctx),
                  "n_parameters": self.model.n_parameters()}
        if self.ctx.main:
            ckpt.write_json(self.run_dir / "result.json", result)
        return result

    def fit_baseline(self) -> dict:
        """A fitted baseline: statistics of the training split, no epochs, no optimizer."""
        t, ds = self.cfg.train, self.ds
        if not isinstance(ds, SearchLogDataset):
            raise ValueError(f"model {self.cfg.model_name!r} is fitted from a dataset loaded in memory; streamed "
                             "shards are not supported for baselines yet: pass the dataset directory")
        t0 = time.perf_counter()
        self.model.fit_data(ds)
        fit_seconds = time.perf_counter() - t0
        if self.ctx.main:
            ckpt.save_tensors(self.run_dir / ckpt.WEIGHTS, ckpt.model_tensors(self.model))
        valid = evaluate(self.model, ds, "valid", t.eval_batch_size, self.device, self.ctx)
        result = {"best_epoch": 0, "best_valid_gauc": selection_metric(valid), "valid": valid,
                  "test": evaluate(self.model, ds, "test", t.eval_batch_size, self.device, self.ctx),
                  "n_parameters": self.model.n_parameters(), "fit_seconds": fit_seconds,
                  "fitted": getattr(self.model, "summary", dict)()}
        if self.ctx.main:
            ckpt.write_json(self.run_dir / "result.json", result)
            self.log(f"fitted {self.cfg.model_name} in {fit_seconds:.1f}s: valid AUC "
                     f"{valid.get('ctr_auc', float('nan')):.4f}  GAUC {valid.get('ctr_gauc', float('nan')):.4f}")
        return result

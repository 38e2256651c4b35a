"""One trainer for every model: Adam with a learning-rate schedule, L2 on the embedding rows each
batch looks up, early stopping on validation serving GAUC, atomic checkpoints, exact resume, and
multi-process data parallelism under ``torchrun``.

Determinism: every epoch reseeds torch and the batch order from ``(seed, epoch)``, so a run
resumed from the state saved after epoch k continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from qdrank.config import RunConfig, TrainConfig
from qdrank.data.batch import Batch, trim_history
from qdrank.data.dataset import SearchLogDataset
from qdrank.data.shards import ShardedDataset
from qdrank.evaluation.evaluate import evaluate, format_families, selection_metric
from qdrank.models.base import RankModel
from qdrank.models.registry import model_class
from qdrank.training import checkpoint as ckpt
from qdrank.training.optim import build_optimizer, clip_grad_norm, coalesce_rows
from qdrank.training.prefetch import prefetch
from qdrank.utils.io import to_jsonable
from qdrank.utils.runtime import init_distributed, resolve_device, seed_everything


def build_model(cfg: RunConfig, ds: SearchLogDataset | ShardedDataset) -> RankModel:
    seed_everything(cfg.train.seed)
    model = model_class(cfg.model_name)(ds.fmap, cfg.model)
    model.emb.set_item_tables(*ds.item_tables())
    return model


def lr_factor(t: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``t.lr`` at global step ``step``: linear warm-up over ``t.lr_warmup_epochs``
    epochs, then ``t.lr_schedule`` (constant | cosine | linear) decaying to ``t.lr_min_ratio`` at the
    end of ``t.max_epochs``. A pure function of the step, so resume needs no scheduler state."""
    total = t.max_epochs * steps_per_epoch
    warm = int(round(max(t.lr_warmup_epochs, 0.0) * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    if t.lr_schedule == "constant" or total <= warm:
        return 1.0
    frac = min(max((step - warm) / max(total - warm, 1), 0.0), 1.0)
    lo = t.lr_min_ratio
    if t.lr_schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))
    return lo + (1 - lo) * (1 - frac)  # linear


def steps_per_epoch(ds: SearchLogDataset | ShardedDataset, t: TrainConfig, world: int) -> int:
    """Training batches per rank and epoch, estimated from the split's impressions (the LR
    schedule's unit; batches hold whole requests, so the true count differs by a few)."""
    if isinstance(ds, SearchLogDataset):
        n_imp = ds.n_impressions(ds.requests_of("train"))
    else:
        n_imp = int(ds.splits["train"]["impressions"])
    n = math.ceil(n_imp / max(t.batch_size, 1) / max(world, 1))
    return max(min(n, t.max_steps_per_epoch) if t.max_steps_per_epoch else n, 1)


def embedding_parameters(model: RankModel) -> list[torch.nn.Parameter]:
    """Weights of the feature embedder's lookup tables (the rows ``train.emb_l2`` regularises)."""
    mods = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    return [m.weight for m in model.emb.modules() if isinstance(m, mods) and m.weight.requires_grad]


def add_embedding_l2(params: list[torch.nn.Parameter], l2: float) -> None:
    """Add the gradient of ``l2 / 2 * ||w_r||^2`` over the rows ``r`` this batch looked up.

    DIN's mini-batch aware regularisation: only rows with a gradient (the ids in the batch) are
    penalised, so a rare id is shrunk when it is seen instead of a dense decay of the whole table
    every step. It fights the over-fitting of id embeddings on small logs (Trivago: valid GAUC
    falls after the first epoch without it). Called after ``backward``; handles sparse gradients.
    """
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = coalesce_rows(g)
            rows = g.indices()[0]
            p.grad = torch.sparse_coo_tensor(g.indices(), g.values() + l2 * p.detach()[rows], g.shape,
                                             is_coalesced=True, check_invariants=False)
        else:
            rows = g.detach().abs().sum(-1) > 0
            g[rows] += l2 * p.detach()[rows]


AUTOCAST = {"none": None, "bf16": torch.bfloat16, "auto": None}


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CPU with AVX-512 BF16 or AMX (measured
    here: [51k, 64] x [64, 64] 4.6x faster than fp32), a CUDA device that supports bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``train.autocast`` on ``device`` -> the autocast dtype (None: full fp32). ``auto`` is bf16
    where :func:`fast_bf16`, else none (and :class:`TrainStep` keeps fp32 for a model class that
    sets ``bf16_pays = False``)."""
    if name not in AUTOCAST:
        raise ValueError(f"train.autocast={name!r}; choose one of: {', '.join(AUTOCAST)}")
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else None
    return AUTOCAST[name]


class TrainStep:
    """The inner step (forward, loss, backward, clip, update) with TrainConfig's speed switches:
    bf16 autocast (fp32 master weights; ``auto``: where the hardware has fast bf16 matmuls), ``torch.compile`` of the forward, and the optimizer of
    :func:`qdrank.training.optim.build_optimizer` (row-sparse table gradients unless ``net`` is
    data-parallel). Shared by :class:`Trainer` and ``benchmarks/bench_train.py``."""

    def __init__(self, model: RankModel, t: TrainConfig, device: torch.device, data_parallel: bool = False):
        self.autocast = autocast_dtype(t.autocast, device)
        if t.autocast == "auto" and not getattr(model, "bf16_pays", True):
            self.autocast = None  # a model that measured slower in bf16 (class attribute bf16_pays)
        self.model, self.t, self.device = model, t, device
        self.optimizer = build_optimizer(model, t, sparse_grad=not data_parallel)
        self.emb_params = embedding_parameters(model) if t.emb_l2 > 0 else []
        self.trim = True  # trim_history: drop all-padding history columns (bench_train's reference: off)
        self.set_net(model)

    def set_net(self, net: torch.nn.Module) -> None:
        """The module to call forward on (the model, or its DistributedDataParallel wrapper)."""
        self.forward = torch.compile(net, dynamic=True) if self.t.compile else net

    def __call__(self, b: Batch) -> torch.Tensor:
        """One update on batch ``b``; returns the detached loss."""
        if self.trim:
            b = trim_history(b)
        dtype = self.autocast
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = self.forward(b)
            loss, _ = self.model.loss(b, out, self.t.cvr_weight, self.t.listwise_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.emb_params:
            add_embedding_l2(self.emb_params, self.t.emb_l2)
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
        self.n_steps = steps_per_epoch(ds, t, self.ctx.world)
        self.start_epoch, self.best, self.best_epoch, self.bad_epochs = 0, -1.0, -1, 0
        self.last_trained = -1  # index of the last epoch trained (for the "converged" flag)
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
                self.last_trained = info["epoch"]
                self.best, self.best_epoch, self.bad_epochs = info["best"], info["best_epoch"], info["bad_epochs"]
                self.log(f"resuming after epoch {info['epoch']} (best valid GAUC {self.best:.4f})")
        self.net = self.model
        if self.ctx.world > 1 and self.model.gradient_trained:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
            self.step.set_net(self.net)

    def set_lr(self, factor: float) -> None:
        """Scale every parameter group's own initial rate (the table's may differ: train.embedding_lr)."""
        for g in self.optimizer.param_groups:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * factor

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
            show = t.progress and self.ctx.main  # and stderr a terminal (disable=None): logs get epoch lines only
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t.max_epochs}", disable=None if show else True,
                       unit="batch", dynamic_ncols=True)
            for i, b in enumerate(prefetch(bar, t.prefetch)):  # batches built in a worker thread, in order
                self.set_lr(lr_factor(t, epoch * self.n_steps + i, self.n_steps))
                b = b.to(self.device)
                loss = self.step(b)
                n_seen += len(b.click)
                loss_sum += float(loss.detach()) * len(b.click)
                bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}",
                                samples_s=f"{n_seen * self.ctx.world / (time.perf_counter() - t0):.0f}")
            train_time = time.perf_counter() - t0
            self.last_trained = epoch
            valid = evaluate(self.model, ds, "valid", t.eval_batch_size, self.device, self.ctx)
            score = selection_metric(valid)
            improved = score > self.best
            if improved:
                self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            else:
                self.bad_epochs += 1
            record = {"epoch": epoch, "train_loss": loss_sum / max(n_seen, 1),
                      "samples_per_s": n_seen * self.ctx.world / max(train_time, 1e-9),
                      "train_seconds": train_time, "lr_end": self.optimizer.param_groups[0]["lr"],
                      "valid": valid, "best_epoch": self.best_epoch}
            if self.ctx.main:
                if improved:
                    ckpt.save_tensors(self.run_dir / ckpt.WEIGHTS, ckpt.model_tensors(self.model))
                with open(self.run_dir / ckpt.METRICS, "a") as f:
                    f.write(json.dumps(to_jsonable(record)) + "\n")
                ckpt.save_train_state(self.run_dir, epoch, self.model, self.optimizer,
                                      {"best": self.best, "best_epoch": self.best_epoch,
                                       "bad_epochs": self.bad_epochs})
                self.log(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  valid {format_families(valid)}"
                         f"  {record['samples_per_s']:.0f} samples/s" + ("  *" if improved else ""))
            if self.ctx.world > 1:
                dist.barrier()
            if self.bad_epochs > t.patience:
                self.log(f"early stop: no validation serving GAUC gain for {self.bad_epochs} epochs")
                break
        # reload the best weights for the final report
        if (self.run_dir / ckpt.WEIGHTS).exists():
            from safetensors.torch import load_file
            self.model.load_state_dict(load_file(str(self.run_dir / ckpt.WEIGHTS), device=str(self.device)))
        last = self.last_trained
        result = {"best_epoch": self.best_epoch, "best_valid_gauc": self.best, "epochs_run": last + 1,
                  # the best epoch is the last one trained: the validation optimum may lie further on
                  "converged": bool(0 <= self.best_epoch < last),
                  "valid": evaluate(self.model, ds, "valid", t.eval_batch_size, self.device, self.ctx),
                  "test": evaluate(self.model, ds, "test", t.eval_batch_size, self.device, self.ctx),
                  "n_parameters": self.model.n_parameters()}
        if self.ctx.main:
            ckpt.write_json(self.run_dir / "result.json", result)
        return result

    def fit_baseline(self) -> dict:
        """A fitted baseline: statistics of the training split, no epochs, no optimizer."""
        t, ds = self.cfg.train, self.ds
        t0 = time.perf_counter()
        self.model.fit_data(ds, seed=t.seed)
        fit_seconds = time.perf_counter() - t0
        if self.ctx.main:
            ckpt.save_tensors(self.run_dir / ckpt.WEIGHTS, ckpt.model_tensors(self.model))
        valid = evaluate(self.model, ds, "valid", t.eval_batch_size, self.device, self.ctx)
        # fitted once: nothing left to converge
        result = {"best_epoch": 0, "best_valid_gauc": selection_metric(valid), "epochs_run": 1, "converged": True,
                  "valid": valid,
                  "test": evaluate(self.model, ds, "test", t.eval_batch_size, self.device, self.ctx),
                  "n_parameters": self.model.n_parameters(), "fit_seconds": fit_seconds,
                  "fitted": getattr(self.model, "summary", dict)()}
        if self.ctx.main:
            ckpt.write_json(self.run_dir / "result.json", result)
            self.log(f"fitted {self.cfg.model_name} in {fit_seconds:.1f}s: valid {format_families(valid)}")
        return result

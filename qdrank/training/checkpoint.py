"""Run directories and checkpoints: safetensors weights + JSON, written atomically, never pickled.

Layout of a run directory::

    config.json          the full RunConfig (model name, data/train/model keys)
    feature_map.json     vocabularies and feature layout
    model.safetensors    best weights (by validation GAUC)
    metrics.jsonl        one line per epoch
    state/train.json     resume state: epoch, best, patience, optimizer hyper-parameters
    state/epoch-K.safetensors   weights + optimizer tensors after epoch K (only the latest kept)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qdrank.config import RunConfig, from_dict
from qdrank.data.features import FeatureMap
from qdrank.models.registry import model_class
from qdrank.utils.io import atomic_output, atomic_write_json

CONFIG = "config.json"
FEATURE_MAP = "feature_map.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
STATE_DIR = "state"
STATE_JSON = "train.json"


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp))


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def save_model(run_dir: Path, model: torch.nn.Module, cfg: RunConfig, fmap: FeatureMap) -> None:
    run_dir = Path(run_dir)
    write_json(run_dir / CONFIG, cfg.to_dict())
    write_json(run_dir / FEATURE_MAP, fmap.to_dict())
    save_tensors(run_dir / WEIGHTS, model_tensors(model))


def read_run_config(run_dir: Path) -> RunConfig:
    f = Path(run_dir) / CONFIG
    if not f.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory ({CONFIG} missing); train one with "
                                "`qdrank train --data DIR --model NAME --out RUN`")
    d = json.loads(f.read_text())
    return from_dict(d["model_name"], {k: d[k] for k in ("data", "train", "model")})


def load_model(run_dir: Path, weights: str = WEIGHTS, map_location: str | torch.device = "cpu",
               model_overrides: dict | None = None):
    """-> (model, RunConfig, FeatureMap). Weights are read with safetensors: no code runs.

    ``model_overrides`` changes inference-only model keys (e.g. ``{"denoise_steps": 1}``) before the
    model is built; keys the model does not have are ignored.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if model_overrides:
        known = {k: v for k, v in model_overrides.items() if hasattr(cfg.model, k)}
        cfg.model = dataclasses.replace(cfg.model, **known)
    fmap = FeatureMap.from_dict(json.loads((run_dir / FEATURE_MAP).read_text()))
    model = model_class(cfg.model_name)(fmap, cfg.model)
    wfile = run_dir / weights
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} missing: the run has no finished epoch yet (resume it with --resume)")
    state = load_file(str(wfile), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{wfile} does not match model {cfg.model_name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.to(map_location)
    model.eval()
    return model, cfg, fmap


# ---- resume state ------------------------------------------------------------------------------
def save_train_state(run_dir: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     info: dict) -> None:
    """Tensors first (a new file per epoch), then the JSON that points at them, then prune."""
    sdir = Path(run_dir) / STATE_DIR
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"opt.{pid}.{name}"] = t
    fname = f"epoch-{epoch}.safetensors"
    save_tensors(sdir / fname, tensors)
    write_json(sdir / STATE_JSON, {"epoch": epoch, "tensors": fname, "param_groups": opt["param_groups"], **info})
    for old in sdir.glob("epoch-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)


def load_train_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    sdir = Path(run_dir) / STATE_DIR
    f = sdir / STATE_JSON
    if not f.exists():
        return None
    info = json.loads(f.read_text())
    tensors = load_file(str(sdir / info["tensors"]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return info

"""Run directories and checkpoints: safetensors weights + JSON, written atomically, never pickled,
verified by checksum on every load.

Layout of a run directory::

    config.json          the full RunConfig (model name, data/train/model keys)
    feature_map.json     vocabularies and feature layout
    model.safetensors    best weights (by validation GAUC)
    checksums.json       sha256 of each tensor file of the directory (here: model.safetensors)
    metrics.jsonl        one line per epoch
    state/train.json     resume state: epoch, best, patience, optimizer hyper-parameters
    state/epoch-K.safetensors   weights + optimizer tensors after epoch K (only the latest kept)
    state/checksums.json        sha256 of the epoch file

Why a checksum: flipped bytes in float weights load "fine" and silently change every score, and in
the item table they surface later as an IndexError or an HTTP 500. Every tensor file is hashed
when written and checked before it is read; a mismatch, a truncated or an empty file is refused
with :class:`CheckpointError`, naming the run and the file. While a file is being replaced the
manifest accepts both the old and the new hash, so a kill at any point leaves a loadable run.
Runs written before checksums existed (no ``checksums.json``) load unverified, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qdrank.config import RunConfig, from_dict
from qdrank.data.features import FeatureMap
from qdrank.models.registry import model_class
from qdrank.utils.io import atomic_output, atomic_write_json, remove_stale_temps

CONFIG = "config.json"
FEATURE_MAP = "feature_map.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
STATE_DIR = "state"
STATE_JSON = "train.json"
CHECKSUMS = "checksums.json"
_RESTORE = "retrain or restore it"


class CheckpointError(ValueError):
    """A run directory cannot be used: a file is missing, damaged or belongs to another model."""


def _rel(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- checksum manifest -------------------------------------------------------------------------
def _read_manifest(directory: Path, run_dir: Path) -> dict[str, list[str]] | None:
    """``{file name: [accepted sha256, ...]}`` of a directory, or None when it has no manifest."""
    f = directory / CHECKSUMS
    if not f.exists():
        return None
    try:
        files = json.loads(f.read_text())["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, list) and all(isinstance(h, str) for h in v) for v in files.values()):
            raise TypeError("'files' must map file names to lists of sha256 strings")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"run {run_dir}: {_rel(f, run_dir)} is damaged ({type(e).__name__}: {e}); "
                              f"{_RESTORE}") from e
    return files


def _write_manifest(directory: Path, files: dict[str, list[str]]) -> None:
    atomic_write_json(directory / CHECKSUMS, {"algorithm": "sha256", "files": dict(sorted(files.items()))})


def _set_checksums(path: Path, hashes: list[str]) -> None:
    files = _read_manifest(path.parent, path.parent) or {}
    files[path.name] = hashes
    _write_manifest(path.parent, files)


def _forget_checksums(directory: Path, names: list[str]) -> None:
    files = _read_manifest(directory, directory)
    if files and any(n in files for n in names):
        _write_manifest(directory, {k: v for k, v in files.items() if k not in names})


def verify_tensor_file(path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None) -> bool:
    """Check ``path`` against its directory's checksum manifest; raise :class:`CheckpointError` if it is
    missing or damaged. -> False when the directory has no manifest (a run from before checksums)."""
    path = Path(path)
    run_dir = Path(run_dir) if run_dir is not None else path.parent
    name = _rel(path, run_dir)
    if not path.is_file():
        raise CheckpointError(f"run {run_dir}: {name} is missing; {_RESTORE}")
    files = _read_manifest(path.parent, run_dir)
    if files is None:
        return False
    if path.name not in files:
        raise CheckpointError(f"run {run_dir}: {name} has no checksum in {_rel(path.parent / CHECKSUMS, run_dir)} "
                              f"(not written by this run); {_RESTORE}")
    if file_sha256(path) not in files[path.name]:
        what = "empty file" if path.stat().st_size == 0 else "checksum mismatch"
        raise CheckpointError(f"run {run_dir}: {name} is damaged ({what}); {_RESTORE}")
    return True


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                 run_dir: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """Verify, then read a tensor file (safetensors: no code runs). Damage of any kind, checksum or format,
    is a one-line :class:`CheckpointError`; a raw ``SafetensorError`` never escapes."""
    path = Path(path)
    run_dir = Path(run_dir) if run_dir is not None else path.parent
    if not verify_tensor_file(path, run_dir):
        warnings.warn(f"run {run_dir}: {_rel(path, run_dir)} has no checksum (written before qdrank recorded "
                      "them); loading it unverified", stacklevel=2)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"run {run_dir}: {_rel(path, run_dir)} is damaged (not a readable safetensors "
                              f"file: {first}); {_RESTORE}") from e


def read_run_json(path: Path, run_dir: Path):
    """A JSON file of a run; missing or unparsable -> CheckpointError naming the run and the file."""
    if not path.is_file():
        raise CheckpointError(f"run {run_dir}: {_rel(path, run_dir)} is missing; {_RESTORE}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"run {run_dir}: {_rel(path, run_dir)} is damaged (not valid JSON: {e}); "
                              f"{_RESTORE}") from e


def clean_run_dir(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove temp files a killed writer left in a run directory (and its state/); -> what was removed."""
    run_dir = Path(run_dir)
    return remove_stale_temps(run_dir) + remove_stale_temps(run_dir / STATE_DIR)


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a tensor file atomically and record its sha256 in the directory's ``checksums.json``.

    Order: temp file written and synced -> manifest accepts old and new hash -> file replaced ->
    manifest keeps only the new hash. A kill anywhere leaves a file whose hash is accepted.
    -> the sha256.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        files = _read_manifest(path.parent, path.parent) or {}
        if path.name in files:
            previous = files[path.name][:1]
        else:  # a file from before checksums: accept its current content while it is replaced
            previous = [file_sha256(path)] if path.is_file() else []
        _set_checksums(path, [digest, *[h for h in previous if h != digest]])
    _set_checksums(path, [digest])
    return digest


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def save_model(run_dir: Path, model: torch.nn.Module, cfg: RunConfig, fmap: FeatureMap) -> None:
    run_dir = Path(run_dir)
    write_json(run_dir / CONFIG, cfg.to_dict())
    write_json(run_dir / FEATURE_MAP, fmap.to_dict())
    save_tensors(run_dir / WEIGHTS, model_tensors(model))


def read_run_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    f = run_dir / CONFIG
    if not f.exists():
        raise CheckpointError(f"{run_dir} is not a run directory ({CONFIG} missing); train one with "
                              "`qdrank train --data DIR --model NAME --out RUN`")
    d = read_run_json(f, run_dir)
    try:
        return from_dict(d["model_name"], {k: d[k] for k in ("data", "train", "model")})
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"run {run_dir}: {CONFIG} is damaged (missing or malformed key {e}); "
                              f"{_RESTORE}") from e


def verify_run(run_dir: str | os.PathLike[str], weights: str = WEIGHTS) -> None:
    """Refuse a run that cannot be served or evaluated as trained, before anything starts: config and
    feature map readable, weights present and matching their checksum."""
    run_dir = Path(run_dir)
    read_run_config(run_dir)
    read_run_json(run_dir / FEATURE_MAP, run_dir)
    verify_tensor_file(_weights_file(run_dir, weights), run_dir)


def _weights_file(run_dir: Path, weights: str) -> Path:
    wfile = run_dir / weights
    if not wfile.exists():
        raise CheckpointError(f"run {run_dir}: {weights} missing: the run has no finished epoch yet "
                              "(resume it with `qdrank train ... --resume`)")
    return wfile


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that reports a foreign checkpoint (missing / extra keys, other shapes) as one error."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: trained with another vocabulary or model size
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{what} does not match the model: {detail}; retrain it") from e
    # buffers a model can rebuild (e.g. DiffusionGS's fixed inference noise) may be absent in older runs
    missing = [k for k in missing if k not in getattr(model, "rebuildable_state", ())]
    if missing or unexpected:
        raise CheckpointError(f"{what} does not match the model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}; retrain it")


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
    try:
        fmap = FeatureMap.from_dict(read_run_json(run_dir / FEATURE_MAP, run_dir))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"run {run_dir}: {FEATURE_MAP} is damaged (missing or malformed key {e}); "
                              f"{_RESTORE}") from e
    state = load_tensors(_weights_file(run_dir, weights), map_location, run_dir)
    model = model_class(cfg.model_name)(fmap, cfg.model)
    _load_state(model, state, f"run {run_dir}: {weights} (model {cfg.model_name})")
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
    pruned = []
    for old in sdir.glob("epoch-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)
            pruned.append(old.name)
    _forget_checksums(sdir, pruned)


def load_train_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore model and optimizer from ``state/`` (verified); None when there is nothing to resume.
    Temp files of a killed writer are removed first."""
    run_dir = Path(run_dir)
    clean_run_dir(run_dir)
    sdir = run_dir / STATE_DIR
    f = sdir / STATE_JSON
    if not f.exists():
        return None
    info = read_run_json(f, run_dir)
    if not isinstance(info, dict) or not isinstance(info.get("tensors"), str) or "param_groups" not in info:
        raise CheckpointError(f"run {run_dir}: {STATE_DIR}/{STATE_JSON} is damaged (no 'tensors' / 'param_groups'); "
                              f"{_RESTORE}")
    tensors = load_tensors(sdir / Path(info["tensors"]).name, "cpu", run_dir)
    _load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                f"run {run_dir}: {STATE_DIR}/{info['tensors']}")
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return info

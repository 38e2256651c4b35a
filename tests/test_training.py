"""Trainer: seed determinism, SIGKILL + --resume, 2-process torchrun, CLI train/evaluate, configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from qdrank.config import ConfigError, build_config
from qdrank.evaluation.evaluate import evaluate
from qdrank.training import checkpoint as ckpt
from qdrank.training.trainer import Trainer
from qdrank.utils.runtime import resolve_device

# CPU: these runs are compared bit for bit (CUDA's scatter-add kernels are not deterministic), and
# the 2-rank run must not ask a one-GPU machine for two ranks
SMALL = ["data.max_history=20", "data.query_buckets=2000", "model.dim=16", "train.batch_size=512",
         "train.progress=false", "train.device=cpu"]


def _cli(*args, env=None, **kw):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "qdrank.cli", *args], capture_output=True, text=True, env=e, **kw)


def test_same_seed_same_metrics_and_different_seed_differs(tiny_dataset, tmp_path):
    _, ds = tiny_dataset
    res = []
    for i, seed in enumerate([3, 3, 4]):
        cfg = tiny_config("din", "train.max_epochs=2", f"train.seed={seed}", "train.device=cpu")  # bit for bit
        res.append(Trainer(cfg, ds, tmp_path / f"r{i}").fit()["test"])
    assert res[0] == res[1]
    assert res[0]["serving_ctr_auc"] != res[2]["serving_ctr_auc"]


def test_training_improves_over_chance(tiny_dataset, tmp_path):
    _, ds = tiny_dataset
    cfg = tiny_config("dnn", "train.max_epochs=6", "train.lr=0.003", "train.patience=6")
    out = Trainer(cfg, ds, tmp_path / "r").fit()
    assert out["valid"]["serving_ctr_auc"] > 0.55, out["valid"]
    lines = (tmp_path / "r" / ckpt.METRICS).read_text().splitlines()
    assert len(lines) >= 1 and "valid" in json.loads(lines[0])


def test_checkpoint_round_trip_and_no_pickle(tiny_dataset, tmp_path):
    _, ds = tiny_dataset
    cfg = tiny_config("din", "train.max_epochs=1")
    tr = Trainer(cfg, ds, tmp_path / "r")
    tr.fit()
    m1 = evaluate(tr.model, ds, "test", 4096)  # on the training device (CUDA where there is one)
    model, cfg2, fmap = ckpt.load_model(tmp_path / "r")  # on the CPU
    m2 = evaluate(model, ds, "test", 4096)
    assert m1 == pytest.approx(m2, rel=1e-5, abs=1e-6, nan_ok=True) and cfg2.to_dict() == cfg.to_dict()
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert all(not f.endswith((".pt", ".pkl", ".bin")) for f in files), files


def test_existing_run_needs_resume(tiny_dataset, tmp_path):
    _, ds = tiny_dataset
    cfg = tiny_config("dnn", "train.max_epochs=1")
    Trainer(cfg, ds, tmp_path / "r").fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg, ds, tmp_path / "r")


def test_unknown_set_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown key 'model.layerz'.*valid keys"):
        build_config("dnn", overrides=["model.layerz=3"])
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        build_config("dnn", overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"train.listwise_weight must be a finite number >= 0, got -1"):
        build_config("dnn", overrides=["train.listwise_weight=-1"])
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_config("nope")


def test_device_choice_and_clear_errors(tiny_data, tmp_path, monkeypatch):
    """``auto`` takes this rank's GPU; a device the machine lacks is one line naming it, with the fix."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun --nproc_per_node 2 on a 1-GPU machine
    with pytest.raises(ValueError, match=r"cuda:1: this machine has 1 CUDA device.*--nproc_per_node at most 1"):
        resolve_device("auto")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.undo()
    if not torch.cuda.is_available():  # the CLI shows it as one line, exit 2
        r = _cli("train", "--data", str(tiny_data), "--model", "dnn", "--out", str(tmp_path / "r"),
                 "--set", "train.device=cuda:3")
        assert r.returncode == 2 and "torch sees no CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_sigkill_then_resume_matches_uninterrupted(tiny_data, tmp_path):
    args = ["train", "--data", str(tiny_data), "--model", "dnn", *sum((["--set", s] for s in SMALL), []),
            "--set", "train.max_epochs=4", "--set", "train.patience=10"]
    full = _cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    run = tmp_path / "killed"
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "qdrank.cli", *args, "--out", str(run)], env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / ckpt.STATE_DIR / ckpt.STATE_JSON
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "training finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_after = json.loads(state.read_text())["epoch"]
    assert killed_after < 3
    assert not (run / "result.json").exists()
    resumed = _cli(*args, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    a = json.loads((tmp_path / "full" / "result.json").read_text())
    b = json.loads((run / "result.json").read_text())
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]


def test_two_process_torchrun(tiny_data, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "qdrank.cli", "train", "--data",
           str(tiny_data), "--model", "din", "--out", str(out), *sum((["--set", s] for s in SMALL), []),
           "--set", "train.max_epochs=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("test CTR serving AUC") == 1  # printed once, by rank 0
    res = json.loads((out / "result.json").read_text())
    assert res["test"]["serving_ctr_n"] > 0
    lines = [json.loads(x) for x in (out / ckpt.METRICS).read_text().splitlines()]
    assert len(lines) == 2  # metrics written once per epoch, not once per rank
    model, cfg, fmap = ckpt.load_model(out)  # the checkpoint written by rank 0 loads
    assert model.n_parameters() > 0
    # 2 ranks (each scoring its own requests, metric states all-reduced) == 1 rank on the same weights
    from qdrank.data.dataset import SearchLogDataset

    ds = SearchLogDataset(tiny_data, cfg.data, fmap=fmap, log=lambda m: None)
    one = evaluate(model, ds, "test", cfg.train.eval_batch_size)
    two = res["test"]
    assert set(one) == set(two)
    for k, v in one.items():
        assert v == pytest.approx(two[k], abs=1e-9, nan_ok=True), k  # histogram counts add exactly


def test_cli_prepare_train_evaluate(tmp_path):
    d = tmp_path / "syn"
    r = _cli("data", "prepare", "synthetic", "--scale", "tiny", "--out", str(d), "--seed", "1")
    assert r.returncode == 0, r.stderr
    r = _cli("data", "inspect", str(d))
    assert r.returncode == 0 and "requests" in r.stdout and "split train" in r.stdout
    r = _cli("train", "--data", str(d), "--model", "dnn", "--out", str(tmp_path / "run"),
             *sum((["--set", s] for s in SMALL), []), "--set", "train.max_epochs=1")
    assert r.returncode == 0, r.stderr
    r = _cli("evaluate", str(tmp_path / "run"), "--split", "test")
    assert r.returncode == 0, r.stderr
    assert "serving" in r.stdout and "as_shown" in r.stdout and "ctr_auc" in r.stdout
    ev = json.loads((tmp_path / "run" / "eval_test" / "evaluation.json").read_text())
    assert {"serving_ctr_gauc", "as_shown_ctr_gauc", "oracle_serving_ctr_gauc", "serving_rel_ndcg10"} <= set(ev["metrics"])
    r = _cli("data", "validate", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr

"""Run directories that are damaged, interrupted or unwritable: refused by name with one line, never a traceback.

Covers: checksums of every tensor file (flipped float weights, flipped item table, truncated, empty, bad header,
damaged JSON, damaged resume state), the kill windows of a checkpoint write, temp files of killed writers, and
OS errors of every writing command. Tests run as root here, where permission bits do not stop writes, so an
unwritable location is a path under a regular file (fails for everyone).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from qdrank.cli import main
from qdrank.training import checkpoint as ckpt
from qdrank.training.checkpoint import CheckpointError, load_model
from qdrank.training.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
DAMAGED = r"run .*: model\.safetensors is damaged \((checksum mismatch|empty file)\); retrain or restore it"


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """A tiny dnn run with weights, resume state and data.json (two short epochs)."""
    from qdrank.data.dataset import SearchLogDataset
    from qdrank.training.trainer import Trainer

    cfg = tiny_config("dnn", "train.max_epochs=2", "train.max_steps_per_epoch=2")
    run = tmp_path_factory.mktemp("integrity") / "run"
    ds = SearchLogDataset(tiny_data, cfg.data, log=lambda m: None)
    Trainer(cfg, ds, run, log=lambda m: None).fit()
    return run


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def tensor_span(f: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``key`` inside a safetensors file (8-byte length, JSON header, data)."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def flip_byte(f: Path, at: int, mask: int = 0x40) -> None:
    raw = bytearray(f.read_bytes())
    raw[at] ^= mask
    f.write_bytes(bytes(raw))


def largest_float_tensor(f: Path) -> str:
    tensors = load_file(str(f))
    return max((k for k, v in tensors.items() if v.is_floating_point()), key=lambda k: tensors[k].numel())


def damage(f: Path, kind: str) -> None:
    if kind == "float_weights":  # exponent byte of a float32 in the middle of the largest weight
        s, e = tensor_span(f, largest_float_tensor(f))
        flip_byte(f, s + ((e - s) // 8) * 4 + 3)
    elif kind == "item_table":  # high byte of an item's feature id: a wild id, an IndexError later
        s, e = tensor_span(f, "emb.item_sparse")
        flip_byte(f, s + 8 * 3 + 6, 0x01)
    elif kind == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "empty":
        f.write_bytes(b"")
    elif kind == "header":
        flip_byte(f, 8, 0x01)  # the header's opening brace
    else:
        raise AssertionError(kind)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


KINDS = ["float_weights", "item_table", "truncated", "empty", "header"]


# ---- checksums -------------------------------------------------------------------------------------
def test_checkpoint_records_checksums(trained_run):
    files = json.loads((trained_run / ckpt.CHECKSUMS).read_text())["files"]
    assert files == {ckpt.WEIGHTS: [ckpt.file_sha256(trained_run / ckpt.WEIGHTS)]}
    sdir = trained_run / ckpt.STATE_DIR
    state = json.loads((sdir / ckpt.STATE_JSON).read_text())
    sfiles = json.loads((sdir / ckpt.CHECKSUMS).read_text())["files"]
    assert sfiles == {state["tensors"]: [ckpt.file_sha256(sdir / state["tensors"])]}  # pruned epochs forgotten
    assert sorted(p.name for p in sdir.iterdir()) == sorted([ckpt.STATE_JSON, ckpt.CHECKSUMS, state["tensors"]])


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_weights_are_refused_by_name(kind, run):
    load_model(run)  # intact copy loads
    damage(run / ckpt.WEIGHTS, kind)
    with pytest.raises(CheckpointError, match=DAMAGED):
        load_model(run)
    with pytest.raises(CheckpointError, match=DAMAGED):
        ckpt.verify_run(run)


def test_the_item_table_damage_is_silent_without_a_checksum(run):
    """Why checksums: a flipped item id is a valid safetensors file and only fails later, far away."""
    damage(run / ckpt.WEIGHTS, "item_table")
    (run / ckpt.CHECKSUMS).unlink()
    with pytest.warns(UserWarning, match="no checksum"):
        model, _, _ = load_model(run)
    assert int(model.emb.item_sparse.max()) >= model.emb.table.num_embeddings  # an id past the table


@pytest.mark.parametrize("kind", ["truncated", "empty", "header"])
def test_unverifiable_damage_never_escapes_as_safetensor_error(kind, run):
    """Without a checksum manifest (older runs) a broken file is still one CheckpointError."""
    (run / ckpt.CHECKSUMS).unlink()
    damage(run / ckpt.WEIGHTS, kind)
    with pytest.warns(UserWarning, match="no checksum"), \
            pytest.raises(CheckpointError, match=r"model\.safetensors is damaged \(not a readable safetensors"):
        load_model(run)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["evaluate", "export", "explain", "serve"])
def test_commands_refuse_a_damaged_run(command, kind, run, tmp_path, capsys, monkeypatch):
    import qdrank.serving.http as http

    def never(*a, **k):
        raise AssertionError("serve started on a damaged run")

    monkeypatch.setattr(http, "serve", never)
    damage(run / ckpt.WEIGHTS, kind)
    argv = {"evaluate": ["evaluate", run],
            "export": ["export", run, "--out", tmp_path / "m.onnx"],
            "explain": ["explain", run, "--request", "1", "--out", tmp_path / "x.png"],
            "serve": ["serve", run, "--port", "1"]}[command]
    rc, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, f"run {run}: model.safetensors is damaged", "retrain or restore it")


def test_intact_and_legacy_runs_pass_the_checks(run, tmp_path, capsys, monkeypatch):
    """The checks refuse only damage: an intact run serves, a run from before checksums exports with a
    one-line warning."""
    import qdrank.serving.http as http

    started = []
    monkeypatch.setattr(http, "serve", lambda ranker, host, port, **k: started.append((host, port)))
    rc, err = run_cli(capsys, "serve", run, "--port", "8123")
    assert rc == 0 and started == [("127.0.0.1", 8123)], err
    (run / ckpt.CHECKSUMS).unlink()
    with pytest.warns(UserWarning, match=r"model\.safetensors has no checksum"):
        rc, err = run_cli(capsys, "export", run, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert rc == 0 and (tmp_path / "m.pt").exists(), err
    import warnings

    from qdrank.cli import _one_line_warnings

    with _one_line_warnings():  # how the CLI prints it (pytest records warnings instead of printing them)
        assert warnings.formatwarning("run R: x has no checksum", UserWarning, "f.py", 1) == \
            "warning: run R: x has no checksum\n"
    assert warnings.formatwarning("m", UserWarning, "f.py", 1) != "warning: m\n"  # restored afterwards


def test_damaged_json_and_manifest_are_refused(run, capsys):
    good = (run / ckpt.CHECKSUMS).read_text()
    (run / ckpt.CHECKSUMS).write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"checksums\.json is damaged"):
        load_model(run)
    (run / ckpt.CHECKSUMS).write_text(json.dumps({"files": {}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors has no checksum"):
        load_model(run)
    (run / ckpt.CHECKSUMS).write_text(good)
    (run / ckpt.CONFIG).write_text("{\"model_name\": \"dnn\", ")
    with pytest.raises(CheckpointError, match=r"config\.json is damaged \(not valid JSON"):
        load_model(run)
    assert_one_line_error(*run_cli(capsys, "evaluate", run), "config.json is damaged")


def test_weights_of_another_model_size_are_refused(run, capsys):
    cfg = json.loads((run / ckpt.CONFIG).read_text())
    cfg["model"]["dim"] = 2 * cfg["model"]["dim"]
    (run / ckpt.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors \(model dnn\) does not match the model: .*size"):
        load_model(run)
    assert_one_line_error(*run_cli(capsys, "evaluate", run), "does not match the model", "retrain it")


def test_damaged_resume_state_is_refused(run, tiny_data, capsys):
    from qdrank.data.dataset import SearchLogDataset
    from qdrank.training.trainer import Trainer

    sdir = run / ckpt.STATE_DIR
    name = json.loads((sdir / ckpt.STATE_JSON).read_text())["tensors"]
    damage(sdir / name, "float_weights")
    cfg = tiny_config("dnn", "train.max_epochs=3", "train.max_steps_per_epoch=2")
    ds = SearchLogDataset(tiny_data, cfg.data, log=lambda m: None)
    with pytest.raises(CheckpointError, match=rf"run .*: state/{name} is damaged \(checksum mismatch\)"):
        Trainer(cfg, ds, run, resume=True, log=lambda m: None)
    rc, err = run_cli(capsys, "train", "--data", tiny_data, "--model", "dnn", "--out", run, "--resume",
                      "--set", "data.max_history=20", "--set", "data.query_buckets=2000", "--set", "model.dim=16")
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1 and f"state/{name} is damaged" in lines[0]


# ---- kill windows ------------------------------------------------------------------------------------
def test_interrupted_weight_writes_leave_a_loadable_run(run, monkeypatch):
    """Killed before the new file is in place: the old one loads; after it, the new one loads."""
    before = load_file(str(run / ckpt.WEIGHTS))
    model, _, _ = load_model(run)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    new = ckpt.model_tensors(model)
    real_replace = os.replace

    def killed_replace(src, dst):
        if str(dst).endswith(ckpt.WEIGHTS):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_tensors(run / ckpt.WEIGHTS, new)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(json.loads((run / ckpt.CHECKSUMS).read_text())["files"][ckpt.WEIGHTS]) == 2
    loaded, _, _ = load_model(run)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())

    calls = []
    real_set = ckpt._set_checksums

    def killed_after_replace(path, hashes):
        calls.append(hashes)
        if len(calls) == 2:  # the final "only the new hash" write
            raise KeyboardInterrupt
        return real_set(path, hashes)

    monkeypatch.setattr(ckpt, "_set_checksums", killed_after_replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_tensors(run / ckpt.WEIGHTS, new)
    monkeypatch.setattr(ckpt, "_set_checksums", real_set)
    loaded, _, _ = load_model(run)
    for k, v in load_file(str(run / ckpt.WEIGHTS)).items():
        assert torch.equal(v, new[k].cpu())
    assert not [f for f in run.iterdir() if ".tmp" in f.name]


# ---- temp files of killed writers ---------------------------------------------------------------------
def _killed_writer(target: Path) -> None:
    """A real process killed (SIGKILL) in the middle of an atomic write: its temp file stays behind."""
    code = ("import os, signal, sys\nfrom qdrank.utils.io import atomic_output\n"
            "with atomic_output(sys.argv[1]) as t:\n    t.write_bytes(b'x' * 4096)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr


def _temps(d: Path) -> list[str]:
    return sorted(f.name for f in d.iterdir() if ".tmp" in f.name)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_temp_files_of_killed_writers_are_removed_on_next_start(run, tmp_path, capsys):
    _killed_writer(run / ckpt.WEIGHTS)
    _killed_writer(run / ckpt.STATE_DIR / "epoch-9.safetensors")
    assert len(_temps(run)) == 1 and len(_temps(run / ckpt.STATE_DIR)) == 1
    live = run / f".metrics.jsonl.{os.getpid()}.abcdefgh.tmp.jsonl"  # a live writer's temp is kept
    live.write_text("x")
    rc, err = run_cli(capsys, "train", "--data", tmp_path / "no-data", "--model", "dnn", "--out", run, "--resume")
    assert rc == 2 and "Traceback" not in err and "removed" in err  # the data error comes after the clean-up
    assert _temps(run) == [live.name] and _temps(run / ckpt.STATE_DIR) == []
    load_model(run)

    store_dir = tmp_path / "stores"
    store_dir.mkdir()
    _killed_writer(store_dir / "s.sqlite")
    _killed_writer(store_dir / "other.sqlite")
    rc, err = run_cli(capsys, "store", "load", "--data", tmp_path / "no-data", "--store", store_dir / "s.sqlite")
    assert rc == 2 and "Traceback" not in err
    assert [n.split(".")[1] for n in _temps(store_dir)] == ["other"]  # only the store's own temps


def test_stale_temp_rules(tmp_path):
    from qdrank.utils.io import remove_stale_temps

    legacy_old = tmp_path / ".model.safetensors.ab12cd34.tmp.safetensors"  # no pid: by age
    legacy_new = tmp_path / ".config.json.zz12cd34.tmp.json"
    unrelated = [tmp_path / ".hidden", tmp_path / ".model.safetensors", tmp_path / "x.tmp", tmp_path / ".a.b.tmp"]
    for f in (legacy_old, legacy_new, *unrelated):
        f.write_text("x")
    os.utime(legacy_old, (0, 0))
    assert remove_stale_temps(tmp_path) == [legacy_old]
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(f.name for f in (legacy_new, *unrelated))
    assert remove_stale_temps(tmp_path / "missing") == []


def test_resume_cleans_temps_in_the_library_too(run):
    _killed_writer(run / ckpt.STATE_DIR / ckpt.STATE_JSON)
    assert _temps(run / ckpt.STATE_DIR)
    model, cfg, _ = load_model(run)
    opt = build_optimizer(model, cfg.train)  # the trainer's optimizer (row-wise table part included)
    assert ckpt.load_train_state(run, model, opt) is not None
    assert _temps(run / ckpt.STATE_DIR) == []


# ---- OS errors: one line, before any work -------------------------------------------------------------
@pytest.fixture
def blocked(tmp_path) -> Path:
    """A regular file: any path under it is unwritable, for root as well."""
    f = tmp_path / "file"
    f.write_text("not a directory")
    return f


def _forbid_dataset_loading(monkeypatch):
    import qdrank.data.dataset as dataset

    def never(*a, **k):
        raise AssertionError("the dataset was loaded before the output location was checked")

    monkeypatch.setattr(dataset.SearchLogDataset, "__init__", never)


@pytest.mark.parametrize("command", ["train", "evaluate", "prepare", "export-onnx", "export-torchscript",
                                     "store-load", "explain"])
def test_unwritable_output_is_one_line(command, blocked, trained_run, tiny_data, capsys, monkeypatch):
    _forbid_dataset_loading(monkeypatch)
    out = blocked / "out"
    argv = {"train": ["train", "--data", tiny_data, "--model", "dnn", "--out", out],
            "evaluate": ["evaluate", trained_run, "--out", out],
            "prepare": ["data", "prepare", "synthetic", "--scale", "tiny", "--out", out / "ds"],
            "export-onnx": ["export", trained_run, "--format", "onnx", "--out", out / "m.onnx"],
            "export-torchscript": ["export", trained_run, "--format", "torchscript", "--out", out / "m.pt"],
            "store-load": ["store", "load", "--data", tiny_data, "--store", out / "s.sqlite"],
            "explain": ["explain", trained_run, "--request", "1", "--out", out / "x.png"]}[command]
    rc, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, str(blocked), "Not a directory", "choose another location")
    assert "export failed" not in err


def test_output_that_is_a_file_is_one_line(blocked, tiny_data, capsys, monkeypatch):
    _forbid_dataset_loading(monkeypatch)
    rc, err = run_cli(capsys, "train", "--data", tiny_data, "--model", "dnn", "--out", blocked)
    assert_one_line_error(rc, err, str(blocked), "not a directory")


def test_real_process_exit_code_and_stderr(blocked, tiny_data):
    """The installed entry point as a process: exit code 2, one line on stderr, nothing on stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", "import sys; from qdrank.cli import main; sys.exit(main())",
                        "store", "load", "--data", str(tiny_data), "--store", str(blocked / "s.sqlite")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert_one_line_error(r.returncode, r.stderr, f"{blocked}: exists and is not a directory")


def test_format_error_shapes():
    import errno

    from qdrank.cli import format_error

    assert format_error(PermissionError(errno.EACCES, "Permission denied", "/x/y")) == \
        "error: /x/y: Permission denied — fix the permissions or choose another location"
    assert format_error(OSError(errno.ENOSPC, "No space left on device", "/d/f")) == \
        "error: /d/f: No space left on device — free disk space or choose another location"
    assert format_error(FileNotFoundError("trivago: no input in /q")) == "error: trivago: no input in /q"
    assert format_error(ValueError("a\n  b")) == "error: a b"


@pytest.mark.parametrize("split", ["test", "valid"])
def test_evaluate_refuses_an_empty_split(split, trained_run, tiny_data, tmp_path, capsys):
    """A split without labelled impressions: one line naming the split and the dataset, exit 2, no NaN table."""
    import pandas as pd

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    req = pd.read_parquet(data / "requests.parquet")
    req["split"] = "train"  # every request in train: valid and test are empty
    req.to_parquet(data / "requests.parquet")
    rc, err = run_cli(capsys, "evaluate", trained_run, "--data", data, "--split", split, "--out", tmp_path / "ev")
    # validation may warn about the empty splits first; the refusal is one error line
    errors = [x for x in err.splitlines() if not x.startswith("warning: ")]
    assert_one_line_error(rc, "\n".join(errors), f"split '{split}'", str(data), "empty")
    assert "nan" not in capsys.readouterr().out
    assert not (tmp_path / "ev" / "evaluation.json").exists()
    rc, _ = run_cli(capsys, "evaluate", trained_run, "--data", data, "--split", "train", "--out", tmp_path / "ev")
    assert rc == 0 and (tmp_path / "ev" / "evaluation.json").exists()  # the split that has requests evaluates

"""Export of every registered model: ONNX and TorchScript score as the model does, for history lengths and
candidate counts other than the example's; models that are not torch graphs are refused clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn

from qdrank.models.registry import available_models, model_class
from qdrank.serving.export import (
    ExportError,
    batch_inputs,
    check_exportable,
    example_batch,
    export_model,
    export_run,
    onnx_feed,
)
from qdrank.training.checkpoint import save_model

# (history length, candidates): empty history, shorter / equal / longer than the example's (5, 8), and
# longer than data.max_history (20: only the most recent are kept)
SHAPES = [(0, 1), (1, 3), (5, 8), (12, 17), (20, 2), (35, 5)]
TOL = 1e-4
FAST = {"gbdt": ("model.trees=40", "model.min_data_in_leaf=5", "model.num_threads=1")}  # a small booster


@pytest.fixture(scope="module")
def tiny_runs(tiny_dataset, tmp_path_factory):
    """One randomly initialised tiny model per registered name, saved as a run (built on first use)."""
    _, ds = tiny_dataset
    base = tmp_path_factory.mktemp("export_runs")
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cfg = tiny_config(name, "model.dim=8", *FAST.get(name, ()))
            run = base / name
            torch.manual_seed(0)
            model = model_class(name)(ds.fmap, cfg.model)
            model.emb.set_item_tables(*ds.item_tables())
            if not model.gradient_trained:  # a fitted baseline: its statistics are its weights
                model.fit_data(ds)
            with torch.no_grad():  # move zero-initialised layers away from zero: every path must matter
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            model.eval()
            save_model(run, model, cfg, ds.fmap)
            cache[name] = (model, cfg, run)
        return cache[name]

    return get


def _scorer(fmt: str, out: Path):
    """The exported file as a function Batch -> (ctr logits, cvr logits) as numpy."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return lambda b: tuple(sess.run(None, onnx_feed(sess, b)))
    m = torch.jit.load(str(out))

    def run(b):
        with torch.inference_mode():
            return tuple(x.numpy() for x in m(*batch_inputs(b)))

    return run


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", list(available_models()))
def test_export_parity_every_model(name, fmt, tiny_runs, tmp_path):
    model, cfg, run = tiny_runs(name)
    out = tmp_path / f"{name}.{fmt}"
    assert model_class(name).exportable  # every registered model is a torch graph
    assert export_run(run, fmt, out) == out  # from the saved (checksum-verified) run, default example
    assert (tmp_path / f"{name}.{fmt}.json").exists()
    assert not [f for f in tmp_path.iterdir() if ".tmp" in f.name]
    exported = _scorer(fmt, out)
    seen_lengths = set()
    for n_hist, n_cand in SHAPES:
        b = example_batch(run_fmap(run), cfg, n_candidates=n_cand, n_history=n_hist)
        seen_lengths.add(int(b.hist_len[0]))
        with torch.inference_mode():
            ref = model(b, use_position=False)
        ctr, cvr = exported(b)
        assert ctr.shape == (n_cand,) and cvr.shape == (n_cand,)
        assert np.abs(ctr - ref.ctr_logit.numpy()).max() < TOL, (n_hist, n_cand)
        assert np.abs(cvr - ref.cvr_logit.numpy()).max() < TOL, (n_hist, n_cand)
    assert seen_lengths == {0, 1, 5, 12, cfg.data.max_history}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_ifusion_export_reads_session_ids(fmt, tiny_runs, tmp_path):
    """The exported iFusion takes hist_session as an input and scores as the model does with session
    ids (the example it was traced on has none) and without."""
    import dataclasses

    from qdrank.data.batch import history_session_ordinals

    model, cfg, run = tiny_runs("ifusion")
    out = export_run(run, fmt, tmp_path / f"ifusion.{fmt}")
    exported = _scorer(fmt, out)
    for n_hist, n_cand in ((12, 5), (20, 3), (3, 2)):
        b = example_batch(run_fmap(run), cfg, n_candidates=n_cand, n_history=n_hist)
        n = int(b.hist_len[0])
        sess = b.hist_session.clone()
        sess[0, :n] = torch.from_numpy(history_session_ordinals([None] + [f"s{i // 3}" for i in range(1, n)]))
        with_ids = dataclasses.replace(b, hist_session=sess)
        with torch.inference_mode():
            ref, plain = model(with_ids, use_position=False), model(b, use_position=False)
        ctr, cvr = exported(with_ids)
        assert np.abs(ctr - ref.ctr_logit.numpy()).max() < TOL and np.abs(cvr - ref.cvr_logit.numpy()).max() < TOL
        assert np.abs(ctr - plain.ctr_logit.numpy()).max() > 10 * TOL  # the ids changed the sessions
        assert np.abs(exported(b)[0] - plain.ctr_logit.numpy()).max() < TOL


def run_fmap(run: Path):
    import json

    from qdrank.data.features import FeatureMap

    return FeatureMap.from_dict(json.loads((run / "feature_map.json").read_text()))


def test_diffusiongs_noise_is_a_stored_table(tiny_runs):
    """No generator at inference: the noise is a buffer covering every recency position, carried by the run."""
    model, cfg, run = tiny_runs("diffusiongs")
    tab = model.infer_noise_table
    assert tab.shape == (cfg.model.max_positions, cfg.model.dim)
    from qdrank.models.diffusion import fixed_noise
    from qdrank.models.diffusiongs import INFER_NOISE_SEED

    assert torch.equal(tab, fixed_noise(cfg.model.max_positions, cfg.model.dim, INFER_NOISE_SEED))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(run / "model.safetensors"))["infer_noise_table"], tab)


def test_diffusiongs_loads_runs_saved_without_the_table(tiny_runs, tmp_path):
    """A run written before the table was stored rebuilds it from the seed and scores identically."""
    import shutil

    from safetensors.torch import load_file

    from qdrank.training.checkpoint import WEIGHTS, load_model, save_tensors

    model, cfg, run = tiny_runs("diffusiongs")
    old = tmp_path / "old"
    shutil.copytree(run, old)
    state = {k: v for k, v in load_file(str(old / WEIGHTS)).items() if k != "infer_noise_table"}
    save_tensors(old / WEIGHTS, state)
    loaded, _, _ = load_model(old)
    b = example_batch(run_fmap(run), cfg, n_candidates=4, n_history=7)
    with torch.inference_mode():
        assert torch.equal(loaded(b, use_position=False).ctr_logit, model(b, use_position=False).ctr_logit)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_diffusiongs_multi_step_export_parity(fmt, tiny_runs, tmp_path):
    """The reverse chain (3 denoiser calls, posterior means between them) exports as well."""
    from qdrank.training.checkpoint import load_model

    one_step, cfg, run = tiny_runs("diffusiongs")
    out = export_run(run, fmt, tmp_path / f"m3.{fmt}", denoise_steps=3)
    model, _, fmap = load_model(run, model_overrides={"denoise_steps": 3})
    assert model.denoise_steps == 3
    exported = _scorer(fmt, out)
    for n_hist, n_cand in [(0, 2), (9, 6), (35, 11)]:
        b = example_batch(fmap, cfg, n_candidates=n_cand, n_history=n_hist)
        with torch.inference_mode():
            ref = model(b, use_position=False)
        ctr, cvr = exported(b)
        assert np.abs(ctr - ref.ctr_logit.numpy()).max() < TOL
        assert np.abs(cvr - ref.cvr_logit.numpy()).max() < TOL
        if n_hist:  # the chain matters: 3 steps score differently from 1
            with torch.inference_mode():
                assert np.abs(ctr - one_step(b, use_position=False).ctr_logit.numpy()).max() > 1e-6


class _ExternalScorer(nn.Module):
    """Stands for a model that scores outside torch (no registered model does any more)."""

    exportable = False


def test_non_graph_models_are_refused():
    with pytest.raises(ExportError, match="'external' cannot be exported.*not a torch graph"):
        check_exportable(_ExternalScorer(), "external")
    with pytest.raises(ExportError, match="'external' cannot be exported.*not a torch graph"):
        check_exportable(_ExternalScorer, "external")
    with pytest.raises(ExportError, match="not a torch graph"):
        check_exportable(object(), "x")


@pytest.mark.parametrize("attr, value, message", [("exportable", False, "'dnn' cannot be exported.*not a torch graph"),
                                                  ("extra_inputs", ("session_feature",), "extra batch inputs")])
def test_unexportable_models_are_refused_before_writing(attr, value, message, tiny_runs, tmp_path, monkeypatch):
    model, cfg, run = tiny_runs("dnn")
    monkeypatch.setattr(model, attr, value)
    with pytest.raises(ExportError, match=message):
        export_model(model, example_batch(run_fmap(run), cfg), tmp_path / "m.onnx", "onnx", "dnn")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_os_error_is_an_os_error(fmt, tiny_runs, tmp_path):
    """A path under a regular file fails for root too; the error is the OSError, not 'export failed'."""
    _, _, run = tiny_runs("dnn")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError) as e:
        export_run(run, fmt, blocker / "out" / "m.bin")
    assert not isinstance(e.value, ExportError) and "file" in str(e.value)


def test_export_disk_full_is_an_os_error(tiny_runs, tmp_path, monkeypatch):
    """An exporter that wraps the file system's error (here: ENOSPC) still surfaces the OSError."""
    import errno

    _, _, run = tiny_runs("dnn")

    def full_disk(*a, **k):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m.onnx"))
        except OSError as e:
            raise RuntimeError("serialization failed") from e

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    with pytest.raises(OSError) as e:
        export_run(run, "onnx", tmp_path / "m.onnx")
    assert e.value.errno == errno.ENOSPC and not isinstance(e.value, ExportError)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".m.onnx")]

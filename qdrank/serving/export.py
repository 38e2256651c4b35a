"""Export a run's scoring function to ONNX or TorchScript.

The exported graph is :class:`ScoringModule`: it takes the :class:`Batch` tensors as positional
inputs, in ``Batch`` field order (``request_id, user_sparse, ..., purchase``; see :data:`INPUT_NAMES`),
and returns ``(ctr_logit, cvr_logit)`` computed by ``model.forward(batch, use_position=False)``, i.e.
exactly what :class:`~qdrank.serving.ranker.Ranker` scores. Build the inputs with
:func:`qdrank.serving.ranker.encode_request`. A ``FILE.json`` beside the export lists the inputs, their
dtypes and shapes. ONNX drops inputs the graph does not use (labels, position, request id): feed only
the names ``session.get_inputs()`` lists (:func:`onnx_feed` does that).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qdrank.data.batch import TENSOR_FIELDS, Batch

INPUT_NAMES = list(TENSOR_FIELDS)
OUTPUT_NAMES = ["ctr_logit", "cvr_logit"]
FORMATS = ("onnx", "torchscript")


class ExportError(ValueError):
    pass


class ScoringModule(nn.Module):
    """Batch tensors (positional, Batch field order) -> (ctr_logit [N], cvr_logit [N])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(Batch(*tensors), use_position=False)
        return out.ctr_logit, out.cvr_logit


def batch_inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(batch, n) for n in INPUT_NAMES)


def _dynamic_axes() -> dict[str, dict[int, str]]:
    per_cand = ("cand_req", "cand_item", "cand_sparse", "cand_dense", "position", "click", "purchase")
    axes = {n: {0: "n_candidates"} for n in per_cand}
    axes.update({n: {0: "n_candidates"} for n in OUTPUT_NAMES})
    return axes


def export_model(model: nn.Module, example: Batch, out: str | Path, fmt: str, model_name: str = "model",
                 opset: int = 17) -> Path:
    """Write the scoring function of ``model`` to ``out`` (+ ``out.json`` describing the inputs)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    wrapper = ScoringModule(model).eval()
    args = batch_inputs(example)
    with warnings.catch_warnings():  # tracer/deprecation chatter; parity is what the tests check
        warnings.simplefilter("ignore")
        _export(wrapper, args, out, fmt, model_name, opset)
    return _write_meta(out, fmt, model_name, args)


def _export(wrapper: nn.Module, args: tuple, out: Path, fmt: str, model_name: str, opset: int) -> None:
    if fmt == "torchscript":
        try:
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, args, check_trace=False, strict=False)
            traced.save(str(out))
        except Exception as e:
            raise ExportError(f"TorchScript trace of model {model_name!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            with torch.no_grad():
                torch.onnx.export(wrapper, args, str(out), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                  dynamic_axes=_dynamic_axes(), opset_version=opset, dynamo=False)
        except Exception as e:
            op = _failing_op(e)
            raise ExportError(f"ONNX export of model {model_name!r} failed{' at op ' + op if op else ''}: "
                              f"{type(e).__name__}: {str(e)[:2000]}") from e


def _write_meta(out: Path, fmt: str, model_name: str, args: tuple) -> Path:
    meta = {"format": fmt, "model": model_name, "outputs": OUTPUT_NAMES,
            "inputs": [{"name": n, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                       for n, t in zip(INPUT_NAMES, args)],
            "note": "inputs are the Batch tensors of one request (R=1); the candidate axis is dynamic"}
    out.with_name(out.name + ".json").write_text(json.dumps(meta, indent=2))
    return out


def _failing_op(e: BaseException) -> str | None:
    import re

    m = re.search(r"(aten::\w+|operator \S+)", str(e))
    return m.group(1) if m else None


def onnx_feed(session, batch: Batch) -> dict[str, np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return {n: getattr(batch, n).numpy() for n in INPUT_NAMES if n in wanted}


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, denoise_steps: int = 1,
               example: Batch | None = None) -> Path:
    """Export a run directory; the example input is a real request of the run's own feature map."""
    from qdrank.training.checkpoint import load_model

    run_dir = Path(run_dir)
    model, cfg, fmap = load_model(run_dir, model_overrides={"denoise_steps": denoise_steps})
    if example is None:
        example = example_batch(fmap, cfg)
    out = Path(out) if out else run_dir / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    return export_model(model, example, out, fmt, cfg.model_name)


def example_batch(fmap, cfg, n_candidates: int = 8, n_history: int = 5) -> Batch:
    """A request of known items (and a short history) encoded with the run's feature map."""
    from qdrank.serving.ranker import RequestEncoder
    from qdrank.serving.schemas import RankRequest

    items = fmap.item_vocab[: max(n_candidates, 1)] or ["unknown"]
    users = fmap.features["user_id"].vocab if "user_id" in fmap.features else []
    req = RankRequest(
        user_id=users[0] if users else "u", query="example query", timestamp=1_000_000,
        history=[{"item_id": items[i % len(items)], "timestamp": 1_000_000 - 60 * (i + 1), "action": "click",
                  "query": "example"} for i in range(n_history)],
        candidates=[{"item_id": i} for i in items])
    return RequestEncoder(fmap, cfg.data).encode(req, None).batch

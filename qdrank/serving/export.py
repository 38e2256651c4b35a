"""Export a run's scoring function to ONNX or TorchScript.

The exported graph is :class:`ScoringModule`: it takes the :class:`Batch` tensors as positional
inputs, in ``Batch`` field order (``request_id, user_sparse, ..., purchase``; see :data:`INPUT_NAMES`),
and returns ``(ctr_logit, cvr_logit)`` computed by ``model.forward(batch, use_position=False)``, i.e.
exactly what :class:`~qdrank.serving.ranker.Ranker` scores. Build the inputs with
:func:`qdrank.serving.ranker.encode_request`. A ``FILE.json`` beside the export lists the inputs, their
dtypes and shapes. ONNX drops inputs the graph does not use (labels, position, request id): feed only
the names ``session.get_inputs()`` lists (:func:`onnx_feed` does that).

Every model of the registry exports (``gbdt``'s LightGBM trees score as tensors, see
:mod:`qdrank.models.baselines.trees`); the graph holds no random-number generator (DiffusionGS's
inference noise is a stored table), so the export scores any history length and candidate count as
the model does. A model class that is not a torch graph (``exportable = False``; none is registered
now) or that reads extra batch inputs serving cannot build is refused with
:class:`ExportError`. Files are written atomically; an OS error (read-only or full disk) is raised as
the :class:`OSError` it is, not as an export failure.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qdrank.data.batch import TENSOR_FIELDS, Batch
from qdrank.utils.io import atomic_output, atomic_write_json, ensure_writable_dir

INPUT_NAMES = list(TENSOR_FIELDS)
OUTPUT_NAMES = ["ctr_logit", "cvr_logit"]
FORMATS = ("onnx", "torchscript")


class ExportError(ValueError):
    """The model cannot be exported (not a torch graph, unsupported inputs, or an op the exporter lacks)."""


def check_exportable(model: object, model_name: str = "model") -> None:
    """Refuse, before any work, a model (instance or class) whose scoring function is not a
    self-contained torch graph."""
    cls = model if isinstance(model, type) else type(model)
    if not issubclass(cls, nn.Module) or getattr(model, "exportable", True) is False:
        raise ExportError(f"model {model_name!r} cannot be exported to ONNX / TorchScript: it is not a torch "
                          "graph (exportable = False); serve it with `qdrank serve` instead")
    extra = tuple(getattr(model, "extra_inputs", ()) or ())
    if extra:
        raise ExportError(f"model {model_name!r} cannot be exported: it reads extra batch inputs {list(extra)} "
                          "that the exported graph's inputs (the Batch fields) do not carry")


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
    check_exportable(model, model_name)
    out = Path(out)
    ensure_writable_dir(out.parent)  # an OS error is reported as one, before minutes of tracing
    model.eval()
    wrapper = ScoringModule(model).eval()
    args = batch_inputs(example)
    with warnings.catch_warnings():  # tracer/deprecation chatter; parity is what the tests check
        warnings.simplefilter("ignore")
        with atomic_output(out) as tmp:
            _export(wrapper, args, tmp, fmt, model_name, opset)
    return _write_meta(out, fmt, model_name, args)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind an exporter's exception (exporters wrap what the file system said), if any."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _export(wrapper: nn.Module, args: tuple, out: Path, fmt: str, model_name: str, opset: int) -> None:
    if fmt == "torchscript":
        try:
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, args, check_trace=False, strict=False)
            traced.save(str(out))
        except Exception as e:
            if (os_err := _os_error(e)) is not None:
                raise os_err from None
            raise ExportError(f"TorchScript trace of model {model_name!r} failed: {_one_line(e)}") from e
    else:
        try:
            with torch.no_grad():
                torch.onnx.export(wrapper, args, str(out), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                  dynamic_axes=_dynamic_axes(), opset_version=opset, dynamo=False)
        except Exception as e:
            if (os_err := _os_error(e)) is not None:
                raise os_err from None
            op = _failing_op(e)
            raise ExportError(f"ONNX export of model {model_name!r} failed{' at op ' + op if op else ''}: "
                              f"{_one_line(e)}") from e


def _write_meta(out: Path, fmt: str, model_name: str, args: tuple) -> Path:
    meta = {"format": fmt, "model": model_name, "outputs": OUTPUT_NAMES,
            "inputs": [{"name": n, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                       for n, t in zip(INPUT_NAMES, args)],
            "note": "inputs are the Batch tensors of one request (R=1); the candidate axis is dynamic"}
    atomic_write_json(out.with_name(out.name + ".json"), meta)
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
    from qdrank.models.registry import model_class
    from qdrank.training.checkpoint import load_model, read_run_config

    run_dir = Path(run_dir)
    name = read_run_config(run_dir).model_name
    check_exportable(model_class(name), name)  # before loading weights a non-graph model may not even have
    model, cfg, fmap = load_model(run_dir, model_overrides={"denoise_steps": denoise_steps})
    if example is None:
        example = example_batch(fmap, cfg)
    out = Path(out) if out else run_dir / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    return export_model(model, example, out, fmt, cfg.model_name)


def example_batch(fmap, cfg, n_candidates: int = 8, n_history: int = 5, max_history: int | None = None) -> Batch:
    """A request of known items (and a short history) encoded with the run's feature map, its history
    padded to ``max_history`` (default the run's ``data.max_history``): the width an exported graph keeps."""
    from qdrank.serving.ranker import RequestEncoder
    from qdrank.serving.schemas import RankRequest

    items = fmap.item_vocab[: max(n_candidates, 1)] or ["unknown"]
    users = fmap.features["user_id"].vocab if "user_id" in fmap.features else []
    req = RankRequest(
        user_id=users[0] if users else "u", query="example query", timestamp=1_000_000,
        history=[{"item_id": items[i % len(items)], "timestamp": 1_000_000 - 60 * (i + 1), "action": "click",
                  "query": "example"} for i in range(n_history)],
        candidates=[{"item_id": i} for i in items])
    return RequestEncoder(fmap, cfg.data, max_history).encode(req, None).batch

"""Shared fixtures: the real data beside the repo, a tiny synthetic dataset, a tiny config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(1)  # tests run beside each other on 2 cores; keep them predictable


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"real data expected at {SHARED_DATA} (CI provides ../shared/data)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A validated synthetic dataset (~1k requests, 10k impressions), built once per session."""
    from qdrank.data.sources import synthetic

    out = tmp_path_factory.mktemp("data") / "tiny"
    synthetic.prepare(None, out, seed=0, scale="tiny")
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_data):
    """(RunConfig for dnn with small sizes, loaded SearchLogDataset)."""
    from qdrank.config import build_config
    from qdrank.data.dataset import SearchLogDataset

    cfg = build_config("dnn", overrides=["data.max_history=20", "data.query_buckets=2000"])
    return cfg, SearchLogDataset(tiny_data, cfg.data, log=lambda m: None)


def tiny_config(model: str, *overrides: str):
    """A fast config for a few training steps of ``model``."""
    from qdrank.config import build_config

    return build_config(model, overrides=["data.max_history=20", "data.query_buckets=2000", "model.dim=16",
                                          "train.batch_size=512", "train.max_epochs=2", "train.progress=false",
                                          *overrides])


@pytest.fixture
def make_config():
    """Fixture form of :func:`tiny_config` (``from conftest import tiny_config`` also works)."""
    return tiny_config

"""Model registry: ``qdrank/configs/models/NAME.yaml`` names the class (``class: module:Class``) and its
defaults, so a new model is one file plus one config entry. Checkpoints store only the model name;
the class always comes from these packaged configs, never from a checkpoint file."""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

import yaml

from qdrank.configs import CONFIG_DIR

if TYPE_CHECKING:
    from qdrank.config import ModelConfig


@cache
def available_models() -> dict[str, str]:
    out = {}
    for f in sorted((CONFIG_DIR / "models").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text()) or {}
        if "class" in spec:
            out[f.stem] = spec["class"]
    return out


def model_class(name: str):
    models = available_models()
    if name not in models:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(models)}")
    module, _, cls = models[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def model_config_class(name: str) -> type[ModelConfig]:
    return model_class(name).config_class

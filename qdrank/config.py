"""Typed run configuration: YAML files under ``qdrank/configs/`` plus ``--set key=value`` overrides.

Configs flow one way: YAML -> :class:`RunConfig` -> constructors. Every key is declared in a
dataclass, so a typo in ``--set`` is an error that lists the valid keys, never a silent no-op.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qdrank.configs import CONFIG_DIR
from qdrank.models.registry import model_config_class


@dataclass
class DataConfig:
    max_history: int = 50          # L: most recent behaviours kept per request
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # by request time, when no split column
    query_buckets: int = 50_000    # hashed word/bigram vocabulary shared by queries and text features
    max_query_tokens: int = 16
    max_list_len: int = 8          # list/text features keep this many values
    min_count: int = 1             # categorical values seen fewer times in training -> OOV
    time_buckets: int = 32         # log2 buckets of (request time - behaviour time)


@dataclass
class TrainConfig:
    max_epochs: int = 10
    batch_size: int = 1024         # impressions per batch (whole requests are kept together)
    eval_batch_size: int = 8192
    lr: float = 2e-3
    lr_schedule: str = "cosine"    # constant | cosine | linear: decay over max_epochs after the warm-up
    lr_warmup_epochs: float = 0.1  # linear warm-up over this share of an epoch's steps (then the decay)
    lr_min_ratio: float = 0.05     # the decay ends at lr * lr_min_ratio
    weight_decay: float = 0.0      # dense decay of every parameter (Adam's L2)
    emb_l2: float = 0.0            # L2 on the embedding rows each batch looks up (DIN's mini-batch aware reg.)
    patience: int = 2              # early stopping on validation serving CTR GAUC
    seed: int = 0
    cvr_weight: float = 1.0
    listwise_weight: float = 0.0   # weight of the in-request softmax loss beside BCE (RankModel.loss); 0 = BCE only
    grad_clip: float = 5.0
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    num_threads: int = 0           # 0 = torch default
    max_steps_per_epoch: int = 0   # 0 = full epoch (a budget knob for quick runs)
    progress: bool = True
    # training-step speed switches (README "Training throughput"; qdrank/training/optim.py)
    embedding_optimizer: str = "adam"  # dense (Adam on the whole table) | adam (row-wise lazy) | rowwise_adagrad
    embedding_lr: float = 0.0      # learning rate of the row-wise table optimizer; 0 = lr
    autocast: str = "auto"         # auto (bf16 where the CPU/GPU has fast bf16 matmuls) | none | bf16; fp32 master weights
    compile: bool = False          # torch.compile the model's forward
    prefetch: int = 2              # batches built ahead in a background thread; 0 = inline


@dataclass
class ModelConfig:
    """Keys every model has; a model's own config subclasses this (see ``qdrank/models``)."""

    dim: int = 64
    dropout: float = 0.1
    mlp: tuple[int, ...] = (128, 64)
    position_bias: bool = True     # PAL position tower: trained with the logged position; serving and the
                                   # primary `serving` metrics score without it (see PositionBias)
    cross: bool = True             # shared cross features (candidate x query / x history, query-item
    #                                token overlap) in every neural model's head (README "Models")
    cross_history: bool = True     # with them: how often / how recently the history hit the candidate's
    #                                item and each of its side values (CrossFeatures.history_match)
    cross_category: bool = True    # with them: query x the candidate's category vector (the dataset's declared
    #                                `category`), a learned query -> category affinity
    cross_rank: bool = False       # with them: each numeric candidate / item feature's rank within the
    #                                request (price rank...), as the gbdt baseline has it; off by default: it
    #                                makes a candidate's score depend on the request's other candidates


@dataclass
class RunConfig:
    model_name: str = "dnn"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "model": dataclasses.asdict(self.model)}


LR_SCHEDULES = ("constant", "cosine", "linear")


class ConfigError(ValueError):
    pass


def _coerce(cls_field: dataclasses.Field, value: Any, where: str) -> Any:
    default = cls_field.default if cls_field.default is not dataclasses.MISSING else None
    if cls_field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = cls_field.default_factory()  # type: ignore[misc]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(default, tuple):
        if isinstance(value, int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _apply(obj: Any, values: dict, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{where}.{key}'; valid keys: {', '.join(sorted(fields))}")
        changes[key] = _coerce(fields[key], value, f"{where}.{key}")
    return dataclasses.replace(obj, **changes)


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.lr=3e-4", "model.layers=6"]`` -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in ("data", "train", "model"):
            raise ConfigError(f"--set key must be data.X, train.X or model.X, got {key!r}")
        value = yaml.safe_load(raw) if raw.strip() else ""
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def parse_key_values(pairs: list[str], flag: str = "--set") -> dict:
    """``["alpha=0.5", "formula=ctr"]`` -> ``{"alpha": 0.5, "formula": "ctr"}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path) -> dict:
    try:
        d = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config must be a mapping")
    return d


def build_config(model_name: str, config_file: Path | None = None, overrides: list[str] | dict | None = None,
                 ) -> RunConfig:
    """default.yaml < models/NAME.yaml < --config FILE < --set overrides."""

    raw = read_yaml(CONFIG_DIR / "default.yaml")
    model_file = CONFIG_DIR / "models" / f"{model_name}.yaml"
    if model_file.exists():
        raw = merge(raw, {"model": read_yaml(model_file)})
    if config_file is not None:
        raw = merge(raw, read_yaml(config_file))
    if overrides:
        raw = merge(raw, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(model_name, raw)


def from_dict(model_name: str, raw: dict) -> RunConfig:
    unknown = set(raw) - {"data", "train", "model", "model_name"}
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid: data, train, model")
    model_raw = dict(raw.get("model", {}) or {})
    model_raw.pop("class", None)
    cfg = RunConfig(model_name=model_name)
    cfg.data = _apply(DataConfig(), raw.get("data", {}) or {}, "data")
    cfg.train = _apply(TrainConfig(), raw.get("train", {}) or {}, "train")
    cfg.model = _apply(model_config_class(model_name)(), model_raw, "model")
    if cfg.train.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.train.lr_schedule!r}")
    for key in ("cvr_weight", "listwise_weight"):   # a negative loss weight would train the model backwards
        w = getattr(cfg.train, key)
        if not 0 <= w < float("inf"):
            raise ConfigError(f"train.{key} must be a finite number >= 0, got {w}")
    if len(cfg.data.split) != 3 or abs(sum(cfg.data.split) - 1) > 1e-6:
        raise ConfigError(f"data.split must be three fractions summing to 1, got {cfg.data.split}")
    return cfg

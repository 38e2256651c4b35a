"""AliExpress search impressions (anonymised features) -> canonical dataset.

Input directory: ``aliexpress_train_sample.csv`` / ``aliexpress_test_sample.csv``, or any
``*train*.csv`` / ``*test*.csv`` files (columns ``search_id, categorical_1..16, numerical_1..63,
click, conversion``). A file whose name contains ``test`` is a test file, otherwise a train file.

Derivation
----------
* One **request** per ``search_id`` per file. There is no time, so ``timestamp`` is a running
  integer in file order (train files first, then test files) and an explicit ``split`` column is
  written: the last 10% of each train file's search ids (by first appearance) -> ``valid``, the
  rest -> ``train``; test files -> ``test``.
* There are no users: ``user_id`` = the search id (int64). There is no query text (anonymised):
  ``query`` = ``""``.
* **Candidates**: one row each; ``item_id`` = ``"r<k>"`` with ``k`` a running row number across all
  files (items are anonymous, so ids never repeat); ``click``; ``purchase`` = ``conversion``;
  ``categorical_*`` (categorical) and ``numerical_*`` (numeric float) candidate features. No
  ``position`` (the shown order is not given).
* **Behaviours**: none exist; an empty behaviours table with the contract's types is written.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from qdrank.data.schema import BEHAVIORS, IMPRESSIONS, REQUESTS, DatasetError, ValidationReport
from qdrank.data.sources.common import empty_behaviors, finish, progress, require_columns

VALID_FRACTION = 0.1
LABELS = ("click", "conversion")


def _input_files(input: Path) -> list[tuple[Path, str]]:
    input = Path(input)
    files = sorted(input.glob("*.csv")) if input.is_dir() else []
    test = [p for p in files if "test" in p.name.lower()]
    train = [p for p in files if "train" in p.name.lower() and p not in test]
    if not train and not test:
        raise FileNotFoundError(f"aliexpress: no input in {input}; expected aliexpress_train_sample.csv / "
                                f"aliexpress_test_sample.csv (or any *train*.csv / *test*.csv)")
    return [(p, "train") for p in train] + [(p, "test") for p in test]


def _feature_columns(columns: pd.Index) -> tuple[list[str], list[str]]:
    cat = [c for c in columns if c.startswith("categorical_")]
    num = [c for c in columns if c.startswith("numerical_")]
    return cat, num


def prepare(input: Path, out: Path, *, seed: int = 0, valid_fraction: float = VALID_FRACTION,
            **options) -> ValidationReport:
    """Convert AliExpress CSVs in ``input`` into a canonical dataset at ``out`` (``seed`` unused:
    the conversion is deterministic)."""
    if options:
        raise TypeError(f"aliexpress: unknown options {sorted(options)}")
    started = time.perf_counter()
    frames, request_frames = [], []
    features: tuple[list[str], list[str]] | None = None
    next_request = next_row = 0
    for path, kind in progress(_input_files(input), desc="aliexpress: reading"):
        df = pd.read_csv(path)
        require_columns(df, ("search_id", *LABELS), path)
        cat, num = _feature_columns(df.columns)
        if features is None:
            features = (cat, num)
        elif (cat, num) != features:
            raise DatasetError(path.name, f"feature columns differ from the first file's ({len(cat)} categorical, "
                               f"{len(num)} numerical vs {len(features[0])}, {len(features[1])})")
        for c in ("search_id", *LABELS):
            if df[c].isna().any():
                raise DatasetError(path.name, "missing value", c, int(np.flatnonzero(df[c].isna().to_numpy())[0]))
        sids = pd.unique(df["search_id"])
        rid = next_request + np.arange(len(sids), dtype=np.int64)
        split = np.full(len(sids), kind, dtype=object)
        if kind == "train" and len(sids) > 1:
            n_valid = max(1, int(round(valid_fraction * len(sids)))) if valid_fraction > 0 else 0
            split[len(sids) - n_valid:] = "valid"
        request_frames.append(pd.DataFrame({"request_id": rid, "user_id": sids.astype(np.int64),
                                            "timestamp": rid, "split": split}))
        code = pd.Index(sids).get_indexer(df["search_id"])
        imp = pd.DataFrame({
            "request_id": rid[code],
            "item_id": [f"r{k}" for k in range(next_row, next_row + len(df))],
            "click": df["click"].astype(np.int64).to_numpy(),
            "purchase": df["conversion"].astype(np.int64).to_numpy(),
        })
        for c in cat:
            imp[c] = df[c].to_numpy()
        for c in num:
            imp[c] = df[c].astype("float64").to_numpy()
        frames.append(imp)
        next_request += len(sids)
        next_row += len(df)

    requests = pd.concat(request_frames, ignore_index=True)
    requests.insert(3, "query", "")
    requests["query"] = requests["query"].astype("str")
    requests["split"] = requests["split"].astype("str")
    impressions = pd.concat(frames, ignore_index=True)
    impressions["item_id"] = impressions["item_id"].astype("str")
    cat, num = features
    spec = {"features": {c: {"type": "categorical"} for c in cat} | {c: {"type": "numeric"} for c in num},
            "gate": []}
    tables = {REQUESTS: requests, IMPRESSIONS: impressions, BEHAVIORS: empty_behaviors("int64", "str")}
    counts = requests["split"].value_counts().to_dict()
    notes = [f"splits (requests): {counts}; no behaviours, no users, no query text in this source"]
    return finish(out, tables, spec, "aliexpress", started, notes)

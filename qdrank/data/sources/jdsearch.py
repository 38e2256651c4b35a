"""JDsearch (Liu et al., SIGIR 2023) -> canonical dataset.

Input directory: ``user_behavior_data_sample.txt`` (or the full ``release_data.txt``) and optionally
``product_meta_data_sample.txt`` (or ``product_data.txt``), as distributed at
github.com/rucliujn/JDsearch.

Derivation
----------
* One line = one user = one **request** (the user's test query). There is no user id column, so
  ``user_id = "u<k>"`` with ``k`` the 0-based data line (header excluded).
* **Query** = the term ids (joined by byte 0x18 in the file) joined by spaces.
* **Time**: ``history_time_list`` holds *intervals* (seconds) between consecutive behaviours, first
  0, with one extra last entry for the gap between the last history behaviour and the test query
  (the sample's gaps range from 0 to ~270 days, spans ~350 days: seconds). Behaviour timestamps
  are the cumulative sums, so each user's clock starts at 0 (users are NOT aligned on a common
  clock; a time-based split across users is not meaningful). The request timestamp is the
  cumulative sum including the last gap, raised to ``last history time + 1`` if that gap is 0 so the
  whole history precedes the request.
* **Candidates**: ``candidate_wid_list``; labels ``0`` none, ``1`` click, ``2`` cart, ``3`` purchase
  (written like ``1.0``). ``click`` = label >= 1; ``purchase`` = label == 3 for every candidate
  (the label records every interaction, so purchase 0 is known for unclicked ones too). A
  ``label`` candidate feature is NOT written (it would leak). The file lists positives first, so
  the file order is not the shown order: no ``position`` column is written and the candidate rows of
  each request are shuffled with ``seed``.
* **Behaviours** from the history lists: type ``CLICK`` -> ``click``, ``CART`` -> ``cart``, ``ORD`` ->
  ``purchase``, ``FLW`` -> ``follow`` (others -> ``type_<code lowercase>``); ``query`` = the history
  query's terms joined by spaces, null where the history query is ``-1`` (query-less behaviour).
* **items.parquet** from the product metadata: ``brand_id``, ``cate_id_1..4``, ``shop_id``
  (categorical), ``name`` (text of term ids). Brand and category *names* are not kept.
* No user profile or context features exist: the gate is empty. Item ids are strings.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pandas as pd

from qdrank.data.schema import BEHAVIORS, IMPRESSIONS, ITEMS, REQUESTS, DatasetError, ValidationReport
from qdrank.data.sources.common import (
    finish,
    require_columns,
    seeded_rng,
    shuffle_within_groups,
    split_explode,
)

BEHAVIOR_FILES = ("user_behavior_data_sample.txt", "release_data.txt")
PRODUCT_FILES = ("product_meta_data_sample.txt", "product_data.txt")
COLUMNS = ("query", "candidate_wid_list", "candidate_label_list", "history_qry_list", "history_wid_list",
           "history_type_list", "history_time_list")
PRODUCT_COLUMNS = ("wid", "name", "brand_id", "brand_name", "cate_id_1", "cate_name_1", "cate_id_2", "cate_name_2",
                   "cate_id_3", "cate_name_3", "cate_id_4", "cate_name_4", "shop_id")
ITEM_CATEGORICAL = ("brand_id", "cate_id_1", "cate_id_2", "cate_id_3", "cate_id_4", "shop_id")
TERM_SEP = "\x18"
TYPES = {"CLICK": "click", "CART": "cart", "ORD": "purchase", "FLW": "follow"}

SPEC = {
    "features": {c: {"type": "categorical"} for c in ITEM_CATEGORICAL} | {"name": {"type": "text"}},
    "gate": [],
}


def _read_tsv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    first = path.open(encoding="utf-8", errors="replace").readline().rstrip("\n").split("\t")
    has_header = first[0] in columns
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE,
                     header=0 if has_header else None, names=None if has_header else list(columns))
    require_columns(df, columns, path)
    return df


def _terms(s: pd.Series) -> pd.Series:
    return s.str.replace(TERM_SEP, " ", regex=False).str.strip()


def _first_existing(input: Path, names: tuple[str, ...]) -> Path | None:
    return next((input / n for n in names if (input / n).is_file()), None)


def prepare(input: Path, out: Path, *, seed: int = 0, **options) -> ValidationReport:
    """Convert JDsearch files in ``input`` into a canonical dataset at ``out`` (see module docstring)."""
    if options:
        raise TypeError(f"jdsearch: unknown options {sorted(options)}")
    started = time.perf_counter()
    input = Path(input)
    path = _first_existing(input, BEHAVIOR_FILES) if input.is_dir() else None
    if path is None:
        raise FileNotFoundError(f"jdsearch: no input in {input}; expected {' or '.join(BEHAVIOR_FILES)} "
                                f"(+ optional {' or '.join(PRODUCT_FILES)})")
    df = _read_tsv(path, COLUMNS)
    n = len(df)
    users = pd.Series([f"u{k}" for k in range(n)], dtype="str")

    # ---- history behaviours
    h_row, h_pos, h_wid, h_len = split_explode(df["history_wid_list"], "_")
    _, _, h_qry, q_len = split_explode(df["history_qry_list"], "_")
    _, _, h_type, t_len = split_explode(df["history_type_list"], "_")
    t_row, t_pos, h_gap, g_len = split_explode(df["history_time_list"], "_")
    bad = np.flatnonzero((q_len != h_len) | (t_len != h_len) | (g_len != h_len + 1))
    if len(bad):
        raise DatasetError(path.name, "history lists have inconsistent lengths (time list must be one longer)",
                           "history_time_list", int(bad[0]))
    gaps = pd.to_numeric(h_gap, errors="coerce")
    if gaps.isna().any():
        r = int(np.flatnonzero(gaps.isna().to_numpy())[0])
        raise DatasetError(path.name, "non-numeric time interval", "history_time_list", int(t_row[r]), h_gap.iloc[r])
    gaps = gaps.to_numpy().astype(np.int64)
    # cumulative time per user: cumsum over all gaps minus the cumsum at the start of each user's list
    csum = np.cumsum(gaps)
    starts = np.concatenate([[0], np.cumsum(g_len)[:-1]])
    base = np.concatenate([[0], csum])[starts]
    abs_time = csum - base[t_row]
    is_last = t_pos == g_len[t_row] - 1
    hist_time = abs_time[~is_last]  # same order as the history elements
    req_time = np.zeros(n, dtype=np.int64)
    req_time[t_row[is_last]] = abs_time[is_last]
    last_hist = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last_hist, h_row, hist_time)
    req_time = np.maximum(req_time, last_hist + 1)

    types = h_type.str.strip()
    action = types.map(TYPES)
    action = action.fillna("type_" + types.str.lower())
    qry = _terms(h_qry).where(h_qry.str.strip() != "-1")
    behaviors = pd.DataFrame({
        "user_id": users.to_numpy()[h_row],
        "item_id": h_wid.str.strip().to_numpy(),
        "timestamp": hist_time,
        "action": action.to_numpy(),
        "query": qry.to_numpy(),
    })
    for c in ("user_id", "item_id", "action", "query"):
        behaviors[c] = behaviors[c].astype("str")

    # ---- requests + candidates
    requests = pd.DataFrame({
        "request_id": np.arange(n, dtype=np.int64),
        "user_id": users,
        "timestamp": req_time,
        "query": _terms(df["query"]).astype("str"),
    })
    c_row, _, c_wid, c_len = split_explode(df["candidate_wid_list"], "_")
    l_row, _, c_lab, l_len = split_explode(df["candidate_label_list"], "_")
    bad = np.flatnonzero(c_len != l_len)
    if len(bad):
        raise DatasetError(path.name, "candidate_label_list length differs from candidate_wid_list",
                           "candidate_label_list", int(bad[0]))
    label = pd.to_numeric(c_lab, errors="coerce").to_numpy()
    bad = np.flatnonzero(~np.isin(label, (0.0, 1.0, 2.0, 3.0)))
    if len(bad):
        raise DatasetError(path.name, "label must be 0, 1, 2 or 3", "candidate_label_list", int(c_row[bad[0]]),
                           c_lab.iloc[bad[0]])
    perm = shuffle_within_groups(c_row, seeded_rng(seed, 1))
    impressions = pd.DataFrame({
        "request_id": c_row[perm],
        "item_id": c_wid.str.strip().to_numpy()[perm],
        "click": (label[perm] >= 1).astype(np.int64),
        "purchase": (label[perm] == 3).astype(np.int64),
    })
    impressions["item_id"] = impressions["item_id"].astype("str")

    tables = {REQUESTS: requests, IMPRESSIONS: impressions, BEHAVIORS: behaviors}
    notes = [f"labels: {int((label == 1).sum())} click, {int((label == 2).sum())} cart, "
             f"{int((label == 3).sum())} purchase, {int((label == 0).sum())} none; "
             f"history actions: {action.value_counts().to_dict()}"]
    meta_path = _first_existing(input, PRODUCT_FILES)
    if meta_path is not None:
        meta = _read_tsv(meta_path, PRODUCT_COLUMNS).drop_duplicates("wid", ignore_index=True)
        items = pd.DataFrame({"item_id": meta["wid"].str.strip().astype("str")})
        for c in ITEM_CATEGORICAL:
            items[c] = meta[c].astype("str")
        items["name"] = _terms(meta["name"]).astype("str")
        tables[ITEMS] = items
        known = impressions["item_id"].isin(items["item_id"]).mean()
        notes.append(f"{len(items)} products with metadata ({known:.0%} of candidates covered)")
    return finish(out, tables, SPEC, "jdsearch", started, notes)

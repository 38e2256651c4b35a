"""RecSys Challenge 2019 (trivago) session logs -> canonical dataset.

Input directory: ``trivago_val_100k.parquet`` (the shared 100k-row slice) or the public data's
``train.csv`` and/or ``test.csv`` (same columns), optionally ``item_metadata.csv``.

Derivation
----------
* **Request** = a ``clickout item`` row with a non-empty ``impressions`` list. Candidates are the
  impressions in shown order (``position`` 0-based) with ``price`` (float, from ``prices``);
  ``click`` = candidate == ``reference``. Clickouts whose reference is not among the impressions are
  dropped (counted in the printed summary); clickouts with an empty reference (the hidden targets
  of ``test.csv``) are skipped. No purchase labels exist. ``request_id`` is a running int64 in
  (timestamp, session, step) order.
* **Query** (lowercase): ``"<city> | <filter>, <filter>, ... | <latest search text>"`` where the
  search text is the reference of the session's latest ``search for destination`` /
  ``search for poi`` at or before that step (left out when it equals the city); empty segments are
  left out (so a request with no filters and no search has just the city).
* **Context features**: ``platform``, ``device``, ``city`` (categorical), ``current_filters``
  (list of the filter names).
* **Behaviours**: every item action whose reference is a numeric item id, with its real timestamp:
  ``interaction item image/info/rating/deals`` -> ``image``/``info``/``rating``/``deals`` and
  ``clickout item`` -> ``clickout`` (including the clickout that *is* a request: the loader's
  strict ``timestamp <`` history rule keeps it out of that request's own history). Behaviour
  ``query`` = the session's query context at that step (same construction as above).
  ``search for item`` rows are not logged as behaviours. Behaviour ``session`` = the row's
  ``session_id`` (the log's own sessions, which iFusion's ``session_source: auto`` uses).
* **users.parquet**: ``first_platform`` = platform of the user's first logged action.
  **items.parquet** (only with ``item_metadata.csv``): ``properties`` list feature.
* Gate: ``first_platform``, ``platform``, ``device``, ``city``. Item and user ids are strings.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from qdrank.data.schema import (
    BEHAVIORS,
    IMPRESSIONS,
    ITEMS,
    REQUESTS,
    USERS,
    DatasetError,
    ValidationReport,
)
from qdrank.data.sources.common import finish, list_column, progress, require_columns, split_explode

SLICE = "trivago_val_100k.parquet"
CSV_FILES = ("train.csv", "test.csv")
METADATA = "item_metadata.csv"
COLUMNS = ("user_id", "session_id", "timestamp", "step", "action_type", "reference", "platform", "city",
           "device", "current_filters", "impressions", "prices")
STRING_COLUMNS = tuple(c for c in COLUMNS if c not in ("timestamp", "step"))
CLICKOUT = "clickout item"
SEARCH_ACTIONS = ("search for destination", "search for poi")
ITEM_ACTIONS = {
    "interaction item image": "image",
    "interaction item info": "info",
    "interaction item rating": "rating",
    "interaction item deals": "deals",
    CLICKOUT: "clickout",
}

SPEC = {
    "features": {
        "platform": {"type": "categorical"},
        "device": {"type": "categorical"},
        "city": {"type": "categorical"},
        "current_filters": {"type": "list"},
        "price": {"type": "numeric"},
        "first_platform": {"type": "categorical"},
        "properties": {"type": "list"},
    },
    "gate": ["first_platform", "platform", "device", "city"],
}


def _input_files(input: Path) -> list[Path]:
    input = Path(input)
    if input.is_file():
        return [input]
    if (input / SLICE).is_file():
        return [input / SLICE]
    files = [input / f for f in CSV_FILES if (input / f).is_file()]
    if not files:
        raise FileNotFoundError(f"trivago: no input in {input}; expected {SLICE} or train.csv and/or test.csv")
    return files


def _read_one(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
        require_columns(df, COLUMNS, path)
        df = df[list(COLUMNS)]
    else:
        header = pd.read_csv(path, nrows=0).columns
        require_columns(header, COLUMNS, path)
        types = {c: pa.string() for c in STRING_COLUMNS} | {"timestamp": pa.int64(), "step": pa.int64()}
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            include_columns=list(COLUMNS), column_types=types, strings_can_be_null=True))
        df = table.to_pandas()
    for c in STRING_COLUMNS:
        df[c] = df[c].astype("str").fillna("")
    for c in ("timestamp", "step"):
        if df[c].isna().any():
            raise DatasetError(path.name, "missing value", c, int(np.flatnonzero(df[c].isna().to_numpy())[0]))
        df[c] = df[c].astype("int64")
    return df


def read_logs(input: Path) -> pd.DataFrame:
    """All session rows from the input files, sorted by (session_id, step)."""
    frames = [_read_one(p) for p in progress(_input_files(input), desc="trivago: reading")]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df.sort_values(["session_id", "step"], kind="stable", ignore_index=True)


def session_query(df: pd.DataFrame) -> pd.Series:
    """The documented query text of every row (city | filters | latest session search), lowercase."""
    search = df["reference"].where(df["action_type"].isin(SEARCH_ACTIONS))
    search = search.groupby(df["session_id"], sort=False).ffill().fillna("")
    search = search.where(search.str.lower() != df["city"].str.lower(), "")
    filters = df["current_filters"].str.replace("|", ", ", regex=False)
    q = df["city"] + (" | " + filters).where(filters != "", "") + (" | " + search).where(search != "", "")
    return q.str.lower()


def _items(input: Path) -> pd.DataFrame | None:
    path = Path(input) / METADATA
    if Path(input).is_file() or not path.is_file():
        return None
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    require_columns(meta, ("item_id", "properties"), path)
    meta = meta.drop_duplicates("item_id", ignore_index=True)
    return pd.DataFrame({"item_id": meta["item_id"].astype("str"),
                         "properties": list_column(meta["properties"], "|")})


def prepare(input: Path, out: Path, *, seed: int = 0, **options) -> ValidationReport:
    """Convert trivago logs in ``input`` into a canonical dataset at ``out`` (``seed`` is unused:
    the conversion is deterministic)."""
    if options:
        raise TypeError(f"trivago: unknown options {sorted(options)}")
    started = time.perf_counter()
    df = read_logs(input)
    numeric_ref = df["reference"].str.fullmatch(r"\d+")
    need_query = (df["action_type"].isin(ITEM_ACTIONS) & numeric_ref).to_numpy()
    query = session_query(df)

    # ---- requests + impressions
    is_click = (df["action_type"] == CLICKOUT) & (df["impressions"] != "")
    no_ref = int((is_click & (df["reference"] == "")).sum())
    co = df[is_click & (df["reference"] != "")]
    parent, pos, items, n_imp = split_explode(co["impressions"], "|")
    p_parent, _, prices, n_price = split_explode(co["prices"], "|")
    price = np.full(len(parent), np.nan)
    same_len = n_imp == n_price
    price[same_len[parent]] = pd.to_numeric(prices, errors="coerce").to_numpy(dtype=float)[same_len[p_parent]]
    ref = co["reference"].to_numpy(dtype=object)
    click = (items.to_numpy(dtype=object) == ref[parent]).astype(np.int64)
    imp = pd.DataFrame({"parent": parent, "item_id": items, "position": pos, "click": click, "price": price})
    dup = imp.duplicated(["parent", "item_id"]).to_numpy()
    n_dup = int(dup.sum())
    imp = imp[~dup]
    n_clicks = np.bincount(imp["parent"].to_numpy(), weights=imp["click"].to_numpy(), minlength=len(co))
    keep = n_clicks > 0
    n_not_shown = int((~keep).sum())

    co = co.assign(_parent=np.arange(len(co)), query=query[co.index])[keep]
    co = co.sort_values(["timestamp", "session_id", "step"], kind="stable")
    rid = np.full(len(keep), -1, dtype=np.int64)
    rid[co["_parent"].to_numpy()] = np.arange(len(co), dtype=np.int64)
    requests = pd.DataFrame({
        "request_id": rid[co["_parent"].to_numpy()],
        "user_id": co["user_id"].to_numpy(),
        "timestamp": co["timestamp"].to_numpy(),
        "query": co["query"].to_numpy(),
        "platform": co["platform"].to_numpy(),
        "device": co["device"].to_numpy(),
        "city": co["city"].to_numpy(),
    })
    requests["current_filters"] = list_column(co["current_filters"], "|").reset_index(drop=True)
    for c in ("user_id", "query", "platform", "device", "city"):
        requests[c] = requests[c].astype("str")
    imp = imp[keep[imp["parent"].to_numpy()]]
    imp.insert(0, "request_id", rid[imp.pop("parent").to_numpy()])
    impressions = imp.sort_values(["request_id", "position"], kind="stable", ignore_index=True)

    # ---- behaviours
    b = df[need_query]
    behaviors = pd.DataFrame({
        "user_id": b["user_id"].to_numpy(),
        "item_id": b["reference"].to_numpy(),
        "timestamp": b["timestamp"].to_numpy(),
        "action": b["action_type"].map(ITEM_ACTIONS).to_numpy(),
        "query": query[b.index].to_numpy(),
        "session": b["session_id"].to_numpy(),
        "_step": b["step"].to_numpy(),
    })
    behaviors = behaviors.sort_values(["user_id", "timestamp", "session", "_step"], kind="stable",
                                      ignore_index=True).drop(columns=["_step"])
    for c in ("user_id", "item_id", "action", "query", "session"):
        behaviors[c] = behaviors[c].astype("str")

    # ---- users / items
    first = df.sort_values(["user_id", "timestamp", "step"], kind="stable").drop_duplicates("user_id")
    users = pd.DataFrame({"user_id": first["user_id"].astype("str").to_numpy(),
                          "first_platform": first["platform"].astype("str").to_numpy()})
    tables = {REQUESTS: requests, IMPRESSIONS: impressions, BEHAVIORS: behaviors, USERS: users}
    spec = {"features": dict(SPEC["features"]), "gate": list(SPEC["gate"])}
    items = _items(input)
    if items is not None:
        tables[ITEMS] = items
    else:
        del spec["features"]["properties"]
    notes = [f"dropped {n_not_shown:,} clickouts whose reference is not among the impressions",
             f"skipped {no_ref:,} clickouts with an empty reference (test targets)"]
    if n_dup:
        notes.append(f"removed {n_dup:,} repeated items inside one impression list (kept the first)")
    return finish(out, tables, spec, "trivago", started, notes)

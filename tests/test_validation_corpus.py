"""A corpus of corrupted datasets: each is a small valid dataset with one mistake, and each has its
verdict (refused with a message naming file and column, or accepted with a warning naming them).

The verdicts are the documented ones (README "Validation"): what can only be a mistake is refused,
what is merely suspicious is warned about.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from qdrank.config import DataConfig
from qdrank.data import schema
from qdrank.data.schema import DatasetError, validate_dataset

REQ, IMP, BEH, ITEMS, USERS = (schema.REQUESTS, schema.IMPRESSIONS, schema.BEHAVIORS, schema.ITEMS,
                               schema.USERS)
T0 = 1_700_000_000
N_REQ = 40


def clean() -> tuple[dict[str, pd.DataFrame], dict]:
    """A valid dataset using every part of the format: 4 users, 40 requests an hour apart, 3
    candidates each (one clicked, purchases known on clicks), histories, items, users, a spec."""
    k = np.arange(N_REQ)
    req = pd.DataFrame({
        "request_id": 100 + k, "user_id": [f"u{i % 4}" for i in k], "timestamp": T0 + 3600 * k,
        "query": [["red shoes", "phone", "", "lamp"][i % 4] for i in k],
        "device": [["mobile", "desktop"][i % 2] for i in k],
        "filters": [[["cheap"], [], ["cheap", "new"]][i % 3] for i in k],
    })
    rows = []
    for i in k:
        for j in range(3):
            clicked = int(j == i % 3)
            rows.append((100 + i, f"i{(3 * i + j) % 10}", j, clicked, float(i % 2) if clicked else None,
                         10.0 + 1.5 * ((3 * i + j) % 10)))
    imp = pd.DataFrame(rows, columns=["request_id", "item_id", "position", "click", "purchase", "price"])
    clicks = imp[imp["click"] == 1].merge(req[["request_id", "user_id", "timestamp", "query"]], on="request_id")
    views = pd.DataFrame({"user_id": [f"u{u}" for u in range(4) for _ in range(3)],
                          "item_id": [f"i{(u + m) % 10}" for u in range(4) for m in range(3)],
                          "timestamp": [T0 - 1000 * (m + 1) for _ in range(4) for m in range(3)],
                          "action": "view", "query": "shoes"})
    beh = pd.concat([views, clicks[["user_id", "item_id", "timestamp"]].assign(action="click",
                                                                                query=clicks["query"])],
                    ignore_index=True)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(10)], "category": [f"c{i % 3}" for i in range(10)],
                          "title": [f"item number {i}" for i in range(10)]})
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(4)], "age": ["18-24", "25-34", "35-44", "25-34"]})
    spec = {"features": {"price": {"type": "numeric"}, "filters": {"type": "list"}, "title": {"type": "text"},
                         "category": {"type": "categorical"}, "age": {"type": "categorical"},
                         "device": {"type": "categorical"}},
            "gate": ["age", "device"], "category": "category"}
    return {REQ: req, IMP: imp, BEH: beh, ITEMS: items, USERS: users}, spec


def write(path: Path, tables: dict[str, pd.DataFrame], spec: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        df.to_parquet(path / name, index=False)
    if spec is not None and "_raw" in spec:  # a corruption of the file itself
        (path / schema.SPEC).write_bytes(spec["_raw"])
    elif spec is not None:
        (path / schema.SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---- corruptions: each edits (tables, spec) in place ------------------------------------------
Fix = Callable[[dict[str, pd.DataFrame], dict], object]


def col(table: str, name: str, fn) -> Fix:
    """Replace column ``name`` of ``table`` by ``fn(df)``."""
    def apply(t, s):
        t[table] = t[table].assign(**{name: fn(t[table])})
    return apply


def spec_edit(fn) -> Fix:
    return lambda t, s: fn(s)


def rows(table: str, keep) -> Fix:
    def apply(t, s):
        t[table] = t[table][keep(t[table])].reset_index(drop=True)
    return apply


def both(*fixes: Fix) -> Fix:
    def apply(t, s):
        for f in fixes:
            f(t, s)
    return apply


def rename_key(old: str, new: str) -> Fix:
    def apply(t, s):
        s[new] = s.pop(old)
    return apply


LONG_ID = "u" * 300
SPLIT = ["train"] * 32 + ["valid"] * 4 + ["test"] * 4

# (name, corruption, verdict, substrings of the error / of one warning)
REFUSED = [
    ("requests in ms, behaviours in s", col(REQ, "timestamp", lambda d: d.timestamp * 1000),
     [REQ, "'timestamp'", "1,000x larger", "different time units", "label leak"]),
    ("behaviours in kiloseconds (pandas 3 // 10**9)", col(BEH, "timestamp", lambda d: d.timestamp // 1000),
     [REQ, "'timestamp'", "than those of behaviors.parquet", "different time units"]),
    ("both tables in ms", both(col(REQ, "timestamp", lambda d: d.timestamp * 1000),
                               col(BEH, "timestamp", lambda d: d.timestamp * 1000)),
     [REQ, "'timestamp'", "row 0", "milliseconds", "unix seconds"]),
    ("both tables in ns", both(col(REQ, "timestamp", lambda d: d.timestamp * 10**9),
                               col(BEH, "timestamp", lambda d: d.timestamp * 10**9)),
     [REQ, "'timestamp'", "nanoseconds"]),
    ("timestamps as datetimes", col(REQ, "timestamp", lambda d: pd.to_datetime(d.timestamp, unit="s")),
     [REQ, "'timestamp'", "expected int64", "pd.Timedelta"]),
    ("dataset.yaml not UTF-8", spec_edit(lambda s: s.update(_raw=b"features:\n  price: {type: numeric} # \xff\n")),
     [schema.SPEC, "cannot be read", "UnicodeDecodeError", "UTF-8"]),
    ("dataset.yaml is not YAML", spec_edit(lambda s: s.update(_raw=b"features: [price: {type\n")),
     [schema.SPEC, "not valid YAML"]),
    ("dataset.yaml not a mapping", spec_edit(lambda s: s.update(_raw=b"- price\n")),
     [schema.SPEC, "must be a mapping"]),
    ("dataset.yaml 'featurs:'", rename_key("features", "featurs"),
     [schema.SPEC, "'featurs'", "valid keys: features, gate, category"]),
    ("dataset.yaml 'gates:'", rename_key("gate", "gates"), [schema.SPEC, "'gates'", "valid keys"]),
    ("feature declaration key typo", spec_edit(lambda s: s["features"].update(price={"typ": "numeric"})),
     [schema.SPEC, "'typ'", "feature 'price'", "valid keys: type, role"]),
    ("unknown feature type", spec_edit(lambda s: s["features"].update(price={"type": "float"})),
     [schema.SPEC, "price", "type must be one of"]),
    ("unknown role", spec_edit(lambda s: s["features"].update(price={"type": "numeric", "role": "candidat"})),
     [schema.SPEC, "price", "role must be one of"]),
    ("declared feature without column", spec_edit(lambda s: s["features"].update(pricee={"type": "numeric"})),
     [schema.SPEC, "'pricee'", "no table has a column"]),
    ("reserved column declared as feature", spec_edit(lambda s: s["features"].update(click={"type": "numeric"})),
     [schema.SPEC, "'click'", "reserved column of impressions.parquet"]),
    ("gate names unknown feature", spec_edit(lambda s: s.update(gate=["age", "devise"])),
     [schema.SPEC, "gate", "devise"]),
    ("category names no feature", spec_edit(lambda s: s.update(category="categroy")),
     [schema.SPEC, "'categroy'", "not an item feature", "category"]),
    ("category names a context feature", spec_edit(lambda s: s.update(category="device")),
     [schema.SPEC, "'device'", "not an item feature"]),
    ("category names a text feature", spec_edit(lambda s: s.update(category="title")),
     [schema.SPEC, "'title'", "expected categorical or list"]),
    ("list feature stored as strings", col(REQ, "filters", lambda d: d.filters.map("|".join)),
     [REQ, "'filters'", "not lists", "str.split"]),
    ("list column declared categorical", spec_edit(lambda s: s["features"].update(filters={"type": "categorical"})),
     [REQ, "'filters'", "holds lists", "type: list"]),
    ("junk strings in a numeric column", col(IMP, "price", lambda d: d.price.map(str).where(d.index % 7 != 3, "n/a")),
     [IMP, "'price'", "row 3", "'n/a'", "non-numeric"]),
    ("all-inf numeric column", col(IMP, "price", lambda d: np.full(len(d), np.inf)),
     [IMP, "'price'", "no finite value"]),
    ("struct feature", col(REQ, "geo", lambda d: [{"lat": 1.0, "lon": 2.0}] * len(d)),
     [REQ, "'geo'", "unsupported type", "type: ignore"]),
    ("same feature name in two tables", col(USERS, "device", lambda d: "mobile"),
     ["'device'", "used by two tables"]),
    ("negative position", col(IMP, "position", lambda d: d.position.where(d.index != 4, -5)),
     [IMP, "'position'", "row 4", "-5", "negative"]),
    ("position 10^12", col(IMP, "position", lambda d: d.position.where(d.index != 5, 10**12)),
     [IMP, "'position'", "row 5", "larger than 1,000,000"]),
    ("float positions with NaN", col(IMP, "position", lambda d: d.position.where(d.index != 2, np.nan)),
     [IMP, "'position'", "expected int64", "Int64"]),
    ("purchase without click", col(IMP, "purchase", lambda d: d.purchase.where(d.index != 1, 1.0)),
     [IMP, "'purchase'", "row 1", "click 0"]),
    ("clicks stored as strings", col(IMP, "click", lambda d: d.click.map(str)),
     [IMP, "'click'", "labels stored as", "expected integers 0/1", "astype"]),
    ("purchases stored as strings", col(IMP, "purchase", lambda d: d.purchase.map(lambda v: None if pd.isna(v) else str(v))),
     [IMP, "'purchase'", "labels stored as"]),
    ("no unclicked impressions", rows(IMP, lambda d: d.click == 1),
     [IMP, "'click'", "every impression has click=1"]),
    ("no clicks at all", both(col(IMP, "click", lambda d: 0), col(IMP, "purchase", lambda d: None)),
     [IMP, "'click'", "every impression has click=0"]),
    ("empty impressions", rows(IMP, lambda d: d.index < 0), [IMP, "has no rows"]),
    ("empty requests", both(rows(REQ, lambda d: d.index < 0), rows(IMP, lambda d: d.index < 0)), [REQ, "has no rows"]),
    ("user id longer than serving accepts", both(*(col(t, "user_id", lambda d: d.user_id.replace("u1", LONG_ID))
                                                   for t in (REQ, BEH, USERS))),
     [REQ, "'user_id'", "row 1", "300 characters", f"{schema.MAX_ID_CHARS}", "serving could never accept"]),
    ("item id longer than serving accepts", both(*(col(t, "item_id", lambda d: d.item_id.replace("i2", "i" * 257))
                                                   for t in (IMP, BEH, ITEMS))),
     [IMP, "'item_id'", "257 characters"]),
    ("empty item id", both(*(col(t, "item_id", lambda d: d.item_id.replace("i3", "")) for t in (IMP, BEH, ITEMS))),
     [IMP, "'item_id'", "empty string"]),
    ("empty action", col(BEH, "action", lambda d: d.action.where(d.index != 0, "")),
     [BEH, "'action'", "row 0", "empty string"]),
    ("duplicate request id", col(REQ, "request_id", lambda d: d.request_id.where(d.index != 7, 100)),
     [REQ, "'request_id'", "row 7", "duplicate"]),
    ("impression of unknown request", col(IMP, "request_id", lambda d: d.request_id.where(d.index != 9, 999)),
     [IMP, "'request_id'", "row 9", "unknown request"]),
]

WARNED = [
    ("behaviours after the last request", col(BEH, "timestamp", lambda d: d.timestamp + 10**8),
     [BEH, "'timestamp'", "later than the last request", "never enter a history"]),
    ("timestamps in the far future", both(col(REQ, "timestamp", lambda d: d.timestamp + 200 * 31_556_952),
                                          col(BEH, "timestamp", lambda d: d.timestamp + 200 * 31_556_952)),
     [REQ, "'timestamp'", "in the future", "latest: year 22"]),
    ("empty valid split (split column)", col(REQ, "split", lambda d: ["train"] * 36 + ["test"] * 4),
     [REQ, "'split'", "valid split is empty", "from the split column"]),
    ("empty test split (split column)", col(REQ, "split", lambda d: ["train"] * 36 + ["valid"] * 4),
     [REQ, "'split'", "test split is empty"]),
    ("empty train and valid splits (time split, one timestamp)", both(
        col(REQ, "timestamp", lambda d: T0 + 3600 * N_REQ), col(BEH, "timestamp", lambda d: d.timestamp.clip(upper=T0))),
     [REQ, "'timestamp'", "train split is empty", "time split 0.8/0.1/0.1 of 1 distinct"]),
    ("a single training request", col(REQ, "split", lambda d: ["train"] + ["valid"] * 20 + ["test"] * 19),
     [REQ, "train split holds a single request"]),
    ("valid split without clicks", both(col(REQ, "split", lambda d: SPLIT),
                                        col(IMP, "click", lambda d: d.click.where(d.request_id < 132, 0)),
                                        col(IMP, "purchase", lambda d: d.purchase.where(d.request_id < 132, None))),
     [IMP, "'click'", "of the valid split has click=0", "AUC is undefined"]),
    ("label-only column (dwell time on clicks only)", col(IMP, "dwell_s", lambda d: np.where(d.click == 1, 30.0, np.nan)),
     [IMP, "'dwell_s'", "clicked impressions only", "label-only"]),
    ("label-only column (order value on purchases only)",
     col(IMP, "order_value", lambda d: np.where(d.purchase == 1, 99.0, np.nan)),
     [IMP, "'order_value'", "purchased impressions only", "label-only"]),
    ("copy of the click label", col(IMP, "was_clicked", lambda d: d.click.map({0: "no", 1: "yes"})),
     [IMP, "'was_clicked'", "copy of the click label"]),
    ("NaN-only numeric column", col(IMP, "price", lambda d: np.nan),
     [IMP, "'price'", "holds no value", "type: ignore"]),
    ("some inf values", col(IMP, "price", lambda d: d.price.where(d.index != 6, -np.inf)),
     [IMP, "'price'", "row 6", "+/-inf"]),
    ("user ids formatted differently in behaviours", col(BEH, "user_id", lambda d: "user_" + d.user_id.str[1:]),
     [BEH, "'user_id'", "no value matches a user_id of requests.parquet", "no request has a history"]),
    ("item ids formatted differently in items.parquet", col(ITEMS, "item_id", lambda d: "item_" + d.item_id.str[1:]),
     [ITEMS, "'item_id'", "no value matches", "never reach a candidate"]),
    ("user ids formatted differently in users.parquet", col(USERS, "user_id", lambda d: d.user_id.str.upper()),
     [USERS, "'user_id'", "no value matches", "profiles never reach a request"]),
    ("sentinel value in a numeric column", col(IMP, "price", lambda d: d.price.where(d.index != 8, -1e300)),
     [IMP, "'price'", "row 8", "magnitude >= 1e+15", "swamp"]),
    ("duplicate impressions", col(IMP, "item_id", lambda d: d.item_id.where(d.index != 1, d.item_id.iloc[0])),
     [IMP, "'item_id'", "row 1", "repeat an item"]),
    ("requests without impressions", rows(IMP, lambda d: d.request_id != 110),
     [REQ, "'request_id'", "1 requests have no impressions"]),
]


def test_corpus_is_large_enough():
    assert len(REFUSED) + len(WARNED) >= 30
    assert len({n for n, *_ in REFUSED + WARNED}) == len(REFUSED) + len(WARNED)


def test_clean_dataset_passes_without_warning(tmp_path):
    t, spec = clean()
    rep = validate_dataset(write(tmp_path / "d", t, spec))
    assert rep.warnings == []
    assert (rep.n_requests, rep.n_impressions) == (N_REQ, 3 * N_REQ) and rep.has_purchase


def corrupted(tmp_path: Path, fix: Fix) -> Path:
    t, spec = clean()
    fix(t, spec)
    return write(tmp_path / "d", t, spec)


@pytest.mark.parametrize("name,fix,expected", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(tmp_path, name, fix, expected):
    with pytest.raises(DatasetError) as e:
        validate_dataset(corrupted(tmp_path, fix))
    msg = str(e.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("name,fix,expected", WARNED, ids=[c[0] for c in WARNED])
def test_warned(tmp_path, name, fix, expected):
    rep = validate_dataset(corrupted(tmp_path, fix))
    hits = [w for w in rep.warnings if all(p in w for p in expected)]
    assert hits, (expected, rep.warnings)


# ---- training refuses errors and empty splits; a bad category is caught before explain -------------
@pytest.mark.parametrize("name,fix,expected", REFUSED, ids=[c[0] for c in REFUSED])
def test_training_refuses_every_refused_dataset(tmp_path, name, fix, expected):
    """The loader behind train/evaluate/explain raises the same error as `qdrank data validate`."""
    from qdrank.data.dataset import SearchLogDataset

    with pytest.raises(DatasetError) as e:
        SearchLogDataset(corrupted(tmp_path, fix), DataConfig(), log=lambda m: None)
    assert all(part in str(e.value) for part in expected), str(e.value)


@pytest.mark.parametrize("name", ["empty valid split (split column)", "empty test split (split column)",
                                  "empty train and valid splits (time split, one timestamp)",
                                  "a single training request"])
def test_training_refuses_missing_split(tmp_path, name):
    from qdrank.data.dataset import SearchLogDataset

    fix = next(f for n, f, _ in WARNED if n == name)
    with pytest.raises(DatasetError, match=r"requests\.parquet.* split holds [01] request.*training needs"):
        SearchLogDataset(corrupted(tmp_path, fix), DataConfig(), log=lambda m: None)


def test_training_split_check_uses_the_configured_fractions(tmp_path):
    from qdrank.data.dataset import SearchLogDataset

    d = write(tmp_path / "d", *clean())
    ds = SearchLogDataset(d, DataConfig(split=(0.5, 0.25, 0.25)), log=lambda m: None)
    assert [len(ds.requests_of(s)) for s in ("train", "valid", "test")] == [20, 10, 10]
    with pytest.raises(DatasetError, match="the valid split holds 0 requests"):
        SearchLogDataset(d, DataConfig(split=(0.99, 0.0, 0.01)), log=lambda m: None)


def test_explain_labels_survive_a_stale_category(tiny_dataset):
    """A checkpoint whose category is not an item feature labels items by id instead of a KeyError."""
    import torch

    from qdrank.evaluation.explain import _item_labels

    fmap = dataclasses.replace(tiny_dataset[1].fmap, has_category="no_such_feature")
    assert _item_labels(fmap, None, torch.tensor([2, 3])) == fmap.item_vocab[:2]


# ---- the command line: one line, no traceback ----------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdrank.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(p: subprocess.CompletedProcess, *parts: str) -> None:
    assert p.returncode in (1, 2), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_cli_validate(tmp_path):
    good = write(tmp_path / "good", *clean())
    p = cli("data", "validate", str(good))
    assert p.returncode == 0 and "warning" not in p.stdout + p.stderr, p.stdout + p.stderr
    bad = corrupted(tmp_path / "bad", next(f for n, f, _ in REFUSED if n == "requests in ms, behaviours in s"))
    assert_one_line_error(cli("data", "validate", str(bad)), "requests.parquet", "'timestamp'", "fix:")


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``qdrank.cli.main`` in process (a subprocess per case costs seconds of imports)."""
    from qdrank.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_validate_prints_warnings(tmp_path, capsys):
    warned = corrupted(tmp_path, next(f for n, f, _ in WARNED if n == "copy of the click label"))
    rc, out, err = run_main(capsys, "data", "validate", str(warned))
    assert rc == 0 and "warning: impressions.parquet, column 'was_clicked'" in out


@pytest.mark.parametrize("name", ["empty impressions", "clicks stored as strings", "category names no feature"])
def test_cli_inspect_never_tracebacks(tmp_path, capsys, name):
    d = corrupted(tmp_path, next(f for n, f, _ in REFUSED if n == name))
    rc, out, err = run_main(capsys, "data", "inspect", str(d))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_inspect_counts_clean_dataset(tmp_path):
    from qdrank.data.inspect import format_inspection, inspect_dataset

    d = inspect_dataset(write(tmp_path / "d", *clean()))
    assert d["split"] == {"train": 32, "valid": 4, "test": 4} and d["positives"]["click"] == N_REQ
    assert d["warnings"] == [] and "split train 32" in format_inspection(d)


def test_cli_train_refuses_empty_split(tmp_path):
    d = corrupted(tmp_path / "d", next(f for n, f, _ in WARNED if n == "empty valid split (split column)"))
    p = cli("train", "--data", str(d), "--model", "dnn", "--out", str(tmp_path / "run"))
    p.stderr = "\n".join(line for line in p.stderr.splitlines() if not line.startswith("warning: "))
    assert_one_line_error(p, "requests.parquet", "valid split holds 0 requests")
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---- streaming: a dataset in many row groups (read in many batches) gets the verdict of one -------
def verdict(d: Path) -> tuple:
    try:
        r = validate_dataset(d)
    except DatasetError as e:
        return "refused", str(e)
    return "accepted", r.warnings, r.n_requests, r.n_impressions, r.n_behaviors, r.has_purchase


def in_row_groups(d: Path, rows: int) -> Path:
    """Rewrite every table of ``d`` in row groups of ``rows`` rows."""
    for f in d.glob("*.parquet"):
        t = pq.read_table(f)
        pq.write_table(t, f, row_group_size=rows)
        assert pq.ParquetFile(f).num_row_groups == max(1, -(-t.num_rows // rows))
    return d


@pytest.mark.parametrize("name,fix", [(n, f) for n, f, _ in REFUSED + WARNED], ids=[c[0] for c in REFUSED + WARNED])
def test_many_row_groups_give_the_verdict_of_one(tmp_path, monkeypatch, name, fix):
    """Same error message (row included) or the same warnings, read in batches of 7 rows from row
    groups of 5 rows as in one batch from one row group."""
    d = corrupted(tmp_path, fix)
    one = verdict(d)
    monkeypatch.setattr(schema, "BATCH_ROWS", 7)
    assert verdict(in_row_groups(d, 5)) == one


LATER = [  # (table, column, edit, parts of the error): the offending row lies in a later row group
    (IMP, "request_id", lambda d: d.request_id.where(d.index != 100, 999), ["row 100", "value 999", "unknown request"]),
    (REQ, "request_id", lambda d: d.request_id.where(d.index != 37, 100), ["row 37", "duplicate"]),
    (IMP, "position", lambda d: d.position.where(d.index != 117, -2), ["row 117", "negative"]),
    (BEH, "action", lambda d: d.action.where(d.index != 50, ""), ["row 50", "empty string"]),
    (IMP, "price", lambda d: d.price.map(str).where(d.index != 90, "n/a"), ["row 90", "'n/a'", "(1 such rows)"]),
]


@pytest.mark.parametrize("table,column,edit,parts", LATER, ids=[f"{t}:{c}" for t, c, *_ in LATER])
def test_error_in_a_later_row_group_names_its_row(tmp_path, monkeypatch, table, column, edit, parts):
    d = in_row_groups(corrupted(tmp_path, col(table, column, edit)), 16)
    monkeypatch.setattr(schema, "BATCH_ROWS", 8)
    with pytest.raises(DatasetError) as e:
        validate_dataset(d)
    for part in [table, f"'{column}'", *parts]:
        assert part in str(e.value), (part, str(e.value))


def test_warnings_count_rows_over_every_batch(tmp_path, monkeypatch):
    """Counts add up over batches; a repeat straddling a batch boundary (rows 15 and 16, one
    request) is found; the first offending row is named."""
    fix = both(col(IMP, "price", lambda d: d.price.where(~d.index.isin([20, 110]), np.inf)),
               col(IMP, "item_id", lambda d: d.item_id.where(d.index != 16, d.item_id.iloc[15])))
    d = in_row_groups(corrupted(tmp_path, fix), 16)
    monkeypatch.setattr(schema, "BATCH_ROWS", 8)
    w = validate_dataset(d).warnings
    assert any("'price', row 20" in x and "2 values are +/-inf" in x for x in w), w
    assert any("'item_id', row 16" in x and "1 impressions repeat an item" in x for x in w), w


def test_repeats_in_impressions_not_grouped_by_request(tmp_path, monkeypatch):
    """Impressions in any order (a request's rows apart): the repeat check still finds every repeat
    and the first one, as pandas' duplicated() names them."""
    def shuffle(t, s):
        imp = t[IMP].assign(item_id=t[IMP].item_id.where(~t[IMP].index.isin([4, 61]), t[IMP].item_id.shift(1)))
        t[IMP] = imp.sample(frac=1, random_state=3).reset_index(drop=True)

    d = in_row_groups(corrupted(tmp_path, shuffle), 16)
    imp = pd.read_parquet(d / IMP)
    dup = imp.duplicated(["request_id", "item_id"]).to_numpy()
    monkeypatch.setattr(schema, "BATCH_ROWS", 8)
    w = [x for x in validate_dataset(d).warnings if "repeat an item" in x]
    assert w and f"row {np.flatnonzero(dup)[0]} " in w[0] and f"{dup.sum()} impressions repeat" in w[0], w


@pytest.mark.parametrize("pandas_metadata,shown", [(True, "(value -1)"), (False, "(value -1.0)")])
def test_value_named_as_the_whole_column_shows_it(tmp_path, monkeypatch, pandas_metadata, shown):
    """An int column with a null is float64 in pandas unless the file's pandas metadata makes it
    Int64: the value in the message is the whole column's, not that of a null-free batch."""
    d = corrupted(tmp_path, col(IMP, "position", lambda d: d.position.astype("Int64").where(d.index != 3, pd.NA)
                                .where(d.index != 70, -1)))
    if not pandas_metadata:
        pq.write_table(pq.read_table(d / IMP).replace_schema_metadata(None), d / IMP)
    monkeypatch.setattr(schema, "BATCH_ROWS", 8)
    with pytest.raises(DatasetError, match=rf"'position', row 70 {re.escape(shown)}: position negative"):
        validate_dataset(in_row_groups(d, 16))

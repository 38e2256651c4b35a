"""Every rule of the dataset format fails with a message naming file, column and row."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdrank.data import schema
from qdrank.data.schema import DatasetError, validate_dataset, write_dataset


def good_tables() -> dict[str, pd.DataFrame]:
    req = pd.DataFrame({"request_id": [1, 2, 3], "user_id": ["a", "b", "a"], "timestamp": [100, 200, 300],
                        "query": ["red shoes", "", "phone"], "device": ["m", "d", "m"]})
    imp = pd.DataFrame({"request_id": [1, 1, 2, 2, 3, 3], "item_id": ["x", "y", "x", "z", "y", "z"],
                        "position": [0, 1, 0, 1, 0, 1], "click": [1, 0, 0, 1, 1, 0],
                        "purchase": [1.0, None, None, 0.0, 0.0, None], "price": [1.0, 2.0, 1.0, 3.0, 2.0, 3.0]})
    beh = pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "z"], "timestamp": [50, 100, 150],
                        "action": ["click", "click", "purchase"], "query": ["shoes", "red shoes", None]})
    return {"requests.parquet": req, "impressions.parquet": imp, "behaviors.parquet": beh}


def write_raw(path: Path, tables: dict[str, pd.DataFrame]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        df.to_parquet(path / name, index=False)
    return path


def test_good_dataset_validates(tmp_path):
    rep = validate_dataset(write_raw(tmp_path / "d", good_tables()))
    assert (rep.n_requests, rep.n_impressions, rep.n_behaviors) == (3, 6, 3)
    assert rep.has_purchase and not rep.has_split


def _mutate(table, fn):
    t = good_tables()
    t[table] = fn(t[table].copy())
    return t


CASES = [
    ("missing table", lambda: {k: v for k, v in good_tables().items() if k != "behaviors.parquet"},
     ["behaviors.parquet", "missing"]),
    ("missing column", lambda: _mutate("requests.parquet", lambda d: d.drop(columns=["query"])),
     ["requests.parquet", "'query'", "missing"]),
    ("float timestamps", lambda: _mutate("requests.parquet", lambda d: d.assign(timestamp=d.timestamp + 0.5)),
     ["requests.parquet", "'timestamp'", "int64"]),
    ("string request id", lambda: _mutate("requests.parquet", lambda d: d.assign(request_id=d.request_id.astype(str))),
     ["requests.parquet", "'request_id'"]),
    ("duplicate request_id", lambda: _mutate("requests.parquet", lambda d: d.assign(request_id=[1, 2, 2])),
     ["requests.parquet", "'request_id'", "row 2", "duplicate"]),
    ("null click", lambda: _mutate("impressions.parquet", lambda d: d.assign(click=[1, 0, None, 1, 1, 0])),
     ["impressions.parquet", "'click'", "row 2", "null"]),
    ("click not 0/1", lambda: _mutate("impressions.parquet", lambda d: d.assign(click=[1, 0, 2, 1, 1, 0])),
     ["impressions.parquet", "'click'", "row 2", "0 or 1"]),
    ("purchase not 0/1", lambda: _mutate("impressions.parquet", lambda d: d.assign(purchase=[1, 0, 0, 0, 5, 0])),
     ["impressions.parquet", "'purchase'", "row 4"]),
    ("unknown request", lambda: _mutate("impressions.parquet", lambda d: d.assign(request_id=[1, 1, 2, 2, 3, 9])),
     ["impressions.parquet", "'request_id'", "row 5", "unknown request"]),
    ("null user", lambda: _mutate("behaviors.parquet", lambda d: d.assign(user_id=["a", None, "b"])),
     ["behaviors.parquet", "'user_id'", "row 1"]),
    ("behaviour timestamps not integers", lambda: _mutate("behaviors.parquet", lambda d: d.assign(timestamp=["1", "2", "3"])),
     ["behaviors.parquet", "'timestamp'"]),
    ("user id types differ", lambda: _mutate("behaviors.parquet", lambda d: d.assign(user_id=[1, 1, 2])),
     ["behaviors.parquet", "'user_id'", "would not join"]),
    ("bad split", lambda: _mutate("requests.parquet", lambda d: d.assign(split=["train", "dev", "test"])),
     ["requests.parquet", "'split'", "row 1", "'dev'"]),
    ("float session ids", lambda: _mutate("behaviors.parquet", lambda d: d.assign(session=[None, 1.0, 2.5])),
     ["behaviors.parquet", "'session'", "row 1", "expected int64 or string", "astype('Int64')"]),
    ("list session ids", lambda: _mutate("behaviors.parquet", lambda d: d.assign(session=[["a"], ["b"], None])),
     ["behaviors.parquet", "'session'", "row 0", "expected int64 or string"]),
    ("empty session id", lambda: _mutate("behaviors.parquet", lambda d: d.assign(session=["s1", "", None])),
     ["behaviors.parquet", "'session'", "row 1", "empty string", "null for an unknown session"]),
    ("session id too long", lambda: _mutate("behaviors.parquet", lambda d: d.assign(session=["s", None, "x" * 300])),
     ["behaviors.parquet", "'session'", "row 2", "300 characters"]),
]


@pytest.mark.parametrize("session", [pd.array([7, None, 7], dtype="Int64"), ["s1", None, "s2"], [None, None, None]],
                         ids=["int-with-nulls", "str-with-nulls", "all-null"])
def test_session_column_is_optional_and_nullable(tmp_path, session):
    t = _mutate("behaviors.parquet", lambda d: d.assign(session=session))
    rep = validate_dataset(write_raw(tmp_path / "d", t))
    assert rep.n_behaviors == 3 and not [w for w in rep.warnings if "session" in w]


@pytest.mark.parametrize("name,make,expected", CASES, ids=[c[0] for c in CASES])
def test_each_violation_names_file_column_row(tmp_path, name, make, expected):
    d = write_raw(tmp_path / "d", make())
    with pytest.raises(DatasetError) as e:
        validate_dataset(d)
    for part in expected:
        assert part in str(e.value), (part, str(e.value))


def test_not_parquet_is_named(tmp_path):
    d = write_raw(tmp_path / "d", good_tables())
    (d / "impressions.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="impressions.parquet.*cannot be read as Parquet"):
        validate_dataset(d)


def test_bad_write_leaves_nothing_behind(tmp_path):
    out = tmp_path / "ds"
    bad = _mutate("impressions.parquet", lambda d: d.assign(click=[1, 0, 7, 1, 1, 0]))
    with pytest.raises(DatasetError):
        write_dataset(out, bad)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_dataset(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, good_tables())
    before = pd.read_parquet(out / "requests.parquet")
    bad = _mutate("requests.parquet", lambda d: d.assign(request_id=[1, 1, 1]))
    with pytest.raises(DatasetError):
        write_dataset(out, bad)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "requests.parquet"), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    shutil.rmtree(out)


def test_bad_dataset_yaml_is_named(tmp_path):
    d = write_raw(tmp_path / "d", good_tables())
    (d / "dataset.yaml").write_text("features:\n  device: {type: blob}\n")
    with pytest.raises(DatasetError, match="dataset.yaml.*device.*type must be one of"):
        validate_dataset(d)


def test_streamed_median_equals_numpy(monkeypatch):
    """The timestamp median behind the time-unit check, found by selection passes over batches
    (without holding the column), equals numpy's: odd and even counts, ties, the int64 range."""
    monkeypatch.setattr(schema, "BATCH_ROWS", 50)
    rng = np.random.default_rng(0)
    cases = [rng.integers(-2**62, 2**62, 1001), rng.integers(0, 5, 2000), np.full(300, 7),
             1_700_000_000 + rng.integers(0, 10**6, 1500), np.array([3]), np.array([-(2**63), 2**63 - 1])]
    for v in cases:
        clock = schema._Clock("t", 0.0, lambda v=v: (v[i:i + 37] for i in range(0, len(v), 37)))
        for i in range(0, len(v), 37):
            clock.add(i, v[i:i + 37])
        assert clock.median() == float(np.median(v)), v[:5]

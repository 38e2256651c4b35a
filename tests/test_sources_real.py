"""Converters from the real shared data (../shared/data) to the canonical format.

The data files exist on every development machine and in CI: a missing file is a failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdrank.data.schema import DatasetError, validate_dataset
from qdrank.data.sources import SOURCES, prepare_source

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = {
    "trivago": ["trivago_val_100k.parquet"],
    "movielens": ["ml-100k.inter", "ml-100k.item", "ml-100k.user"],
    "jdsearch": ["user_behavior_data_sample.txt", "product_meta_data_sample.txt"],
    "aliexpress": ["aliexpress_train_sample.csv", "aliexpress_test_sample.csv"],
}
FOLDER = {"trivago": "trivago", "movielens": "movielens-100k", "jdsearch": "jdsearch", "aliexpress": "aliexpress"}


def source_dir(name: str) -> Path:
    d = DATA / FOLDER[name]
    for f in FILES[name]:
        assert (d / f).is_file(), f"shared data file missing: {d / f}"
    return d


def read(path: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_parquet(p) for p in path.glob("*.parquet")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Every source converted once with seed 0 (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name in FILES:
        out[name] = root / name
        prepare_source(name, source_dir(name), out[name], seed=0)
    return out


def assert_same_dataset(a: Path, b: Path) -> None:
    ta, tb = read(a), read(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], obj=name)
    assert (a / "dataset.yaml").read_text() == (b / "dataset.yaml").read_text()


# ----------------------------------------------------------------------------- trivago

def test_trivago_counts(converted):
    rep = validate_dataset(converted["trivago"])
    t = read(converted["trivago"])
    req, imp, beh = t["requests"], t["impressions"], t["behaviors"]
    assert 13_000 < rep.n_requests < 13_600  # 13,597 clickouts, 1 with its reference not shown
    assert 20 < len(imp) / len(req) < 26
    assert (imp.groupby("request_id")["click"].sum() == 1).all()
    assert req["request_id"].is_unique and set(imp["request_id"]) == set(req["request_id"])
    assert (imp.groupby("request_id")["position"].min() == 0).all()
    assert imp["price"].notna().all() and (imp["price"] > 0).all()
    assert set(beh["action"]) == {"image", "info", "rating", "deals", "clickout"}
    assert beh["item_id"].str.fullmatch(r"\d+").all()
    assert req["query"].str.len().gt(0).all() and (req["query"] == req["query"].str.lower()).all()
    assert len(t["users"]) == 6593 and set(req["user_id"]) <= set(t["users"]["user_id"])
    assert isinstance(req["current_filters"].iloc[0], np.ndarray)
    assert req["current_filters"].map(len).gt(0).any()


def test_trivago_no_history_leak(converted):
    """Each request's own clickout is logged at exactly the request's timestamp (so the loader's
    strict ``<`` rule keeps it out of the request's history), with the source's real timestamps."""
    t = read(converted["trivago"])
    req, imp, beh = t["requests"], t["impressions"], t["behaviors"]
    clicked = imp.loc[imp["click"] == 1, ["request_id", "item_id"]]
    r = req[["request_id", "user_id", "timestamp"]].merge(clicked, on="request_id")
    clickouts = beh[beh["action"] == "clickout"]
    own = r.merge(clickouts, on=["user_id", "item_id", "timestamp"], how="left", indicator=True)
    assert (own["_merge"] == "both").groupby(own["request_id"]).any().all()
    # no behaviour is shifted: every (user, timestamp) exists in the source log
    src = pd.read_parquet(source_dir("trivago") / "trivago_val_100k.parquet", columns=["user_id", "timestamp"])
    keys = set(zip(src["user_id"], src["timestamp"], strict=True))
    assert all(k in keys for k in zip(beh["user_id"], beh["timestamp"], strict=True))


def test_trivago_sessions_as_given(converted):
    """Behaviours carry the log's session_id as ``session``, and histories are cut by it."""
    from conftest import tiny_config

    from qdrank.data.dataset import SearchLogDataset

    beh = read(converted["trivago"])["behaviors"]
    assert beh["session"].notna().all()
    src = pd.read_parquet(source_dir("trivago") / "trivago_val_100k.parquet",
                          columns=["user_id", "session_id", "timestamp", "reference"])
    keys = set(zip(src["user_id"], src["session_id"], src["timestamp"], src["reference"], strict=True))
    assert all(k in keys for k in zip(beh["user_id"], beh["session"], beh["timestamp"], beh["item_id"], strict=True))
    assert beh.groupby("user_id")["session"].nunique().max() > 1
    ds = SearchLogDataset(converted["trivago"], tiny_config("ifusion").data, log=lambda m: None)
    assert "session" not in ds.fmap.features
    b = ds.make_batch(ds.requests_of("test"))
    assert bool((b.hist_session[b.hist_mask] >= 0).all()) and int(b.hist_session.max()) >= 1


def test_trivago_missing_column_is_named(tmp_path):
    df = pd.read_parquet(source_dir("trivago") / "trivago_val_100k.parquet").drop(columns=["prices"])
    bad = tmp_path / "in"
    bad.mkdir()
    df.head(100).to_parquet(bad / "trivago_val_100k.parquet")
    with pytest.raises(DatasetError, match="prices"):
        prepare_source("trivago", bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- movielens

def test_movielens_counts(converted):
    validate_dataset(converted["movielens"])
    t = read(converted["movielens"])
    req, imp, beh, items, users = t["requests"], t["impressions"], t["behaviors"], t["items"], t["users"]
    assert req["user_id"].nunique() == 943 and len(users) == 943
    assert len(req) == 100_000 - 943 * 5
    assert len(beh) == 100_000 and set(beh["action"]) == {"rate_high", "rate_low"}
    assert (imp.groupby("request_id").size() == 21).all()
    assert (imp.groupby("request_id")["click"].sum() == 1).all()
    assert imp.loc[imp["click"] == 0, "purchase"].isna().all()
    assert imp.loc[imp["click"] == 1, "purchase"].notna().all()
    assert 0.4 < imp.loc[imp["click"] == 1, "purchase"].mean() < 0.7
    # positions are shuffled: the clicked movie is not always first
    assert imp.loc[imp["click"] == 1, "position"].nunique() == 21
    # negatives: never rated by the user; mostly (80% drawn + catalogue draws that happen to match)
    # of the query genre, drawn by popularity: neither the genre nor popularity separates the positive
    m = imp.merge(req[["request_id", "user_id", "query"]], on="request_id").merge(items[["item_id", "genres"]])
    neg = m[m["click"] == 0]
    rated = set(zip(beh["user_id"], beh["item_id"], strict=True))
    assert not any(k in rated for k in zip(neg["user_id"], neg["item_id"], strict=True))
    share = np.mean([q in {g.lower() for g in gs} for q, gs in zip(neg["query"], neg["genres"], strict=True)])
    assert 0.8 <= share < 0.9
    pos = m[m["click"] == 1]
    assert all(q in {g.lower() for g in gs} for q, gs in zip(pos["query"], pos["genres"], strict=True))
    assert popularity_auc(m, beh) < 0.6
    assert set(users["gender"]) == {"M", "F"} and users["age"].str.fullmatch(r"\d+-\d+").all()


def popularity_auc(m: pd.DataFrame, beh: pd.DataFrame) -> float:
    """AUC of the movie's number of ratings for telling the rated movie from the negatives."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(m["click"], m["item_id"].map(beh.groupby("item_id").size())))


def test_movielens_uniform_negatives(tmp_path):
    """``negatives=uniform`` keeps the earlier sampling: half the genre, uniform, popularity a label proxy."""
    prepare_source("movielens", source_dir("movielens"), tmp_path / "u", seed=0, negatives="uniform",
                   max_requests=3000)
    t = read(tmp_path / "u")
    m = t["impressions"].merge(t["requests"][["request_id", "query"]], on="request_id").merge(
        t["items"][["item_id", "genres"]])
    neg = m[m["click"] == 0]
    share = np.mean([q in {g.lower() for g in gs} for q, gs in zip(neg["query"], neg["genres"], strict=True)])
    assert 0.5 <= share < 0.75
    assert popularity_auc(m, t["behaviors"]) > 0.75
    with pytest.raises(ValueError, match="negatives"):
        prepare_source("movielens", source_dir("movielens"), tmp_path / "x", negatives="random")


def test_movielens_options_and_seed(converted, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    opts = dict(requests_per_user=3, max_requests=1000, n_negatives=10)
    prepare_source("movielens", source_dir("movielens"), a, seed=7, **opts)
    prepare_source("movielens", source_dir("movielens"), b, seed=7, **opts)
    prepare_source("movielens", source_dir("movielens"), c, seed=8, **opts)
    assert_same_dataset(a, b)
    ra, rc = read(a)["impressions"], read(c)["impressions"]
    assert len(read(a)["requests"]) == 1000 and (ra.groupby("request_id").size() == 11).all()
    assert not ra.equals(rc)


def test_movielens_grouplens_originals(tmp_path):
    """The GroupLens u.data/u.item/u.user layout converts too (built here from the RecBole files)."""
    src = source_dir("movielens")
    inter = pd.read_csv(src / "ml-100k.inter", sep="\t").head(3000)
    inter.to_csv(tmp_path / "u.data", sep="\t", header=False, index=False)
    item = pd.read_csv(src / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
              "War", "Western"]
    lines = []
    for iid, title, year, cls in item.itertuples(index=False):
        flags = ["1" if g in cls.split() else "0" for g in genres]
        lines.append("|".join([iid, f"{title} ({year})", f"01-Jan-{year}", "", "http://x", *flags]))
    (tmp_path / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1", errors="replace")
    user = pd.read_csv(src / "ml-100k.user", sep="\t", dtype=str)
    user.to_csv(tmp_path / "u.user", sep="|", header=False, index=False)
    rep = prepare_source("movielens", tmp_path, tmp_path / "out", n_negatives=4)
    assert rep.n_behaviors == 3000 and rep.n_requests > 0
    items = pd.read_parquet(tmp_path / "out" / "items.parquet")
    toy = items[items["item_id"] == 1].iloc[0]
    assert toy["title"] == "Toy Story" and toy["year"] == "1995" and list(toy["genres"]) == [
        "Animation", "Children's", "Comedy"]


# ----------------------------------------------------------------------------- jdsearch

def test_jdsearch_counts(converted):
    validate_dataset(converted["jdsearch"])
    t = read(converted["jdsearch"])
    req, imp, beh, items = t["requests"], t["impressions"], t["behaviors"], t["items"]
    assert len(req) == 3 and list(req["user_id"]) == ["u0", "u1", "u2"]
    assert 80 <= imp.groupby("request_id").size().mean() <= 95
    assert imp.groupby("request_id")["click"].sum().tolist() == [1, 2, 2]
    assert imp["purchase"].sum() == 0 and "position" not in imp.columns
    # the file lists positives first; the converter shuffles them away from the front
    assert not (imp.groupby("request_id")["click"].first() == 1).all()
    assert set(beh["action"]) == {"click", "cart", "purchase"}
    assert beh["query"].isna().any() and beh["query"].dropna().str.fullmatch(r"[\d ]+").all()
    assert "\x18" not in "".join(req["query"]) and req["query"].str.contains(" ").all()
    last = beh.groupby("user_id")["timestamp"].max()
    assert (req.set_index("user_id")["timestamp"] > last).all()
    assert len(items) == 409 and items["name"].str.contains(" ").all()


def test_jdsearch_seed(converted, tmp_path):
    prepare_source("jdsearch", source_dir("jdsearch"), tmp_path / "a", seed=0)
    assert_same_dataset(converted["jdsearch"], tmp_path / "a")
    prepare_source("jdsearch", source_dir("jdsearch"), tmp_path / "b", seed=1)
    assert not read(tmp_path / "a")["impressions"].equals(read(tmp_path / "b")["impressions"])


# ----------------------------------------------------------------------------- aliexpress

def test_aliexpress_counts(converted):
    rep = validate_dataset(converted["aliexpress"])
    t = read(converted["aliexpress"])
    req, imp, beh = t["requests"], t["impressions"], t["behaviors"]
    assert len(imp) == 120 and rep.has_split and rep.has_purchase
    assert set(req["split"]) == {"train", "valid", "test"}
    assert (req["split"] == "test").sum() == 10 and (req["split"] == "valid").sum() == 4
    assert (req["query"] == "").all() and imp["item_id"].is_unique
    assert len(beh) == 0 and str(beh["timestamp"].dtype) == "int64"
    assert len([c for c in imp.columns if c.startswith("numerical_")]) == 63
    src = pd.concat([pd.read_csv(source_dir("aliexpress") / f) for f in FILES["aliexpress"]])
    assert imp["purchase"].sum() == src["conversion"].sum() > 0 and imp["click"].sum() == src["click"].sum()
    assert (imp["purchase"] <= imp["click"]).all()


# ----------------------------------------------------------------------------- all / registry

def test_same_seed_same_output_trivago_aliexpress(converted, tmp_path):
    for name in ("trivago", "aliexpress"):
        prepare_source(name, source_dir(name), tmp_path / name, seed=0)
        assert_same_dataset(converted[name], tmp_path / name)


def test_spec_declares_every_feature(converted):
    from qdrank.data.schema import RESERVED, load_spec

    for name, path in converted.items():
        spec = load_spec(path)
        for p in path.glob("*.parquet"):
            cols = pd.read_parquet(p).columns
            extra = [c for c in cols if c not in RESERVED[p.name]]
            assert all(c in spec["features"] for c in extra), (name, p.name, extra)
        assert all(g in spec["features"] for g in spec.get("gate", [])), name


def test_registry_errors(tmp_path):
    assert {"trivago", "movielens", "jdsearch", "aliexpress", "synthetic"} <= set(SOURCES)
    with pytest.raises(ValueError, match="aliexpress.*jdsearch.*movielens"):
        prepare_source("nope", tmp_path, tmp_path / "out")
    for name, expected in (("trivago", "trivago_val_100k.parquet"), ("movielens", "u.data"),
                           ("jdsearch", "user_behavior_data_sample.txt"), ("aliexpress", "train")):
        with pytest.raises(FileNotFoundError, match=expected):
            prepare_source(name, tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_source("trivago", tmp_path / "missing", tmp_path / "out")


def test_trivago_csv_layout(tmp_path):
    """The full data's train.csv/test.csv (+ item_metadata.csv) layout: test targets are skipped."""
    df = pd.read_parquet(source_dir("trivago") / "trivago_val_100k.parquet").head(4000)
    sessions = df["session_id"].unique()
    test = df[df["session_id"].isin(sessions[::2])].copy()
    last_click = test[test["action_type"] == "clickout item"].groupby("session_id").tail(1).index
    test.loc[last_click, "reference"] = None  # the hidden targets of test.csv
    df[~df["session_id"].isin(sessions[::2])].to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    items = pd.DataFrame({"item_id": ["5967314", "913787"], "properties": ["Wifi|Pool", ""]})
    items.to_csv(tmp_path / "item_metadata.csv", index=False)
    rep = prepare_source("trivago", tmp_path, tmp_path / "out")
    n_clickouts = int((df["action_type"] == "clickout item").sum())
    assert 0 < rep.n_requests <= n_clickouts - len(last_click)
    t = read(tmp_path / "out")
    assert (t["impressions"].groupby("request_id")["click"].sum() == 1).all()
    assert [list(p) for p in t["items"]["properties"]] == [["Wifi", "Pool"], []]


def test_real_data_warnings_are_deserved(converted):
    """Validation warns on the real data only where the data really has the problem: the jdsearch
    sample's 3 requests leave the valid split empty, and the AliExpress sample's training rows are
    all clicked (so a model can only learn 'everything is clicked' from them)."""
    warnings = {name: validate_dataset(path).warnings for name, path in converted.items()}
    assert warnings["trivago"] == [] and warnings["movielens"] == []
    assert len(warnings["jdsearch"]) == 1 and "the valid split is empty" in warnings["jdsearch"][0]
    assert len(warnings["aliexpress"]) == 1
    assert "every impression of the train split has click=1" in warnings["aliexpress"][0]

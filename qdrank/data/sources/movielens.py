"""MovieLens (RecBole atomic files or GroupLens originals) -> canonical dataset with genre queries.

Input directory: RecBole atomic files ``<name>.inter`` (+ ``<name>.item``, ``<name>.user``; e.g.
``ml-100k.inter``) or the GroupLens ML-100K originals ``u.data`` (+ ``u.item``, ``u.user``).

MovieLens has no queries, so they are derived as in QIN (Guo et al., CIKM 2023): every rating's
query is one of its movie's genres, chosen uniformly per rating with ``seed`` (lowercase, e.g.
``"sci-fi"``; movies without a genre get ``"unknown"``).

Derivation
----------
* Each user's ratings are sorted by (timestamp, item_id). The first ``min_history`` (default 5) are
  history only; every later rating becomes a **request** at the rating's timestamp with that
  rating's query. ``requests_per_user`` keeps only each user's latest N such ratings;
  ``max_requests`` then keeps a seeded random subset overall. ``request_id`` runs in (user, time)
  order.
* **Candidates**: the rated movie (``click`` 1, ``purchase`` = rating >= 4) plus ``n_negatives``
  (default 20) movies the user never rated (at any time) (``click`` 0, ``purchase`` null), drawn by
  ``negatives``:

  - ``popular`` (default): ``round(genre_share * n_negatives)`` (``genre_share`` 0.8) from the movies of
    the query genre, the rest from the whole catalogue, each movie with probability proportional to
    its number of ratings (+1). The rated movie always matches the query genre and is drawn by
    popularity too, so neither "matches the query" nor "is popular" alone tells it apart; ranking
    needs the user.
  - ``uniform`` (the earlier sampling): ``n_negatives // 2`` uniformly from the query genre, the rest
    uniformly from the catalogue. The positive always matches the genre while about 60% of the
    negatives do, and popular movies are almost always the positive: "genre matches, then
    popularity" scores GAUC ~0.82 on it.

  A genre draw that keeps failing (the user rated most of that genre) falls back to the catalogue
  after half the rounds. Candidate order is shuffled with the seed and stored as ``position``; rows
  are written in position order.
* **Behaviours**: every rating, action ``rate_high`` (rating >= 4) or ``rate_low``, its query, and a
  ``rating`` numeric feature. Many ratings share a timestamp; the loader's strict ``timestamp <``
  history rule keeps a request's own rating (and same-second ratings) out of its history.
* **items.parquet**: ``genres`` (list), ``year`` (categorical string), ``title`` (text).
  **users.parquet**: ``age`` (decade bucket, e.g. ``"20-29"``), ``gender``, ``occupation``,
  ``zip_region`` (first character of the zip code), all categorical. Gate: age, gender, occupation.
* Item and user ids are int64.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from qdrank.data.schema import BEHAVIORS, IMPRESSIONS, ITEMS, REQUESTS, USERS, ValidationReport
from qdrank.data.sources.common import (
    as_list_column,
    finish,
    rank_within_groups,
    read_atomic,
    require_columns,
    seeded_rng,
)

GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western")
MAX_ROUNDS = 64

SPEC = {
    "features": {
        "rating": {"type": "numeric"},
        "genres": {"type": "list"},
        "year": {"type": "categorical"},
        "title": {"type": "text"},
        "age": {"type": "categorical"},
        "gender": {"type": "categorical"},
        "occupation": {"type": "categorical"},
        "zip_region": {"type": "categorical"},
    },
    "gate": ["age", "gender", "occupation"],
}


# ----------------------------------------------------------------------------- reading

def _read_recbole(inter: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    ratings = read_atomic(inter)
    require_columns(ratings, ("user_id", "item_id", "rating", "timestamp"), inter)
    items = users = None
    item_file, user_file = inter.with_suffix(".item"), inter.with_suffix(".user")
    if item_file.is_file():
        raw = read_atomic(item_file)
        require_columns(raw, ("item_id",), item_file)
        genre_col = next((c for c in ("class", "genre", "genres") if c in raw.columns), None)
        items = pd.DataFrame({
            "item_id": raw["item_id"],
            "title": raw["movie_title"] if "movie_title" in raw.columns else "",
            "year": raw["release_year"] if "release_year" in raw.columns else "",
            "genres": raw[genre_col].str.split() if genre_col else [[] for _ in range(len(raw))],
        })
    if user_file.is_file():
        users = read_atomic(user_file)
        require_columns(users, ("user_id",), user_file)
    return ratings, items, users


def _read_grouplens(d: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    ratings = pd.read_csv(d / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    if ratings.shape[1] != 4 or ratings.isna().any().any():
        raise ValueError(f"{d / 'u.data'}: expected 4 tab-separated columns user item rating timestamp")
    items = users = None
    if (d / "u.item").is_file():
        raw = pd.read_csv(d / "u.item", sep="|", header=None, encoding="latin-1", dtype=str, keep_default_na=False)
        if raw.shape[1] != 5 + len(GENRES_100K):
            raise ValueError(f"{d / 'u.item'}: expected {5 + len(GENRES_100K)} '|'-separated columns, "
                             f"got {raw.shape[1]}")
        flags = raw.iloc[:, 5:].to_numpy() == "1"
        titles = raw[1].str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True)
        years = raw[2].str.extract(r"(\d{4})$", expand=False).fillna("")
        items = pd.DataFrame({
            "item_id": raw[0], "title": titles, "year": years,
            "genres": [[g for g, f in zip(GENRES_100K, row) if f and g != "unknown"] for row in flags],
        })
    if (d / "u.user").is_file():
        users = pd.read_csv(d / "u.user", sep="|", header=None, dtype=str, keep_default_na=False,
                            names=["user_id", "age", "gender", "occupation", "zip_code"])
    return ratings, items, users


def read_movielens(input: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    input = Path(input)
    inters = sorted(input.glob("*.inter")) if input.is_dir() else []
    if inters:
        ratings, items, users = _read_recbole(inters[0])
    elif (input / "u.data").is_file():
        ratings, items, users = _read_grouplens(input)
    else:
        raise FileNotFoundError(f"movielens: no input in {input}; expected RecBole atomic files "
                                f"(<name>.inter + optional .item/.user, e.g. ml-100k.inter) or GroupLens "
                                f"u.data (+ u.item, u.user)")
    ratings = pd.DataFrame({
        "user_id": pd.to_numeric(ratings["user_id"]).astype("int64"),
        "item_id": pd.to_numeric(ratings["item_id"]).astype("int64"),
        "rating": pd.to_numeric(ratings["rating"]).astype("float64"),
        "timestamp": pd.to_numeric(ratings["timestamp"]).astype("int64"),
    })
    if items is not None:
        items["item_id"] = pd.to_numeric(items["item_id"]).astype("int64")
        items = items.drop_duplicates("item_id", ignore_index=True)
    if users is not None:
        users["user_id"] = pd.to_numeric(users["user_id"]).astype("int64")
        users = users.drop_duplicates("user_id", ignore_index=True)
    return ratings, items, users


# ----------------------------------------------------------------------------- sampling

def _catalogue(ratings: pd.DataFrame, items: pd.DataFrame | None) -> pd.DataFrame:
    """All movies (item table plus any rated movie missing from it) with a non-empty genre list."""
    if items is None:
        items = pd.DataFrame({"item_id": np.zeros(0, np.int64), "title": [], "year": [], "genres": []})
    missing = np.setdiff1d(ratings["item_id"].unique(), items["item_id"].to_numpy())
    if len(missing):
        items = pd.concat([items, pd.DataFrame({"item_id": missing, "title": "", "year": "",
                                                "genres": [[] for _ in missing]})], ignore_index=True)
    items = items.sort_values("item_id", ignore_index=True)
    items["genres"] = [list(g) if len(g) else ["unknown"] for g in items["genres"]]
    items["title"] = items["title"].fillna("").astype("str")
    items["year"] = items["year"].fillna("").astype("str").replace("", "unknown")
    return items


def _sample_negatives(req_user: np.ndarray, req_item: np.ndarray, req_genre: np.ndarray, rated_keys: np.ndarray,
                      genre_items: list[np.ndarray], n_items: int, n_neg: int,
                      rng: np.random.Generator, n_genre: int | None = None,
                      weight: np.ndarray | None = None) -> np.ndarray:
    """(n_requests, n_neg) item indices, -1 where no valid movie could be drawn.

    Valid = never rated by the user, not the positive, no repeat within the row. Columns
    ``[0, n_genre)`` (default ``n_neg // 2``) draw from the query genre's movies, the others from the
    catalogue; uniformly, or with probability proportional to ``weight`` (per item) when given. A
    genre column that keeps failing (the user rated most of that genre) falls back to the catalogue
    after half the rounds.
    """
    n = len(req_user)
    n_genre = n_neg // 2 if n_genre is None else n_genre
    sizes = np.array([len(g) for g in genre_items], dtype=np.int64)
    flat = np.concatenate(genre_items) if genre_items else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if weight is not None:
        # cumulative weights: over the catalogue, and within each genre's block of ``flat``
        cat_cdf = np.cumsum(weight) / weight.sum()
        flat_w = weight[flat]
        flat_cum = np.cumsum(flat_w)
        block_start = np.concatenate([[0.0], flat_cum])[offsets]
        block_mass = np.add.reduceat(flat_w, offsets) if len(flat) else np.zeros(0)
    cols = np.broadcast_to(np.arange(n_neg), (n, n_neg))
    genre_col = cols < n_genre
    neg = np.full((n, n_neg), -1, dtype=np.int64)
    bad = np.ones((n, n_neg), dtype=bool)
    for rnd in range(MAX_ROUNDS):
        r, c = np.nonzero(bad)
        if not len(r):
            break
        use_genre = genre_col[r, c] & (rnd < MAX_ROUNDS // 2)
        g = req_genre[r[use_genre]]
        if weight is None:
            draw = rng.integers(0, n_items, size=len(r))
            draw[use_genre] = flat[offsets[g] + (rng.random(len(g)) * sizes[g]).astype(np.int64)]
        else:
            draw = np.minimum(np.searchsorted(cat_cdf, rng.random(len(r)), side="right"), n_items - 1)
            u = block_start[g] + rng.random(len(g)) * block_mass[g]
            at = np.searchsorted(flat_cum, u, side="right")
            draw[use_genre] = flat[np.clip(at, offsets[g], offsets[g] + sizes[g] - 1)]
        neg[r, c] = draw
        # invalid: rated by the user (includes the positive), or a repeat of an earlier column;
        # repeats can only appear in rows that changed this round
        keys = req_user[r] * n_items + draw
        at = np.searchsorted(rated_keys, keys)
        rated = rated_keys[np.minimum(at, len(rated_keys) - 1)] == keys
        bad[:] = False
        bad[r, c] = rated
        rows = np.unique(r)
        sub = neg[rows]
        order = np.argsort(sub, axis=1, kind="stable")
        srt = np.take_along_axis(sub, order, axis=1)
        rep_sorted = np.zeros(sub.shape, dtype=bool)
        rep_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        repeat = np.zeros(sub.shape, dtype=bool)
        np.put_along_axis(repeat, order, rep_sorted, axis=1)
        bad[rows] |= repeat
    neg[bad] = -1
    return neg


# ----------------------------------------------------------------------------- conversion

NEGATIVES = ("popular", "uniform")


def prepare(input: Path, out: Path, *, seed: int = 0, min_history: int = 5, n_negatives: int = 20,
            requests_per_user: int | None = None, max_requests: int | None = None,
            negatives: str = "popular", genre_share: float = 0.8, **options) -> ValidationReport:
    """Convert MovieLens in ``input`` into a canonical dataset at ``out`` (see the module docstring)."""
    if options:
        raise TypeError(f"movielens: unknown options {sorted(options)}")
    if negatives not in NEGATIVES:
        raise ValueError(f"movielens: option 'negatives' must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
    if not 0.0 <= float(genre_share) <= 1.0:
        raise ValueError(f"movielens: option 'genre_share' must be in [0, 1], got {genre_share!r}")
    started = time.perf_counter()
    ratings, items_raw, users_raw = read_movielens(input)
    items = _catalogue(ratings, items_raw)
    n_items = len(items)
    item_ids = items["item_id"].to_numpy()

    # genres: vocabulary, per-item flat lists
    genre_lists = items["genres"].tolist()
    vocab = sorted({g for gs in genre_lists for g in gs})
    gidx = {g: i for i, g in enumerate(vocab)}
    n_g = np.array([len(gs) for gs in genre_lists], dtype=np.int64)
    g_flat = np.array([gidx[g] for gs in genre_lists for g in gs], dtype=np.int64)
    g_off = np.concatenate([[0], np.cumsum(n_g)[:-1]])
    item_of_flat = np.repeat(np.arange(n_items), n_g)
    order = np.argsort(g_flat, kind="stable")
    bounds = np.searchsorted(g_flat[order], np.arange(len(vocab) + 1))
    genre_items = [item_of_flat[order[bounds[i]:bounds[i + 1]]] for i in range(len(vocab))]

    # ratings in (user, time, item) order, each with a seeded genre query
    ratings = ratings.sort_values(["user_id", "timestamp", "item_id"], kind="stable", ignore_index=True)
    r_item = np.searchsorted(item_ids, ratings["item_id"].to_numpy())
    r_user = ratings["user_id"].to_numpy()
    rng_query = seeded_rng(seed, 1)
    k = (rng_query.random(len(ratings)) * n_g[r_item]).astype(np.int64)
    r_genre = g_flat[g_off[r_item] + k]
    genre_name = np.array([g.lower() for g in vocab], dtype=object)
    r_query = genre_name[r_genre]

    behaviors = pd.DataFrame({
        "user_id": r_user,
        "item_id": ratings["item_id"].to_numpy(),
        "timestamp": ratings["timestamp"].to_numpy(),
        "action": np.where(ratings["rating"].to_numpy() >= 4, "rate_high", "rate_low"),
        "query": r_query,
        "rating": ratings["rating"].to_numpy(),
    })
    for c in ("action", "query"):
        behaviors[c] = behaviors[c].astype("str")

    # which ratings become requests
    rank = rank_within_groups(r_user)
    is_req = rank >= min_history
    if requests_per_user is not None:
        n_per_user = np.bincount(np.searchsorted(np.unique(r_user), r_user))
        counts = np.repeat(n_per_user, n_per_user)
        is_req &= rank >= counts - requests_per_user
    req_rows = np.flatnonzero(is_req)
    if max_requests is not None and len(req_rows) > max_requests:
        req_rows = np.sort(seeded_rng(seed, 2).choice(req_rows, size=max_requests, replace=False))
    n_req = len(req_rows)

    # negatives: never rated by the user
    u_codes, u_inv = np.unique(r_user, return_inverse=True)
    rated_keys = np.unique(u_inv.astype(np.int64) * n_items + r_item)
    if negatives == "popular":
        weight = np.bincount(r_item, minlength=n_items).astype(np.float64) + 1.0
        n_genre, how = int(round(genre_share * n_negatives)), f"{genre_share:.0%} of the query genre, by popularity"
    else:
        weight, n_genre, how = None, n_negatives // 2, "half of the query genre, uniformly"
    neg = _sample_negatives(u_inv[req_rows].astype(np.int64), r_item[req_rows], r_genre[req_rows], rated_keys,
                            genre_items, n_items, n_negatives, seeded_rng(seed, 3), n_genre, weight)

    # candidates: positive + negatives, shuffled per request; -1 marks an empty negative slot
    cand = np.concatenate([r_item[req_rows][:, None], neg], axis=1)  # (n_req, 1 + n_neg)
    is_pos = np.zeros(cand.shape, dtype=bool)
    is_pos[:, 0] = True
    perm = np.argsort(seeded_rng(seed, 4).random(cand.shape), axis=1)
    cand, is_pos = np.take_along_axis(cand, perm, axis=1), np.take_along_axis(is_pos, perm, axis=1)
    valid = cand >= 0
    position = np.cumsum(valid, axis=1) - 1
    rid = np.broadcast_to(np.arange(n_req, dtype=np.int64)[:, None], cand.shape)[valid]
    flat_cand, is_pos, position = cand[valid], is_pos[valid], position[valid].astype(np.int64)
    high = (ratings["rating"].to_numpy()[req_rows] >= 4).astype(np.int64)
    purchase = pd.array(np.where(is_pos, high[rid], 0), dtype="Int64")
    purchase[~is_pos] = pd.NA
    impressions = pd.DataFrame({
        "request_id": rid,
        "item_id": item_ids[flat_cand],
        "position": position,
        "click": is_pos.astype(np.int64),
        "purchase": purchase,
    })
    requests = pd.DataFrame({
        "request_id": np.arange(n_req, dtype=np.int64),
        "user_id": r_user[req_rows],
        "timestamp": ratings["timestamp"].to_numpy()[req_rows],
        "query": pd.Series(r_query[req_rows], dtype="str"),
    })

    tables = {REQUESTS: requests, IMPRESSIONS: impressions, BEHAVIORS: behaviors}
    tables[ITEMS] = pd.DataFrame({
        "item_id": item_ids,
        "genres": as_list_column(items["genres"].tolist()),
        "year": items["year"].astype("str"),
        "title": items["title"].astype("str"),
    })
    if users_raw is not None:
        tables[USERS] = _users(users_raw)
    spec = {"features": dict(SPEC["features"]), "gate": list(SPEC["gate"]) if USERS in tables else []}
    n_short = int((neg < 0).sum())
    notes = [f"{n_req:,} requests from {len(u_codes):,} users (min_history={min_history}), "
             f"{n_negatives} negatives each ({how})"]
    if n_short:
        notes.append(f"{n_short:,} negative slots left empty (users who rated almost every movie)")
    return finish(out, tables, spec, "movielens", started, notes)


def _users(raw: pd.DataFrame) -> pd.DataFrame:
    users = pd.DataFrame({"user_id": raw["user_id"].to_numpy()})
    if "age" in raw.columns:
        age = pd.to_numeric(raw["age"], errors="coerce")
        decade = (age // 10 * 10).astype("Int64")
        users["age"] = pd.Series([f"{d}-{d + 9}" if d is not pd.NA else "unknown" for d in decade], dtype="str")
    for c in ("gender", "occupation"):
        if c in raw.columns:
            users[c] = raw[c].fillna("unknown").astype("str").to_numpy()
    if "zip_code" in raw.columns:
        z = raw["zip_code"].fillna("").astype("str").str.strip()
        users["zip_region"] = z.str[:1].where(z.str.len() > 0, "unknown").str.upper().to_numpy()
    for c in ("age", "gender", "occupation", "zip_region"):
        if c not in users.columns:
            users[c] = "unknown"
        users[c] = users[c].astype("str")
    return users


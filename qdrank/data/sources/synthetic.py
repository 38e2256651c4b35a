"""Built-in, seeded synthetic e-commerce search log: the project's default data, runs anywhere.

``prepare(out=..., seed=0)`` writes a canonical dataset (see :mod:`qdrank.data.schema`) whose labels
come from a known ground-truth model, so every method can be compared with the *oracle* (the exact
click probabilities, stored as ``true_ctr`` / ``true_cvr``, and the position-free ``true_rel``; each
request's intent category is stored as ``true_intent``, the ground truth of query steering in
``qdrank explain``). The same seed and parameters always give identical tables; ``chunk_requests`` only changes how the tables are written, never their content.

Scales (``scale=`` picks a preset from :data:`SCALES`; explicit non-default arguments win)::

    tiny     200 users,    400 items,  1k requests x 10 candidates  (~10k impressions, for tests)
    demo     2k users,     3k items,   6k requests x 20             (~120k impressions, `qdrank demo`)
    small    2k users,     3k items,  20k requests x 20             (~400k impressions, the default)
    medium   20k users,   20k items,  50k requests x 20             (~1M impressions)
    large    200k users, 100k items, 500k requests x 20             (~10M impressions)
    sessions 1k users,     3k items,  20k requests x 20, ~1,000 behaviours per user in sessions with
             session-level drift (``session_drift=0.6``, ``session_behaviors=6``): long-term taste
             plus short-term moods, the premise of iFusion

Ground truth
------------
**Catalogue.** ``n_categories`` categories with Zipf-like popularity (``pi_c ~ (c+1)^-0.6``). Each
category has a readable name ("shoes", "phones", ...; invented words beyond the built-in list), a
vocabulary of 12 invented words and 8 brands of its own. An item has a category, a brand of that
category (Zipf), a price level 1..5 (P = .2/.3/.25/.15/.1), a base price
``cat_base * 1.8^level * lognormal(0, .15)``, a title (brand + two vocabulary words + category name),
and two hidden values: quality ``q ~ N(0, 1)`` and popularity ``pop ~ lognormal(0, .8)`` (``pz`` is its
standardised log). Every category has at least ``candidates_per_request`` items.

**Users.** Visible profile: ``age_group`` (18-24 .. 55+), ``gender`` (F/M), ``city_tier`` (tier1..3).
Hidden preferences:

* 3 favourite categories (drawn by popularity, without replacement) with Dirichlet(2,2,2) weights;
  ``interest(c)`` is the weight of ``c`` if it is a favourite, else 0;
* 3 favourite brands, one per favourite category;
* a preferred price level ``p_u`` in 1..5: ``round(3 + .6*[tier1] - .6*[tier3] + age shift + N(0, .9))``
  (the age shift is -.5, 0, +.3, +.3, 0 for the five age groups);
* price sensitivity ``gamma_u = age_sens[age_group] * tier_mult[city_tier]`` with
  ``age_sens = 1.6, 1.2, .9, .8, 1.0`` and ``tier_mult = .7, 1.0, 1.4``;
* brand weight ``beta_u = 1.2`` for F, ``0.4`` for M (times ``lognormal(0, .2)``);
* a primary device (mobile .5, desktop .2, app .3) used for 70% of requests, and an activity level
  ``lognormal(0, .8)`` that sets how many requests the user makes.

The profile therefore changes *which item attributes matter*: price mismatch costs an 18-24 tier-3
user 4x what it costs a 45-54 tier-1 user, and brand matters 3x more for F than for M.

**Requests.** Request timestamps are spread over the 30 days after ``T0 = 1_700_000_000`` (with a
day/night cycle; request ids increase with time), each with a user drawn by activity, so a user's
requests are spread over the month. The query intent category is one of the user's favourites
(by weight) with probability .55 and otherwise a category drawn by popularity, so ~40% of queries are
outside the user's favourites. The query is a string of 1-2 words of that category's vocabulary
(sometimes the category name) plus, 25% of the time, a generic word ("new", "sale", ...). Context:
``device`` (primary device with probability .7, else uniform) and ``hour`` (0-23, from the timestamp).

**Candidates.** ``round(.7 K)`` distinct items of the query category (drawn by popularity) and the
rest from the whole catalogue by popularity (retrieval noise). 30% of shown items carry a discount
``d ~ U(.05, .4)``; ``price = base_price * (1 - d)``. A simulated production ranker orders them by
``match + .5*interest + .3*q + .3*pz + Gumbel`` (``match = [item category == query category]``),
which gives the 0-based ``position``. An item's title has two distinct words of its category's
vocabulary; ``overlap`` (0-2) counts the query's vocabulary words found in the title of a matching item.

**Click.** ``true_ctr = true_rel / (1 + kappa_dev * position)`` and ``click ~ Bernoulli(true_ctr)``, where
``true_rel = sigmoid(z)`` is the position-free click probability (the click probability at the
top position: what a live ranker should rank by, the counterfactual oracle), with
``kappa = .22`` mobile, ``.12`` desktop, ``.16`` app, and::

    z = -3.7 + m_dev * (2.5 * match + .8 * overlap) + 1.6 * interest(category)
        + beta_u * b_dev * [brand is a favourite]
        - .7 * gamma_u * g_dev * |price_level - p_u| + 2.0 * gamma_u * d + .35 * q + .25 * pz
        + .25 * [19 <= hour <= 23] + eps,       eps ~ N(0, .3) per impression (unobservable)

where ``m_dev = 1.25`` on desktop (else 1), ``b_dev = 1.4`` in the app (else 1) and ``g_dev = 1.3`` on
mobile (else 1). The price-level term is the same in every category, so it is visible in *all* of the
user's past purchases, also of unrelated categories.

**Purchase.** Only after a click: ``true_cvr = P(purchase | click) = sigmoid(v)``,
``purchase = click * Bernoulli(true_cvr)`` with::

    v = -2.0 + .9 * q + .8 * [brand is a favourite] + .5 * match
        - 1.2 * gamma_u * max(price_level - p_u, 0) - .3 * max(p_u - price_level, 0) + 2.5 * d

**Behaviours.** Before ``T0`` each user has about ``history_per_user`` behaviours (Poisson with a mean-1
Gamma(4) multiplier, at least 1), spread over the 60 days before ``T0``. Each comes from a past search:
an intent category (a favourite with probability .7, else by popularity), 5 items of that category
(by popularity) and that search's query. With probability .4 it is an ``impression`` of the first of
the 5; otherwise the user engages with one of them picked by ``softmax(z)`` (same ``z`` as above,
without position), logged as ``purchase`` with probability ``true_cvr``, else ``cart`` (15%) or
``click``. Every request's outcome is then logged at the request's own timestamp, like a real log:
each clicked item as ``click``, each purchased item as ``purchase``, and unclicked items at positions
0-1 as ``impression`` with probability .3. The loader's strict-earlier rule must exclude them from
that request's own history; later requests of the same user do see them.

**Sessions** (``session_drift > 0``; the ``sessions`` scale). Behaviours come in sessions: every
block of 8 consecutive behaviours of a user is one session (60-150 s apart, the session placed
uniformly over the history window), and each session, history or request, has a *mood*: a price
level ``m_s`` uniform in 1..5. Within a session the preferred price level in ``z``, ``v`` and the
engaged-item choice is ``(1 - session_drift) * p_u + session_drift * m_s`` instead of ``p_u``. Every
request also gets ``Poisson(session_behaviors - 1) + 1`` behaviours of its own session 1-20 minutes
before it (searches as above, same mood), so its short-term history reveals the mood while the
long history reveals ``p_u``: ranking well needs both. Each behaviour carries its true session id in the reserved
``session`` column (``h<n>`` for a history session, ``r<request_id>`` for a request's own session);
the other columns are the same with or without it.

**Category tastes** (``category_taste = w``, default 0). Each user also gets a preferred price
level per category, ``m_uc`` uniform in 1..5 (a random stream of its own: every other draw is
unchanged), and the preferred level in ``z``, ``v`` and the engaged-item choice becomes
``(1 - w) * p_u + w * m_uc`` for an item of category ``c``. The history items of the query's
category then tell what the user wants in it, and the others mislead: data where weighting the
history by its relevance to the query pays (query steering, issue #10).

With the defaults the click rate is ~11.5%, purchase-given-click ~24%, and the oracle AUC of
``true_ctr`` is ~0.84. Gradient-boosted trees on hand-made features (test AUC, seed 0) reach ~0.77
without user/history features, ~0.75 without the query (but with position), ~0.79 with history
features (past price level, category and brand shares) and ~0.81 adding the profile and device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from qdrank.data.schema import (
    BEHAVIORS,
    IMPRESSIONS,
    ITEMS,
    REQUESTS,
    SPEC,
    USERS,
    ValidationReport,
    atomic_dataset_dir,
)

__all__ = ["SCALES", "DEFAULTS", "T0", "prepare"]

DEFAULTS: dict[str, int] = dict(n_users=2000, n_items=3000, n_categories=20, n_requests=20000,
                                candidates_per_request=20, history_per_user=50)
SCALES: dict[str, dict[str, int]] = {
    "tiny": dict(n_users=200, n_items=400, n_categories=8, n_requests=1000, candidates_per_request=10,
                 history_per_user=20),
    "demo": dict(DEFAULTS, n_requests=6_000),
    "small": dict(DEFAULTS),
    "medium": dict(n_users=20_000, n_items=20_000, n_categories=40, n_requests=50_000,
                   candidates_per_request=20, history_per_user=50),
    "large": dict(n_users=200_000, n_items=100_000, n_categories=60, n_requests=500_000,
                  candidates_per_request=20, history_per_user=50),
    "sessions": dict(DEFAULTS, n_users=1000, history_per_user=1000),
}
# options a scale sets unless given explicitly
SCALE_OPTIONS: dict[str, dict[str, float]] = {"sessions": dict(session_drift=0.6, session_behaviors=6)}
SESSION_LEN = 8  # history behaviours per session in session mode

T0 = 1_700_000_000  # first request time (unix s); all pre-request history lies before it
DAY = 86_400
REQUEST_DAYS = 30
HISTORY_DAYS = 60
_BLOCK = 1024  # requests (or users) per RNG block: the data does not depend on chunk_requests

CATEGORY_NAMES = ("shoes", "phones", "laptops", "kitchen", "toys", "books", "beauty", "garden", "sports",
                  "jewelry", "watches", "bags", "furniture", "lighting", "pets", "grocery", "music",
                  "cameras", "bedding", "tools")
GENERIC_WORDS = ("new", "best", "sale", "set", "original", "top", "classic", "deal")
AGE_GROUPS = ("18-24", "25-34", "35-44", "45-54", "55+")
GENDERS = ("F", "M")
CITY_TIERS = ("tier1", "tier2", "tier3")
DEVICES = ("mobile", "desktop", "app")
ACTIONS = ("impression", "click", "cart", "purchase")

N_FAV = 3
BRANDS_PER_CATEGORY = 8
VOCAB_PER_CATEGORY = 12
QUERIES_PER_CATEGORY = 40
HISTORY_CANDIDATES = 5

_AGE_P = np.array([0.15, 0.30, 0.25, 0.18, 0.12])
_TIER_P = np.array([0.3, 0.4, 0.3])
_DEVICE_P = np.array([0.5, 0.2, 0.3])
_LEVEL_P = np.array([0.2, 0.3, 0.25, 0.15, 0.1])
_AGE_SHIFT = np.array([-0.5, 0.0, 0.3, 0.3, 0.0])
_AGE_SENS = np.array([1.6, 1.2, 0.9, 0.8, 1.0])
_TIER_MULT = np.array([0.7, 1.0, 1.4])
_BRAND_W = np.array([1.2, 0.4])  # F, M
_KAPPA = np.array([0.22, 0.12, 0.16])  # position-bias slope per device
_M_DEV = np.array([1.0, 1.25, 1.0])  # query-match weight per device
_B_DEV = np.array([1.0, 1.0, 1.4])  # brand weight per device
_G_DEV = np.array([1.3, 1.0, 1.0])  # price-mismatch weight per device
_POPCOUNT = np.array([bin(i).count("1") for i in range(1 << VOCAB_PER_CATEGORY)], dtype=np.int64)
_HOUR_W = np.array([0.3] * 7 + [1.0] * 12 + [1.5] * 5)  # day/night cycle of traffic

CTR_BIAS = -3.7
CVR_BIAS = -2.0


# ----------------------------------------------------------------------------------------- words

def _invented_words(n: int, seed: int = 7, exclude: set[str] | None = None) -> list[str]:
    """``n`` distinct pronounceable invented words; fixed (independent of the data seed)."""
    rng = np.random.default_rng(seed)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    seen = set(exclude or ())
    out: list[str] = []
    while len(out) < n:
        k = int(rng.integers(2, 4))
        w = "".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))] for _ in range(k))
        if rng.random() < 0.4:
            w += cons[rng.integers(len(cons))]
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _vocabulary(n_categories: int) -> tuple[list[str], list[list[str]], list[str]]:
    """Category names, per-category vocabularies and brand names (deterministic, seed-independent)."""
    names = list(CATEGORY_NAMES[:n_categories])
    reserved = set(CATEGORY_NAMES) | set(GENERIC_WORDS)
    extra = _invented_words(max(0, n_categories - len(names)), seed=11, exclude=reserved)
    names += extra
    words = _invented_words(n_categories * VOCAB_PER_CATEGORY, seed=7, exclude=reserved | set(extra))
    vocab = [words[c * VOCAB_PER_CATEGORY:(c + 1) * VOCAB_PER_CATEGORY] for c in range(n_categories)]
    brands = [w.capitalize() for w in _invented_words(n_categories * BRANDS_PER_CATEGORY, seed=13)]
    return names, vocab, brands


def _query_pool(names: list[str], vocab: list[list[str]]) -> list[list[str]]:
    """QUERIES_PER_CATEGORY distinct query strings per category, most common first."""
    rng = np.random.default_rng(17)
    pools = []
    for c, name in enumerate(names):
        words = [name] + vocab[c]
        p = 1.0 / np.arange(1, len(words) + 1) ** 0.8
        p /= p.sum()
        pool: list[str] = [name]
        while len(pool) < QUERIES_PER_CATEGORY:
            k = 1 + int(rng.random() < 0.6)
            q = list(dict.fromkeys(words[i] for i in rng.choice(len(words), size=k, p=p)))
            if rng.random() < 0.25:
                q.insert(int(rng.integers(0, 2)) * len(q), GENERIC_WORDS[rng.integers(len(GENERIC_WORDS))])
            s = " ".join(q)
            if s not in pool:
                pool.append(s)
        pools.append(pool)
    return pools


# ----------------------------------------------------------------------------------------- world

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class _World:
    """The static part: catalogue, users and their hidden preferences, samplers."""

    def __init__(self, seed: int, n_users: int, n_items: int, n_categories: int, candidates: int):
        rng = np.random.default_rng(seed)
        C = n_categories
        self.C = C
        self.names, self.vocab, self.brand_names = _vocabulary(C)
        pools = _query_pool(self.names, self.vocab)
        self.query_strings = pa.array([q for pool in pools for q in pool], pa.string())
        # bit j set: the query contains word j of its category's vocabulary (the name is not counted)
        self.query_mask = np.array([sum(1 << self.vocab[c].index(t) for t in set(q.split()) if t in self.vocab[c])
                                    for c, pool in enumerate(pools) for q in pool], dtype=np.int64)
        qp = 1.0 / np.arange(1, QUERIES_PER_CATEGORY + 1) ** 1.0
        self.query_cdf = np.cumsum(qp / qp.sum())
        self.query_cdf[-1] = 1.0

        pi = 1.0 / np.arange(1, C + 1) ** 0.6
        self.cat_p = pi / pi.sum()

        # --- items: every category gets at least `candidates` items, the rest by popularity
        base = np.arange(C * candidates) % C
        rest = rng.choice(C, size=n_items - base.size, p=self.cat_p)
        cat = rng.permutation(np.concatenate([base, rest]))
        bp = 1.0 / np.arange(1, BRANDS_PER_CATEGORY + 1) ** 0.8
        brand = cat * BRANDS_PER_CATEGORY + rng.choice(BRANDS_PER_CATEGORY, size=n_items, p=bp / bp.sum())
        level = rng.choice(5, size=n_items, p=_LEVEL_P) + 1
        cat_base = rng.lognormal(3.0, 0.7, size=C)
        base_price = np.round(cat_base[cat] * 1.8 ** level * rng.lognormal(0.0, 0.15, size=n_items), 2)
        self.quality = rng.standard_normal(n_items)
        pop = rng.lognormal(0.0, 0.8, size=n_items)
        lp = np.log(pop)
        self.pz = (lp - lp.mean()) / lp.std()
        self.cat, self.brand, self.level, self.base_price = cat, brand, level, base_price
        w0 = rng.integers(0, VOCAB_PER_CATEGORY, size=n_items)
        w1 = (w0 + rng.integers(1, VOCAB_PER_CATEGORY, size=n_items)) % VOCAB_PER_CATEGORY
        self.title_mask = (1 << w0) | (1 << w1)

        # samplers: items grouped by category with a within-category popularity CDF offset by c,
        # so one searchsorted draws an item of category c for a whole vector of c's.
        order = np.argsort(cat, kind="stable")
        self.by_cat = order
        counts = np.bincount(cat, minlength=C)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.cat_start, self.cat_count = starts, counts
        cum = np.empty(n_items)
        pop_sorted = pop[order]
        for c in range(C):  # C is small
            s, e = starts[c], starts[c] + counts[c]
            cc = np.cumsum(pop_sorted[s:e])
            cum[s:e] = c + cc / cc[-1]
        self.cat_key = cum
        gc = np.cumsum(pop)
        self.global_cdf = gc / gc[-1]

        # --- users
        U = n_users
        self.age = rng.choice(5, size=U, p=_AGE_P)
        self.gender = rng.integers(0, 2, size=U)
        self.tier = rng.choice(3, size=U, p=_TIER_P)
        fav = np.empty((U, N_FAV), dtype=np.int64)
        logp = np.log(self.cat_p)
        for s in range(0, U, 65536):  # Gumbel top-k = sampling without replacement, in slices
            g = logp + rng.gumbel(size=(min(U, s + 65536) - s, C))
            fav[s:s + g.shape[0]] = np.argsort(-g, axis=1)[:, :N_FAV]
        self.fav = fav
        self.fav_w = rng.dirichlet(np.full(N_FAV, 2.0), size=U)
        self.fav_cdf = np.cumsum(self.fav_w, axis=1)
        self.fav_brand = fav * BRANDS_PER_CATEGORY + rng.choice(
            BRANDS_PER_CATEGORY, size=(U, N_FAV), p=bp / bp.sum())
        mu = 3 + 0.6 * (self.tier == 0) - 0.6 * (self.tier == 2) + _AGE_SHIFT[self.age]
        self.p_level = np.clip(np.round(mu + rng.normal(0.0, 0.9, size=U)), 1, 5).astype(np.int64)
        self.gamma = _AGE_SENS[self.age] * _TIER_MULT[self.tier]
        self.beta = _BRAND_W[self.gender] * rng.lognormal(0.0, 0.2, size=U)
        self.device = rng.choice(3, size=U, p=_DEVICE_P)
        act = np.cumsum(rng.lognormal(0.0, 0.8, size=U))
        self.activity_cdf = act / act[-1]

        # tables for items.parquet / users.parquet
        self.items_table = pa.table({
            "item_id": pa.array(np.arange(n_items, dtype=np.int64) + 1),
            "category": pa.array(self.names, pa.string()).take(pa.array(cat)),
            "brand": pa.array(self.brand_names, pa.string()).take(pa.array(brand)),
            "price_level": pa.array(level.astype(np.int64)),
            "base_price": pa.array(base_price),
            "title": pa.array([
                f"{self.brand_names[b]} {self.vocab[c][a]} {self.vocab[c][d]} {self.names[c]}"
                for b, c, a, d in zip(brand.tolist(), cat.tolist(), w0.tolist(), w1.tolist())
            ], pa.string()),
        })
        self.users_table = pa.table({
            "user_id": pa.array(np.arange(U, dtype=np.int64) + 1),
            "age_group": pa.array(AGE_GROUPS).take(pa.array(self.age)),
            "gender": pa.array(GENDERS).take(pa.array(self.gender)),
            "city_tier": pa.array(CITY_TIERS).take(pa.array(self.tier)),
        })
        self.category_taste, self.category_level = 0.0, None

    def set_category_taste(self, weight: float, seed: int) -> None:
        """Per-(user, category) preferred price levels, blended into ``p_u`` with ``weight``; drawn
        from a stream of their own, so every other draw of the data is unchanged."""
        if weight > 0:
            rng = np.random.default_rng([seed, 0xCA7E])
            self.category_taste = weight
            self.category_level = rng.integers(1, 6, size=(len(self.p_level), self.C)).astype(np.int8)

    # ------------------------------------------------------------------------------- samplers
    def items_of(self, rng: np.random.Generator, cats: np.ndarray) -> np.ndarray:
        """One item per entry of ``cats``, drawn by popularity within that category."""
        pos = np.searchsorted(self.cat_key, cats + rng.random(cats.shape), side="left")
        pos = np.clip(pos, self.cat_start[cats], self.cat_start[cats] + self.cat_count[cats] - 1)
        return self.by_cat[pos]

    def items_any(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return np.minimum(np.searchsorted(self.global_cdf, rng.random(shape)), self.global_cdf.size - 1)

    def fav_category(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        k = (rng.random(users.size)[:, None] > self.fav_cdf[users]).sum(1)
        return self.fav[users, np.minimum(k, N_FAV - 1)]

    def query_of(self, rng: np.random.Generator, cats: np.ndarray) -> np.ndarray:
        """Index into ``query_strings`` of a query for each intent category."""
        j = np.minimum(np.searchsorted(self.query_cdf, rng.random(cats.size)), QUERIES_PER_CATEGORY - 1)
        return cats * QUERIES_PER_CATEGORY + j

    # ------------------------------------------------------------------------------- ground truth
    def logits(self, rng: np.random.Generator, users: np.ndarray, items: np.ndarray, qidx: np.ndarray,
               device: np.ndarray, hour: np.ndarray, discount: np.ndarray, mood: np.ndarray | None = None,
               drift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Click logit ``z`` (before position bias) and purchase-given-click logit ``v``; all arrays
        broadcast to the shape of ``items`` (pass per-request arrays as ``[:, None]``). ``mood``: the
        session's price level, pulling the preferred level towards it by ``drift``."""
        cat, brand, level = self.cat[items], self.brand[items], self.level[items]
        match = (cat == qidx // QUERIES_PER_CATEGORY).astype(float)
        overlap = match * _POPCOUNT[self.query_mask[qidx] & self.title_mask[items]]
        fav = self.fav[users]
        interest = ((fav[..., :] == cat[..., None]) * self.fav_w[users]).sum(-1)
        fav_brand = (self.fav_brand[users] == brand[..., None]).any(-1).astype(float)
        gamma, pl = self.gamma[users], self.p_level[users]
        if self.category_level is not None:
            pl = (1.0 - self.category_taste) * pl + self.category_taste * self.category_level[users, cat]
        if mood is not None and drift > 0:
            pl = (1.0 - drift) * pl + drift * mood
        q, pz = self.quality[items], self.pz[items]
        z = (CTR_BIAS + _M_DEV[device] * (2.5 * match + 0.8 * overlap) + 1.6 * interest
             + self.beta[users] * _B_DEV[device] * fav_brand
             - 0.7 * gamma * _G_DEV[device] * np.abs(level - pl) + 2.0 * gamma * discount
             + 0.35 * q + 0.25 * pz + 0.25 * ((hour >= 19) & (hour <= 23))
             + rng.normal(0.0, 0.3, size=np.shape(items)))
        v = (CVR_BIAS + 0.9 * q + 0.8 * fav_brand + 0.5 * match
             - 1.2 * gamma * np.maximum(level - pl, 0) - 0.3 * np.maximum(pl - level, 0) + 2.5 * discount)
        return z, v


def _block_rng(seed: int, stream: int, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, block)))


def _distinct_rows(rng: np.random.Generator, w: _World, qcat: np.ndarray, n_q: int, k: int) -> np.ndarray:
    """(n, k) item indices, distinct within each row: n_q of the query category, the rest from anywhere."""
    n = qcat.size
    cand = np.concatenate([w.items_of(rng, np.repeat(qcat[:, None], n_q, 1)), w.items_any(rng, (n, k - n_q))],
                          axis=1)
    for _ in range(10_000):
        order = np.argsort(cand, axis=1, kind="stable")
        srt = np.take_along_axis(cand, order, 1)
        dup_sorted = np.zeros_like(cand, dtype=bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        if not dup_sorted.any():
            return cand
        r, j = np.nonzero(dup_sorted)
        col = order[r, j]  # the later of two equal entries (stable sort)
        in_q = col < n_q
        new = np.empty(r.size, dtype=cand.dtype)
        new[in_q] = w.items_of(rng, qcat[r[in_q]])
        new[~in_q] = w.items_any(rng, (int((~in_q).sum()),))
        cand[r, col] = new
    raise RuntimeError("could not draw distinct candidates; increase n_items")


# ----------------------------------------------------------------------------------------- history

def _history_block(w: _World, seed: int, b: int, u0: int, u1: int, per_user: int, drift: float = 0.0) -> pa.Table:
    rng = _block_rng(seed, 1, b)
    n_u = u1 - u0
    mult = rng.gamma(4.0, 0.25, size=n_u)
    n_h = np.maximum(rng.poisson(per_user * mult), 1)
    users = np.repeat(np.arange(u0, u1), n_h)
    n = users.size
    if drift > 0:
        # sessions of SESSION_LEN consecutive behaviours, each placed uniformly, with its own mood
        k = np.arange(n) - np.repeat(np.cumsum(n_h) - n_h, n_h)        # index within the user
        sess = np.repeat(np.cumsum(n_h) - n_h, n_h) + k // SESSION_LEN  # a global session key
        uniq, inv = np.unique(sess, return_inverse=True)
        start = T0 - 3600 - (rng.random(uniq.size) * (HISTORY_DAYS * DAY - 7200)).astype(np.int64)
        ts = start[inv] + (k % SESSION_LEN) * 90 + rng.integers(0, 60, size=n) - SESSION_LEN * 150
        mood = rng.integers(1, 6, size=uniq.size)[inv]
        session = sess
    else:
        # time: uniform over the HISTORY_DAYS before T0 (at least an hour before), sorted per user
        ts = T0 - 3600 - (rng.random(n) * (HISTORY_DAYS * DAY - 3600)).astype(np.int64)
        mood = session = None
    qcat = np.where(rng.random(n) < 0.7, w.fav_category(rng, users), rng.choice(w.C, size=n, p=w.cat_p))
    qidx = w.query_of(rng, qcat)
    hour = (ts % DAY) // 3600
    device = np.where(rng.random(n) < 0.7, w.device[users], rng.integers(0, 3, size=n))
    item, action = _engage(rng, w, users, qidx, device, hour, None if mood is None else mood[:, None], drift)
    order = np.lexsort((ts, users))  # per user, oldest first
    return _behavior_table(users[order], item[order], ts[order], action[order], qidx[order], w,
                           None if session is None else np.char.add("h", session[order].astype(str)))


def _engage(rng: np.random.Generator, w: _World, users: np.ndarray, qidx: np.ndarray, device: np.ndarray,
            hour: np.ndarray, mood: np.ndarray | None, drift: float) -> tuple[np.ndarray, np.ndarray]:
    """One past search each: HISTORY_CANDIDATES items of the query's category, then an impression of
    the first (40%) or an engagement with one picked by softmax(z) (click, cart or purchase)."""
    n = users.size
    items = w.items_of(rng, np.repeat((qidx // QUERIES_PER_CATEGORY)[:, None], HISTORY_CANDIDATES, 1))
    discount = np.where(rng.random((n, HISTORY_CANDIDATES)) < 0.3,
                        rng.uniform(0.05, 0.4, size=(n, HISTORY_CANDIDATES)), 0.0)
    z, v = w.logits(rng, users[:, None], items, qidx[:, None], device[:, None], hour[:, None], discount,
                    mood, drift)
    pick = np.argmax(z + rng.gumbel(size=z.shape), axis=1)  # engaged item ~ softmax(z)
    rows = np.arange(n)
    engaged = rng.random(n) >= 0.4
    item = np.where(engaged, items[rows, pick], items[:, 0])
    bought = rng.random(n) < _sigmoid(v[rows, pick])
    carted = rng.random(n) < 0.15
    return item, np.where(~engaged, 0, np.where(bought, 3, np.where(carted, 2, 1)))


BEHAVIOR_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                             ("action", pa.string()), ("query", pa.string())])
#: session mode: every behaviour also carries its true session id (the reserved ``session`` column)
SESSION_BEHAVIOR_SCHEMA = BEHAVIOR_SCHEMA.append(pa.field("session", pa.string()))


def _behavior_table(users, items, ts, action, qidx, w: _World, session: np.ndarray | None = None) -> pa.Table:
    """``session`` (session mode): the true session id of each behaviour (``h<key>`` for a history
    session, ``r<request_id>`` for a request's own session)."""
    cols = {
        "user_id": pa.array(users.astype(np.int64) + 1),
        "item_id": pa.array(items.astype(np.int64) + 1),
        "timestamp": pa.array(ts.astype(np.int64)),
        "action": pa.array(ACTIONS, pa.string()).take(pa.array(action)),
        "query": w.query_strings.take(pa.array(qidx)),
    }
    if session is not None:
        cols["session"] = pa.array(session, pa.string())
    return pa.table(cols)


# ----------------------------------------------------------------------------------------- requests

def _request_block(w: _World, seed: int, b: int, r0: int, r1: int, n_requests: int,
                   k: int, drift: float = 0.0, session_behaviors: int = 0) -> tuple[pa.Table, pa.Table, pa.Table]:
    rng = _block_rng(seed, 2, b)
    n = r1 - r0
    span = REQUEST_DAYS * DAY
    lo, hi = T0 + span * r0 // n_requests, T0 + span * r1 // n_requests
    # day/night cycle by rejection: keep the first of 8 tries that is accepted (else the last)
    tries = lo + (rng.random((n, 8)) * max(hi - lo, 1)).astype(np.int64)
    ok = rng.random((n, 8)) * _HOUR_W.max() < _HOUR_W[(tries % DAY) // 3600]
    ok[:, -1] = True
    ts = np.sort(tries[np.arange(n), np.argmax(ok, axis=1)])
    hour = (ts % DAY) // 3600
    users = np.minimum(np.searchsorted(w.activity_cdf, rng.random(n)), w.activity_cdf.size - 1)
    qcat = np.where(rng.random(n) < 0.55, w.fav_category(rng, users), rng.choice(w.C, size=n, p=w.cat_p))
    qidx = w.query_of(rng, qcat)
    device = np.where(rng.random(n) < 0.7, w.device[users], rng.integers(0, 3, size=n))
    mood = rng.integers(1, 6, size=n) if drift > 0 else None

    n_q = int(round(0.7 * k))
    items = _distinct_rows(rng, w, qcat, n_q, k)
    discount = np.where(rng.random((n, k)) < 0.3, np.round(rng.uniform(0.05, 0.4, size=(n, k)), 2), 0.0)
    z, v = w.logits(rng, users[:, None], items, qidx[:, None], device[:, None], hour[:, None], discount,
                    None if mood is None else mood[:, None], drift)
    # production ranker: noisy relevance -> positions
    cat = w.cat[items]
    interest = ((w.fav[users][:, None, :] == cat[..., None]) * w.fav_w[users][:, None, :]).sum(-1)
    score = (1.0 * (cat == qcat[:, None]) + 0.5 * interest + 0.3 * w.quality[items] + 0.3 * w.pz[items]
             + rng.gumbel(size=(n, k)))
    order = np.argsort(-score, axis=1, kind="stable")
    items, z, v, discount = (np.take_along_axis(a, order, 1) for a in (items, z, v, discount))
    pos = np.broadcast_to(np.arange(k), (n, k))
    rel = _sigmoid(z)  # position-free: the counterfactual oracle's relevance
    ctr = rel / (1.0 + _KAPPA[device][:, None] * pos)
    cvr = _sigmoid(v)
    click = rng.random((n, k)) < ctr
    purchase = click & (rng.random((n, k)) < cvr)
    imp_log = ~click & (pos < 2) & (rng.random((n, k)) < 0.3)

    rid = np.arange(r0, r1, dtype=np.int64)
    price = np.round(w.base_price[items] * (1.0 - discount), 2)
    requests = pa.table({
        "request_id": pa.array(rid),
        "user_id": pa.array(users.astype(np.int64) + 1),
        "timestamp": pa.array(ts.astype(np.int64)),
        "query": w.query_strings.take(pa.array(qidx)),
        "device": pa.array(DEVICES, pa.string()).take(pa.array(device)),
        "hour": pa.array(hour.astype(np.int64)),
        "true_intent": pa.array(w.names, pa.string()).take(pa.array(qcat)),
    })
    impressions = pa.table({
        "request_id": pa.array(np.repeat(rid, k)),
        "item_id": pa.array(items.ravel().astype(np.int64) + 1),
        "position": pa.array(pos.ravel().astype(np.int64)),
        "click": pa.array(click.ravel().astype(np.int64)),
        "purchase": pa.array(purchase.ravel().astype(np.int64)),
        "price": pa.array(price.ravel()),
        "discount": pa.array(discount.ravel()),
        "true_ctr": pa.array(ctr.ravel()),
        "true_cvr": pa.array(cvr.ravel()),
        "true_rel": pa.array(rel.ravel()),
    })
    # the request's own outcomes, logged at the request's own timestamp (request, position order)
    flat = np.concatenate([np.flatnonzero(imp_log), np.flatnonzero(click), np.flatnonzero(purchase)])
    act = np.concatenate([np.zeros(int(imp_log.sum()), np.int64), np.ones(int(click.sum()), np.int64),
                          np.full(int(purchase.sum()), 3, np.int64)])
    o = np.argsort(flat * 4 + act, kind="stable")
    flat, act = flat[o], act[o]
    req_of = flat // k
    sessions = np.char.add("r", rid.astype(str)) if mood is not None else None  # a request's own session
    behaviors = _behavior_table(users[req_of], items.ravel()[flat], ts[req_of], act, qidx[req_of], w,
                                None if sessions is None else sessions[req_of])
    if mood is not None and session_behaviors > 0:
        behaviors = pa.concat_tables([_session_prefix(rng, w, users, ts, mood, device, drift, session_behaviors,
                                                      sessions), behaviors])
    return requests, impressions, behaviors


def _session_prefix(rng: np.random.Generator, w: _World, users: np.ndarray, ts: np.ndarray, mood: np.ndarray,
                    device: np.ndarray, drift: float, mean_n: int, sessions: np.ndarray) -> pa.Table:
    """Behaviours of each request's own session, 1-20 minutes before it, under the session's mood."""
    n_pre = rng.poisson(max(mean_n - 1, 0), size=users.size) + 1
    req = np.repeat(np.arange(users.size), n_pre)
    u = users[req]
    t = ts[req] - rng.integers(60, 1200, size=req.size)
    qcat = np.where(rng.random(req.size) < 0.5, w.fav_category(rng, u), rng.choice(w.C, size=req.size, p=w.cat_p))
    qidx = w.query_of(rng, qcat)
    item, action = _engage(rng, w, u, qidx, device[req], (t % DAY) // 3600, mood[req][:, None], drift)
    return _behavior_table(u, item, t, action, qidx, w, sessions[req])


# ----------------------------------------------------------------------------------------- writing

def _spec() -> dict:
    cat, num = {"type": "categorical"}, {"type": "numeric"}
    return {
        "features": {
            "device": dict(cat), "hour": dict(cat),
            "price": dict(num), "discount": dict(num),
            "true_ctr": {"type": "ignore"}, "true_cvr": {"type": "ignore"}, "true_rel": {"type": "ignore"},
            "true_intent": {"type": "ignore"},
            "category": dict(cat), "brand": dict(cat), "price_level": dict(cat), "base_price": dict(num),
            "title": {"type": "text"},
            "age_group": dict(cat), "gender": dict(cat), "city_tier": dict(cat),
        },
        "gate": ["age_group", "gender", "city_tier", "device", "hour"],
    }


class _ChunkWriter:
    """Buffers tables and writes them as one row group once ``rows`` requests are buffered."""

    def __init__(self, path: Path, schema: pa.Schema | None = None):
        self.path, self.writer, self.buf, self.schema = path, None, [], schema

    def add(self, t: pa.Table) -> None:
        self.buf.append(t)

    def flush(self) -> None:
        if not self.buf:
            return
        t = pa.concat_tables(self.buf)
        self.buf = []
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, t.schema)
        self.writer.write_table(t, row_group_size=max(t.num_rows, 1))

    def close(self) -> None:
        self.flush()
        if self.writer is None and self.schema is not None:  # nothing written: an empty table
            self.writer = pq.ParquetWriter(self.path, self.schema)
        if self.writer is not None:
            self.writer.close()


def _blocks(n: int) -> Iterator[tuple[int, int, int]]:
    for b, s in enumerate(range(0, n, _BLOCK)):
        yield b, s, min(n, s + _BLOCK)


def prepare(input=None, out: Path = Path("data/synthetic"), *, seed: int = 0, n_users: int = 2000,
            n_items: int = 3000, n_categories: int = 20, n_requests: int = 20000,
            candidates_per_request: int = 20, history_per_user: int = 50, chunk_requests: int = 50_000,
            scale: str | None = None, session_drift: float = 0.0, session_behaviors: int = 0,
            category_taste: float = 0.0, **_) -> ValidationReport:
    """Write the synthetic dataset to ``out`` (atomically) and return its validation report.

    ``input`` is ignored (nothing to read). ``scale`` selects a preset of :data:`SCALES`; any size
    argument given with a non-default value overrides the preset. Memory is bounded by
    ``chunk_requests`` (requests per written row group) and the catalogue/user tables, never by the
    number of impressions; the generated data does not depend on ``chunk_requests``.
    """
    args = dict(n_users=n_users, n_items=n_items, n_categories=n_categories, n_requests=n_requests,
                candidates_per_request=candidates_per_request, history_per_user=history_per_user)
    if scale is not None:
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
        args = {k: (v if v != DEFAULTS[k] else SCALES[scale][k]) for k, v in args.items()}
        opts = SCALE_OPTIONS.get(scale, {})
        session_drift = session_drift or float(opts.get("session_drift", 0.0))
        session_behaviors = session_behaviors or int(opts.get("session_behaviors", 0))
    if not 0 <= session_drift <= 1 or session_behaviors < 0:
        raise ValueError(f"session_drift must be in [0, 1] and session_behaviors >= 0, got {session_drift}, "
                         f"{session_behaviors}")
    if not 0 <= category_taste <= 1:
        raise ValueError(f"category_taste must be in [0, 1], got {category_taste}")
    U, N, C, R = args["n_users"], args["n_items"], args["n_categories"], args["n_requests"]
    K, H = args["candidates_per_request"], args["history_per_user"]
    if min(U, N, C, R, K) < 1 or H < 0:
        raise ValueError(f"sizes must be positive: {args}")
    if N < C * K:
        raise ValueError(f"n_items={N} must be at least n_categories * candidates_per_request = {C * K}")
    if chunk_requests < 1:
        raise ValueError("chunk_requests must be >= 1")

    out = Path(out)
    world = _World(seed, U, N, C, K)
    world.set_category_taste(category_taste, seed)
    n_imp = n_beh = 0
    with atomic_dataset_dir(out) as tmp:
        pq.write_table(world.items_table, tmp / ITEMS)
        pq.write_table(world.users_table, tmp / USERS)
        (tmp / SPEC).write_text(yaml.safe_dump(_spec(), sort_keys=False))
        req_w, imp_w, beh_w = _ChunkWriter(tmp / REQUESTS), _ChunkWriter(tmp / IMPRESSIONS), \
            _ChunkWriter(tmp / BEHAVIORS, SESSION_BEHAVIOR_SCHEMA if session_drift > 0 else BEHAVIOR_SCHEMA)
        try:
            # pre-request history: by user blocks, flushed every ~chunk_requests*K rows
            buffered = 0
            for b, u0, u1 in _blocks(U):
                if H == 0:
                    break
                t = _history_block(world, seed, b, u0, u1, H, session_drift)
                beh_w.add(t)
                n_beh += t.num_rows
                buffered += t.num_rows
                if buffered >= chunk_requests * K:
                    beh_w.flush()
                    buffered = 0
            beh_w.flush()
            # requests in time order
            buffered = 0
            for b, r0, r1 in _blocks(R):
                rq, im, bh = _request_block(world, seed, b, r0, r1, R, K, session_drift, session_behaviors)
                req_w.add(rq)
                imp_w.add(im)
                beh_w.add(bh)
                n_imp += im.num_rows
                n_beh += bh.num_rows
                buffered += r1 - r0
                if buffered >= chunk_requests:
                    for wr in (req_w, imp_w, beh_w):
                        wr.flush()
                    buffered = 0
        finally:
            for wr in (req_w, imp_w, beh_w):
                wr.close()
    return ValidationReport(path=out, n_requests=R, n_impressions=n_imp, n_behaviors=n_beh,
                            tables=sorted([REQUESTS, IMPRESSIONS, BEHAVIORS, ITEMS, USERS]),
                            has_split=False, has_purchase=True)

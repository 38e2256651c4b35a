"""Feature map: which column plays which role, with which type, and how it becomes ids.

Built once from the training split (vocabularies, numeric statistics), saved as JSON in every
checkpoint and reused unchanged at evaluation and serving time, so an id means the same thing
everywhere. Roles: ``user`` (users.parquet), ``context`` (request columns), ``candidate``
(impression columns), ``item`` (items.parquet), ``behavior`` (behaviour columns).

Id layout: all sparse features share one embedding table. Id 0 is padding/missing everywhere;
each categorical/list feature owns ``1 + len(vocab)`` ids (its OOV id, then its values); text
features and queries share one hashed word/bigram block of ``query_buckets`` ids, so a query
word and the same word in an item title or a past query meet in the same embedding.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

ROLES = ("user", "context", "candidate", "item", "behavior")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Feature:
    name: str
    role: str
    type: str                      # categorical | numeric | list | text
    slots: int = 1                 # how many id slots it occupies (1 for categorical)
    offset: int = 0                # first global id of its block (categorical/list)
    vocab: list[str] = field(default_factory=list)
    mean: float = 0.0              # numeric standardisation
    std: float = 1.0
    log: bool = False              # numeric: log1p before standardising

    @property
    def sparse(self) -> bool:
        return self.type in ("categorical", "list", "text")


def tokenize(text: str, max_tokens: int) -> list[str]:
    """Lower-cased words, then adjacent-word bigrams, truncated to ``max_tokens``."""
    words = _WORD.findall(str(text).lower())
    bigrams = [f"{a}_{b}" for a, b in zip(words, words[1:])]
    return (words + bigrams)[:max_tokens]


def stable_hash(tokens: np.ndarray) -> np.ndarray:
    """Process-independent 64-bit hash of strings (Python's hash() is salted per process)."""
    if len(tokens) == 0:
        return np.zeros(0, dtype=np.uint64)
    return pd.util.hash_array(np.asarray(tokens, dtype=object), categorize=False)


NUMERIC_Z_CLIP = 30.0  # standardised numeric features are clipped to +/- this many training std


def standardize_numeric(f: Feature, x: np.ndarray) -> np.ndarray:
    """Raw float64 values of numeric feature ``f`` -> float32: ``log1p`` when ``f.log``, standardised
    with the training mean/std, clipped to +/- :data:`NUMERIC_Z_CLIP`, missing (NaN) -> 0.

    The one encoding of a numeric value: training, evaluation (:meth:`FeatureMap.encode_numeric`) and
    serving (``RequestEncoder``) all call it, so a price of 1e300 (or inf) is the same clipped value
    in a training batch as in a live request, never 0 in one and +30 std in the other."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if f.log:
            x = np.log1p(np.maximum(x, 0.0))
        z = (x - f.mean) / f.std
    z = np.clip(z, -NUMERIC_Z_CLIP, NUMERIC_Z_CLIP)
    return np.where(np.isnan(z), 0.0, z).astype(np.float32)


@dataclass
class FeatureMap:
    features: dict[str, Feature]
    text_offset: int               # first id of the hashed text block
    query_buckets: int
    max_query_tokens: int
    max_list_len: int
    time_buckets: int
    vocab_size: int                # size of the shared embedding table
    gate: list[str]                # features forming DiffusionGS's gate (user profile + context)
    user_key_type: str             # "int" | "str": the dtype of user_id in the data
    item_key_type: str
    has_purchase: bool
    has_position: bool
    max_position: int
    item_vocab: list[str] = field(default_factory=list)  # all known items; row = 2 + index
    has_category: str | None = None  # name of the item category feature, if any

    # ---- layout -------------------------------------------------------------------------
    def role_features(self, role: str, sparse: bool | None = None) -> list[Feature]:
        out = [f for f in self.features.values() if f.role == role]
        if sparse is not None:
            out = [f for f in out if f.sparse == sparse]
        return out

    def slot_layout(self, role: str) -> list[tuple[Feature, int, int]]:
        """(feature, first slot, number of slots) of the role's sparse id matrix."""
        layout, pos = [], 0
        for f in self.role_features(role, sparse=True):
            layout.append((f, pos, f.slots))
            pos += f.slots
        return layout

    def n_slots(self, role: str) -> int:
        return sum(f.slots for f in self.role_features(role, sparse=True))

    def n_numeric(self, role: str) -> int:
        return len(self.role_features(role, sparse=False))

    # ---- encoding (also used by serving for single requests) ----------------------------
    def encode_text(self, texts, max_tokens: int) -> np.ndarray:
        """Strings -> [n, max_tokens] global ids in the hashed text block (0 = padding)."""
        texts = pd.Series(texts, dtype=object).fillna("").astype(str)
        uniq, inverse = np.unique(texts.to_numpy(dtype=object), return_inverse=True)
        table = np.zeros((len(uniq), max_tokens), dtype=np.int64)
        for i, t in enumerate(uniq):
            toks = tokenize(t, max_tokens)
            if toks:
                h = stable_hash(np.array(toks, dtype=object)) % np.uint64(self.query_buckets)
                table[i, : len(toks)] = h.astype(np.int64) + self.text_offset
        return table[inverse.reshape(-1)]

    def encode_sparse(self, role: str, df: pd.DataFrame) -> np.ndarray:
        """A role's sparse columns of ``df`` -> [n, n_slots(role)] global ids."""
        n = len(df)
        out = np.zeros((n, self.n_slots(role)), dtype=np.int64)
        for f, start, width in self.slot_layout(role):
            if f.name not in df.columns:
                continue
            col = df[f.name]
            if f.type == "text":
                out[:, start:start + width] = self.encode_text(col, width)
            elif f.type == "categorical":
                out[:, start] = self._lookup(f, col)
            else:  # list
                lists = col.map(lambda v, w=width: [] if v is None or (np.isscalar(v) and pd.isna(v)) else list(v)[:w])
                lens = lists.map(len).to_numpy()
                flat = pd.Series([x for lst in lists for x in lst], dtype=object)
                ids = self._lookup(f, flat)
                rows = np.repeat(np.arange(n), lens)
                cols = np.concatenate([np.arange(k) for k in lens]) if n else np.zeros(0, dtype=np.int64)
                out[rows, start + cols] = ids
        return out

    def encode_numeric(self, role: str, df: pd.DataFrame) -> np.ndarray:
        feats = self.role_features(role, sparse=False)
        out = np.zeros((len(df), len(feats)), dtype=np.float32)
        for j, f in enumerate(feats):
            if f.name not in df.columns:
                continue
            x = pd.to_numeric(df[f.name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            out[:, j] = standardize_numeric(f, x)
        return out

    def _lookup(self, f: Feature, values: pd.Series) -> np.ndarray:
        """Values -> global ids; unseen values -> the feature's OOV id; nulls -> 0."""
        index = pd.Index(f.vocab)
        keys = values.astype(object).where(values.notna(), None)
        strs = keys.map(lambda v: None if v is None else canonical_key(v))
        local = index.get_indexer(strs.fillna("\x00__null__"))
        ids = np.where(local >= 0, f.offset + 1 + local, f.offset)  # offset itself = OOV
        ids[strs.isna().to_numpy()] = 0
        return ids.astype(np.int64)

    # ---- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = {k: asdict(v) for k, v in self.features.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureMap:
        d = dict(d)
        d["features"] = {k: Feature(**v) for k, v in d["features"].items()}
        return cls(**d)

    def describe(self) -> str:
        lines = []
        for role in ROLES:
            fs = self.role_features(role)
            if fs:
                lines.append(f"  {role:9s}: " + ", ".join(
                    f"{f.name} ({f.type}{', ' + str(len(f.vocab)) + ' values' if f.type in ('categorical', 'list') else ''})"
                    for f in fs))
        lines.append(f"  gate     : {', '.join(self.gate) or '(none)'}")
        return "\n".join(lines)


def canonical_key(v) -> str:
    """Canonical string key of a categorical value (1 and 1.0 and '1' are the same value)."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def infer_type(series: pd.Series) -> str:
    """strings/ints/bools -> categorical, floats -> numeric, lists -> list (the documented rule)."""
    if pd.api.types.is_float_dtype(series):
        return "numeric"
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_integer_dtype(series):
        return "categorical"
    sample = series.dropna()
    if len(sample) and isinstance(sample.iloc[0], list | tuple | np.ndarray):
        return "list"
    return "categorical"


def build_vocab(values: pd.Series, min_count: int, is_list: bool) -> list[str]:
    if is_list:
        values = values.dropna().explode().dropna()
    else:
        values = values.dropna()
    if len(values) == 0:
        return []
    counts = values.map(canonical_key).value_counts(sort=False)
    kept = counts[counts >= min_count].index.tolist()
    return sorted(kept)


def fit_numeric(f: Feature, values: pd.Series) -> None:
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return
    if x.min() >= 0 and x.max() > 1000:
        f.log = True
        x = np.log1p(x)
    f.mean = float(x.mean())
    f.std = float(x.std()) or 1.0

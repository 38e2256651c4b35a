"""History and profile store for serving: SQLite (a file, or in memory), thread-safe.

Tables::

    behaviors(id INTEGER PRIMARY KEY, user_id TEXT, timestamp INTEGER, item_id TEXT, action TEXT,
              query TEXT, features TEXT,      -- features: JSON of extra behaviour columns, or NULL
              session TEXT)                   -- the behaviour's session id (canonical string), or NULL
    users(user_id TEXT PRIMARY KEY, profile TEXT)   -- JSON of the users.parquet columns
    meta(key TEXT PRIMARY KEY, value TEXT)

indexed by ``(user_id, timestamp)``. User and item ids are stored as their canonical strings (the
same keys the feature map uses, so ``7``, ``7.0`` and ``"7"`` are one user). Behaviours with equal
timestamps keep insertion order (``id``), which for a loaded dataset is its file order, the order
the training loader uses. A store created before the ``session`` column existed gets it (all NULL)
when it is opened.

One connection guarded by a lock: reads are ~tens of microseconds, far below model time, and the
file is opened in WAL mode so ``qdrank store load`` or another process can write beside a server.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qdrank.data import schema
from qdrank.data.features import canonical_key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS behaviors (
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    action TEXT NOT NULL,
    query TEXT,
    features TEXT,
    session TEXT
);
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, profile TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
_INDEX = "CREATE INDEX IF NOT EXISTS behaviors_user_time ON behaviors (user_id, timestamp)"
_RESERVED_BEH = ("user_id", "item_id", "timestamp", "action", "query", schema.SESSION)


def user_key(user_id: Any) -> str:
    return canonical_key(user_id)


class HistoryStore:
    """Behaviours and user profiles by user id. ``path=None`` or ``":memory:"`` keeps them in memory."""

    def __init__(self, path: str | Path | None = None):
        self.path = None if path in (None, ":memory:") else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                     timeout=30.0, isolation_level=None)
        c = self._conn
        if self.path is not None:
            c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.executescript(_SCHEMA)
        if "session" not in {row[1] for row in c.execute("PRAGMA table_info(behaviors)")}:
            c.execute("ALTER TABLE behaviors ADD COLUMN session TEXT")  # a store made before sessions
        c.execute(_INDEX)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reads --------------------------------------------------------------------------------
    def _recent(self, user_id: Any, before: int, limit: int) -> list[tuple]:
        """(item_id, timestamp, action, query, features JSON, session) of the user's most recent
        ``limit`` behaviours with timestamp < ``before``, chronological."""
        if limit <= 0:
            return []
        with self._lock:
            rows = self._conn.execute(
                "SELECT item_id, timestamp, action, query, features, session FROM behaviors "
                "WHERE user_id = ? AND timestamp < ? ORDER BY timestamp DESC, id DESC LIMIT ?",
                (user_key(user_id), int(before), int(limit))).fetchall()
        rows.reverse()
        return rows

    def history(self, user_id: Any, before: int, limit: int) -> list[dict[str, Any]]:
        """The user's most recent ``limit`` behaviours with timestamp < ``before``, chronological."""
        out = []
        for item, ts, action, query, feats, session in self._recent(user_id, before, limit):
            d = json.loads(feats) if feats else {}
            d.update(item_id=item, timestamp=ts, action=action, query=query, session=session)
            out.append(d)
        return out

    def history_columns(self, user_id: Any, before: int, limit: int) -> dict[str, list]:
        """:meth:`history` by column (``item_id``, ``timestamp``, ``action``, ``query``, ``session``,
        then every behaviour feature some row has; None where a row lacks it): no dict per behaviour,
        which is most of the cost of a 10,000-behaviour read."""
        rows = self._recent(user_id, before, limit)
        if not rows:
            return {"item_id": [], "timestamp": [], "action": [], "query": [], "session": []}
        item, ts, action, query, feats, session = map(list, zip(*rows))
        out: dict[str, list] = {"item_id": item, "timestamp": ts, "action": action, "query": query,
                                "session": session}
        if feats.count(None) != len(feats):
            parsed = [json.loads(f) if f else {} for f in feats]
            for k in dict.fromkeys(k for d in parsed for k in d):
                if k not in out:
                    out[k] = [d.get(k) for d in parsed]
        return out

    def profile(self, user_id: Any) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT profile FROM users WHERE user_id = ?",
                                     (user_key(user_id),)).fetchone()
        return json.loads(row[0]) if row else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            nb = self._conn.execute("SELECT COUNT(*) FROM behaviors").fetchone()[0]
            nu = self._conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]
        return {"behaviors": int(nb), "users": int(nu)}

    # ---- writes -------------------------------------------------------------------------------
    def append(self, events: Iterable[dict[str, Any]]) -> int:
        """Append behaviours: dicts with user_id, item_id, timestamp, action, optional query and
        session, and behaviour features (every other key)."""
        rows = []
        for e in events:
            feats = {k: v for k, v in e.items() if k not in _RESERVED_BEH}
            session = e.get(schema.SESSION)
            rows.append((user_key(e["user_id"]), int(e["timestamp"]), canonical_key(e["item_id"]), str(e["action"]),
                         e.get("query"), json.dumps(feats, allow_nan=False) if feats else None,
                         None if session is None else canonical_key(session)))
        self._insert_behaviors(rows)
        return len(rows)

    def set_profiles(self, profiles: dict[Any, dict[str, Any]]) -> None:
        rows = [(user_key(u), json.dumps(p, allow_nan=False, default=_json_default)) for u, p in profiles.items()]
        with self._lock:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO users (user_id, profile) VALUES (?, ?)", rows)
            self._conn.execute("COMMIT")

    def _insert_behaviors(self, rows: Sequence[tuple]) -> None:
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany("INSERT INTO behaviors (user_id, timestamp, item_id, action, query, "
                                       "features, session) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def clear(self) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM behaviors")
            self._conn.execute("DELETE FROM users")

    # ---- bulk load ----------------------------------------------------------------------------
    def load_dataset(self, data_dir: str | Path, chunk: int = 200_000, replace: bool = True) -> dict[str, int]:
        """Load a canonical dataset's behaviours.parquet (its ``session`` column too, when it has
        one) and users.parquet profiles."""
        data_dir = Path(data_dir)
        schema.validate_dataset(data_dir)
        if replace:
            self.clear()
        beh = pd.read_parquet(data_dir / schema.BEHAVIORS)
        extra = [c for c in beh.columns if c not in _RESERVED_BEH]
        users = _keys(beh["user_id"])
        items = _keys(beh["item_id"])
        ts = beh["timestamp"].to_numpy(dtype=np.int64).tolist()
        action = beh["action"].astype(object).where(beh["action"].notna(), None).tolist()
        if "query" in beh.columns:
            query = beh["query"].astype(object).where(beh["query"].notna(), None).tolist()
        else:
            query = [None] * len(beh)
        session: list[str | None] = [None] * len(beh)
        if schema.SESSION in beh.columns:
            col = beh[schema.SESSION]
            known = col.notna().to_numpy()
            codes = np.full(len(beh), None, dtype=object)
            codes[known] = _keys(col[known])
            session = codes.tolist()
        feats: list[str | None] = [None] * len(beh)
        if extra:
            feats = beh[extra].to_json(orient="records", lines=True).splitlines()
        self._conn.execute("DROP INDEX IF EXISTS behaviors_user_time")  # bulk insert, then index
        try:
            for s in range(0, len(beh), chunk):
                e = min(s + chunk, len(beh))
                self._insert_behaviors(list(zip(users[s:e], ts[s:e], items[s:e], action[s:e], query[s:e],
                                                feats[s:e], session[s:e])))
        finally:
            with self._lock:
                self._conn.execute(_INDEX)
        n_users = 0
        f = data_dir / schema.USERS
        if f.exists():
            u = pd.read_parquet(f)
            cols = [c for c in u.columns if c != "user_id"]
            recs = u[cols].to_json(orient="records", lines=True).splitlines() if cols else ["{}"] * len(u)
            rows = list(zip(_keys(u["user_id"]), recs))
            with self._lock:
                self._conn.execute("BEGIN")
                self._conn.executemany("INSERT OR REPLACE INTO users (user_id, profile) VALUES (?, ?)", rows)
                self._conn.execute("COMMIT")
            n_users = len(rows)
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('source', ?)",
                               (str(data_dir.resolve()),))
            self._conn.execute("ANALYZE")
        return {"behaviors": len(beh), "users": n_users}


def _keys(s: pd.Series) -> list[str]:
    if pd.api.types.is_integer_dtype(s):
        return s.astype(np.int64).astype(str).tolist()
    return [canonical_key(v) for v in s.tolist()]


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")

"""The serving API's request rules, checked fast, and its response types.

Requests are decoded with msgspec (C speed) into plain dicts and lists, then checked here by
:func:`check_rank_request` / :func:`check_events`: column-wise over candidates and behaviours (a
few C-level passes per key), falling back to a per-value walk only to name the first bad field.
No per-candidate objects are built. Every refusal is a :class:`RequestError` naming the field
(``loc``, as pydantic does) and becomes an HTTP 422 (413 for the size limits).

The rules, which :func:`request_openapi` publishes as the OpenAPI schema (so docs, fuzzers and the
code agree):

* ids (``user_id``, ``item_id``): a JSON integer in the signed 64-bit range, or a string of 1 to
  :data:`MAX_ID_LENGTH` characters. Strings are never turned into numbers (a 257-digit string is
  refused, not read as an int). An integral float (``7.0``) is read as the int.
* ``timestamp``: integer seconds in [-2**40, 2**40].
* a behaviour's optional ``session`` (inline history, events): an id as above, or null (unknown);
  consecutive behaviours with different ids start a new session (``Batch.hist_session``).
* feature values: string (<= 4096 characters), finite number, bool, null, or a list (<= 1024) of
  those. Objects are refused. Numeric features also take a numeric string (``"19.9"``); their
  standardised value is clipped to +/- :data:`NUMERIC_Z_CLIP` (so ``1e300`` cannot blow up a score).

The pydantic models (:class:`RankRequest`, ...) are the same rules for Python callers that like
typed objects; :class:`~qdrank.serving.ranker.Ranker` accepts them or plain dicts.
"""

from __future__ import annotations

import math
import re
from itertools import repeat
from typing import Annotated, Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from qdrank.data.features import NUMERIC_Z_CLIP  # one encoding of numerics for training and serving
from qdrank.data.schema import MAX_ID_CHARS, TS_LIMIT  # one definition: data validation refuses the same

MAX_ID_LENGTH = MAX_ID_CHARS
MAX_QUERY_CHARS = 4096
MAX_VALUE_CHARS = 4096
MAX_LIST_VALUES = 1024
MAX_FEATURES = 256
TS_MIN, TS_MAX = -TS_LIMIT, TS_LIMIT  # seconds; keeps time gaps far from int64 overflow
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NUMBER_RE = re.compile(r"^[ \t\n\r]*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?[ \t\n\r]*$")
NUMBER_PATTERN = NUMBER_RE.pattern
BEHAVIOR_FIELDS = ("item_id", "timestamp", "action", "query", "session")
RANK_FIELDS = ("user_id", "query", "context", "profile", "timestamp", "history", "candidates")


class RequestError(ValueError):
    """The request is at fault. ``loc`` names the field (as pydantic does); ``status`` is the HTTP code."""

    def __init__(self, loc: tuple, msg: str, status: int = 422, kind: str = "value_error"):
        super().__init__(f"{'.'.join(str(x) for x in loc)}: {msg}")
        self.loc, self.msg, self.status, self.kind = tuple(loc), msg, status, kind

    def detail(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg[:500], "type": self.kind}


_DECODER = msgspec.json.Decoder()


def decode_json(body: bytes) -> Any:
    """Bytes -> Python objects; malformed JSON (NaN/Infinity literals included) -> 422 at ``body``."""
    try:
        return _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise RequestError(("body",), f"invalid JSON: {str(e)[:200]}", kind="json_invalid") from None
    except RecursionError:
        raise RequestError(("body",), "invalid JSON: nested too deeply", kind="json_invalid") from None


# ---- single values ---------------------------------------------------------------------------------
def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool", type(None): "null",
            float: "a number", int: "an integer"}.get(type(v), type(v).__name__)


def check_id(v: Any, loc: tuple) -> int | str:
    """An id: int64 integer or 1..MAX_ID_LENGTH characters; an integral float becomes the int."""
    t = type(v)
    if t is int:
        if INT64_MIN <= v <= INT64_MAX:
            return v
        raise RequestError(loc, "integer id outside the signed 64-bit range (send it as a string)")
    if t is str:
        if 1 <= len(v) <= MAX_ID_LENGTH:
            return v
        raise RequestError(loc, f"string id must have 1 to {MAX_ID_LENGTH} characters, got {len(v)}",
                           kind="string_length")
    if t is float and v.is_integer() and INT64_MIN <= v <= INT64_MAX:
        return int(v)
    raise RequestError(loc, f"expected an integer or string id, got {_kind(v)}", kind="type_error")


def check_timestamp(v: Any, loc: tuple) -> int:
    if type(v) is float and v.is_integer():
        v = int(v)
    if type(v) is not int:
        raise RequestError(loc, f"expected integer seconds, got {_kind(v)}", kind="type_error")
    if not TS_MIN <= v <= TS_MAX:
        raise RequestError(loc, f"timestamp outside [{TS_MIN}, {TS_MAX}] seconds")
    return v


def check_string(v: Any, loc: tuple, max_len: int, min_len: int = 0) -> str:
    if type(v) is not str:
        raise RequestError(loc, f"expected a string, got {_kind(v)}", kind="type_error")
    if not min_len <= len(v) <= max_len:
        raise RequestError(loc, f"string must have {min_len} to {max_len} characters, got {len(v)}",
                           kind="string_length")
    return v


def _check_scalar(v: Any, loc: tuple) -> None:
    t = type(v)
    if t is float:
        if not math.isfinite(v):
            raise RequestError(loc, "NaN/inf is not a valid number (send null for a missing value)")
    elif t is str:
        if len(v) > MAX_VALUE_CHARS:
            raise RequestError(loc, f"string longer than {MAX_VALUE_CHARS} characters", kind="string_length")
    elif not (t is int or t is bool or v is None):
        raise RequestError(loc, f"expected a string, number, bool or null, got {_kind(v)}", kind="type_error")


def check_value(v: Any, loc: tuple) -> None:
    """A feature value: a scalar or a list of scalars."""
    if type(v) is list:
        if len(v) > MAX_LIST_VALUES:
            raise RequestError(loc, f"list longer than {MAX_LIST_VALUES}", kind="too_long")
        for i, x in enumerate(v):
            _check_scalar(x, (*loc, i))
    else:
        _check_scalar(v, loc)


def check_typed(v: Any, ftype: str, loc: tuple) -> None:
    """A value of a feature the model knows: its type's rule (see :func:`feature_schema`)."""
    check_value(v, loc)
    t = type(v)
    if v is None or ftype == "list":
        return
    if ftype == "numeric":
        if t is str and not NUMBER_RE.match(v):
            raise RequestError(loc, f"numeric feature: {v[:40]!r} is not a number")
        if t is list:
            raise RequestError(loc, "numeric feature: expected a number, got a list", kind="type_error")
    elif ftype == "text":
        if t is not str:
            raise RequestError(loc, f"text feature: expected a string, got {_kind(v)}", kind="type_error")
    elif t is list:  # categorical
        raise RequestError(loc, "categorical feature: expected a single value, got a list", kind="type_error")


def check_features(d: Any, loc: tuple, known: dict[str, str] | None = None) -> dict[str, Any]:
    """A dict of feature values (``context``, ``profile``); ``known`` = {feature: type} of the run."""
    if type(d) is not dict:
        raise RequestError(loc, f"expected an object of feature values, got {_kind(d)}", kind="type_error")
    if len(d) > MAX_FEATURES:
        raise RequestError(loc, f"more than {MAX_FEATURES} features", kind="too_long")
    for k, v in d.items():
        if len(k) > MAX_ID_LENGTH:
            raise RequestError((*loc, k[:40]), f"feature name longer than {MAX_ID_LENGTH} characters")
        if known and k in known:
            check_typed(v, known[k], (*loc, k))
        else:
            check_value(v, (*loc, k))
    return d


# ---- lists of objects, column-wise ---------------------------------------------------------------------
_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


def _column_ok(vals: list, kind: str) -> bool:
    """True when every value of a column is valid as it is (C-level passes); False = walk it."""
    types = set(map(type, vals))
    if kind == "id":
        if types == {str}:
            lens = list(map(len, vals))
            return min(lens) >= 1 and max(lens) <= MAX_ID_LENGTH
        if types == {int}:
            return INT64_MIN <= min(vals) and max(vals) <= INT64_MAX
        if not types <= {int, str}:
            return False
        ints = [v for v in vals if type(v) is int]
        strs = [v for v in vals if type(v) is str]
        return (INT64_MIN <= min(ints) and max(ints) <= INT64_MAX
                and min(map(len, strs)) >= 1 and max(map(len, strs)) <= MAX_ID_LENGTH)
    if kind == "timestamp":
        return types == {int} and TS_MIN <= min(vals) and max(vals) <= TS_MAX
    if kind == "session":  # an id or null
        ids = [v for v in vals if v is not None]
        return not ids or _column_ok(ids, "id")
    if kind == "action":
        return types == {str} and min(map(len, vals)) >= 1 and max(map(len, vals)) <= MAX_ID_LENGTH
    if kind == "query":
        if types == {str}:
            return max(map(len, vals)) <= MAX_QUERY_CHARS
        if not types <= {str, type(None)}:
            return False
        strs = [v for v in vals if v is not None]
        return not strs or max(map(len, strs)) <= MAX_QUERY_CHARS
    # a feature value (typed kinds: a known feature's rule, checked per value when not plain numbers)
    if kind == "numeric" and str in types:
        return False
    if kind == "text" and not types <= {str, type(None)}:
        return False
    if not types <= _SCALAR_TYPES:
        return False
    if float in types:  # C-level passes: a column of 500 prices costs ~10 us, not ~100
        floats = vals if types == {float} else [v for v in vals if type(v) is float]
        if not all(map(math.isfinite, floats)):
            return False
    if str in types and max(len(v) for v in vals if type(v) is str) > MAX_VALUE_CHARS:
        return False
    return True


def _check_one(v: Any, kind: str, loc: tuple) -> Any:
    if kind == "id":
        return check_id(v, loc)
    if kind == "timestamp":
        return check_timestamp(v, loc)
    if kind == "session":
        return v if v is None else check_id(v, loc)
    if kind == "action":
        return check_string(v, loc, MAX_ID_LENGTH, 1)
    if kind == "query":
        return v if v is None else check_string(v, loc, MAX_QUERY_CHARS)
    if kind in ("numeric", "categorical", "text", "list"):
        check_typed(v, kind, loc)
    else:
        check_value(v, loc)
    return v


def check_rows(rows: Any, loc: tuple, fields: dict[str, tuple[str, bool]], min_items: int = 0,
               known: dict[str, str] | None = None) -> list[dict]:
    """A list of objects with known ``fields`` (name -> (kind, required)) plus feature values
    (``known`` = {feature: type} of the run's features of this role).

    Checked column by column; only when a column fails is it walked value by value to name the
    first bad one (and integral-float ids / timestamps are normalised there)."""
    if type(rows) is not list:
        raise RequestError(loc, f"expected a list, got {_kind(rows)}", kind="type_error")
    if len(rows) < min_items:
        raise RequestError(loc, f"at least {min_items} item(s) required", kind="too_short")
    if not rows:
        return rows
    if set(map(type, rows)) != {dict}:
        i = next(i for i, r in enumerate(rows) if type(r) is not dict)
        raise RequestError((*loc, i), f"expected an object, got {_kind(rows[i])}", kind="type_error")
    max_keys = MAX_FEATURES + len(fields)
    if max(map(len, rows)) > max_keys:
        i = next(i for i, r in enumerate(rows) if len(r) > max_keys)
        raise RequestError((*loc, i), f"more than {MAX_FEATURES} features", kind="too_long")
    for name, (_, required) in fields.items():
        if required and not all(map(dict.__contains__, rows, repeat(name))):
            i = next(i for i, r in enumerate(rows) if name not in r)
            raise RequestError((*loc, i, name), "field required", kind="missing")
    keys = set().union(*rows)
    if len(keys) > 4 * max_keys:  # wildly different keys per row: the per-row walk is cheaper
        for i, r in enumerate(rows):
            _check_row(r, (*loc, i), fields, known or {})
        return rows
    for k in keys:
        if len(k) > MAX_ID_LENGTH:
            i = next(i for i, r in enumerate(rows) if k in r)
            raise RequestError((*loc, i, k[:40]), f"feature name longer than {MAX_ID_LENGTH} characters")
        kind = fields[k][0] if k in fields else (known or {}).get(k, "value")
        vals = list(map(dict.get, rows, repeat(k)))  # absent = None: valid for every optional field
        if not _column_ok(vals, kind):
            for i, r in enumerate(rows):
                if k in r:
                    r[k] = _check_one(r[k], kind, (*loc, i, k))
    return rows


def _check_row(r: dict, loc: tuple, fields: dict[str, tuple[str, bool]], known: dict[str, str]) -> None:
    for k in list(r):
        if len(k) > MAX_ID_LENGTH:
            raise RequestError((*loc, k[:40]), f"feature name longer than {MAX_ID_LENGTH} characters")
        r[k] = _check_one(r[k], fields[k][0] if k in fields else known.get(k, "value"), (*loc, k))


CANDIDATE_FIELDS = {"item_id": ("id", True)}
BEHAVIOR_KINDS = {"item_id": ("id", True), "timestamp": ("timestamp", True), "action": ("action", True),
                  "query": ("query", False), "session": ("session", False)}
EVENT_KINDS = {"user_id": ("id", True), **BEHAVIOR_KINDS}


def check_rank_request(obj: Any, max_candidates: int | None = None, max_history: int | None = None,
                       known: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """A decoded ``/v1/rank`` body -> the same dict, checked and normalised (defaults filled in).

    The size limits (``max_candidates``, ``max_history``: 413) are checked before the contents;
    ``known`` = role -> {feature: type} of the run (each known feature's values follow its type)."""
    known = known or {}
    if type(obj) is not dict:
        raise RequestError(("body",), f"expected a JSON object, got {_kind(obj)}", kind="type_error")
    for k in obj:
        if k not in RANK_FIELDS:
            raise RequestError(("body", str(k)[:40]), "extra field not permitted", kind="extra_forbidden")
    for k in ("user_id", "candidates"):
        if k not in obj:
            raise RequestError(("body", k), "field required", kind="missing")
    out = {"user_id": check_id(obj["user_id"], ("body", "user_id")),
           "query": check_string(obj.get("query", ""), ("body", "query"), MAX_QUERY_CHARS),
           "context": check_features(obj.get("context", {}), ("body", "context"), known.get("context")),
           "profile": None, "timestamp": None, "history": None, "candidates": obj["candidates"]}
    if obj.get("profile") is not None:
        out["profile"] = check_features(obj["profile"], ("body", "profile"), known.get("user"))
    if obj.get("timestamp") is not None:
        out["timestamp"] = check_timestamp(obj["timestamp"], ("body", "timestamp"))
    cands, hist = obj["candidates"], obj.get("history")
    if max_candidates is not None and type(cands) is list and len(cands) > max_candidates:
        raise RequestError(("body", "candidates"), f"{len(cands)} candidates; at most {max_candidates} per "
                           "request (serving max_candidates)", 413, "too_large")
    if max_history is not None and type(hist) is list and len(hist) > max_history:
        raise RequestError(("body", "history"), f"{len(hist)} inline behaviours; at most {max_history} "
                           "(serving max_history_inline)", 413, "too_large")
    out["candidates"] = check_rows(cands, ("body", "candidates"), CANDIDATE_FIELDS, 1, known.get("candidate"))
    if hist is not None:
        out["history"] = check_rows(hist, ("body", "history"), BEHAVIOR_KINDS, 0, known.get("behavior"))
    return out


def check_events(obj: Any, max_events: int | None = None, known: dict[str, str] | None = None
                 ) -> list[dict[str, Any]]:
    """A decoded ``/v1/events`` body -> its checked list of events."""
    if type(obj) is not dict:
        raise RequestError(("body",), f"expected a JSON object, got {_kind(obj)}", kind="type_error")
    for k in obj:
        if k != "events":
            raise RequestError(("body", str(k)[:40]), "extra field not permitted", kind="extra_forbidden")
    if "events" not in obj:
        raise RequestError(("body", "events"), "field required", kind="missing")
    ev = obj["events"]
    if max_events is not None and type(ev) is list and len(ev) > max_events:
        raise RequestError(("body", "events"), f"{len(ev)} events; at most {max_events} per call (serving "
                           "max_events)", 413, "too_large")
    return check_rows(ev, ("body", "events"), EVENT_KINDS, 1, known)


# ---- responses (msgspec structs: built and encoded at C speed) ----------------------------------------
class RankedItem(msgspec.Struct):
    """One ranked candidate."""

    item_id: int | str
    ctr: float
    cvr: float | None  # post-click conversion probability; null without a CVR task
    score: float
    known: bool  # false when the item id was unknown to the model (OOV embedding)


class RankResponse(msgspec.Struct):
    """Ranked candidates (best score first) and what the model knew about the request."""

    model: str
    timestamp: int  # request time used for the history rule (seconds)
    formula: str  # 'ctr' or 'ctr_cvr' (score = ctr * cvr ** alpha)
    alpha: float
    candidates: list[RankedItem]  # all candidates, best score first
    unknown_items: int  # candidates whose item id the model does not know
    unknown_user: bool  # the user id is unknown to the model (OOV embedding)
    unknown_users: int  # 0 or 1: unknown_user as a count
    unknown_history_items: int
    history_used: int  # behaviours that entered the model (strictly earlier, most recent)
    history_source: str  # 'inline', 'store' or 'none'

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class EventsResponse(msgspec.Struct):
    appended: int


class ErrorItem(msgspec.Struct):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(msgspec.Struct):
    detail: list[ErrorItem] | str


_ENCODER = msgspec.json.Encoder()


def encode_json(obj: Any) -> bytes:
    return _ENCODER.encode(obj)


# ---- the published schema ----------------------------------------------------------------------------
SCALAR_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "string", "maxLength": MAX_VALUE_CHARS}, {"type": "number"},
                                           {"type": "boolean"}, {"type": "null"}]}
VALUE_SCHEMA: dict[str, Any] = {"anyOf": [*SCALAR_SCHEMA["anyOf"],
                                          {"type": "array", "items": SCALAR_SCHEMA, "maxItems": MAX_LIST_VALUES}]}
ID_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
                                       {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}]}
TS_SCHEMA: dict[str, Any] = {"type": "integer", "minimum": TS_MIN, "maximum": TS_MAX}


def feature_schema(ftype: str | None) -> dict[str, Any]:
    """What a value of a feature of this type may be (None: a feature the model does not know)."""
    if ftype == "numeric":
        return {"anyOf": [{"type": "number"}, {"type": "boolean"}, {"type": "null"},
                          {"type": "string", "pattern": NUMBER_PATTERN, "maxLength": MAX_VALUE_CHARS}],
                "description": f"numeric; standardised and clipped to +/-{NUMERIC_Z_CLIP:g} training std"}
    if ftype == "categorical":
        return {**SCALAR_SCHEMA, "description": "categorical: one value"}
    if ftype == "text":
        return {"anyOf": [{"type": "string", "maxLength": MAX_VALUE_CHARS}, {"type": "null"}],
                "description": "text"}
    if ftype == "list":
        return {**VALUE_SCHEMA, "description": "list feature: values or one value"}
    return VALUE_SCHEMA


def _object(fixed: dict[str, Any], required: list[str], known: dict[str, str], description: str) -> dict:
    props = {**fixed, **{k: feature_schema(t) for k, t in known.items() if k not in fixed}}
    return {"type": "object", "description": description, "properties": props, "required": required,
            "additionalProperties": VALUE_SCHEMA, "propertyNames": {"maxLength": MAX_ID_LENGTH},
            "maxProperties": MAX_FEATURES + len(fixed)}


def request_openapi(known: dict[str, dict[str, str]], max_candidates: int, max_history: int, max_events: int
                    ) -> dict[str, dict[str, Any]]:
    """JSON schemas of the request bodies; ``known`` = role -> {feature name: type} of the run."""
    feats = {r: {k: t for k, t in known.get(r, {}).items()} for r in ("user", "context", "candidate", "behavior")}
    q = {"type": "string", "maxLength": MAX_QUERY_CHARS}
    behavior = {"item_id": ID_SCHEMA, "timestamp": TS_SCHEMA,
                "action": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
                "query": {"anyOf": [q, {"type": "null"}]},
                "session": {"anyOf": [*ID_SCHEMA["anyOf"], {"type": "null"}],
                            "description": "session id; null = unknown"}}
    ctx = _object({}, [], feats["context"], "request features (the dataset's request columns)")
    prof = _object({}, [], feats["user"], "user features; override the store's profile")
    schemas = {
        "Candidate": _object({"item_id": ID_SCHEMA}, ["item_id"], feats["candidate"],
                             "a candidate item and its impression features"),
        "Behavior": _object(behavior, ["item_id", "timestamp", "action"], feats["behavior"],
                            "a past behaviour and its features"),
        "Event": _object({"user_id": ID_SCHEMA, **behavior}, ["user_id", "item_id", "timestamp", "action"],
                         feats["behavior"], "a behaviour appended to the store"),
    }
    schemas["RankRequest"] = {
        "type": "object", "additionalProperties": False, "required": ["user_id", "candidates"],
        "properties": {
            "user_id": ID_SCHEMA, "query": q, "context": ctx, "profile": {"anyOf": [prof, {"type": "null"}]},
            "timestamp": {"anyOf": [TS_SCHEMA, {"type": "null"}], "description": "seconds; default: now"},
            "history": {"anyOf": [{"type": "array", "items": {"$ref": "#/components/schemas/Behavior"},
                                   "maxItems": max_history},
                                  {"type": "null"}],
                        "description": "inline behaviours used instead of the store"},
            "candidates": {"type": "array", "minItems": 1, "maxItems": max_candidates,
                           "items": {"$ref": "#/components/schemas/Candidate"}},
        }}
    schemas["EventsRequest"] = {"type": "object", "additionalProperties": False, "required": ["events"],
                                "properties": {"events": {"type": "array", "minItems": 1, "maxItems": max_events,
                                                          "items": {"$ref": "#/components/schemas/Event"}}}}
    return schemas


def response_openapi() -> dict[str, dict[str, Any]]:
    _, comps = msgspec.json.schema_components((RankResponse, EventsResponse, ErrorResponse),
                                              ref_template="#/components/schemas/{name}")
    return comps


# ---- pydantic models: the same rules for Python callers ----------------------------------------------
Id = (Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
      | Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)])
Timestamp = Annotated[int, Field(ge=TS_MIN, le=TS_MAX, strict=False)]


def check_feature_values(values: dict[str, Any], where: str = "feature") -> dict[str, Any]:
    """Feature dicts: scalar values or lists of scalars, finite numbers, bounded sizes."""
    try:
        return check_features(values, (where,))
    except RequestError as e:
        raise ValueError(str(e)) from None


class _Extra(BaseModel):
    """Known keys plus free feature keys (validated as feature values)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _check_extra(self):
        if self.model_extra:
            check_feature_values(self.model_extra)
        return self

    def features(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Behavior(_Extra):
    """One past behaviour: item, time, action, the query it came from, + behaviour features."""

    item_id: Id
    timestamp: Timestamp
    action: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
    query: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] | None = None
    session: Id | None = None


class Event(Behavior):
    """A behaviour appended to the store (``POST /v1/events``): a behaviour plus its user."""

    user_id: Id


class Candidate(_Extra):
    """A candidate item plus its impression features (price shown, discount, ...)."""

    item_id: Id


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    query: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] = ""
    context: dict[str, Any] = Field(default_factory=dict)
    profile: dict[str, Any] | None = None
    timestamp: Timestamp | None = None
    history: list[Behavior] | None = None
    candidates: list[Candidate] = Field(min_length=1)

    @field_validator("context", "profile")
    @classmethod
    def _features(cls, v):
        return v if v is None else check_feature_values(v)

    def to_plain(self) -> dict[str, Any]:
        """The plain-dict form the ranker works on (extra feature keys included)."""
        return self.model_dump(exclude_none=False)


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(min_length=1)

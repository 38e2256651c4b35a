"""Request/response models of the serving API (pydantic v2), shared by the Python API and HTTP.

Feature values travel as extra keys (``{"item_id": 7, "price": 19.9}``) or in dicts (``context``,
``profile``). Values must be JSON scalars (string, number, bool, null) or lists of scalars (list
features); NaN and +/-inf are rejected with a 422 naming the field (JSON has no such numbers, but
Python's parser accepts them). Length limits that depend on the serving config (number of candidates,
inline history) are checked by the ranker and answered with 413.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

MAX_ID_CHARS = 256
MAX_QUERY_CHARS = 4096
MAX_VALUE_CHARS = 4096
MAX_LIST_VALUES = 1024
MAX_FEATURES = 256
TS_MIN, TS_MAX = -(2**40), 2**40  # seconds; keeps time gaps far from int64 overflow

Id = int | Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
Timestamp = Annotated[int, Field(ge=TS_MIN, le=TS_MAX, strict=False)]


def _check_scalar(v: Any, where: str) -> None:
    if v is None or isinstance(v, bool | int):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{where}: NaN/inf is not a valid number (send null for a missing value)")
        return
    if isinstance(v, str):
        if len(v) > MAX_VALUE_CHARS:
            raise ValueError(f"{where}: string longer than {MAX_VALUE_CHARS} characters")
        return
    raise ValueError(f"{where}: expected a string, number, bool or null, got {type(v).__name__}")


def check_feature_values(values: dict[str, Any], where: str = "feature") -> dict[str, Any]:
    """Feature dicts: scalar values or lists of scalars, finite numbers, bounded sizes."""
    if len(values) > MAX_FEATURES:
        raise ValueError(f"more than {MAX_FEATURES} features")
    for k, v in values.items():
        if len(k) > MAX_ID_CHARS:
            raise ValueError(f"feature name longer than {MAX_ID_CHARS} characters")
        if isinstance(v, list):
            if len(v) > MAX_LIST_VALUES:
                raise ValueError(f"{where} '{k}': list longer than {MAX_LIST_VALUES}")
            for x in v:
                _check_scalar(x, f"{where} '{k}'")
        else:
            _check_scalar(v, f"{where} '{k}'")
    return values


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
    action: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
    query: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] | None = None


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


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(min_length=1)


class RankedItem(BaseModel):
    item_id: int | str
    ctr: float
    cvr: float | None = Field(description="post-click conversion probability; null without a CVR task")
    score: float
    known: bool = Field(description="false when the item id was unknown to the model (OOV embedding)")


class RankResponse(BaseModel):
    model: str
    timestamp: int = Field(description="request time used for the history rule (seconds)")
    formula: str = Field(description="'ctr' or 'ctr_cvr' (score = ctr * cvr ** alpha)")
    alpha: float
    candidates: list[RankedItem] = Field(description="all candidates, best score first")
    unknown_items: int = Field(description="candidates whose item id the model does not know")
    unknown_user: bool = Field(description="the user id is unknown to the model (OOV embedding)")
    unknown_users: int = Field(description="0 or 1: unknown_user as a count")
    unknown_history_items: int
    history_used: int = Field(description="behaviours that entered the model (strictly earlier, most recent)")
    history_source: str = Field(description="'inline', 'store' or 'none'")


class EventsResponse(BaseModel):
    appended: int


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: list[ErrorItem] | str

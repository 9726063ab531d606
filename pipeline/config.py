"""Validated configs: every stage's settings are a `Config` (pydantic v2), loaded from the YAML job files.

Unknown keys, wrong types and out-of-range values are errors; `explain()` turns a validation error into one line
per problem naming the key, the value and what is allowed. `IDENTITY` names the fields that change the tokens:
they make up the store's preprocessing identity, so a rerun with other settings never appends to the same shards.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    IDENTITY: ClassVar[tuple[str, ...]] = ()  # fields that change the tokens

    def identity(self) -> dict:
        """The settings that change the tokens, recursively (nested configs contribute their own IDENTITY)."""
        out = {}
        for name in self.IDENTITY:
            value = getattr(self, name)
            out[name] = value.identity() if isinstance(value, Config) else _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def identity_hash(obj: dict, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:n]


class ConfigError(ValueError):
    """A job file that does not validate; the message has one line per problem."""


def explain(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: `key: got <value>; <what is allowed>`."""
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        value = err.get("input")
        shown = "missing" if err["type"] == "missing" else f"got {value!r}"[:120]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key or '(top level)'}: {shown}; {msg}")
    return "\n".join(lines)


def validate(cls: type[Config], data: Any, prefix: str = "") -> Config:
    """`cls(**data)` with errors turned into a ConfigError of one line per problem."""
    if isinstance(data, cls):
        return data
    try:
        return cls.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ConfigError(explain(exc, prefix)) from None

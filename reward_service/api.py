"""The reward HTTP API's request and answer, validated with pydantic.

    POST /v1/score   {"items": [{"prompt": str, "response": str}, ...]}  ->  {"scores": [float, ...]}
                     {"items": [...], "members": true}  ->  {"scores": [...], "members": [[float, ...], ...]}
    GET  /healthz    {"status": "ok", ...}

`members: true` adds each reward model's own score of each item (an ensemble's K members, in
its order; one for a plain reward model, none for rule functions alone), before aggregation
and model_weight. Without it (or false) the answer is `{"scores": [...]}` alone.

Every client error becomes a `RequestError` carrying a 4xx status and a reason; nothing a
client sends may produce a 5xx. The body is parsed by pydantic's own JSON parser, which
refuses invalid UTF-8 and lone surrogate escapes (text the tokenizer could not encode).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)


@dataclass(frozen=True)
class Limits:
    max_items: int
    """Most items in one request."""
    max_chars: int
    """Longest prompt or response, in characters."""

    @property
    def max_body_bytes(self) -> int:
        """Largest body that could still be valid: every character escaped as `\\uXXXX`."""
        return self.max_items * (2 * 6 * self.max_chars + 64) + 1024


class RequestError(Exception):
    """A client error: HTTP `status` with a JSON `detail` saying what is wrong."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: StrictStr
    """The user's prompt (the last user turn), without any chat template."""
    response: StrictStr
    """The assistant's answer, without EOS."""

    @field_validator("prompt", "response")
    @classmethod
    def _not_too_long(cls, value: str, info: ValidationInfo) -> str:
        limit = (info.context or {}).get("max_chars")
        if limit is not None and len(value) > limit:
            raise ValueError(f"longer than {limit} characters ({len(value)})")
        return value


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    items: list[ScoreItem] = Field(min_length=1)
    """The (prompt, response) pairs to score; the answer keeps their order."""
    members: StrictBool = False
    """Answer each reward model's own score of each item too (`ScoreResponse.members`)."""

    @field_validator("items")
    @classmethod
    def _not_too_many(cls, value: list[ScoreItem], info: ValidationInfo) -> list[ScoreItem]:
        limit = (info.context or {}).get("max_items")
        if limit is not None and len(value) > limit:
            raise ValueError(f"more than {limit} items ({len(value)})")
        return value


class ScoreResponse(BaseModel):
    scores: list[float]
    """One reward per item, in the request's order."""
    members: list[list[float]] | None = None
    """Asked for with `members: true`: per item, each reward model's raw score (B, K); left out otherwise."""


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "body"


def parse_score_request(body: bytes, limits: Limits) -> ScoreRequest:
    """Validate a raw request body; raises RequestError (400 unparseable, 413 too large, 422 invalid)."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes is larger than {limits.max_body_bytes}")
    try:
        return ScoreRequest.model_validate_json(
            body, context={"max_items": limits.max_items, "max_chars": limits.max_chars}
        )
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise RequestError(400, f"body is not valid UTF-8 JSON: {errors[0]['msg']}") from None
        reasons = "; ".join(f"{_where(err['loc'])}: {err['msg']}" for err in errors[:10])
        if len(errors) > 10:
            reasons += f"; and {len(errors) - 10} more"
        raise RequestError(422, reasons) from None

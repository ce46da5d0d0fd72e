"""Errors of the HTTP API, in the shape each API's clients read: OpenAI's
`{"error": {"message", "type", "param", "code"}}` under /v1 (and everywhere but /api), Ollama's
`{"error": "message"}` under /api. A request body is parsed here: JSON first (whatever the
Content-Type, as llama-server and Ollama accept `curl -d`), then a pydantic model in strict mode,
so "10" is not an integer and 1 is not a boolean; every failure names the field and what was expected.
"""
from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class StrictBody(BaseModel):
    """A request body (or part of one): types checked strictly, fields this server ignores dropped."""
    model_config = ConfigDict(strict=True, extra="ignore")


class ApiError(Exception):
    """An HTTP error answered in the route's API shape; `param` is the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(request: Request, error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    if request.url.path.startswith("/api/"):
        body: dict[str, Any] = {"error": error.message}
    else:
        body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=headers)


async def parse_body(request: Request, model: type[Model]) -> Model:
    """The request's JSON body checked against `model`; ApiError 400 saying what is wrong."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty: a JSON object is expected")
    try:
        data = json.loads(raw)
    except ValueError as e:     # JSONDecodeError, or bytes that are not UTF-8
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {json_type(data)}")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        raise ApiError(400, *describe_validation(e.errors(include_url=False))) from None


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) of pydantic errors: `max_tokens: expected an integer, got string 'ten'`."""
    parts, param = [], None
    for e in errors[:3]:
        where = field_path(e["loc"])
        param = param or where
        got = "" if e["type"] == "missing" else f", got {json_type(e.get('input'))} {_show(e.get('input'))}"
        parts.append(f"{where or 'the request body'}: {e['msg'].replace('Input should be', 'expected')}{got}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


def field_path(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def json_type(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
             list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _show(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."

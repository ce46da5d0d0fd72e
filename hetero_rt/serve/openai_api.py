"""The OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Defaults follow OpenAI's API reference, so a client written for it gets what it expects:
temperature 1.0, top_p 1.0, top_k off (top_k is an extension, as in llama-server and vLLM), a
fresh random seed; without max_tokens / max_completion_tokens the reply may fill the context;
a larger value is clamped to what the context has left after the prompt (as llama-server does).
`n` must be 1. Fields this runtime does not implement and that change no result (user, penalties,
tools, response_format, ...) are ignored; logprobs, echo, suffix and best_of > 1 are refused.
finish_reason: "stop" for an end-of-sequence token or a stop string, "length" at the token limit.
Streaming (`stream: true`) is server-sent events: a chunk with the assistant role, one chunk per
text piece, one with finish_reason, a usage chunk with `stream_options.include_usage`, `[DONE]`.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ..runtime.request import GenerationResult
from .bridge import Generation, GenerationStream
from .errors import ApiError, StrictBody, parse_body
from .service import FINISH_REASONS, Service


class StreamOptions(StrictBody):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")     # name, tool_call_id, ... reach the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None          # text, or [{"type": "text", "text": ...}] (checked by the runtime)


class Sampling(StrictBody):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Any = None             # a string or a list of strings (checked by the runtime)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: Any = None

    def limit(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def sampling(self) -> dict[str, Any]:
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p,
                "top_k": self.top_k or 0, "seed": self.seed}

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, f"n must be 1 (one choice per request), got {self.n}", "n")
        if self.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported", "logprobs")


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage]


class CompletionRequest(Sampling):
    prompt: Any                  # text or token ids, or a list holding one of them
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ApiError(400, "echo is not supported", "echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise ApiError(400, f"best_of must be 1, got {self.best_of}", "best_of")


def router(service: Service) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(service)]}

    @api.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        return model_card(service)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        body.check_supported()
        if not body.messages:
            raise ApiError(400, "messages is empty: at least one message is needed", "messages")
        messages = [chat_message(m) for m in body.messages]
        return await complete(service, request, body, service.encode(messages, "messages"), "messages", chat=True)

    @api.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        body.check_supported()
        return await complete(service, request, body, service.encode(one_prompt(body.prompt), "prompt"), "prompt",
                              chat=False)

    return api


def model_card(service: Service) -> dict:
    return {"id": service.model_name, "object": "model", "created": int(service.started), "owned_by": "hetero_rt"}


def chat_message(m: ChatMessage) -> dict[str, Any]:
    """The message as the chat template takes it; OpenAI's "developer" role is the system prompt."""
    d = m.model_dump(exclude_none=True)
    d["role"] = "system" if m.role == "developer" else m.role
    return d


def one_prompt(prompt: Any) -> Any:
    """Text or token ids; OpenAI's batch form is accepted when it holds exactly one prompt."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request is supported, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, (str, list)):
        raise ApiError(400, f"prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                       "prompt")
    return prompt


async def complete(service: Service, request: Request, body: Sampling, ids: list[int], prompt_param: str,
                   chat: bool):
    limit, limit_param = body.limit()
    max_new = service.budget(len(ids), limit, limit_param, prompt_param)
    stream = bool(body.stream)
    gen = service.generation(ids, max_new, body.sampling(), body.stop, stream)
    reply = Reply(service.model_name, chat)
    if stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return GenerationStream(gen, events(gen, reply, usage), "text/event-stream")
    result = await gen.finished(request)
    check_result(gen)
    return JSONResponse(reply.whole(result))


def check_result(gen: Generation) -> None:
    reason = gen.result.stop_reason
    if reason == "error":
        raise ApiError(500, f"generation failed: {gen.error}", kind="server_error")
    if reason not in FINISH_REASONS:      # cancelled, interrupted: the server is stopping
        raise ApiError(503, f"generation {reason}: the server is shutting down", kind="server_error")


async def events(gen: Generation, reply: "Reply", include_usage: bool) -> AsyncIterator[str]:
    if reply.chat:
        yield sse(reply.chunk({"role": "assistant", "content": ""}, None, include_usage))
    async for piece in gen.pieces():
        yield sse(reply.chunk({"content": piece}, None, include_usage))
    try:
        check_result(gen)
    except ApiError as e:
        yield sse({"error": {"message": e.message, "type": e.kind, "param": None, "code": None}})
        yield "data: [DONE]\n\n"
        return
    yield sse(reply.chunk({}, FINISH_REASONS[gen.result.stop_reason], include_usage))
    if include_usage:
        yield sse({**reply.head("chunk"), "choices": [], "usage": usage_of(gen.result)})
    yield "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage_of(res: GenerationResult) -> dict:
    prompt, completion = len(res.prompt_ids), len(res.new_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}


class Reply:
    """The response objects of one completion: chat.completion(.chunk) or text_completion."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self, kind: str) -> dict:
        obj = ("chat.completion.chunk" if kind == "chunk" else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "hetero_rt"}

    def whole(self, res: GenerationResult) -> dict:
        finish = FINISH_REASONS[res.stop_reason]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": res.text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": res.text, "logprobs": None, "finish_reason": finish}
        return {**self.head("whole"), "choices": [choice], "usage": usage_of(res)}

    def chunk(self, delta: dict, finish: str | None, include_usage: bool) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        out = {**self.head("chunk"), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out


"""The Ollama-compatible routes: POST /api/chat, POST /api/generate, GET /api/tags, GET /api/ps,
POST /api/show, GET /api/version.

As Ollama does: responses stream as NDJSON (one JSON object a line) unless `"stream": false`; the
last object has done: true, done_reason ("stop" for an end-of-sequence token or a stop string,
"length" at num_predict or the end of the context) and the counts and durations in nanoseconds
(total_duration from the request's arrival; prompt_eval_* is the prefill, eval_* the decode).
`options` takes temperature (default 0.8), top_k (40), top_p (0.9), seed (-1 or absent: random),
num_predict (-1 or absent: until the context is full; a larger value is clamped to it) and stop;
other options are ignored, as Ollama ignores options a runner lacks. An empty prompt (or no
messages) answers done_reason "load" at once, which clients use to preload a model. Errors are
`{"error": "message"}`. The `model` field is not checked: this server runs one model.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .. import __version__
from ..runtime.request import GenerationResult
from .bridge import Generation, GenerationStream
from .errors import ApiError, StrictBody, parse_body
from .service import FINISH_REASONS, Service

DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


class Options(StrictBody):
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: Any = None            # a string or a list of strings (checked by the runtime)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list | None = None


class Body(StrictBody):
    model: str | None = None
    stream: bool = True
    options: Options | None = None
    format: Any = None
    images: list | None = None

    def check_supported(self) -> None:
        if self.format:
            raise ApiError(400, "format (structured output) is not supported")
        if self.images:
            raise ApiError(400, "images are not supported: this server runs a text model")


class ChatBody(Body):
    messages: list[Message] = []

    def check_supported(self) -> None:
        super().check_supported()
        if any(m.images for m in self.messages):
            raise ApiError(400, "images are not supported: this server runs a text model")


class GenerateBody(Body):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise ApiError(400, "suffix is not supported")


def router(service: Service) -> APIRouter:
    api = APIRouter()
    card = model_card(service)

    @api.post("/api/chat")
    async def chat(request: Request):
        body = await parse_body(request, ChatBody)
        body.check_supported()
        if not body.messages:
            return JSONResponse({**head(service), "message": {"role": "assistant", "content": ""}, "done": True,
                                 "done_reason": "load"})
        messages = [m.model_dump(exclude_none=True, exclude={"images"}) for m in body.messages]
        ids = service.encode(messages, "messages")
        return await respond(service, request, body, ids, "message")

    @api.post("/api/generate")
    async def generate(request: Request):
        body = await parse_body(request, GenerateBody)
        body.check_supported()
        if not body.prompt:
            return JSONResponse({**head(service), "response": "", "done": True, "done_reason": "load"})
        if body.raw:
            prompt: Any = body.prompt
        else:
            prompt = ([{"role": "system", "content": body.system}] if body.system else [])
            prompt.append({"role": "user", "content": body.prompt})
        return await respond(service, request, body, service.encode(prompt, "prompt"), "response")

    @api.get("/api/tags")
    async def tags() -> dict:
        return {"models": [card]}

    @api.get("/api/ps")
    async def ps() -> dict:
        return {"models": [{**card, "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0}]}

    @api.post("/api/show")
    async def show() -> dict:
        return show_model(service, card)

    @api.get("/api/version")
    async def version() -> dict:
        return {"version": __version__}

    return api


async def respond(service: Service, request: Request, body: Body, ids: list[int], field: str):
    """Run the request; NDJSON pieces then the final object, or the final object alone."""
    o = body.options or Options()
    requested = None if o.num_predict is None or o.num_predict < 0 else o.num_predict
    max_new = service.budget(len(ids), requested, "options.num_predict", "prompt")
    sampling = {k: DEFAULTS[k] if getattr(o, k) is None else getattr(o, k) for k in DEFAULTS}
    sampling["seed"] = None if o.seed is None or o.seed < 0 else o.seed
    gen = service.generation(ids, max_new, sampling, o.stop, body.stream)
    if body.stream:
        return GenerationStream(gen, lines(service, gen, field), "application/x-ndjson")
    await gen.finished(request)
    check_result(gen)
    return JSONResponse(final(service, gen, field, gen.result.text))


def check_result(gen: Generation) -> None:
    reason = gen.result.stop_reason
    if reason == "error":
        raise ApiError(500, f"generation failed: {gen.error}")
    if reason not in FINISH_REASONS:
        raise ApiError(503, f"generation {reason}: the server is shutting down")


async def lines(service: Service, gen: Generation, field: str) -> AsyncIterator[str]:
    async for piece in gen.pieces():
        yield ndjson({**head(service), field: content(field, piece), "done": False})
    try:
        check_result(gen)
    except ApiError as e:
        yield ndjson({"error": e.message})
        return
    yield ndjson(final(service, gen, field, ""))


def final(service: Service, gen: Generation, field: str, text: str) -> dict:
    res: GenerationResult = gen.result
    return {**head(service), field: content(field, text), "done": True, "done_reason": FINISH_REASONS[res.stop_reason],
            "total_duration": ns(gen.total_s), "load_duration": 0,
            "prompt_eval_count": len(res.prompt_ids), "prompt_eval_duration": ns(res.prefill_s),
            "eval_count": len(res.new_ids), "eval_duration": ns(res.decode_s)}


def content(field: str, text: str) -> Any:
    return {"role": "assistant", "content": text} if field == "message" else text


def head(service: Service) -> dict:
    return {"model": service.model_name, "created_at": rfc3339(datetime.now(timezone.utc))}


def ndjson(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


def rfc3339(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def model_card(service: Service) -> dict:
    """/api/tags' entry for the model. The digest identifies the files by path, size and modification
    time; it is not a hash of their content (that would read the whole checkpoint)."""
    files = checkpoint_files(service.rt.source)
    size = sum(f.stat().st_size for f in files)
    mtime = max((f.stat().st_mtime for f in files), default=0.0)
    digest = hashlib.sha256(f"{service.rt.source.resolve()}:{size}:{mtime}".encode()).hexdigest()
    details = {"parent_model": "", "format": "gguf" if any(f.suffix == ".gguf" for f in files) else "safetensors",
               "family": service.rt.args.model_type, "families": [service.rt.args.model_type],
               "parameter_size": "", "quantization_level": ""}
    return {"name": service.model_name, "model": service.model_name,
            "modified_at": rfc3339(datetime.fromtimestamp(mtime, timezone.utc)), "size": size, "digest": digest,
            "details": details}


def checkpoint_files(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".gguf") and p.is_file())
    return [source] if source.is_file() else []


def show_model(service: Service, card: dict) -> dict:
    a, rt = service.rt.args, service.rt
    arch = a.model_type
    template = rt.tokenizer.chat_template if rt.tokenizer is not None and rt.tokenizer.chat_template else ""
    info = {"general.architecture": arch, "general.name": service.model_name,
            f"{arch}.context_length": rt.context, f"{arch}.block_count": a.num_hidden_layers,
            f"{arch}.embedding_length": a.hidden_size, f"{arch}.expert_count": a.n_routed_experts,
            f"{arch}.expert_used_count": a.num_experts_per_tok, f"{arch}.vocab_size": a.vocab_size}
    return {"license": "", "modelfile": "", "parameters": "", "template": template, "details": card["details"],
            "model_info": info, "capabilities": ["completion"], "modified_at": card["modified_at"]}

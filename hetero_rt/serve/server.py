"""serve(): the app on uvicorn, until Ctrl-C (the `hetero-rt serve` command)."""
from __future__ import annotations

import re

import uvicorn

from ..runtime.engine import Runtime
from .app import build_app


def serve(rt: Runtime, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info") -> None:
    """Serve `rt` over HTTP (OpenAI API under /v1, Ollama API under /api) until interrupted. The batcher
    runs while the server does; streams still open at Ctrl-C get 5 s to finish, then are cancelled."""
    app = build_app(rt, model_name or default_model_name(rt), api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def default_model_name(rt: Runtime) -> str:
    """The checkpoint's directory or file name: `DeepSeek-V3` for a directory, `model` for
    `model.gguf` or `model-00001-of-00004.gguf`."""
    name = rt.source.name
    if name.endswith(".gguf"):
        name = re.sub(r"-\d{5}-of-\d{5}$", "", name[:-len(".gguf")])
    return name or str(rt.source)

"""The HTTP server: an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), an
Ollama-compatible one (/api/chat, /api/generate, /api/tags, ...), /health, Prometheus /metrics and a
web chat page, over one Runtime whose batcher runs the requests together.

    rt = hetero_rt.load(path, parallel=4)
    serve(rt, port=8080)                     # or build_app(rt, "name") for any ASGI server

Modules: app (routes, errors, auth), openai_api, ollama_api, bridge (batcher thread -> asyncio),
service (what routes share), errors (API error shapes, body parsing), metrics, server (uvicorn).
"""
from .app import build_app
from .server import default_model_name, serve

__all__ = ["build_app", "serve", "default_model_name"]

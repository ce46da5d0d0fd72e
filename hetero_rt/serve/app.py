"""The HTTP application: the OpenAI routes under /v1 (openai_api), the Ollama routes under /api
(ollama_api), GET /health, GET /metrics, and the web chat page at GET /.

Errors: every failure is answered in the route's API shape (serve.errors) with a message saying what
to change: 400 for a body that is not JSON, a field of the wrong type, a value out of range or a
prompt longer than the context; 401 for a missing or wrong API key; 404 / 405 for unknown routes;
500 when the forward failed. The server keeps serving after any of them.
API key: when set, every /v1 and /api route needs `Authorization: Bearer <key>`; /health, /metrics
and the page stay open (the page asks for the key itself).
The batcher runs on its own thread for the app's lifetime (started and stopped by its lifespan).
"""
from __future__ import annotations

import contextlib
import hmac
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import HeteroRTError
from ..runtime.engine import Runtime
from . import metrics, ollama_api, openai_api
from .errors import ApiError, describe_validation, error_response
from .service import Service

STATIC = Path(__file__).parent / "static"
PROTECTED = ("/v1/", "/api/")
log = logging.getLogger("hetero_rt.serve")


def build_app(rt: Runtime, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app serving `rt` as `model_name`. Serve it with serve.server.serve, or any ASGI server."""
    service = Service(rt, model_name, api_key or None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.batcher.start()
        try:
            yield
        finally:
            rt.batcher.stop()

    app = FastAPI(title="hetero_rt", version=__version__, lifespan=lifespan)
    app.state.service = service
    add_error_handlers(app)
    app.add_middleware(InternalErrors)
    add_auth(app, service)
    app.include_router(openai_api.router(service))
    app.include_router(ollama_api.router(service))
    add_status_routes(app, service)
    return app


def add_status_routes(app: FastAPI, service: Service) -> None:
    rt = service.rt

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.model_name, "slots_busy": rt.batcher.busy_slots,
                "slots_total": rt.parallel, "queue_depth": rt.batcher.queue_depth}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = metrics.render(rt, service.metrics, service.cache_layers)
        return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            return PlainTextResponse(f"the web chat page is not installed ({page} is missing); the API is served "
                                     f"under /v1 (OpenAI) and /api (Ollama)", status_code=404)
        return FileResponse(page, media_type="text/html")


def add_auth(app: FastAPI, service: Service) -> None:
    if service.api_key is not None:
        app.add_middleware(ApiKey, key=service.api_key)


class ApiKey:
    """ASGI middleware: /v1 and /api need `Authorization: Bearer <key>` (a plain ASGI class, not
    BaseHTTPMiddleware, so streamed responses and client disconnects pass through untouched)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "no API key given" if not given else "the API key is wrong"
                error = ApiError(401, f"{what}: send the header `Authorization: Bearer <key>` with the key the "
                                      f"server was started with (--api-key)", code="invalid_api_key")
                await error_response(Request(scope), error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class InternalErrors:
    """ASGI middleware: an exception a route did not expect (a bug) is logged and answered 500 in the
    API's shape, and the connection stays usable (Starlette's own handler re-raises, and uvicorn then
    drops the keep-alive connection that the client's pool would reuse). After the response started,
    it propagates: the response is broken."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            if started:
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            error = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
            await error_response(Request(scope), error)(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(request, e)

    @app.exception_handler(HeteroRTError)
    async def runtime_error(request: Request, e: HeteroRTError) -> JSONResponse:
        return error_response(request, ApiError(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = [{**err, "loc": tuple(p for p in err.get("loc", ()) if p != "body")} for err in e.errors()]
        return error_response(request, ApiError(400, *describe_validation(errors)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        error = ApiError(e.status_code, message.get(e.status_code, str(e.detail)), kind=kind)
        return error_response(request, error, getattr(e, "headers", None))

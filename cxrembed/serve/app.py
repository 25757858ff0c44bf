"""The HTTP face of a :class:`~cxrembed.serve.service.StoreService` (FastAPI).

Routes (JSON unless said; every error is ``{"error": message}`` with a 4xx status):

- ``GET /``: the page (``static/index.html``; its script and style under ``/static/``).
- ``GET /api/store``: what the store holds and what can be asked.
- ``GET /api/search?id=ID|text=TEXT&k=10&split=test&exclude_same_patient=1``
- ``POST /api/search`` (multipart ``image``: PNG, JPEG or DICOM; the same query options).
- ``GET /api/thumb/{id}``: a PNG thumbnail of a stored image (ids of the store only).
- ``POST /api/predict`` (multipart ``image``), when the server has a head.

With a token every ``/api`` request must carry it (``Authorization: Bearer T``, or
``?token=T`` for image tags); the page and its files need none and hold no data.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route annotations.
import json
import secrets
from importlib import resources
from typing import Annotated, Any, Optional

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cxrembed.errors import ConfigError, CxrembedError, DataError, ModelError, StoreError
from cxrembed.serve.service import (ImageMissing, NotAnImage, StoreService, UnknownImage,
                                    UploadTooLarge)

#: Error class -> HTTP status (first match wins: subclasses before their bases).
STATUS = ((UnknownImage, 404), (ImageMissing, 404), (UploadTooLarge, 413), (NotAnImage, 415),
          (DataError, 422), (ConfigError, 400), (StoreError, 400), (ModelError, 400),
          (CxrembedError, 400))
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MULTIPART_SLACK = 64 * 1024  # bytes of a multipart body that are not the file
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


Split = Annotated[Optional[str], Query(description="train, val or test (default: all)")]
K = Annotated[int, Query(description="number of neighbours")]


def status_of(exc: CxrembedError) -> int:
    return next(code for kind, code in STATUS if isinstance(exc, kind))


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` (413) while it arrives,
    before the multipart parser spools it anywhere."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, int(length))
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send, seen)

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps({"error": f"request body of {size:,}+ bytes is over the server's "
                                    f"limit of {self.max_bytes:,}"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(service: StoreService, *, token: Optional[str] = None,
               allowed_hosts: Optional[list] = None) -> FastAPI:
    """The FastAPI application serving ``service``.

    Args:
        token: when given, required on every ``/api`` request.
        allowed_hosts: ``Host`` header values accepted (default: loopback names only, which
            stops a web page from reaching the server through DNS rebinding); ``["*"]``
            accepts any.
    """
    static = resources.files("cxrembed.serve") / "static"
    app = FastAPI(title="cxrembed", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.service = service
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or list(LOOPBACK_HOSTS))
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_upload_bytes + MULTIPART_SLACK)

    @app.exception_handler(CxrembedError)
    async def _known(request: Request, exc: CxrembedError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                 for e in exc.errors()]
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.query_params.get("token") or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "this server needs its token: send the header "
                                     "'Authorization: Bearer TOKEN' (or ?token=TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(check_token)]

    @app.get("/", include_in_schema=False)
    def page() -> Any:
        return FileResponse(str(static / "index.html"), headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/store", dependencies=guarded)
    def store_summary() -> dict:
        return service.summary()

    @app.get("/api/search", dependencies=guarded)
    def search_get(id: Optional[str] = None, text: Optional[str] = None, k: K = 10,
                   split: Split = None, exclude_same_patient: bool = False) -> dict:
        return service.search(image_id=id, text=text, k=k, split=split or None,
                              exclude_same_patient=exclude_same_patient)

    @app.post("/api/search", dependencies=guarded)
    def search_post(image: UploadFile = File(...), k: K = 10, split: Split = None,
                    exclude_same_patient: bool = False) -> dict:
        data = read_upload(image)
        return service.search_image(data, image.filename, k=k, split=split or None,
                                    exclude_same_patient=exclude_same_patient)

    @app.post("/api/predict", dependencies=guarded)
    def predict(image: UploadFile = File(...)) -> dict:
        return service.predict_image(read_upload(image), image.filename)

    @app.get("/api/thumb/{image_id}", dependencies=guarded)
    def thumbnail(image_id: str) -> Response:
        return Response(service.thumbnail(image_id), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    def read_upload(image: UploadFile) -> bytes:
        limit = service.limits.max_upload_bytes
        data = image.file.read(limit + 1)
        if len(data) > limit:
            raise UploadTooLarge(f"upload {image.filename} is over the limit of {limit:,} "
                                 "bytes (start the server with a larger --max-upload-mb)")
        return data

    return app

"""The exported model over HTTP: loaded and checked once, before the port opens.

    python -m serve.http                                   # http://127.0.0.1:8000, the last export
    python -m serve.http --port 8001 --model models:/classifier@champion

    curl -F images=@cat.jpg -F images=@dog.png 'http://127.0.0.1:8000/predict?top_k=3'
    curl http://127.0.0.1:8000/model

- `POST /predict`: one or more images as `multipart/form-data`, field `images`; optional query
  `top_k`. Answers `{"predictions": [{"file", "class", "probability", "top_k"}...], "model": ...}`
  in upload order. An image that cannot be scored (not an image, corrupt, over the pixel limit,
  empty) gets `"error"` in its place and the others are still scored (status 200); when none can
  be, the status is 422. A request that is not such a form, has no `images` field, is over the
  size limit or holds too many images gets a 4xx with `{"error": "..."}` naming what to change.
- `GET /health`: `{"status": "ok", ...}` once the model is loaded (it is, whenever the port is open).
- `GET /model`: the classes, the input contract (`preprocess`), the file and its SHA-256, and the
  MLflow run it came from.

Bound to 127.0.0.1 by default: there is no authentication, so expose it on another address only
behind a proxy that has some. At most 4 uploads are held in memory at once (each up to
`--max-upload-mb`) and `--threads` of them scored at once; a burst of uploads queues instead of
exhausting memory, while `/health` and `/model` go on answering.
The image decoding is `serve.preprocess`, the training images' own.
"""

import argparse
import asyncio
import ipaddress
import json
import logging
import socket
import sys
import time

LOG = logging.getLogger("serve.http")
FIELD = "images"
FIELDS = 32  # text fields a form may have besides the images (none is used)
BUFFERED = 4  # POST bodies held in memory at once (each up to --max-upload-mb); more wait, unread


def create_app(model, max_upload_bytes: int, max_images: int, max_image_pixels: int | None, threads: int = 1):
    """The FastAPI app serving `model` (a checked `serve.model.Model`), wrapped in the upload-size limit."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    from serve.predict import score

    limiter = anyio.CapacityLimiter(threads)
    # No /docs or /redoc: their pages load scripts from a CDN. /openapi.json describes the API.
    app = FastAPI(title="torch-pipeline model server", docs_url=None, redoc_url=None)
    started = time.time()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", []))
        return error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        LOG.exception("request %s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server goes on answering")

    @app.api_route("/health", methods=["GET", "HEAD"])
    def health() -> dict:
        return {"status": "ok", "model_sha256": model.sha256, "uptime_s": round(time.time() - started, 1)}

    @app.get("/model")
    def describe() -> dict:
        return model.describe()

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 1):
        if not 1 <= top_k <= len(model.classes):
            return error(422, f"top_k must be between 1 and {len(model.classes)} (the number of classes)")
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return error(
                415, f"send the images as multipart/form-data, field '{FIELD}' (curl -F {FIELD}=@photo.jpg ...)"
            )
        try:
            form = await request.form(max_files=max_images, max_fields=FIELDS)
        except HTTPException as exc:  # a malformed form, or more parts than allowed
            many = "too many files" in str(exc.detail).lower()
            message = f"at most {max_images} images per request" if many else f"cannot read the form: {exc.detail}"
            return error(400, message)
        try:
            uploads = form.getlist(FIELD)
            if not uploads:
                got = sorted(set(form.keys()))
                return error(
                    400,
                    f"no field '{FIELD}' in the form"
                    + (f" (it has {', '.join(repr(g) for g in got)})" if got else " (it is empty, or cut off)")
                    + f": send each image as field '{FIELD}'",
                )
            named = []
            for n, upload in enumerate(uploads, 1):
                if isinstance(upload, UploadFile):
                    named.append((upload.filename or f"image {n}", await upload.read()))
                else:
                    why = f"this '{FIELD}' part has no filename, so it was taken as text: send each image as a file"
                    named.append((f"image {n}", why + f" (curl -F {FIELD}=@photo.png)"))
        finally:
            await form.close()
        rows = await anyio.to_thread.run_sync(lambda: score(model, named, top_k, max_image_pixels), limiter=limiter)
        body = {"predictions": rows, "model": {"sha256": model.sha256, "format": model.format}}
        return JSONResponse(body, status_code=200 if any("error" not in r for r in rows) else 422)

    return limit_body(app, max_upload_bytes)


def limit_body(app, limit: int):
    """An ASGI wrapper that answers 413 to a request body over `limit` bytes, before the app reads any of it.

    The body is read here (up to the limit) and handed to the app afterwards: a declared
    Content-Length over the limit is refused at once, an undeclared (chunked) one when it passes.
    At most `BUFFERED` such requests are in memory at once, from reading to answering; the others
    wait with their bodies unread, so a burst of large uploads queues instead of using memory
    without bound.
    """

    async def send_413(send, size: str) -> None:
        body = json.dumps({"error": f"the request body is {size}, over the limit of {limit:,} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    gate = None  # made on the first request, inside the server's event loop

    async def wrapped(scope, receive, send):
        nonlocal gate
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await app(scope, receive, send)  # /health and /model never wait behind uploads
        if gate is None:
            gate = asyncio.Semaphore(BUFFERED)
        async with gate:
            return await _limited(scope, receive, send)

    async def _limited(scope, receive, send):
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return await send_413(send, f"{int(declared):,} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await send_413(send, "larger")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await app(scope, replay, send)

    return wrapped


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve.http",
        description="Serve the exported model over HTTP (POST /predict, GET /health, GET /model).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument(
        "--model", help="an export folder, a .ts or .pt2 file, or models:/<name>@<alias> (default: models/export)"
    )
    parser.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body, in MB (default 16)")
    parser.add_argument("--max-images", type=int, default=64, help="most images in one request (default 64)")
    parser.add_argument("--max-image-pixels", type=int, help="refuse bigger images (default: the training limit)")
    parser.add_argument("--threads", type=int, default=1, help="requests scored at once (default 1)")
    parser.add_argument("--no-access-log", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a port (1-65535)")
    if args.max_upload_mb <= 0 or args.max_images < 1 or args.threads < 1:
        parser.error("--max-upload-mb, --max-images and --threads must be positive")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        parser.error("--max-image-pixels must be positive")
    return args


def can_listen(host: str, port: int) -> str:
    """Why the server cannot listen on host:port, or ''."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from serve.model import ModelError, load

    try:
        model = load(args.model)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    why = can_listen(args.host, args.port)
    if why:
        print(f"error: cannot listen on {args.host}:{args.port} ({why}): pass another --port", file=sys.stderr)
        return 10
    if not loopback(args.host):
        LOG.warning(
            "listening on %s without authentication: anyone who can reach it can use the model; "
            "put it behind a proxy that authenticates",
            args.host,
        )
    import uvicorn

    app = create_app(model, int(args.max_upload_mb * 1e6), args.max_images, args.max_image_pixels, args.threads)
    LOG.info(
        "%s (%s, sha256 %s, %d classes) on http://%s:%d: POST /predict (form field '%s'), GET /health, GET /model",
        model.file,
        model.format,
        model.sha256[:12],
        len(model.classes),
        args.host,
        args.port,
        FIELD,
    )
    log = not args.no_access_log
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=log, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

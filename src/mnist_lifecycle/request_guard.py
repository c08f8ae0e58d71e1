"""The serving port's input policy, applied to every request before any route's handler runs.

Each request's body is read here, whatever the route: at most MAX_BODY_BYTES (413 otherwise),
within the body timeout (408 and the connection closed otherwise, so that stalled clients do not
hold connections), and a client that goes away mid-body costs one log line, not a traceback. Routes
with a JSON contract (`POST /predict`, `POST /invocations`) then get their Content-Type checked and
their body validated by the handler registered for them; a request that breaks the contract gets a
4xx JSON error `{"error_code": ..., "message": ...}` and never reaches MLflow's code. Everything
else goes to the wrapped app with the body already read.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

# A full batch of 0-255 integers is about 3 MB of JSON; 16 MiB leaves room for long float
# literals ("127.49803924560547") and whitespace, and still bounds what one request can make us hold.
MAX_BODY_BYTES = 16 * 2**20
BODY_TIMEOUT_ENV = "MNIST_SERVING_BODY_TIMEOUT"
# Seconds for a whole body to arrive: 16 MiB at ~1 MB/s, a slow but live client.
DEFAULT_BODY_TIMEOUT = 30.0
LOG = logging.getLogger("uvicorn.error")  # configured by uvicorn: one formatted line per event



class InputError(ValueError):
    """A request the server refuses: the HTTP status and a message saying what is wrong."""

    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message

    def body(self) -> bytes:
        return orjson.dumps({"error_code": self.error_code, "message": self.message})


@dataclass
class Reply:
    """A handler's answer when it is more than a 200 JSON body."""

    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = b"application/json"
    status: int = 200


# A handler validates the body of its route and answers it (response bytes or a Reply), or returns
# None to let the wrapped app answer; it raises InputError for a body that breaks the contract.
Handler = Callable[[bytes], Awaitable[bytes | Reply | None]]
# Finds the handler of a path with parameters (the V2 routes), given the method and path.
Resolver = Callable[[str, str], Handler | None]
# Renders an InputError in a protocol's own error form (V2: {"error": message}).
ErrorForm = Callable[[InputError], bytes]


class ClientGone(Exception):
    """The client closed the connection before its body had arrived."""


def check_content_type(content_type: str | None) -> None:
    """application/json, with no parameter but charset=utf-8 (the one encoding JSON has)."""
    media_type, *parameters = [part.strip().lower() for part in (content_type or "").split(";")]
    if media_type != "application/json" or any(p.replace(" ", "") != "charset=utf-8" for p in parameters):
        raise InputError(415, "UNSUPPORTED_MEDIA_TYPE",
                         "Content-Type must be application/json (charset utf-8 if any), got "
                         + (repr(content_type) if content_type else "no Content-Type"))


def body_too_large(size: int) -> InputError:
    return InputError(413, "BODY_TOO_LARGE", f"body of {size} bytes exceeds the limit of "
                      f"{MAX_BODY_BYTES} bytes; split the batch into smaller requests")


def body_timeout() -> float:
    return float(os.environ.get(BODY_TIMEOUT_ENV) or DEFAULT_BODY_TIMEOUT)


async def read_body(receive, content_length: str | None, timeout: float) -> bytes:
    """The whole body, bounded in size and time; refused early if announced as too large."""
    if content_length is not None and content_length.isdigit() and int(content_length) > MAX_BODY_BYTES:
        raise body_too_large(int(content_length))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
        except TimeoutError:
            raise InputError(408, "BODY_TIMEOUT", f"the body did not arrive within {timeout:g} s "
                             f"({size} bytes received): connection closed") from None
        if message["type"] == "http.disconnect":
            raise ClientGone(size)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise body_too_large(size)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_response(send, status: int, body: bytes, close: bool = False,
                        content_type: bytes = b"application/json", extra: list | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or [])]
    if close:  # uvicorn closes the connection after a response saying so
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI app: the policy above, then the handler of (method, path) or the wrapped app.

    `text_routes` are MLflow's GET routes that answer plain text under a JSON Content-Type
    (/ping answers "\\n", /version "3.x"): their Content-Type is corrected to text/plain.
    """

    def __init__(self, app, handlers: dict[tuple[str, str], Handler], text_routes: tuple[str, ...] = (),
                 resolve: Resolver | None = None, error_forms: dict[str, ErrorForm] | None = None):
        self.app = app
        self.handlers = handlers
        self.text_routes = text_routes
        self.resolve = resolve
        self.error_forms = error_forms or {}  # path prefix -> form of its errors
        self.timeout = body_timeout()

    def error_body(self, path: str, error: InputError) -> bytes:
        for prefix, form in self.error_forms.items():
            if path.startswith(prefix):
                return form(error)
        return error.body()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        handler = self.handlers.get((method, path)) or (self.resolve and self.resolve(method, path))
        try:
            body = await read_body(receive, headers.get("content-length"), self.timeout)
            if handler:
                if method == "POST":
                    check_content_type(headers.get("content-type"))
                answer = await handler(body)
                if isinstance(answer, Reply):
                    await send_response(send, answer.status, answer.body, content_type=answer.content_type,
                                        extra=answer.headers)
                    return
                if answer is not None:
                    await send_response(send, 200, answer)
                    return
        except ClientGone as gone:
            client = "%s:%s" % tuple(scope.get("client") or ("?", "?"))
            LOG.warning("client %s went away after sending %d bytes of %s %s; request dropped",
                        client, gone.args[0], method, path)
            return
        except InputError as error:
            await send_response(send, error.status, self.error_body(path, error), close=error.status == 408)
            return

        delivered = False

        async def replay():
            # The body once, then the real channel (which reports a disconnect to MLflow's app).
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if method in ("GET", "HEAD") and path in self.text_routes:
            await self.app(scope, replay, _as_plain_text(send))
        else:
            await self.app(scope, replay, send)


def _as_plain_text(send):
    async def plain_send(message):
        if message["type"] == "http.response.start":
            headers = [(n, v) for n, v in message.get("headers", []) if n.lower() != b"content-type"]
            message = {**message, "headers": [*headers, (b"content-type", b"text/plain; charset=utf-8")]}
        await send(message)
    return plain_send

"""The gunicorn worker of ``workbench serve``: requests are read whole before a thread runs them.

gunicorn's thread workers hand a connection to a thread as soon as its first bytes arrive, and
the thread then blocks reading the rest: a client that sends slowly holds the thread, and a few
dozen such clients hold them all. This worker reads every request (header and body) on a
tornado event loop, where a waiting connection costs a few kilobytes and no thread, under three
limits from ``[server]`` in workbench.toml:

- ``header_timeout``: a request's header must be complete this many seconds after the
  connection opens or the previous answer is sent (so idle keep-alive connections close too);
- ``body_timeout``: its body must be complete this many seconds after the header;
- ``max_body_bytes``: a larger announced ``Content-Length`` is answered by the application
  (413) at once and the body is not read; a chunked body that grows past it is refused (400).

Only a complete request reaches the WSGI application, in a pool of ``--threads`` threads per
worker; the answer is written back by the event loop, so a client that does not read its
answer holds no thread either. Header names keep their underscores (``x-api_key`` reaches the
application as ``HTTP_X_API_KEY``). gunicorn still manages the processes: ``--workers``,
restarts, and SIGTERM, on which a worker stops accepting, finishes the requests it has read
(up to ``--graceful-timeout``) and exits.

    gunicorn --worker-class workbench_server.worker.BufferingWorker --threads 8 workbench_server.wsgi:app
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from gunicorn.workers.base import Worker
from tornado import gen, httputil, iostream
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.wsgi import WSGIContainer

from workbench.config import ServerConfig, load_config

log = logging.getLogger("workbench.server")

LINGER_SECONDS = 2.0  # after refusing a body, read (and drop) what is in flight before closing


class _Container(WSGIContainer):
    """Runs the WSGI application on a complete request in the thread pool."""

    def __init__(self, application, executor, access_log) -> None:
        super().__init__(application, executor=executor)
        self.access_log = access_log
        self.running = 0

    def __call__(self, request: httputil.HTTPServerRequest) -> None:
        self.running += 1
        IOLoop.current().spawn_callback(self._handle, request)

    async def _handle(self, request: httputil.HTTPServerRequest) -> None:
        try:
            await self.handle_request(request)
        except Exception:
            # the application failed outside its own error handling: no answer was sent,
            # so closing is the only way to release the client
            log.exception("unhandled error answering %s", request.uri)
            request.connection.close()
        finally:
            self.running -= 1

    def _run(self, request: httputil.HTTPServerRequest) -> tuple[str, list, bytes]:
        """Call the application and gather its answer (in a pool thread): status, headers, body."""
        answer: list = []
        parts: list[bytes] = []

        def start_response(status, headers, exc_info=None):
            answer[:] = [status, headers]
            return parts.append

        result = self.wsgi_application(self.environ(request), start_response)
        try:
            parts.extend(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        if not answer:
            raise RuntimeError("the WSGI application did not call start_response")
        headers = [(k, v) for k, v in answer[1] if k.lower() != "content-length"]
        return answer[0], headers, b"".join(parts)

    async def handle_request(self, request: httputil.HTTPServerRequest) -> None:
        """Answer ``request`` on its connection, one trip to the thread pool per request."""
        status, headers, body = await IOLoop.current().run_in_executor(
            self.executor, self._run, request
        )
        code, reason = status.split(" ", 1)
        fields = httputil.HTTPHeaders()
        for key, value in headers:
            fields.add(key, value)
        fields["Content-Length"] = str(len(body))
        start_line = httputil.ResponseStartLine("HTTP/1.1", int(code), reason)
        request.connection.write_headers(start_line, fields, chunk=body)
        request.connection.finish()
        self._log(int(code), request)

    async def answer_bytes(self, request: httputil.HTTPServerRequest) -> bytes:
        """The application's complete answer to ``request``, as bytes ready to send."""
        self.running += 1
        try:
            status, headers, body = await IOLoop.current().run_in_executor(
                self.executor, self._run, request
            )
        finally:
            self.running -= 1
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
        lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        self._log(int(status.split(" ", 1)[0]), request)
        return "\r\n".join(lines).encode("latin-1") + body

    def _log(self, status_code: int, request: httputil.HTTPServerRequest) -> None:
        self.access_log.info(
            '%s "%s %s %s" %d %.1fms',
            request.remote_ip,
            request.method,
            request.uri,
            request.version,
            status_code,
            1000.0 * request.request_time(),
        )


class _Request(httputil.HTTPMessageDelegate):
    """One request on a connection: its body is gathered, then handed to the container."""

    def __init__(self, front: _Front, connection: httputil.HTTPConnection) -> None:
        self.front = front
        self.connection = connection
        self.request: httputil.HTTPServerRequest | None = None
        self.chunks: list[bytes] = []

    def headers_received(self, start_line, headers):
        self.request = httputil.HTTPServerRequest(
            connection=self.connection, start_line=start_line, headers=headers
        )
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.front.max_body_bytes:
            return self._refuse()
        return None

    async def _refuse(self) -> None:
        """Let the application answer (413) without the body, then close the connection."""
        stream = self.connection.detach()
        self.request.body = b""
        try:
            await stream.write(await self.front.container.answer_bytes(self.request))
            stream.socket.shutdown(socket.SHUT_WR)
            deadline = IOLoop.current().time() + LINGER_SECONDS
            while True:  # drop what the client already sent, so closing does not reset
                await gen.with_timeout(deadline, stream.read_bytes(65536, partial=True))
        except (TimeoutError, iostream.StreamClosedError, OSError):
            pass
        finally:
            stream.close()

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        self.request.body = b"".join(self.chunks)
        self.chunks = []
        self.front.container(self.request)

    def on_connection_close(self) -> None:
        self.chunks = []


class _Front(httputil.HTTPServerConnectionDelegate):
    """Starts a :class:`_Request` for every request the HTTP server reads."""

    def __init__(self, container: _Container, max_body_bytes: int) -> None:
        self.container = container
        self.max_body_bytes = max_body_bytes

    def start_request(self, server_conn, request_conn) -> _Request:
        return _Request(self, request_conn)


def http_server(
    application, *, settings: ServerConfig, threads: int, access_log
) -> tuple[HTTPServer, _Container]:
    """A tornado HTTP server that runs ``application`` on complete requests in ``threads``."""
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")
    container = _Container(application, executor, access_log)
    server = HTTPServer(
        _Front(container, settings.max_body_bytes),
        idle_connection_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_body_size=settings.max_body_bytes,
        decompress_request=False,
        xheaders=False,
    )
    return server, container


class BufferingWorker(Worker):
    """A gunicorn worker that serves a WSGI application with :func:`http_server`."""

    def init_process(self) -> None:
        IOLoop.clear_current()  # an event loop cannot survive a fork
        super().init_process()

    def run(self) -> None:
        settings = load_config().server
        self.server, self.container = http_server(
            self.wsgi,
            settings=settings,
            threads=max(1, self.cfg.threads),
            access_log=self.log.access_log,
        )
        self.stopping_since: float | None = None
        for listener in self.sockets:
            listener.setblocking(False)
            self.server.add_socket(listener)
        self.loop = IOLoop.current()
        PeriodicCallback(self._tick, 200).start()
        self.loop.start()
        self.container.executor.shutdown(wait=True)
        sys.stdout.flush()

    def _tick(self) -> None:
        """Heartbeat for the arbiter; on shutdown, stop accepting and wait for answers."""
        if self.alive and self.ppid != os.getppid():
            self.log.info("parent changed, shutting down: %s", self)
            self.alive = False
        if self.alive:
            self.notify()
            return
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self.server.stop()
        idle = self.container.running == 0
        if idle or time.monotonic() - self.stopping_since > self.cfg.graceful_timeout:
            self.loop.stop()

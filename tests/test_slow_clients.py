"""Slow clients against the real server process: connections that send their header or body
slowly, or stop half-way, neither hold the threads that answer phones nor stay open for good."""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time

import httpx
import orjson
import pytest

from tests.conftest import Phone, ServerProcess
from workbench.config import ServerConfig, init_home, load_config

SLOW = 120  # half trickle a header a byte at a time, half announce 1000 body bytes and send 100
TIMEOUT = 30  # header_timeout and body_timeout of the server under test, seconds


def set_server(home, **settings) -> None:
    """Change keys of [server] in the home's workbench.toml."""
    path = home.home / "workbench.toml"
    text = path.read_text()
    for key, value in settings.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, key
    path.write_text(text)


class SlowClients:
    """Raw sockets that trickle or stall, watched until the server closes each of them."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.trickling: list[socket.socket] = []  # one byte a second until closed
        self.opened = time.monotonic()
        self.closed: dict[socket.socket, float] = {}  # socket -> seconds after opening
        self.answers: list[bytes] = []
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sockets.append(sock)
        return sock

    def open(self) -> SlowClients:
        for _ in range(SLOW // 2):
            sock = self.connect()  # a header, a byte at a time
            sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ")
            self.trickling.append(sock)
        for i in range(SLOW // 2):
            sock = self.connect()  # a whole header, then 100 of the 1000 announced bytes
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nACTION: write_data\r\n"
                b"Authorization: Bearer " + self.token.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b"[" * 100
            )
            if i % 2:
                self.trickling.append(sock)  # ...and then one more byte a second
        self.opened = time.monotonic()
        self.thread.start()
        return self

    def still_open(self) -> int:
        return len(self.sockets) - len(self.closed)

    def watch(self) -> None:
        next_byte = time.monotonic() + 1
        while not self.stop.is_set() and self.still_open():
            live = [s for s in self.sockets if s not in self.closed]
            with selectors.DefaultSelector() as selector:  # epoll: any descriptor number
                for sock in live:
                    selector.register(sock, selectors.EVENT_READ)
                readable = [key.fileobj for key, _ in selector.select(0.5)]
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:  # reset
                    data = b""
                if data:
                    self.answers.append(data)
                else:
                    self.closed[sock] = time.monotonic() - self.opened
            if time.monotonic() >= next_byte:
                next_byte += 1
                for sock in self.trickling:
                    if sock not in self.closed:
                        try:
                            sock.send(b"a")
                        except OSError:
                            self.closed[sock] = time.monotonic() - self.opened

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        for sock in self.sockets:
            sock.close()


def test_default_read_timeouts_are_at_most_a_minute(tmp_path):
    """A fresh home disconnects a stalled client within a minute by default."""
    settings = load_config(init_home(tmp_path / "home").home).server
    for configured in (settings, ServerConfig()):
        assert 0 < configured.header_timeout <= 60
        assert 0 < configured.body_timeout <= 60


@pytest.mark.slow
def test_slow_clients_neither_block_uploads_nor_stay_connected(home, subjects):
    set_server(home, header_timeout=TIMEOUT, body_timeout=TIMEOUT)
    server = ServerProcess(home.home, workers=2, threads=4).start()  # 8 threads in all
    slow = None
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            phone = Phone(client, subjects[0])
            assert phone.register().status_code == 200
            slow = SlowClients(server.port, subjects[1].token).open()
            time.sleep(2)  # every slow connection is now waiting on the server
            answers, seconds = [], []
            for _ in range(20):
                started = time.monotonic()
                answers.append(phone.upload().status_code)
                seconds.append(time.monotonic() - started)
            uploads_done = time.monotonic() - slow.opened
            open_during_uploads = SLOW - sum(1 for t in slow.closed.values() if t < uploads_done)
        assert answers == [200] * 20
        # the uploads really competed with every slow connection, 15 times the threads
        assert open_during_uploads == SLOW, (uploads_done, sorted(slow.closed.values())[:5])
        slow.thread.join(timeout=2 * TIMEOUT + 30)
        assert slow.still_open() == 0, f"{slow.still_open()} slow connections still open"
        assert max(slow.closed.values()) < 60  # closed by the server within a minute
        assert slow.answers == []  # closed, not answered: nothing of theirs reached the app
        assert max(seconds) < 30, seconds  # generous: the machine may be loaded
    finally:
        if slow is not None:
            slow.close()
        server.stop()


@pytest.mark.slow
def test_body_over_the_limit_is_refused_before_it_is_sent(home, subjects):
    """A Content-Length over [server] max_body_bytes gets 413 while the body is still unsent."""
    set_server(home, max_body_bytes=2000)
    server = ServerProcess(home.home).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nACTION: write_data\r\n"
                b"Authorization: Bearer " + subjects[0].token.encode() + b"\r\n"
                b"Content-Length: 1000000\r\n\r\n" + b"[" * 1000
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), head
        assert orjson.loads(body)["error"] == "body_too_large"
    finally:
        server.stop()

"""Listening sockets and a uvicorn server on a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from typing_extensions import Self

from tritlm.errors import TritlmError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 = any free port), IPv6 if the host is an IPv6 address.

    Its connections have Nagle's algorithm off. asyncio disables it only on sockets whose proto
    is IPPROTO_TCP, and a plain ``socket(AF_INET, SOCK_STREAM)`` says 0: a streamed token after
    the response headers then waited for the client's delayed ACK, ~40 ms on a kept-alive
    connection (the time to first token of every request but a connection's first)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets on Linux
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TritlmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """A uvicorn server on a background thread, on a free loopback port (tests and benchmarks).

    ``with ServerThread(app) as srv: OpenAI(base_url=srv.url + "/v1")``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.url = socket_url(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="tritlm-serve", daemon=True)
        self.start_timeout = start_timeout

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()

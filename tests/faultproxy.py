"""A fault-injecting TCP proxy on loopback, between the worker and a ComfyUI (the real one, or
the fake): what the fake's fault controls do inside the server, done here to the bytes on the
wire, so the real leg meets the same faults.

    with FaultProxy(("127.0.0.1", comfy_port)) as proxy:   # the worker talks to proxy.url
        proxy.reset_websockets()   # every WebSocket torn down with a TCP reset
        proxy.reset_all()          # every connection, HTTP ones too
        proxy.stall_websockets(True)  # no WebSocket byte forwarded either way, sockets kept open
        proxy.garbage(True)        # every HTTP request answered 200 with an HTML body
        proxy.refuse(True)         # the listener closed: new connections are refused

Each connection is two pump threads; a connection is a WebSocket once its first request asked
for the upgrade. Everything ends with `close()`: no thread or socket outlives the proxy.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

CHUNK = 65536
GARBAGE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 27\r\nConnection: close\r\n\r\n"
           b"<html>proxy garbage</html>\n")


@dataclass
class _Link:
    client: socket.socket
    upstream: socket.socket
    websocket: bool = False
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self, reset: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            if reset:
                # SO_LINGER 0: close() sends a RST, as a crashed peer or a dropped route does.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class FaultProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener: socket.socket | None = None
        self.port = 0
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._garbage = False
        self._stopped = False
        self.connections = 0  # accepted so far

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()

    # -- faults ------------------------------------------------------------------------------

    def reset_websockets(self) -> int:
        """Tear down every WebSocket with a TCP reset; how many there were."""
        return self._reset(lambda link: link.websocket)

    def reset_all(self) -> int:
        return self._reset(lambda link: True)

    def stall_websockets(self, on: bool) -> None:
        """While on, no WebSocket byte goes through either way (the sockets stay open, silent);
        HTTP goes on."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def garbage(self, on: bool) -> None:
        """While on, each HTTP request is answered 200 with a non-JSON body (WebSockets go on)."""
        self._garbage = on

    def refuse(self, on: bool) -> None:
        """While on, nothing listens on the port: connections are refused; open ones go on."""
        if on:
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
        elif self._listener is None:
            self._listen()

    def open_links(self, websocket: bool) -> int:
        """Open connections: WebSockets, or the others."""
        with self._lock:
            return sum(1 for link in self._links if not link.closed and link.websocket == websocket)

    def close(self) -> None:
        self._stopped = True
        self.refuse(True)
        self._flowing.set()
        self._reset(lambda link: True)
        for thread in self._threads:
            thread.join(10)

    # -- plumbing ----------------------------------------------------------------------------

    def _reset(self, which: Callable[[_Link], bool]) -> int:
        with self._lock:
            links = [link for link in self._links if not link.closed and which(link)]
        for link in links:
            link.close(reset=True)
        return len(links)

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name="faultproxy", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: refuse(True) or close()
            if self._stopped:
                client.close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                # Nothing at the target: the client sees its connection reset.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            link = _Link(client, upstream)
            with self._lock:
                self._links = [other for other in self._links if not other.closed]
                self._links.append(link)
                self.connections += 1
            self._spawn(self._pump, link, True)
            self._spawn(self._pump, link, False)

    def _pump(self, link: _Link, outbound: bool) -> None:
        src, dst = (link.client, link.upstream) if outbound else (link.upstream, link.client)
        first = True
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                if outbound and first:
                    link.websocket = b"upgrade: websocket" in data.lower()
                    first = False
                if outbound and self._garbage and not link.websocket:
                    link.client.sendall(GARBAGE)
                    break
                if link.websocket:
                    self._flowing.wait()
                if link.closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        link.close()

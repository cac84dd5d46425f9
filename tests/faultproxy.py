"""A loopback TCP proxy for fault injection in tests.

    proxy = FaultProxy(target_port)          # listens on 127.0.0.1:proxy.port
    proxy.cut_after(upstream_bytes=10_000)   # one-shot: reset the connection once 10 kB went up
    proxy.cut_all()                          # reset every live connection now
    proxy.set_down(True)                     # new connections are reset at once (no network)
    proxy.set_stalled(True)                  # stop forwarding: live connections hang
    proxy.stall_after(upstream_bytes=5_000)  # one-shot: stall once 5 kB went up
    proxy.wait_triggered(timeout=5)          # until an armed cut or stall happened
    proxy.retarget(new_port)                 # new connections go to a restarted server
    proxy.close()

"Upstream" is client -> target, "downstream" is target -> client. A cut closes both sockets
with SO_LINGER 0, so both peers see a reset (ECONNRESET), not an orderly end of stream.

One selector thread does all the forwarding (daemon, joined by close()); the public methods run
their changes on that thread and return once they took effect.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_RECV_BYTES = 64 * 1024
_CONNECT_TIMEOUT_S = 2.0
_COMMAND_TIMEOUT_S = 10.0


def _reset(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class _Connection:
    client: socket.socket
    upstream: socket.socket
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    # Past a cut point ("up" or "down"): forward what is buffered in that direction, then reset.
    doomed: str = ""
    # One side closed in order: forward what is buffered, then close the other side.
    draining: bool = False
    closed: bool = False
    watching: dict[str, int] = field(default_factory=dict)  # side -> registered selector events


@dataclass
class _Trigger:
    upstream_at: int | None  # absolute byte counts (bytes_up / bytes_down) that trigger it
    downstream_at: int | None
    action: str  # "cut" or "stall"


class FaultProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", max_connections: int = 64) -> None:
        self.target_host = target_host
        self._target_port = target_port
        self.max_connections = max_connections
        self._lock = threading.Lock()
        # Counters (read under the lock through the properties).
        self._bytes_up = 0
        self._bytes_down = 0
        self._accepted = 0
        self._refused = 0
        self._cuts = 0
        self._triggered = threading.Event()
        self._down = False
        self._stalled = False
        self._trigger: _Trigger | None = None
        self._connections: list[_Connection] = []
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], threading.Event, list[object]]] = (
            queue.SimpleQueue()
        )
        self._closing = False

        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def target_port(self) -> int:
        return self._target_port

    @property
    def bytes_up(self) -> int:
        with self._lock:
            return self._bytes_up

    @property
    def bytes_down(self) -> int:
        with self._lock:
            return self._bytes_down

    @property
    def connections_accepted(self) -> int:
        with self._lock:
            return self._accepted

    @property
    def connections_refused(self) -> int:
        with self._lock:
            return self._refused

    @property
    def cuts(self) -> int:
        """How many connections were reset by cut_after or cut_all."""
        with self._lock:
            return self._cuts

    @property
    def live_connections(self) -> int:
        return int(self._run(lambda: sum(not c.closed for c in self._connections)))

    @property
    def armed(self) -> bool:
        with self._lock:
            return self._trigger is not None

    @property
    def stalled(self) -> bool:
        with self._lock:
            return self._stalled

    def cut_after(self, upstream_bytes: int | None = None, downstream_bytes: int | None = None) -> None:
        """Arm a one-shot cut: the connection on which `upstream_bytes` (client -> target) or
        `downstream_bytes` (target -> client) have flowed since now is reset right after the byte
        that reaches the count (0: before forwarding anything more in that direction), whichever
        comes first. Replaces anything armed."""
        self._arm(upstream_bytes, downstream_bytes, "cut")

    def stall_after(self, upstream_bytes: int | None = None, downstream_bytes: int | None = None) -> None:
        """Like cut_after, but the proxy stalls (as set_stalled(True)) at that byte instead."""
        self._arm(upstream_bytes, downstream_bytes, "stall")

    def _arm(self, upstream_bytes: int | None, downstream_bytes: int | None, action: str) -> None:
        if upstream_bytes is None and downstream_bytes is None:
            raise ValueError("pass upstream_bytes or downstream_bytes")
        for n in (upstream_bytes, downstream_bytes):
            if n is not None and n < 0:
                raise ValueError(f"byte counts must be >= 0, got {n}")

        def arm() -> None:
            self._triggered.clear()
            with self._lock:
                self._trigger = _Trigger(
                    None if upstream_bytes is None else self._bytes_up + upstream_bytes,
                    None if downstream_bytes is None else self._bytes_down + downstream_bytes,
                    action,
                )

        self._run(arm)

    def disarm(self) -> bool:
        """Cancel an armed cut or stall; True when one was still armed."""

        def disarm() -> bool:
            with self._lock:
                was, self._trigger = self._trigger is not None, None
            return was

        return bool(self._run(disarm))

    def wait_triggered(self, timeout: float | None = None) -> bool:
        """Wait until the armed cut or stall has happened (cut_all also counts)."""
        return self._triggered.wait(timeout)

    def cut_all(self) -> int:
        """Reset every live connection now; returns how many."""

        def cut() -> int:
            live = [c for c in self._connections if not c.closed]
            for connection in live:
                self._abort(connection, counted=True)
            return len(live)

        return int(self._run(cut))

    def set_down(self, down: bool = True) -> None:
        """While down, new connections are reset as soon as they are accepted (live ones are kept:
        use cut_all to drop them too)."""
        with self._lock:
            self._down = down

    def set_stalled(self, stalled: bool = True) -> None:
        """While stalled, nothing is forwarded: live connections hang (the peers' kernel buffers fill)."""

        def stall() -> None:
            with self._lock:
                self._stalled = stalled

        self._run(stall)

    def retarget(self, port: int, host: str | None = None) -> None:
        """Send new connections to another port (e.g. a restarted server); live ones are kept."""

        def retarget() -> None:
            self._target_port = port
            if host is not None:
                self.target_host = host

        self._run(retarget)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake()
        self._thread.join(timeout=_COMMAND_TIMEOUT_S)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the selector thread ---------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self, fn: Callable[[], object]) -> object:
        """Run fn on the selector thread and return its result (directly if already on it)."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return fn()
        done = threading.Event()
        result: list[object] = []
        self._commands.put((fn, done, result))
        self._wake()
        if not done.wait(_COMMAND_TIMEOUT_S):
            raise TimeoutError("the proxy thread did not answer")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def _loop(self) -> None:
        try:
            while not self._closing:
                self._update_interest()
                for key, mask in self._selector.select(timeout=0.5):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                    else:
                        connection, side = key.data
                        if not connection.closed:
                            self._service(connection, side, mask)
                self._run_commands()
        finally:
            self._run_commands()
            for connection in self._connections:
                self._abort(connection, counted=False)
            self._connections.clear()
            for sock in (self._listener, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    sock.close()
            self._selector.close()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done, result = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result.append(fn())
            except BaseException as exc:  # handed to the caller
                result.append(exc)
            done.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            live = sum(not c.closed for c in self._connections)
            with self._lock:
                refuse = self._down or live >= self.max_connections
                if refuse:
                    self._refused += 1
            if refuse:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection((self.target_host, self._target_port), timeout=_CONNECT_TIMEOUT_S)
            except OSError:
                # Nothing listens there (e.g. the server is restarting): the client sees a reset.
                with self._lock:
                    self._refused += 1
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(client, upstream)
            self._connections.append(connection)
            with self._lock:
                self._accepted += 1

    def _update_interest(self) -> None:
        self._connections = [c for c in self._connections if not c.closed]
        for c in self._connections:
            reading = not (self._stalled or c.doomed or c.draining)
            writing = not self._stalled
            client_mask = (selectors.EVENT_READ if reading and not c.to_upstream else 0) | (
                selectors.EVENT_WRITE if writing and c.to_client else 0
            )
            upstream_mask = (selectors.EVENT_READ if reading and not c.to_client else 0) | (
                selectors.EVENT_WRITE if writing and c.to_upstream else 0
            )
            self._watch(c, "client", c.client, client_mask)
            self._watch(c, "upstream", c.upstream, upstream_mask)

    def _watch(self, c: _Connection, side: str, sock: socket.socket, mask: int) -> None:
        """Register exactly the events wanted (none: unregistered, so a stalled socket cannot spin)."""
        current = c.watching.get(side, 0)
        if mask == current:
            return
        if current == 0:
            self._selector.register(sock, mask, (c, side))
        elif mask == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, mask, (c, side))
        c.watching[side] = mask

    def _service(self, c: _Connection, side: str, mask: int) -> None:
        src, dst = (c.client, c.upstream) if side == "client" else (c.upstream, c.client)
        outgoing = c.to_upstream if side == "client" else c.to_client  # where src's data goes
        incoming = c.to_client if side == "client" else c.to_upstream  # what waits to go to src
        try:
            if mask & selectors.EVENT_WRITE and incoming and not self._stalled:
                sent = src.send(incoming)
                del incoming[:sent]
            if mask & selectors.EVENT_READ and not (self._stalled or c.doomed or c.draining or outgoing):
                data = src.recv(_RECV_BYTES)
                if not data:
                    c.draining = True
                else:
                    now, held = self._admit(c, data, upstream=side == "client")
                    outgoing += now
                    if outgoing:
                        with contextlib.suppress(BlockingIOError, InterruptedError):
                            sent = dst.send(outgoing)
                            del outgoing[:sent]
                    outgoing += held  # past a stall point: forwarded once unstalled
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # reset by a peer, broken pipe, ...: end the connection the same way
            self._abort(c, counted=False)
            return
        if c.doomed and not (c.to_upstream if c.doomed == "up" else c.to_client):
            self._abort(c, counted=True)
        elif c.draining and not c.to_upstream and not c.to_client:
            self._close(c)

    def _admit(self, c: _Connection, data: bytes, *, upstream: bool) -> tuple[bytes, bytes]:
        """Count the bytes and apply an armed trigger: returns (forward now, hold until unstalled)."""
        held = b""
        with self._lock:
            before = self._bytes_up if upstream else self._bytes_down
            trigger = self._trigger
            at = None if trigger is None else (trigger.upstream_at if upstream else trigger.downstream_at)
            if trigger is not None and at is not None and before + len(data) >= at:
                data, held = data[: max(0, at - before)], data[max(0, at - before) :]
                self._trigger = None
                if trigger.action == "cut":
                    held = b""
                    c.doomed = "up" if upstream else "down"
                else:
                    self._stalled = True
                    self._triggered.set()
            if upstream:
                self._bytes_up += len(data) + len(held)
            else:
                self._bytes_down += len(data) + len(held)
        return data, held

    def _unregister(self, c: _Connection) -> None:
        for side, sock in (("client", c.client), ("upstream", c.upstream)):
            if c.watching.get(side):
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(sock)
        c.watching.clear()

    def _abort(self, c: _Connection, *, counted: bool) -> None:
        if c.closed:
            return
        c.closed = True
        if counted:  # counted first: a peer woken by the reset sees the counter already moved
            with self._lock:
                self._cuts += 1
            self._triggered.set()
        self._unregister(c)
        _reset(c.client)
        _reset(c.upstream)

    def _close(self, c: _Connection) -> None:
        if c.closed:
            return
        c.closed = True
        self._unregister(c)
        for sock in (c.client, c.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

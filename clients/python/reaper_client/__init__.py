"""Client for reaper's control socket (standard library only, Python 3.9+).

reaper kills console connections at their deadline, in the kernel. A proxy
tells it which connections belong to which session and until when::

    from reaper_client import Client

    reaper = Client()                       # /run/reaper/reaper.sock
    reaper.grant("tok-81f2", user="alice", target="vm-7",
                 sockets=[client_sock, upstream_sock], expires_at=token_expiry)
    reaper.extend("tok-81f2", ttl="30m")
    reaper.revoke(user="alice")             # logout: every console of alice

Every call is one request line on one connection that the client keeps and
reuses (opened on first use, opened again after the daemon restarted).
Calls are safe from several threads: each holds the connection for its one
exchange. A refusal raises :class:`ReaperError` with the protocol's code
(``"deadline_refused"``, ``"permission_denied"``, ...) and message; a daemon
that cannot be reached, or does not answer within ``timeout``, raises it
too, with the code ``"unavailable"`` or ``"timeout"``.

The protocol is described in reaper's docs/protocol.md.
"""

import datetime
import json
import socket
import threading
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = ["Client", "ReaperError", "DEFAULT_SOCKET", "PROTOCOL_VERSION"]

DEFAULT_SOCKET = "/run/reaper/reaper.sock"
PROTOCOL_VERSION = 1
#: Descriptors the daemon takes with one request line.
MAX_FDS = 16

Duration = Union[int, float, str]
"""Seconds, or text such as ``"300ms"``, ``"10m"``, ``"1h30m"``."""
Instant = Union[datetime.datetime, int, float, str]
"""A wall-clock time: an aware datetime, Unix seconds, or RFC 3339 text."""
Flow = Tuple[str, str]
"""``(local, remote)`` as ``"ip:port"`` (``"[::1]:5900"`` for IPv6)."""
SocketLike = Union[socket.socket, int]
"""A connected TCP socket, or its descriptor."""


class ReaperError(Exception):
    """A request that did not succeed.

    ``code`` is the protocol's error code, or, for failures on this side,
    ``"unavailable"`` (no daemon at the socket), ``"timeout"`` (no answer in
    time) or ``"protocol"`` (an answer that is not the protocol's).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _instant(value: Instant) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("expires_at: a naive datetime is ambiguous; give it a tzinfo")
        value = value.timestamp()
    moment = datetime.datetime.fromtimestamp(float(value), tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _duration(value: Duration) -> Union[float, int, str]:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"a duration is seconds or text like '10m', not {value!r}")
    return value


def _flow(flow: Flow, netns: Optional[Union[str, int]]) -> Dict[str, Any]:
    local, remote = flow
    spec: Dict[str, Any] = {"local": local, "remote": remote}
    if netns is not None:
        spec["netns"] = netns
    return spec


def _fileno(sock: SocketLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


class Client:
    """A connection to one reaper daemon.

    ``path`` is the control socket; ``timeout`` (seconds) bounds connecting
    and each exchange. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: Optional[socket.socket] = None
        self._buffer = b""
        self._lock = threading.Lock()
        self._next_id = 0

    # -- the operations ---------------------------------------------------

    def grant(
        self,
        session: str,
        user: str,
        target: str,
        *,
        sockets: Sequence[SocketLike] = (),
        flows: Iterable[Flow] = (),
        expect: Iterable[Flow] = (),
        ttl: Optional[Duration] = None,
        expires_at: Optional[Instant] = None,
        klass: Optional[str] = None,
        idle_timeout: Optional[Duration] = None,
        idle_direction: Optional[str] = None,
        netns: Optional[Union[str, int]] = None,
    ) -> Dict[str, Any]:
        """Give connections a deadline as part of ``session``.

        ``sockets`` are connected TCP sockets (passed by descriptor: the
        daemon reads their addresses itself); ``flows`` are established
        connections named by addresses, ``expect`` connections to come (a
        port of 0 matches any). ``ttl`` or ``expires_at`` (the token's
        expiry), unless the class has a default or the session exists;
        ``klass`` is the policy class (``class`` on the wire). ``netns``
        names the namespace of ``flows`` and ``expect``. Returns the
        session as the daemon holds it (``result["session"]``) and whether
        this grant created it.
        """
        if len(sockets) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} sockets per grant; grant the rest in another call")
        request: Dict[str, Any] = {"op": "grant", "session": session, "user": user, "target": target}
        specs = [{"fd": i} for i in range(len(sockets))]
        specs += [_flow(f, netns) for f in flows]
        if specs:
            request["flows"] = specs
        expected = [_flow(f, netns) for f in expect]
        if expected:
            request["expect"] = expected
        self._deadline(request, ttl, expires_at)
        if klass is not None:
            request["class"] = klass
        if idle_timeout is not None:
            request["idle_timeout"] = _duration(idle_timeout)
        if idle_direction is not None:
            request["idle_direction"] = idle_direction
        return self._call(request, [_fileno(s) for s in sockets])

    def expect(
        self,
        session: str,
        user: str,
        target: str,
        connections: Iterable[Flow],
        **terms: Any,
    ) -> Dict[str, Any]:
        """Pre-register connections to come (``grant`` with ``expect`` only):
        each is tagged with the session's deadline as it is established."""
        return self.grant(session, user, target, expect=connections, **terms)

    def extend(
        self,
        session: str,
        *,
        ttl: Optional[Duration] = None,
        expires_at: Optional[Instant] = None,
    ) -> Dict[str, Any]:
        """Move ``session``'s deadline later (never earlier)."""
        request: Dict[str, Any] = {"op": "extend", "session": session}
        self._deadline(request, ttl, expires_at)
        return self._call(request)

    def touch(self, session: str) -> Dict[str, Any]:
        """Report real user activity: the idle clock starts again."""
        return self._call({"op": "touch", "session": session})

    def revoke(
        self,
        *,
        session: Optional[str] = None,
        user: Optional[str] = None,
        target: Optional[str] = None,
        klass: Optional[str] = None,
        flow: Optional[Flow] = None,
        netns: Optional[Union[str, int]] = None,
    ) -> Dict[str, Any]:
        """End sessions now: by exactly one of ``session``, ``user``,
        ``target``, ``klass`` or one ``flow``. Returns the sessions ended
        and the kills."""
        chosen = {
            "session": session,
            "user": user,
            "target": target,
            "class": klass,
            "flow": None if flow is None else _flow(flow, netns),
        }
        given = {k: v for k, v in chosen.items() if v is not None}
        if len(given) != 1:
            raise ValueError("revoke takes exactly one of session, user, target, klass, flow")
        return self._call({"op": "revoke", **given})

    def list(
        self,
        *,
        session: Optional[str] = None,
        user: Optional[str] = None,
        target: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        """The sessions (the caller's own; all for root and operators), in
        deadline order."""
        request = {"op": "list", **self._selector(session, user, target)}
        return self._call(request)["sessions"]

    def status(self) -> Dict[str, Any]:
        """The daemon's state and kernel counters."""
        return self._call({"op": "status"})

    def watch(
        self,
        *,
        session: Optional[str] = None,
        user: Optional[str] = None,
        target: Optional[str] = None,
    ) -> Iterator[Dict[str, Any]]:
        """Follow the daemon's events (grants, extends, revokes, kills,
        refusals, reloads) as they happen, on a connection of their own.
        Iterate to get each event; ``close()`` the iterator (or leave the
        loop) to stop. A watcher that falls too far behind gets a
        ``{"event": "dropped"}`` event and the stream ends."""
        sock = self._connect()
        try:
            line = json.dumps({"v": PROTOCOL_VERSION, "op": "watch", **self._selector(session, user, target)})
            sock.sendall(line.encode() + b"\n")
            reader = sock.makefile("rb")
            self._result(self._read_reply(reader.readline()))
            # Events come when they come: no timeout while waiting for one.
            sock.settimeout(None)
            for raw in reader:
                if raw.strip():
                    yield json.loads(raw)
        finally:
            sock.close()

    # -- the connection ---------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _deadline(request: Dict[str, Any], ttl: Optional[Duration], expires_at: Optional[Instant]) -> None:
        if ttl is not None and expires_at is not None:
            raise ValueError("give ttl or expires_at, not both")
        if ttl is not None:
            request["ttl"] = _duration(ttl)
        if expires_at is not None:
            request["expires_at"] = _instant(expires_at)

    @staticmethod
    def _selector(session: Optional[str], user: Optional[str], target: Optional[str]) -> Dict[str, str]:
        chosen = {"session": session, "user": user, "target": target}
        return {k: v for k, v in chosen.items() if v is not None}

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except socket.timeout:
            sock.close()
            raise ReaperError("timeout", f"connecting to {self.path} took over {self.timeout} s") from None
        except OSError as e:
            sock.close()
            raise ReaperError(
                "unavailable",
                f"cannot reach the reaper daemon at {self.path} ({e.strerror or e}); is it running, and may you open its socket?",
            ) from None
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buffer = b""

    def _call(self, request: Dict[str, Any], fds: Sequence[int] = ()) -> Any:
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            line = json.dumps({"v": PROTOCOL_VERSION, "id": request_id, **request}).encode() + b"\n"
            # A connection kept from before a daemon restart fails on first
            # use: the request is sent again once, on a fresh connection.
            fresh = self._sock is None
            try:
                reply = self._exchange(line, fds)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                self._drop()
                if fresh:
                    raise ReaperError("unavailable", f"the daemon at {self.path} closed the connection") from None
                try:
                    reply = self._exchange(line, fds)
                except (BrokenPipeError, ConnectionResetError, EOFError):
                    self._drop()
                    raise ReaperError("unavailable", f"the daemon at {self.path} closed the connection") from None
            except socket.timeout:
                # The answer may still come: this connection is out of step.
                self._drop()
                raise ReaperError("timeout", f"no answer from {self.path} within {self.timeout} s") from None
            if reply.get("id") != request_id:
                self._drop()
                raise ReaperError("protocol", f"answer for request {reply.get('id')!r}, expected {request_id}")
            return self._result(reply)

    def _exchange(self, line: bytes, fds: Sequence[int]) -> Dict[str, Any]:
        if self._sock is None:
            self._sock = self._connect()
        if fds:
            socket.send_fds(self._sock, [line], list(fds))
        else:
            self._sock.sendall(line)
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\n", 1)
        return self._read_reply(raw)

    @staticmethod
    def _read_reply(raw: bytes) -> Dict[str, Any]:
        if not raw.strip():
            raise ReaperError("unavailable", "the daemon closed the connection without answering")
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ReaperError("protocol", f"unreadable answer: {raw[:200]!r}") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ReaperError("protocol", f"not an answer: {raw[:200]!r}")
        return reply

    @staticmethod
    def _result(reply: Dict[str, Any]) -> Any:
        if reply["ok"]:
            return reply.get("result", {})
        error = reply.get("error") or {}
        raise ReaperError(str(error.get("code", "protocol")), str(error.get("message", "")))

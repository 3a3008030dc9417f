"""Drives a real JupyterHub (on 127.0.0.1:8000) like two browsers do, for
the JupyterHub logout test: alice and bob log in, their servers start,
each opens a terminal websocket; alice logs out. Prints one JSON object:
how long after the logout alice's websocket closed, whether bob's still
echoes, whether alice's server still runs, and how the hub answered her
reconnect.

usage: jupyter_logout.py SERVICE_TOKEN GO_FILE (it waits for GO_FILE to
exist before logging alice out)
"""
import base64
import http.cookiejar
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

BASE = "http://127.0.0.1:8000"
TOKEN = sys.argv[1]
GO = sys.argv[2]


class Browser:
    def __init__(self, user):
        self.user = user
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def cookie(self, name):
        for c in self.jar:
            if c.name == name:
                return c.value
        return None

    def cookie_header(self):
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)

    def open(self, path, data=None):
        return self.opener.open(BASE + path, data=data, timeout=60)

    def login(self):
        # The proxy listens a moment before the hub's route is in it.
        for _ in range(300):
            try:
                self.open("/hub/login").read()
                break
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
                time.sleep(0.1)
        form = urllib.parse.urlencode(
            {"username": self.user, "password": "x", "_xsrf": self.cookie("_xsrf")}
        ).encode()
        self.open("/hub/login?next=", data=form).read()

    def visit_server(self):
        # A page (the API answers 403 instead of redirecting): through the
        # hub's OAuth to the user's own server, which sets its cookie. The
        # page itself (a file that is not there) is a 404.
        try:
            self.open(f"/user/{self.user}/files/.reaper-test").read()
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        assert self.cookie(f"jupyterhub-user-{self.user}"), f"no server cookie for {self.user}"


def api(method, path, body=None):
    request = urllib.request.Request(
        BASE + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        text = r.read()
        return json.loads(text) if text else None


def start_server(user):
    try:
        api("POST", f"/hub/api/users/{user}/server")
    except urllib.error.HTTPError as e:
        if e.code != 400:  # 400: already started (the login spawns it)
            raise
    for _ in range(1200):
        server = api("GET", f"/hub/api/users/{user}")["servers"].get("")
        if server and server.get("ready"):
            return
        time.sleep(0.1)
    raise SystemExit(f"{user}'s server never became ready")


class WebSocketClosed(Exception):
    pass


class TextWebSocket:
    """A minimal RFC 6455 client through the proxy: terminado speaks text
    frames, which websockify's client refuses."""

    def __init__(self, path, cookie):
        self.sock = socket.create_connection(("127.0.0.1", 8000), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise WebSocketClosed("closed during the handshake")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode()
        if status.split()[1:2] != ["101"]:
            raise WebSocketClosed(status)

    def send(self, text):
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(bytes([0x81]) + length + mask + masked)

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WebSocketClosed("connection ended")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def recv(self):
        """The next text or binary message; WebSocketClosed at the end."""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", self._read(8))
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode in (1, 2):
                return payload.decode(errors="replace")
            if opcode == 8:
                raise WebSocketClosed("close frame")
            # ping and pong frames: nothing to answer in this test


def terminal(browser):
    """A new terminal of the browser's user, and its websocket open."""
    name = api("POST", f"/user/{browser.user}/api/terminals")["name"]
    ws = TextWebSocket(f"/user/{browser.user}/terminals/websocket/{name}", browser.cookie_header())
    return name, ws


def echo(ws, word):
    """Types `echo WORD` and waits for WORD to come back as output."""
    ws.send(json.dumps(["stdin", f"echo {word}\r"]))
    seen = ""
    deadline = time.monotonic() + 20
    while seen.count(word) < 2 and time.monotonic() < deadline:
        try:
            message = json.loads(ws.recv())
        except (WebSocketClosed, OSError) as e:
            print(f"closed while waiting for {word!r} ({e}); saw {seen!r}", file=sys.stderr)
            return False
        if message[0] == "stdout":
            seen += message[1]
    return seen.count(word) >= 2  # the typed command, then its output


alice, bob = Browser("alice"), Browser("bob")
for b in (alice, bob):
    b.login()  # Dummy authentication creates the user
    start_server(b.user)
    b.visit_server()
alice_term, alice_ws = terminal(alice)
bob_term, bob_ws = terminal(bob)
assert echo(alice_ws, "alice-ready"), "alice's terminal does not echo"
assert echo(bob_ws, "bob-ready"), "bob's terminal does not echo"
print(json.dumps({"ready": True}), flush=True)
# The test checks that both websockets are registered, then says go.
while not os.path.exists(GO):
    time.sleep(0.01)

closed_at = []


def watch_alice():
    alice_ws.sock.settimeout(None)
    try:
        while True:
            alice_ws.recv()
    except (WebSocketClosed, OSError):
        pass
    closed_at.append(time.monotonic())


watcher = threading.Thread(target=watch_alice)
watcher.start()
logout_at = time.monotonic()
alice.open("/hub/logout").read()
logout_done = time.monotonic()
watcher.join(10)

bob_echoes = echo(bob_ws, "bob-after")
alice_server = api("GET", "/hub/api/users/alice")["servers"].get("", {})

# Alice's browser reconnects with the cookies it had.
try:
    TextWebSocket(f"/user/alice/terminals/websocket/{alice_term}", alice.cookie_header())
    reconnected = "accepted"
except (WebSocketClosed, OSError) as e:
    reconnected = f"refused: {e}"

print(json.dumps({
    "closed_ms": (closed_at[0] - logout_at) * 1000 if closed_at else None,
    "logout_request_ms": (logout_done - logout_at) * 1000,
    "bob_echoes": bob_echoes,
    "alice_server_ready": bool(alice_server.get("ready")),
    "reconnect": reconnected,
}), flush=True)

"""A websocket client (websockify's own WebSocket class) for the tests.

Connects to URI, sends "ping", prints "echo ping" once it comes back, then
waits and prints how the connection ended: "closed <how>" (or "closed
before-echo" when it ended before the echo came).
"""
import select
import sys
import urllib.parse

from websockify.websocket import WebSocket, WebSocketWantReadError, WebSocketWantWriteError


class QueryWebSocket(WebSocket):
    """websockify's client drops the URI's query; a token travels in it."""

    query = urllib.parse.urlparse(sys.argv[1]).query

    def send_request(self, type, path):
        super().send_request(type, f"{path}?{self.query}" if self.query else path)


ws = QueryWebSocket()


def retry(call, *args):
    while True:
        try:
            return call(*args)
        except WebSocketWantReadError:
            select.select([ws], [], [])
        except WebSocketWantWriteError:
            select.select([], [ws], [])


retry(ws.connect, sys.argv[1], None, ["binary"])
retry(ws.send, b"ping")
got = b""
try:
    while len(got) < 4:
        chunk = retry(ws.recv)
        if chunk is None:
            print("closed before-echo", flush=True)
            sys.exit(0)
        got += chunk
except OSError as e:
    print("closed before-echo", e.__class__.__name__, flush=True)
    sys.exit(0)
print("echo", got.decode(), flush=True)
try:
    while True:
        if retry(ws.recv) is None:
            print("closed by-close-frame", ws.close_code, flush=True)
            break
except OSError as e:
    print("closed", e.__class__.__name__, flush=True)

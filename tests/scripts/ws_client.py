"""A websocket client (websockify's own WebSocket class) for the tests.

Connects to URI, sends "ping", prints "echo ping" once it comes back, then
waits and prints how the connection ended: "closed <how>".
"""
import select
import sys

from websockify.websocket import WebSocket, WebSocketWantReadError, WebSocketWantWriteError

ws = WebSocket()


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
while len(got) < 4:
    got += retry(ws.recv) or b""
print("echo", got.decode(), flush=True)
try:
    while True:
        if retry(ws.recv) is None:
            print("closed by-close-frame", ws.close_code, flush=True)
            break
except OSError as e:
    print("closed", e.__class__.__name__, flush=True)

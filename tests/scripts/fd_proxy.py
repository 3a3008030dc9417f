"""A minimal console proxy for the integration tests.

Accepts one client on LISTEN, connects to UPSTREAM, registers both sockets
with reaper through examples/reaper_grant.py (the client package,
SCM_RIGHTS), prints the grant
result as one JSON line, then relays bytes until either side fails and
prints how each side ended.

usage: fd_proxy.py REAPER_SOCKET LISTEN UPSTREAM TTL [SESSION]

LISTEN and UPSTREAM are a port (on 127.0.0.1) or HOST:PORT.
"""
import json
import os
import select
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from reaper_grant import reaper_grant  # noqa: E402



def address(text):
    host, _, port = text.rpartition(":")
    return (host or "127.0.0.1", int(port))


control, listen, upstream_at, ttl = sys.argv[1], address(sys.argv[2]), address(sys.argv[3]), sys.argv[4]
session = sys.argv[5] if len(sys.argv) > 5 else "py-1"
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(listen)
server.listen()
print("listening", flush=True)
client, _ = server.accept()
upstream = socket.create_connection(upstream_at)
print("upstream %s:%d" % upstream.getsockname()[:2], flush=True)
result = reaper_grant(session, "carol", "vm-7", ttl, [client, upstream], path=control)
print(json.dumps(result), flush=True)

ends = {}
pairs = {client: ("client", upstream), upstream: ("upstream", client)}
while len(ends) < 2:
    ready, _, _ = select.select([s for s in pairs if pairs[s][0] not in ends], [], [], 10)
    if not ready:
        break
    for s in ready:
        name, other = pairs[s]
        try:
            data = s.recv(4096)
            if not data:
                ends[name] = "eof"
                continue
            other.sendall(data)
        except OSError as e:
            ends[name] = os.strerror(e.errno) if e.errno else str(e)
print(json.dumps(ends), flush=True)

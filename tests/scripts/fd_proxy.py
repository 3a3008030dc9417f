"""A minimal console proxy for the integration tests.

Accepts one client on LISTEN, connects to UPSTREAM, registers both sockets
with reaper through examples/reaper_grant.py (the client package,
SCM_RIGHTS), prints the grant
result as one JSON line, then relays bytes until either side fails and
prints how each side ended.

usage: fd_proxy.py REAPER_SOCKET LISTEN_PORT UPSTREAM_PORT TTL
"""
import json
import os
import select
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from reaper_grant import reaper_grant  # noqa: E402

control, listen_port, upstream_port, ttl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", listen_port))
server.listen()
print("listening", flush=True)
client, _ = server.accept()
upstream = socket.create_connection(("127.0.0.1", upstream_port))
result = reaper_grant("py-1", "carol", "vm-7", ttl, [client, upstream], path=control)
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

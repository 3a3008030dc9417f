"""Fills the flow table as an unprivileged local user would: listens on a
watched port and connects to itself N times (two tracked sockets each).

    flow_flood.py PORT N

Prints "ready LOCAL REMOTE" (the addresses of its last connection, from
the listener's side) once done, then holds every socket until stdin
closes.
"""

import resource
import socket
import sys

port, count = int(sys.argv[1]), int(sys.argv[2])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", port))
listener.listen(1024)
held = []
for _ in range(count):
    client = socket.create_connection(("127.0.0.1", port))
    server, _ = listener.accept()
    held += [client, server]
local, remote = held[-1].getsockname(), held[-1].getpeername()
print(f"ready {local[0]}:{local[1]} {remote[0]}:{remote[1]}", flush=True)
sys.stdin.read()

"""Floods a reaper control socket as a hostile local user would.

    control_flood.py idle SOCKET N      hold N connections open, send nothing
    control_flood.py fds SOCKET N M     on N connections, send M messages of
                                        one byte and 16 descriptors each,
                                        never a newline, then hold them
    control_flood.py expect SOCKET N    on one connection, ask for N sessions
                                        that each pre-register a connection
                                        (no socket needed)

Prints "ready CONNECTED SENT" once done (the connections it got, the
descriptors the daemon took, or the grants it got and the refusal codes
it met), then holds everything until stdin closes.
"""

import json
import os
import resource
import socket
import sys

mode, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

conns = []
for _ in range(1 if mode == "expect" else count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        break
    conns.append(s)

sent = 0
if mode == "fds":
    messages = int(sys.argv[4])
    null = os.open("/dev/null", os.O_RDONLY)
    for s in conns:
        s.settimeout(0.2)
        for _ in range(messages):
            try:
                socket.send_fds(s, [b" "], [null] * 16)
            except OSError:
                break
            sent += 16

if mode == "expect":
    reader = conns[0].makefile("r")
    granted, codes = 0, set()
    for i in range(count):
        request = {"op": "grant", "session": f"flood-{os.getpid()}-{i}", "user": "u",
                   "target": f"t{i}", "ttl": "1h",
                   "expect": [{"local": "127.0.0.1:0", "remote": f"127.0.0.1:{5901 + i % 98}"}]}
        conns[0].sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(reader.readline())
        if reply["ok"]:
            granted += 1
        else:
            codes.add(reply["error"]["code"])
    print("ready", granted, ",".join(sorted(codes)), flush=True)
else:
    print("ready", len(conns), sent, flush=True)
sys.stdin.read()

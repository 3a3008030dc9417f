"""Floods a reaper control socket as a hostile local user would.

    control_flood.py idle SOCKET N      hold N connections open, send nothing
    control_flood.py fds SOCKET N M     on N connections, send M messages of
                                        one byte and 16 descriptors each,
                                        never a newline, then hold them

Prints "ready CONNECTED SENT" once done (the connections it got, the
descriptors the daemon took), then holds everything until stdin closes.
"""

import os
import resource
import socket
import sys

mode, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

conns = []
for _ in range(count):
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

print("ready", len(conns), sent, flush=True)
sys.stdin.read()

"""Register a proxy's sockets with reaper (Python standard library only).

Hand reaper the connected sockets themselves: it reads each socket's cookie
and addresses from the descriptor, so the proxy never deals in 4-tuples.
"""
import json
import socket


def reaper_grant(session, user, target, ttl, socks, path="/run/reaper/reaper.sock"):
    """Ask reaper to kill `socks` (connected TCP sockets) when `ttl` runs out.

    ttl: seconds (a number) or text such as "10m"; pass expires_at instead by
    editing the request if the proxy has an absolute token expiry.
    """
    request = {
        "v": 1,
        "op": "grant",
        "session": session,
        "user": user,
        "target": target,
        "ttl": ttl,
        "flows": [{"fd": i} for i in range(len(socks))],
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
        control.connect(path)
        # The descriptors travel with the request line, in one sendmsg.
        socket.send_fds(control, [json.dumps(request).encode() + b"\n"],
                        [s.fileno() for s in socks])
        reply = json.loads(control.makefile().readline())
    if not reply["ok"]:
        error = reply["error"]
        raise RuntimeError(f"reaper refused: {error['code']}: {error['message']}")
    return reply["result"]

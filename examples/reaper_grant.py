"""Register a proxy's sockets with reaper, with the client package
(clients/python, `pip install ./clients/python`).

Hand reaper the connected sockets themselves: it reads each socket's cookie
and addresses from the descriptor, so the proxy never deals in 4-tuples.
"""
from reaper_client import Client


def reaper_grant(session, user, target, ttl, socks, path="/run/reaper/reaper.sock"):
    """Ask reaper to kill `socks` (connected TCP sockets) when `ttl` runs out
    (seconds, or text such as "10m"; `expires_at=` takes the token's expiry)."""
    with Client(path) as reaper:
        return reaper.grant(session, user, target, sockets=socks, ttl=ttl)

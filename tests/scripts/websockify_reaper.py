"""websockify, registering every connection it proxies with reaper.

A small adapter, not a fork: it wraps websockify's ProxyRequestHandler so
that, once the upstream connection is made, the client's websocket and the
upstream socket are handed to reaper (examples/reaper_grant.py, SCM_RIGHTS)
before websockify starts relaying. Arguments are websockify's own.

Environment: REAPER_SOCKET, REAPER_SESSION, REAPER_USER, REAPER_TARGET,
REAPER_TTL.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
from reaper_grant import reaper_grant  # noqa: E402
from websockify import websocketproxy  # noqa: E402

_relay = websocketproxy.ProxyRequestHandler.do_proxy


def do_proxy(self, target):
    env = os.environ
    reaper_grant(env["REAPER_SESSION"], env["REAPER_USER"], env["REAPER_TARGET"],
                 env["REAPER_TTL"], [self.request, target], path=env["REAPER_SOCKET"])
    return _relay(self, target)


websocketproxy.ProxyRequestHandler.do_proxy = do_proxy
sys.argv = ["websockify"] + sys.argv[1:]
websocketproxy.websockify_init()

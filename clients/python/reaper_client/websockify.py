"""reaper for websockify-based console proxies (websockify itself, Nova's
noVNC / SPICE / serial proxies).

The hook grants the two sockets of each proxied connection, the client's
websocket and the upstream console connection, at the moment the proxy
starts relaying, so the kernel ends both at the token's expiry whatever the
proxy does afterwards::

    from reaper_client import websockify as reaper_websockify
    reaper_websockify.install(lambda handler, upstream: {
        "session": token_id, "user": user, "target": instance,
        "expires_at": token_expiry,
    })

``install`` wraps ``websockify.websocketproxy.ProxyRequestHandler.do_proxy``
(the method every websockify handler, Nova's included, relays through). A
grant that the daemon refuses ends the connection before any byte is
relayed: the proxy fails closed.

Plain websockify needs no code: run it through this module with a flag::

    python3 -m reaper_client.websockify --reaper-ttl 10m -- \\
        --token-plugin TokenFile --token-source /etc/websockify/tokens 6080

Each connection is then a session named by its token (``?token=...`` in the
URL, or ``ws-<client port>`` without one), for user ``--reaper-user``
(default ``websockify``), with the upstream ``host:port`` as its target.
"""

import argparse
import sys
import urllib.parse
from typing import Any, Callable, Dict, List, Optional

from . import Client, ReaperError

Terms = Callable[[Any, Any], Dict[str, Any]]


def token_of(handler: Any) -> Optional[str]:
    """The ``token`` query parameter of the request the handler serves."""
    query = urllib.parse.urlparse(getattr(handler, "path", "") or "").query
    values = urllib.parse.parse_qs(query).get("token")
    return values[0] if values else None


def install(terms: Terms, client: Optional[Client] = None, relay_class: Any = None) -> None:
    """Grant every relayed connection with the terms ``terms(handler,
    upstream)`` returns: ``session``, ``user``, ``target`` and the
    ``Client.grant`` keywords (``ttl`` or ``expires_at``, ``klass``,
    ``idle_timeout``...). ``relay_class`` is the handler class to patch
    (default websockify's ``ProxyRequestHandler``)."""
    if relay_class is None:
        from websockify import websocketproxy

        relay_class = websocketproxy.ProxyRequestHandler
    reaper = client if client is not None else Client()
    relay = relay_class.do_proxy

    def do_proxy(self: Any, target: Any) -> Any:
        grant = dict(terms(self, target))
        session, user, name = grant.pop("session"), grant.pop("user"), grant.pop("target")
        try:
            reaper.grant(session, user, name, sockets=[self.request, target], **grant)
        except ReaperError as e:
            # Fail closed: a console the kernel would not end is not relayed.
            self.log_message("reaper refused the connection, closing it: %s", e)
            target.close()
            return None
        return relay(self, target)

    relay_class.do_proxy = do_proxy


def _wrapper_terms(args: argparse.Namespace) -> Terms:
    def terms(handler: Any, upstream: Any) -> Dict[str, Any]:
        host, port = upstream.getpeername()[:2]
        token = token_of(handler)
        session = token if token else f"ws-{handler.client_address[1]}"
        grant: Dict[str, Any] = {
            "session": session,
            "user": args.reaper_user,
            "target": f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
        }
        if args.reaper_ttl is not None:
            grant["ttl"] = args.reaper_ttl
        if args.reaper_expires_at is not None:
            text = args.reaper_expires_at
            # "@SECONDS" is Unix time, as date(1) writes it.
            grant["expires_at"] = float(text[1:]) if text.startswith("@") else text
        if args.reaper_class is not None:
            grant["klass"] = args.reaper_class
        if args.reaper_idle_timeout is not None:
            grant["idle_timeout"] = args.reaper_idle_timeout
        return grant

    return terms


def main(argv: Optional[List[str]] = None) -> None:
    """``python3 -m reaper_client.websockify [--reaper-...] -- WEBSOCKIFY ARGS``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python3 -m reaper_client.websockify",
        description="websockify, with every proxied connection granted to reaper",
    )
    parser.add_argument("--reaper-socket", default="/run/reaper/reaper.sock")
    parser.add_argument("--reaper-user", default="websockify")
    parser.add_argument("--reaper-class")
    parser.add_argument("--reaper-idle-timeout")
    deadline = parser.add_mutually_exclusive_group()
    deadline.add_argument("--reaper-ttl", help="e.g. 10m (default: the class's ttl)")
    deadline.add_argument("--reaper-expires-at", help="an RFC 3339 time, or @UNIX-SECONDS")
    args = parser.parse_args(ours)
    from websockify import websocketproxy

    install(_wrapper_terms(args), Client(args.reaper_socket))
    sys.argv = ["websockify"] + theirs
    websocketproxy.websockify_init()


if __name__ == "__main__":
    main()

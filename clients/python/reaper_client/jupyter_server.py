"""reaper for Jupyter single-user servers: a jupyter_server extension that
registers every terminal and kernel websocket as a session of the server's
user, so that the hub's logout (``reaper_client.jupyterhub``) or an
operator's ``reaper revoke --user`` closes them in the kernel.

Enable it on the servers JupyterHub spawns::

    c.Spawner.args = [
        '--ServerApp.jpserver_extensions={"reaper_client.jupyter_server": True}',
    ]

Each websocket becomes a session ``jupyter:<user>/<server>:<kind>:<name>``
(kind ``terminal`` or ``kernel``) for the user JupyterHub names
(``JUPYTERHUB_USER``), target ``jupyter:<user>/<server>``, with the reaper
class ``REAPER_CLASS`` (default ``notebook``) and, if set, ``REAPER_TTL``.
The socket granted is the server's end of the proxied connection, which is
on a port the reaper config watches (set the servers' ports with
``Spawner.port`` or a ``pre_spawn_hook``). A grant the daemon refuses
closes the websocket (fail closed). When the websocket closes, its session
is revoked.
"""

import itertools
import os
from typing import Any, Dict, Optional

from . import Client, ReaperError

_client: Optional[Client] = None
_serial = itertools.count(1)


def _reaper() -> Client:
    global _client
    if _client is None:
        _client = Client(os.environ.get("REAPER_SOCKET", "/run/reaper/reaper.sock"))
    return _client


def _terms(kind: str, name: str) -> Dict[str, Any]:
    user = os.environ.get("JUPYTERHUB_USER", "jupyter")
    server = os.environ.get("JUPYTERHUB_SERVER_NAME", "") or "default"
    grant: Dict[str, Any] = {
        "session": f"jupyter:{user}/{server}:{kind}:{name}:{next(_serial)}",
        "user": user,
        "target": f"jupyter:{user}/{server}",
        "klass": os.environ.get("REAPER_CLASS", "notebook"),
    }
    if os.environ.get("REAPER_TTL"):
        grant["ttl"] = os.environ["REAPER_TTL"]
    return grant


def _wrap(handler_class: Any, kind: str, name_of: Any) -> None:
    opened = handler_class.open
    closed = handler_class.on_close

    async def open(self: Any, *args: Any, **kwargs: Any) -> Any:
        grant = _terms(kind, name_of(self, args, kwargs))
        session, user, target = grant.pop("session"), grant.pop("user"), grant.pop("target")
        try:
            stream = self.ws_connection.stream
            _reaper().grant(session, user, target, sockets=[stream.socket], **grant)
            self._reaper_session = session
        except (ReaperError, AttributeError) as e:
            self.log.error("reaper refused the %s websocket, closing it: %s", kind, e)
            self.close()
            return None
        result = opened(self, *args, **kwargs)
        if hasattr(result, "__await__"):
            result = await result
        return result

    def on_close(self: Any) -> Any:
        session = getattr(self, "_reaper_session", None)
        if session is not None:
            try:
                _reaper().revoke(session=session)
            except ReaperError:
                pass  # already ended (revoked, expired): nothing to undo
        return closed(self)

    handler_class.open = open
    handler_class.on_close = on_close


def _load_jupyter_server_extension(serverapp: Any) -> None:
    try:
        from jupyter_server_terminals.handlers import TermSocket

        _wrap(TermSocket, "terminal", lambda h, args, kwargs: str(args[0] if args else kwargs.get("url_component", "")))
    except ImportError:
        serverapp.log.info("reaper: jupyter_server_terminals is not installed; terminals are not registered")
    from jupyter_server.services.kernels.websocket import KernelWebsocketHandler

    _wrap(KernelWebsocketHandler, "kernel", lambda h, args, kwargs: str(getattr(h, "kernel_id", "")))
    serverapp.log.info("reaper: terminal and kernel websockets are registered with reaper")


def _jupyter_server_extension_points() -> list:
    return [{"module": "reaper_client.jupyter_server"}]

"""reaper for OpenStack Nova's console proxies (nova-novncproxy,
nova-spicehtml5proxy, nova-serialproxy), which are websockify servers.

Nova checks the console token and connects to the compute node, then
relays; this hook grants both sockets to reaper when relaying starts, with
the token's expiry (``connect_info.expires``) as the deadline and the
instance as the target, so the connection ends when the token does, in the
kernel, whatever the proxy does. Add to the proxy's start-up (for example a
``sitecustomize`` module on its path, or a wrapper script)::

    from reaper_client import nova
    nova.install()

``revoke --target INSTANCE_UUID`` then ends every console of an instance
(on a resize, a rescue, a migration), and ``revoke --user PROJECT_ID`` every
console of a project.
"""

from typing import Any, Optional

from . import Client
from . import websockify


def install(client: Optional[Client] = None, klass: Optional[str] = None) -> None:
    """Patch Nova's ``NovaProxyRequestHandler`` (imported here)."""
    from nova.console import websocketproxy as nova_proxy

    handler_class = nova_proxy.NovaProxyRequestHandler
    lookup = handler_class._get_connect_info

    def _get_connect_info(self: Any, ctxt: Any, token: str) -> Any:
        info = lookup(self, ctxt, token)
        # Kept for the relay hook: Nova passes only the socket to do_proxy.
        self._reaper_connect_info = info
        self._reaper_project = getattr(ctxt, "project_id", None)
        return info

    handler_class._get_connect_info = _get_connect_info
    websockify.install(lambda h, upstream: terms(h, klass), client, relay_class=handler_class)


def terms(handler: Any, klass: Optional[str] = None) -> dict:
    """The grant for the console ``handler`` relays: the token's expiry as
    the deadline, the instance as the target."""
    info = handler._reaper_connect_info
    grant = {
        "session": f"nova-{info.token_hash or info.id}",
        "user": handler._reaper_project or "nova",
        "target": info.instance_uuid,
        "expires_at": float(info.expires),
    }
    if klass is not None:
        grant["klass"] = klass
    return grant

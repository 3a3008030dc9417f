"""reaper for JupyterHub: logging out ends the user's live connections.

With JupyterHub's defaults a terminal or kernel websocket opened before a
logout keeps working after it (new requests get 403, the live socket
stays). In ``jupyterhub_config.py``::

    from reaper_client import jupyterhub as reaper_hub
    reaper_hub.revoke_on_logout()

makes every logout revoke the user's reaper sessions (``revoke --user``):
the websockets the single-user servers registered (``reaper_client.
jupyter_server``) are destroyed in the kernel at once, while the servers
themselves keep running. Pair it with ``--HubOAuth.cache_max_age=0`` on
the servers, so that a reconnect after the logout is checked with the hub
(and refused) rather than accepted from a cache.
"""

import asyncio
from typing import Any, Optional

from . import Client, ReaperError


def revoke_on_logout(client: Optional[Client] = None) -> None:
    """Patch JupyterHub's ``LogoutHandler`` (imported here)."""
    from jupyterhub.handlers.login import LogoutHandler

    reaper = client if client is not None else Client()
    logout = LogoutHandler.default_handle_logout

    async def default_handle_logout(self: Any) -> None:
        user = self.current_user
        await logout(self)
        if user is None:
            return
        try:
            # Off the hub's event loop: one request on a Unix socket.
            result = await asyncio.get_running_loop().run_in_executor(
                None, lambda: reaper.revoke(user=user.name)
            )
            self.log.info("reaper: logout of %s ended %d session(s)", user.name, len(result.get("sessions", [])))
        except ReaperError as e:
            self.log.error("reaper: revoking %s's sessions at logout: %s", user.name, e)

    LogoutHandler.default_handle_logout = default_handle_logout

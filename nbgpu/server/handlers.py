"""Request handlers of the GPU panel, with the permission checks of jupyter_server's own kernel API: each method is
`@web.authenticated` and `@authorized` on the "kernels" resource (read to see, write to shut down)."""

from __future__ import annotations

import asyncio
import json
import os

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .. import kernels
from ..devices import SimulateSpecError, parse_simulate_spec
from ..occupancy import occupancy

AUTH_RESOURCE = "kernels"
_KERNEL_ID = r"(?P<kernel_id>[\w-]+)"


def _pid(kernel) -> int | None:
    provisioner = getattr(kernel, "provisioner", None)
    pid = getattr(provisioner, "pid", None)
    if pid is None:
        pid = getattr(getattr(provisioner, "process", None), "pid", None)
    return pid if isinstance(pid, int) else None


async def own_kernels(kernel_manager, session_manager, server_url: str = "", user: str | None = None
                      ) -> list[kernels.Kernel]:
    """This server's kernels, first hand: pids from the kernel manager, notebooks from the session manager."""
    sessions = {s["kernel"]["id"]: s for s in await session_manager.list_sessions() if s.get("kernel")}
    out = []
    for kernel_id in kernel_manager.list_kernel_ids():
        try:
            k = kernel_manager.get_kernel(kernel_id)
        except KeyError:  # shut down meanwhile
            continue
        s = sessions.get(kernel_id, {})
        out.append(kernels.Kernel(id=kernel_id, name=getattr(k, "kernel_name", None), path=s.get("path"),
                                  server=server_url, pid=_pid(k), session_type=s.get("type"),
                                  execution_state=getattr(k, "execution_state", None), user=user))
    return out


class _Handler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def panel(self) -> dict:
        return self.settings["nbgpu"]


class GPUsHandler(_Handler):
    @web.authenticated
    @authorized
    async def get(self):
        own = await own_kernels(self.kernel_manager, self.session_manager, "", self.panel["user"])
        found = await asyncio.get_running_loop().run_in_executor(
            None, lambda: occupancy(own, simulate=self.panel["simulate"], others=self.panel["others"]))
        body = found.to_json()
        body["notes"] = self.panel["notes"] + body["notes"]
        self.finish(json.dumps(body))


class KernelHandler(_Handler):
    @web.authenticated
    @authorized
    async def delete(self, kernel_id: str):
        km = self.kernel_manager
        if kernel_id not in km:
            raise web.HTTPError(404, f"{kernel_id} is not a kernel of this server: nbgpu shuts down only those")
        session = next((s for s in await self.session_manager.list_sessions()
                        if s.get("kernel", {}).get("id") == kernel_id), None)
        if session is not None:  # as JupyterLab's "shut down" does: the session goes with its kernel
            await self.session_manager.delete_session(session["id"])
        else:
            await ensure_async(km.shutdown_kernel(kernel_id))
        self.set_status(204)
        self.finish()


def _simulate_spec(log) -> tuple[str | None, list[str]]:
    """NBGPU_SIMULATE, when set and readable; a spec it cannot read is reported in the panel, not a crash."""
    spec = os.environ.get("NBGPU_SIMULATE") or None
    if spec is None:
        return None, []
    try:
        parse_simulate_spec(spec)
    except SimulateSpecError as err:
        log.warning("nbgpu: NBGPU_SIMULATE=%r is ignored: %s", spec, err)
        return None, [f"NBGPU_SIMULATE={spec!r} is ignored: {err}"]
    return spec, []


def setup_handlers(web_app, log) -> None:
    import psutil

    base = web_app.settings["base_url"]
    try:
        user = psutil.Process().username()
    except (psutil.Error, KeyError):
        user = None
    spec, notes = _simulate_spec(log)
    web_app.settings["nbgpu"] = {
        "simulate": spec,
        "notes": notes,
        "others": kernels.ServerDirectory(exclude_pid=os.getpid()),  # this user's other servers, over REST
        "user": user,
    }
    web_app.add_handlers(".*$", [
        (url_path_join(base, "nbgpu", "api", "gpus"), GPUsHandler),
        (url_path_join(base, "nbgpu", "api", "kernels", _KERNEL_ID), KernelHandler),
    ])

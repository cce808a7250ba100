"""The jupyter-server extension: authenticated REST endpoints for the JupyterLab GPU panel.

    GET    <base>/nbgpu/api/gpus                 every GPU, its processes named (notebook, kernel or command line),
                                                 and which GPUs each kernel of this server sees
    DELETE <base>/nbgpu/api/kernels/<kernel id>  shut down a kernel of this server (and its notebook session)

Enabled with the package (`etc/jupyter/jupyter_server_config.d/nbgpu.json` turns on the `nbgpu` extension, whose
`_jupyter_server_extension_points` names this module). NBGPU_SIMULATE in the server's environment makes it show
simulated GPUs; without NVIDIA GPUs it shows the simulated GPUs its kernels publish.
"""

from __future__ import annotations

from .handlers import setup_handlers


def _load_jupyter_server_extension(server_app) -> None:
    setup_handlers(server_app.web_app, server_app.log)
    server_app.log.info("nbgpu: GPU panel endpoints at %snbgpu/api", server_app.web_app.settings["base_url"])


__all__ = ["_load_jupyter_server_extension"]

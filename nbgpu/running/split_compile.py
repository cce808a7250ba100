"""torch.compile for a model split over several GPUs by layers.

accelerate moves every module's inputs with a hook of its own; traced by dynamo, those hooks (one closure per module,
the same code) exhaust its recompile limit and the split runs slower compiled than eager (10.3 against 24.1
tokens/s for an 8B shape on two H100s). For a compiled run the hooks are swapped for one light pre-hook per placed
module that moves tensors only where the device changes, in a function dynamo does not trace, and accelerate's
hooks come back afterwards.

The hand-over breaks dynamo's graph inside the model's layer loop, so each decoder layer becomes a compiled frame of
its own (the same code with another layer index: one entry per layer, so the recompile limit is raised for the
run). Each frame records its own CUDA graph; what stays is the host's work per layer. Measured on two H200s, a 1B
Llama shape: 8.1 ms per token compiled against 23.3 eager on the split, and 2.6 compiled on one GPU.
"""

from __future__ import annotations

from contextlib import contextmanager

from . import placement


def gpu_count(model) -> int:
    return len({d for d in placement.actual_map(model).values() if isinstance(d, int)})


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _to(value, device):
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _mover(device):
    import torch

    @torch.compiler.disable
    def move(args, kwargs):
        return _to(args, device), _to(kwargs, device)

    def hook(module, args, kwargs):
        if any(t.device != device for t in _tensors((args, kwargs))):  # decided while tracing: devices are static
            return move(args, kwargs)
        return None

    return hook


@contextmanager
def light_transfers(model):
    """Inside the block, `model` moves tensors between its GPUs with one light hook per placed module instead of
    accelerate's hooks; a model on one device is left as it is."""
    import torch
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    if gpu_count(model) < 2:
        yield
        return
    modules = dict(model.named_modules())
    hooked = [(m, m._hf_hook) for m in modules.values() if hasattr(m, "_hf_hook")]
    for m, _ in hooked:
        remove_hook_from_module(m)
    handles = []
    config = torch._dynamo.config
    limits = config.recompile_limit, config.accumulated_recompile_limit
    config.recompile_limit = max(limits[0], 8 * len(placement.actual_map(model)))
    config.accumulated_recompile_limit = max(limits[1], 8 * config.recompile_limit)
    try:
        for name, device in placement.actual_map(model).items():
            if isinstance(device, int) and name in modules:
                handles.append(modules[name].register_forward_pre_hook(
                    _mover(torch.device("cuda", device)), with_kwargs=True))
        yield
    finally:
        config.recompile_limit, config.accumulated_recompile_limit = limits
        for h in handles:
            h.remove()
        for m, hook in hooked:
            add_hook_to_module(m, hook)

"""Where each part of a model lives: module name -> device, bytes and decoder layers per device.

A device is an int (cuda:N), "cpu" or "disk". With simulated GPUs the model runs on the CPU, but its placement is
the one it would have on the GPUs (from the plan or from accelerate), so the roofline and timeline still speak of
the simulated GPUs.
"""

from __future__ import annotations

from collections import defaultdict


def normalise(device):
    """0, 'cuda:0', torch.device('cuda', 0) -> 0; 'cpu' -> 'cpu'; 'disk' -> 'disk'."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    text = str(device)
    if text.startswith("cuda"):
        return int(text.split(":")[1]) if ":" in text else 0
    if text.isdigit():
        return int(text)
    return text


def device_of(device_map: dict, name: str):
    """The device of module or parameter `name` under `device_map` (longest matching prefix wins)."""
    best, best_len = None, -1
    for key, device in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best_len:
            best, best_len = device, len(key)
    return normalise(best) if best is not None else None


def actual_map(model) -> dict:
    """The device map the model really runs with."""
    if getattr(model, "hf_device_map", None):
        return {k: normalise(v) for k, v in model.hf_device_map.items()}
    param = next(model.parameters(), None)
    return {"": normalise(param.device) if param is not None else "cpu"}


def gpu_map(model) -> dict:
    """The placement on GPUs: the simulated one after a simulated load, else the real one."""
    report = getattr(model, "nbgpu_load", None)
    if report is not None and report.placement:
        return dict(report.placement)
    return actual_map(model)


def bytes_per_device(model, device_map: dict) -> dict:
    """Bytes of parameters and buffers on each device of `device_map`."""
    out: dict = defaultdict(int)
    seen = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:  # tied weights count once
            continue
        seen.add(id(tensor))
        out[device_of(device_map, name)] += tensor.numel() * tensor.element_size()
    return dict(out)


def layer_devices(model, device_map: dict) -> list:
    """The device of each decoder layer (the model's no-split blocks), in layer order."""
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    return [device_of(device_map, name) for name, module in model.named_modules()
            if type(module).__name__ in block_names]


def cuda_devices(model) -> list[int]:
    """The cuda:N indexes the model's tensors really live on."""
    found = {normalise(p.device) for p in model.parameters()}
    return sorted(d for d in found if isinstance(d, int))


def synchronizer(devices: list[int]):
    """A function that waits for every GPU in `devices` (a no-op on the CPU)."""
    if not devices:
        return lambda: None
    import torch

    def sync():
        for d in devices:
            torch.cuda.synchronize(d)

    return sync


def cache_argument(model) -> str:
    """The name a model's forward takes its KV cache by: `cache` in newer transformers, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward returned, under either name."""
    return output.cache if hasattr(output, "cache") else output.past_key_values

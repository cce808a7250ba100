"""Where each unit goes. A strategy returns {unit name: device}, device an int cuda index, "cpu" or "disk".

balanced   contiguous units per GPU, minimising the largest per-GPU total relative to its budget (on equal GPUs:
           the largest total); works for GPUs of different sizes.
sequential fill cuda:0, then cuda:1, ... up to each budget.
accelerate exactly what `from_pretrained(device_map="auto", max_memory=plan.max_memory)` picks (transformers'
           own `_get_device_map`, which runs accelerate's balanced memory and `infer_auto_device_map`).
manual     a dict of module names or layer ranges -> device, or a list of decoder-layer counts per GPU.
"""

from __future__ import annotations

import logging
import numbers
import re
from contextlib import contextmanager

from .. import checks
from ..errors import UsageError
from .meta_model import MetaModel

STRATEGIES = ("balanced", "sequential", "accelerate")
_RANGE = re.compile(r"^(?P<prefix>.+)\.(?P<lo>\d+)-(?P<hi>\d+)$", re.ASCII | re.DOTALL)


class Costs:
    """What each unit costs on the GPU it lands on, and what a GPU costs once used (from the plan's estimates)."""

    def __init__(self, meta: MetaModel, est, fixed: list[int], context: int):
        self.meta, self.est, self.fixed, self.context = meta, est, fixed, context
        # tied units follow the first of their group; the sequence to partition holds the group leaders only
        follow = {}
        for group in meta.tied_units:
            order = sorted(group, key=[u.name for u in meta.units].index)
            follow.update({name: order[0] for name in order[1:]})
        self.follow = follow
        self.leaders = [u.name for u in meta.units if u.name not in follow]
        self.members = {name: [name] for name in self.leaders}
        for name, leader in follow.items():
            self.members[leader].append(name)

    def unit_bytes(self, name: str) -> int:
        u = self.meta.unit(name)
        kv = self.est.kv_per_layer.get(u.layer, 0) if u.layer is not None else 0
        extra = self.est.input_activations if name == self.meta.embed else 0
        extra += self.est.logits if name == self.meta.head else 0
        return u.size + kv + extra

    def item_bytes(self, leader: str) -> tuple[int, bool]:
        names = self.members[leader]
        return sum(self.unit_bytes(n) for n in names), any(self.meta.unit(n).layer is not None for n in names)


def expand(costs: Costs, leader_devices: dict[str, object]) -> dict[str, object]:
    """Leader -> device to every unit -> device, tied followers with their leader, in model order."""
    out = {}
    for u in costs.meta.units:
        out[u.name] = leader_devices[costs.follow.get(u.name, u.name)]
    return out


def _greedy(costs: Costs, caps: list[float], partial: bool = False) -> dict[str, int] | None:
    """Fill GPUs in order while each stays within its cap; None when the units do not all fit (with `partial`,
    the units that fit, in order)."""
    out, g, used, has_layer = {}, 0, 0.0, False
    for leader in costs.leaders:
        size, is_layer = costs.item_bytes(leader)
        while g < len(caps):
            need = size + (costs.est.layer_activations if is_layer and not has_layer else 0)
            if used + need <= caps[g]:
                used, has_layer = used + need, has_layer or is_layer
                out[leader] = g
                break
            g, used, has_layer = g + 1, 0.0, False
        else:
            return out if partial else None
    return out


def _caps(costs: Costs, budgets: list[int], ratio: float) -> list[float]:
    return [ratio * b - f - costs.context if b > 0 else -1 for b, f in zip(budgets, costs.fixed)]


def balanced(costs: Costs, budgets: list[int]) -> tuple[dict, float]:
    """The contiguous split with the smallest largest total/budget ratio (binary search on the ratio)."""
    usable = [b for b in budgets if b > 0]
    if not usable:
        raise UsageError("no GPU has room left after the reserve and what other processes use: lower `reserve`, "
                         "free memory on a GPU, or plan for other GPUs")
    lo, hi = 0.0, 1.0
    while _greedy(costs, _caps(costs, budgets, hi)) is None:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise UsageError("the model cannot be placed on these GPUs at any ratio (a single unit is larger than "
                             "every GPU budget)")
    for _ in range(40):
        mid = (lo + hi) / 2
        if _greedy(costs, _caps(costs, budgets, mid)) is None:
            lo = mid
        else:
            hi = mid
    return expand(costs, _greedy(costs, _caps(costs, budgets, hi))), hi


def sequential(costs: Costs, budgets: list[int]) -> dict | None:
    found = _greedy(costs, _caps(costs, budgets, 1.0))
    return None if found is None else expand(costs, found)


def offload(costs: Costs, budgets: list[int], account, cpu_budget: int, allow_disk: bool) -> dict:
    """GPUs filled in order; what does not fit goes to the CPU, then to disk (from the end of the model, as
    accelerate does). `account(assignment)` gives the per-GPU overs, including what offloaded layers add to cuda:0."""
    caps = _caps(costs, budgets, 1.0)
    for _ in range(4 * len(costs.leaders) + 4):  # offloaded layers add KV and transfers to cuda:0: shrink and refill
        found = _greedy(costs, caps, partial=True)
        placed = {leader: found.get(leader, "cpu") for leader in costs.leaders}
        overs = account(expand(costs, placed))
        if not any(overs):
            break
        caps = [c - o for c, o in zip(caps, overs)]
    cpu_used = 0
    for leader in costs.leaders:
        if placed[leader] == "cpu":
            size = sum(costs.meta.unit(n).size for n in costs.members[leader])
            if cpu_used + size > cpu_budget and allow_disk:
                placed[leader] = "disk"
            else:
                cpu_used += size
    return expand(costs, placed)


@contextmanager
def _quiet_transformers():
    logger = logging.getLogger("transformers")
    accel = logging.getLogger("accelerate")
    levels = logger.level, accel.level
    logger.setLevel(logging.ERROR)
    accel.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(levels[0])
        accel.setLevel(levels[1])


def accelerate_map(meta: MetaModel, max_memory: dict) -> dict:
    """What `from_pretrained(device_map="auto", max_memory=max_memory)` computes, without a GPU."""
    try:
        from transformers.integrations.accelerate import _get_device_map
    except ImportError:  # older transformers: the same two accelerate calls from_pretrained made
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        balanced_memory = get_balanced_memory(meta.model, max_memory=max_memory, no_split_module_classes=meta.no_split)
        return dict(infer_auto_device_map(meta.model, max_memory=balanced_memory,
                                          no_split_module_classes=meta.no_split))
    with _quiet_transformers():
        return dict(_get_device_map(meta.model, "auto", dict(max_memory), None))


def units_from_map(meta: MetaModel, device_map: dict) -> dict:
    """Any accelerate-style device map -> unit -> device (a unit split by the map goes where most of it goes)."""
    from accelerate.utils import compute_module_sizes

    sizes = None
    out = {}
    for u in meta.units:
        owner = _lookup(device_map, u.name)
        if owner is not None:
            out[u.name] = owner
            continue
        inside = {k: v for k, v in device_map.items() if k.startswith(u.name + ".")}
        if not inside:
            raise UsageError(f"the device map places nothing for module {u.name!r}: give it a device")
        sizes = sizes or compute_module_sizes(meta.model)
        weight: dict = {}
        for k, v in inside.items():
            weight[v] = weight.get(v, 0) + sizes.get(k, 0)
        out[u.name] = max(weight, key=weight.get)
    return out


def _lookup(device_map: dict, name: str):
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    return None


def select(meta: MetaModel, spec) -> list[str]:
    """Unit names that a user's module spec names: 'model.layers.20-31', a module name, a prefix, or a list."""
    if isinstance(spec, (list, tuple)):
        out = []
        for item in spec:
            out += [n for n in select(meta, item) if n not in out]
        return out
    if not isinstance(spec, str):
        raise UsageError(f"modules are named by strings ('model.layers.3', 'model.layers.20-31'), not "
                         f"{checks.shown(spec)}")
    text = spec.strip()
    names = [u.name for u in meta.units]
    match = _RANGE.match(text)
    if match:
        lo, hi = int(match["lo"]), int(match["hi"])
        if lo > hi:
            raise UsageError(f"range {text!r} runs backwards: write {match['prefix']}.{hi}-{lo}")
        if hi - lo >= len(names):
            raise UsageError(f"{text!r}: the model has {_layer_span(meta)}")
        wanted = [f"{match['prefix']}.{i}" for i in range(lo, hi + 1)]
        missing = [w for w in wanted if w not in names]
        if missing:
            raise UsageError(f"{text!r}: there is no module {missing[0]!r}; the model has {_layer_span(meta)}")
        return wanted
    if text in names:
        return [text]
    under = [n for n in names if n.startswith(text + ".") or text == ""]
    if under:
        return under
    owner = next((u for u in meta.units if text.startswith(u.name + ".")), None)
    if owner is not None:
        why = f"a {owner.cls}, which must stay on one device (a no-split class of this model)" if owner.no_split \
            else "placed as one unit"
        raise UsageError(f"{text!r} is inside {owner.name!r}, {why}: move {owner.name!r} as a whole")
    close = [n for n in names if text.split(".")[-1] in n][:5] or names[:3] + ["..."] + names[-3:]
    raise UsageError(f"there is no module {text!r} in this model. Modules include: {', '.join(close)}")


def _layer_span(meta: MetaModel) -> str:
    layers = [u for u in meta.units if u.layer is not None]
    if not layers:
        return "no numbered layers"
    prefix = layers[0].name.rsplit(".", 1)[0]
    return f"layers {prefix}.{layers[0].layer}-{layers[-1].layer}"


def manual(meta: MetaModel, spec, devices: list) -> dict:
    """A dict {module or range: device} (units not named follow the unit before them, the first ones the unit
    after), or a list of decoder-layer counts per GPU ([14, 18]); `devices` are the valid targets."""
    if isinstance(spec, (list, tuple)):
        return _from_counts(meta, list(spec), devices)
    if not isinstance(spec, dict):
        raise UsageError(f"strategy must be one of {', '.join(STRATEGIES)}, a dict {{module or range: device}} "
                         f"or a list of layer counts per GPU, not {spec!r}")
    chosen: dict[str, object] = {}
    for key, device in spec.items():
        device = check_device(device, devices, key)
        for name in select(meta, key):
            chosen[name] = device
    if not chosen:
        raise UsageError("the manual placement names no module")
    out, last = {}, None
    first = next(chosen[u.name] for u in meta.units if u.name in chosen)
    for u in meta.units:
        last = chosen.get(u.name, last if last is not None else first)
        out[u.name] = last
    return out


def _from_counts(meta: MetaModel, counts: list, devices: list) -> dict:
    layers = [u for u in meta.units if u.layer is not None]
    gpus = [d for d in devices if isinstance(d, int)]
    if len(counts) > len(gpus):
        raise UsageError(f"{len(counts)} layer counts for {len(gpus)} GPU(s): give one count per GPU, at most "
                         f"{len(gpus)}")
    counts = [checks.integer(c, "each layer count", 0, len(layers)) for c in counts]
    if not layers:
        raise UsageError("this model has no numbered decoder layers to count: place its modules by name instead")
    if sum(counts) != len(layers):
        raise UsageError(f"layer counts {counts} add up to {sum(counts)}, but the model has {len(layers)} layers")
    owner, i = {}, 0
    for g, c in enumerate(counts):
        for u in layers[i:i + c]:
            owner[u.name] = g
        i += c
    out, last = {}, None
    first_gpu = next(g for g, c in enumerate(counts) if c)
    for u in meta.units:
        last = owner.get(u.name, last if last is not None else first_gpu)
        out[u.name] = last
    return out


def check_device(device, devices: list, what):
    """The device as a plan stores it: an int cuda index (numpy ints and 'cuda:N' accepted), 'cpu' or 'disk'.
    A float such as 1.0, a bool or a device outside `devices` is refused."""
    found = None
    if isinstance(device, numbers.Integral) and not isinstance(device, bool) and type(device).__name__ != "bool":
        found = int(device)
    elif isinstance(device, str):
        text = device.strip()
        match = re.fullmatch(r"cuda:(\d{1,4})", text, re.ASCII)
        found = int(match.group(1)) if match else text
    if found is None or found not in devices or isinstance(found, bool):
        raise UsageError(f"cannot place {checks.shown(what)} on {checks.shown(device)}: choose one of "
                         f"{', '.join(map(repr, devices))} (ints are cuda:N indexes of this plan)")
    return found

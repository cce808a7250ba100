"""Where each unit goes. A strategy returns {unit name: device}, device an int cuda index, "cpu" or "disk".

balanced   contiguous units per GPU. First objective: the fullest GPU, as a share of the room this plan has on it
           (its budget less what other processes use), as low as possible. Second: among the splits that reach it,
           the emptiest GPU as full as possible, so every GPU given is used and the layers spread as evenly as the
           weights allow. Works for GPUs of different sizes and with other processes' memory on some of them.
sequential fill cuda:0, then cuda:1, ... up to each GPU's room.
accelerate exactly what `from_pretrained(device_map="auto", max_memory=plan.max_memory)` picks (transformers'
           own `_get_device_map`, which runs accelerate's balanced memory and `infer_auto_device_map`).
manual     a dict of module names or layer ranges -> device, or a list of decoder-layer counts per GPU.

The model is partitioned as a sequence of "items": each unit, except tied units, which follow the first of their
group (so a tied output projection goes with the embeddings). A GPU's memory for a run of items comes from the
memory model (`memory.Estimates.device`), tabulated once for every contiguous run.
"""

from __future__ import annotations

import logging
import numbers
import re
from contextlib import contextmanager

import numpy as np

from .. import checks
from ..errors import UsageError
from .meta_model import MetaModel

STRATEGIES = ("balanced", "sequential", "accelerate")
_RANGE = re.compile(r"^(?P<prefix>.+)\.(?P<lo>\d+)-(?P<hi>\d+)$", re.ASCII | re.DOTALL)
_STEPS = 40  # bisection steps: ratios to ~1e-12 of their range


class Costs:
    """What a GPU holds for a contiguous run of items: `load[p, q]` bytes for items p..q-1 (context included),
    0 for an empty run."""

    def __init__(self, meta: MetaModel, est, context: int):
        self.meta, self.est, self.context = meta, est, context
        order = [u.name for u in meta.units]
        follow = {}
        for group in meta.tied_units:
            ordered = sorted(group, key=order.index)
            follow.update({name: ordered[0] for name in ordered[1:]})
        self.follow = follow
        self.leaders = [name for name in order if name not in follow]
        self.members = {name: [name] for name in self.leaders}
        for name, leader in follow.items():
            self.members[leader].append(name)
        self.load = self._table()

    def _item(self, leader: str):
        units = [self.meta.unit(n) for n in self.members[leader]]
        kv_total, kv_prompt = self.est.kv_total, self.est.kv_prompt
        layers = [u.layer for u in units if u.layer is not None]
        return (sum(u.size for u in units), sum(kv_total.get(i, 0) for i in layers),
                sum(kv_prompt.get(i, 0) for i in layers), max((kv_total.get(i, 0) for i in layers), default=0),
                bool(layers), self.meta.embed in self.members[leader], self.meta.head in self.members[leader])

    def _table(self) -> np.ndarray:
        n = len(self.leaders)
        items = [self._item(leader) for leader in self.leaders]
        table = np.zeros((n + 1, n + 1))
        for p in range(n):
            weights = kv_end = kv_prefill = largest = 0
            layers = embed = head = False
            for q in range(p, n):
                w, ke, kp, lk, ly, e, h = items[q]
                weights, kv_end, kv_prefill, largest = weights + w, kv_end + ke, kv_prefill + kp, max(largest, lk)
                layers, embed, head = layers or ly, embed or e, head or h
                mem = self.est.device_sums(kv_end, kv_prefill, largest, layers, embed, head)
                table[p, q + 1] = weights + mem.kv_cache + mem.activations + mem.allocator + self.context
        return table

    def expand(self, leader_devices: dict) -> dict:
        """Leader -> device to every unit -> device, tied followers with their leader, in model order."""
        return {u.name: leader_devices[self.follow.get(u.name, u.name)] for u in self.meta.units}

    def assign(self, cuts: list[int]) -> dict:
        """Item boundaries (len = GPUs + 1, from 0 to the item count) to unit -> cuda index."""
        out = {}
        for g, (p, q) in enumerate(zip(cuts, cuts[1:])):
            out.update({self.leaders[i]: g for i in range(p, q)})
        return self.expand(out)


def _split(costs: Costs, low: np.ndarray, high: np.ndarray) -> list[int] | None:
    """Cuts of a contiguous split with low[g] <= load of GPU g <= high[g] for every GPU (an empty GPU loads 0), or
    None when there is none: reachability of item boundaries, one GPU at a time."""
    n = len(costs.leaders)
    load = costs.load
    later = np.arange(n + 1)[None, :] >= np.arange(n + 1)[:, None]  # a run ends at or after its start
    reach = np.zeros(n + 1, dtype=bool)
    reach[0] = True
    steps = []
    for g in range(len(high)):
        ok = later & (load >= low[g] - 1e-6) & (load <= high[g] + 1e-6) & reach[:, None]
        steps.append(ok)
        reach = ok.any(axis=0)
    if not reach[n]:
        return None
    cuts, end = [n], n
    for ok in reversed(steps):
        start = int(np.flatnonzero(ok[:, end])[-1])  # the latest start: earlier GPUs take less
        cuts.append(start)
        end = start
    return cuts[::-1]


def balanced(costs: Costs, rooms: list[int]) -> tuple[dict, float]:
    """The split minimising the fullest GPU's load / room, then maximising the emptiest's; returns the assignment
    and the first ratio. A GPU with no room (`rooms[g] <= 0`) takes nothing."""
    room = np.array([max(r, 0) for r in rooms], dtype=float)
    usable = room > 0
    if not usable.any():
        raise UsageError("no GPU has room left after the reserve and what other processes use: lower `reserve`, "
                         "free memory on a GPU, or plan for other GPUs")
    zeros = np.zeros(len(room))
    hi = 1.0
    while _split(costs, zeros, hi * room) is None:
        hi *= 2
        if hi > 1e6:
            raise UsageError("the model cannot be placed on these GPUs at any ratio (a single unit is larger than "
                             "every GPU's room)")
    lo = 0.0
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _split(costs, zeros, mid * room) is not None else (mid, hi)
    ratio = hi
    best = _split(costs, zeros, ratio * room)
    floor_lo, floor_hi = 0.0, ratio
    for _ in range(_STEPS):  # second objective: raise the emptiest GPU's share as far as the first one allows
        mid = (floor_lo + floor_hi) / 2
        found = _split(costs, np.where(usable, mid * room, 0.0), ratio * room)
        if found is not None:
            floor_lo, best = mid, found
        else:
            floor_hi = mid
    return costs.assign(best), ratio


def sequential(costs: Costs, rooms: list[int]) -> dict | None:
    """Each GPU filled up to its room before the next is used; None when the model does not fit."""
    n, load = len(costs.leaders), costs.load
    cuts, p = [0], 0
    for r in rooms:
        q = p
        while q < n and load[p, q + 1] <= r:
            q += 1
        cuts.append(q)
        p = q
    return costs.assign(cuts) if p == n else None


def offload(costs: Costs, rooms: list[int], account, cpu_budget: int, allow_disk: bool) -> dict:
    """GPUs filled in order; what does not fit goes to the CPU, then to disk (from the end of the model, as
    accelerate does). `account(assignment)` gives the per-GPU overs, including what offloaded layers add to the GPU
    that runs them."""
    caps = list(rooms)
    n, load = len(costs.leaders), costs.load
    placed: dict = {}
    for _ in range(4 * n + 4):  # offloaded layers add their KV cache to the GPU that runs them: shrink and refill
        placed, p = {}, 0
        for g, cap in enumerate(caps):
            q = p
            while q < n and load[p, q + 1] <= cap:
                q += 1
            placed.update({costs.leaders[i]: g for i in range(p, q)})
            p = q
        placed.update({leader: "cpu" for leader in costs.leaders[p:]})
        overs = account(costs.expand(placed))
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
    return costs.expand(placed)


@contextmanager
def _quiet_transformers():
    loggers = [logging.getLogger(name) for name in ("transformers", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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


def device_of(device_map: dict, name: str):
    """The device of module or parameter `name` under an accelerate-style map (longest matching prefix wins)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    return None


def units_from_map(meta: MetaModel, device_map: dict) -> dict:
    """Any accelerate-style device map -> unit -> device (a unit split by the map goes where most of it goes)."""
    from accelerate.utils import compute_module_sizes

    sizes = None
    out = {}
    for u in meta.units:
        owner = device_of(device_map, u.name)
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

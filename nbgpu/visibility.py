"""Which GPUs this process sees: CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER, the physical <-> cuda:N mapping,
and whether the CUDA driver has already started here (after which a new setting has no effect).

No torch import here: the check asks libcuda directly, and only if the process has already loaded it.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import sys
from dataclasses import dataclass, replace
from itertools import combinations

from . import checks, devices
from .devices import GPU, Inventory, Topology
from .errors import UsageError
from .units import format_size, parse_size

VISIBLE, ORDER = "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"
_GPU_UUID = re.compile(r"^GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_MIG_UUID = re.compile(r"^MIG-(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
                       r"|GPU-[0-9a-fA-F-]{36}/\d+/\d+)$")
_CUDA_ERROR_NOT_INITIALIZED = 3


# --- is the CUDA driver already running in this process? ------------------------------------------------

def _loaded_libcuda():
    """libcuda if this process has already loaded it (RTLD_NOLOAD never loads it), else None."""
    names = ["libcuda.so.1", "libcuda.so"]
    try:
        with open("/proc/self/maps") as maps:
            names += sorted({line.split()[-1] for line in maps if "libcuda.so" in line})
    except OSError:
        pass
    for name in names:
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
    return None


def cuda_driver_initialized() -> bool:
    """True once anything in this process has called cuInit (torch, cupy, jax, numba...).

    `torch.cuda.is_initialized()` alone misses `torch.cuda.is_available()`/`device_count()`, which start the
    driver without setting torch's flag; libcuda's cuDeviceGetCount answers CUDA_ERROR_NOT_INITIALIZED until
    cuInit has run, and asking does not start it. A failed cuInit is just as final, so only
    NOT_INITIALIZED means "still free to choose".
    """
    torch = sys.modules.get("torch")
    if torch is not None and getattr(getattr(torch, "cuda", None), "is_initialized", lambda: False)():
        return True
    lib = _loaded_libcuda()
    if lib is None:
        return False
    count = ctypes.c_int(0)
    return lib.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_ERROR_NOT_INITIALIZED


# --- reading a visibility setting ---------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One entry of a visibility setting, resolved against the inventory."""

    token: str  # what goes into CUDA_VISIBLE_DEVICES
    gpu: GPU  # the physical GPU (for a MIG device, its parent)
    mig_uuid: str | None = None


def _find_mig(inv: Inventory, token: str) -> GPU | None:
    return next((g for g in inv if any(m.uuid.lower() == token.lower() for m in g.mig_devices)), None)


def _resolve_token(inv: Inventory, token: str) -> Target:
    valid = _choices(inv)
    if re.fullmatch(r"\d+", token):
        index = int(token)
        if index >= len(inv):
            raise UsageError(f"there is no GPU {index}: this machine has {len(inv)} GPU(s). Valid choices: {valid}")
        return Target(str(index), inv[index])
    if token.upper().startswith("GPU-"):
        if not _GPU_UUID.match(token):
            raise UsageError(f"{token!r} is not a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx). "
                             f"Valid choices: {valid}")
        gpu = next((g for g in inv if g.uuid and g.uuid.lower() == token.lower()), None)
        if gpu is None:
            raise UsageError(f"no GPU has the UUID {token}. Valid choices: {valid}")
        return Target(gpu.uuid, gpu)
    if token.upper().startswith("MIG-"):
        if not _MIG_UUID.match(token):
            raise UsageError(f"{token!r} is not a MIG device UUID (MIG-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx). "
                             f"Valid choices: {valid}")
        gpu = _find_mig(inv, token)
        if gpu is None:
            raise UsageError(f"no MIG device has the UUID {token}. Valid choices: {valid}")
        return Target(token, gpu, mig_uuid=token)
    raise UsageError(f"cannot read {token!r} as a GPU: give nvidia-smi indexes (0,1), GPU UUIDs, a MIG device UUID, "
                     f"'none' or 'all'. Valid choices: {valid}")


def _choices(inv: Inventory) -> str:
    if not len(inv):
        return "none (no GPU found)"
    items = [f"{g.index} ({g.name or 'n/a'}, {g.uuid or 'uuid n/a'})" for g in inv]
    items += [m.uuid for g in inv for m in g.mig_devices]
    return ", ".join(items)


def resolve(selection: str | int | list | tuple, inv: Inventory) -> list[Target]:
    """'2,3', [2, 3], 'GPU-...,GPU-...', 'MIG-...', 'none', 'all' -> the GPUs it names, in cuda:N order."""
    if isinstance(selection, int) and not isinstance(selection, bool):
        tokens = [str(selection)]
    elif isinstance(selection, (list, tuple)):
        tokens = [str(t).strip() for t in selection]
    else:
        text = str(selection).strip()
        if text.lower() == "none":
            return []
        if text.lower() == "all":
            return [Target(str(g.index), g) for g in inv]
        tokens = [t.strip() for t in text.split(",")]
    if not tokens or any(not t for t in tokens):
        raise UsageError(f"empty GPU entry in {selection!r}: separate GPUs with commas, e.g. 2,3")
    targets = [_resolve_token(inv, t) for t in tokens]
    keys = [t.mig_uuid or t.gpu.index for t in targets]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise UsageError(f"GPU {dup} is named twice in {selection!r}: name each GPU once")
    migs = [t for t in targets if t.mig_uuid]
    if migs and len(targets) > 1:
        raise UsageError("CUDA lets a process see only one MIG device (and no other GPU beside it): "
                         f"choose one of {', '.join(t.mig_uuid for t in migs)}")
    return targets


def _current_tokens(value: str | None) -> list[str] | None:
    """CUDA's own reading of CUDA_VISIBLE_DEVICES: None means unset (all GPUs); parsing stops at a bad entry."""
    if value is None:
        return None
    tokens = []
    for raw in value.split(","):
        tok = raw.strip()
        if not tok or tok.startswith("-"):
            break
        tokens.append(tok)
    return tokens


@dataclass(frozen=True)
class Visibility:
    """This process's visible GPUs: cuda:N -> physical GPU, plus the settings behind it."""

    targets: tuple[Target, ...]
    visible_devices: str | None  # the CUDA_VISIBLE_DEVICES value (simulated: the value it would have)
    device_order: str | None
    simulated: bool
    cuda_started: bool
    note: str | None = None
    links: str | None = None  # for a choice made by --auto: the links between the chosen GPUs

    def alias(self, gpu_index: int) -> str | None:
        """'cuda:N' for a physical GPU index this process sees, else None."""
        return next((f"cuda:{n}" for n, t in enumerate(self.targets) if t.gpu.index == gpu_index), None)

    def lines(self) -> list[str]:
        out = []
        for n, t in enumerate(self.targets):
            g = t.gpu
            used = f"{format_size(g.memory_used, digits=1).split()[0]} / {format_size(g.memory_total, digits=0)} used"
            what = f"MIG {t.mig_uuid} on GPU {g.index}" if t.mig_uuid else f"GPU {g.index}"
            out.append(f"cuda:{n} -> {what} {g.name or 'n/a'} ({used})")
        if not self.targets:
            out.append("no GPU is visible to this kernel")
        return out

    def header(self) -> str:
        """The settings behind the mapping: CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER (simulated ones marked)."""
        env = "unset (all GPUs)" if self.visible_devices is None else repr(self.visible_devices)
        sim = "[simulated] " if self.simulated else ""
        return f"{sim}CUDA_VISIBLE_DEVICES={env}, CUDA_DEVICE_ORDER={self.device_order or 'unset (FASTEST_FIRST)'}"

    def __repr__(self) -> str:
        body = [self.header(), *("  " + line for line in self.lines())]
        if self.links:
            body.append(f"links: {self.links}")
        if self.note:
            body.append(self.note)
        return "\n".join(body)


def _order_note(order: str | None, targets) -> str | None:
    if len(targets) > 1 and order != "PCI_BUS_ID":
        return ("CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers GPUs fastest first, which may differ from the "
                "nvidia-smi order shown here. `%gpus <indexes>` sets PCI_BUS_ID.")
    return None


def targets_for(value: str | None, inv: Inventory) -> list[Target]:
    """The GPUs a CUDA_VISIBLE_DEVICES value gives a process, read as CUDA reads it (None: every GPU)."""
    tokens = _current_tokens(value)
    if tokens is None:
        return [Target(str(g.index), g) for g in inv if not g.mig_mode]
    targets: list[Target] = []
    for tok in tokens:
        try:
            targets.append(_resolve_token(inv, tok))
        except UsageError:
            break  # CUDA ignores the rest of the list after an entry it cannot use
    return targets


def current(inv: Inventory | None = None) -> Visibility:
    """The mapping in force now (for simulated GPUs, the simulated setting)."""
    inv = devices.read() if inv is None else inv
    sim = devices.simulated()
    value = sim.visible if sim is not None else os.environ.get(VISIBLE)
    order = "PCI_BUS_ID" if sim is not None else os.environ.get(ORDER)
    targets = targets_for(value, inv)
    started = False if sim is not None else cuda_driver_initialized()
    return Visibility(tuple(targets), value, order, sim is not None, started, _order_note(order, targets))


# --- choosing GPUs ------------------------------------------------------------------------------------

def auto_select(inv: Inventory, count: int, min_free: str | int | None = None,
                max_util: float | None = None, topology: Topology | None = None) -> list[Target]:
    """The `count` GPUs that meet the limits: with a topology, the set with the best links (all NVLink, then one
    PCIe switch, several switches, the host bridge, across CPU sockets), then the most free memory; without one
    (or where NVML cannot say), the least loaded (most free memory, then least utilised)."""
    if count < 1:
        raise UsageError(f"--auto needs a number of GPUs of at least 1, not {count}")
    floor = parse_size(min_free) if min_free is not None else 0
    fits, rejected = [], []
    for g in inv:
        why = []
        if g.mig_mode:
            why.append("MIG mode on (choose a MIG device by UUID)")
        if g.memory_free is None:
            why.append("free memory n/a")
        elif g.memory_free < floor:
            why.append(f"{format_size(g.memory_free)} free")
        if max_util is not None and (g.utilization is None or g.utilization > max_util):
            why.append(f"utilisation {'n/a' if g.utilization is None else f'{g.utilization}%'}")
        (rejected if why else fits).append((g, why))
    if len(fits) < count:
        limits = [f"at least {format_size(floor)} free" if min_free is not None else None,
                  f"at most {max_util}% utilisation" if max_util is not None else None]
        limits_text = " and ".join(x for x in limits if x) or "no limits"
        detail = "; ".join(f"GPU {g.index}: {', '.join(why)}" for g, why in rejected) or "no GPU found"
        raise UsageError(f"asked for {count} GPU(s) with {limits_text}, but only {len(fits)} qualify ({detail}). "
                         "Ask for fewer GPUs or loosen --min-free / --max-util.")
    fits.sort(key=lambda gw: (-(gw[0].memory_free or 0), gw[0].utilization or 0, gw[0].index))
    chosen = _best_connected([g for g, _ in fits], count, topology) or [g for g, _ in fits[:count]]
    return [Target(str(g.index), g) for g in chosen]


_EXHAUSTIVE = 20_000  # sets of GPUs compared one by one; beyond this, a greedy choice per starting GPU


def _best_connected(fits: list[GPU], count: int, topo: Topology | None) -> list[GPU] | None:
    """The set whose weakest link is best, then with the most free memory; None where the links are not known."""
    if count < 2 or topo is None or not topo.available or any(topo.gpu(g.index) is None for g in fits):
        return None

    def rank(a: GPU, b: GPU) -> int:
        return topo.link(a.index, b.index).rank

    def key(group) -> tuple:
        worst = max(rank(a, b) for a, b in combinations(group, 2))
        return (worst, -sum(g.memory_free or 0 for g in group), sum(g.utilization or 0 for g in group),
                sorted(g.index for g in group))

    if math.comb(len(fits), count) <= _EXHAUSTIVE:
        candidates = combinations(fits, count)
    else:
        candidates = []
        for seed in fits:
            group = [seed]
            while len(group) < count:
                rest = [g for g in fits if g.index not in {m.index for m in group}]
                group.append(min(rest, key=lambda g: (max(rank(g, m) for m in group), -(g.memory_free or 0),
                                                      g.utilization or 0, g.index)))
            candidates.append(group)
    best = {g.index for g in min(candidates, key=key)}
    return [g for g in fits if g.index in best]  # in the least-loaded order, as without a topology


def _selection(selection):
    """None, a string ('2,3', 'none', 'all', UUIDs), a GPU index, or a list/tuple of indexes and UUIDs."""
    if selection is None or isinstance(selection, str):
        return selection
    if isinstance(selection, (list, tuple)):
        return [_selection_item(item) for item in selection]
    return _selection_item(selection)


def _selection_item(item):
    if isinstance(item, str):
        return item
    return checks.integer(item, "a GPU index", 0)


def use(selection: str | int | list | tuple | None = None, *, auto: int | None = None,
        min_free: str | int | None = None, max_util: float | None = None) -> Visibility:
    """Make the given GPUs this process's cuda:0..N-1 (sets CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER=PCI_BUS_ID).

    Refused, with the environment unchanged, when the request cannot be read or when the CUDA driver has already
    started in this process and the request differs from the set in force.
    """
    selection = _selection(selection)
    auto = checks.optional_integer(auto, "auto (a number of GPUs)", 1, checks.MAX_GPUS)
    min_free = checks.optional_size(min_free, "min_free")
    max_util = None if max_util is None else checks.number(max_util, "max_util (a utilisation in %)", 0, 100)
    inv = devices.read()
    if not len(inv) and inv.message:
        raise UsageError(inv.message)
    if (selection is None) == (auto is None):
        raise UsageError("give either GPUs to use (e.g. '2,3', 'none') or auto=N, not both or neither")
    topo = devices.topology() if auto is not None and auto > 1 else None
    targets = auto_select(inv, auto, min_free, max_util, topo) if auto is not None else resolve(selection, inv)
    links = topo.describe([t.gpu.index for t in targets]) if topo is not None and topo.available else None
    value = ",".join(t.token for t in targets)
    sim = devices.simulated()
    if sim is not None:
        sim.visible = value
        devices.published.changed()
        return replace(current(inv), links=links)
    now = current(inv)
    if now.cuda_started:
        same = [(t.gpu.index, t.mig_uuid) for t in targets] == [(t.gpu.index, t.mig_uuid) for t in now.targets]
        if same:
            return now
        shown = ", ".join(now.lines())
        raise UsageError(
            "CUDA is already running in this kernel, so a new GPU choice would have no effect. "
            f"This kernel sees: {shown} (CUDA_VISIBLE_DEVICES={now.visible_devices!r}). "
            f"Restart the kernel and run `%gpus {value or 'none'}` (or nbgpu.use) as the first cell, "
            "before torch or any other library touches CUDA."
        )
    os.environ[ORDER] = "PCI_BUS_ID"
    os.environ[VISIBLE] = value
    devices.published.changed()
    return replace(current(inv), links=links)


def _published_state() -> dict:
    """What this kernel tells the GPU panel (nbgpu.devices.published): its GPUs and simulated memory."""
    sim = devices.simulated()
    if sim is not None:
        return {"visible_devices": sim.visible, "device_order": "PCI_BUS_ID", "simulate": sim.spec_text,
                **sim.state()}
    return {"visible_devices": os.environ.get(VISIBLE), "device_order": os.environ.get(ORDER), "simulate": None}


devices.published.set_provider(_published_state)

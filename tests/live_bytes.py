"""Live tensor bytes on the CPU, without torch.cuda: every storage an operation creates is followed until it is
freed, so the peak of what a block of code holds (beyond what existed before it) is known exactly."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """`with LiveBytes(existing, follow) as live: ...`; then `live.peak` is the most bytes held at once by storages
    created inside the block and those of `follow` until they are freed (storages of `existing` are not counted),
    `live.now` what is still held. Give `follow` tensors whose only other reference is the code under test."""

    def __init__(self, existing=(), follow=()):
        super().__init__()
        self.old = {t.untyped_storage().data_ptr() for t in existing}
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {
            t.untyped_storage().data_ptr(): (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
            for t in follow}
        self.peak = sum(n for _, n in self.refs.values())

    @property
    def now(self) -> int:
        return sum(n for ref, n in self.refs.values() if not ref.expired())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.refs and key not in self.old and storage.nbytes():
                    self.refs[key] = (StorageWeakRef(storage), storage.nbytes())
        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
        return out

"""Host-to-device copies of a step's inputs that never make the host wait for the device.

A copy from pageable memory (a numpy array) is not asynchronous even with ``non_blocking=True``: the
driver stages it through its own pinned buffer and may wait for the stream to reach the copy. With a
step planned ahead, the stream is still busy with the previous step when the next one's inputs are
copied, so the host would sit until that step ends and only then launch the rest of the next one,
leaving the device idle for the launch. ``HostStaging`` packs the arrays of one call into a pinned
buffer of its own and issues a single copy, which returns at once.

Invariant: a slot's pinned memory is rewritten only after the copy that read it last has run (an
event recorded behind each copy; with at most two steps in flight and several slots, the wait is
normally already over).
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16  # bytes; every array starts at a multiple (int64 views need 8)


class HostStaging:
    def __init__(self, device: torch.device, num_slots: int = 8) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self._slots: list[torch.Tensor | None] = [None] * num_slots  # pinned uint8 buffers
        self._events: list[torch.cuda.Event | None] = [None] * num_slots
        self._next = 0

    def to_device(self, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The arrays on the device, in one asynchronous copy (on CPU: the arrays themselves, shared)."""
        if not self.enabled:
            return tuple(torch.from_numpy(a) for a in arrays)
        arrays = tuple(np.ascontiguousarray(a) for a in arrays)
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        k = self._next
        self._next = (k + 1) % len(self._slots)
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copy that last read this slot has run
        slot = self._slots[k]
        if slot is None or slot.numel() < total:
            slot = self._slots[k] = torch.empty(max(total, 4096) * 2, dtype=torch.uint8, pin_memory=True)
        host = slot.numpy()
        for a, off in zip(arrays, offsets, strict=True):
            host[off : off + a.nbytes] = a.view(np.uint8).reshape(-1)
        dev = torch.empty(total, dtype=torch.uint8, device=self.device)
        dev.copy_(slot[:total], non_blocking=True)
        event = self._events[k] = self._events[k] or torch.cuda.Event()
        event.record()
        return tuple(
            dev[off : off + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape)
            for a, off in zip(arrays, offsets, strict=True)
        )


_TORCH_DTYPES = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
}

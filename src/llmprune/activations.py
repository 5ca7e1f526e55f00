"""Where the calibration hidden states live between blocks: on the compute device, or offloaded.

An ``ActivationStore`` behaves as the list of per-batch hidden states that the runner reads and
replaces; offloaded, each batch sits in pinned CPU memory and travels to the device when read.
Copies are queued on the device's stream without waiting on the host, so a batch written back
after a block is read again, in order, by the next block.
"""

from __future__ import annotations

from typing import Iterator

import torch


class ActivationStore:
    def __init__(self, device: torch.device, offload: bool = False) -> None:
        self.device = device
        self.offload = bool(offload) and device.type != "cpu"
        self._items: list[torch.Tensor] = []

    def append(self, h: torch.Tensor) -> None:
        self._items.append(self._keep(h))

    def _keep(self, h: torch.Tensor) -> torch.Tensor:
        if not self.offload:
            return h
        buf = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
        buf.copy_(h, non_blocking=True)
        return buf

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        h = self._items[i]
        return h.to(self.device, non_blocking=True) if self.offload else h

    def __setitem__(self, i: int, h: torch.Tensor) -> None:
        old = self._items[i]
        if old.shape == h.shape and old.dtype == h.dtype and (self.offload or old.device == h.device):
            # reuse the buffer (pinned, or on the device): the store stays at one copy of the activations, where
            # rebinding left the heap holding about 1.5 copies on a CPU (freed batches fragment it; measured in
            # benchmarks/cpu_memory.py)
            old.copy_(h, non_blocking=self.offload)
        else:
            self._items[i] = self._keep(h)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]


"""Keep the base weights a generation's LoRAs change, so that they come back bit for bit.

Restoring by subtracting the difference again leaves rounding errors; the only exact ways
are to keep the original values. Two strategies, chosen by where the weights live:

* **Swap** (weights resident in host memory: a CPU pipeline). The changed weight is written
  into a separate buffer and the parameter is pointed at it (``param.data = buffer``); the
  original tensor is never written, and restoring points the parameter back: no copy out
  and no copy back, a pass over the touched weights saved each way. Measured on the
  SD1.5-sized bench model (5 LoRAs, 465 MiB of touched weights), that is the ~50 ms each of
  the save and the restore.
* **Copy** (weights on a GPU, or offloaded between uses, where modules move between devices
  and a swapped tensor would be left behind). The weight is copied into a host-memory buffer
  (pinned, so the copies run at full bus speed) and changed in place; restoring copies it
  back. Applying LoRAs costs no GPU memory beyond one layer's difference at a time, as in
  A1111 and ComfyUI, which keep their backups in host memory too.

With swap, the buffers still hold the last set's fused weights after the restore: the next
request with the same set at the same weights (a user generating again, the most common
request of all) points the parameters at them again without computing anything
(:meth:`BackupPool.reinstall`).

Either way the buffers are kept and reused by the next request that touches the same weight,
instead of allocating and faulting in hundreds of megabytes per request; they are released
when the model is unloaded (or by ``clear``). Their total is bounded by the weights LoRAs
have ever touched in this model (typically the attention and feed-forward layers).

Used with the pipeline lock held.
"""

from __future__ import annotations

from collections.abc import Hashable, Set

import torch


class BackupPool:
    def __init__(self, *, swap: bool) -> None:
        self.swap = swap
        """Swap strategy (see the module docstring); else copy."""
        self._buffers: dict[int, torch.Tensor] = {}
        """Keyed by the parameter's ``id``: parameters live as long as the loaded model,
        which owns this pool."""
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        """(parameter, what restores it): the original tensor (swap) or its copy (copy)."""
        self._kept: tuple[Hashable, list[torch.Tensor]] | None = None
        """Swap: what the buffers hold (a set's signature) and the parameters they belong to."""

    def reinstall(self, signature: Hashable, present: Set[int]) -> bool:
        """Swap: if the buffers hold the fused weights of ``signature`` (the last fused set),
        point the parameters at them again and return True; else False (fuse as usual).
        ``present`` holds the ``id`` of every parameter the set would change now: a module
        replaced since (another model part, a library swapping layers) means fuse again,
        never a LoRA silently applied to a parameter the model no longer uses."""
        if not self.swap or self._kept is None or self._kept[0] != signature:
            return False
        if any(id(weight) not in present for weight in self._kept[1]):
            return False
        for weight in self._kept[1]:
            original = weight.data
            weight.data = self._buffers[id(weight)]
            self._pending.append((weight, original))
        return True

    def keep(self, signature: Hashable) -> None:
        """Swap: the weights changed since the last restore are exactly ``signature``'s
        fused set (call after every weight was written, before the restore)."""
        if self.swap:
            self._kept = (signature, [weight for weight, _original in self._pending])

    def writable(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(current, target)`` for a weight about to change: its value now, and the tensor
        to write the whole changed value into, which the model uses until :meth:`restore`.

        Copy strategy: both are the weight itself (saved first). Swap strategy: ``target`` is a
        reused buffer that has already replaced the weight's data; ``current`` is the
        original, which must not be written.
        """
        self._kept = None  # a buffer is about to be written
        buffer = self._buffer_for(weight)
        if self.swap:
            original = weight.data
            weight.data = buffer
            self._pending.append((weight, original))
            return original, buffer
        on_gpu = weight.device.type == "cuda"
        buffer.copy_(weight.detach(), non_blocking=on_gpu)
        self._pending.append((weight, buffer))
        if on_gpu:
            # The weight is changed right after: the copy out must have finished.
            torch.cuda.current_stream(weight.device).synchronize()
        return weight.detach(), weight.detach()

    def _buffer_for(self, weight: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(id(weight))
        if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
            if self.swap:
                buffer = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            else:
                pin = weight.device.type == "cuda"
                buffer = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=pin)
            self._buffers[id(weight)] = buffer
        return buffer

    @property
    def saved(self) -> int:
        return len(self._pending)

    def restore(self) -> None:
        """Put every changed weight back, bit for bit, and forget the list (not the buffers)."""
        devices = set()
        with torch.no_grad():
            for weight, saved in reversed(self._pending):
                if self.swap:
                    weight.data = saved
                    continue
                weight.copy_(saved, non_blocking=weight.device.type == "cuda")
                if weight.device.type == "cuda":
                    devices.add(weight.device)
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        self._pending.clear()

    def clear(self) -> None:
        self._kept = None
        self._pending.clear()
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

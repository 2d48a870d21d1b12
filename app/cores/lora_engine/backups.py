"""Exact copies of the weights a generation's LoRAs change, kept where they cost least.

Restoring by copying the saved tensor back is the only bit-exact way (subtracting the
difference again leaves rounding errors), so every touched weight is copied before fusion.
Two costs of doing that naively are avoided:

* On a GPU the copies live in host memory (pinned, so the copies run at full bus speed and
  asynchronously), as A1111 and ComfyUI keep theirs: applying LoRAs costs no GPU memory
  beyond one layer's float32 difference at a time.
* The buffers are kept and reused by the next request that touches the same weight, instead
  of allocating and faulting in hundreds of megabytes per request; they are released when the
  model is unloaded (or by ``clear``). Their total is bounded by the weights LoRAs have ever
  touched in this model (typically the attention and feed-forward layers).

Used with the pipeline lock held.
"""

from __future__ import annotations

import torch


class BackupPool:
    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}
        """Keyed by the weight tensor's ``id``: weights live as long as the loaded model,
        which owns this pool."""
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def save(self, weight: torch.Tensor) -> None:
        """Copy ``weight`` into its buffer before it is changed."""
        buffer = self._buffers.get(id(weight))
        if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
            pin = weight.device.type == "cuda"
            buffer = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=pin)
            self._buffers[id(weight)] = buffer
        buffer.copy_(weight.detach(), non_blocking=weight.device.type == "cuda")
        self._pending.append((weight, buffer))
        if weight.device.type == "cuda":
            # The weight is changed right after: the copy out must have finished.
            torch.cuda.current_stream(weight.device).synchronize()

    @property
    def saved(self) -> int:
        return len(self._pending)

    def restore(self) -> None:
        """Put every saved weight back, bit for bit, and forget the list (not the buffers)."""
        devices = set()
        with torch.no_grad():
            for weight, buffer in reversed(self._pending):
                weight.copy_(buffer, non_blocking=weight.device.type == "cuda")
                if weight.device.type == "cuda":
                    devices.add(weight.device)
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        self._pending.clear()

    def clear(self) -> None:
        self._pending.clear()
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

"""Prepared LoRAs kept for the loaded model, least recently used evicted first."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from app.cores.lora_engine.preparation import PreparedLoRA

logger = logging.getLogger(__name__)


class LoRACache:
    """Bounded by count and bytes (``LOCALAI_LORA_CACHE_MAX_COUNT``/``_MAX_MB``); a count of
    0 disables it, and with it the engine's fusion for the formats diffusers loads itself
    (Plan 006's path). ``discard`` may be called from any thread (a LoRA being deleted); a
    generation that already holds the tensors keeps them until it ends."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PreparedLoRA] = OrderedDict()
        self._guard = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_count > 0

    def get(self, key: str) -> PreparedLoRA | None:
        with self._guard:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def contains(self, key: str) -> bool:
        """Membership without touching the recency order."""
        with self._guard:
            return key in self._entries

    def put(self, entry: PreparedLoRA, keep: set[str]) -> None:
        """Add ``entry``; evict least recently used entries not in ``keep`` to fit."""
        if not self.enabled:
            return
        with self._guard:
            self._entries[entry.key] = entry
            self._entries.move_to_end(entry.key)
            for key in list(self._entries):
                if len(self._entries) <= self.max_count and self._nbytes() <= self.max_bytes:
                    break
                if key not in keep and key != entry.key:
                    logger.info("Evicting cached LoRA %s", key)
                    del self._entries[key]

    def discard(self, key: str) -> None:
        with self._guard:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._guard:
            self._entries.clear()

    def keys(self) -> list[str]:
        with self._guard:
            return list(self._entries)

    def _nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    @property
    def nbytes(self) -> int:
        with self._guard:
            return self._nbytes()

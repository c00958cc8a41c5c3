"""Loaded models kept in memory, keyed by model id, reloaded only when their gallery changes;
and the model rows identify looked up, kept for a second."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from facegrad.recognition.inference import LoadedModel

T = TypeVar("T")


class ModelCache:
    def __init__(self, capacity: int = 4, device: str = "cpu"):
        self.capacity, self.device = capacity, device
        self._items: OrderedDict[str, tuple[LoadedModel, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str, path: str, gallery_version: int) -> LoadedModel:
        with self._lock:
            hit = self._items.get(model_id)
            if hit is not None:
                self._items.move_to_end(model_id)
                loaded, version = hit
                if version != gallery_version:
                    loaded.refresh_gallery()
                    self._items[model_id] = (loaded, gallery_version)
                return loaded
        loaded = LoadedModel(Path(path).parent, self.device)
        with self._lock:
            self._items[model_id] = (loaded, gallery_version)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return loaded

    def drop(self, model_id: str) -> None:
        with self._lock:
            self._items.pop(model_id, None)


class RecentRows:
    """Model rows identify looked up, reused for ``ttl`` seconds.

    Looking a model up (and the newest one, when no id is given) was a database round trip per
    call, about a third of an identify call's decode-thread time under load. Enrollment in this
    process clears the cache, so its own identify calls see a change at once; another API
    process sees it within ``ttl``.
    """

    def __init__(self, ttl: float = 1.0):
        self.ttl = ttl
        self._items: dict[str | None, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def get(self, key: str | None, load: Callable[[], T]) -> T:
        now = time.monotonic()
        with self._lock:
            hit = self._items.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        row = load()  # raises (404) without caching anything
        with self._lock:
            if len(self._items) > 256:
                self._items.clear()
            self._items[key] = (now + self.ttl, row)
        return row

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

"""Loaded models kept in memory, keyed by model id, reloaded only when their gallery changes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from facegrad.inference import LoadedModel


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

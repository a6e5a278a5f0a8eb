"""Per-process LRU cache of loaded full models (and plugged-in copies for /generate).

Loading a full model dominates evaluation and generation time, so each process keeps the last one or
two. One lock per key makes concurrent requests for the same model wait for a single load.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: OrderedDict[Any, V] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Any, threading.Lock] = {}

    def get_or_load(self, key: Any, load: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            value = load()  # outside the global lock: other keys stay usable while this loads
            with self._lock:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
                self._key_locks.pop(key, None)
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_full_models: LRUCache[tuple[Any, Any]] | None = None
_plugged_models: LRUCache[Any] | None = None
_init_lock = threading.Lock()


def full_models(capacity: int) -> LRUCache[tuple[Any, Any]]:
    """(model, tokenizer) by (path, device)."""
    global _full_models
    with _init_lock:
        if _full_models is None:
            _full_models = LRUCache(capacity)
        return _full_models


def plugged_models(capacity: int = 1) -> LRUCache[Any]:
    """M' = [A', E] by adapter id, for /generate."""
    global _plugged_models
    with _init_lock:
        if _plugged_models is None:
            _plugged_models = LRUCache(capacity)
        return _plugged_models


def load_full_model(path: str, device: str, capacity: int = 1) -> tuple[Any, Any]:
    from model_owner_server.scaleot.model_io import load_causal_lm

    return full_models(capacity).get_or_load((path, device), lambda: load_causal_lm(path, device=device))

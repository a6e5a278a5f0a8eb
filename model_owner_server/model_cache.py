"""Per-process caches: loaded full models, the resident plugged copies generation runs on, and adapter tensors.

Loading a full model dominates evaluation and generation time, so each process keeps the last one or two
(`full_models`); one lock per key makes concurrent requests for the same model wait for a single load.

Generation never copies M per adapter. `PluggedPool` keeps at most `SCALEOT_PLUGGED_COPIES` resident plugged
copies, each sharing every tensor with M except the adapter layers' parameters (plugin.layer_copy); serving
adapter X leases a copy that already holds X, or a free one into which X's adapter layers are written
(plugin.write_adapter: whole layers copied in, LoRA merged from M's own weights). Two adapters used in turn
therefore cost one swap of the adapter layers each time, and memory is M + copies x adapter layers, whatever
the number of adapters. The small per-adapter tensors are kept in a byte-bounded LRU (`adapter_tensors`).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """At most `capacity` values; with `max_bytes` and `size_of`, also at most that many bytes (a value larger
    than the whole budget is returned but not kept)."""

    def __init__(self, capacity: int, max_bytes: int | None = None, size_of: Callable[[V], int] | None = None):
        self.capacity = max(1, capacity)
        self.max_bytes, self._size_of = max_bytes, size_of
        self._items: OrderedDict[Any, V] = OrderedDict()
        self._sizes: dict[Any, int] = {}
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
            try:
                value = load()  # outside the global lock: other keys stay usable while this loads
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
            with self._lock:
                size = self._size_of(value) if self._size_of is not None else 0
                if self.max_bytes is not None and size > self.max_bytes:
                    return value
                self._items[key], self._sizes[key] = value, size
                self._items.move_to_end(key)
                while len(self._items) > self.capacity or (
                    self.max_bytes is not None and sum(self._sizes.values()) > self.max_bytes
                ):
                    old, _ = self._items.popitem(last=False)
                    self._sizes.pop(old, None)
            return value

    def __contains__(self, key: Any) -> bool:
        with self._lock:
            return key in self._items

    def values(self) -> list[V]:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()


@dataclass(frozen=True)
class Plug:
    """What it takes to put one adapter into a resident copy of its full model `base` (M, never modified)."""

    adapter_id: str
    base: Any
    layers: tuple[int, ...]
    tensors: Callable[[], Any]  # the adapter's validated tensors (whole layers or PEFT LoRA)
    lora: Any = None  # the emulator's issued LoraSpec, for a LoRA adapter


@dataclass(eq=False)
class _Copy:
    base: Any
    layers: tuple[int, ...]
    model: Any = None  # plugin.layer_copy(base, layers); None until first filled
    adapter_id: str | None = None  # the adapter whose layers it holds; None while being (re)filled
    users: int = 0
    last_used: int = 0


@dataclass
class PoolStats:
    copies_made: int = 0  # layer copies built (adapter layers' memory each, never a full M)
    swaps: int = 0  # adapter layers written into a copy
    served: int = 0  # leases
    history: list[str] = field(default_factory=list)  # adapter ids swapped in, oldest first (last 64)


class PluggedPool:
    """At most `copies` resident plugged models. A lease of adapter X joins a copy that holds X, else takes a
    free copy (a new one while fewer than `copies` exist, else the least recently used idle one) and writes X's
    adapter layers into it; when every copy is busy with other adapters it waits for one (in arrival order)."""

    def __init__(self, copies: int, alive: Callable[[], list[Any]] | None = None):
        self.copies = max(1, copies)
        self._alive = alive  # the full models still cached: copies of evicted ones are dropped when idle
        self._slots: list[_Copy] = []
        self._cond = threading.Condition()
        self._line: deque[int] = deque()  # tickets of the leases waiting for a copy, in arrival order
        self._clock = itertools.count(1)
        self.stats = PoolStats()

    @contextmanager
    def lease(self, plug: Plug) -> Iterator[Any]:
        """The model M' = [A', E] of `plug`'s adapter, exclusively or shared with leases of the same adapter,
        for the duration of the `with` block (a generation); never modify it."""
        from model_owner_server.scaleot.plugin import layer_copy, write_adapter

        slot = self._acquire(plug)
        try:
            if slot.adapter_id is None:  # ours alone: fill it (the lock is not held: this takes a moment)
                tensors = plug.tensors()
                if slot.model is None or slot.base is not plug.base or slot.layers != plug.layers:
                    slot.model = None  # free the old layers before making the new ones
                    slot.model = layer_copy(plug.base, list(plug.layers))
                    slot.base, slot.layers = plug.base, plug.layers
                    self.stats.copies_made += 1
                write_adapter(slot.model, plug.base, tensors, list(plug.layers), plug.lora)
                with self._cond:
                    slot.adapter_id = plug.adapter_id
                    self.stats.swaps += 1
                    self.stats.history = [*self.stats.history[-63:], plug.adapter_id]
                    self._cond.notify_all()
            yield slot.model
        finally:
            with self._cond:
                slot.users -= 1
                slot.last_used = next(self._clock)
                self._cond.notify_all()

    def _acquire(self, plug: Plug) -> _Copy:
        """Leases are granted in arrival order: a lease waiting for a copy is not overtaken by later ones,
        even by leases of an adapter a busy copy holds, so one busy adapter cannot starve the others."""
        with self._cond:
            self._drop_dead_copies(plug.base)
            ticket = next(self._clock)
            self._line.append(ticket)
            try:
                while True:
                    if self._line[0] == ticket and (slot := self._take(plug)) is not None:
                        self.stats.served += 1
                        return slot
                    self._cond.wait()
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()  # the next in line may go

    def _take(self, plug: Plug) -> _Copy | None:
        for s in self._slots:
            if s.adapter_id == plug.adapter_id and s.base is plug.base and s.layers == plug.layers:
                s.users += 1
                return s
        slot: _Copy | None = None
        if len(self._slots) < self.copies:
            slot = _Copy(plug.base, plug.layers)
            self._slots.append(slot)
        else:
            idle = [s for s in self._slots if s.users == 0]
            slot = min(idle, key=lambda s: s.last_used) if idle else None
        if slot is not None:
            slot.users, slot.adapter_id = 1, None  # exclusive until filled with this adapter
        return slot

    def _drop_dead_copies(self, keep: Any) -> None:
        """Idle copies of a full model the model cache has evicted would keep its tensors alive: drop them."""
        if self._alive is None:
            return
        alive = {id(m) for m in self._alive()} | {id(keep)}
        self._slots = [s for s in self._slots if s.users > 0 or id(s.base) in alive]

    def resident(self, adapter_id: str) -> Any | None:
        """The resident model that holds `adapter_id` now, if any (for in-process comparisons and benchmarks)."""
        with self._cond:
            return next((s.model for s in self._slots if s.adapter_id == adapter_id), None)

    def models(self) -> list[Any]:
        """Every resident plugged model (each shares M's tensors but for the adapter layers)."""
        with self._cond:
            return [s.model for s in self._slots if s.model is not None]

    def clear(self) -> None:
        with self._cond:
            self._slots = [s for s in self._slots if s.users > 0]


_full_models: LRUCache[tuple[Any, Any]] | None = None
_plugged_pool: PluggedPool | None = None
_adapter_tensors: LRUCache[Any] | None = None
_init_lock = threading.Lock()


def full_models(capacity: int) -> LRUCache[tuple[Any, Any]]:
    """(model, tokenizer) by (path, device, compute dtype)."""
    global _full_models
    with _init_lock:
        if _full_models is None:
            _full_models = LRUCache(capacity)
        return _full_models


def _cached_full_models() -> list[Any]:
    return [model for model, _ in (_full_models.values() if _full_models is not None else [])]


def plugged_pool(copies: int = 1) -> PluggedPool:
    """The process's resident plugged models (its size is fixed by the first call: SCALEOT_PLUGGED_COPIES)."""
    global _plugged_pool
    with _init_lock:
        if _plugged_pool is None:
            _plugged_pool = PluggedPool(copies, alive=_cached_full_models)
        return _plugged_pool


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def adapter_tensors(max_mb: int = 512) -> LRUCache[Any]:
    """Validated adapter tensors by (adapter id, sha256), within `max_mb` (SCALEOT_ADAPTER_CACHE_MB)."""
    global _adapter_tensors
    with _init_lock:
        if _adapter_tensors is None:
            _adapter_tensors = LRUCache(1024, max_bytes=max_mb * 1024 * 1024, size_of=_tensor_bytes)
        return _adapter_tensors


def full_model_key(path: str, device: str, dtype: Any = None) -> tuple[str, str, str]:
    """The cache key of M at `path` on `device` in `dtype` (None: float32, load_causal_lm's default)."""
    return (str(path), str(device), str(dtype or "torch.float32"))


def is_loaded(path: str, device: str, dtype: Any = None) -> bool:
    """Whether M is in this process's cache already (a job that reuses it does not load it again)."""
    return _full_models is not None and full_model_key(path, device, dtype) in _full_models


def load_full_model(path: str, device: str, capacity: int = 1, dtype: Any = None) -> tuple[Any, Any]:
    """M and its tokenizer in `dtype` (the model's registered compute dtype; None: float32), loaded once per
    (path, device, dtype) and process."""
    from model_owner_server.scaleot.model_io import load_causal_lm

    return full_models(capacity).get_or_load(
        full_model_key(path, device, dtype), lambda: load_causal_lm(path, device=device, dtype=dtype)
    )

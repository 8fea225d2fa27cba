"""One lazy cache of loaded models per process, passed explicitly (no module-level state)."""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ModelCache:
    """Loads each model once and hands the same object to every caller; counts loads for benchmarks."""

    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}
        self._lock = threading.RLock()
        self.loads: Counter[Hashable] = Counter()

    def get(self, key: Hashable, loader: Callable[[], T]) -> T:
        """The cached object for ``key``, loading it with ``loader`` on first use."""
        with self._lock:
            if key not in self._items:
                logger.debug("loading %s", key)
                self._items[key] = loader()
                self.loads[key] += 1
            return self._items[key]

    def drop(self, key: Hashable) -> None:
        """Forget one cached object (e.g. to free GPU memory)."""
        with self._lock:
            self._items.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


class Recent:
    """A thread-safe LRU of the last ``capacity`` values (recent results worth keeping, not models)."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        """The value kept for ``key`` (now the most recent), or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: Hashable, value: T) -> T:
        """Keep ``value`` for ``key``, dropping the least recent beyond the capacity; returns ``value``."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return value

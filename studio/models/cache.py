"""One lazy cache of loaded models per process, passed explicitly (no module-level state)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
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

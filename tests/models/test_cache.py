"""The model cache loads each key once and hands out the same object."""

from __future__ import annotations

from studio.models.cache import ModelCache


def test_each_key_loads_once() -> None:
    cache = ModelCache()
    made: list[str] = []

    def loader(name: str) -> object:
        made.append(name)
        return object()

    first = cache.get(("pipe", "a"), lambda: loader("a"))
    assert cache.get(("pipe", "a"), lambda: loader("a")) is first
    other = cache.get(("pipe", "b"), lambda: loader("b"))
    assert other is not first and made == ["a", "b"]
    assert cache.loads[("pipe", "a")] == 1 and ("pipe", "b") in cache
    cache.drop(("pipe", "a"))
    assert cache.get(("pipe", "a"), lambda: loader("a")) is not first
    assert cache.loads[("pipe", "a")] == 2

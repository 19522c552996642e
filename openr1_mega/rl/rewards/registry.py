"""Reward registry: reward families register a factory by name; recipes pick them by name.

A factory takes the family's options as keyword arguments and returns the reward callable
`fn(completions: list[str], **columns) -> list[float | None]`. `get_reward(name, **params)`
checks the name and the options against the factory's signature, so a typo in a recipe fails
at start-up with the valid choices listed, not in the middle of a run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class RewardFn(Protocol):
    """The reward signature: one value per completion, None meaning "cannot verify, skip"."""

    def __call__(self, completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        ...


_FACTORIES: dict[str, Callable[..., RewardFn]] = {}


def register(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator: register a reward factory under `name` (must be unique)."""

    def decorate(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _FACTORIES:
            raise ValueError(f"reward {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorate


def reward_names() -> list[str]:
    """All registered reward names, sorted."""
    return sorted(_FACTORIES)


def reward_params(name: str) -> dict[str, Any]:
    """The options of reward `name` with their defaults."""
    factory = _factory(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()}


@dataclass
class Reward:
    """A configured reward: the callable plus its name and options.

    Calling it runs the reward. `take_metrics()` returns and resets the family's own
    counters since the last call (e.g. accuracy timeouts, code sandbox outcomes).
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    fn: RewardFn | None = None

    def __call__(self, completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        return self.fn(completions, **columns)

    def take_metrics(self) -> dict[str, float]:
        take = getattr(self.fn, "take_metrics", None)
        return take() if take is not None else {}


def get_reward(name: str, **params: Any) -> Reward:
    """Build reward `name` with `params` bound (e.g. `get_reward("cosine", max_len=1000)`).

    Raises:
        KeyError: `name` is not registered (the message lists the registered names).
        TypeError: a param is not an option of this reward (the message lists its options).
    """
    factory = _factory(name)
    valid = inspect.signature(factory).parameters
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(
            f"reward {name!r} has no option(s) {unknown}; its options are {sorted(valid)}"
        )
    return Reward(name=name, params=dict(params), fn=factory(**params))


def _factory(name: str) -> Callable[..., RewardFn]:
    if name not in _FACTORIES:
        raise KeyError(f"unknown reward {name!r}; registered rewards are {reward_names()}")
    return _FACTORIES[name]

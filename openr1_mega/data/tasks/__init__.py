"""Built-in verifiable tasks: generated with a seed, split into train and held-out test."""

from openr1_mega.data.tasks.arithmetic import arithmetic_rows

TASKS = {"arithmetic": arithmetic_rows}


def task_rows(name: str, split: str, n: int, seed: int = 0, **params) -> list[dict]:
    """`n` rows of built-in task `name` from `split` ("train" or "test")."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    return TASKS[name](split=split, n=n, seed=seed, **params)

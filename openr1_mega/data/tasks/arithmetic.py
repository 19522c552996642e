"""Multi-digit addition with a worked, column-by-column reasoning trace.

Each row has the fields of the benchmark files in data/ (`id`, `problem`, `answer`) plus `solution`:
a trace in the R1 format, `<think>` digit sums with carries `</think><answer>` sum
`</answer>`, written by a programmatic solver. The SFT cold start learns the format
and the procedure from these traces; GRPO then sharpens it with the accuracy reward.

The held-out split is disjoint by construction: a pair (a, b) belongs to "test" when a
hash of it falls in the test bucket, so no held-out problem is ever trained on.
"""

from __future__ import annotations

import hashlib
import random

SPLITS = ("train", "test")


def solve_addition(a: int, b: int) -> str:
    """The reasoning trace and answer for a + b, column by column, least digit first."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(digits_a), len(digits_b))):
        x = int(digits_a[i]) if i < len(digits_a) else 0
        y = int(digits_b[i]) if i < len(digits_b) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    if carry:
        steps.append(f"carry {carry}")
    return f"<think>{' '.join(steps)}</think><answer>{a + b}</answer>"


def _split_of(a: int, b: int, test_fraction: float) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"{a}+{b}".encode()).digest()[:4], "little")
    return "test" if bucket / 2**32 < test_fraction else "train"


def arithmetic_rows(split: str, n: int, seed: int = 0, digits: int = 2,
                    test_fraction: float = 0.2) -> list[dict]:
    """`n` distinct addition problems with up to `digits` digits per operand from `split`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    high = 10**digits - 1
    available = sum(_split_of(a, b, test_fraction) == split
                    for a in range(high + 1) for b in range(high + 1))
    if n > available:
        raise ValueError(f"n={n} exceeds the {available} distinct {split} problems "
                         f"with digits={digits}")
    rng = random.Random(f"{seed}:{split}")
    rows, seen = [], set()
    while len(rows) < n:
        a, b = rng.randint(0, high), rng.randint(0, high)
        if (a, b) in seen or _split_of(a, b, test_fraction) != split:
            continue
        seen.add((a, b))
        rows.append({"id": f"add-{split}-{a}-{b}", "problem": f"{a}+{b}=?",
                     "answer": str(a + b), "solution": solve_addition(a, b),
                     "source": f"arithmetic digits={digits}"})
    return rows

"""TaskPool: order, errors, hard time limit on code no signal can stop, crashes, no leaks."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import psutil
import pytest

from openr1_mega.rl.rewards.pool import TaskPool


def square_or_fail(x: int) -> int:
    """Task used by the tests (module level: workers import it by name)."""
    if x < 0:
        raise ValueError(f"negative {x}")
    return x * x


def stuck_or_die(mode: str, seconds: float = 60.0) -> str:
    """"stuck": sleep with SIGALRM blocked, so no in-process alarm could stop it;
    "die": the worker exits mid-task, like an OOM kill; else return at once."""
    if mode == "stuck":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(seconds)
    if mode == "die":
        os._exit(3)
    return mode


@pytest.fixture
def pool():
    pools = []

    def make(fn, workers):
        pools.append(TaskPool(fn, workers))
        return pools[-1]

    yield make
    for p in pools:
        p.close()


def test_results_in_order_and_errors_per_task(pool):
    squares = pool(square_or_fail, 2)
    outcomes = squares.map([(i,) for i in range(-2, 50)], timeout=10.0)
    assert [o.status for o in outcomes[:2]] == ["error", "error"]
    assert outcomes[0].error == "ValueError: negative -2"
    assert [o.value for o in outcomes[2:]] == [i * i for i in range(50)]
    assert squares.replaced == 0


def test_large_tasks_are_not_blocked_by_the_pipe(pool):
    squares = pool(square_or_fail, 1)
    big = 10 ** 30_000  # about 12 kB pickled; several are queued behind each other
    outcomes = squares.map([(big,)] * 4 + [(3,)], timeout=10.0)
    assert [o.value for o in outcomes] == [big * big] * 4 + [9]


def test_hard_time_limit_kills_and_replaces_the_worker(pool):
    stuck = pool(stuck_or_die, 2)
    stuck.map([("warm",)] * 2, timeout=30.0)
    before = set(stuck.pids())
    start = time.monotonic()
    outcomes = stuck.map([("stuck",), ("a",), ("stuck",), ("b",), ("c",)], timeout=1.0)
    elapsed = time.monotonic() - start
    assert [o.status for o in outcomes] == ["timeout", "ok", "timeout", "ok", "ok"]
    assert [o.value for o in outcomes if o.status == "ok"] == ["a", "b", "c"]
    assert elapsed < 10.0  # not the 60 s sleep
    assert stuck.replaced == 2
    assert not any(psutil.pid_exists(pid) for pid in before - set(stuck.pids()))
    assert len(stuck.pids()) == 2 and all(psutil.pid_exists(p) for p in stuck.pids())


def test_crashed_worker_is_replaced_and_queued_tasks_rerun(pool):
    dying = pool(stuck_or_die, 1)
    outcomes = dying.map([("x",), ("die",), ("y",), ("z",)], timeout=30.0)
    assert [o.status for o in outcomes] == ["ok", "crashed", "ok", "ok"]
    assert outcomes[1].error == "exit 3"
    assert [outcomes[i].value for i in (0, 2, 3)] == ["x", "y", "z"]


def test_close_leaves_no_process_and_map_restarts(pool):
    squares = pool(square_or_fail, 2)
    squares.map([(1,), (2,)], timeout=30.0)
    pids = squares.pids()
    squares.close()
    assert squares.pids() == [] and not any(psutil.pid_exists(p) for p in pids)
    assert [o.value for o in squares.map([(4,)], timeout=30.0)] == [16]


def _map_in_forked_child(shared: TaskPool, queue) -> None:
    queue.put(([o.value for o in shared.map([(5,)], timeout=30.0)], shared.pids()))
    shared.close()


def test_a_forked_copy_starts_its_own_workers(pool):
    squares = pool(square_or_fail, 1)
    squares.map([(1,)], timeout=30.0)
    parent_pids = squares.pids()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_map_in_forked_child, args=(squares, queue))
    child.start()
    values, child_pids = queue.get(timeout=60)
    child.join()
    assert values == [25] and set(child_pids).isdisjoint(parent_pids)
    assert squares.pids() == parent_pids and all(psutil.pid_exists(p) for p in parent_pids)
    assert [o.value for o in squares.map([(6,)], timeout=30.0)] == [36]


def test_worker_that_cannot_start_is_an_error(pool):
    def orphan(x):
        return x

    orphan.__module__ = "no_such_module_for_openr1_tests"
    broken = pool(orphan, 1)
    with pytest.raises(RuntimeError, match="did not start"):
        broken.map([(1,)], timeout=5.0)
    assert broken.pids() == []


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="workers"):
        TaskPool(square_or_fail, 0)
    with pytest.raises(ValueError, match="timeout"):
        TaskPool(square_or_fail, 1).map([(1,)], timeout=0)

"""A bounded process pool whose tasks have a hard time limit.

Why not `multiprocessing.Pool` or `concurrent.futures`: neither can stop one task that runs
too long (sympy on adversarial LaTeX can spin in code that no signal interrupts) without
tearing down the whole pool, and a worker killed by the OOM killer breaks them. Their
spawn/forkserver workers also re-import the caller's `__main__` (a training script without
an `if __name__ == "__main__"` guard would run again in every worker).

Algorithm: `workers` child interpreters (`python -c`, started with subprocess, in their own
session so a terminal Ctrl-C reaches only the trainer) import the task's module once, then
take tasks over their own pipe pair (pickled): the running one plus, when it is small
enough to sit in the pipe buffer, one queued task, so a worker never idles waiting for the
parent. The parent waits on all result pipes until the nearest deadline of a running task.
A task past its deadline gets its worker SIGKILLed, reaped and replaced (outcome
"timeout"); a worker whose pipe closes mid-task yields "crashed" and is replaced (its queued
task goes back to the queue); an exception inside the task yields "error". Results come
back in input order.
Workers exit when their task pipe closes, i.e. when the pool is closed or the parent dies.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

_WORKER_CODE = "from openr1_mega.rl.rewards.pool import worker_main; worker_main()"
_PREFETCH_MAX_BYTES = 16 << 10  # a queued task this small never blocks the parent on send


@dataclass(frozen=True)
class Outcome:
    """What happened to one task: status "ok" (value set), "error", "timeout" or "crashed"."""

    status: str
    value: Any = None
    error: str = ""


def worker_main() -> None:
    """Entry point of a worker process: argv = [task fd, result fd, "module:function"]."""
    task_fd, result_fd, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    tasks, results = Connection(task_fd, writable=False), Connection(result_fd, readable=False)
    while True:
        try:
            index, args = pickle.loads(tasks.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            reply = (index, "ok", fn(*args), "")
        except Exception as exc:  # noqa: BLE001 - reported to the parent as this task's outcome
            reply = (index, "error", None, f"{type(exc).__name__}: {exc}")
        results.send(reply)


class _Worker:
    """One worker process, the parent's ends of its two pipes, and its tasks in flight."""

    def __init__(self, target: str) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(task_r), str(result_w), target],
            pass_fds=(task_r, result_w), env=env, start_new_session=True)
        os.close(task_r)
        os.close(result_w)
        self.tasks = Connection(task_w, readable=False)
        self.results = Connection(result_r, writable=False)
        self.inflight: deque[int] = deque()
        self.deadline = 0.0  # of the task at the head of `inflight`, the one running

    def can_take(self, size: int) -> bool:
        """Idle, or busy with one task and `size` bytes fit in the pipe without blocking."""
        return not self.inflight or (len(self.inflight) == 1 and size <= _PREFETCH_MAX_BYTES)

    def stop(self, kill: bool) -> None:
        self.tasks.close()
        if kill:
            self.process.kill()
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.results.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop(kill=False)
    workers.clear()


class TaskPool:
    """`workers` processes running `fn` (a module-level function) with a per-task deadline.

    Thread-safe: concurrent `map` calls are serialised.

    Args:
        fn: the task function, importable as `fn.__module__:fn.__qualname__`.
        workers: number of worker processes (>= 1).
    """

    def __init__(self, fn: Callable[..., Any], workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.target = f"{fn.__module__}:{fn.__qualname__}"
        self.size = workers
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.replaced = 0
        self._finalizer = weakref.finalize(self, _stop_all, self.workers)

    def map(self, tasks: Sequence[tuple], timeout: float) -> list[Outcome]:
        """Run `fn(*task)` for every task; each task gets `timeout` seconds of wall time.

        The first call also waits for the workers to start (about a second each).
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        with self.lock:
            while len(self.workers) < self.size:
                self.workers.append(_Worker(self.target))
            return self._run(list(tasks), timeout)

    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.process.pid for w in self.workers]

    def close(self) -> None:
        """Stop the workers (also done at garbage collection and exit); `map` restarts them."""
        with self.lock:
            _stop_all(self.workers)

    def _run(self, tasks: list[tuple], timeout: float) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        payloads: dict[int, bytes] = {}
        while pending or any(w.inflight for w in self.workers):
            for worker in self.workers:
                while pending:
                    index = pending[0]
                    if index not in payloads:
                        payloads[index] = pickle.dumps((index, tasks[index]))
                    if not worker.can_take(len(payloads[index])):
                        break
                    pending.popleft()
                    self._send(worker, index, payloads.pop(index), timeout, outcomes, pending)
            if any(w.inflight for w in self.workers):
                self._collect(outcomes, pending, timeout)
        return outcomes

    def _send(self, worker: _Worker, index: int, payload: bytes, timeout: float,
              outcomes: list[Outcome | None], pending: deque[int]) -> None:
        if not worker.inflight:
            worker.deadline = time.monotonic() + timeout
        worker.inflight.append(index)
        try:
            worker.tasks.send_bytes(payload)
        except OSError as exc:
            self._replace(worker, outcomes, pending, Outcome("crashed", error=f"send: {exc}"))

    def _collect(self, outcomes: list[Outcome | None], pending: deque[int],
                 timeout: float) -> None:
        """Wait until a busy worker answers, dies or passes its deadline, and record it."""
        busy = [w for w in self.workers if w.inflight]
        nearest = min(w.deadline for w in busy)
        ready = wait([w.results for w in busy], timeout=max(0.0, nearest - time.monotonic()))
        now = time.monotonic()
        for worker in busy:
            if worker.results in ready:
                try:
                    index, status, value, error = worker.results.recv()
                except (EOFError, OSError):
                    code = worker.process.poll()
                    self._replace(worker, outcomes, pending,
                                  Outcome("crashed", error=f"exit {code}"))
                    continue
                outcomes[worker.inflight.popleft()] = Outcome(status, value, error)
                worker.deadline = now + timeout  # the next task in flight starts now
            elif now >= worker.deadline:
                self._replace(worker, outcomes, pending,
                              Outcome("timeout", error="hard time limit"))

    def _replace(self, worker: _Worker, outcomes: list[Outcome | None], pending: deque[int],
                 outcome: Outcome) -> None:
        """Record `outcome` for the running task, requeue the queued one, restart the worker."""
        outcomes[worker.inflight.popleft()] = outcome
        pending.extendleft(reversed(worker.inflight))
        worker.stop(kill=True)
        self.workers[self.workers.index(worker)] = _Worker(self.target)
        self.replaced += 1


_SHARED: dict[tuple[str, int], TaskPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(fn: Callable[..., Any], workers: int) -> TaskPool:
    """One long-lived pool per (function, size) in this process, closed at exit."""
    key = (f"{fn.__module__}:{fn.__qualname__}", workers)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = TaskPool(fn, workers)
        return _SHARED[key]


@atexit.register
def _close_shared() -> None:
    for pool in _SHARED.values():
        pool.close()

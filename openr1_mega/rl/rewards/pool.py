"""A bounded process pool whose tasks have a hard time limit.

Why not `multiprocessing.Pool` or `concurrent.futures`: neither can stop one task that runs
too long (sympy on adversarial LaTeX can spin in code that no signal interrupts) without
tearing down the whole pool, and a worker killed by the OOM killer breaks them. Their
spawn/forkserver workers also re-import the caller's `__main__` (a training script without
an `if __name__ == "__main__"` guard would run again in every worker).

Algorithm: `workers` child interpreters (`python -c`, started with subprocess, in their own
session so a terminal Ctrl-C reaches only the trainer) import the task's module once, make
an optional warm-up call, and say they are ready (start-up is not charged to any task's
time limit). Each then takes tasks over its own pipe pair (pickled): the running one plus,
when it is small enough to sit in the pipe buffer, one queued task, so a worker never idles
waiting for the parent. The parent waits on all result pipes until the nearest deadline of
a running task. A task past its deadline gets its worker SIGKILLed, reaped and replaced
(outcome "timeout"); a worker whose pipe closes mid-task yields "crashed" and is replaced
(its queued task goes back to the queue); an exception inside the task yields "error".
Results come back in input order. Workers exit when their task pipe closes, i.e. when the
pool is closed or the parent dies.
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
_READY = "ready"  # a worker's first message, once its module is imported
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    """What happened to one task: status "ok" (value set), "error", "timeout" or "crashed"."""

    status: str
    value: Any = None
    error: str = ""


def worker_main() -> None:
    """Entry point of a worker: argv = [task fd, result fd, "module:function", warm-up]."""
    task_fd, result_fd, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    warmup = pickle.loads(bytes.fromhex(sys.argv[4]))
    if warmup is not None:
        fn(*warmup)
    tasks, results = Connection(task_fd, writable=False), Connection(result_fd, readable=False)
    results.send(_READY)
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

    def __init__(self, target: str, warmup: bytes) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(task_r), str(result_w), target,
             warmup.hex()],
            pass_fds=(task_r, result_w), env=env, start_new_session=True)
        os.close(task_r)
        os.close(result_w)
        self.tasks = Connection(task_w, readable=False)
        self.results = Connection(result_r, writable=False)
        self.inflight: deque[int] = deque()
        self.ready = False  # start-up (imports) is not charged to any task's time limit
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S  # then: of the running task

    def can_take(self, size: int) -> bool:
        """Idle, or busy with one task and `size` bytes fit in the pipe without blocking."""
        if not self.ready:
            return False
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


def _exit_code(worker: _Worker) -> int | None:
    """Exit code of a worker whose pipe closed (it is exiting; None if it hangs on)."""
    try:
        return worker.process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        return None


def _stop_all(workers: list[_Worker], owner: int) -> None:
    if os.getpid() != owner:  # a forked copy of the pool: the workers are not ours
        return
    for worker in workers:
        worker.stop(kill=False)
    workers.clear()


class TaskPool:
    """`workers` processes running `fn` (a module-level function) with a per-task deadline.

    Thread-safe: concurrent `map` calls are serialised.

    Args:
        fn: the task function, importable as `fn.__module__:fn.__qualname__`.
        workers: number of worker processes (>= 1).
        warmup: arguments of one call each worker makes before it is ready (e.g. to trigger
            lazy imports that would otherwise count against the first task's time limit).
    """

    def __init__(self, fn: Callable[..., Any], workers: int, warmup: tuple | None = None
                 ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.target = f"{fn.__module__}:{fn.__qualname__}"
        self.warmup = pickle.dumps(warmup)
        self.size = workers
        self.lock = threading.Lock()
        self.replaced = 0
        self._own_workers()

    def _own_workers(self) -> None:
        """Start with no workers in this process (also after a fork: the parent's stay its)."""
        self.owner = os.getpid()
        self.workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self.workers, self.owner)

    def map(self, tasks: Sequence[tuple], timeout: float) -> list[Outcome]:
        """Run `fn(*task)` for every task; each task gets `timeout` seconds of wall time.

        The first call also waits for the workers to start (about a second each).
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        with self.lock:
            if os.getpid() != self.owner:
                self._own_workers()
            while len(self.workers) < self.size:
                self.workers.append(_Worker(self.target, self.warmup))
            return self._run(list(tasks), timeout)

    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.process.pid for w in self.workers]

    def close(self) -> None:
        """Stop the workers (also done at garbage collection and exit); `map` restarts them."""
        with self.lock:
            _stop_all(self.workers, self.owner)

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
        """Wait until a busy or starting worker answers, dies or passes its deadline."""
        watched = [w for w in self.workers if w.inflight or not w.ready]
        nearest = min(w.deadline for w in watched)
        ready = wait([w.results for w in watched], timeout=max(0.0, nearest - time.monotonic()))
        now = time.monotonic()
        for worker in watched:
            if not worker.ready:
                if worker.results in ready or now >= worker.deadline:
                    self._started(worker)
                continue
            if worker.results in ready:
                try:
                    _, status, value, error = worker.results.recv()
                except (EOFError, OSError):
                    self._replace(worker, outcomes, pending,
                                  Outcome("crashed", error=f"exit {_exit_code(worker)}"))
                    continue
                outcomes[worker.inflight.popleft()] = Outcome(status, value, error)
                worker.deadline = now + timeout  # the next task in flight starts now
            elif now >= worker.deadline:
                self._replace(worker, outcomes, pending,
                              Outcome("timeout", error="hard time limit"))

    def _started(self, worker: _Worker) -> None:
        """Take a starting worker's ready message; a worker that cannot start is fatal."""
        try:
            if worker.results.poll() and worker.results.recv() == _READY:
                worker.ready = True
                return
        except (EOFError, OSError):
            pass
        worker.stop(kill=True)
        self.workers.remove(worker)
        raise RuntimeError(f"pool worker for {self.target} did not start (exit code "
                           f"{worker.process.returncode}); its error is on stderr above")

    def _replace(self, worker: _Worker, outcomes: list[Outcome | None], pending: deque[int],
                 outcome: Outcome) -> None:
        """Record `outcome` for the running task, requeue the queued one, restart the worker."""
        outcomes[worker.inflight.popleft()] = outcome
        pending.extendleft(reversed(worker.inflight))
        worker.stop(kill=True)
        self.workers[self.workers.index(worker)] = _Worker(self.target, self.warmup)
        self.replaced += 1


_SHARED: dict[tuple[str, int], TaskPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(fn: Callable[..., Any], workers: int, warmup: tuple | None = None
                ) -> TaskPool:
    """One long-lived pool per (function, size) in this process, closed at exit."""
    key = (f"{fn.__module__}:{fn.__qualname__}", workers)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = TaskPool(fn, workers, warmup)
        return _SHARED[key]


@atexit.register
def _close_shared() -> None:
    for pool in _SHARED.values():
        pool.close()

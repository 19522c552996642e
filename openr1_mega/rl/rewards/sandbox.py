"""Run one untrusted Python program on one stdin with hard limits; the parent's side.

`run_program(source, stdin, limits)` starts sandbox_init.py (which isolates and execs the
program; see its docstring for the mechanisms) in a new process group with a minimal
environment, feeds the input from an unlinked temporary file, and reads stdout and stderr
through a selector. Stdout beyond `max_output_bytes` or a run past `wall_seconds` ends the
run at once: SIGKILL to the PID namespace's init (the kernel then ends every process in it
before the launcher returns), or to the whole process group in rlimits mode. Then it kills
whatever is left under the run's dedicated uid and removes the work directory. Every run
ends with a status:
  ok, runtime_error, timeout (wall time), cpu_limit, memory_limit, output_limit,
  file_size_limit, sandbox_error (the sandbox itself failed).
Isolation "namespaces" needs root with CAP_SYS_ADMIN; `detect_isolation()` probes it once
and falls back to "rlimits" (see sandbox_init.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
LAUNCHER = _HERE / "sandbox_init.py"
GUARD = _HERE / "sandbox_guard.py"
SETUP_FAILED = 125
STDERR_TAIL_BYTES = 4096
ISOLATIONS = ("auto", "namespaces", "rlimits")
_DETECT_LOCK = threading.Lock()
UID_BASE, UID_SLOTS = 200_000, 64  # sandbox uids: UID_BASE + (pid % 50000) * 64 + slot
_UID_LOCK = threading.Lock()
_uid_queue: queue.Queue | None = None
_MINIMAL_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Limits:
    """Per-run limits of the sandbox."""

    wall_seconds: float = 4.0
    """Wall-clock limit of one run; the process group is killed past it."""
    cpu_seconds: int = 2
    """RLIMIT_CPU (soft; SIGKILL one second later)."""
    memory_mb: int = 512
    """RLIMIT_AS, address space of each process."""
    max_processes: int = 16
    """RLIMIT_NPROC for the run's dedicated uid (processes and threads)."""
    max_output_bytes: int = 1 << 20
    """stdout read before the run is killed as output_limit."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE, largest file the program may write."""
    tmpfs_mb: int = 64
    """Size of the private /tmp (namespaces mode)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"Limits.{name} must be > 0, got {value}")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one run: status (see module docstring), output, and exit code."""

    status: str
    stdout: str
    stderr: str
    exit_code: int | None
    seconds: float


def program_interpreter() -> str:
    """The base interpreter behind this (virtual) environment.

    Programs run with `-I -S` on the standard library only, so they need no venv; the venv
    may also live under /tmp, which the sandbox replaces with its private tmpfs.
    """
    return os.path.realpath(sys.executable)


def _prefixes(python: str) -> list[str]:
    """Directories the interpreter needs: its install prefix, and this venv when it is ours."""
    prefixes = {os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    if python == sys.executable:
        prefixes |= {sys.prefix, sys.base_prefix}
    return sorted(prefixes)


def _launcher_config(limits: Limits, isolation: str, uid: int | None, workdir: str,
                     source_fd: int, python: str) -> dict:
    mib = 1 << 20
    return {
        "mode": isolation, "uid": uid, "workdir": workdir, "source_fd": source_fd,
        "python": python, "expose": _prefixes(python),
        "guard": str(GUARD) if isolation == "rlimits" else None,
        "env": _MINIMAL_ENV, "tmpfs_bytes": limits.tmpfs_mb * mib,
        "limits": {"cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_mb * mib,
                   "max_processes": limits.max_processes,
                   "max_file_bytes": limits.max_file_mb * mib,
                   "max_open_files": limits.max_open_files},
    }


def _start(source: str, stdin: str, limits: Limits, isolation: str, uid: int | None,
           workdir: str, python: str) -> subprocess.Popen:
    """Start the launcher in its own process group; source and input go in unlinked files."""
    with tempfile.TemporaryFile() as code, tempfile.TemporaryFile() as data:
        code.write(source.encode("utf-8", "replace"))
        data.write(stdin.encode("utf-8", "replace"))
        code.seek(0)
        data.seek(0)
        config = _launcher_config(limits, isolation, uid, workdir, code.fileno(), python)
        return subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(config)],
            stdin=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(code.fileno(),), env=_MINIMAL_ENV, cwd="/", process_group=0)


def _read_bounded(process: subprocess.Popen, limits: Limits) -> tuple[bytes, bytes, str | None]:
    """Read stdout/stderr until both close; "timeout" / "output_limit" stop it early."""
    deadline = time.monotonic() + limits.wall_seconds
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, out)
        selector.register(process.stderr, selectors.EVENT_READ, err)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(out), bytes(err), "timeout"
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.data is out:
                    out += chunk
                    if len(out) > limits.max_output_bytes:
                        return bytes(out[:limits.max_output_bytes]), bytes(err), "output_limit"
                else:
                    err += chunk
                    del err[:-STDERR_TAIL_BYTES]
    return bytes(out), bytes(err), None


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (before reaping it, so the id is still ours)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop(process: subprocess.Popen, isolation: str) -> None:
    """End a run at once.

    Namespaces: SIGKILL only the namespace's init (the launcher's child), so the launcher,
    which waits for it, exits only after the kernel has ended every process of the
    namespace. Otherwise (or before the init exists): SIGKILL the whole process group.
    """
    if isolation == "namespaces":
        try:
            inits = psutil.Process(process.pid).children()
        except psutil.NoSuchProcess:
            inits = []
        for init in inits:
            try:
                init.kill()
            except psutil.NoSuchProcess:
                pass
        if inits:
            return
    _kill_group(process)


def _live_processes(uid: int) -> list[psutil.Process]:
    live = []
    for proc in psutil.process_iter(["uids", "status"]):
        uids = proc.info["uids"]
        if (uids is not None and uid in (uids.real, uids.effective)
                and proc.info["status"] != psutil.STATUS_ZOMBIE):
            live.append(proc)
    return live


def kill_uid(uid: int | None, timeout: float = 5.0) -> int:
    """SIGKILL every process of `uid` (the run's dedicated uid) until none is left.

    Returns how many were killed; logs a warning if some survive `timeout` seconds.
    """
    if uid is None:
        return 0
    killed = 0
    deadline = time.monotonic() + timeout
    while procs := _live_processes(uid):
        if time.monotonic() > deadline:
            logger.warning("sandbox: %d processes of uid %d survive SIGKILL", len(procs), uid)
            break
        for proc in procs:
            try:
                proc.kill()
                killed += 1
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=0.1)
    return killed


def _status(limit_hit: str | None, exit_code: int, stderr: str) -> str:
    if limit_hit:
        return limit_hit
    if exit_code == 0:
        return "ok"
    if exit_code == SETUP_FAILED and "sandbox setup failed" in stderr:
        return "sandbox_error"
    if exit_code == 128 + signal.SIGXCPU:
        return "cpu_limit"
    if exit_code == 128 + signal.SIGXFSZ or "File too large" in stderr:
        return "file_size_limit"
    if "MemoryError" in stderr:
        return "memory_limit"
    return "runtime_error"


def run_program(source: str, stdin: str = "", limits: Limits | None = None,
                isolation: str = "auto", uid: int | None = None,
                python: str | None = None) -> RunResult:
    """Run `source` (Python) on `stdin` in the sandbox and return what happened.

    Args:
        source: program text, run as a script.
        stdin: the program's standard input.
        limits: resource limits (defaults: `Limits()`).
        isolation: "namespaces", "rlimits", or "auto" (`detect_isolation()`).
        uid: dedicated unprivileged uid for this run (root only; no two concurrent runs
            may share one). None when not root.
        python: interpreter for the program (default: this one, so its packages are there).
    """
    limits = limits or Limits()
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    isolation = detect_isolation() if isolation == "auto" else isolation
    if uid is not None and os.geteuid() != 0:
        raise ValueError(f"uid={uid} needs root; pass uid=None")
    if isolation == "namespaces" and uid is None:
        raise ValueError("isolation='namespaces' needs a dedicated uid (see dedicated_uid)")
    workdir = tempfile.mkdtemp(prefix="openr1-sandbox-") if isolation == "rlimits" else ""
    start = time.monotonic()
    try:
        process = _start(source, stdin, limits, isolation, uid, workdir,
                         python or program_interpreter())
        out, err, limit_hit = _read_bounded(process, limits)
        if limit_hit or isolation == "rlimits":
            _stop(process, isolation)
        code = process.wait()
        if limit_hit or isolation == "rlimits":
            kill_uid(uid)  # escapees; in namespaces mode only a safety net
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    exit_code = code if code >= 0 else 128 - code
    stderr = err.decode("utf-8", "replace")
    return RunResult(status=_status(limit_hit, exit_code, stderr),
                     stdout=out.decode("utf-8", "replace"), stderr=stderr,
                     exit_code=exit_code, seconds=time.monotonic() - start)


def _free_uids() -> queue.Queue:
    """The free ones of this process's UID_SLOTS sandbox uids.

    The base depends on our pid so that several trainer processes on one host do not share
    uids (RLIMIT_NPROC counts per uid, and cleanup kills by uid).
    """
    global _uid_queue
    with _UID_LOCK:
        if _uid_queue is None:
            _uid_queue = queue.Queue()
            base = UID_BASE + (os.getpid() % 50_000) * UID_SLOTS
            for uid in range(base, base + UID_SLOTS):
                _uid_queue.put(uid)
        return _uid_queue


@contextlib.contextmanager
def dedicated_uid() -> Iterator[int | None]:
    """An unprivileged uid that no other run of this process uses meanwhile.

    None when not root. Blocks while all UID_SLOTS are taken; call `detect_isolation()`
    before taking one (its probe needs a slot too).
    """
    if os.geteuid() != 0:
        yield None
        return
    free = _free_uids()
    uid = free.get()
    try:
        yield uid
    finally:
        free.put(uid)


def _probe(isolation: str) -> RunResult:
    with dedicated_uid() as uid:
        return run_program("print(6 * 7)", limits=Limits(), isolation=isolation, uid=uid)


def detect_isolation() -> str:
    """"namespaces" if a probe run works there (root with CAP_SYS_ADMIN), else "rlimits".

    Probes once per process (thread-safe). Logs a warning when falling back, and an error
    when even the rlimits probe fails (e.g. root, but the interpreter lies under a directory
    that other users cannot enter: pass `python=` an interpreter they can run).
    """
    with _DETECT_LOCK:
        return _detect_isolation()


@functools.cache
def _detect_isolation() -> str:
    if os.geteuid() == 0:
        probe = _probe("namespaces")
        if probe.status == "ok" and probe.stdout.strip() == "42":
            return "namespaces"
        logger.warning("sandbox: namespaces unavailable (%s: %s); using the weaker rlimits "
                       "mode", probe.status, probe.stderr.strip()[-300:])
    else:
        logger.warning("sandbox: not root, so no namespaces or dedicated uid; using the "
                       "weaker rlimits mode")
    probe = _probe("rlimits")
    if probe.status != "ok" or probe.stdout.strip() != "42":
        logger.error("sandbox: the rlimits probe failed too (%s: %s)", probe.status,
                     probe.stderr.strip()[-300:])
    return "rlimits"

"""Sandbox launcher: sets up the isolation, then runs the untrusted program.

Run by sandbox.py as `python -I -S sandbox_init.py CONFIG_JSON` (stdlib only, no package
imports, so it starts in milliseconds), with the program's source on an inherited file
descriptor (config "source_fd"), its test input on stdin, and stdout/stderr going to the
parent's bounded readers.

Mode "namespaces" (root with CAP_SYS_ADMIN):
  1. unshare mount, network, PID, IPC and UTS namespaces: the program sees no network
     interface but a down loopback, and no host IPC;
  2. make every mount private, mount a fresh size-limited tmpfs on /tmp (the only writable
     place, gone when the namespace ends), make the interpreter reachable for an
     unprivileged uid (`_expose`), and remount every other mount read-only;
  3. fork the namespace's init (PID 1), which mounts its own /proc and forks the program;
     when the program exits, init exits and the kernel kills every process left in the
     namespace (daemons, fork-bomb leftovers), so nothing outlives the run;
  4. the program child creates /tmp/work, writes solution.py, sets the rlimits (CPU, address
     space, processes, file size, open files, no core), sets no_new_privs, drops to a
     dedicated unprivileged uid/gid (RLIMIT_NPROC is not enforced for root), and execs
     `python -I -B solution.py` with a minimal environment.
Mode "rlimits" (fallback without namespaces): step 4 in the parent-made work directory,
dropping to the dedicated uid only when root, with the Python-level guard
(sandbox_guard.py) blocking sockets, subprocesses, ctypes and writes outside the work
directory. Exit status: the program's (128 + signal if killed); SETUP_FAILED when the
sandbox could not be set up, with the reason on stderr.
"""

import ctypes
import json
import os
import resource
import sys

SETUP_FAILED = 125
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_SET_NO_NEW_PRIVS = 38
MNT_DETACH = 2
_KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None):
    def enc(s):
        return None if s is None else s.encode()

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                       enc(data)), f"mount {target}")


def _mount_points():
    """(mount point, flags to keep) of every mount, parents first."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")
            kept = sum(bit for name, bit in _KEPT_FLAGS.items() if name in fields[5].split(","))
            points.append((target, kept))
    return sorted(points, key=lambda p: p[0].count("/"))


def _blocked_ancestor(path):
    """Topmost directory on the way to `path` that other users may not traverse, or None."""
    parts = path.rstrip("/").split("/")
    for i in range(2, len(parts) + 1):
        directory = "/".join(parts[:i])
        if not os.stat(directory).st_mode & 0o001:
            return directory
    return None


def _expose(paths):
    """Make `paths` (the interpreter's prefixes) reachable to the program's uid.

    A prefix under a private directory (e.g. /root/.pyenv under a 0700 /root) is bind-mounted
    aside, a small tmpfs covers the private directory (hiding the rest of it), and the prefix
    is bind-mounted back at its own path, so symlinks and sys.prefix still resolve.
    """
    blocked = {}
    for path in paths:
        ancestor = _blocked_ancestor(path)
        if ancestor is not None:
            blocked.setdefault(ancestor, []).append(path)
    for n, (ancestor, inside) in enumerate(blocked.items()):
        staged = []
        for i, path in enumerate(inside):
            stage = f"/tmp/.expose-{n}-{i}"
            os.makedirs(stage)
            _mount(path, stage, None, MS_BIND | MS_REC)
            staged.append((stage, path))
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for stage, path in staged:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(stage, path, None, MS_BIND | MS_REC)
            _check(_libc.umount2(stage.encode(), MNT_DETACH), f"umount {stage}")
            os.rmdir(stage)


def _isolate_filesystem(tmpfs_bytes, expose):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_bytes},mode=1777")
    _expose(expose)
    for target, kept in _mount_points():
        if target.startswith("/proc") or target == "/tmp":
            continue
        try:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except OSError:
            pass  # special mounts that refuse a remount hold nothing the program can write


def _set_limits(limits):
    cpu = limits["cpu_seconds"]
    for name, soft, hard in (("RLIMIT_CPU", cpu, cpu + 1),
                             ("RLIMIT_AS", limits["memory_bytes"], limits["memory_bytes"]),
                             ("RLIMIT_NPROC", limits["max_processes"], limits["max_processes"]),
                             ("RLIMIT_FSIZE", limits["max_file_bytes"], limits["max_file_bytes"]),
                             ("RLIMIT_NOFILE", limits["max_open_files"],
                              limits["max_open_files"]),
                             ("RLIMIT_CORE", 0, 0)):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _drop_privileges(uid):
    if uid is None:
        return
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _exec_program(config, source, workdir):
    """Write solution.py into `workdir`, apply limits, drop privileges, exec the program."""
    uid = config["uid"]
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    path = os.path.join(workdir, "solution.py")
    with open(path, "wb") as f:
        f.write(source)
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chown(path, uid, uid)
    os.chdir(workdir)
    _set_limits(config["limits"])
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    _drop_privileges(uid)
    argv = [config["python"], "-I", "-B"]
    argv += [config["guard"], path] if config["guard"] else [path]
    os.execve(config["python"], argv, dict(config["env"], HOME=workdir))


def _exit_code(status):
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _wait_for(pid):
    """Reap children until `pid` exits; return its exit code."""
    while True:
        done, status = os.wait()
        if done == pid:
            return _exit_code(status)


def _namespace_init(config, source):
    """PID 1 of the new namespace: own /proc, run the program, and end with it."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    program = os.fork()
    if program == 0:
        _run_child(_exec_program, config, source, "/tmp/work")
    os._exit(_wait_for(program))


def _run_child(target, *args):
    try:
        target(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent through stderr
        os.write(2, f"sandbox setup failed: {type(exc).__name__}: {exc}\n".encode())
    os._exit(SETUP_FAILED)


def _run_in_namespaces(config, source):
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _check(_libc.unshare(flags), "unshare")
    _isolate_filesystem(config["tmpfs_bytes"], config["expose"])
    init = os.fork()
    if init == 0:
        _run_child(_namespace_init, config, source)
    return _wait_for(init)


def main():
    config = json.loads(sys.argv[1])
    with os.fdopen(config["source_fd"], "rb") as f:
        source = f.read()
    if config["mode"] == "namespaces":
        sys.exit(_run_in_namespaces(config, source))
    _exec_program(config, source, config["workdir"])


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - reported to the parent through stderr
        os.write(2, f"sandbox setup failed: {type(exc).__name__}: {exc}\n".encode())
        os._exit(SETUP_FAILED)

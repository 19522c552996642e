"""Python-level guard for the sandbox's fallback mode (no namespaces available).

Run as `python -I -B sandbox_guard.py solution.py`: installs an audit hook (PEP 578, which
cannot be removed once added) and then runs solution.py as `__main__`. The hook refuses
sockets, new processes, ctypes (which could call libc around the hook) and any write,
rename or delete outside the working directory. This is weaker than the kernel isolation of
the "namespaces" mode (a C extension can bypass it) and exists only for hosts without it.
"""

import os
import runpy
import sys

_WORKDIR = os.path.realpath(os.getcwd())
_BLOCKED_PREFIXES = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.posix_spawn",
                     "os.spawn", "os.fork", "os.system", "pty.", "os.kill", "os.killpg")
_BLOCKED_MODULES = {"_posixsubprocess", "_ctypes"}  # process creation and libc calls, raw
_PATH_EVENTS = {"os.mkdir", "os.remove", "os.rename", "os.rmdir", "os.symlink", "os.link",
                "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree",
                "shutil.copyfile", "shutil.move"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path):
    if isinstance(path, int):
        return True
    resolved = os.path.realpath(os.fsdecode(path))
    return resolved == _WORKDIR or resolved.startswith(_WORKDIR + os.sep)


def _writes(mode, flags):
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _hook(event, args):
    if event.startswith(_BLOCKED_PREFIXES):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in _BLOCKED_MODULES:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open" and args and _writes(args[1], args[2]) and not _inside(args[0]):
        raise PermissionError(f"sandbox: writing {args[0]!r} is not allowed")
    if event in _PATH_EVENTS:
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg):
                raise PermissionError(f"sandbox: {event} on {arg!r} is not allowed")


def main():
    program = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(program))
    sys.addaudithook(_hook)
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()

"""Code reward and its sandbox: scoring, and hostile programs that must not get out.

Hostile programs run in every isolation mode this host supports ("namespaces" needs root
with CAP_SYS_ADMIN; "rlimits" as root needs an interpreter an unprivileged uid can reach).
Each must end within its limits with reward 0 and a logged reason, and leave no process
and no file behind.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from openr1_mega.rl.rewards import get_reward
from openr1_mega.rl.rewards.code import extract_code, outputs_match
from openr1_mega.rl.rewards.sandbox import (
    UID_BASE,
    Limits,
    dedicated_uid,
    detect_isolation,
    run_program,
)

MARKER = f"openr1-test-{uuid.uuid4().hex[:8]}"
HOSTILE = Limits(wall_seconds=3.0, cpu_seconds=1, memory_mb=256, max_processes=8)
DOUBLE = "```python\nprint(2 * int(input()))\n```"


def _reachable(path: str) -> bool:
    """Whether a uid that is neither owner nor group may execute `path`."""
    real = Path(os.path.realpath(path))
    return all(p.stat().st_mode & 0o001 for p in [real, *real.parents])


def _rlimits_python() -> str | None:
    """Not root: this interpreter. Root: one the dropped uid can execute, if any."""
    if os.geteuid() != 0:
        return sys.executable
    return next((p for p in (sys.executable, "/usr/bin/python3")
                 if os.path.exists(p) and _reachable(p)), None)


def _modes() -> list:
    modes = []
    if detect_isolation() == "namespaces":
        modes.append(pytest.param(("namespaces", None), id="namespaces"))
    if _rlimits_python():
        modes.append(pytest.param(("rlimits", _rlimits_python()), id="rlimits"))
    return modes


@pytest.fixture(params=_modes())
def mode(request):
    """(isolation, python) of one supported mode; checks nothing is left behind after."""
    yield request.param
    assert _strays() == []
    assert not list(Path("/tmp").glob("openr1-sandbox-*"))


def _strays() -> list[str]:
    strays = []
    for proc in psutil.process_iter(["uids", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        uids = proc.info["uids"]
        ours = (uids and uids.real >= UID_BASE) or MARKER in cmdline or "sandbox_init" in cmdline
        if ours and proc.info["status"] != psutil.STATUS_ZOMBIE:
            strays.append(f"{proc.pid}: {cmdline[:80]}")
    return strays


def run(mode, source: str, stdin: str = "", limits: Limits = HOSTILE):
    isolation, python = mode
    with dedicated_uid() as uid:
        return run_program(source, stdin, limits, isolation, uid, python)


def reward_of(mode, source: str, stdin: str, expected: str, caplog) -> tuple[float, str]:
    """The code reward of one hostile program, and what the reward logged about it."""
    isolation, python = mode
    reward = get_reward("code", workers=1, isolation=isolation, python=python,
                        wall_seconds=HOSTILE.wall_seconds, cpu_seconds=HOSTILE.cpu_seconds,
                        memory_mb=HOSTILE.memory_mb, max_processes=HOSTILE.max_processes)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="openr1_mega.rl.rewards.code"):
        values = reward([f"```python\n{source}\n```"],
                        test_cases=[[{"input": stdin, "output": expected}]])
    return values[0], caplog.text


def test_extract_last_python_block():
    text = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```bash\nls\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("no code") is None
    assert extract_code("```python\nunclosed") is None


def test_outputs_match_strips_trailing_whitespace_only():
    assert outputs_match("1 2 \n3\n\n", "1 2\n3")
    assert not outputs_match(" 1", "1")
    assert not outputs_match("1\n\n2", "1\n2")


@pytest.mark.parametrize("scoring, expected", [("fraction", 2 / 3), ("binary", 0.0)])
def test_fraction_and_binary_scoring(scoring, expected):
    tests = [{"input": "1", "output": "2"}, {"input": "5", "output": "10  \n"},
             {"input": "3", "output": "7"}]
    reward = get_reward("code", scoring=scoring)
    assert reward([DOUBLE], test_cases=[tests]) == [pytest.approx(expected)]
    assert reward([DOUBLE], test_cases=[tests[:2]]) == [1.0]


def test_rows_without_code_or_tests(caplog):
    reward = get_reward("code", workers=2)
    tests = '[{"input": "4", "output": "8"}]'  # JSON text, as datasets often store it
    with caplog.at_level(logging.INFO, logger="openr1_mega.rl.rewards.code"):
        values = reward([DOUBLE, "no code here", DOUBLE, DOUBLE, DOUBLE],
                        test_cases=[tests, tests, None, [], [{"in": "1"}]], answer=[0] * 5)
    assert values == [1.0, 0.0, None, None, None]
    metrics = reward.take_metrics()
    assert metrics == {"invalid_test_cases": 1.0, "no_code": 1.0, "passed": 1.0}
    assert "no_code" in caplog.text and "invalid_test_cases" in caplog.text


def test_parallel_runs_keep_their_order():
    reward = get_reward("code", workers=2)
    tests = [[{"input": str(i), "output": str(2 * i)}] for i in range(6)]
    tests[3] = [{"input": "3", "output": "7"}]
    assert reward([DOUBLE] * 6, test_cases=tests) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_cpu_bound_infinite_loop(mode, caplog):
    # a generous wall limit, so that the 1 s CPU limit ends it even on a busy machine
    result = run(mode, "while True:\n    pass\n", limits=Limits(wall_seconds=30, cpu_seconds=1))
    assert result.status == "cpu_limit" and result.seconds < 30
    value, log = reward_of(mode, "while True:\n    pass", "", "done", caplog)
    assert value == 0.0 and ("cpu_limit" in log or "timeout" in log)


def test_sleeping_forever_hits_the_wall_clock(mode, caplog):
    result = run(mode, "import time\ntime.sleep(600)\n", limits=Limits(wall_seconds=1.0))
    assert result.status == "timeout" and result.seconds < 1.0 + 5
    value, log = reward_of(mode, "import time\ntime.sleep(600)", "", "done", caplog)
    assert value == 0.0 and "timeout" in log


def test_fork_bomb(mode, caplog):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run(mode, bomb)
    assert result.status in ("cpu_limit", "timeout")
    value, log = reward_of(mode, bomb, "", "done", caplog)
    assert value == 0.0 and ("cpu_limit" in log or "timeout" in log)


def test_memory_bomb(mode, caplog):
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))"
    assert run(mode, bomb).status == "memory_limit"
    value, log = reward_of(mode, bomb, "", "done", caplog)
    assert value == 0.0 and "memory_limit" in log


def test_writing_outside_its_directory(mode, caplog, tmp_path):
    tmp_path.chmod(0o777)  # writable by anyone: only the sandbox may stop the write
    target = tmp_path / f"{MARKER}.txt"
    program = "import sys\nopen(sys.stdin.read().strip(), 'w').write('x')\nprint('escaped')"
    value, log = reward_of(mode, program, str(target), "escaped", caplog)
    assert value == 0.0 and "runtime_error" in log
    private_tmp = f"/tmp/{MARKER}-private.txt"
    run(mode, program, private_tmp)
    assert not target.exists() and not Path(private_tmp).exists()


def test_environment_secrets_are_not_visible(mode, caplog, monkeypatch):
    monkeypatch.setenv("OPENR1_TEST_SECRET", "hunter2")
    program = (
        "import os, sys\n"
        "seen = [v for k, v in os.environ.items() if 'SECRET' in k]\n"
        "for pid in (sys.stdin.read().strip(), '1'):\n"
        "    try:\n"
        "        seen.append(open(f'/proc/{pid}/environ', 'rb').read().decode())\n"
        "    except OSError:\n"
        "        pass\n"
        "print('hunter2' if any('hunter2' in s for s in seen) else 'no secret')")
    assert run(mode, program, str(os.getpid())).stdout.strip() == "no secret"
    value, log = reward_of(mode, program, str(os.getpid()), "hunter2", caplog)
    assert value == 0.0 and "wrong_answer" in log


def test_network_socket_is_refused(mode, caplog):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        program = ("import socket, sys\n"
                   "s = socket.create_connection(('127.0.0.1', int(input())), timeout=2)\n"
                   "s.sendall(b'pwned')\nprint('connected')")
        value, log = reward_of(mode, program, str(port), "connected", caplog)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert value == 0.0 and "runtime_error" in log


def test_printing_a_gigabyte(mode, caplog):
    program = ("import sys\nchunk = 'x' * (1 << 20)\n"
               "for _ in range(1024):\n    sys.stdout.write(chunk)")
    result = run(mode, program)
    assert result.status == "output_limit" and len(result.stdout) <= HOSTILE.max_output_bytes
    value, log = reward_of(mode, program, "", "x", caplog)
    assert value == 0.0 and "output_limit" in log


def test_subprocess_that_outlives_the_program(mode, caplog):
    sleeper = f"import time; time.sleep(120)  # {MARKER}"
    program = ("import subprocess, sys\n"
               f"subprocess.Popen([sys.executable, '-c', {sleeper!r}], start_new_session=True)\n"
               "print('spawned')")
    value, log = reward_of(mode, program, "", "no child", caplog)
    assert value == 0.0 and ("wrong_answer" in log or "runtime_error" in log)
    assert _strays() == []

"""LiveCodeBench code generation: its prompt, hub-row decoding, and code extraction.

The prompt is LiveCodeBench's code-generation prompt as lighteval's `lcb:codegeneration`
builds it (stdin/stdout problems, or LeetCode-style problems with starter code). Hub rows
(`livecodebench/code_generation_lite`) keep public tests as a JSON string and private tests
as base64(zlib(pickle(JSON string))); the pickle is read with an unpickler that refuses
every global, so a hostile file cannot run code (it may only hold plain strings).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from typing import Any

_INTRO = ("You will be given a question (problem specification) and will generate a correct "
          "Python program that matches the specification and passes all tests.\n\n")
_STARTER = ("You will use the following starter code to write the solution to the problem and "
            "enclose your code within delimiters.\n")
_STDIN = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not "
          "directly test on the sample inputs). Enclose your code within delimiters as follows. "
          "Ensure that when the python program runs, it reads the inputs, runs the algorithm "
          "and writes output to STDOUT.\n")
_CODE_BLOCK = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def prompt(question: str, starter_code: str | None = None) -> str:
    """The LiveCodeBench code-generation prompt for one problem."""
    text = _INTRO + f"Question: {question}\n\n"
    if starter_code:
        return text + _STARTER + f"```python\n{starter_code}\n```\n\n"
    return text + _STDIN + "```python\n# YOUR CODE HERE\n```\n\n"


_HARNESS = """

def _openr1_call():
    import json as _json
    import sys as _sys

    _args = [_json.loads(line) for line in _sys.stdin.read().splitlines() if line.strip()]
    _fn = getattr(Solution(), {fn_name!r}) if "Solution" in globals() else globals()[{fn_name!r}]
    print(_json.dumps(_fn(*_args)))


_openr1_call()
"""


def functional_program(code: str, fn_name: str) -> str:
    """A stdin/stdout program for a LeetCode-style problem: the model's code, then a harness
    that reads one JSON argument per input line, calls `Solution().<fn_name>(*args)` (or a
    top-level function) and prints the result as JSON (LiveCodeBench's functional tests)."""
    return code + _HARNESS.format(fn_name=fn_name)


def functional_output(expected: str) -> str:
    """An expected functional output in the harness's JSON form (so equal values compare
    equal whatever their spacing); text that is not JSON is kept as is."""
    try:
        return json.dumps(json.loads(expected))
    except json.JSONDecodeError:
        return expected


def sandbox_case(program: str, row: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
    """(program, test cases) as the stdin/stdout code reward runs them, for one row."""
    tests = row["test_cases"]
    if not row.get("fn_name"):
        return program, [{"input": t["input"], "output": t["output"]} for t in tests]
    return (functional_program(program, row["fn_name"]),
            [{"input": t["input"], "output": functional_output(t["output"])} for t in tests])


def extract_code(completion: str) -> str | None:
    """The last fenced code block of the completion's final part (after </think>), if any."""
    blocks = _CODE_BLOCK.findall(completion.rsplit("</think>", 1)[-1])
    return blocks[-1] if blocks else None


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in LCB test data")


def decode_private_tests(encoded: str) -> list[dict[str, Any]]:
    """base64 -> zlib -> pickle (plain data only) -> JSON list of {input, output, testtype}."""
    raw = zlib.decompress(base64.b64decode(encoded))
    return json.loads(_PlainUnpickler(io.BytesIO(raw)).load())


def from_hub(row: dict[str, Any], index: int) -> dict[str, Any]:
    """A `code_generation_lite` row in the code-task schema (public + private tests)."""
    public = json.loads(row["public_test_cases"])
    private = decode_private_tests(row["private_test_cases"]) if row["private_test_cases"] else []
    metadata = json.loads(row.get("metadata") or "{}")
    return {"id": row.get("question_id", str(index)), "problem": row["question_content"],
            "starter_code": row.get("starter_code") or None,
            "fn_name": metadata.get("func_name"),
            "test_cases": [{"input": t["input"], "output": t["output"],
                            "testtype": t.get("testtype", "stdin")} for t in public + private],
            "platform": row.get("platform"), "difficulty": row.get("difficulty"),
            "contest_date": str(row.get("contest_date"))}

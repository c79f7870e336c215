"""Every ``python`` block of README.md runs as pasted on a CPU machine.

Each block runs in a fresh namespace of one new interpreter (no TRITON_INTERPRET, as a user
would run it), in a temporary working directory. A block whose first line starts with
``# needs a GPU`` or ``# needs several processes`` is only checked to compile, and only on a
machine without what it needs.
"""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NEEDS = re.compile(r"#\s*needs (a GPU|several processes)")

_RUNNER = r"""
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
failures = []
for number, (line, source) in enumerate(blocks, 1):
    try:
        code = compile(source, f"README.md block {number} (line {line})", "exec")
        exec(code, {"__name__": "__main__"})
    except BaseException:
        failures.append(traceback.format_exc(limit=-3))
print(json.dumps(failures))
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of each fenced ``python`` block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if current is None and line.strip() == "```python":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, "an unterminated ```python block"
    return blocks


def _runnable(source: str) -> bool:
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    match = NEEDS.match(first)
    if match is None:
        return True
    return match.group(1) == "a GPU" and torch.cuda.is_available()


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text())) >= 6


def test_every_python_block_runs_as_pasted(tmp_path):
    blocks = python_blocks(README.read_text())
    for line, source in blocks:
        compile(source, f"README.md line {line}", "exec")
    runnable = [(line, source) for line, source in blocks if _runnable(source)]
    (tmp_path / "blocks.json").write_text(__import__("json").dumps(runnable))
    (tmp_path / "run.py").write_text(textwrap.dedent(_RUNNER))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VLMKERNELS_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "run.py", "blocks.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failures = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    if failures:
        pytest.fail("\n\n".join(failures))

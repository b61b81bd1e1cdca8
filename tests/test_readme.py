"""The README runs as written: its python blocks in order (one namespace, a scratch folder as the
working directory) and its shell commands, on CPU.

A block right after a ``<!-- readme-test: skip (why) -->`` line is not run. In shell blocks,
``pip install`` and ``python -m pytest`` are what CI itself runs (.ci/run), so they are left out.
"""
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = "<!-- readme-test: skip"
BIN = os.path.dirname(sys.executable)  # the `blast` script of this environment


def blocks(text: str):
    """(language, code, skipped) of every fenced block."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        before = text[: m.start()].rstrip().splitlines()
        out.append((m.group(1), m.group(2), bool(before) and before[-1].startswith(SKIP)))
    return out


def readme_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return blocks(f.read())


def commands():
    """Shell commands of the README's bash blocks, minus what CI runs anyway."""
    cmds = []
    for lang, code, skipped in readme_blocks():
        if lang != "bash" or skipped:
            continue
        for line in code.splitlines():
            line = "" if line.lstrip().startswith("#") else line.split(" #")[0].strip()
            for part in (p.strip() for p in line.split("&&")):
                if part and not part.startswith(("pip install", "python -m pytest")):
                    cmds.append(part)
    return cmds


def test_blocks_parser_sees_skips_and_languages():
    text = "a\n```python\nx = 1\n```\n" + SKIP + " (why) -->\n```bash\nfalse\n```\n"
    assert blocks(text) == [("python", "x = 1\n", False), ("bash", "false\n", True)]


def test_readme_has_what_this_file_runs():
    assert any(lang == "python" and not skipped for lang, _, skipped in readme_blocks())
    assert "blast demo" in commands()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path):
    code = "\n".join(c for lang, c, skipped in readme_blocks() if lang == "python" and not skipped)
    script = tmp_path / "readme_snippets.py"
    script.write_text(code)
    env = dict(os.environ, MASTER_PORT=str(_free_port()))  # (the tensor-parallel block's rendezvous)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "MLPs fused" in p.stdout  # print(report)
    assert (tmp_path / "masks.png").exists() and (tmp_path / "ckpt" / "blast.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("cmd", commands(), ids=lambda c: c.replace(" ", "_"))
def test_readme_command_runs(cmd, tmp_path):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), TQDM_DISABLE="1")
    argv = shlex.split(cmd)
    if argv[0] == "python":
        argv[0] = sys.executable
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]

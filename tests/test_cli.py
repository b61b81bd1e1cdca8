"""The `blast` command and the package's import: clear errors, help with defaults, lazy submodules."""
import os
import subprocess
import sys

import pytest

from blast_compile import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv, msg", [
    (["demo", "--sparsity", "1.5"], "1.5 is outside (0, 1)"),
    (["demo", "--sparsity", "0"], "0 is outside (0, 1)"),
    (["demo", "--sparsity", "x"], "'x' is not a number"),
    (["demo", "--block", "0"], "0 must be at least 1"),
    (["demo", "--hidden", "60"], "60 is not a multiple of 16"),
    (["memory-plan", "--sparsity", "1.5"], "1.5 is outside [0, 1)"),
    (["memory-plan", "--sparsity", "-0.1"], "-0.1 is outside [0, 1)"),
])
def test_bad_arguments_are_usage_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert argv[1] in err
    assert msg in err and "Traceback" not in err


def test_demo_help_gives_every_option_a_text_and_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for opt in ("--layers", "--hidden", "--intermediate", "--sparsity", "--block", "--tokens", "--reps"):
        text = out.split(opt, 2)[2]  # (usage line first, then the option's help entry)
        assert text.split("--")[0].count("(default: ") == 1, opt


def test_demo_timings_interleave_sides_and_keep_every_round():
    calls = []
    res = cli._timings({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", reps=3)
    assert calls[4:] == ["a", "b"] * 3  # (after two warm-up calls each)
    assert [len(res[k][0]) for k in "ab"] == [3, 3] and res["a"][1] is None


def test_import_is_light_and_submodules_resolve():
    """`import blast_compile` registers the ops (compress's block_linear too: a saved program may call it) and the
    backend but leaves distributed, sparsifier, transformers, rich and matplotlib unimported until used."""
    code = (
        "import sys, blast_compile, torch\n"
        "heavy = [m for m in ('blast_compile.distributed', 'blast_compile.sparsifier',\n"
        "         'transformers', 'rich', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert torch.ops.blast.sparse_mlp.default and torch.ops.blast.packed_mlp.default\n"
        "assert torch.ops.blast.block_linear.default\n"
        "assert callable(blast_compile.compress.compress_) and callable(blast_compile.compress.from_pretrained)\n"
        "assert callable(blast_compile.distributed.parallelize_blast_mlp)\n"
        "assert callable(blast_compile.explain) and callable(blast_compile.blast)\n"
        "import torch._dynamo\n"
        "assert 'blast' in torch._dynamo.list_backends(exclude_tags=())\n"
        "try:\n"
        "    blast_compile.nope\n"
        "except AttributeError as e:\n"
        "    assert 'nope' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]

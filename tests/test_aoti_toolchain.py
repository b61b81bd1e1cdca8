"""``export.aoti_package`` where Inductor's C++ compiler links libstdc++ statically. Packages built so crash when
they load (our device image: ``CXX`` named a GCC that has only ``libstdc++.a``; BENCHMARKS.md, "AOTInductor").
The compiler here stands in for one: a wrapper that links every shared object with ``-static-libstdc++``."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from blast_compile import export
from blast_compile._counters import counters

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                                reason="needs Linux and g++")

_STATIC = """#!/bin/sh
case " $* " in *" -shared "*) exec {real} "$@" -static-libstdc++ -static-libgcc;; esac
exec {real} "$@"
"""


@pytest.fixture
def static_cxx(tmp_path):
    path = tmp_path / "static-g++"
    path.write_text(_STATIC.format(real=shutil.which("g++")))
    path.chmod(0o755)
    return str(path)


def test_the_link_probe_tells_static_from_shared(static_cxx):
    assert export._links_libstdcxx_shared(shutil.which("g++")) is True
    assert export._links_libstdcxx_shared(static_cxx) is False
    assert export._links_libstdcxx_shared("/nonexistent/g++") is None


@pytest.mark.parametrize("form", ["tuple", "inductor's search tuple", "string"])
def test_a_compiler_named_in_inductor_configs_is_an_error_not_a_switch(static_cxx, form):
    cxx = {"tuple": (static_cxx,), "inductor's search tuple": (None, static_cxx), "string": static_cxx}[form]
    with pytest.raises(RuntimeError, match=r"inductor_configs\['cpp.cxx'\]"):
        export.aoti_package(torch.nn.Linear(4, 4), (torch.randn(2, 4),), "unused.pt2",
                            inductor_configs={"cpp.cxx": cxx})


def test_no_other_compiler_is_an_error_that_names_cxx(static_cxx, monkeypatch):
    # (Inductor's compiler as $CXX gives it, read when its config is imported: patched there, not by monkeypatch,
    # whose undo on the config proxy left no cpp.cxx behind with some pytest versions)
    monkeypatch.setenv("CXX", static_cxx)
    monkeypatch.setattr(export.shutil, "which", lambda name: None)
    with torch._inductor.config.patch({"cpp.cxx": (None, static_cxx)}):
        with pytest.raises(RuntimeError, match=r"links libstdc\+\+ statically.*set CXX"):
            export.aoti_package(torch.nn.Linear(4, 4), (torch.randn(2, 4),), "unused.pt2")


def test_package_is_built_with_a_compiler_that_links_libstdcxx_shared_and_loads(static_cxx, tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32)).eval()
    x = torch.randn(4, 32)
    counters["blast"].clear()
    with torch._inductor.config.patch({"cpp.cxx": (None, static_cxx)}):  # (Inductor's compiler, as $CXX sets it)
        path = export.aoti_package(m, (x,), str(tmp_path / "m.pt2"))
    assert counters["blast"]["aoti_compiler_switched"] == 1
    with torch.no_grad():
        ref = m(x)
    torch.save((x, ref), tmp_path / "io.pt")
    code = ("import sys, torch; r = torch._inductor.aoti_load_package(sys.argv[1]); x, ref = torch.load(sys.argv[2]); "
            "torch.testing.assert_close(r(x), ref); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "io.pt")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CXX": static_cxx})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]

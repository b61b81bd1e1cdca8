"""``export.aoti_package`` on a GCC that has only the static libstdc++ (no ``libstdc++.so`` development link): it
would link libstdc++ into the package, and such packages fail to load (a crash on the device image: BENCHMARKS.md,
"AOTInductor"). The compiler here stands in for one: it reports no ``libstdc++.so`` and links libstdc++ statically
unless a ``libstdc++.so`` is on ``LIBRARY_PATH`` -- what GCC itself does without its development link."""
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

_FAKE = """#!/bin/sh
case " $* " in *" -print-file-name=libstdc++.so "*) echo libstdc++.so; exit 0;; esac
case " $* " in *" -shared "*)
  for d in $(echo "$LIBRARY_PATH" | tr ':' ' '); do
    [ -e "$d/libstdc++.so" ] && exec {real} "$@"
  done
  exec {real} "$@" -static-libstdc++ -static-libgcc;;
esac
exec {real} "$@"
"""


def _fake_compiler(tmp_path):
    path = tmp_path / "static-only-g++"
    path.write_text(_FAKE.format(real=shutil.which("g++")))
    path.chmod(0o755)
    return str(path)


def test_link_dir_only_where_the_compiler_lacks_libstdcxx_so(tmp_path):
    assert export._libstdcxx_link_dir(shutil.which("g++")) is None or not os.path.exists(
        subprocess.run(["g++", "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout.strip())
    d = export._libstdcxx_link_dir(_fake_compiler(tmp_path))
    link = os.path.join(d, "libstdc++.so")
    assert os.path.realpath(link) == os.path.realpath(export._runtime_libstdcxx()), link
    assert ".so.6" in os.path.realpath(link)


def test_package_links_the_shared_libstdcxx_and_loads(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32)).eval()
    x = torch.randn(4, 32)
    counters["blast"].clear()
    path = export.aoti_package(m, (x,), str(tmp_path / "m.pt2"),
                               inductor_configs={"cpp.cxx": (_fake_compiler(tmp_path),)})
    assert counters["blast"]["aoti_libstdcxx_linked"] == 1
    assert "LIBRARY_PATH" not in os.environ or "blast_libstdcxx_" not in os.environ["LIBRARY_PATH"]
    with torch.no_grad():
        ref = m(x)
    torch.save((x, ref), tmp_path / "io.pt")
    code = ("import sys, torch; r = torch._inductor.aoti_load_package(sys.argv[1]); x, ref = torch.load(sys.argv[2]); "
            "torch.testing.assert_close(r(x), ref); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "io.pt")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]

"""Does an AOTInductor package load here, and which libstdc++ does it carry? No GPU and no blast needed.

On the device image (torch 2.11+cu130, GCC 13.3) every ``aoti_load_package`` segfaulted, a CPU package of one
``Linear`` too, in ``std::regex`` code inside the package's own ``.so`` that belongs to libstdc++ itself
(``codecvt<char16_t>::do_unshift``): libstdc++ linked in statically. This builds a CPU package of a tiny model three
ways -- Inductor's link as it is, with ``-static-libstdc++``, and with ``-L`` at a directory holding a
``libstdc++.so`` link to the runtime library; the first runs Inductor's own compiler (``$CXX``), the others ``g++``
on PATH -- and for each prints the package's ``NEEDED`` libraries, how many
libstdc++ locale symbols it defines itself, and whether it loads in a fresh process (``rc=-11``: the crash)::

    python bench/probes/aoti_libstdcxx.py [N]   # N: the first N variants only; the first also prints g++'s commands

2026-12-07, this repository's CPU machine (torch 2.13, Debian GCC 12, whose ``libstdc++.so`` link exists): the
plain and ``-L`` links need ``libstdc++.so.6``, define 4 locale symbols of their own (inline templates) and load;
the static link defines 558 and fails to load (an error from the runner's constructor). 2026-12-07, the device
image (H100): the first variant then ran ``g++`` on PATH rather than ``$CXX``, linked ``libstdc++.so`` and loaded,
and the environment it printed held ``CXX=/opt/gcc/bin/g++`` -- a GCC with only ``libstdc++.a``: the crash's cause
(``export.aoti_package`` now builds with a compiler that links the shared library).
"""
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

import torch


def sh(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def linker_wrapper(d, name, link_flags, real=None):
    """A compiler Inductor can be pointed at (``cpp.cxx``) that runs ``real`` (default: ``g++`` on PATH), adds
    ``link_flags`` to its shared-object links and logs every command it runs to ``d/<name>.cmds``."""
    real = real or sh("which g++")
    path = os.path.join(d, f"{name}-g++")
    log = os.path.join(d, f"{name}.cmds")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\necho "$@" >> "{log}"\n'
                f'case " $* " in *" -shared "*) exec "{real}" "$@" {link_flags};; *) exec "{real}" "$@";; esac\n')
    os.chmod(path, 0o755)
    return path


def main():
    d = tempfile.mkdtemp()
    print("g++:", sh("which g++"), "|", sh("g++ --version | head -1"))
    print("g++ -print-file-name=libstdc++.so:", sh("g++ -print-file-name=libstdc++.so"), "(a bare name: not found)")
    runtime = sh("ldconfig -p | grep 'libstdc++.so.6 (libc6,x86-64)' | head -1 | sed 's/.*=> //'")
    print("runtime libstdc++:", runtime)
    from torch._inductor.cpp_builder import get_cpp_compiler

    cxx = get_cpp_compiler()  # (what Inductor runs: $CXX if set, else g++)
    print("Inductor's compiler:", cxx, "|", sh(f"{cxx} -print-file-name=libstdc++.so"))
    os.makedirs(os.path.join(d, "lib"))
    os.symlink(runtime, os.path.join(d, "lib", "libstdc++.so"))
    # (the first: Inductor's own compiler and link, traced: ld's -t names every archive member it pulls in)
    variants = {"inductor's link": {"cpp.cxx": (linker_wrapper(d, "plain", f'-Wl,--trace >>"{d}/trace.log"', cxx),)},
                "-static-libstdc++": {"cpp.cxx": (linker_wrapper(d, "static", "-static-libstdc++ -static-libgcc"),)},
                "-L to libstdc++.so": {"cpp.cxx": (linker_wrapper(d, "dyn", f"-L{d}/lib"),)}}
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    ep = torch.export.export(m, (torch.randn(4, 64),))
    only = sys.argv[1:] and int(sys.argv[1])  # (a number: the first that many variants only)
    for i, (name, cfg) in enumerate(list(variants.items())[:only or None]):
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(d, f"p{i}.pt2"),
                                                        inductor_configs=cfg)
        x = os.path.join(d, f"x{i}")
        zipfile.ZipFile(path).extractall(x)
        so = glob.glob(x + "/**/*.so", recursive=True)[0]
        needed = " ".join(sh(f"readelf -d {so} | grep NEEDED").split()[4::5])
        own = sh(f"nm -D --defined-only {so} | grep -c -E 'locale|codecvt'")
        code = f"import torch; r = torch._inductor.aoti_load_package({path!r}); print(r(torch.randn(4, 64)).shape)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        print(f"{name:20s} NEEDED {needed} | own locale symbols {own} | load rc={r.returncode}"
              + ("" if r.returncode in (0, -11) else f" ({r.stderr.strip().splitlines()[-1][-160:]})"), flush=True)
        if i == 0:  # what Inductor ran: a static libstdc++ or a foreign object would show here
            for c in open(os.path.join(d, "plain.cmds")).read().splitlines():
                print("  cmd:", c if " -shared " in f" {c} " else c[:160] + " ...")
            links = [c for c in open(os.path.join(d, "plain.cmds")).read().splitlines() if " -shared " in f" {c} "]
            for a in links[-1].split() if links else []:
                if a.startswith("-L"):
                    print(f"  {a}: holds", sh(f"ls {a[2:]} | grep -E 'libstdc|libgcc' | tr '\\n' ' '") or "no libstdc++/libgcc")
            print("  ld pulled in:", sh(f"grep -E 'stdc' {d}/trace.log | sort | uniq | head -8 | tr '\\n' ' '"))
            print("  own codecvt/locale definitions:", sh(f"nm -D --defined-only {so} | grep -E 'codecvt|locale' | head -5"))
            print("  env:", {k: v for k, v in os.environ.items() if "FLAGS" in k or k in ("CXX", "CC", "LIBRARY_PATH")})


if __name__ == "__main__":
    main()

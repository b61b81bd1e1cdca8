"""A known fault of the toolchain under Triton, and what the generated kernels do about it.

ptxas 12.8 -- the one Triton 3.6 bundles -- miscompiles some Hopper (sm_90) wgmma dots whose B operand is
transposed in shared memory (``.tnspB``): it builds their B descriptors from a uniform register it never wrote, so
the dot reads the wrong tile (a silently wrong gradient) or outside shared memory ("illegal memory access"). Found
in backward kernel 1's dh loop and in the dX ``bsmm`` (fp16, 32x128 blocks); the same PTX through ptxas 12.9 is
right, and on an H100 the GPU test of that case fails with 12.8 and passes with 12.9
(``bench/probes/issue27_ptxas/REPORT.md``). With such a ptxas the kernels compute those dots transposed
(``Signature.tnsp_fix``: the template's ``DH_T`` and ``bsmm``'s ``TR``; same products, same order, no ``.tnspB``;
an ``mma.sync`` instead of a wgmma below 64 rows per block), and one warning says how to use a fixed ptxas.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Optional, Tuple

log = logging.getLogger("blast_compile.codegen")

FIXED_IN = (12, 9)


def ptxas_version() -> Optional[Tuple[int, int]]:
    """(major, minor) of the ptxas Triton compiles sm_90 kernels with (``TRITON_PTXAS_PATH`` or its own); None
    when there is none to ask (no Triton NVIDIA backend)."""
    try:
        from triton import knobs

        tool = knobs.nvidia.ptxas
        return tuple(int(v) for v in tool.version.split(".")[:2])
    except Exception:  # noqa: BLE001 -- older Triton, no CUDA backend, or no ptxas: nothing to work around
        return None


@functools.lru_cache(maxsize=None)
def tnsp_fix_needed() -> bool:
    """Whether the kernels must avoid transposed-B wgmma dots: a Hopper GPU and a ptxas older than 12.9. Warns once
    when so (the fix covers the dots known to fail; a fixed ptxas covers the rest)."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability()[0] != 9:
        return False
    v = ptxas_version()
    if v is None or v >= FIXED_IN:
        return False
    msg = (f"blast: Triton compiles with ptxas {v[0]}.{v[1]}, which miscompiles some Hopper wgmma dots (wrong results "
           "or illegal memory accesses; blast's kernels avoid the ones known to fail). Point TRITON_PTXAS_PATH at a "
           "ptxas >= 12.9 (e.g. a CUDA 12.9+ or 13 toolkit's bin/ptxas) to compile with a fixed one.")
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return True

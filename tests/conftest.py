import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def _fresh_counters(request):
    """Fresh blast counters per test. A GPU test also fails where the backend fell back after an internal error
    (the fallback's answers are right, so without this a lowering that never compiled -- split-K's scratch address
    on torch 2.11, once -- passed every GPU test), or where torch could not analyse what a kernel writes (it then
    clones every input per call: right, slow; torch 2.11 traces int arguments as Python ints). A test that means to
    fall back says so: ``@pytest.mark.allow_fallback``."""
    from torch._dynamo.utils import counters

    counters.clear()
    check = "gpu" in request.keywords and "allow_fallback" not in request.keywords and torch.cuda.is_available()
    rec = _Records()
    wrap_log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    if check:
        wrap_log.addHandler(rec)
    try:
        yield
    finally:
        wrap_log.removeHandler(rec)
    if check:
        assert counters["blast"]["fallback"] == 0, "the backend fell back after an internal error (see its warning)"
        assert not [m for m in rec.messages if "identify_mutated_tensors" in m], rec.messages[:1]


def tol(dtype):
    """assert_close tolerances for a dtype (outputs of a few chained matmuls)."""
    return {
        torch.float64: dict(rtol=1e-7, atol=1e-7),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    }[dtype]


def skip_if_old_interpreter():
    """Triton 3.6's interpreter cannot run a ``range`` whose bounds come from ``tl.program_id`` (a one-element array
    there, not a scalar: "only 0-dimensional arrays can be converted to Python scalars"), which the kernels' NaN/Inf
    row scans use; 3.7 fixed it. The compiled kernels are not affected (the GPU tests run on 3.6)."""
    import triton

    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run range(tl.program_id(...), ...)")


def force_decode(monkeypatch, path, **configs):
    """Decode path ``path`` with exactly the given ``ops.configs`` values (e.g. ``DECODE_GEMV_CONFIGS=[cfg]``,
    ``GEMV_MAX_M=0``): no tuning, no persisted choice, so the first config of each list is the one launched."""
    from blast_compile import codegen
    from blast_compile.ops import configs as C

    monkeypatch.setattr(C, "DECODE_PATH", path)
    monkeypatch.setenv("BLAST_TUNE", "0")
    monkeypatch.setattr(codegen, "lookup_config", lambda key: None)
    for name, value in configs.items():
        monkeypatch.setattr(C, name, value)


def force_split_y(monkeypatch, cfg):
    """The sliced decode with ``bsmm`` splitting each row slice's reduction (``cfg``: a ``Slice`` tuple with
    split > 1)."""
    from blast_compile.ops import configs as C

    force_decode(monkeypatch, "sliced", DECODE_SLICE_CONFIGS=[C.Slice(*cfg)])


def force_splitk(monkeypatch, **configs):
    """Split-K decode with exactly the given launch config lists (``force_decode``)."""
    force_decode(monkeypatch, "splitk", **configs)

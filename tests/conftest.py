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


@pytest.fixture(autouse=True)
def _fresh_counters():
    from torch._dynamo.utils import counters

    counters.clear()
    yield


def tol(dtype):
    """assert_close tolerances for a dtype (outputs of a few chained matmuls)."""
    return {
        torch.float64: dict(rtol=1e-7, atol=1e-7),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    }[dtype]


def force_splitk(monkeypatch, **configs):
    """Split-K decode with exactly the given launch config lists (e.g. ``DECODE_GEMV_CONFIGS=[cfg]``,
    ``GEMV_MAX_M=0``): no tuning, no persisted choice, so the first config is the one launched."""
    from blast_compile import codegen
    from blast_compile.ops import configs as C

    monkeypatch.setattr(C, "DECODE_PATH", "splitk")
    monkeypatch.setenv("BLAST_TUNE", "0")
    monkeypatch.setattr(codegen, "lookup_config", lambda key: None)
    for name, value in configs.items():
        monkeypatch.setattr(C, name, value)

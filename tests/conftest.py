"""Test setup: Triton kernels run under the interpreter on CPU (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's recompile limit (8) is per code object and shared by every test compiling the same
    model class: start each test from empty caches."""
    torch._dynamo.reset()
    yield

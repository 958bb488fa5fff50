"""Test setup: Triton kernels run under the interpreter on CPU (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# "ci" (the default): few examples, derandomized, so CI on 2 cores is fast and repeatable.
# "thorough": 10x the examples, freshly random each run (`python -m pytest --hypothesis-profile=thorough`,
# about an hour on 2 cores). Tests that set their own max_examples scale it by `hypothesis_budget.examples`.
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=100,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
if settings.get_current_profile_name() == "default":  # --hypothesis-profile not given
    settings.load_profile("ci")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's recompile limit (8) is per code object and shared by every test compiling the same
    model class: start each test from empty caches."""
    torch._dynamo.reset()
    yield

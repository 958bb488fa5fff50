"""How many examples a test that sets its own `max_examples` draws under the loaded Hypothesis profile."""

from hypothesis import settings

CI_EXAMPLES = 10  # the "ci" profile's max_examples (tests/conftest.py)


def examples(n: int) -> int:
    """`n` under the "ci" profile, scaled by the loaded profile's max_examples / CI's (10x for "thorough")."""
    return max(1, n * settings.default.max_examples // CI_EXAMPLES)

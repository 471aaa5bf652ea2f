"""Fixtures shared by the unit tests: the tiny digits models (:mod:`tests.unit.digits_fixtures`)."""

from tests.unit.digits_fixtures import digits, tiny_models  # noqa: F401  (fixtures)

"""Shared pytest fixtures live in one module per area, each owned by that area's tests."""

pytest_plugins = [
    "tests.fixtures_zoo",
    "tests.fixtures_models",
    "tests.fixtures_db",
    "tests.fixtures_ray",
]

"""Every test in tests/distributed is `slow` (see pytest.ini): it launches several processes, or shares a module with
tests that do."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    for item in items:  # a conftest's hook sees the whole session's items: mark this folder's only
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)

"""Every test in tests/tools is `slow` (see pytest.ini): the tools run end to end, most in fresh interpreters."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    for item in items:  # a conftest's hook sees the whole session's items: mark this folder's only
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)

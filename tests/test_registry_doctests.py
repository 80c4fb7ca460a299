"""The registry modules' docstring examples run as written."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "service.registry.auth",
    "service.registry.blobs",
    "service.registry.errors",
    "service.registry.handlers",
    "service.registry.schema",
    "service.registry.storage",
    "service.registry.validation",
    "mnemosyne_core.checkpoint_format",
    "mnemosyne_core.loading",
    "mnemosyne_registry",
    "mnemosyne_registry.errors",
    "mnemosyne_registry.hotswap",
    "mnemosyne_registry.uri",
    "mnemosyne_registry.wire",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable examples"
    assert result.failed == 0

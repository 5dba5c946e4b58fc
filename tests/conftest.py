"""Shared test set-up: quiet TensorFlow, seeded data, a `tf` marker that skips."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

HAS_TF = importlib.util.find_spec("tensorflow") is not None


def pytest_collection_modifyitems(config, items):
    if HAS_TF:
        return
    skip = pytest.mark.skip(reason="TensorFlow is not installed")
    for item in items:
        if "tf" in item.keywords:
            item.add_marker(skip)

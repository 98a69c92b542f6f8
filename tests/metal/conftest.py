"""Fixtures of the Metal CPU-harness tests: the harness library (built once per session), its executor and
calibra._metal.Backend running on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from calibra import _metal
from tests.metal.harness_exec import HarnessExecutor, build


@pytest.fixture(scope="session")
def harness_lib():
    # tools/metal_harness_sanitizers.sh points these at a sanitizer build
    build_dir = os.environ.get("CALIBRA_METAL_HARNESS_BUILD")
    sanitize = os.environ.get("CALIBRA_METAL_SANITIZE", "")
    # A build failure (a .metal compile error, no cmake or C++ compiler) is an error of every test here, not
    # a skip: these tests are the Metal kernels' only check off a Mac. CALIBRA_SKIP_METAL_HARNESS=1 opts out
    # explicitly (CI's required-test list still fails on that skip).
    if os.environ.get("CALIBRA_SKIP_METAL_HARNESS") == "1":
        pytest.skip("CALIBRA_SKIP_METAL_HARNESS=1: the Metal CPU harness was deselected")
    try:
        return build(Path(build_dir), sanitize) if build_dir else build()
    except RuntimeError as e:
        pytest.fail(f"cannot build the Metal CPU harness: {e}", pytrace=False)


@pytest.fixture(scope="session")
def executor(harness_lib):
    return HarnessExecutor(harness_lib)


@pytest.fixture(scope="session")
def metal(executor):
    return _metal.Backend(executor)

"""Shared test fixtures: locations of the real models and text shipped beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HIGGS_JAX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop jax's compiled executables and traces after each test module.

    The whole suite runs in one process, and without this the compiled code of ~1700 tests
    (many interpret-mode Pallas kernels, whose programs are large) stays alive to the end. A
    full run on the 2-core CI-like machine aborted inside XLA's CPU compiler near its end
    (session 9; that test passes alone; the cause was not established). With this fixture the
    next full run passed, its process peaking at 5.0 GB resident.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()

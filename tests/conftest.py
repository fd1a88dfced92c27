"""Fixtures shared by the test files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def single_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block, the previous count restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: small tensors only pay for the thread pool (and thrash on a busy machine)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module; opt in with ``pytestmark = pytest.mark.usefixtures("one_thread_module")``."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def qm9_root(tmp_path_factory):
    """A fresh QM9 cache folder per test module (processed from the installed qm9pack on first use)."""
    return str(tmp_path_factory.mktemp("qm9_cache"))

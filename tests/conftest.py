"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tensors: one intra-op thread is faster, and much faster on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _threads_restored():
    """Every test leaves torch's thread count as it found it: `nograd train --threads N` run in the
    test process sets it, and a later test comparing with a fresh process would see the change."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)

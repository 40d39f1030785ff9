"""Fixtures for every test: a fixed seed, fresh one-time notices, kernels switched on."""

import pytest
import torch

import fastpeft
from fastpeft import _notice


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    _notice.reset_notices()
    fastpeft.set_kernels_enabled(True)
    yield
    fastpeft.set_kernels_enabled(True)

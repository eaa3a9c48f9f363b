import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny UNets run faster on one thread: with two, synchronisation dominates (and stalls on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

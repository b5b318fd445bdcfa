"""Fixtures shared by the tests that run tiny trainings and demos on the CPU."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: these runs are tiny, and faster without threads on a shared machine.
    Autouse in every test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_default_attention():
    # Several agents share two cores; and every test starts with automatic attention selection.
    torch.set_num_threads(1)
    from nanopipe.model import attention
    attention.set_impl(None)
    yield
    attention.set_impl(None)

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one CPU thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    kernels gain nothing from threads, and OpenMP threads spinning on a busy shared 2-core machine make them
    many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

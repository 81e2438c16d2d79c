"""Shared test configuration: `cuda`-marked tests skip on machines without a CUDA GPU;
fixtures the training-side test modules share."""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the CI's two cores are shared, and two spinning OpenMP threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """The built-in dataset in the session's temporary cache (shared by the modules that
    use it), never the user's cache."""
    old = os.environ.get("PDML_CACHE_DIR")
    os.environ["PDML_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "pdml-cache")
    yield
    if old is None:
        os.environ.pop("PDML_CACHE_DIR", None)
    else:
        os.environ["PDML_CACHE_DIR"] = old

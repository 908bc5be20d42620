"""Shared test setup: the Triton interpreter switch, seeds and tolerances.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, so it is set
here, before the tests import snclr. On a CUDA machine the kernels run compiled instead.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Folder scans of the whole test run (module fixtures too) are cached in a fresh folder,
# never in the user's cache; each test gets its own (_scan_cache below).
os.environ["SNCLR_CACHE_DIR"] = tempfile.mkdtemp(prefix="snclr-scan-cache-")

import pytest  # noqa: E402

# Tolerances (atol, rtol) per dtype for comparisons of a fast path against its reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}



def requires_cuda(test):
    """Mark a test GPU-only: selected by ``-m gpu``, skipped where CUDA is absent."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


@pytest.fixture(autouse=True)
def _kernel_tests_on_the_gpu(request):
    """On a CUDA machine the kernel tests run compiled: their tensors default to CUDA.

    Without a GPU they run on CPU tensors under the Triton interpreter (set above).
    """
    module = request.module.__name__.split(".")[-1]
    if torch.cuda.is_available() and module.startswith("test_kernels"):
        with torch.device("cuda"):
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _scan_cache(tmp_path_factory, monkeypatch):
    """Folder scans are cached in a fresh folder per test, never in the user's cache."""
    monkeypatch.setenv("SNCLR_CACHE_DIR", str(tmp_path_factory.mktemp("scan-cache")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

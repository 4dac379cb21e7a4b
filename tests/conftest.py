import os

# Triton kernels run on the CPU through the interpreter in tests; set before triton is imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU_TESTS"):
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on a shared 2-core CPU: intra-op threads spin-wait against other processes and make
# small matmuls ~100x slower; one thread is fastest for test-sized tensors.
if not torch.cuda.is_available():
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

import os

import torch

# Without a GPU, Triton kernels run on the CPU through the interpreter; this must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tiny models on a shared 2-core CPU: intra-op threads spin-wait against other processes and
    # make small matmuls ~100x slower; one thread is fastest for test-sized tensors.
    torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

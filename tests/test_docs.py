"""The code in docs/ runs as written: each page's ```python blocks execute in order."""

import re
from pathlib import Path

import pytest

from fluxcore.attention import _REGISTRY

DOCS = Path(__file__).resolve().parent.parent / "docs"
# Pages whose examples need no weights on disk (pipeline.md and weights.md point at real model folders).
RUNNABLE = [
    "swapping.md", "transforms.md", "text_and_autoencoder.md", "kernels.md", "samplers.md", "lora.md", "control.md",
    "memory.md", "speed.md",
]  # fmt: skip


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("page", RUNNABLE)
def test_doc_examples_run(page):
    blocks = python_blocks(DOCS / page)
    assert blocks, f"{page} has no python examples"
    before = set(_REGISTRY)
    namespace: dict = {}
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{page}[block {i}]", "exec"), namespace)
    finally:
        for name in set(_REGISTRY) - before:
            _REGISTRY.pop(name)

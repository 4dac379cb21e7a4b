"""Helpers shared by the format modules."""

from __future__ import annotations

from fluxcore.lora.patch import LoraError


class Problems:
    """Collects every key a format could not place, so the error lists them all at once."""

    def __init__(self, fmt: str):
        self.fmt, self.items = fmt, []

    def add(self, key: str, why: str) -> None:
        self.items.append(f"{key!r}: {why}")

    def raise_if_any(self) -> None:
        if self.items:
            shown = "\n  ".join(self.items[:40])
            more = f"\n  ... and {len(self.items) - 40} more" if len(self.items) > 40 else ""
            raise LoraError(
                f"{self.fmt} LoRA: {len(self.items)} key(s) match nothing in the model:\n  {shown}{more}"
            )


def strip_prefix(key: str, prefixes) -> tuple[str, str] | None:
    for p in prefixes:
        if key.startswith(p):
            return p, key[len(p) :]
    return None

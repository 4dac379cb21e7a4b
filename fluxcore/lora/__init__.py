"""LoRA adapters for FLUX transformers and their text encoders, as transforms on a built model.

    name = fluxcore.lora.load_lora(model, "style.safetensors", weight=0.8)
    fluxcore.lora.set_adapters(model, [name, other], [0.8, 0.5])
    fluxcore.lora.fuse_lora(model); fluxcore.lora.unfuse_lora(model); fluxcore.lora.unload_lora(model)
    fluxcore.lora.save_lora(model, "out.safetensors", adapter_name=name, format="peft")  # or "kohya"

Formats are detected from the keys (docs/lora.md). Nothing here imports diffusers or peft.
"""

from fluxcore.lora.core import (
    LoadedAdapter,
    disable_lora,
    enable_lora,
    fuse_lora,
    get_active_adapters,
    list_adapters,
    load_lora,
    load_lora_components,
    prepare_hotswap,
    set_adapters,
    unfuse_lora,
    unload_lora,
)
from fluxcore.lora.detect import describe_lora, detect_format, plan_lora, read_lora
from fluxcore.lora.layer import LoraLinear
from fluxcore.lora.patch import LoraError, Patch
from fluxcore.lora.save import lora_state_dict, save_lora

__all__ = [
    "LoadedAdapter",
    "LoraError",
    "LoraLinear",
    "Patch",
    "describe_lora",
    "detect_format",
    "disable_lora",
    "enable_lora",
    "fuse_lora",
    "get_active_adapters",
    "list_adapters",
    "load_lora",
    "load_lora_components",
    "lora_state_dict",
    "plan_lora",
    "prepare_hotswap",
    "read_lora",
    "save_lora",
    "set_adapters",
    "unfuse_lora",
    "unload_lora",
]

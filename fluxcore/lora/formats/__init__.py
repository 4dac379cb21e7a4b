"""One module per LoRA file layout. Each turns a file's keys into `Patch`es and nothing else:

    NAME                          the format's name in messages and `describe_lora`
    claims(key) -> bool           the key belongs to this layout
    strong(key) -> bool           the key belongs to this layout only (decides detection)
    convert(sd, metadata, targets) -> list[Patch]

`FORMATS` is the detection order (see docs/lora.md, "Detection").
"""

from fluxcore.lora.formats import bfl, comfy, kohya, lycoris, onetrainer, peft, xlabs

FORMATS = (xlabs, peft, kohya, onetrainer, lycoris, comfy, bfl)

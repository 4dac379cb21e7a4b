"""Build FLUX.1-dev at full size on the meta device, then run a CPU-sized model with the same structure."""

import time

import torch

from fluxcore import PRESETS, Flux

start = time.perf_counter()
with torch.device("meta"):
    dev = Flux(PRESETS["flux-dev"])
n = sum(p.numel() for p in dev.parameters())
print(
    f"flux-dev on meta: {n:,} parameters, {len(dev.state_dict())} checkpoint keys, "
    f"built in {time.perf_counter() - start:.2f} s"
)

torch.manual_seed(0)
model = Flux(PRESETS["tiny-dev"]).eval()
B, h, w, L_txt = 1, 4, 4, 8
rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(1, h * w, 3).float()
with torch.no_grad():
    v = model(
        img=torch.randn(B, h * w, 64),
        img_ids=img_ids,
        txt=torch.randn(B, L_txt, 48),
        txt_ids=torch.zeros(B, L_txt, 3),
        timesteps=torch.tensor([1.0]),
        y=torch.randn(B, 32),
        guidance=torch.tensor([3.5]),
    )
print(f"tiny-dev forward: velocity {tuple(v.shape)}, mean |v| = {v.abs().mean():.4f}")

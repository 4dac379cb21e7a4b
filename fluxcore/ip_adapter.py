"""The XLabs FLUX IP-Adapter (XLabs-AI/flux-ip-adapter, flux-ip-adapter-v2): an image prompt
through CLIP ViT-L/14, attended to by the image stream of every double block.

    image ─ clip_preprocess ─ CLIPVisionEncoder ─ image_embeds [B, 768]
      ─ ip_adapter_proj_model: proj (768 → N·4096), reshape [B, N, 4096], LayerNorm ─ tokens (N = 4)
    double block i:  img ← block(img, ...) + scale · attention(q, k_ip, v_ip)
      q     the block's own image queries after QK-norm, before RoPE   [B, H, L_img, Dh]
      k_ip  double_blocks.i.processor.ip_adapter_double_stream_k_proj(tokens), no norm, no RoPE
      v_ip  double_blocks.i.processor.ip_adapter_double_stream_v_proj(tokens)

The IP attention is added after the block's MLP residual, ungated. Applying it is a transform:
`load_ip_adapter(flux, path, image_encoder)` wraps every exact DoubleStreamBlock in an
`IPAdapterBlock` (state-dict keys unchanged) and returns a handle with `scale`, `set_image`,
`tokens` and `remove()`. The queries are read from the block's `img_attn.norm` step with a forward
hook that exists only while the wrapped block runs, so the fused-kernel transform may replace that
step before or after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn

from fluxcore.attention import attention
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.layers import DoubleStreamBlock
from fluxcore.transforms import KeyPreservingWrapper, exact_modules


class IPAdapterProjection(nn.Module):
    """image_embeds [B, clip_dim] → tokens [B, num_tokens, txt_dim] (Linear, reshape, LayerNorm)."""

    def __init__(self, clip_dim: int = 768, txt_dim: int = 4096, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(clip_dim, num_tokens * txt_dim)
        self.norm = nn.LayerNorm(txt_dim)

    def forward(self, image_embeds: Tensor) -> Tensor:
        x = self.proj(image_embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(x.shape[0], self.num_tokens, -1))


class IPAdapterKV(nn.Module):
    """One double block's IP key/value projections (txt_dim → hidden_size)."""

    def __init__(self, txt_dim: int, hidden: int):
        super().__init__()
        self.ip_adapter_double_stream_k_proj = nn.Linear(txt_dim, hidden)
        self.ip_adapter_double_stream_v_proj = nn.Linear(txt_dim, hidden)


class _BlockSlot(nn.Module):
    def __init__(self, txt_dim: int, hidden: int):
        super().__init__()
        self.processor = IPAdapterKV(txt_dim, hidden)


class IPAdapter(nn.Module):
    """The weights of one XLabs IP-Adapter file, under its own key names:
    ip_adapter_proj_model.{proj,norm}.*, double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*"""

    def __init__(
        self, depth: int, hidden: int, txt_dim: int = 4096, clip_dim: int = 768, num_tokens: int = 4
    ):
        super().__init__()
        self.ip_adapter_proj_model = IPAdapterProjection(clip_dim, txt_dim, num_tokens)
        self.double_blocks = nn.ModuleList(_BlockSlot(txt_dim, hidden) for _ in range(depth))

    @property
    def dtype(self) -> torch.dtype:
        return self.ip_adapter_proj_model.proj.weight.dtype


@dataclass
class _IPState:
    tokens: Tensor | None = None  # [B or 1, N, txt_dim]
    scale: float = 1.0


class IPAdapterBlock(KeyPreservingWrapper):
    """A double block plus its IP attention: (img, txt) → (img + scale · ip_attn, txt)."""

    def __init__(self, block: nn.Module, kv: IPAdapterKV, state: _IPState):
        super().__init__()
        self.block = block
        self._kv = [kv]  # not a child: the adapter's weights stay out of the base model's state dict
        self._state = state

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        state = self._state
        if state.tokens is None:
            raise ConfigError(
                "an IP-Adapter is attached but no image was given: pass ip_adapter_image= "
                "(handle.set_image / IPAdapterDenoiser), or remove the adapter"
            )
        queries: list[Tensor] = []

        def capture(module, args, out):
            q, _, v = args[0], args[1], args[2]
            queries.append(module.query_norm(q).to(v.dtype))

        hook = self.block.img_attn.norm.register_forward_hook(capture)
        try:
            img, txt = self.block(img=img, txt=txt, vec=vec, pe=pe)
        finally:
            hook.remove()
        if state.scale == 0:
            return img, txt
        q = queries[-1]
        kv = self._kv[0]
        tokens = state.tokens.to(device=q.device, dtype=kv.ip_adapter_double_stream_k_proj.weight.dtype)
        if tokens.shape[0] != q.shape[0]:
            tokens = tokens.expand(q.shape[0], -1, -1)
        k = rearrange(kv.ip_adapter_double_stream_k_proj(tokens), "B N (H D) -> B H N D", H=q.shape[1])
        v = rearrange(kv.ip_adapter_double_stream_v_proj(tokens), "B N (H D) -> B H N D", H=q.shape[1])
        ip = attention(q, k.to(q.dtype), v.to(q.dtype))
        return img + state.scale * ip.to(img.dtype), txt


@dataclass
class IPAdapterHandle:
    """What `load_ip_adapter` did. `scale` (set_ip_adapter_scale), `set_image(image)` /
    `set_tokens(tokens)` for the next evaluations, `tokens_for(image)`, `remove()`."""

    model: nn.Module
    adapter: IPAdapter
    image_encoder: nn.Module | None
    paths: list[str]
    _state: _IPState = field(default_factory=_IPState, repr=False)

    @property
    def scale(self) -> float:
        return self._state.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._state.scale = float(value)

    def tokens_for(self, image=None, *, image_embeds: Tensor | None = None) -> Tensor:
        """IP tokens [B, N, txt_dim] of PIL image(s) / a tensor in [-1, 1] (through the CLIP image
        encoder) or of CLIP image_embeds [B, clip_dim] given directly; image_embeds of zeros give
        the "no image" tokens XLabs uses for the negative prompt."""
        if image_embeds is None:
            if image is None:
                raise ConfigError("the IP-Adapter needs an image (ip_adapter_image=) or image_embeds")
            if self.image_encoder is None:
                raise ConfigError(
                    "this IP-Adapter was loaded without image_encoder=: pass image_embeds instead"
                )
            with torch.no_grad():
                image_embeds = self.image_encoder.encode_images(image)
        proj = self.adapter.ip_adapter_proj_model
        with torch.no_grad():
            return proj(image_embeds.to(proj.proj.weight.device))

    def negative_tokens(self, batch: int = 1) -> Tensor:
        """Tokens of all-zero image embeds (XLabs' negative image prompt for true CFG)."""
        clip_dim = self.adapter.ip_adapter_proj_model.proj.in_features
        w = self.adapter.ip_adapter_proj_model.proj.weight
        return self.tokens_for(image_embeds=torch.zeros(batch, clip_dim, device=w.device, dtype=w.dtype))

    def set_image(self, image) -> None:
        self._state.tokens = None if image is None else self.tokens_for(image)

    def set_tokens(self, tokens: Tensor | None) -> None:
        self._state.tokens = tokens

    @contextmanager
    def using(self, tokens: Tensor) -> Iterator[None]:
        old, self._state.tokens = self._state.tokens, tokens
        try:
            yield
        finally:
            self._state.tokens = old

    def remove(self) -> list[str]:
        restored = []
        for i, m in enumerate(self.model.double_blocks):
            if type(m) is IPAdapterBlock and m._state is self._state:
                self.model.double_blocks[i] = m.block
                restored.append(f"double_blocks.{i}")
        return restored


def attach_ip_adapter(model: nn.Module, adapter: IPAdapter, image_encoder: nn.Module | None = None,
                      *, scale: float = 1.0) -> IPAdapterHandle:  # fmt: skip
    """Wrap each exact DoubleStreamBlock of `model` (double_blocks.i gets the adapter's i-th
    projections). ConfigError when the adapter's width or block count does not fit the model, or
    when some double block is not an exact DoubleStreamBlock (already wrapped or user-swapped)."""
    blocks = [p for p, _ in exact_modules(model.double_blocks, DoubleStreamBlock)]
    n = len(model.double_blocks)
    if len(adapter.double_blocks) != n:
        raise ConfigError(f"the IP-Adapter has {len(adapter.double_blocks)} double blocks; the model has {n}")
    if len(blocks) != n or blocks != [str(i) for i in range(n)]:
        raise ConfigError(
            f"IP-Adapter needs every double block to be a plain DoubleStreamBlock; found "
            f"{[type(m).__name__ for m in model.double_blocks][:4]} (attach it before ControlNets, or remove other wrappers)"
        )
    kv0 = adapter.double_blocks[0].processor.ip_adapter_double_stream_k_proj
    if kv0.out_features != model.config.hidden_size:
        raise ConfigError(
            f"the IP-Adapter projects to width {kv0.out_features}; the model's hidden_size is {model.config.hidden_size}"
        )
    handle = IPAdapterHandle(model, adapter, image_encoder, [], _IPState(scale=float(scale)))
    for i, block in enumerate(model.double_blocks):
        model.double_blocks[i] = IPAdapterBlock(block, adapter.double_blocks[i].processor, handle._state)
        handle.paths.append(f"double_blocks.{i}")
    return handle


def read_ip_adapter(path, *, device=None, dtype: torch.dtype | None = None) -> IPAdapter:
    """An IPAdapter from an XLabs file (ip_adapter.safetensors); sizes from the tensor shapes."""
    from fluxcore.weights.io import load_into, open_checkpoint

    try:
        ckpt = open_checkpoint(path)
    except WeightsError as e:
        raise type(e)(f"cannot read IP-Adapter weights: {e}") from None
    with ckpt:
        keys = ckpt.keys()
        if "ip_adapter_proj_model.proj.weight" not in keys:
            raise WeightsError(
                f"{ckpt.source}: not an XLabs FLUX IP-Adapter (no ip_adapter_proj_model.proj.weight); first keys: {keys[:3]}"
            )
        rows, clip_dim = ckpt.shape("ip_adapter_proj_model.proj.weight")
        txt_dim = (
            ckpt.shape("ip_adapter_proj_model.norm.weight")[0]
            if "ip_adapter_proj_model.norm.weight" in keys
            else 4096
        )
        depth = len({k.split(".")[1] for k in keys if k.startswith("double_blocks.")})
        hidden = (
            ckpt.shape("double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight")[0] if depth else 0
        )
        if rows % txt_dim:
            raise WeightsError(
                f"{ckpt.source}: proj has {rows} rows, not a multiple of the token width {txt_dim}"
            )
        with torch.device("meta"):
            adapter = IPAdapter(depth, hidden, txt_dim, clip_dim, rows // txt_dim)
        load_into(adapter, ckpt.stream(), source=ckpt.source, device=device, dtype=dtype, copy=False)
    adapter.eval().requires_grad_(False)
    return adapter


def load_ip_adapter(model: nn.Module, path, image_encoder=None, *, scale: float = 1.0,
                    device=None, dtype: torch.dtype | None = None) -> IPAdapterHandle:  # fmt: skip
    """Read an XLabs IP-Adapter file and attach it to `model` (a transform; `handle.remove()`).

    image_encoder: a CLIPVisionEncoder, or a path for `load_clip_vision` (an `image_encoder/`
    folder, e.g. openai/clip-vit-large-patch14), or None (then give image_embeds / tokens).
    device, dtype: default the model's."""
    from fluxcore.vision import load_clip_vision

    device = model.img_in.weight.device if device is None else device
    dtype = model.img_in.weight.dtype if dtype is None else dtype
    adapter = read_ip_adapter(path, device=device, dtype=dtype)
    if image_encoder is not None and not isinstance(image_encoder, nn.Module):
        image_encoder = load_clip_vision(image_encoder, device=device, dtype=dtype)
    if image_encoder is not None:
        clip_dim = adapter.ip_adapter_proj_model.proj.in_features
        if image_encoder.config.projection_dim != clip_dim:
            raise ConfigError(
                f"the image encoder gives {image_encoder.config.projection_dim}-d embeds; the IP-Adapter takes {clip_dim}"
            )
    return attach_ip_adapter(model, adapter, image_encoder, scale=scale)


class IPAdapterDenoiser:
    """A sampler denoiser whose evaluations use the IP tokens passed in its extra_args as
    `ip_tokens` (so CFGDenoiser's `negative` can carry other tokens for the negative prompt)."""

    def __init__(self, denoiser, handle: IPAdapterHandle):
        self.denoiser, self.handle = denoiser, handle

    def velocity(self, x: Tensor, sigma, *, ip_tokens: Tensor, **cond) -> Tensor:
        from fluxcore.sampling import velocity

        with self.handle.using(ip_tokens):
            return velocity(self.denoiser, x, sigma, **cond)

    def __call__(self, x: Tensor, sigma, *, ip_tokens: Tensor, **cond) -> Tensor:
        with self.handle.using(ip_tokens):
            return self.denoiser(x, sigma, **cond)

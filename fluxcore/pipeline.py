"""FluxPipeline: prompt → image, with the call keywords of diffusers' FluxPipeline.

    pipe = FluxPipeline.from_pretrained("FLUX.1-schnell", torch_dtype=torch.bfloat16, device="cuda")
    image = pipe("a cat on mars", num_inference_steps=4, generator=0).images[0]

One call runs the reference's recipe: encode the prompt (T5 tokens + CLIP pooled vector), draw the
reference's noise for the seed (`get_noise`), build the shifted schedule (unshifted for schnell),
run a sampler (`fluxcore.sampling`, Euler by default = the reference's denoise loop), unpack and
decode with the autoencoder. Conditioning modes follow the model: Fill (384 input channels) takes
`image` + `mask_image`, Canny/Depth (128) take `control_image`, Kontext takes `image` as the
reference, other models take `image` for img2img (`strength`); Redux image embeddings go in
`image_embeds` after `load_redux`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore.conditioning import (
    append_redux,
    control_condition,
    fill_condition,
    fill_masked_image,
    img2img_start,
    kontext_resolution,
    kontext_tokens,
    load_redux,
)
from fluxcore.errors import ConfigError, FluxcoreError, WeightsError
from fluxcore.latents import get_noise, make_img_ids, pack, unpack
from fluxcore.sampling import CFGDenoiser, FlowDenoiser, get_sampler, get_schedule, nan_guard

MAX_SIDE = 8192  # FLUX is trained up to ~2 MP; a side above this is a typo, not a request
_PARTS = {
    "text_encoder": "CLIP text encoder folder text_encoder/ (config.json + model.safetensors)",
    "text_encoder_2": "T5 encoder folder text_encoder_2/ (config.json + weights)",
    "tokenizer": "CLIP tokenizer folder tokenizer/ (vocab.json + merges.txt)",
    "tokenizer_2": "T5 tokenizer folder tokenizer_2/ (tokenizer.json or spiece.model)",
}


@dataclass
class FluxPipelineOutput:
    """images: list of PIL images (output_type "pil"), or an array/tensor for "np"/"pt"/"latent".
    seeds: the seeds used: [seed] when one seed drew the whole batch, one per image when a list was
    given, None when torch.Generators were given. info: size, steps and the flow-time schedule."""

    images: object
    seeds: list[int] | None = None
    info: dict = field(default_factory=dict)


def _missing_parts(root: Path) -> list[str]:
    missing = [f"{name}/: {what}" for name, what in _PARTS.items() if not (root / name).is_dir()]
    if not (root / "ae.safetensors").is_file() and not (root / "vae").is_dir():
        missing.append("autoencoder: ae.safetensors (BFL) or vae/ (diffusers)")
    if not (root / "transformer").is_dir() and not list(root.glob("*.safetensors")):
        missing.append("transformer: transformer/ (diffusers) or flux1-*.safetensors (BFL)")
    return missing


def _default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32


def _to_rgb_tensor(image, width: int, height: int, what: str) -> Tensor:
    """PIL image or tensor [3, H, W] / [B, 3, H, W] in [−1, 1] → float32 [B, 3, height, width] in
    [−1, 1]. PIL images are resized with Lanczos (as the reference does); tensors must match."""
    if isinstance(image, Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(
                f"{what} tensor must be [3, H, W] or [B, 3, H, W] in [-1, 1]; got {tuple(image.shape)}"
            )
        if tuple(x.shape[-2:]) != (height, width):
            raise ConfigError(
                f"{what} tensor is {x.shape[-1]}x{x.shape[-2]} (WxH); expected {width}x{height}"
            )
        lo, hi = x.min().item(), x.max().item()
        if lo < -1 - 1e-3 or hi > 1 + 1e-3:
            raise ConfigError(f"{what} tensor values must lie in [-1, 1]; found [{lo:.4g}, {hi:.4g}]")
        return x.float()
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ConfigError(f"{what} must be a PIL image or a torch tensor; got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.array(image)).float() / 127.5 - 1.0
    return x.permute(2, 0, 1)[None]


def _to_mask_tensor(mask, width: int, height: int) -> Tensor:
    """PIL image (grayscale 0–255) or tensor [H, W] / [B, 1, H, W] in [0, 1] → float32 [B, 1, H, W];
    1 = the region to generate."""
    if isinstance(mask, Tensor):
        m = mask.reshape(1, 1, *mask.shape) if mask.ndim == 2 else mask
        if m.ndim == 3:
            m = m[:, None]
        if tuple(m.shape[-2:]) != (height, width):
            raise ConfigError(
                f"mask_image tensor is {m.shape[-1]}x{m.shape[-2]} (WxH); expected {width}x{height}"
            )
        lo, hi = m.min().item(), m.max().item()
        if lo < 0 or hi > 1:
            raise ConfigError(
                f"mask_image tensor values must lie in [0, 1] (1 = generate); found [{lo:.4g}, {hi:.4g}]"
            )
        return m.float()
    import numpy as np
    from PIL import Image

    if not isinstance(mask, Image.Image):
        raise ConfigError(f"mask_image must be a PIL image or a torch tensor; got {type(mask).__name__}")
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    return (torch.from_numpy(np.array(mask)).float() / 255.0)[None, None]


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or a [.., H, W] tensor."""
    if isinstance(image, Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size


def to_pil(images: Tensor) -> list:
    """[B, 3, H, W] in [−1, 1] → PIL images, as the reference saves them: clamp, 127.5·(x + 1), truncate to uint8."""
    from PIL import Image

    x = images.float().clamp(-1, 1)
    x = (127.5 * (x + 1.0)).permute(0, 2, 3, 1).cpu().byte().numpy()
    return [Image.fromarray(a) for a in x]


class FluxPipeline:
    """Text-to-image (and the conditioned modes) with fluxcore models.

    transformer: `Flux`; ae: `AutoEncoder`; t5 / clip: the text encoders; t5_tokenizer /
    clip_tokenizer: their tokenizers. `kontext=True` marks a Kontext model (its shapes are dev's).
    Build with `from_pretrained` or from parts.
    """

    def __init__(
        self,
        transformer,
        ae,
        t5,
        clip,
        t5_tokenizer,
        clip_tokenizer,
        *,
        kontext: bool = False,
        redux: nn.Module | None = None,
    ):
        self.transformer = transformer
        self.ae = ae
        self.t5 = t5
        self.clip = clip
        self.t5_tokenizer = t5_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.kontext = bool(kontext)
        self.redux = redux
        self._offload_device: torch.device | None = None

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path, *, torch_dtype: torch.dtype | None = None, device=None, kontext: bool | None = None
    ) -> FluxPipeline:
        """Load every part from a model folder:
        - a Hugging Face snapshot (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/,
          tokenizer/, tokenizer_2/), or
        - a folder with the BFL files (flux1-*.safetensors, ae.safetensors) plus those four text folders.
        torch_dtype: default bf16 on CUDA, float32 elsewhere. device: default CPU.
        kontext: default from model_index.json (FluxKontextPipeline) or "kontext" in the file/folder name.
        """
        from fluxcore.weights import load_flux
        from fluxcore.weights.encoders import (
            load_autoencoder,
            load_clip,
            load_clip_tokenizer,
            load_t5,
            load_t5_tokenizer,
        )

        root = Path(path)
        if not root.is_dir():
            raise WeightsError(f"model folder {root} does not exist or is not a folder")
        missing = _missing_parts(root)
        if missing:
            raise WeightsError(f"model folder {root} is missing: " + "; ".join(missing))
        dtype = torch_dtype or _default_dtype(device)
        transformer = load_flux(root, device=device, dtype=dtype)
        # The reference keeps the autoencoder's weights in fp32 (ae.safetensors is fp32) and runs it
        # under bf16 autocast on the GPU (see `_ae_autocast`).
        ae = load_autoencoder(root, device=device, dtype=torch.float32)
        t5 = load_t5(root, device=device, dtype=dtype)
        clip = load_clip(root, device=device, dtype=dtype)
        t5_tok = load_t5_tokenizer(root)
        clip_tok = load_clip_tokenizer(root)
        if kontext is None:
            index = root / "model_index.json"
            cls_name = ""
            if index.is_file():
                with contextlib.suppress(ValueError, OSError):
                    cls_name = str(json.loads(index.read_text()).get("_class_name", ""))
            kontext = "Kontext" in cls_name or "kontext" in str(getattr(transformer, "variant", ""))
        return cls(transformer, ae, t5, clip, t5_tok, clip_tok, kontext=kontext)

    def load_redux(self, path) -> FluxPipeline:
        """Load FLUX.1-Redux's projector (flux1-redux-dev.safetensors); enables `image_embeds=`."""
        self.redux = load_redux(
            path, device="cpu" if self._offload_device else self.device, dtype=self.transformer.dtype
        )
        return self

    # --- devices ---------------------------------------------------------------------------

    def _modules(self) -> list[nn.Module]:
        return [m for m in (self.transformer, self.ae, self.t5, self.clip, self.redux) if m is not None]

    @property
    def device(self) -> torch.device:
        """Where computation runs (the offload device when offloading)."""
        return self._offload_device or self.transformer.device

    def to(self, device) -> FluxPipeline:
        self._offload_device = None
        for m in self._modules():
            m.to(device)
        return self

    def enable_model_cpu_offload(self, device="cuda") -> FluxPipeline:
        """Keep every model on the CPU and move each stage (text encoders, transformer, autoencoder)
        to `device` only while it runs. Peak device memory becomes the largest stage, not the sum."""
        self._offload_device = torch.device(device)
        for m in self._modules():
            m.to("cpu")
        return self

    @contextlib.contextmanager
    def _stage(self, *modules: nn.Module):
        if self._offload_device is None:
            yield
            return
        for m in modules:
            m.to(self._offload_device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")
            if self._offload_device.type == "cuda":
                torch.cuda.empty_cache()

    # --- properties of the loaded model ----------------------------------------------------

    @property
    def is_schnell(self) -> bool:
        """Timestep-distilled (no guidance input): 4 steps, unshifted schedule, T5 length 256."""
        return not self.transformer.config.guidance_embed

    @property
    def mode(self) -> str:
        """The conditioning mode: fill, control, kontext, or text (text-to-image, img2img, Redux)."""
        c = self.transformer.config.in_channels
        return "fill" if c == 384 else "control" if c == 128 else "kontext" if self.kontext else "text"

    def default_max_sequence_length(self) -> int:
        # The reference's length, capped by the tokenizer's model_max_length (512 in FLUX's
        # tokenizer_2/; 24 in the shipped tiny model, which was trained with that padding).
        reference = 256 if self.is_schnell else 128 if self.mode == "fill" else 512
        return min(reference, getattr(self.t5_tokenizer, "max_length", reference))

    # --- the call --------------------------------------------------------------------------

    def encode_prompt(self, prompt, num_images_per_prompt: int = 1, max_sequence_length: int | None = None):
        """(txt [N, L, 4096], txt_ids [N, L, 3], vec [N, 768]) on the pipeline device, N = prompts × images per prompt."""
        from fluxcore.text.encode import encode_prompt

        with self._stage(self.t5, self.clip):
            return encode_prompt(
                prompt,
                t5=self.t5,
                clip=self.clip,
                t5_tokenizer=self.t5_tokenizer,
                clip_tokenizer=self.clip_tokenizer,
                max_length=max_sequence_length or self.default_max_sequence_length(),
                num_images_per_prompt=num_images_per_prompt,
                device=self.device,
            )

    def _ae_autocast(self):
        """bf16 autocast around the fp32 autoencoder on CUDA, as the reference encodes and decodes."""
        device = torch.device(self.device)
        enabled = device.type == "cuda" and self.transformer.dtype == torch.bfloat16
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    def _encode_image(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] → scaled latents in the transformer's dtype (the
        reference casts encoded conditions to bf16)."""
        with self._stage(self.ae), torch.no_grad(), self._ae_autocast():
            return self.ae.encode(x.to(self.device)).to(self.transformer.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.5,
        max_sequence_length: int | None = None,
        generator: int | torch.Generator | Sequence[int | torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        sampler: str | Callable = "euler",
        callback: Callable[[dict], None] | None = None,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        true_cfg_scale: float = 1.0,
        image=None,
        strength: float | None = None,
        mask_image=None,
        control_image=None,
        image_embeds: Tensor | None = None,
        kontext_auto_resize: bool = True,
        latents: Tensor | None = None,
        sampler_options: dict | None = None,
        output_type: str = "pil",
        progress: bool = True,
    ) -> FluxPipelineOutput:
        """Generate images; keyword names follow diffusers' FluxPipeline.

        prompt: a string or a list of B strings. height, width: pixels, default 1024 (for Kontext the
          reference image's size); rounded down to multiples of 16 with a warning.
        num_inference_steps: default 4 for schnell-type models, 28 otherwise.
        guidance_scale: the distilled guidance input of dev-type models (ignored by schnell).
        max_sequence_length: T5 tokens; default 256 schnell, 128 Fill, 512 otherwise (the reference's).
        generator: a seed (int), a torch.Generator, or a list with one per image; default a random
          seed. Seeds give the reference's noise (`get_noise`, CPU generator) on any device.
        sampler: a name from `fluxcore.sampling.SAMPLERS` or a sampler function; sampler_options go to it.
        callback: called after each step's model evaluation with k-diffusion's dict
          {"x", "i", "sigma", "sigma_hat", "denoised"}.
        negative_prompt, true_cfg_scale: true classifier-free guidance when true_cfg_scale > 1 (two
          transformer passes per step: double the cost).
        image: img2img input (with strength, default 0.6), the image to fill (Fill models, with
          mask_image: white = generate), or the Kontext reference. control_image: Canny/Depth input
          (the edge/depth map itself). image_embeds: Redux SigLIP embeddings [N, 1152] or [B, N, 1152].
        latents: packed starting noise [N, L, 64] instead of drawing it (as diffusers' `latents`).
        output_type: "pil" (default), "np" (float [N, H, W, 3] in [0, 1]), "pt" ([N, 3, H, W] in
          [0, 1]) or "latent" (packed latents).
        """
        prompts = self._check_prompt(prompt)
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ConfigError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        n = len(prompts) * num_images_per_prompt
        mode = self.mode
        self._check_inputs(mode, image, strength, mask_image, control_image, image_embeds)
        if mode == "kontext" and image is not None:
            w, h = _image_size(image)
            ref_w, ref_h = (
                kontext_resolution(w, h) if kontext_auto_resize else (16 * (w // 16), 16 * (h // 16))
            )
            height = ref_h if height is None else height
            width = ref_w if width is None else width
        height = self._check_side("height", 1024 if height is None else height)
        width = self._check_side("width", 1024 if width is None else width)
        steps = (4 if self.is_schnell else 28) if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        sample = get_sampler(sampler) if isinstance(sampler, str) else sampler
        if not callable(sample):
            raise ConfigError(f"sampler must be a name or a callable; got {type(sampler).__name__}")
        if max_sequence_length is not None and not 1 <= int(max_sequence_length) <= 512:
            raise ConfigError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        device, dtype = self.device, self.transformer.dtype

        # text
        txt, txt_ids, vec = self.encode_prompt(prompts, num_images_per_prompt, max_sequence_length)
        negative = None
        if negative_prompt is not None and true_cfg_scale > 1:
            neg = (
                [negative_prompt] * len(prompts)
                if isinstance(negative_prompt, str)
                else list(negative_prompt)
            )
            if len(neg) != len(prompts):
                raise ConfigError(
                    f"got {len(neg)} negative prompts for {len(prompts)} prompts; give one per prompt or one string"
                )
            n_txt, n_ids, n_vec = self.encode_prompt(neg, num_images_per_prompt, max_sequence_length)
            negative = {"txt": n_txt, "txt_ids": n_ids, "y": n_vec}
        if image_embeds is not None:
            emb = image_embeds[None] if image_embeds.ndim == 2 else image_embeds
            with self._stage(self.redux):
                tokens = self.redux(emb.to(device=device, dtype=self.redux.redux_up.weight.dtype))
            txt, txt_ids = append_redux(txt, txt_ids, tokens)
            if negative is not None:
                negative["txt"], negative["txt_ids"] = append_redux(
                    negative["txt"], negative["txt_ids"], tokens
                )

        # noise
        seeds = None
        if latents is not None:
            x = latents.to(device=device, dtype=dtype)
            seq = math.ceil(height / 16) * math.ceil(width / 16)
            if x.shape != (n, seq, 64):
                raise ConfigError(
                    f"latents must be packed noise of shape {(n, seq, 64)}; got {tuple(x.shape)}"
                )
        else:
            x, seeds = self._noise(generator, n, height, width, dtype)
        seq_len = x.shape[1]
        img_ids = make_img_ids(n, height, width, device=device)
        timesteps = get_schedule(steps, seq_len, shift=not self.is_schnell)

        extra = {
            "img_ids": img_ids,
            "txt": txt,
            "txt_ids": txt_ids,
            "y": vec,
            "guidance": float(guidance_scale),
        }
        if mode == "fill":
            img = _to_rgb_tensor(image, width, height, "image")
            mask = _to_mask_tensor(mask_image, width, height)
            lat = self._encode_image(fill_masked_image(img, mask))
            extra["img_cond"] = self._batch(fill_condition(lat, mask.to(lat.device)), n).to(dtype)
        elif mode == "control":
            lat = self._encode_image(_to_rgb_tensor(control_image, width, height, "control_image"))
            extra["img_cond"] = self._batch(control_condition(lat), n).to(dtype)
        elif mode == "kontext" and image is not None:
            w, h = _image_size(image)
            ref_w, ref_h = (
                kontext_resolution(w, h) if kontext_auto_resize else (16 * (w // 16), 16 * (h // 16))
            )
            lat = self._encode_image(_to_rgb_tensor(image, ref_w, ref_h, "image")).to(dtype)
            seq, seq_ids = kontext_tokens(lat)
            extra["img_cond_seq"], extra["img_cond_seq_ids"] = self._batch(seq, n), self._batch(seq_ids, n)
        elif image is not None:  # img2img
            init = pack(self._encode_image(_to_rgb_tensor(image, width, height, "image")))
            x, timesteps = img2img_start(
                self._batch(init, n), x, timesteps, 0.6 if strength is None else strength
            )

        model = FlowDenoiser(self.transformer)
        if negative is not None:
            model = CFGDenoiser(model, true_cfg_scale, negative)
        options = dict(sampler_options or {})
        if (
            seeds is not None
            and "generator" not in options
            and "generator" in inspect.signature(sample).parameters
        ):
            # stochastic samplers: a CPU stream derived from (not equal to) the noise seed
            options["generator"] = torch.Generator().manual_seed(
                (seeds[0] * 6364136223846793005 + 1442695040888963407) % 2**64
            )
        num_steps = len(timesteps) - 1
        with self._stage(self.transformer):
            x = sample(
                model,
                x,
                timesteps,
                extra_args=extra,
                callback=nan_guard(callback, num_steps),
                disable=None if progress else True,
                **options,
            )
        if not torch.isfinite(x).all():
            raise FluxcoreError(
                f"the latents became NaN or infinite in the last sampling step ({num_steps} of {num_steps}); "
                "expected finite values (fp16 weights overflow in FLUX: use bf16 or fp32)"
            )
        info = {"height": height, "width": width, "num_inference_steps": steps, "timesteps": timesteps}
        if output_type == "latent":
            return FluxPipelineOutput(images=x, seeds=seeds, info=info)
        with self._stage(self.ae), self._ae_autocast():
            decoded = self.ae.decode(unpack(x.float(), height, width)).float().clamp(-1, 1)
        if output_type == "pil":
            images = to_pil(decoded)
        elif output_type == "pt":
            images = (decoded + 1) / 2
        elif output_type == "np":
            images = ((decoded + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        else:
            raise ConfigError(f"output_type must be 'pil', 'np', 'pt' or 'latent'; got {output_type!r}")
        return FluxPipelineOutput(images=images, seeds=seeds, info=info)

    # --- input checks and helpers -----------------------------------------------------------

    @staticmethod
    def _check_prompt(prompt) -> list[str]:
        if isinstance(prompt, str):
            return [prompt]
        if prompt is None or isinstance(prompt, bytes) or not isinstance(prompt, Sequence) or not len(prompt):
            raise ConfigError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}")
        if not all(isinstance(p, str) for p in prompt):
            raise ConfigError(
                f"every prompt must be a string; got types {[type(p).__name__ for p in prompt][:5]}"
            )
        return list(prompt)

    @staticmethod
    def _check_side(name: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer number of pixels; got {value!r}")
        if value <= 0 or value > MAX_SIDE:
            raise ConfigError(f"{name} must be in [16, {MAX_SIDE}] pixels; got {value}")
        rounded = 16 * (value // 16)
        if rounded < 16:
            raise ConfigError(f"{name} must be at least 16 pixels (one packed latent token); got {value}")
        if rounded != value:
            warnings.warn(f"{name} {value} is not a multiple of 16; rounded down to {rounded}", stacklevel=4)
        return rounded

    def _check_inputs(self, mode, image, strength, mask_image, control_image, image_embeds) -> None:
        if mode == "fill" and (image is None or mask_image is None):
            raise ConfigError(
                "this is a Fill model (384 input channels): pass image= and mask_image= (white = generate)"
            )
        if mode != "fill" and mask_image is not None:
            raise ConfigError(f"mask_image is for Fill models; this model's mode is {mode!r}")
        if mode == "control" and control_image is None:
            raise ConfigError(
                "this is a Canny/Depth model (128 input channels): pass control_image= (the edge or depth map)"
            )
        if mode != "control" and control_image is not None:
            raise ConfigError(f"control_image is for Canny/Depth models; this model's mode is {mode!r}")
        if mode == "control" and image is not None:
            raise ConfigError("Canny/Depth models take control_image=, not image=")
        if strength is not None and (image is None or mode != "text"):
            raise ConfigError(f"strength is for img2img: pass image= with it (this model's mode is {mode!r})")
        if image_embeds is not None and self.redux is None:
            raise ConfigError(
                "image_embeds= needs the Redux projector: call pipe.load_redux('flux1-redux-dev.safetensors') first"
            )

    def _batch(self, t: Tensor, n: int) -> Tensor:
        t = t.to(self.device)
        if t.shape[0] == n:
            return t
        if t.shape[0] == 1:
            return t.expand(n, *t.shape[1:]).contiguous()
        raise ConfigError(f"a conditioning input has batch {t.shape[0]}, expected 1 or {n}")

    def _noise(self, generator, n: int, height: int, width: int, dtype) -> tuple[Tensor, list[int] | None]:
        """Packed starting noise [n, L, 64] and the seeds used (None for torch.Generators)."""
        if generator is None:
            generator = random.SystemRandom().randrange(2**32)
        items = list(generator) if isinstance(generator, (list, tuple)) else None
        if items is not None and len(items) != n:
            raise ConfigError(
                f"got {len(items)} seeds/generators for {n} images (prompts × num_images_per_prompt); "
                "give one per image or a single one"
            )
        if items is None:
            if isinstance(generator, torch.Generator):
                return self._from_generator(generator, n, height, width, dtype), None
            seed = self._seed(generator)
            return pack(get_noise(n, height, width, self.device, dtype, seed)), [seed]
        if all(isinstance(g, torch.Generator) for g in items):
            return torch.cat([self._from_generator(g, 1, height, width, dtype) for g in items]), None
        seeds = [self._seed(g) for g in items]
        return torch.cat([pack(get_noise(1, height, width, self.device, dtype, s)) for s in seeds]), seeds

    @staticmethod
    def _seed(value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"a seed must be a non-negative integer (or a torch.Generator); got {value!r}")
        return value

    def _from_generator(self, g: torch.Generator, n: int, height: int, width: int, dtype) -> Tensor:
        from fluxcore.latents import latent_size

        h, w = latent_size(height, width)
        x = torch.randn(n, 16, h, w, generator=g, device=g.device, dtype=dtype)
        return pack(x.to(self.device))

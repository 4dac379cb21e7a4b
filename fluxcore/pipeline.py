"""FluxPipeline: prompt → image, with the call keywords of diffusers' FluxPipeline.

    pipe = FluxPipeline.from_pretrained("FLUX.1-schnell", torch_dtype=torch.bfloat16, device="cuda")
    image = pipe("a cat on mars", num_inference_steps=4, generator=0).images[0]

A call runs the reference's recipe as five stages, each a method that can be called alone:

    encode_text            prompts → txt [N, L, 4096], txt_ids [N, L, 3], y [N, 768] (+ Redux tokens)
    prepare_latents        seeds → packed noise [N, (H/16)(W/16), 64], img_ids [N, (H/16)(W/16), 3]
    prepare_conditioning   the mode's inputs → extra model inputs (and, for img2img, a later start)
    denoise                schedule (`get_timesteps`) + sampler → packed latents [N, L, 64]
    decode                 unpack + autoencoder → PIL images / arrays / tensors

The conditioning mode is the model's (`FluxPipeline.mode`): "fill" takes `image` + `mask_image`,
"control" (Canny/Depth) takes `control_image`, "kontext" takes `image` as the reference, and
"text" takes `image` for img2img (`strength`). Redux image embeddings (`image_embeds`, after
`load_redux`) add text tokens in any mode.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore.conditioning import (
    append_redux,
    check_inputs,
    control_inputs,
    fill_inputs,
    img2img_inputs,
    img2img_start,
    kontext_inputs,
    kontext_size,
    load_redux,
    redux_inputs,
)
from fluxcore.errors import ConfigError, FluxcoreError, WeightsError
from fluxcore.images import check_output_type, check_side, to_output
from fluxcore.latents import draw_noise, image_seq_len, make_img_ids, unpack
from fluxcore.sampling import (
    CFGDenoiser,
    FlowDenoiser,
    ScheduleConfig,
    get_sampler,
    get_schedule,
    nan_guard,
)
from fluxcore.weights.io import default_dtype, read_json

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


@dataclass(frozen=True)
class _Request:
    """A call's arguments after validation and defaulting."""

    prompts: list[str]
    negative_prompts: list[str] | None  # None unless true CFG runs
    n: int  # images: prompts × num_images_per_prompt
    mode: str
    height: int
    width: int
    steps: int
    sample: Callable


def _apply_kernels(transformer: nn.Module, wanted: bool | None) -> list[str]:
    """The fused-kernel transform as the pipeline's default (see FluxPipeline): the module paths replaced."""
    if wanted is False or (wanted is None and not torch.cuda.is_available()):
        return []
    try:
        from fluxcore import kernels
    except ImportError as e:  # triton missing or unable to load here
        if wanted:
            raise ConfigError(f"fused_kernels=True needs the Triton kernels, which cannot be imported: {e}") from None
        return []
    return kernels.apply(transformer)


def _missing_parts(root: Path) -> list[str]:
    missing = [f"{name}/: {what}" for name, what in _PARTS.items() if not (root / name).is_dir()]
    if not (root / "ae.safetensors").is_file() and not (root / "vae").is_dir():
        missing.append("autoencoder: ae.safetensors (BFL) or vae/ (diffusers)")
    if not (root / "transformer").is_dir() and not list(root.glob("*.safetensors")):
        missing.append("transformer: transformer/ (diffusers) or flux1-*.safetensors (BFL)")
    return missing


class FluxPipeline:
    """Text-to-image (and the conditioned modes) with fluxcore models.

    transformer: `Flux`; ae: `AutoEncoder`; t5 / clip: the text encoders; t5_tokenizer /
    clip_tokenizer: their tokenizers. `kontext=True` marks a Kontext model (its shapes are dev's).
    schedule: how flow times are shifted; default the reference's (unshifted for schnell-type
    models, resolution-shifted otherwise). Build with `from_pretrained` or from parts.
    fused_kernels: apply `fluxcore.kernels.apply` to the transformer (True), never (False), or
    when a CUDA device and the Triton kernels are available (None, the default). The fused modules
    fall back to the plain math wherever their kernels cannot run, so moving the pipeline between
    devices stays exact; `fused_modules` lists what was replaced.
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
        schedule: ScheduleConfig | None = None,
        fused_kernels: bool | None = None,
    ):
        self.transformer = transformer
        self.ae = ae
        self.t5 = t5
        self.clip = clip
        self.t5_tokenizer = t5_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.kontext = bool(kontext)
        self.redux = redux
        if schedule is None:
            schedule = ScheduleConfig.unshifted() if self.is_schnell else ScheduleConfig()
        self.schedule = schedule
        self._offload_device: torch.device | None = None
        self.fused_modules: list[str] = _apply_kernels(transformer, fused_kernels)

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        torch_dtype: torch.dtype | None = None,
        device=None,
        kontext: bool | None = None,
        fused_kernels: bool | None = None,
    ) -> FluxPipeline:
        """Load every part from a model folder:
        - a Hugging Face snapshot (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/,
          tokenizer/, tokenizer_2/, and scheduler/scheduler_config.json for the schedule), or
        - a folder with the BFL files (flux1-*.safetensors, ae.safetensors) plus those four text folders.
        torch_dtype: default bf16 on CUDA, float32 elsewhere. device: default CPU.
        kontext: default from model_index.json (FluxKontextPipeline) or "kontext" in the file/folder name.
        Without a scheduler config the schedule is the reference's for the variant.
        fused_kernels: see the class docstring (default: on where a CUDA GPU and Triton are).
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
        dtype = torch_dtype or default_dtype(device)
        transformer = load_flux(root, device=device, dtype=dtype)
        # The reference keeps the autoencoder's weights in fp32 (ae.safetensors is fp32) and runs it
        # under bf16 autocast on the GPU (see `_ae_autocast`).
        ae = load_autoencoder(root, device=device, dtype=torch.float32)
        t5 = load_t5(root, device=device, dtype=dtype)
        clip = load_clip(root, device=device, dtype=dtype)
        t5_tok = load_t5_tokenizer(root)
        clip_tok = load_clip_tokenizer(root)
        if kontext is None:
            cls_name = str(read_json(root / "model_index.json", missing_ok=True).get("_class_name", ""))
            kontext = "Kontext" in cls_name or "kontext" in str(getattr(transformer, "variant", ""))
        scheduler = read_json(root / "scheduler" / "scheduler_config.json", missing_ok=True)
        schedule = ScheduleConfig.from_scheduler_config(scheduler) if scheduler else None
        return cls(
            transformer, ae, t5, clip, t5_tok, clip_tok,
            kontext=kontext, schedule=schedule, fused_kernels=fused_kernels,
        )  # fmt: skip

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
        """The conditioning mode: "fill", "control" or "text" from the transformer's channel counts
        (`FluxConfig.conditioning`), and "kontext" for a text-mode model marked as Kontext."""
        mode = self.transformer.config.conditioning
        return "kontext" if mode == "text" and self.kontext else mode

    def default_max_sequence_length(self) -> int:
        # The reference's length, capped by the tokenizer's model_max_length (512 in FLUX's
        # tokenizer_2/; 24 in the shipped tiny model, which was trained with that padding).
        reference = 256 if self.is_schnell else 128 if self.mode == "fill" else 512
        return min(reference, getattr(self.t5_tokenizer, "max_length", reference))

    # --- the call --------------------------------------------------------------------------

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
        r = self._validate(
            prompt, height, width, num_inference_steps, max_sequence_length, num_images_per_prompt,
            sampler, negative_prompt, true_cfg_scale, image, strength, mask_image, control_image,
            image_embeds, kontext_auto_resize, output_type,
        )  # fmt: skip
        text, negative = self.encode_text(
            r.prompts, num_images_per_prompt, max_sequence_length, r.negative_prompts, image_embeds
        )
        x, img_ids, seeds = self.prepare_latents(r.n, r.height, r.width, generator, latents)
        timesteps = self.get_timesteps(r.steps, x.shape[1])
        x, timesteps, cond = self.prepare_conditioning(
            r.mode, x, timesteps, r.width, r.height,
            image=image, strength=strength, mask_image=mask_image, control_image=control_image,
            kontext_auto_resize=kontext_auto_resize,
        )  # fmt: skip
        extra = {"img_ids": img_ids, **text, "guidance": float(guidance_scale), **cond}
        x = self.denoise(
            x, timesteps, extra, sampler=r.sample, negative=negative, true_cfg_scale=true_cfg_scale,
            callback=callback, progress=progress, seed=seeds[0] if seeds else None,
            sampler_options=sampler_options,
        )  # fmt: skip
        info = {"height": r.height, "width": r.width, "num_inference_steps": r.steps, "timesteps": timesteps}
        images = x if output_type == "latent" else self.decode(x, r.height, r.width, output_type)
        return FluxPipelineOutput(images=images, seeds=seeds, info=info)

    # --- the stages ------------------------------------------------------------------------

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

    @torch.no_grad()
    def encode_text(
        self,
        prompts: list[str],
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        negative_prompts: list[str] | None = None,
        image_embeds: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """The text inputs of the model: ({"txt": [N, L, 4096], "txt_ids": [N, L, 3], "y": [N, 768]},
        the same for `negative_prompts` or None). Redux tokens from `image_embeds` ([N_r, 1152] or
        [B, N_r, 1152]) are appended to both, so L = T5 length + N_r."""
        keys = ("txt", "txt_ids", "y")
        text = dict(zip(keys, self.encode_prompt(prompts, num_images_per_prompt, max_sequence_length)))
        negative = None
        if negative_prompts is not None:
            negative = dict(
                zip(keys, self.encode_prompt(negative_prompts, num_images_per_prompt, max_sequence_length))
            )
        if image_embeds is not None:
            with self._stage(self.redux):
                tokens = redux_inputs(self.redux, image_embeds, self.device)
            for d in (text, negative) if negative is not None else (text,):
                d["txt"], d["txt_ids"] = append_redux(d["txt"], d["txt_ids"], tokens)
        return text, negative

    def prepare_latents(
        self, n: int, height: int, width: int, generator=None, latents: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[int] | None]:
        """(packed starting noise [n, L, 64] in the transformer's dtype, img_ids [n, L, 3] float32,
        the seeds used or None), L = ⌈H/16⌉·⌈W/16⌉. The noise is `latents` when given, else drawn
        from `generator` (see `__call__`)."""
        device, dtype = self.device, self.transformer.dtype
        seeds = None
        if latents is not None:
            x = latents.to(device=device, dtype=dtype)
            want = (n, image_seq_len(height, width), 64)
            if x.shape != want:
                raise ConfigError(f"latents must be packed noise of shape {want}; got {tuple(x.shape)}")
        else:
            x, seeds = draw_noise(generator, n, height, width, device=device, dtype=dtype)
        return x, make_img_ids(n, height, width, device=device), seeds

    def get_timesteps(self, num_steps: int, seq_len: int) -> list[float]:
        """num_steps + 1 flow times 1 → 0 for seq_len packed image tokens, shifted by `self.schedule`."""
        return get_schedule(num_steps, seq_len, config=self.schedule)

    @torch.no_grad()
    def prepare_conditioning(
        self,
        mode: str,
        x: Tensor,
        timesteps: list[float],
        width: int,
        height: int,
        *,
        image=None,
        strength: float | None = None,
        mask_image=None,
        control_image=None,
        kontext_auto_resize: bool = True,
    ) -> tuple[Tensor, list[float], dict[str, Tensor]]:
        """(start latents [N, L, 64], the flow times to run, the mode's extra model inputs batched to N):

        fill      {"img_cond": [N, L, 320]} from image + mask_image
        control   {"img_cond": [N, L, 64]} from control_image
        kontext   {"img_cond_seq": [N, L_ref, 64], "img_cond_seq_ids": [N, L_ref, 3]} from image
        text      with image: img2img, x and timesteps start later (`img2img_start`); else unchanged
        """
        encode, n = self._encode_image, x.shape[0]
        if mode == "fill":
            cond = fill_inputs(encode, image, mask_image, width, height)
        elif mode == "control":
            cond = control_inputs(encode, control_image, width, height)
        elif mode == "kontext" and image is not None:
            cond = kontext_inputs(encode, image, kontext_auto_resize)
        elif image is not None:
            init = self._batch(img2img_inputs(encode, image, width, height), n)
            x, timesteps = img2img_start(init, x, timesteps, 0.6 if strength is None else strength)
            cond = {}
        else:
            cond = {}
        return x, timesteps, {k: self._batch(v, n) for k, v in cond.items()}

    @torch.no_grad()
    def denoise(
        self,
        x: Tensor,
        timesteps: Sequence[float],
        extra: dict,
        *,
        sampler: str | Callable = "euler",
        negative: dict | None = None,
        true_cfg_scale: float = 1.0,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        seed: int | None = None,
        sampler_options: dict | None = None,
    ) -> Tensor:
        """Run the sampler from packed latents x [N, L, 64] over `timesteps` with the transformer
        (`FlowDenoiser`; `CFGDenoiser` when `negative` text inputs are given) and model inputs
        `extra`; returns the final packed latents [N, L, 64]. Stochastic samplers that take a
        `generator` get a CPU stream derived from `seed`. Non-finite latents raise FluxcoreError."""
        sample = get_sampler(sampler) if isinstance(sampler, str) else sampler
        model = FlowDenoiser(self.transformer)
        if negative is not None:
            model = CFGDenoiser(model, true_cfg_scale, negative)
        options = dict(sampler_options or {})
        if (
            seed is not None
            and "generator" not in options
            and "generator" in inspect.signature(sample).parameters
        ):
            # derived from (not equal to) the noise seed, so the two streams are independent
            options["generator"] = torch.Generator().manual_seed(
                (seed * 6364136223846793005 + 1442695040888963407) % 2**64
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
        return x

    @torch.no_grad()
    def decode(self, x: Tensor, height: int, width: int, output_type: str = "pil"):
        """Packed latents [N, L, 64] → N images of height x width: PIL images ("pil"), float
        [N, H, W, 3] numpy ("np") or [N, 3, H, W] tensor ("pt"), both in [0, 1]."""
        check_output_type(output_type)
        with self._stage(self.ae), self._ae_autocast():
            decoded = self.ae.decode(unpack(x.float(), height, width)).float().clamp(-1, 1)
        return to_output(decoded, output_type)

    # --- stage helpers ---------------------------------------------------------------------

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

    def _batch(self, t: Tensor, n: int) -> Tensor:
        t = t.to(self.device)
        if t.shape[0] == n:
            return t
        if t.shape[0] == 1:
            return t.expand(n, *t.shape[1:]).contiguous()
        raise ConfigError(f"a conditioning input has batch {t.shape[0]}, expected 1 or {n}")

    # --- argument validation ---------------------------------------------------------------

    def _validate(
        self, prompt, height, width, num_inference_steps, max_sequence_length, num_images_per_prompt,
        sampler, negative_prompt, true_cfg_scale, image, strength, mask_image, control_image,
        image_embeds, kontext_auto_resize, output_type,
    ) -> _Request:  # fmt: skip
        """Check every argument of `__call__` before any model runs; fill in the defaults."""
        prompts = self._check_prompt(prompt)
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ConfigError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        mode = self.mode
        check_inputs(mode, self.transformer.config.in_channels, image, strength, mask_image, control_image)
        if image_embeds is not None and self.redux is None:
            raise ConfigError(
                "image_embeds= needs the Redux projector: call pipe.load_redux('flux1-redux-dev.safetensors') first"
            )
        if mode == "kontext" and image is not None:
            ref_w, ref_h = kontext_size(image, kontext_auto_resize)
            height = ref_h if height is None else height
            width = ref_w if width is None else width
        height = check_side("height", 1024 if height is None else height)
        width = check_side("width", 1024 if width is None else width)
        steps = (4 if self.is_schnell else 28) if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        sample = get_sampler(sampler) if isinstance(sampler, str) else sampler
        if not callable(sample):
            raise ConfigError(f"sampler must be a name or a callable; got {type(sampler).__name__}")
        if max_sequence_length is not None and not 1 <= int(max_sequence_length) <= 512:
            raise ConfigError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        negative = None
        if negative_prompt is not None and true_cfg_scale > 1:
            negative = (
                [negative_prompt] * len(prompts)
                if isinstance(negative_prompt, str)
                else list(negative_prompt)
            )
            if len(negative) != len(prompts):
                raise ConfigError(
                    f"got {len(negative)} negative prompts for {len(prompts)} prompts; give one per prompt or one string"
                )
        check_output_type(output_type)
        n = len(prompts) * num_images_per_prompt
        return _Request(prompts, negative, n, mode, height, width, steps, sample)

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

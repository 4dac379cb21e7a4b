"""FluxPipeline: prompt → image, with the call keywords and component names of diffusers' FluxPipeline.

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16)
    image = pipe("a cat on mars", num_inference_steps=4, generator=0).images[0]

A call runs the reference's recipe as five stages, each a method that can be called alone:

    encode_text            prompts → txt [N, L, 4096], txt_ids [N, L, 3], y [N, 768] (+ Redux tokens)
    prepare_latents        seeds → packed noise [N, (H/16)(W/16), 64], img_ids [N, (H/16)(W/16), 3]
    prepare_conditioning   the mode's inputs → extra model inputs (and, for img2img, a later start)
    denoise                schedule (`get_timesteps`) + sampler → packed latents [N, L, 64]
    decode                 unpack + autoencoder → PIL images / arrays / tensors

The conditioning mode is the model's (`FluxPipeline.mode`): "fill" takes `image` + `mask_image`,
"control" (Canny/Depth) takes `control_image`, "kontext" takes `image` as the reference, and
"text" takes `image` for img2img (`strength`; with `mask_image`, masked img2img). What is loaded on
top — LoRAs, ControlNets, an IP-Adapter, Redux — lives in `fluxcore.pipeline_adapters`; offload,
the memory plan and context parallelism in `fluxcore.pipeline_devices`; argument checks in
`fluxcore.pipeline_inputs`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fluxcore import pipeline_adapters as adapters
from fluxcore import pipeline_devices as devices
from fluxcore import pipeline_text
from fluxcore.conditioning import (
    append_redux,
    control_inputs,
    fill_inputs,
    img2img_inputs,
    img2img_start,
    kontext_inputs,
)
from fluxcore.errors import ConfigError, FluxcoreError
from fluxcore.images import check_output_type, to_output
from fluxcore.latents import draw_noise, image_seq_len, make_img_ids, unpack
from fluxcore.pipeline_inputs import (
    Scheduler,
    apply_kernels,
    lora_scale,
    noise_generators,
    step_end_hook,
    validate,
)
from fluxcore.sampling import get_sampler, nan_guard
from fluxcore.schedules import ScheduleConfig, make_schedule


@contextlib.contextmanager
def step_cache(transformer: nn.Module, spec):
    """The `cache=` of a call: `fluxcore.cache.apply` for the call's duration (yields its handle,
    or None when spec is None)."""
    if spec is None:
        yield None
        return
    import fluxcore.cache

    kind, options = fluxcore.cache.parse(spec)
    handle = fluxcore.cache.apply(transformer, kind, **options)
    try:
        yield handle
    finally:
        handle.remove()


@dataclass
class FluxPipelineOutput:
    """images: list of PIL images (output_type "pil"), or an array/tensor for "np"/"pt"/"latent".
    seeds: the seeds used: [seed] when one seed drew the whole batch, one per image when a list was
    given, None when torch.Generators were given. info: size, steps and the flow-time schedule.
    As diffusers' outputs: `out[0]` and `out["images"]` are the images, `to_tuple()` is (images,)."""

    images: object
    seeds: list[int] | None = None
    info: dict = field(default_factory=dict)

    def to_tuple(self) -> tuple:
        return (self.images,)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


class FluxPipeline:
    """Text-to-image (and the conditioned modes) with fluxcore models.

    transformer: `Flux`; ae: `AutoEncoder`; t5 / clip: the text encoders; t5_tokenizer /
    clip_tokenizer: their tokenizers. diffusers' component names are the same objects:
    `vae` = ae, `text_encoder` = clip, `text_encoder_2` = t5, `tokenizer` = clip_tokenizer,
    `tokenizer_2` = t5_tokenizer, `scheduler` = the schedule's config (`pipe_inputs.Scheduler`).
    `kontext=True` marks a Kontext model (its shapes are dev's).
    schedule: how flow times are shifted; default the reference's (unshifted for schnell-type
    models, resolution-shifted otherwise). Build with `from_pretrained`, `from_single_file` or from parts.
    fused_kernels: apply `fluxcore.kernels.apply` to the transformer (True), never (False), or
    when a CUDA device and the Triton kernels are available (None, the default). The fused modules
    fall back to the plain math wherever their kernels cannot run, so moving the pipeline between
    devices stays exact; `fused_modules` lists what was replaced.
    Loaded on top (methods below): `controlnets`, `ip_adapter` (its handle), `redux` + `siglip`.
    """

    def __init__(
        self, transformer, ae, t5, clip, t5_tokenizer, clip_tokenizer, *, kontext: bool = False,
        redux: nn.Module | None = None, schedule: ScheduleConfig | None = None, fused_kernels: bool | None = None,
    ):  # fmt: skip
        self.transformer = transformer
        self.ae = ae
        self.t5 = t5
        self.clip = clip
        self.t5_tokenizer = t5_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.kontext = bool(kontext)
        self.redux, self.siglip = redux, None
        self.controlnets: list[nn.Module] = []
        self.ip_adapter = None
        if schedule is None:
            schedule = ScheduleConfig.unshifted() if self.is_schnell else ScheduleConfig()
        self.schedule = schedule
        self._offload_device: torch.device | None = None
        self._parallel = None
        self.memory_plan = self.max_memory = None
        self.fused_modules: list[str] = apply_kernels(transformer, fused_kernels)

    # diffusers' component names for the same objects
    vae = property(lambda self: self.ae, lambda self, v: setattr(self, "ae", v))
    text_encoder = property(lambda self: self.clip, lambda self, v: setattr(self, "clip", v))
    text_encoder_2 = property(lambda self: self.t5, lambda self, v: setattr(self, "t5", v))
    tokenizer = property(lambda self: self.clip_tokenizer, lambda self, v: setattr(self, "clip_tokenizer", v))
    tokenizer_2 = property(lambda self: self.t5_tokenizer, lambda self, v: setattr(self, "t5_tokenizer", v))

    @property
    def scheduler(self) -> Scheduler:
        """The schedule's config under diffusers' names (`.config`); assign a diffusers scheduler,
        a config dict or a ScheduleConfig to change `schedule`."""
        return Scheduler(self.schedule)

    @scheduler.setter
    def scheduler(self, value) -> None:
        self.schedule = Scheduler.to_schedule(value)

    @property
    def components(self) -> dict:
        return {
            "scheduler": self.scheduler, "vae": self.ae, "text_encoder": self.clip,
            "tokenizer": self.clip_tokenizer, "text_encoder_2": self.t5, "tokenizer_2": self.t5_tokenizer,
            "transformer": self.transformer,
        }  # fmt: skip

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path, *, torch_dtype: torch.dtype | None = None, device=None, kontext: bool | None = None,
        fused_kernels: bool | None = None, controlnet=None, max_memory=None, parallel: dict | None = None,
        revision: str | None = None, variant: str | None = None, subfolder: str | None = None,
        token: str | bool | None = None, cache_dir=None, local_files_only: bool = False, force_download: bool = False,
    ) -> FluxPipeline:  # fmt: skip
        """Load every part from a model folder or a Hugging Face Hub id (docs/pipeline.md):
        - a Hub id ("black-forest-labs/FLUX.1-dev"), resolved through huggingface_hub's cache;
          revision, variant, subfolder, token, cache_dir, local_files_only, force_download as diffusers;
        - a Hugging Face snapshot folder (model_index.json, transformer/, vae/, text_encoder/,
          text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/scheduler_config.json), or
        - a folder with the BFL files (flux1-*.safetensors, ae.safetensors) plus those four text folders.
        torch_dtype: default bf16 on CUDA, float32 elsewhere. device: default CPU (this rank's
        device with `parallel`). kontext: default from model_index.json or the file/folder name.
        Without a scheduler config the schedule is the reference's. fused_kernels: see the class.
        controlnet: a ControlNet path or a list (`load_controlnet`). max_memory: e.g. "12GB" →
        `fit_memory`. parallel: {"ulysses": U, "ring": R} or {"mesh": mesh} → `enable_context_parallel`.
        """
        from fluxcore.pipeline_load import load_pretrained

        if parallel is not None and device is None:
            from fluxcore.distributed import init_distributed

            device = init_distributed().device
        parts = load_pretrained(
            path, torch_dtype=torch_dtype, device=device, kontext=kontext, revision=revision, variant=variant,
            subfolder=subfolder, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
            force_download=force_download,
        )  # fmt: skip
        pipe = cls(**parts, fused_kernels=fused_kernels)
        if controlnet is not None:
            pipe.load_controlnet(controlnet)
        if max_memory is not None:
            pipe.fit_memory(max_memory)
        if parallel is not None:
            pipe.enable_context_parallel(**parallel)
        return pipe

    @classmethod
    def from_single_file(
        cls, transformer_file, *, t5=None, clip=None, ae=None, tokenizers=None, torch_dtype: torch.dtype | None = None,
        device=None, kontext: bool | None = None, fused_kernels: bool | None = None, token: str | bool | None = None,
        cache_dir=None, local_files_only: bool = False,
    ) -> FluxPipeline:  # fmt: skip
        """Load from single .safetensors files, as ComfyUI keeps them (docs/pipeline.md):
        `transformer_file` (BFL or diffusers keys, optionally under `model.diffusion_model.`; an
        all-in-one checkpoint also holds the text encoders and the autoencoder); t5 / clip / ae:
        files or folders for the parts it lacks; tokenizers: a folder with tokenizer/ and
        tokenizer_2/ or a Hub id (default FLUX.1-schnell's through the Hugging Face cache)."""
        from fluxcore.pipeline_load import load_single_file

        parts = load_single_file(
            transformer_file, t5=t5, clip=clip, ae=ae, tokenizers=tokenizers, torch_dtype=torch_dtype,
            device=device, kontext=kontext, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
        )  # fmt: skip
        return cls(**parts, fused_kernels=fused_kernels)

    # --- loaded on top (fluxcore.pipeline_adapters; diffusers' names, docstrings there) ----------

    load_lora_weights = adapters.load_lora_weights
    set_adapters = adapters.set_adapters
    fuse_lora = adapters.fuse_lora
    unfuse_lora = adapters.unfuse_lora
    unload_lora_weights = adapters.unload_lora_weights
    enable_lora = adapters.enable_lora
    disable_lora = adapters.disable_lora
    get_active_adapters = adapters.get_active_adapters
    load_controlnet = adapters.load_controlnet
    load_ip_adapter = adapters.load_ip_adapter
    set_ip_adapter_scale = adapters.set_ip_adapter_scale
    unload_ip_adapter = adapters.unload_ip_adapter
    load_redux = adapters.load_redux

    # --- devices (fluxcore.pipeline_devices; diffusers' names, docstrings there) -----------------

    to = devices.to
    enable_model_cpu_offload = devices.enable_model_cpu_offload
    enable_sequential_cpu_offload = devices.enable_sequential_cpu_offload
    enable_group_offload = devices.enable_group_offload
    enable_vae_tiling = devices.enable_vae_tiling
    enable_vae_slicing = devices.enable_vae_slicing
    fit_memory = devices.fit_memory
    enable_context_parallel = devices.enable_context_parallel
    disable_context_parallel = devices.disable_context_parallel
    _stage = devices.stage

    def _modules(self) -> list[nn.Module]:
        """Every model the pipeline holds (moved by `to`, offloaded by the offload modes)."""
        extra = [*self.controlnets, self.siglip]
        if self.ip_adapter is not None:
            extra += [self.ip_adapter.adapter, self.ip_adapter.image_encoder]
        return [
            m for m in (self.transformer, self.ae, self.t5, self.clip, self.redux, *extra) if m is not None
        ]

    @property
    def device(self) -> torch.device:
        """Where computation runs (the offload device when offloading)."""
        return self._offload_device or self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

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

    # --- the call --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        prompt_2=None, negative_prompt=None, negative_prompt_2=None, true_cfg_scale: float = 1.0,
        height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
        sigmas: Sequence[float] | None = None, guidance_scale: float = 3.5, num_images_per_prompt: int = 1,
        generator: int | torch.Generator | Sequence[int | torch.Generator] | None = None,
        latents: Tensor | None = None, prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None, negative_pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil", return_dict: bool = True, joint_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        image=None, strength: float | None = None, mask_image=None, kontext_auto_resize: bool = True,
        control_image=None, control_mode=None, controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
        control_guidance_end=1.0, ip_adapter_image=None, negative_ip_adapter_image=None,
        image_embeds: Tensor | None = None, redux_image=None,
        sampler: str | Callable = "euler", scheduler: str | None = None, sampler_options: dict | None = None,
        callback: Callable[[dict], None] | None = None, progress: bool = True, cache=None,
    ) -> FluxPipelineOutput | tuple:  # fmt: skip
        """Generate images; the keywords are those of diffusers' Flux pipelines, with their meanings
        (docs/pipeline.md has the table). Beyond diffusers:

        generator: also an int seed or a list of seeds (the reference's noise, `get_noise`); stochastic
          samplers draw from the same source, one stream per image for a list, never the global RNG.
        sigmas: N flow times in (0, 1], shifted by the schedule and ended with 0 (as diffusers).
        scheduler: a spacing from `fluxcore.schedules.SCHEDULERS` (ComfyUI's names; "simple" is FLUX's).
        sampler / sampler_options: a name from `fluxcore.sampling.SAMPLERS` or a sampler function.
        image: img2img input (with strength, default 0.6; with mask_image, masked img2img as
          diffusers' FluxInpaintPipeline), the image to fill (Fill, with mask_image: white =
          generate) or the Kontext reference; control_image: the Canny/Depth map, or the
          ControlNets' condition(s). PIL images, numpy arrays or tensors in [0, 1] (negative
          values: [-1, 1]) or lists of them.
        image_embeds / redux_image: Redux SigLIP embeddings [N, 1152] or [B, N, 1152], or PIL
          image(s) (after `load_redux`). ip_adapter_image: after `load_ip_adapter`.
        joint_attention_kwargs: only {"scale": s}, the LoRA scale for this call.
        callback_on_step_end(pipe, i, t, kwargs) -> dict: t = 1000·σ_i; returned "latents" /
          "prompt_embeds" replace the pipeline's. callback: k-diffusion's per-step dict instead.
        output_type: "pil", "np" ([N, H, W, 3] in [0, 1]), "pt" ([N, 3, H, W] in [0, 1]) or "latent".
        cache: a step cache for this call, off by default: "first_block:0.08", "teacache:0.4",
          "taylorseer:3", a (kind, options) pair or {"kind": ..., **options} (`fluxcore.cache`);
          removed after the call, and info["cache"] says how many trunk evaluations ran / were skipped.
        """
        args = dict(locals())
        r = validate(self, args)
        if cache is not None:  # a bad spec fails here, before any model runs
            import fluxcore.cache

            fluxcore.cache.parse(cache)
        devices.check_memory(self, r.height, r.width, r.n, self.cap_max_sequence_length(max_sequence_length))
        with lora_scale(adapters.lora_models(self).values(), joint_attention_kwargs):
            text, negative = self.encode_text(
                r.prompts, num_images_per_prompt, max_sequence_length, r.negative if r.true_cfg else None,
                image_embeds, prompt_2=r.prompts_2, negative_prompts_2=r.negative_2,
                embeds=(prompt_embeds, pooled_prompt_embeds), redux_image=redux_image,
                negative_embeds=(negative_prompt_embeds, negative_pooled_prompt_embeds) if r.true_cfg else None,
            )  # fmt: skip
            x, img_ids, seeds = self.prepare_latents(r.n, r.height, r.width, generator, latents)
            timesteps = self.get_timesteps(r.steps, x.shape[1], sigmas=sigmas, scheduler=scheduler)
            x, timesteps, cond = self.prepare_conditioning(
                r.mode, x, timesteps, r.width, r.height, image=image, strength=strength, mask_image=mask_image,
                control_image=None if self.controlnets else control_image, kontext_auto_resize=kontext_auto_resize,
            )  # fmt: skip
            controls = []
            if self.controlnets:
                controls = adapters.controls(
                    self, control_image, control_mode, controlnet_conditioning_scale, control_guidance_start,
                    control_guidance_end, r.width, r.height,
                )  # fmt: skip
            if self.ip_adapter is not None:
                cond["ip_tokens"], neg_ip = adapters.ip_tokens(
                    self, ip_adapter_image, negative_ip_adapter_image, r.n, negative is not None
                )
                if negative is not None:
                    negative["ip_tokens"] = neg_ip
            extra = {"img_ids": img_ids, **text, "guidance": float(guidance_scale), **cond}
            step_end = None
            if callback_on_step_end is not None:
                names = callback_on_step_end_tensor_inputs
                step_end = step_end_hook(self, callback_on_step_end, names, timesteps, extra)
            with step_cache(self.transformer, cache) as cached:
                x = self.denoise(
                    x, timesteps, extra, sampler=r.sample, negative=negative, true_cfg_scale=true_cfg_scale,
                    callback=callback, progress=progress, generator=noise_generators(generator, seeds),
                    sampler_options=sampler_options, step_end=step_end, controls=controls,
                )  # fmt: skip
        info = {"height": r.height, "width": r.width, "num_inference_steps": r.steps, "timesteps": timesteps}
        if cached is not None:
            info["cache"] = {"kind": cached.kind, "full": cached.stats.full, "skipped": cached.stats.skipped}
        images = x if output_type == "latent" else self.decode(x, r.height, r.width, output_type)
        out = FluxPipelineOutput(images=images, seeds=seeds, info=info)
        return out if return_dict else out.to_tuple()

    # --- the stages ------------------------------------------------------------------------

    # diffusers' `encode_prompt`, the reference's order, the T5 length (fluxcore.pipeline_text)
    encode_prompt = pipeline_text.encode_prompt
    encode_prompt_reference = pipeline_text.encode_prompt_reference
    cap_max_sequence_length = pipeline_text.cap_max_sequence_length
    default_max_sequence_length = pipeline_text.default_max_sequence_length

    @torch.no_grad()
    def encode_text(
        self, prompts: list[str] | None, num_images_per_prompt: int = 1, max_sequence_length: int | None = None,
        negative_prompts: list[str] | None = None, image_embeds: Tensor | None = None, *,
        prompt_2: list[str] | None = None, negative_prompts_2: list[str] | None = None,
        embeds: tuple[Tensor | None, Tensor | None] = (None, None),
        negative_embeds: tuple[Tensor | None, Tensor | None] | None = None, redux_image=None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:  # fmt: skip
        """The text inputs of the model: ({"txt": [N, L, 4096], "txt_ids": [N, L, 3], "y": [N, 768]},
        the same for the negative prompts (or `negative_embeds`) or None). `prompt_2` /
        `negative_prompts_2` are T5's prompts (default the CLIP ones); `embeds` = (prompt_embeds,
        pooled_prompt_embeds) replace the prompts. Redux tokens from `image_embeds` ([N_r, 1152] or
        [B, N_r, 1152]) or `redux_image` (PIL images, through `siglip`) are appended to both, so
        L = T5 length + N_r. Text inputs are cast to the transformer's dtype."""
        dtype = self.transformer.dtype

        def inputs(p, p2, e) -> dict[str, Tensor]:
            txt, vec, _ = self.encode_prompt(
                p, p2, None, num_images_per_prompt, e[0], e[1], max_sequence_length
            )
            txt = txt.to(dtype)
            ids = torch.zeros(*txt.shape[:2], 3, device=txt.device)
            return {"txt": txt, "txt_ids": ids, "y": vec.to(dtype)}

        text = inputs(prompts, prompt_2, embeds)
        negative = None
        if negative_embeds is not None and negative_embeds[0] is not None:
            negative = inputs(None, None, negative_embeds)
        elif negative_prompts is not None:
            negative = inputs(negative_prompts, negative_prompts_2, (None, None))
        if image_embeds is not None or redux_image is not None:
            tokens = adapters.redux_tokens(self, image_embeds, redux_image)
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

    def get_timesteps(
        self,
        num_steps: int,
        seq_len: int,
        *,
        sigmas: Sequence[float] | None = None,
        scheduler: str | None = None,
    ) -> list[float]:
        """num_steps + 1 flow times 1 → 0 for seq_len packed image tokens, shifted by `self.schedule`:
        the named `scheduler`'s spacing (default "simple", FLUX's), or diffusers' `sigmas` (N flow
        times, shifted, then 0)."""
        if sigmas is not None:
            t = torch.tensor([float(s) for s in sigmas], dtype=torch.float32)
            return self.schedule.apply(t, seq_len).tolist() + [0.0]
        return make_schedule(scheduler or "simple", num_steps, seq_len, self.schedule)

    @torch.no_grad()
    def prepare_conditioning(
        self, mode: str, x: Tensor, timesteps: list[float], width: int, height: int, *, image=None,
        strength: float | None = None, mask_image=None, control_image=None, kontext_auto_resize: bool = True,
    ) -> tuple[Tensor, list[float], dict[str, Tensor]]:  # fmt: skip
        """(start latents [N, L, 64], the flow times to run, the mode's extra model inputs batched to N):

        fill      {"img_cond": [N, L, 320]} from image + mask_image
        control   {"img_cond": [N, L, 64]} from control_image
        kontext   {"img_cond_seq": [N, L_ref, 64], "img_cond_seq_ids": [N, L_ref, 3]} from image
        text      with image: img2img, x and timesteps start later (`img2img_start`); with
                  mask_image too: {"inpaint_x0": [N, L, 64], "inpaint_mask": [N, L, 64]} (masked
                  img2img, `pipeline_adapters.MaskedDenoiser`)
        """
        encode, n = self._encode_image, x.shape[0]
        cond = {}
        if mode == "fill":
            cond = fill_inputs(encode, image, mask_image, width, height)
        elif mode == "control":
            cond = control_inputs(encode, control_image, width, height)
        elif mode == "kontext" and image is not None:
            cond = kontext_inputs(encode, image, kontext_auto_resize)
        elif image is not None:
            init = self._batch(img2img_inputs(encode, image, width, height), n)
            x, timesteps = img2img_start(init, x, timesteps, 0.6 if strength is None else strength)
            if mask_image is not None:
                cond = adapters.inpaint_inputs(init, mask_image, width, height)
        return x, timesteps, {k: self._batch(v, n) for k, v in cond.items()}

    @torch.no_grad()
    def denoise(
        self, x: Tensor, timesteps: Sequence[float], extra: dict, *, sampler: str | Callable = "euler",
        negative: dict | None = None, true_cfg_scale: float = 1.0, callback: Callable[[dict], None] | None = None,
        progress: bool = True, generator=None, sampler_options: dict | None = None, step_end: Callable | None = None,
        controls: Sequence = (),
    ) -> Tensor:  # fmt: skip
        """Run the sampler from packed latents x [N, L, 64] over `timesteps` with the transformer
        and model inputs `extra` (`pipeline_adapters.denoiser`: FlowDenoiser, with `controls`
        (`fluxcore.controlnet.Control`s), the IP-Adapter, CFG with `negative`'s inputs and masked
        img2img as they apply); returns the final packed latents [N, L, 64]. Stochastic samplers that take a
        `generator` get `generator` (one torch.Generator or one per image). `step_end(i, x, t)` runs
        after each step and may return new latents. Non-finite latents raise FluxcoreError."""
        sample = get_sampler(sampler) if isinstance(sampler, str) else sampler
        options = dict(sampler_options or {})
        try:
            params = inspect.signature(sample).parameters
        except (TypeError, ValueError):
            params = {}
        if generator is not None and "generator" not in options and "generator" in params:
            options["generator"] = generator
        if step_end is not None:
            options["step_end"] = step_end
        num_steps = len(timesteps) - 1
        negative_cfg = dict(negative=negative, true_cfg_scale=true_cfg_scale)
        with (
            self._stage(self.transformer, *self.controlnets),
            adapters.denoiser(self, timesteps, extra, controls=controls, **negative_cfg) as model,
        ):
            x = sample(
                model, x, timesteps, extra_args=extra, callback=nan_guard(callback, num_steps),
                disable=None if progress else True, **options,
            )  # fmt: skip
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
            # context parallel: VAE tiles shared among the ranks (fluxcore.parallel_decode)
            decoded = devices.decode(self, unpack(x.float(), height, width)).float().clamp(-1, 1)
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

"""Writing a loaded (or trained) adapter as a LoRA file other tools read.

    save_lora({"transformer": flux, "clip": clip}, "my.safetensors", adapter_name="default")
    save_lora(flux, "my_kohya.safetensors", format="kohya")

format="peft" (default): diffusers / PEFT keys (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`,
`text_encoder.<HF name>.lora_A.weight` for CLIP, `text_encoder_2.` for T5) and a
`lora_adapter_metadata` header (the LoraConfig per component: r, lora_alpha, target_modules, and
rank_pattern / alpha_pattern where modules differ), as diffusers' `save_lora_weights` writes it.
A fused BFL tensor is written as its diffusers pieces: q/k/v of `qkv` and q/k/v/proj_mlp of a single
block's `linear1` each get the shared A and their own rows of B (exact: ΔW_q = B_q A); a piece whose
rows the adapter never writes is left out.

format="kohya": `lora_unet_<BFL path, . → _>.lora_down.weight` (r, in), `.lora_up.weight` (out, r),
`.alpha`; `lora_te1_` CLIP, `lora_te3_` T5; `ss_network_*` metadata as sd-scripts writes it.

Both store the unscaled B with alpha, so s = alpha / r is applied by every loader (fluxcore,
diffusers, ComfyUI, kohya). An adapter that came from a file with no alpha is written with alpha = r.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore.lora.layer import LoraLinear
from fluxcore.lora.patch import LoraError, swap_rows
from fluxcore.lora.targets import Targets, component_of

FORMATS = ("peft", "kohya")
_PEFT_PREFIX = {"transformer": "transformer", "clip": "text_encoder", "t5": "text_encoder_2"}
_KOHYA_PREFIX = {"transformer": "lora_unet_", "clip": "lora_te1_", "t5": "lora_te3_"}


def adapter_pairs(model: nn.Module, adapter_name: str) -> dict[str, tuple[Tensor, Tensor, float, tuple]]:
    """Module path → (A (r, in), B (out, r) unscaled, alpha, (first, end) rows it may write) of
    one adapter, float32.

    Adapters with dense pieces (LoKr, LoHa, full deltas), DoRA or bias deltas have no low-rank
    form and are refused."""
    out = {}
    for path, m in model.named_modules():
        if not isinstance(m, LoraLinear) or adapter_name not in m.adapters:
            continue
        a = m.adapters[adapter_name]
        if a.A is None or len(a.dense) or a.magnitude is not None or a.bias is not None:
            raise LoraError(
                f"{path}: adapter {adapter_name!r} is not a plain low-rank pair (LoKr/LoHa/full/DoRA/bias); "
                "only low-rank adapters can be saved"
            )
        if hasattr(a, "full_B"):  # a TrainableAdapter: scale kept apart
            A, B, alpha = a.A.detach().float(), a.full_B().detach() / a.scale, a.alpha
            written = (a.start, a.start + a.length)
        else:  # a loaded adapter: its B holds s·B already, so alpha = r gives s = 1
            A, B, alpha = a.A.detach().float(), a.B.detach().float(), float(a.A.shape[0])
            written = (0, B.shape[0])
        out[path] = (A, B, float(alpha), written)
    return out


def _as_components(models) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {component_of(models): models}
    return {c: m for c, m in dict(models).items() if m is not None}


def lora_state_dict(
    models, adapter_name: str = "default", format: str = "peft", dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors header) of `save_lora` without writing anything."""
    if format not in FORMATS:
        raise LoraError(f"format must be one of {FORMATS}; got {format!r}")
    comps = _as_components(models)
    sd: dict[str, Tensor] = {}
    configs: dict[str, dict] = {}
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    for comp, model in comps.items():
        pairs = adapter_pairs(model, adapter_name)
        if not pairs:
            continue
        for A, _, alpha, _ in pairs.values():
            ranks[A.shape[0]] += 1
            alphas[alpha] += 1
        if format == "kohya":
            for path, (A, B, alpha, _) in pairs.items():
                k = _KOHYA_PREFIX[comp] + path.replace(".", "_")
                sd[f"{k}.lora_down.weight"] = A.to(dtype).contiguous()
                sd[f"{k}.lora_up.weight"] = B.to(dtype).contiguous()
                sd[f"{k}.alpha"] = torch.tensor(alpha, dtype=dtype)
        else:
            named = _peft_pieces(model, comp, pairs)
            prefix = _PEFT_PREFIX[comp]
            for name, (A, B, _) in named.items():
                sd[f"{prefix}.{name}.lora_A.weight"] = A.to(dtype).contiguous()
                sd[f"{prefix}.{name}.lora_B.weight"] = B.to(dtype).contiguous()
            configs[prefix] = _lora_config(named)
            if comp == "clip":  # PEFT matches name suffixes: this form fits transformers 4 and 5 CLIP
                configs[prefix]["target_modules"] = sorted(
                    n.removeprefix("text_model.") for n in configs[prefix]["target_modules"]
                )
    if not sd:
        raise LoraError(f"no adapter named {adapter_name!r} on the given models")
    if format == "kohya":
        rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
        meta = {
            "ss_network_module": "networks.lora_flux",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_base_model_version": "flux1",
            "modelspec.architecture": "flux-1-dev/lora",
        }
    else:
        packed = {f"{p}.{k}": v for p, cfg in configs.items() for k, v in cfg.items()}
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}
    return sd, meta


def _peft_pieces(model, comp, pairs) -> dict[str, tuple[Tensor, Tensor, float]]:
    """diffusers/HF module name → (A, B rows of that piece, alpha)."""
    if comp != "transformer":
        return {p: (A, B, alpha) for p, (A, B, alpha, _) in pairs.items()}
    pieces: dict[str, list] = {}
    for dname, (path, rows, swap) in Targets(model, "transformer").diffusers.items():
        pieces.setdefault(path, []).append((dname, rows, swap))
    out = {}
    for path, (A, B, alpha, (first, end)) in pairs.items():
        if path not in pieces:
            raise LoraError(f"{path}: no diffusers module for this target; save it with format='kohya'")
        for dname, rows, swap in pieces[path]:
            b = B if rows is None else B[rows[0] : rows[0] + rows[1]]
            if rows is not None and (rows[0] >= end or rows[0] + rows[1] <= first):
                continue  # rows this adapter never writes (e.g. proj_mlp under the attention preset)
            out[dname] = (A, swap_rows(b) if swap else b, alpha)
    return out


def _lora_config(named: dict) -> dict:
    ranks = Counter(A.shape[0] for A, _, _ in named.values())
    alphas = Counter(a for _, _, a in named.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(named),
        "rank_pattern": {n: A.shape[0] for n, (A, _, _) in named.items() if A.shape[0] != r},
        "alpha_pattern": {n: a for n, (_, _, a) in named.items() if a != alpha},
        "lora_dropout": 0.0,
        "use_rslora": False,
        "bias": "none",
        "init_lora_weights": True,
    }


def save_lora(
    models,
    path,
    *,
    adapter_name: str = "default",
    format: str = "peft",
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write adapter `adapter_name` of `models` (one model, or {"transformer": flux, "clip": clip,
    "t5": t5}) to `path` as one safetensors file (atomically). `metadata` adds header entries."""
    from fluxcore.weights.writer import write_safetensors

    sd, meta = lora_state_dict(models, adapter_name, format, dtype)
    meta |= {k: str(v) for k, v in (metadata or {}).items()}
    write_safetensors(path, sd, meta)
    return Path(path)

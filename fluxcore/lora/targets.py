"""What a model offers LoRA files: its Linear-like modules and parameters, by name, and (for the
FLUX transformer) where each diffusers module name lands in the BFL layout."""

from __future__ import annotations

from torch import nn

from fluxcore.lora.layer import LoraLinear
from fluxcore.lora.patch import LoraError
from fluxcore.weights.flux_keys import bfl_key_to_diffusers, single_linear1_sizes

COMPONENTS = ("transformer", "clip", "t5")


def component_of(model: nn.Module) -> str:
    """ "transformer" for fluxcore.Flux, "clip" / "t5" for the text encoders."""
    from fluxcore.model import Flux
    from fluxcore.text.clip import CLIPTextEncoder
    from fluxcore.text.t5 import T5Encoder

    for cls, name in ((Flux, "transformer"), (CLIPTextEncoder, "clip"), (T5Encoder, "t5")):
        if isinstance(model, cls):
            return name
    raise LoraError(
        f"cannot tell which component a {type(model).__name__} is; pass component= one of {COMPONENTS}"
    )


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path → the Linear-like module (a LoraLinear counts once, under its own path)."""
    out: dict[str, nn.Module] = {}
    wrapped: set[str] = set()
    for path, m in model.named_modules():
        if any(path.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(m, LoraLinear):
            wrapped.add(path)
            out[path] = m
        elif hasattr(m, "in_features") and hasattr(m, "out_features") and path:
            out[path] = m
    return out


class Targets:
    """linears: path → (out, in); params: state-dict name → shape; underscored: 'a_b_c' → 'a.b.c'.
    For the transformer also diffusers: diffusers module → (BFL path, rows or None, swap_halves),
    and diffusers_params: diffusers parameter name → BFL parameter name."""

    def __init__(self, model: nn.Module, component: str):
        self.component = component
        self.modules = linear_modules(model)
        self.linears = {p: (m.out_features, m.in_features) for p, m in self.modules.items()}
        self.params = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        self.underscored = {p.replace(".", "_"): p for p in self.linears}
        self.diffusers: dict[str, tuple[str, tuple[int, int] | None, bool]] = {}
        self.diffusers_params: dict[str, str] = {}
        if component == "transformer":
            self._diffusers_names()
        self.diffusers_underscored = {n.replace(".", "_"): n for n in self.diffusers}

    def resolve(self, name: str, *, underscored: bool = False) -> str | None:
        """A module name from a file → the model's path, or None. Text-encoder names are accepted
        with or without the `text_model.` level (transformers 5 dropped it from CLIP's keys)."""
        table = self.underscored if underscored else self.linears
        for candidate in (name, ("text_model_" if underscored else "text_model.") + name):
            if candidate in table:
                return table[candidate] if underscored else candidate
        return None

    def _diffusers_names(self) -> None:
        for path, (out, inp) in self.linears.items():
            try:
                pieces, transform = bfl_key_to_diffusers(path + ".weight")
            except KeyError:  # a module the key map does not know (user-added): BFL names only
                continue
            if len(pieces) == 1:
                self.diffusers[pieces[0].removesuffix(".weight")] = (path, None, transform is not None)
                continue
            sizes = (out // 3,) * 3 if len(pieces) == 3 else single_linear1_sizes(out, inp)
            start = 0
            for piece, size in zip(pieces, sizes):
                self.diffusers[piece.removesuffix(".weight")] = (path, (start, size), False)
                start += size
        for name in self.params:
            if name.endswith("_norm.scale"):
                try:
                    (dname,), _ = bfl_key_to_diffusers(name)
                except KeyError:
                    continue
                self.diffusers_params[dname] = name

"""Layers whose trained tensors fold into frozen weights (LoRA, DoRA, IA3, SSF): merging them
for inference at a plain ViT's cost, undoing it, and the plain timm state dict of the export."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

# (module, parameter name, new value) of one frozen tensor a layer folds into.
Target = tuple[nn.Module, str, torch.Tensor]


class Mergeable(nn.Module):
    """Base of a wrapper whose trained tensors fold into parameters of frozen layers.

    A subclass says what those parameters become (``fold_targets``). ``merge()`` writes them in
    place and keeps the originals: W + dW - dW is not W in floating point (and far from it in
    bf16), so ``unmerge()`` restores the saved tensors and is bit-exact however often it runs.
    A frozen layer that caches a form of its weight (``lora.fp8.Float8Linear``) is told to
    remake it (its ``refresh()``) after each write.
    """

    def __init__(self) -> None:
        super().__init__()
        self.merged = False
        self._saved: list[Target] = []

    def fold_targets(self, parent: nn.Module | None) -> list[Target]:
        """Each parameter the layer folds into and its folded value (any float dtype);
        ``parent`` is the module holding this layer (IA3's activation folds into its fc2)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, parent: nn.Module | None = None) -> None:
        """Fold the trained tensors into the frozen parameters (``fold_targets``)."""
        if self.merged:
            warnings.warn(f"{type(self).__name__} is already merged; merge() ignored", stacklevel=2)
            return
        targets = self.fold_targets(parent)
        self._saved = [(m, name, getattr(m, name).detach().clone()) for m, name, _ in targets]
        self._write(targets)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()``: restore the saved parameters."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__} is not merged; unmerge() ignored", stacklevel=2)
            return
        self._write(self._saved)
        self._saved, self.merged = [], False

    @staticmethod
    def _write(targets: list[Target]) -> None:
        for module, name, value in targets:
            param = getattr(module, name)
            param.copy_(value.to(param.dtype))
        for module in {id(m): m for m, _, _ in targets}.values():
            refresh = getattr(module, "refresh", None)
            if callable(refresh):
                refresh()


def mergeable_layers(model: nn.Module) -> list[tuple[str, Mergeable]]:
    """All (name, Mergeable) pairs of the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Mergeable)]


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def merge(model: nn.Module) -> int:
    """Fold every mergeable layer into its frozen weights; a model already merged is left as it
    is, with a warning. Returns the number of layers merged."""
    layers = mergeable_layers(model)
    if any(layer.merged for _, layer in layers):
        warnings.warn("model already merged; merge() left it as it is", stacklevel=2)
        return 0
    for name, layer in layers:
        layer.merge(_parent(model, name))
    return len(layers)


def unmerge(model: nn.Module) -> int:
    """Undo ``merge``. Returns the number of layers unmerged."""
    merged = [layer for _, layer in mergeable_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    return len(merged)


def canonical_name(key: str) -> str:
    """State-dict key of the plain model that a (possibly wrapped) key stands for."""
    return key.replace(".base_layer.", ".")


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain timm state dict (timm names) with every mergeable layer folded in, without the
    layers' own trained tensors; the model itself is left as it is, merged or not."""
    names = {id(m): n for n, m in model.named_modules()}
    folded: dict[str, torch.Tensor] = {}
    own: set[str] = set()
    for name, layer in mergeable_layers(model):
        own.update(f"{name}.{p}" for p, _ in layer.named_parameters(recurse=False))
        if layer.merged:
            continue
        for module, pname, value in layer.fold_targets(_parent(model, name)):
            folded[f"{names[id(module)]}.{pname}"] = value.detach().to(getattr(module, pname).dtype)
    return {canonical_name(k): folded.get(k, v).detach().clone()
            for k, v in model.state_dict().items() if k not in own}

"""Grad-CAM heatmaps for the ViT classifier, drawn over the original X-ray.

Grad-CAM needs spatial feature maps; a ViT has tokens. The activations of the last block
are taken, the prefix tokens (cls, and VPT's prompts: ``num_prefix_tokens``) are dropped, and
the patch tokens are reshaped to the patch grid (14 x 14 for 224 px inputs). The channel weights are the mean gradients of
the class logit over the patch tokens, as in Grad-CAM. With MAE-style average pooling
(``global_pool='avg'``) every patch token gets the same gradient, so the map is the
exact linear contribution of each patch to the class score before ``fc_norm``.

Attention rollout is not offered: timm's fused attention never materialises the
attention matrix, and gradients work through it unchanged.
"""
from __future__ import annotations

import hashlib
import string
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

from util.precision import autocast


def target_layer(model: nn.Module) -> nn.Module:
    """The module whose output tokens Grad-CAM uses.

    With average pooling: the last block (its patch tokens are what is pooled). With cls
    token pooling the last block's patch outputs get no gradient, so the input of its
    attention (``norm1``, the usual ViT Grad-CAM choice) is used instead; a block that a
    method wraps (VPT's prompted block keeps timm's block as ``.block``) is looked into.
    Tokens before the patch grid (cls, and VPT's prompts) are the model's ``num_prefix_tokens``.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"grad_cam: {type(model).__name__} has no `blocks`; expected a timm ViT")
    if getattr(model, "global_pool", "avg") == "avg":
        return blocks[-1]
    last = blocks[-1]
    return getattr(last, "block", last).norm1


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int,
    layer: nn.Module | None = None,
    amp_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps of one class for a batch: (maps B x gh x gw in [0, 1], probabilities B).

    ``images`` are model inputs (B x 3 x H x W, normalised). Each map is scaled by its own
    maximum; a map with no positive evidence is all zeros. The probabilities are
    sigmoid(logit / ``temperature``): a calibration's temperature for the class gives the
    calibrated ones (the map does not depend on it).
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and not 0 <= class_index < num_classes:
        raise ValueError(f"grad_cam: class_index {class_index} not in [0, {num_classes})")
    layer = layer if layer is not None else target_layer(model)
    grid = tuple(model.patch_embed.grid_size)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        # Predictions run under inference_mode; gradients must be back on here.
        with torch.inference_mode(False), torch.enable_grad():
            x = images.to(device).clone().requires_grad_(True)
            with autocast(device, amp_dtype):
                logits = model(x)
            acts = captured[-1]
            score = logits[:, class_index].float().sum()
            # Samples do not interact in a ViT, so one backward gives every sample's gradient.
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
    acts = acts.detach().float()[:, prefix:]
    grads = grads.detach().float()[:, prefix:]
    if acts.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"grad_cam: {acts.shape[1]} patch tokens do not fill the "
                         f"{grid[0]}x{grid[1]} patch grid")
    weights = grads.mean(dim=1, keepdim=True)  # B x 1 x C
    cam = torch.relu((weights * acts).sum(dim=-1)).reshape(-1, *grid)
    # An all-zero map (no positive evidence) stays zero: 0 / 1e-12.
    cam = cam / cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    probs = torch.sigmoid(logits.detach().float()[:, class_index] / temperature)
    return cam.cpu().numpy(), probs.cpu().numpy()


def eval_crop_box(width: int, height: int, input_size: int, resize: int) -> tuple[float, float, float, float]:
    """Where the eval transform's centre crop lies in the original image (left, top, right, bottom).

    The transform resizes the shorter side to ``resize`` and centre-crops ``input_size``.
    """
    side = input_size * min(width, height) / resize
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def overlay(
    image: Image.Image,
    cam: np.ndarray,
    box: tuple[float, float, float, float] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    label: str | None = None,
) -> Image.Image:
    """Blend a [0, 1] map over an image, inside ``box`` (default: all of it); RGB, same size.

    The colour is weighted by the map, so regions without evidence keep the X-ray visible.
    """
    from matplotlib import colormaps

    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    h, w = base.shape[:2]
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(w), float(h))
    x0, y0 = max(0, int(round(left))), max(0, int(round(top)))
    x1, y1 = min(w, int(round(right))), min(h, int(round(bottom)))
    if x1 > x0 and y1 > y0:
        heat = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F")
        heat = np.clip(np.asarray(heat.resize((x1 - x0, y1 - y0), Image.BILINEAR)), 0.0, 1.0)
        colour = colormaps[cmap](heat)[..., :3].astype(np.float32)
        weight = (alpha * heat)[..., None]
        region = base[y0:y1, x0:x1]
        base[y0:y1, x0:x1] = (1 - weight) * region + weight * colour
    out = Image.fromarray(np.clip(np.rint(base * 255), 0, 255).astype(np.uint8), mode="RGB")
    if label:
        _draw_label(out, label)
    return out


def _draw_label(img: Image.Image, text: str) -> None:
    """Write ``text`` in the top-left corner on a dark band; left out if it cannot fit."""
    draw = ImageDraw.Draw(img)
    for size in range(max(10, img.width // 40), 7, -1):
        try:
            font: Any = ImageFont.load_default(size=size)
        except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
            font = ImageFont.load_default()
        margin, pad = size // 2, max(2, size // 5)
        left, top, right, bottom = draw.textbbox((margin, margin), text, font=font)
        if right + pad < img.width and bottom + pad < img.height // 3:
            draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=(0, 0, 0))
            draw.text((margin, margin), text, fill=(255, 255, 255), font=font)
            return


# Characters kept as they are in heatmap file names; any other is written %XX (UTF-8 bytes).
_PLAIN = frozenset(string.ascii_letters + string.digits + "._-")
_SEPARATOR = "__"  # between path components, and before the class
_MAX_NAME_BYTES = 255  # a file name's limit on common file systems


def _escape(part: str) -> str:
    """One path component (or the class name) as file-name text without '__' in it, not
    starting or ending with '_' and not starting with '.': so '__' separates parts unambiguously."""
    out = []
    for i, ch in enumerate(part):
        if ch == "_":
            plain = 0 < i < len(part) - 1 and part[i - 1] != "_" and part[i + 1] != "_"
        else:
            plain = ch in _PLAIN and not (ch == "." and i == 0)  # no hidden files
        out.append(ch if plain else "".join(f"%{b:02X}" for b in ch.encode("utf-8")))
    return "".join(out)


def heatmap_filename(name: str, class_name: str) -> str:
    """The heatmap file of image ``name`` (as in the CSV) and a class: ``<path>__<class>.png``.

    Path separators become ``__`` and the extension is kept; any other character that could
    be confused with them, or is unsafe in a file name, is written ``%XX``. Different
    (name, class) pairs never share a file name: ``img.png`` / ``img.jpg``, ``sub/a.png`` /
    ``sub__a.png`` and ``Pleural Effusion`` / ``Pleural_Effusion`` all stay apart.
    """
    parts = [_escape(p) for p in name.split("/")]
    filename = _SEPARATOR.join([*parts, _escape(class_name)]) + ".png"
    if len(filename.encode()) <= _MAX_NAME_BYTES:
        return filename
    # Too long for a file system (255 bytes): keep the end, which names the image and the
    # class, and a digest of the whole name so that distinct names stay distinct.
    digest = hashlib.sha256(filename.encode()).hexdigest()[:16]
    tail = filename.encode()[-(_MAX_NAME_BYTES - len(digest) - 1):].decode(errors="ignore")
    return f"{digest}-{tail}"


def heatmap_targets(files: Sequence[str | Path], names: Sequence[str], class_name: str
                     ) -> dict[int, str]:
    """{input index: file name} of the inputs to draw: the same image named twice is drawn
    once; two different images that would write one file raise ``ValueError``."""
    targets: dict[int, str] = {}
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        target = heatmap_filename(name, class_name)
        j = first.setdefault(target, i)
        if j == i:
            targets[i] = target
        elif Path(files[i]).resolve() != Path(files[j]).resolve():
            raise ValueError(f"heatmaps: inputs {names[j]!r} ({files[j]}) and {name!r} "
                             f"({files[i]}) are two images with one name, so they would write "
                             f"one heatmap file {target}; give them distinct names (paths)")
    return targets


def save_heatmaps(
    model: nn.Module,
    files: Sequence[str | Path],
    names: Sequence[str],
    class_index: int,
    class_name: str,
    out_dir: str | Path,
    transform: Callable[[Image.Image], torch.Tensor],
    load: Callable[[str | Path], Image.Image],
    input_size: int,
    resize: int,
    batch_size: int = 16,
    amp_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
) -> tuple[list[Path], dict[int, str]]:
    """Write one overlay PNG per image for one class; returns (written paths, {index: error}).

    ``load`` decodes a file to an 8-bit grey PIL image, ``transform`` makes the model
    input from it (the eval transform: the shorter side resized to ``resize``, then a centre
    crop of ``input_size``, as ``datasets.transforms.eval_resize`` says), so that the map is
    drawn where the crop lies. The overlay has the original image's size and is labelled
    with the class's probability at ``temperature`` (see ``grad_cam``). An
    image whose probability or map is NaN / inf gets no file and an entry in the errors.
    File names come from ``heatmap_filename``; two different images with one name raise
    ``ValueError`` before anything is written (the same image named twice is drawn once).
    """
    if len(files) != len(names):
        raise ValueError(f"save_heatmaps: {len(files)} files but {len(names)} names")
    targets = heatmap_targets(files, names, class_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failures: dict[int, str] = {}
    todo = sorted(targets)
    for start in range(0, len(todo), batch_size):
        batch: list[tuple[int, Image.Image, torch.Tensor]] = []
        for i in todo[start:start + batch_size]:
            try:
                img = load(files[i])
                tensor = transform(img)
            except Exception as err:  # any bad file is reported, the others go on
                failures[i] = f"{type(err).__name__}: {err}"
                continue
            batch.append((i, img, tensor))
        if not batch:
            continue
        cams, probs = grad_cam(model, torch.stack([t for _, _, t in batch]), class_index,
                               amp_dtype=amp_dtype, temperature=temperature)
        for (i, img, _), cam, prob in zip(batch, cams, probs):
            if not (np.isfinite(prob) and np.isfinite(cam).all()):
                # A NaN map would be drawn as a plausible-looking (blank) overlay.
                failures[i] = "non-finite model output: no heatmap"
                continue
            box = eval_crop_box(img.width, img.height, input_size, resize)
            picture = overlay(img, cam, box, label=f"{class_name}  p={prob:.3f}")
            path = out_dir / targets[i]
            picture.save(path, format="PNG")
            written.append(path)
    return written, failures

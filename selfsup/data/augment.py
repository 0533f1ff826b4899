"""Batched, per-sample-random data augmentation for self-supervised learning.

All augmentations operate on a whole batch at once (CPU or GPU) but every
random parameter (crop box, flip, colour-jitter factors *and* jitter order,
grayscale, blur sigma, solarize) is drawn independently for every sample, as
in the per-image torchvision pipelines used by SimCLR / MoCo.

Pipeline applied by :class:`BatchAugment` (the usual SimCLR/MoCo order)::

    uint8 (B, C, H, W), C in {1, 3}
      -> random resized crop to (size, size), bilinear   [float32 in [0, 1]]
      -> random horizontal flip
      -> random rotation (prob. rotate_p, angle in [-rotate, rotate] degrees, zero fill)
      -> colour jitter (prob. jitter_p, random op order per sample)
      -> random grayscale (prob. gray_p)
      -> gaussian blur (prob. blur_p)
      -> solarize (prob. solarize_p)
      -> random erasing (prob. erase_p: one rectangle of 2-20% of the area set to 0)
      -> replicate C=1 to 3 channels, normalise with mean/std
      => float32 (B, 3, size, size)

Each step follows the semantics of the corresponding
``torchvision.transforms.v2.functional`` op on float images.

Single-channel inputs are processed with one channel and replicated at the
end; this gives the same result as replicating first (grayscale luma of a
gray pixel is ``0.9999 * v``, which is reproduced; hue is the identity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# the normalisation of every view and of the clean (evaluation) transform; exports record it
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "BatchAugment",
    "eval_transform",
    "simclr_augment",
    "mocov2_augment",
    "mocov1_augment",
    "AUGMENT_PRESETS",
    "build_augment",
]

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# Indices of the colour-jitter ops in ``params["order"]``.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


# ---------------------------------------------------------------------------
# Functional building blocks (batched, per-sample parameters)
# ---------------------------------------------------------------------------


def _resize_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Per-sample 1-D interpolation matrices for "crop then resize".

    Reproduces ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False, antialias=True)`` applied to the window
    ``[start, start + length)`` of an axis of length ``in_size``: a triangle
    filter whose support is stretched by the scale factor when downscaling,
    truncated to the window and renormalised. For upscaling this equals plain
    bilinear interpolation with edge clamping (``antialias=False``).

    Args:
        start, length: (B,) integer tensors, window offset and length.
    Returns:
        (B, out_size, in_size) float32 matrix ``W`` with ``out = W @ in``.
    """
    device = start.device
    scale = (length.to(torch.float32) / out_size).view(-1, 1, 1)  # (B, 1, 1)
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=device, dtype=torch.float32).view(1, -1, 1) + 0.5)
    j = torch.arange(in_size, device=device).view(1, 1, -1) - start.view(-1, 1, 1)  # crop coords
    w = (1.0 - ((j.to(torch.float32) + 0.5 - center) * invscale).abs()).clamp_min(0.0)
    w = w * ((j >= 0) & (j < length.view(-1, 1, 1)))
    return w / w.sum(dim=-1, keepdim=True)


def _resized_crop(
    images: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, size: int, flip: Tensor | None = None,
    dense: bool | None = None,
) -> Tensor:
    """Batched crop + bilinear resize (+ optional horizontal flip).

    Args:
        images: (B, C, H, W) uint8 or float.
        top, left, height, width: (B,) integer crop boxes (torchvision convention).
        flip: optional (B,) bool, flip the output horizontally.
        dense: one batched pair of matrix products (default off the CPU: no per-sample loop, no host
            sync; and for small images) or F.interpolate per sample on its box (the same arithmetic;
            default for CPU images over 128x128 px).
    Returns:
        (B, C, size, size) float32, in the input's value range (uint8 stays 0..255).
    """
    _, _, h_img, w_img = images.shape
    if dense is None:   # measured on a 2-core CPU (selfsup bench augment): dense wins up to ~96 px
        dense = images.device.type != "cpu" or h_img * w_img <= 128 * 128
    if not dense:   # large CPU images: per sample, a few filter taps per pixel beat dense (B, size, H) matrices
        boxes = torch.stack([top, left, height, width], 1).tolist()
        x = torch.cat([F.interpolate(images[i:i + 1, :, t:t + h, l:l + w].to(torch.float32), size=(size, size),
                                     mode="bilinear", antialias=True, align_corners=False)
                       for i, (t, l, h, w) in enumerate(boxes)])
        return x if flip is None else torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    wy = _resize_weights(top, height, h_img, size)  # (B, size, H)
    wx = _resize_weights(left, width, w_img, size)  # (B, size, W)
    if flip is not None:
        wx = torch.where(flip.view(-1, 1, 1), wx.flip(1), wx)
    bsz, c = images.shape[:2]
    x = torch.bmm(images.to(torch.float32).reshape(bsz, c * h_img, w_img), wx.transpose(1, 2))  # (B, C*H, size)
    x = x.view(bsz, c, h_img, size).transpose(1, 2).reshape(bsz, h_img, c * size)
    x = torch.bmm(wy, x)  # (B, size, C*size)
    return x.view(bsz, size, c, size).transpose(1, 2).contiguous()  # (B, C, size, size)


def _gray(x: Tensor) -> Tensor:
    """Luma of (B, C, H, W) float images -> (B, 1, H, W).

    For C=1 the image stands for a replicated gray RGB image, whose luma is
    ``sum(_LUMA) * v``.
    """
    if x.shape[1] == 3:
        r, g, b = x.unbind(dim=1)
        return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)
    return x * sum(_LUMA)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of (B, 3, H, W) float images in [0, 1] by ``shift`` (B,) (in turns).

    Same result as torchvision adjust_hue (RGB -> HSV, ``h = (h + shift) mod 1``,
    HSV -> RGB), without forming S and V: a hue rotation keeps the channel max
    and min, and with ``h6 = 6 h`` in [0, 6) the output channels are
    ``min + (max - min) * c`` with ``c_R = clamp(|h6 - 3| - 1, 0, 1)``,
    ``c_G = clamp(2 - |h6 - 2|, 0, 1)``, ``c_B = clamp(2 - |h6 - 4|, 0, 1)``.
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    # Sector of the max channel (ties resolved R, then G, then B, as torchvision).
    fr = (maxc == r).to(x.dtype)
    fg = (maxc == g).to(x.dtype) * (1.0 - fr)
    fb = 1.0 - fr - fg
    num = fr * (g - b) + fg * (b - r) + fb * (r - g)
    # Gray pixels (delta == 0): hue is irrelevant, every output channel equals max.
    h6 = num / torch.where(delta > 0, delta, 1.0) + 2.0 * fg + 4.0 * fb + 6.0 * shift.view(-1, 1, 1)
    h6 = h6 - 6.0 * torch.floor(h6 * (1.0 / 6.0))  # (B, H, W) in [0, 6)
    c = torch.stack(((h6 - 3.0).abs_().sub_(1.0), 2.0 - (h6 - 2.0).abs_(), 2.0 - (h6 - 4.0).abs_()), dim=1)
    return c.clamp_(0.0, 1.0).mul_(delta.unsqueeze(1)).add_(minc.unsqueeze(1))


def _color_jitter(
    x: Tensor, apply: Tensor, order: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor, hue: Tensor
) -> Tensor:
    """Colour jitter with per-sample factors and per-sample op order.

    Brightness ``clamp(f x)``, contrast ``clamp(f x + (1-f) mean(gray(x)))``,
    saturation ``clamp(f x + (1-f) gray(x))`` (all blends with a per-sample
    reference) and hue rotation, as torchvision ColorJitter on float images.

    Args:
        x: (B, C, H, W) float in [0, 1], C in {1, 3} (C=1: replicated gray image,
           for which hue is the identity).
        apply: (B,) bool, samples to jitter (others are returned unchanged).
        order: (B, 4) long, a permutation of (brightness, contrast, saturation, hue) per sample.
        brightness, contrast, saturation: (B,) factors; hue: (B,) shift in [-0.5, 0.5].
    Returns:
        (B, C, H, W) float.
    """
    bsz = x.shape[0]
    one = torch.ones_like(brightness)
    for pos in range(4):
        op = order[:, pos]
        # Blend factor and reference for the op at this position (identity for hue / unselected).
        factor = torch.where(op == _BRIGHTNESS, brightness, one)
        factor = torch.where(op == _CONTRAST, contrast, factor)
        factor = torch.where(op == _SATURATION, saturation, factor)
        factor = torch.where(apply, factor, one).view(bsz, 1, 1, 1)
        gray = _gray(x)
        ref = torch.where(
            (op == _CONTRAST).view(bsz, 1, 1, 1), gray.mean(dim=(1, 2, 3), keepdim=True), gray
        )
        ref = torch.where((op == _BRIGHTNESS).view(bsz, 1, 1, 1), torch.zeros_like(ref), ref)
        x = torch.lerp(ref, x, factor).clamp_(0.0, 1.0)  # factor * x + (1 - factor) * ref
        if x.shape[1] == 3:
            x = _masked_hue(x, apply & (op == _HUE) & (hue != 0), hue)
    return x


def _masked(x: Tensor, mask: Tensor, fn, subset: bool | None = None) -> Tensor:
    """``fn(x[i], i)`` for the samples of ``x`` where ``mask`` (B,) is set, the others unchanged;
    ``fn(xs, idx)`` maps a batch ``xs`` of the samples ``idx`` (indices into the batch) to new values.

    ``subset`` (default: on CPU) computes only the selected samples (needs their indices on the
    host) and writes them into ``x`` in place; otherwise the whole batch is computed and the result
    selected with ``torch.where`` (no host synchronisation, for GPUs).
    """
    if subset is None:
        subset = x.device.type == "cpu"
    if not subset:
        return torch.where(mask.view(-1, 1, 1, 1), fn(x, torch.arange(x.shape[0], device=x.device)), x)
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    return x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))


def _masked_hue(x: Tensor, mask: Tensor, shift: Tensor, subset: bool | None = None) -> Tensor:
    """Hue-rotate the samples of (B, 3, H, W) ``x`` where ``mask`` (B,) is set (see :func:`_masked`)."""
    return _masked(x, mask, lambda xs, idx: _adjust_hue(xs, shift[idx]), subset)


def _gaussian_kernels(ksize: int, sigma: Tensor) -> Tensor:
    """(B,) sigmas -> (B, ksize) normalised 1-D gaussian kernels (torchvision's)."""
    t = torch.arange(ksize, device=sigma.device, dtype=torch.float32) - (ksize - 1) / 2
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _gaussian_blur(x: Tensor, ksize: int, sigma: Tensor) -> Tensor:
    """Separable gaussian blur with a per-sample sigma and reflect padding.

    Args:
        x: (B, C, H, W) float; ksize: odd kernel size; sigma: (B,) > 0.
    Returns:
        (B, C, H, W) float, equal to torchvision gaussian_blur(x[i], ksize, sigma[i]) per sample.
    """
    bsz, c, h, w = x.shape
    pad = ksize // 2
    k = _gaussian_kernels(ksize, sigma).repeat_interleave(c, dim=0)  # (B*C, ksize)
    y = F.pad(x.reshape(1, bsz * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(bsz * c, 1, 1, ksize), groups=bsz * c)
    y = F.conv2d(y, k.view(bsz * c, 1, ksize, 1), groups=bsz * c)
    return y.view(bsz, c, h, w)


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image of (B, C, H, W) float ``x`` about its centre by ``degrees`` (B,) (counter-clockwise),
    bilinear, corners outside the source filled with 0 (torchvision ``rotate`` with ``fill=0``)."""
    a = degrees * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    # the sampling grid maps output to input coordinates: the inverse rotation (a clockwise turn in the
    # y-down normalised grid rotates the image counter-clockwise)
    theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)   # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _erase(x: Tensor, apply: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Set the rectangle [top, top + height) x [left, left + width) of each image of (B, C, H, W) ``x``
    where ``apply`` (B,) is set to 0 (random erasing / cutout, in [0, 1] pixel space)."""
    _, _, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + height).view(-1, 1, 1)) &
              (xs >= left.view(-1, 1, 1)) & (xs < (left + width).view(-1, 1, 1)))
    return x.masked_fill((inside & apply.view(-1, 1, 1)).unsqueeze(1), 0.0)


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(B, C, H, W) float, C in {1, 3} -> (B, 3, H, W) ``(x - mean) / std`` per channel.

    A single channel is replicated to 3. Uses Python scalars only (no host-to-device copies).
    """
    b, c, h, w = x.shape
    out = torch.empty((b, 3, h, w), dtype=x.dtype, device=x.device)
    for i in range(3):
        out[:, i] = (x[:, i if c == 3 else 0] - mean[i]) / std[i]
    return out


def _check_channels(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}")


# ---------------------------------------------------------------------------
# Parameter sampling
# ---------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, generator, device, shape=None) -> Tensor:
    shape = (n,) if shape is None else shape
    return lo + (hi - lo) * torch.rand(shape, generator=generator, device=device)


def central_crop_size(height: int, width: int, ratio) -> tuple[int, int]:
    """RandomResizedCrop's fallback when no try is valid: (h, w) of the whole image clamped to the
    aspect-ratio range `ratio` (centred by the caller)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def _sample_crop_boxes(
    batch: int, height: int, width: int, scale, ratio, generator, device, tries: int = 10
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Vectorised ``RandomResizedCrop.get_params``: (B,) long top, left, h, w.

    Draws ``tries`` candidate boxes per sample, keeps the first valid one, and
    falls back to torchvision's central crop when none is valid.
    """
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * _uniform(batch, scale[0], scale[1], generator, device, (batch, tries))
    aspect = torch.exp(_uniform(batch, log_r[0], log_r[1], generator, device, (batch, tries)))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid try (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = valid.any(dim=1)

    fh, fw = central_crop_size(height, width, ratio)   # the fallback: the same for all samples
    h = torch.where(found, h, torch.full_like(h, fh))
    w = torch.where(found, w, torch.full_like(w, fw))

    u = torch.rand((2, batch), generator=generator, device=device)
    top = torch.floor(u[0] * (height - h + 1)).long().clamp(max=height - h)
    left = torch.floor(u[1] * (width - w + 1)).long().clamp(max=width - w)
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return top, left, h, w


def _sample_erase_boxes(batch: int, height: int, width: int, scale, ratio, generator, device):
    """(B,) long top, left, h, w of one erasing rectangle per image: area a fraction in `scale` of the
    image, aspect ratio log-uniform in `ratio`, clipped to the image, position uniform."""
    area = height * width * _uniform(batch, scale[0], scale[1], generator, device)
    aspect = torch.exp(_uniform(batch, math.log(ratio[0]), math.log(ratio[1]), generator, device))
    h = torch.round(torch.sqrt(area / aspect)).long().clamp(1, height)
    w = torch.round(torch.sqrt(area * aspect)).long().clamp(1, width)
    u = torch.rand((2, batch), generator=generator, device=device)
    top = torch.floor(u[0] * (height - h + 1)).long()
    left = torch.floor(u[1] * (width - w + 1)).long()
    return top, left, h, w


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


class BatchAugment:
    """Random SSL augmentation of a uint8 image batch with per-sample parameters.

    ``aug(images)`` maps uint8 ``(B, C, H, W)`` (C in {1, 3}, any device) to
    float32 ``(B, 3, size, size)`` normalised with ``mean``/``std``. Call it
    twice on the same batch to get two views.

    Args:
        size: output side length.
        crop_scale, crop_ratio: RandomResizedCrop area-fraction and aspect-ratio ranges.
        flip_p: horizontal flip probability.
        jitter: (brightness, contrast, saturation, hue) strengths as in ColorJitter;
            factors are drawn from [max(0, 1-s), 1+s] and hue from [-h, h].
        jitter_p: probability of applying colour jitter.
        gray_p: probability of converting to grayscale (replicated to 3 channels).
        blur_p, blur_sigma: gaussian blur probability and sigma range.
        blur_kernel_frac: kernel size = int(frac * size), made odd (SimCLR: 0.1).
        solarize_p, solarize_threshold: solarize probability and threshold in [0, 1].
        rotate, rotate_p: random rotation by an angle uniform in [-rotate, rotate] degrees with
            probability rotate_p (after the crop; corners filled with 0, black).
        erase_p, erase_scale, erase_ratio: random erasing (cutout) with probability erase_p: one
            rectangle of a fraction erase_scale of the area, aspect ratio erase_ratio, set to 0 (black).
        mean, std: per-channel normalisation (3 values each).

    Notes:
        The crop uses per-sample separable interpolation matrices that reproduce
        ``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)``
        on float images (bilinear; for upscaling this equals ``antialias=False``).
        Compared to torchvision on uint8 inputs the result is not rounded to
        uint8 after the crop (it stays float), i.e. it differs by < 1 level.
    """

    def __init__(
        self,
        size: int,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        flip_p=0.5,
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        gray_p=0.2,
        blur_p=0.0,
        blur_sigma=(0.1, 2.0),
        blur_kernel_frac=0.1,
        solarize_p=0.0,
        solarize_threshold=0.5,
        rotate=0.0,
        rotate_p=0.0,
        erase_p=0.0,
        erase_scale=(0.02, 0.2),
        erase_ratio=(0.3, 3.3),
        mean=IMAGE_MEAN,
        std=IMAGE_STD,
    ):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        if not (0 < crop_ratio[0] <= crop_ratio[1]):
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {crop_ratio}")
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(f"jitter must be 4 non-negative strengths with hue <= 0.5, got {jitter}")
        if not (0 < blur_sigma[0] <= blur_sigma[1]):
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {blur_sigma}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need 3 values each")
        for name, p in [("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p),
                        ("blur_p", blur_p), ("solarize_p", solarize_p), ("rotate_p", rotate_p),
                        ("erase_p", erase_p)]:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.size = int(size)
        self.crop_scale = tuple(float(v) for v in crop_scale)
        self.crop_ratio = tuple(float(v) for v in crop_ratio)
        self.flip_p = float(flip_p)
        self.jitter = tuple(float(v) for v in jitter)
        self.jitter_p = float(jitter_p)
        self.gray_p = float(gray_p)
        self.blur_p = float(blur_p)
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        self.blur_kernel_frac = float(blur_kernel_frac)
        k = int(self.blur_kernel_frac * self.size)
        self.blur_kernel = max(k + 1 if k % 2 == 0 else k, 1)
        self.solarize_p = float(solarize_p)
        self.solarize_threshold = float(solarize_threshold)
        if rotate < 0 or rotate > 180:
            raise ValueError(f"rotate must be in [0, 180] degrees, got {rotate}")
        if not (0 < erase_scale[0] <= erase_scale[1] <= 1) or not (0 < erase_ratio[0] <= erase_ratio[1]):
            raise ValueError(f"erase_scale must satisfy 0 < lo <= hi <= 1 and erase_ratio 0 < lo <= hi, got "
                             f"{erase_scale}, {erase_ratio}")
        self.rotate, self.rotate_p = float(rotate), float(rotate_p)
        self.erase_p = float(erase_p)
        self.erase_scale = tuple(float(v) for v in erase_scale)
        self.erase_ratio = tuple(float(v) for v in erase_ratio)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __repr__(self) -> str:
        keys = ["size", "crop_scale", "crop_ratio", "flip_p", "jitter", "jitter_p", "gray_p",
                "blur_p", "blur_sigma", "blur_kernel", "solarize_p", "solarize_threshold", "rotate", "rotate_p",
                "erase_p", "erase_scale", "erase_ratio", "mean", "std"]
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)}" for k in keys) + ")"

    def sample_params(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None, device=None
    ) -> dict[str, Tensor]:
        """Draw independent random parameters for each of ``batch`` images of size (height, width).

        Random numbers are drawn on ``generator.device`` (or ``device`` when no
        generator is given) and the result is moved to ``device``.

        Returns a dict of per-sample tensors (B = batch):
            top, left, height, width: (B,) long crop boxes (RandomResizedCrop.get_params).
            flip: (B,) bool.
            jitter: (B,) bool, apply colour jitter.
            brightness, contrast, saturation: (B,) float32 factors; hue: (B,) float32 shift.
            order: (B, 4) long, per-sample permutation of ops
                (0 brightness, 1 contrast, 2 saturation, 3 hue).
            gray, blur, solarize: (B,) bool; sigma: (B,) float32 blur sigma.
            With rotate_p > 0: rotate (B,) bool and angle (B,) float32 degrees; with erase_p > 0: erase
            (B,) bool and erase_top, erase_left, erase_height, erase_width (B,) long. (Drawn after the
            others, only when enabled: the draws of a pipeline without them are unchanged.)
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        gdev = generator.device if generator is not None else device
        top, left, h, w = _sample_crop_boxes(
            batch, height, width, self.crop_scale, self.crop_ratio, generator, gdev
        )
        b, c, s, hue = self.jitter
        coin = torch.rand((5, batch), generator=generator, device=gdev)
        params = {
            "top": top,
            "left": left,
            "height": h,
            "width": w,
            "flip": coin[0] < self.flip_p,
            "jitter": coin[1] < self.jitter_p,
            "brightness": _uniform(batch, max(0.0, 1 - b), 1 + b, generator, gdev),
            "contrast": _uniform(batch, max(0.0, 1 - c), 1 + c, generator, gdev),
            "saturation": _uniform(batch, max(0.0, 1 - s), 1 + s, generator, gdev),
            "hue": _uniform(batch, -hue, hue, generator, gdev),
            "order": torch.rand((batch, 4), generator=generator, device=gdev).argsort(dim=1),
            "gray": coin[2] < self.gray_p,
            "blur": coin[3] < self.blur_p,
            "sigma": _uniform(batch, self.blur_sigma[0], self.blur_sigma[1], generator, gdev),
            "solarize": coin[4] < self.solarize_p,
        }
        if self.rotate_p > 0:
            params["rotate"] = torch.rand(batch, generator=generator, device=gdev) < self.rotate_p
            params["angle"] = _uniform(batch, -self.rotate, self.rotate, generator, gdev)
        if self.erase_p > 0:
            params["erase"] = torch.rand(batch, generator=generator, device=gdev) < self.erase_p
            boxes = _sample_erase_boxes(batch, self.size, self.size, self.erase_scale, self.erase_ratio, generator, gdev)
            params.update(zip(("erase_top", "erase_left", "erase_height", "erase_width"), boxes))
        return {k: v.to(device) for k, v in params.items()}

    def apply(self, images: Tensor, params: dict[str, Tensor], crop: bool = True) -> Tensor:
        """Augment ``images`` with given ``params`` (from :meth:`sample_params`).

        Args:
            images: (B, C, H, W) uint8, C in {1, 3}, any device.
            params: per-sample parameter tensors on ``images.device``.
            crop: False for images already cut to ``size`` (the crop box is ignored).
        Returns:
            (B, 3, size, size) float32, normalised with mean/std.
        """
        _check_channels(images)
        bsz = images.shape[0]
        p = params
        if crop:
            x = _resized_crop(images, p["top"], p["left"], p["height"], p["width"], self.size, p["flip"])
            x = x * (1.0 / 255.0)  # float32 in [0, 1]
        else:   # already cut to size: only the flip
            x = images.to(torch.float32) * (1.0 / 255.0)
            x = torch.where(p["flip"].view(bsz, 1, 1, 1), x.flip(-1), x)
        if self.rotate_p > 0 and self.rotate > 0:
            x = _masked(x, p["rotate"], lambda xs, idx: _rotate(xs, p["angle"][idx]))
        if self.jitter_p > 0 and any(v > 0 for v in self.jitter):
            x = _color_jitter(x, p["jitter"], p["order"], p["brightness"], p["contrast"], p["saturation"], p["hue"])
        if self.gray_p > 0:
            x = torch.where(p["gray"].view(bsz, 1, 1, 1), _gray(x).expand_as(x), x)
        if self.blur_p > 0 and self.blur_kernel > 1:
            x = _masked(x, p["blur"], lambda xs, idx: _gaussian_blur(xs, self.blur_kernel, p["sigma"][idx]))
        if self.solarize_p > 0:
            sol = p["solarize"].view(bsz, 1, 1, 1) & (x >= self.solarize_threshold)
            x = torch.where(sol, 1.0 - x, x)
        if self.erase_p > 0:
            x = _erase(x, p["erase"], p["erase_top"], p["erase_left"], p["erase_height"], p["erase_width"])
        return _normalize(x, self.mean, self.std)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None, crop: bool = True) -> Tensor:
        """Sample per-sample parameters on ``images.device`` and apply them.

        images: (B, C, H, W) uint8 -> (B, 3, size, size) float32. ``crop=False``: the images are
        already random-resized crops of side ``size`` (cut while decoding, selfsup.data.loader);
        every other step (flip, colour, blur, ...) is applied as usual.
        """
        _check_channels(images)
        b, _, h, w = images.shape
        if not crop and (h, w) != (self.size, self.size):
            raise ValueError(f"crop=False needs images of {self.size}x{self.size}, got {h}x{w}")
        return self.apply(images, self.sample_params(b, h, w, generator=generator, device=images.device), crop)


def eval_transform(
    images: Tensor, size: int | None = None, mean=IMAGE_MEAN, std=IMAGE_STD
) -> Tensor:
    """Deterministic ("clean") evaluation transform.

    uint8 (B, C, H, W), C in {1, 3} -> float32 (B, 3, S, S) normalised, where
    S = size. If ``size`` is given and differs from the image size, the shorter
    side is resized to ``size`` (bilinear, antialiased) and the centre is
    cropped (torchvision Resize + CenterCrop); otherwise the image is only
    converted and normalised (then H, W are kept).
    """
    _check_channels(images)
    x = images.to(torch.float32) * (1.0 / 255.0)
    _, _, h, w = x.shape
    if size is not None and (h, w) != (size, size):
        short, long = min(h, w), max(h, w)
        if short != size:
            new_long = int(size * long / short)
            new_h, new_w = (size, new_long) if h <= w else (new_long, size)
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
        _, _, h, w = x.shape
        top = int(round((h - size) / 2.0))
        left = int(round((w - size) / 2.0))
        x = x[:, :, top : top + size, left : left + size]
    return _normalize(x, mean, std)


def simclr_augment(size: int, strength: float = 0.5, blur: bool | None = None, **overrides) -> BatchAugment:
    """SimCLR augmentation: crop 0.08-1, flip, jitter (0.8s, 0.8s, 0.8s, 0.2s) p=0.8,
    grayscale p=0.2, gaussian blur p=0.5 (sigma 0.1-2, kernel 10% of side) if ``blur``
    (default: size >= 64, i.e. not for CIFAR-sized images)."""
    if blur is None:
        blur = size >= 64
    s = float(strength)
    kwargs = dict(
        crop_scale=(0.08, 1.0), flip_p=0.5, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8,
        gray_p=0.2, blur_p=0.5 if blur else 0.0, blur_sigma=(0.1, 2.0), blur_kernel_frac=0.1,
    )
    kwargs.update(overrides)
    return BatchAugment(size, **kwargs)


def mocov2_augment(size: int, blur: bool | None = None, **overrides) -> BatchAugment:
    """MoCo v2 "aug+": crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
    blur p=0.5 (default on when size >= 64), flip 0.5."""
    if blur is None:
        blur = size >= 64
    kwargs = dict(
        crop_scale=(0.2, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
        gray_p=0.2, blur_p=0.5 if blur else 0.0, blur_sigma=(0.1, 2.0), blur_kernel_frac=0.1,
    )
    kwargs.update(overrides)
    return BatchAugment(size, **kwargs)


def mocov1_augment(size: int, blur: bool | None = None, **overrides) -> BatchAugment:
    """MoCo v1: crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.4) always, grayscale p=0.2, flip 0.5.

    No blur in MoCo v1; ``blur=True`` adds gaussian blur p=0.5 (``None``/``False``: off),
    so that every preset accepts the same ``blur`` argument.
    """
    kwargs = dict(
        crop_scale=(0.2, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2,
        blur_p=0.5 if blur else 0.0, blur_sigma=(0.1, 2.0), blur_kernel_frac=0.1,
    )
    kwargs.update(overrides)
    return BatchAugment(size, **kwargs)


AUGMENT_PRESETS = {"simclr": simclr_augment, "mocov2": mocov2_augment, "mocov1": mocov1_augment}


def build_augment(preset: str, size: int, **kwargs) -> BatchAugment:
    """Build a :class:`BatchAugment` from a preset name in :data:`AUGMENT_PRESETS`."""
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; valid: {sorted(AUGMENT_PRESETS)}")
    return AUGMENT_PRESETS[preset](size, **kwargs)


def crop_flip_augment(size: int, crop_scale=(0.08, 1.0)) -> BatchAugment:
    """Random resized crop + horizontal flip only (linear evaluation with augmentation, fine-tuning)."""
    return BatchAugment(size, crop_scale=tuple(crop_scale), flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def augment_from_config(a, size: int, crop_scale=None) -> BatchAugment:
    """The training augmentation of config section `a` (``cfg.aug``) at `size` pixels, optionally
    with another crop scale range (multi-crop)."""
    return build_augment(a.preset, size, **({"strength": a.strength} if a.preset == "simclr" else {}),
                         blur=a.blur, crop_scale=tuple(crop_scale or a.crop_scale), jitter_p=a.jitter_p,
                         gray_p=a.gray_p, solarize_p=a.solarize_p, rotate=a.rotate, rotate_p=a.rotate_p,
                         erase_p=a.erase_p)

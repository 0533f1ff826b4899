"""Tests for selfsup.data.augment: batched per-sample ops vs torchvision's functional ops.

Tolerances: float images in [0, 1] are compared with ``atol=TOL = 1e-5``
(differences are float32 rounding only); uint8 references within 1 level.
"""

import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from selfsup.data.augment import (
    AUGMENT_PRESETS,
    BatchAugment,
    _masked_hue,
    build_augment,
    eval_transform,
    mocov1_augment,
    mocov2_augment,
    simclr_augment,
)

TOL = 1e-5
IDENTITY_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _images(b=4, c=3, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


def _plain_aug(size, **kw):
    """BatchAugment with every random op off and identity normalisation."""
    args = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0, **IDENTITY_NORM)
    args.update(kw)
    return BatchAugment(size, **args)


def _params(aug, images, **fields):
    """Identity parameters (full-image crop, nothing applied), overridden by ``fields``.

    Tensor-valued fields are per-sample; lists are converted to tensors.
    """
    b, _, h, w = images.shape
    p = aug.sample_params(b, h, w, generator=torch.Generator().manual_seed(123))
    p.update(
        top=torch.zeros(b, dtype=torch.long), left=torch.zeros(b, dtype=torch.long),
        height=torch.full((b,), h, dtype=torch.long), width=torch.full((b,), w, dtype=torch.long),
        flip=torch.zeros(b, dtype=torch.bool), jitter=torch.zeros(b, dtype=torch.bool),
        brightness=torch.ones(b), contrast=torch.ones(b), saturation=torch.ones(b), hue=torch.zeros(b),
        order=torch.arange(4).repeat(b, 1), gray=torch.zeros(b, dtype=torch.bool),
        blur=torch.zeros(b, dtype=torch.bool), sigma=torch.ones(b), solarize=torch.zeros(b, dtype=torch.bool),
    )
    for k, v in fields.items():
        p[k] = torch.as_tensor(v, dtype=p[k].dtype)
    return p


def _ref_jitter(img, order, b, c, s, h):
    """torchvision ColorJitter semantics for one float image with a given op order."""
    for op in order:
        if op == 0:
            img = TF.adjust_brightness(img, b)
        elif op == 1:
            img = TF.adjust_contrast(img, c)
        elif op == 2:
            img = TF.adjust_saturation(img, s)
        else:
            img = TF.adjust_hue(img, h)
    return img


# ---------------------------------------------------------------------------
# Ops vs torchvision
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 8])  # upscaling (crops <= 20 px) and downscaling (antialias)
def test_resized_crop_matches_torchvision(size):
    imgs = _images(4, 3, 20, 24)
    boxes = [(0, 0, 20, 24), (3, 5, 10, 7), (7, 1, 13, 19), (15, 20, 5, 4)]
    aug = _plain_aug(size)
    top, left, hh, ww = (list(t) for t in zip(*boxes))
    out = aug.apply(imgs, _params(aug, imgs, top=top, left=left, height=hh, width=ww))
    assert out.shape == (4, 3, size, size) and out.dtype == torch.float32
    for i, (t, l, h, w) in enumerate(boxes):
        ref = TF.resized_crop(imgs[i].float() / 255, t, l, h, w, [size, size], antialias=True)
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)
        if size >= max(h, w):  # upscaling: also equals antialias=False, and the uint8 path to +-1 level
            ref = TF.resized_crop(imgs[i].float() / 255, t, l, h, w, [size, size], antialias=False)
            torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)
            ref8 = TF.resized_crop(imgs[i], t, l, h, w, [size, size], antialias=False).float()
            assert (out[i] * 255 - ref8).abs().max() <= 1.0


@pytest.mark.parametrize("size", [32, 8])
def test_dense_resized_crop_equals_the_per_sample_path(size):
    """The GPU's batched matrix path and the CPU's per-sample F.interpolate path agree (on the CPU)."""
    from selfsup.data.augment import _resized_crop

    imgs = _images(4, 3, 20, 24)
    t, l, h, w = (torch.tensor(v) for v in zip((0, 0, 20, 24), (3, 5, 10, 7), (7, 1, 13, 19), (15, 20, 5, 4)))
    flip = torch.tensor([True, False, True, False])
    torch.testing.assert_close(_resized_crop(imgs, t, l, h, w, size, flip, dense=True),
                               _resized_crop(imgs, t, l, h, w, size, flip, dense=False), atol=1e-3, rtol=0)


def test_flip_matches_torchvision():
    imgs = _images(3, 3, 16, 16)
    aug = _plain_aug(24)
    p = _params(aug, imgs, top=[2, 2, 0], left=[1, 1, 3], height=[9, 9, 16], width=[12, 12, 11],
                flip=[True, False, True])
    out = aug.apply(imgs, p)
    for i in range(3):
        ref = TF.resized_crop(imgs[i].float() / 255, int(p["top"][i]), int(p["left"][i]), int(p["height"][i]),
                              int(p["width"][i]), [24, 24])
        if p["flip"][i]:
            ref = TF.horizontal_flip(ref)
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "op, field, value, fn",
    [
        (0, "brightness", 1.35, TF.adjust_brightness),
        (0, "brightness", 0.6, TF.adjust_brightness),
        (1, "contrast", 1.5, TF.adjust_contrast),
        (1, "contrast", 0.3, TF.adjust_contrast),
        (2, "saturation", 1.7, TF.adjust_saturation),
        (2, "saturation", 0.2, TF.adjust_saturation),
        (3, "hue", 0.3, TF.adjust_hue),
        (3, "hue", -0.45, TF.adjust_hue),
        (3, "hue", 0.5, TF.adjust_hue),
    ],
)
def test_single_jitter_op_matches_torchvision(op, field, value, fn):
    imgs = _images(3, 3, 12, 12, seed=op)
    imgs[0, :, :3, :3] = 77  # some gray pixels
    aug = _plain_aug(12, jitter_p=1.0, jitter=(0.9, 0.9, 0.9, 0.5))
    order = [[op] + [o for o in range(4) if o != op]] * 3
    p = _params(aug, imgs, jitter=[True, True, False], order=order, **{field: [value] * 3})
    out = aug.apply(imgs, p)
    x = imgs.float() / 255
    for i in range(2):
        torch.testing.assert_close(out[i], fn(x[i], value), atol=TOL, rtol=0)
    torch.testing.assert_close(out[2], x[2], atol=TOL, rtol=0)  # jitter not selected -> identity


def test_per_sample_jitter_order_matches_torchvision():
    imgs = _images(4, 3, 10, 10, seed=5)
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]]
    b, c, s, h = [1.4, 0.7, 1.2, 0.8], [0.6, 1.5, 1.3, 0.5], [1.8, 0.2, 0.5, 1.6], [0.2, -0.3, 0.45, -0.1]
    aug = _plain_aug(10, jitter_p=1.0)
    p = _params(aug, imgs, jitter=[True] * 4, order=orders, brightness=b, contrast=c, saturation=s, hue=h)
    out = aug.apply(imgs, p)
    x = imgs.float() / 255
    for i in range(4):
        ref = _ref_jitter(x[i], orders[i], b[i], c[i], s[i], h[i])
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)
    # Same factors, different orders really give different results (order matters).
    other = _ref_jitter(x[0], orders[1], b[0], c[0], s[0], h[0])
    assert (other - out[0]).abs().max() > 1e-3


def test_masked_hue_paths_agree():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([True, False, True, True, False, False])
    shift = torch.tensor([0.1, 0.2, -0.4, 0.5, 0.0, 0.3])
    a = _masked_hue(x.clone(), mask, shift, subset=True)  # may work in place
    b = _masked_hue(x.clone(), mask, shift, subset=False)
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    torch.testing.assert_close(a[~mask], x[~mask])


def test_grayscale_blur_solarize_match_torchvision():
    imgs = _images(3, 3, 16, 16, seed=2)
    x = imgs.float() / 255
    aug = _plain_aug(16, gray_p=1.0)
    out = aug.apply(imgs, _params(aug, imgs, gray=[True, False, True]))
    torch.testing.assert_close(out[0], TF.rgb_to_grayscale(x[0], num_output_channels=3), atol=TOL, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=TOL, rtol=0)

    aug = _plain_aug(16, blur_p=1.0, blur_kernel_frac=0.35)  # int(5.6) = 5
    assert aug.blur_kernel == 5
    sig = [0.3, 1.7, 1.0]
    out = aug.apply(imgs, _params(aug, imgs, blur=[True, True, False], sigma=sig))
    for i in range(2):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [5, 5], [sig[i], sig[i]]), atol=TOL, rtol=0)
    torch.testing.assert_close(out[2], x[2], atol=TOL, rtol=0)

    aug = _plain_aug(16, solarize_p=1.0, solarize_threshold=0.4)
    out = aug.apply(imgs, _params(aug, imgs, solarize=[True, False, True]))
    torch.testing.assert_close(out[0], TF.solarize(x[0], 0.4), atol=TOL, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=TOL, rtol=0)


def test_full_pipeline_matches_torchvision_chain():
    imgs = _images(3, 3, 24, 20, seed=3)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    aug = BatchAugment(32, jitter_p=1.0, gray_p=0.5, blur_p=0.5, blur_kernel_frac=0.2, solarize_p=0.5,
                       mean=mean, std=std)
    fields = dict(
        top=[2, 0, 5], left=[3, 0, 1], height=[15, 24, 10], width=[12, 20, 18], flip=[True, False, True],
        jitter=[True, True, False], order=[[2, 0, 3, 1], [1, 3, 2, 0], [0, 1, 2, 3]],
        brightness=[1.3, 0.7, 1.1], contrast=[0.8, 1.4, 0.9], saturation=[1.5, 0.4, 1.2], hue=[0.1, -0.2, 0.05],
        gray=[False, True, False], blur=[True, False, True], sigma=[0.8, 1.0, 1.9], solarize=[True, True, False],
    )
    out = aug.apply(imgs, _params(aug, imgs, **fields))
    assert aug.blur_kernel == 7
    for i in range(3):
        f = {k: v[i] for k, v in fields.items()}
        ref = TF.resized_crop(imgs[i].float() / 255, f["top"], f["left"], f["height"], f["width"], [32, 32])
        if f["flip"]:
            ref = TF.horizontal_flip(ref)
        if f["jitter"]:
            ref = _ref_jitter(ref, f["order"], f["brightness"], f["contrast"], f["saturation"], f["hue"])
        if f["gray"]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if f["blur"]:
            ref = TF.gaussian_blur(ref, [7, 7], [f["sigma"]] * 2)
        if f["solarize"]:
            ref = TF.solarize(ref, 0.5)
        ref = TF.normalize(ref, list(mean), list(std))
        torch.testing.assert_close(out[i], ref, atol=TOL / min(std), rtol=0)


def test_single_channel_input():
    imgs1 = _images(4, 1, 14, 14, seed=4)
    aug = _plain_aug(20)
    out = aug(imgs1, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 20, 20)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    # Full pipeline on C=1 equals the pipeline on the replicated 3-channel image.
    aug = simclr_augment(20, blur=True, solarize_p=0.5)
    p = aug.sample_params(4, 14, 14, generator=torch.Generator().manual_seed(1))
    p["jitter"][:] = True
    torch.testing.assert_close(aug.apply(imgs1, p), aug.apply(imgs1.expand(4, 3, 14, 14), p), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# Parameter sampling
# ---------------------------------------------------------------------------


def test_crop_params_distribution_matches_torchvision():
    n, h, w = 20000, 32, 32
    aug = BatchAugment(32)
    p = aug.sample_params(n, h, w, generator=torch.Generator().manual_seed(0))
    ph, pw, top, left = p["height"], p["width"], p["top"], p["left"]
    assert (top >= 0).all() and (left >= 0).all() and (top + ph <= h).all() and (left + pw <= w).all()
    area = (ph * pw).double() / (h * w)
    # Rounding of h and w to integers widens the range slightly on a 32x32 image.
    assert area.min() >= 0.08 * 0.7 and area.max() <= 1.0
    torch.manual_seed(0)
    ref = torch.tensor(
        [math.prod(RandomResizedCrop.get_params(torch.empty(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3])[2:])
         for _ in range(n)], dtype=torch.float64) / (h * w)
    assert abs(area.mean() - ref.mean()) < 0.01
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    assert (area.quantile(q) - ref.quantile(q)).abs().max() < 0.02
    # Aspect ratio: exact on a large image (little rounding).
    p = aug.sample_params(n, 1000, 1000, generator=torch.Generator().manual_seed(1))
    ratio = p["width"].double() / p["height"].double()
    assert ratio.min() >= 3 / 4 - 0.01 and ratio.max() <= 4 / 3 + 0.01
    frac = (p["width"] * p["height"]).double() / 1e6
    assert frac.min() >= 0.08 - 1e-3 and frac.max() <= 1.0
    assert ph.unique().numel() > 10 and top.unique().numel() > 10  # boxes differ across the batch


def test_crop_fallback_matches_torchvision():
    aug = BatchAugment(16, crop_scale=(1.0, 1.0), crop_ratio=(2.0, 3.0))  # never valid on a square image
    p = aug.sample_params(5, 30, 30, generator=torch.Generator().manual_seed(0))
    ref = RandomResizedCrop.get_params(torch.empty(1, 30, 30), [1.0, 1.0], [2.0, 3.0])
    for i in range(5):
        assert (int(p["top"][i]), int(p["left"][i]), int(p["height"][i]), int(p["width"][i])) == ref


def test_other_params_follow_ranges():
    n = 20000
    aug = BatchAugment(32, jitter=(0.4, 0.3, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                       blur_sigma=(0.1, 2.0), solarize_p=0.3)
    p = aug.sample_params(n, 32, 32, generator=torch.Generator().manual_seed(0))
    for key, rate in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.3)]:
        assert p[key].dtype == torch.bool and abs(p[key].float().mean().item() - rate) < 0.02, key
    for key, s in [("brightness", 0.4), ("contrast", 0.3), ("saturation", 0.2)]:
        v = p[key]
        assert v.min() >= 1 - s and v.max() <= 1 + s and v.std() > s / 2, key
    assert p["hue"].min() >= -0.1 and p["hue"].max() <= 0.1 and p["hue"].std() > 0.05
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    assert torch.equal(p["order"].sort(dim=1).values, torch.arange(4).expand(n, 4))
    assert p["order"].unique(dim=0).shape[0] == 24  # all permutations occur
    # First op uniformly distributed.
    counts = torch.bincount(p["order"][:, 0], minlength=4).float() / n
    assert (counts - 0.25).abs().max() < 0.02


# ---------------------------------------------------------------------------
# API behaviour
# ---------------------------------------------------------------------------


def test_output_shape_dtype_normalisation_and_reproducibility():
    imgs = _images(8, 3, 32, 32)
    aug = simclr_augment(32)
    out = aug(imgs, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6  # mean=std=0.5 -> [-1, 1]
    again = aug(imgs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = aug(imgs, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(out, other)
    # Per-sample randomness: the same image repeated gets different views.
    same = aug(imgs[:1].expand(8, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    assert (same - same[:1]).flatten(1).abs().amax(dim=1)[1:].min() > 1e-3
    # No-op augmentation equals the eval transform.
    plain = _plain_aug(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(plain(imgs), eval_transform(imgs), atol=TOL, rtol=0)


def test_eval_transform():
    imgs = _images(2, 3, 40, 30)
    out = eval_transform(imgs, 24, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    assert out.shape == (2, 3, 24, 24) and out.dtype == torch.float32
    ref = TF.center_crop(TF.resize(imgs.float() / 255, 24, antialias=True), [24, 24])
    ref = TF.normalize(ref, [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    gray = _images(2, 1, 28, 28)
    out = eval_transform(gray)
    assert out.shape == (2, 3, 28, 28)
    torch.testing.assert_close(out[:, 1:], out[:, :1].expand(2, 2, 28, 28))
    torch.testing.assert_close(out[:, 0], (gray[:, 0].float() / 255 - 0.5) / 0.5)
    assert eval_transform(gray, 28).shape == (2, 3, 28, 28)


def test_presets():
    a = simclr_augment(32)
    assert a.crop_scale == (0.08, 1.0) and a.blur_p == 0.0 and a.jitter_p == 0.8 and a.gray_p == 0.2
    assert a.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1))
    a = simclr_augment(96, strength=1.0)
    assert a.blur_p == 0.5 and a.blur_kernel == 9 and a.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2))
    assert simclr_augment(224).blur_kernel == 23
    a = mocov2_augment(224)
    assert a.crop_scale == (0.2, 1.0) and a.blur_p == 0.5 and a.jitter == (0.4, 0.4, 0.4, 0.1)
    assert mocov2_augment(32).blur_p == 0.0
    a = mocov1_augment(32)
    assert a.jitter_p == 1.0 and a.jitter == (0.4, 0.4, 0.4, 0.4) and a.blur_p == 0.0
    # Every preset takes the same keyword set (as the trainer passes them).
    for name in AUGMENT_PRESETS:
        a = build_augment(name, 96, blur=True, crop_scale=(0.3, 1.0), jitter_p=0.5, gray_p=0.1, solarize_p=0.2)
        assert a.blur_p == 0.5 and a.crop_scale == (0.3, 1.0) and a.solarize_p == 0.2
        assert build_augment(name, 96, blur=None).blur_p == (0.0 if name == "mocov1" else 0.5)
    assert build_augment("simclr", 32, gray_p=0.0).gray_p == 0.0
    assert set(AUGMENT_PRESETS) == {"simclr", "mocov2", "mocov1"}
    with pytest.raises(ValueError, match="mocov1"):
        build_augment("byol", 32)
    with pytest.raises(ValueError):
        BatchAugment(32, jitter=(0.4, 0.4, 0.4, 0.6))


def test_precropped_views_get_every_step_but_the_crop():
    """crop=False (views cut while decoding): the same as apply() with the whole image as the box."""
    aug = simclr_augment(16, strength=1.0, blur=True)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    out = aug(x, torch.Generator().manual_seed(3), crop=False)
    p = aug.sample_params(6, 16, 16, generator=torch.Generator().manual_seed(3))
    p.update(top=torch.zeros(6, dtype=torch.long), left=torch.zeros(6, dtype=torch.long),
             height=torch.full((6,), 16), width=torch.full((6,), 16))
    torch.testing.assert_close(out, aug.apply(x, p))
    with pytest.raises(ValueError, match="crop=False needs images of 16x16"):
        aug(torch.zeros(2, 3, 20, 20, dtype=torch.uint8), crop=False)


def test_masked_blur_paths_agree():
    """Blur on the selected samples only (CPU) equals blur of all then select (GPU path)."""
    from selfsup.data.augment import _gaussian_blur, _masked

    x = torch.rand(7, 3, 24, 24)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    sigma = torch.rand(7) + 0.2
    fn = lambda xs, idx: _gaussian_blur(xs, 5, sigma[idx])   # noqa: E731
    a = _masked(x.clone(), mask, fn, subset=True)
    b = _masked(x.clone(), mask, fn, subset=False)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[~mask], x[~mask])


def test_rotation_and_erasing_match_torchvision():
    imgs = _images(3, 1, 16, 16, seed=5)
    x = imgs.float() / 255
    aug = _plain_aug(16, rotate=30.0, rotate_p=1.0)
    out = aug.apply(imgs, _params(aug, imgs, rotate=[True, True, False], angle=[12.5, -30.0, 20.0]))
    for i, angle in enumerate([12.5, -30.0]):
        want = TF.rotate(x[i], angle, interpolation=TF.InterpolationMode.BILINEAR)   # fill 0: black corners
        torch.testing.assert_close(out[i], want.expand(3, -1, -1), atol=TOL, rtol=0)
    torch.testing.assert_close(out[2], x[2].expand(3, -1, -1), atol=TOL, rtol=0)

    aug = _plain_aug(16, erase_p=1.0)
    box = dict(erase=[True, False, True], erase_top=[2, 0, 10], erase_left=[3, 0, 0], erase_height=[4, 16, 6],
               erase_width=[5, 16, 16])
    out = aug.apply(imgs, _params(aug, imgs, **box))
    for i in (0, 2):
        want = TF.erase(x[i], box["erase_top"][i], box["erase_left"][i], box["erase_height"][i],
                        box["erase_width"][i], torch.zeros(1))
        torch.testing.assert_close(out[i], want.expand(3, -1, -1), atol=TOL, rtol=0)
    torch.testing.assert_close(out[1], x[1].expand(3, -1, -1), atol=TOL, rtol=0)


def test_erase_boxes_follow_their_ranges_and_new_ops_leave_the_old_draws_alone():
    aug = BatchAugment(20, erase_p=0.5, rotate=10.0, rotate_p=0.3)
    p = aug.sample_params(4000, 20, 20, generator=torch.Generator().manual_seed(0))
    area = (p["erase_height"] * p["erase_width"]).float() / 400
    assert area.min() >= 0.01 and area.max() <= 0.25   # 2-20% of the area, up to rounding and clipping
    assert (p["erase_top"] + p["erase_height"] <= 20).all() and (p["erase_left"] + p["erase_width"] <= 20).all()
    assert 0.45 < p["erase"].float().mean() < 0.55 and 0.25 < p["rotate"].float().mean() < 0.35
    assert p["angle"].abs().max() <= 10.0
    # the options draw after everything else: a pipeline without them keeps its random stream
    plain = BatchAugment(20).sample_params(4000, 20, 20, generator=torch.Generator().manual_seed(0))
    for k, v in plain.items():
        assert torch.equal(v, p[k]), k

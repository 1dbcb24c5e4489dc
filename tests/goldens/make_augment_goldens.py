#!/usr/bin/env python3
"""Writes tests/goldens/augment.json: torchvision v2 augmentations on fixed images, for
tests/augment_goldens.rs (CI has no PyTorch; the test reads this file).

Two parts:

* ``pixel_cases``: uint8 CHW images (1 and 3 channels, upscaling and antialiased
  downscaling crops, a center crop with an odd margin) run through torchvision's own v2
  transforms on float tensors: ``ToDtype(float32, scale=True)``, then
  ``RandomResizedCrop(size, scale, antialias=True)``,
  ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``, ``RandomGrayscale(0.2)``,
  ``RandomHorizontalFlip()``, ``Normalize(mean, std)`` (or ``CenterCrop`` + ``Resize`` for
  the eval case). Each view records the parameters torchvision drew and its output, so the
  Rust test applies the same parameters and compares pixels.
* ``stats``: distributions of the parameters torchvision draws (crop area fraction, log
  aspect ratio, crop centre, flip / jitter / grayscale rates, each jitter factor, the
  position of each adjustment in the jitter order), over many draws, for the Rust test's
  statistical comparison.
* ``photo_cases``: non-square photos of several sizes (300x500, 500x333, 375x500, 64x97,
  an extreme 40x160 whose crops often take the fallback, and a 30x44 smaller than its view
  so the crop upscales), HWC uint8 built by ``photo`` from integer arithmetic (the Rust
  test rebuilds the bytes; ``image_sum`` checks them), through the MoCo v2 recipe
  (``RandomResizedCrop(size, scale=(0.2, 1), antialias=True)``, jitter p 0.8, grayscale
  0.2, ``RandomApply([GaussianBlur(k, (0.1, 2))], 0.5)`` with moco's kernel size, flip,
  ImageNet ``Normalize``) and through the photo eval transform
  ``Resize(int(size * 256 / 224))`` + ``CenterCrop(size)``. Views are small (20-40 px)
  and stored as base64 little-endian float32 (``out_f32``) to keep the file small.
* ``photo_stats``: ``RandomResizedCrop(224, scale=(0.2, 1))`` draws on non-square photos
  (5:3, 2:3, 4:3, 1:4, 16:5 portrait...): histograms of area fraction, log aspect ratio,
  centre, crop height and width, and the rate of the centre-crop fallback (a draw whose
  region is the fallback's).

Usage: python3 tests/goldens/make_augment_goldens.py  (PyTorch 2.x, torchvision >= 0.16)
"""
import base64
import json
import math
import os

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
JITTER = (0.4, 0.4, 0.4, 0.1)


def image(c, h, w, seed):
    """A smooth pattern plus noise, so resizing has something to do at every scale."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    x = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    ch = torch.arange(c, dtype=torch.float64).view(c, 1, 1)
    base = 127.5 + 90 * torch.sin(0.45 * x + 0.3 * ch) * torch.cos(0.37 * y - 0.2 * ch)
    noise = torch.randint(-40, 41, (c, h, w), generator=g).double()
    return (base + noise).round().clamp(0, 255).to(torch.uint8)


def train_view(img_u8, size, scale, mean, std):
    """The recipe, one step at a time, recording what each random step drew."""
    x = F.to_dtype(img_u8, torch.float32, scale=True)
    rrc = v2.RandomResizedCrop(size, scale=scale, antialias=True)
    p = rrc.make_params([x])
    region = [p["top"], p["left"], p["height"], p["width"]]
    x = rrc.transform(x, p)
    jitter = None
    if torch.rand(1).item() < 0.8:  # RandomApply(p=0.8) draws torch.rand(1) >= p to skip
        cj = v2.ColorJitter(*JITTER)
        jp = cj.make_params([x])
        x = cj.transform(x, jp)
        jitter = {
            "order": [int(i) for i in jp["fn_idx"]],
            "b": jp["brightness_factor"],
            "c": jp["contrast_factor"],
            "s": jp["saturation_factor"],
            "h": jp["hue_factor"],
        }
    gray = torch.rand(1).item() < 0.2
    if gray:
        x = F.rgb_to_grayscale(x, num_output_channels=x.shape[0]) if x.shape[0] == 3 else x
    flip = torch.rand(1).item() < 0.5
    if flip:
        x = F.horizontal_flip(x)
    x = F.normalize(x, mean, std)
    return {"region": region, "jitter": jitter, "gray": gray, "flip": flip, "out": [float(f"{v:.9g}") for v in x.flatten().tolist()]}


def check_against_compose(img_u8, size, scale, mean, std, seed):
    """The step-by-step view equals torchvision's own Compose with the same seed."""
    torch.manual_seed(seed)
    mine = train_view(img_u8, size, scale, mean, std)
    torch.manual_seed(seed)
    t = v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomApply([v2.ColorJitter(*JITTER)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomHorizontalFlip(),
        v2.Normalize(mean, std),
    ])
    ref = t(img_u8).flatten()
    assert torch.equal(torch.tensor(mine["out"]), ref), "step-by-step differs from Compose"


def pixel_cases():
    cases = []
    specs = [
        # name, c, h, w, size, scale, seed
        ("fmnist-1ch-28-to-28", 1, 28, 28, 28, (0.2, 1.0), 1),
        ("rgb-32-to-32", 3, 32, 32, 32, (0.08, 1.0), 2),
        ("rgb-56x40-to-16-downscale", 3, 40, 56, 16, (0.2, 1.0), 3),
        ("gray-64x48-to-20-downscale", 1, 48, 64, 20, (0.2, 1.0), 4),
    ]
    for name, c, h, w, size, scale, seed in specs:
        img = image(c, h, w, seed)
        mean = [0.45, 0.5, 0.55][:c] if c == 3 else [0.286]
        std = [0.25, 0.24, 0.26][:c] if c == 3 else [0.353]
        check_against_compose(img, size, scale, mean, std, 100 + seed)
        torch.manual_seed(seed)
        views = [train_view(img, size, scale, mean, std) for _ in range(5)]
        cases.append({"name": name, "kind": "train", "c": c, "h": h, "w": w, "size": size,
                      "scale": list(scale), "mean": mean, "std": std,
                      "image": img.flatten().tolist(), "views": views})
    # Eval: CenterCrop(min side) with an odd margin (rounded offset), then an antialiased resize.
    c, h, w, size = 3, 31, 38, 20
    img = image(c, h, w, 5)
    mean, std = [0.45, 0.5, 0.55], [0.25, 0.24, 0.26]
    x = F.to_dtype(img, torch.float32, scale=True)
    x = F.center_crop(x, [min(h, w)])
    x = F.resize(x, [size, size], antialias=True)
    x = F.normalize(x, mean, std)
    top = int(round((h - min(h, w)) / 2.0))
    left = int(round((w - min(h, w)) / 2.0))
    cases.append({"name": "eval-center-31x38-to-20", "kind": "eval", "c": c, "h": h, "w": w,
                  "size": size, "scale": None, "mean": mean, "std": std,
                  "image": img.flatten().tolist(),
                  "views": [{"region": [top, left, min(h, w), min(h, w)], "jitter": None,
                             "gray": False, "flip": False, "out": [float(f"{v:.9g}") for v in x.flatten().tolist()]}]})
    return cases


def hist(values, lo, hi, bins):
    counts = [0] * bins
    for v in values:
        k = int((v - lo) / (hi - lo) * bins)
        counts[min(max(k, 0), bins - 1)] += 1
    return counts


def stats(name, h, w, scale, n, seed):
    torch.manual_seed(seed)
    rrc = v2.RandomResizedCrop(8, scale=scale, antialias=True)
    cj = v2.ColorJitter(*JITTER)
    dummy = torch.zeros(1, h, w)
    area, logr, cy, cx = [], [], [], []
    flips = jit = grays = 0
    factors = {k: [] for k in "bcsh"}
    pos = [[0] * 4 for _ in range(4)]  # pos[op][position]
    for _ in range(n):
        p = rrc.make_params([dummy])
        area.append(p["height"] * p["width"] / (h * w))
        logr.append(math.log(p["width"] / p["height"]))
        cy.append((p["top"] + p["height"] / 2) / h)
        cx.append((p["left"] + p["width"] / 2) / w)
        if torch.rand(1).item() < 0.8:
            jit += 1
            jp = cj.make_params([dummy])
            for position, op in enumerate(jp["fn_idx"].tolist()):
                pos[op][position] += 1
            for k, key in zip("bcsh", ["brightness_factor", "contrast_factor",
                                       "saturation_factor", "hue_factor"]):
                factors[k].append(jp[key])
        grays += torch.rand(1).item() < 0.2
        flips += torch.rand(1).item() < 0.5
    lr = math.log(4 / 3)
    return {
        "name": name, "h": h, "w": w, "scale": list(scale), "n": n, "bins": 10,
        "area_hist": hist(area, 0.0, 1.0, 10),
        "logratio_hist": hist(logr, -lr - 0.15, lr + 0.15, 10),
        "cy_hist": hist(cy, 0.0, 1.0, 10),
        "cx_hist": hist(cx, 0.0, 1.0, 10),
        "area_mean": sum(area) / n,
        "jitter": jit, "gray": grays, "flip": flips,
        "factor_hist": {k: hist(v, (-0.1 if k == "h" else 0.6), (0.1 if k == "h" else 1.4), 10)
                        for k, v in factors.items()},
        "order_pos": pos,
    }


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def photo(h, w, seed):
    """A deterministic ``h x w x 3`` uint8 photo stand-in in HWC order (as a JPEG decoder
    gives it), from integer arithmetic only so that the Rust test builds the same bytes
    (``photo`` in tests/augment_goldens.rs): a smooth gradient that wraps once or twice
    (content that survives a 10x downscale), a sawtooth texture (edges every few pixels,
    which the antialiasing filter must average) and hashed noise."""
    m = 0xFFFFFFFF
    out = bytearray(h * w * 3)
    k = 0
    for y in range(h):
        for x in range(w):
            for c in range(3):
                g = (256 * y // h + (c + 1) * 96 * x // w) % 256
                t = (31 * y + 17 * x + 7 * c + seed) % 256
                hh = ((y * 73856093) & m) ^ ((x * 19349663) & m) ^ ((c * 83492791) & m) ^ ((seed * 2654435761) & m)
                n = (hh >> 11) % 32
                out[k] = (2 * g + t + n) * 255 // (3 * 255 + 31)
                k += 1
    return torch.frombuffer(out, dtype=torch.uint8).view(h, w, 3).clone()


def image_sum(u8):
    """A position-weighted byte sum, so the Rust test knows it rebuilt the same photo."""
    v = u8.flatten().to(torch.int64)
    return int((v * (torch.arange(v.numel()) % 251 + 1)).sum())


def f32_b64(x):
    """Float32 values, little endian, base64: exact, and half the size of decimal text."""
    return base64.b64encode(x.contiguous().flatten().to(torch.float32).numpy().astype("<f4").tobytes()).decode()


def blur_kernel_size(side):
    """moco's blur kernel: odd, about 10% of the view (Rust's f64 round: half away from zero)."""
    k = int(math.floor(side * 0.1 + 0.5))
    return max(k + 1 if k % 2 == 0 else k, 3)


def v2_view(chw_u8, size, mean, std):
    """The MoCo v2 recipe on the float tensor, one step at a time, recording the draws:
    RandomResizedCrop(size, scale=(0.2, 1), antialias=True),
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], 0.8), RandomGrayscale(0.2),
    RandomApply([GaussianBlur(k, (0.1, 2))], 0.5), RandomHorizontalFlip(), Normalize."""
    x = F.to_dtype(chw_u8, torch.float32, scale=True)
    rrc = v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)
    p = rrc.make_params([x])
    region = [p["top"], p["left"], p["height"], p["width"]]
    x = rrc.transform(x, p)
    jitter = None
    if torch.rand(1).item() < 0.8:
        cj = v2.ColorJitter(*JITTER)
        jp = cj.make_params([x])
        x = cj.transform(x, jp)
        jitter = {"order": [int(i) for i in jp["fn_idx"]], "b": jp["brightness_factor"],
                  "c": jp["contrast_factor"], "s": jp["saturation_factor"], "h": jp["hue_factor"]}
    gray = torch.rand(1).item() < 0.2
    if gray:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    blur = None
    if torch.rand(1).item() < 0.5:
        gb = v2.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))
        bp = gb.make_params([x])
        x = gb.transform(x, bp)
        blur = bp["sigma"][0]
    flip = torch.rand(1).item() < 0.5
    if flip:
        x = F.horizontal_flip(x)
    x = F.normalize(x, mean, std)
    return {"region": region, "jitter": jitter, "gray": gray, "blur": blur, "flip": flip,
            "out_f32": f32_b64(x), "_out": x}


def check_v2_against_compose(chw_u8, size, mean, std, seed):
    torch.manual_seed(seed)
    mine = v2_view(chw_u8, size, mean, std)["_out"]
    torch.manual_seed(seed)
    t = v2.Compose([
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(*JITTER)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        v2.Normalize(mean, std),
    ])
    assert torch.equal(mine, t(chw_u8)), "step-by-step v2 differs from Compose"


def photo_cases():
    """Non-square photos (HWC uint8, built by ``photo``) through the MoCo v2 recipe and
    through the photo evaluation transform ``Resize(int(size * 256 / 224))`` +
    ``CenterCrop(size)``; small views keep the JSON small."""
    specs = [
        # name, h, w, view size, pattern seed, train views
        ("photo-300x500-to-32", 300, 500, 32, 11, 2),
        ("photo-500x333-to-28", 500, 333, 28, 12, 2),
        ("photo-375x500-to-24", 375, 500, 24, 13, 2),
        ("photo-64x97-to-20", 64, 97, 20, 14, 2),
        ("photo-40x160-to-24-fallback", 40, 160, 24, 15, 3),
        ("photo-30x44-to-40-upscale", 30, 44, 40, 16, 2),
    ]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    cases = []
    for name, h, w, size, seed, n_views in specs:
        hwc = photo(h, w, seed)
        chw = hwc.permute(2, 0, 1).contiguous()
        check_v2_against_compose(chw, size, mean, std, 200 + seed)
        torch.manual_seed(seed)
        views = [v2_view(chw, size, mean, std) for _ in range(n_views)]
        for v in views:
            del v["_out"]
        resize = int(size * 256 / 224)
        x = F.to_dtype(chw, torch.float32, scale=True)
        x = F.resize(x, [resize], antialias=True)
        resized = list(x.shape[-2:])
        x = F.normalize(F.center_crop(x, [size]), mean, std)
        ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Resize(resize, antialias=True),
                          v2.CenterCrop(size), v2.Normalize(mean, std)])(chw)
        assert torch.equal(ref, x), "eval steps differ from Compose"
        cases.append({"name": name, "h": h, "w": w, "seed": seed, "image_sum": image_sum(hwc),
                      "size": size, "mean": mean, "std": std, "views": views,
                      "eval": {"resize": resize, "resized": resized, "out_f32": f32_b64(x)}})
    return cases


def fallback_region(h, w, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's centre-crop fallback region of an h x w image."""
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        ch, cw = h, w
    return [(h - ch) // 2, (w - cw) // 2, ch, cw]


def photo_stats(name, h, w, n, seed):
    """RandomResizedCrop(224, scale=(0.2, 1)).make_params on an h x w photo, n draws:
    histograms of the area fraction, log aspect ratio, crop centre, the crop's height and
    width as fractions of the image's, and how often the region is the 10-try fallback's."""
    torch.manual_seed(seed)
    rrc = v2.RandomResizedCrop(224, scale=(0.2, 1.0), antialias=True)
    dummy = torch.zeros(1, h, w)
    fb = fallback_region(h, w)
    area, logr, cy, cx, fh, fw = [], [], [], [], [], []
    fallbacks = 0
    for _ in range(n):
        p = rrc.make_params([dummy])
        r = [p["top"], p["left"], p["height"], p["width"]]
        fallbacks += r == fb
        area.append(p["height"] * p["width"] / (h * w))
        logr.append(math.log(p["width"] / p["height"]))
        cy.append((p["top"] + p["height"] / 2) / h)
        cx.append((p["left"] + p["width"] / 2) / w)
        fh.append(p["height"] / h)
        fw.append(p["width"] / w)
    lr = math.log(4 / 3)
    return {
        "name": name, "h": h, "w": w, "n": n, "fallback_region": fb, "fallback": fallbacks,
        "area_hist": hist(area, 0.0, 1.0, 10),
        "logratio_hist": hist(logr, -lr - 0.15, lr + 0.15, 10),
        "cy_hist": hist(cy, 0.0, 1.0, 10),
        "cx_hist": hist(cx, 0.0, 1.0, 10),
        "height_hist": hist(fh, 0.0, 1.0, 10),
        "width_hist": hist(fw, 0.0, 1.0, 10),
    }


def main():
    out = {
        "torch": torch.__version__,
        "pixel_cases": pixel_cases(),
        "stats": [
            stats("fmnist-28-scale0.2", 28, 28, (0.2, 1.0), 20000, 7),
            stats("cifar-32-scale0.08", 32, 32, (0.08, 1.0), 20000, 8),
            stats("rect-60x80-scale0.2", 60, 80, (0.2, 1.0), 20000, 9),
        ],
        "photo_cases": photo_cases(),
        "photo_stats": [
            photo_stats("photo-300x500", 300, 500, 20000, 21),
            photo_stats("photo-500x333", 500, 333, 20000, 22),
            photo_stats("photo-375x500", 375, 500, 20000, 23),
            photo_stats("photo-480x640", 480, 640, 20000, 24),
            photo_stats("photo-100x400-extreme", 100, 400, 20000, 25),
            photo_stats("photo-640x200", 640, 200, 20000, 26),
        ],
    }
    path = os.path.join(HERE, "augment.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print("wrote", path)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""torch_loader.py: the torchvision twin of `moco bench-data`.

Usage:
    torch_loader.py --data DIR [--augment v1|v2] [--image-size 224] [--batch-size 256]
                    [--workers N] [--batches 20] [--prefetch 2] [--seed 0] [--threads 1]

Reads DIR/train with torchvision.datasets.ImageFolder through the MoCo reference
TwoCropsTransform (two augmented views, q and k, of one PIL image) and a DataLoader
(shuffle, drop_last, no pinned memory, persistent workers and prefetch_factor when
workers > 0). The loader is cycled when the set has fewer batches than needed. One
warm-up batch is fetched untimed (first_batch_seconds, measured from loader creation),
then --batches batches are timed. Prints exactly one JSON line; images_per_sec counts
images (each one giving two views), not views.
"""
import argparse
import json
import random
import sys
import time

import PIL
import torch
import torchvision
from PIL import ImageFilter
from torchvision import datasets, transforms


class TwoCropsTransform:
    """Two random views of one image: [q, k]."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        q = self.base_transform(x)
        k = self.base_transform(x)
        return [q, k]


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from [sigma[0], sigma[1]] (SimCLR)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


def build_transform(augment, size):
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    if augment == "v2":
        aug = [
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    elif augment == "v1":
        aug = [
            transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms.RandomGrayscale(p=0.2),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    else:
        raise ValueError(f"unknown augment {augment!r}")
    return TwoCropsTransform(transforms.Compose(aug))


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark the torchvision MoCo data loader.")
    p.add_argument("--data", required=True, help="ImageFolder root (DIR/train is read)")
    p.add_argument("--augment", choices=("v1", "v2"), default="v2")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="timed batches [20]")
    p.add_argument("--prefetch", type=int, default=2, help="prefetch_factor per worker [2]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in main [1]")
    a = p.parse_args(argv)
    if a.batches < 1 or a.batch_size < 1 or a.workers < 0 or a.prefetch < 1 or a.threads < 1:
        p.error("--batches, --batch-size, --prefetch, --threads >= 1; --workers >= 0")

    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    torch.manual_seed(a.seed)

    dataset = datasets.ImageFolder(f"{a.data.rstrip('/')}/train",
                                   build_transform(a.augment, a.image_size))
    if len(dataset) < a.batch_size:
        p.error(f"{len(dataset)} images in {a.data}/train: fewer than one batch of {a.batch_size}")

    t_create = time.perf_counter()
    kwargs = {}
    if a.workers > 0:
        kwargs = dict(persistent_workers=True, prefetch_factor=a.prefetch)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=a.batch_size,
        shuffle=True,
        num_workers=a.workers,
        pin_memory=False,
        drop_last=True,
        generator=torch.Generator().manual_seed(a.seed),
        **kwargs,
    )
    it = iter(loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)  # cycle: next epoch
            return next(it)

    (q, k), _ = next_batch()
    first_s = time.perf_counter() - t_create
    assert q.shape == (a.batch_size, 3, a.image_size, a.image_size), q.shape
    assert k.shape == q.shape

    t0 = time.perf_counter()
    images = 0
    for _ in range(a.batches):
        (q, _k), _target = next_batch()
        images += q.shape[0]
    secs = max(time.perf_counter() - t0, 1e-9)
    del it

    print(json.dumps({
        "tool": "torchvision",
        "augment": a.augment,
        "workers": a.workers,
        "batch_size": a.batch_size,
        "image_size": a.image_size,
        "batches": a.batches,
        "images": images,
        "seconds": round(secs, 3),
        "images_per_sec": round(images / secs, 1),
        "first_batch_seconds": round(first_s, 3),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
    }, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

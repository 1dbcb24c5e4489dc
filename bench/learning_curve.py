#!/usr/bin/env python3
"""Learning curves of moco against PyTorch's MoCo on the same data and settings (issue 16).

Trains the seed's MoCo (shared/seed/moco-seed.txt, single process: the key batch is
shuffled with one random permutation, as the MoCo CIFAR demo) with torchvision v2
transforms, and the release `moco` binary with the same settings, and prints the kNN
top-1 accuracy and loss per epoch side by side. Not run by CI (needs PyTorch).

Protocol (defaults): Fashion-MNIST, resnet8 (3x3 stem, 16/32/64, projection shortcuts,
torchvision initialization) + MLP head (64-64-128), batch 256, K 4096, m 0.99, T 0.1,
SGD lr 0.06 (cosine per epoch), momentum 0.9, wd 5e-4, 8 BatchNorm splits, 28 px,
3 epochs; augmentation RandomResizedCrop(28, scale=(0.2, 1), antialias),
RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8), RandomGrayscale(0.2),
RandomHorizontalFlip, Normalize with the training split's mean/std; kNN k 200, t 0.1 on
the backbone features (64-d, eval mode, L2-normalized) of the 60k training images (the
bank) and the 10k test images, before training and after every epoch.

    python3 bench/learning_curve.py --data /usr/share/datasets/fashion-mnist --seeds 0 1
    python3 bench/learning_curve.py --only torch --torch-input pil   # PIL images (uint8 per step)

`--torch-input tensor` (default) runs the transforms on float tensors in [0, 1], which is
what moco computes (tests/augment_goldens.rs pins moco to it pixel for pixel);
`--torch-input pil` runs them on PIL 'L' images, the classic MoCo recipe, where every step
rounds to uint8 and ToTensor comes last.
"""
import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as Fn
from torchvision.models.resnet import BasicBlock
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_idx(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(d, stem):
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise FileNotFoundError(f"{stem}[.gz] in {d}")


def load(d):
    x_tr = read_idx(find(d, "train-images-idx3-ubyte"))
    y_tr = read_idx(find(d, "train-labels-idx1-ubyte"))
    x_te = read_idx(find(d, "t10k-images-idx3-ubyte"))
    y_te = read_idx(find(d, "t10k-labels-idx1-ubyte"))
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


# ---------------------------------------------------------------- model (as moco's)

class SplitBatchNorm(nn.BatchNorm2d):
    """The MoCo CIFAR demo's: statistics per group of samples, running stats averaged."""

    def __init__(self, num_features, num_splits, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input):
        N, C, H, W = input.shape
        if self.training or not self.track_running_stats:
            rm = self.running_mean.repeat(self.num_splits)
            rv = self.running_var.repeat(self.num_splits)
            out = Fn.batch_norm(
                input.view(-1, C * self.num_splits, H, W), rm, rv,
                self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
                True, self.momentum, self.eps).view(N, C, H, W)
            self.running_mean.data.copy_(rm.view(self.num_splits, C).mean(dim=0))
            self.running_var.data.copy_(rv.view(self.num_splits, C).mean(dim=0))
            return out
        return Fn.batch_norm(input, self.running_mean, self.running_var, self.weight,
                             self.bias, False, self.momentum, self.eps)


class CifarResNet(nn.Module):
    def __init__(self, depth_per_stage, in_ch, num_classes, norm_layer, mlp):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        c = 16
        for li, width in enumerate([16, 32, 64]):
            blocks = []
            for bi in range(depth_per_stage):
                stride = 2 if li > 0 and bi == 0 else 1
                down = None
                if stride != 1 or c != width:
                    down = nn.Sequential(nn.Conv2d(c, width, 1, stride, bias=False), norm_layer(width))
                blocks.append(BasicBlock(c, width, stride, down, norm_layer=norm_layer))
                c = width
            setattr(self, f"layer{li + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        fc = nn.Linear(64, num_classes)
        self.fc = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), fc) if mlp else fc
        # torchvision's ResNet initialization (linear layers keep PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


class MoCo(nn.Module):
    """The seed's MoCo, single process (shuffle-BN by one permutation of the batch)."""

    def __init__(self, base_encoder, dim, K, m, T):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", Fn.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        n = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % n == 0
        self.queue[:, ptr:ptr + n] = keys.t()
        self.queue_ptr[0] = (ptr + n) % self.K

    def forward(self, im_q, im_k):
        q = Fn.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            idx_shuffle = torch.randperm(im_k.shape[0])
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = Fn.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels


# ---------------------------------------------------------------- data

class TwoViews(torch.utils.data.Dataset):
    def __init__(self, x, size, scale, mean, std, pil):
        self.x, self.pil = x, pil
        jitter = [v2.RandomResizedCrop(size, scale=scale, antialias=True),
                  v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                  v2.RandomGrayscale(p=0.2),
                  v2.RandomHorizontalFlip()]
        if pil:
            self.t = v2.Compose(jitter + [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                                          v2.Normalize(mean, std)])
        else:
            self.t = v2.Compose([v2.ToDtype(torch.float32, scale=True)] + jitter
                                + [v2.Normalize(mean, std)])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.pil:
            from PIL import Image
            img = Image.fromarray(self.x[i], mode="L")
        else:
            img = torch.from_numpy(self.x[i]).unsqueeze(0)
        return self.t(img), self.t(img)


def worker_init(seed, wid):
    s = seed * 1000 + wid + torch.initial_seed() % 1000
    torch.manual_seed(s)


@torch.no_grad()
def features(enc, x, mean, std, bs=1000):
    enc.eval()
    out = []
    for i in range(0, len(x), bs):
        b = torch.from_numpy(x[i:i + bs]).float().unsqueeze(1).mul_(1.0 / 255)
        b = (b - mean[0]) / std[0]
        out.append(Fn.normalize(enc.features(b), dim=1))
    enc.train()
    return torch.cat(out)


def knn_top1(bank, bank_labels, test, test_labels, k=200, t=0.1, classes=10):
    """The MoCo CIFAR demo's weighted kNN."""
    correct = 0
    for i in range(0, len(test), 500):
        sim = test[i:i + 500] @ bank.t()
        w, idx = sim.topk(k, dim=1)
        lab = bank_labels[idx]
        w = (w / t).exp()
        scores = torch.zeros(len(lab), classes).scatter_add_(1, lab, w)
        correct += (scores.argmax(1) == test_labels[i:i + 500]).sum().item()
    return correct / len(test)


def run_torch(a, seed, data):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(a.threads)
    mean = [float(x_tr.mean() / 255)]
    std = [float((x_tr / 255.0).std())]
    norm = partial(SplitBatchNorm, num_splits=a.bn_splits)
    enc = partial(CifarResNet, 1, 1, norm_layer=norm, mlp=True)
    model = MoCo(lambda num_classes: enc(num_classes), a.dim, a.moco_k, a.moco_m, a.moco_t)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=a.lr, momentum=0.9,
                          weight_decay=a.wd)
    ds = TwoViews(x_tr, a.image_size, (a.crop_scale, 1.0), mean, std, a.torch_input == "pil")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=a.batch_size, shuffle=True, drop_last=True, num_workers=a.workers,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=partial(worker_init, seed),
        persistent_workers=a.workers > 0)
    yb, yt = torch.from_numpy(y_tr), torch.from_numpy(y_te)

    def knn():
        return knn_top1(features(model.encoder_q, x_tr, mean, std), yb,
                        features(model.encoder_q, x_te, mean, std), yt)

    rows = [{"epoch": 0, "knn_top1": knn(), "loss": None}]
    print(f"torch seed {seed} epoch 0 knn {rows[0]['knn_top1']:.4f}", flush=True)
    for epoch in range(a.epochs):
        lr = a.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / a.epochs))
        for g in opt.param_groups:
            g["lr"] = lr
        t0, tot, n = time.time(), 0.0, 0
        for im_q, im_k in loader:
            logits, labels = model(im_q, im_k)
            loss = Fn.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item()
            n += 1
        rows.append({"epoch": epoch + 1, "knn_top1": knn(), "loss": tot / n})
        print(f"torch seed {seed} epoch {epoch + 1} loss {tot / n:.4f} knn {rows[-1]['knn_top1']:.4f}"
              f" ({time.time() - t0:.0f} s)", flush=True)
    return rows


def run_moco(a, seed):
    out = tempfile.mkdtemp(prefix=f"moco-lc-{seed}-")
    cmd = [a.moco_bin, "train", "--dataset", "idx", "--data", a.data, "--preset", "cifar",
           "--arch", "resnet8", "--mlp", "--dim", str(a.dim), "--image-size", str(a.image_size),
           "--augment", "cifar", "--crop-scale", str(a.crop_scale),
           "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
           "--schedule", "cosine", "--wd", str(a.wd), "--moco-k", str(a.moco_k),
           "--moco-m", str(a.moco_m), "--moco-t", str(a.moco_t), "--bn-splits", str(a.bn_splits),
           "--seed", str(seed), "--device", "cpu", "--threads", str(a.threads),
           "--knn-every", "1", "--out", out, "--quiet"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    rows = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            rows.append({"epoch": m["epoch"], "knn_top1": m.get("knn_top1"), "loss": m.get("loss")})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", choices=["torch", "moco"], default=None)
    p.add_argument("--torch-input", choices=["tensor", "pil"], default="tensor")
    p.add_argument("--moco-bin", default=os.path.join(ROOT, "target", "release", "moco"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--moco-k", type=int, default=4096)
    p.add_argument("--moco-m", type=float, default=0.99)
    p.add_argument("--moco-t", type=float, default=0.1)
    p.add_argument("--bn-splits", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--crop-scale", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="PyTorch DataLoader workers")
    p.add_argument("--json", help="append the results to this JSON-lines file")
    a = p.parse_args()
    data = load(a.data) if a.only != "moco" else None
    results = {}
    for seed in a.seeds:
        if a.only != "moco":
            results[("torch", seed)] = run_torch(a, seed, data)
        if a.only != "torch":
            results[("moco", seed)] = run_moco(a, seed)
        if a.json:
            with open(a.json, "a") as f:
                for (impl, s), rows in results.items():
                    if s == seed:
                        f.write(json.dumps({"impl": impl, "seed": s, "torch_input": a.torch_input,
                                            "rows": rows}) + "\n")
    # Side by side.
    impls = sorted({i for i, _ in results})
    head = "epoch | " + " | ".join(f"{i} s{s} kNN / loss" for i in impls for s in a.seeds)
    print(head)
    for e in range(a.epochs + 1):
        cells = []
        for i in impls:
            for s in a.seeds:
                r = results[(i, s)][e]
                loss = "-" if r["loss"] is None else f"{r['loss']:.3f}"
                cells.append(f"{r['knn_top1']:.4f} / {loss}")
        print(f"{e} | " + " | ".join(cells))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The CPU twin of `moco bench --device cpu`: a PyTorch MoCo training step with the same
model, batch and settings, on the CPU, printing images/s.

`moco bench` builds its step from the `cifar` preset with the flags given: K = 4096,
m = 0.99, T = 0.1, SGD(lr 0.06, momentum 0.9, wd 5e-4), dim 128, 8 BatchNorm splits when
the batch is a multiple of 8 (split BatchNorm in both encoders, as the official MoCo
CIFAR demo), shuffle-BN for the keys, synthetic 3-channel inputs. The backbones are the
crate's: resnet8/resnet20 (3x3 stem to 16 channels, stages of 16/32/64, 1x1 stride-2
downsample shortcuts), resnet18-cifar; `--mlp` gives the MoCo v2 head (Linear(c, c), ReLU,
Linear(c, 128)).

The step: momentum update (`_foreach_lerp_`), shuffled keys without gradients, query
forward, logits against the (C x K) queue, cross entropy, backward, SGD, enqueue. Timed
with `time.perf_counter` after warm-up; data loading excluded (one batch stepped
repeatedly), as in `moco bench`'s `images_per_sec`.

    python3 bench/torch_cpu_step.py --arch resnet8 --image-size 28 --mlp --threads 2

Prints one line: `RESULT torch_cpu_step <arch> b<batch> s<size> t<threads> <images/s> images/s`.
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm with statistics per group of samples `n % splits` (the MoCo demo's)."""

    def __init__(self, c, splits):
        super().__init__(c)
        self.splits = splits

    def forward(self, x):
        n, c, h, w = x.shape
        if self.training and self.splits > 1:
            g = self.splits
            rm = self.running_mean.repeat(g)
            rv = self.running_var.repeat(g)
            y = F.batch_norm(x.view(-1, c * g, h, w), rm, rv, self.weight.repeat(g),
                             self.bias.repeat(g), True, self.momentum, self.eps).view(n, c, h, w)
            self.running_mean.data.copy_(rm.view(g, c).mean(dim=0))
            self.running_var.data.copy_(rv.view(g, c).mean(dim=0))
            return y
        return super().forward(x)


class Block(nn.Module):
    def __init__(self, cin, cout, stride, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, arch, splits, mlp, dim=128):
        super().__init__()
        bn = lambda c: SplitBatchNorm(c, splits)  # noqa: E731
        if arch in ("resnet8", "resnet20"):
            depth = 1 if arch == "resnet8" else 3
            stem, widths, depths = 16, [16, 32, 64], [depth] * 3
        elif arch == "resnet18-cifar":
            stem, widths, depths = 64, [64, 128, 256, 512], [2] * 4
        else:
            raise SystemExit(f"unsupported arch {arch}")
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = bn(stem)
        layers, cin = [], stem
        for li, (cout, d) in enumerate(zip(widths, depths)):
            for bi in range(d):
                layers.append(Block(cin, cout, 2 if li > 0 and bi == 0 else 1, bn))
                cin = cout
        self.layers = nn.Sequential(*layers)
        if mlp:
            self.fc = nn.Sequential(nn.Linear(cin, cin), nn.ReLU(), nn.Linear(cin, dim))
        else:
            self.fc = nn.Linear(cin, dim)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet8")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--moco-k", type=int, default=4096)
    ap.add_argument("--mlp", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    n, K, m, T, dim = a.batch_size, a.moco_k, 0.99, 0.1, 128
    splits = 8 if n % 8 == 0 else 1
    fq = ResNet(a.arch, splits, a.mlp, dim)
    fk = ResNet(a.arch, splits, a.mlp, dim)
    fk.load_state_dict(fq.state_dict())
    for p in fk.parameters():
        p.requires_grad = False
    opt = torch.optim.SGD(fq.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    queue = F.normalize(torch.randn(dim, K), dim=0)
    ptr = [0]
    xq = torch.randn(n, 3, a.image_size, a.image_size)
    xk = torch.randn(n, 3, a.image_size, a.image_size)
    labels = torch.zeros(n, dtype=torch.long)
    pq, pk = list(fq.parameters()), list(fk.parameters())

    def step():
        with torch.no_grad():
            torch._foreach_lerp_(pk, pq, 1.0 - m)
            idx = torch.randperm(n)
            k = F.normalize(fk(xk[idx]), dim=1)[torch.argsort(idx)]
        q = F.normalize(fq(xq), dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
        loss = F.cross_entropy(torch.cat([l_pos, l_neg], dim=1) / T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            p = ptr[0]
            end = p + n
            if end <= K:
                queue[:, p:end] = k.T
            else:
                queue[:, p:] = k[: K - p].T
                queue[:, : end - K] = k[K - p:].T
            ptr[0] = end % K

    fq.train()
    fk.train()
    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = time.perf_counter() - t0
    ips = n * a.steps / dt
    print(f"RESULT torch_cpu_step {a.arch} b{n} s{a.image_size} t{a.threads} {ips:.1f} images/s "
          f"({1e3 * dt / a.steps:.1f} ms/step)")


if __name__ == "__main__":
    main()

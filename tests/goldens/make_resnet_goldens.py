#!/usr/bin/env python3
"""Writes tests/goldens/resnet_goldens.txt: PyTorch (float64) forward, backward, BatchNorm
running statistics, two SGD steps and an inference-mode forward of small MoCo encoders, for
tests/resnet_goldens.rs to compare the Rust encoders against.

    pip install torch torchvision numpy   # CPU wheels are enough
    python3 tests/goldens/make_resnet_goldens.py

Weights, inputs and output gradients come from a 32-bit integer hash both sides compute
(`u(t, i)` below and `hash_u` in the Rust test), so no weight file travels. Large tensors are
summarized by their 2-norm and a projection onto hash weights, which any wrong element
changes.

Models (torchvision names, so the Rust table must match them entry by entry):
* resnet8: CIFAR ResNet (3 stages of 1 BasicBlock, 16/32/64, projection shortcuts
  downsample.{0,1} where the shape changes), 3x3 stem, no max-pool;
* resnet18-cifar: torchvision resnet18 with conv1 = 3x3 stride 1 and maxpool = Identity;
* resnet18: torchvision resnet18;
heads: fc = Linear(d, dim), or fc = Sequential(Linear(d, d), ReLU, Linear(d, dim)) (MoCo v2);
BatchNorm: SplitBatchNorm of the MoCo CIFAR demo (bn_splits groups, running stats averaged).
"""
import math
import os
import sys
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

torch.set_default_dtype(torch.float64)
M32 = 0xFFFFFFFF


def u(t, n):
    """n values in [-0.5, 0.5) from stream t (same integer hash as the Rust test)."""
    i = np.arange(n, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64((t * 40503 + 12345) & M32)) & np.uint64(M32)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(2246822519)) & np.uint64(M32)
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(3266489917)) & np.uint64(M32)
    h ^= h >> np.uint64(16)
    return torch.from_numpy(h.astype(np.float64) / 4294967296.0 - 0.5)


class SplitBatchNorm(nn.BatchNorm2d):
    """From the MoCo CIFAR demo: statistics per group of samples, running stats averaged."""

    def __init__(self, num_features, num_splits, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input):
        N, C, H, W = input.shape
        if self.training or not self.track_running_stats:
            running_mean_split = self.running_mean.repeat(self.num_splits)
            running_var_split = self.running_var.repeat(self.num_splits)
            outcome = nn.functional.batch_norm(
                input.view(-1, C * self.num_splits, H, W), running_mean_split, running_var_split,
                self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
                True, self.momentum, self.eps).view(N, C, H, W)
            self.running_mean.data.copy_(running_mean_split.view(self.num_splits, C).mean(dim=0))
            self.running_var.data.copy_(running_var_split.view(self.num_splits, C).mean(dim=0))
            self.num_batches_tracked += 1
            return outcome
        return nn.functional.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            False, self.momentum, self.eps)


class CifarResNet(nn.Module):
    def __init__(self, depth_per_stage, in_ch, num_classes, norm_layer):
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
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(arch, in_ch, dim, mlp, splits):
    norm = partial(SplitBatchNorm, num_splits=splits)
    if arch == "resnet8":
        m = CifarResNet(1, in_ch, dim, norm)
    else:
        m = torchvision.models.resnet18(num_classes=dim, norm_layer=norm)
        if arch == "resnet18-cifar":
            m.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
            m.maxpool = nn.Identity()
        else:
            m.conv1 = nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False)
    if mlp:
        d = m.fc.weight.shape[1]
        m.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), m.fc)
    return m


def init_values(k, name, shape):
    n = int(np.prod(shape)) if len(shape) else 1
    v = u(k, n)
    if name.endswith("num_batches_tracked"):
        return torch.zeros(())
    if name.endswith("running_mean"):
        v = 0.1 * v
    elif name.endswith("running_var"):
        v = 1.0 + 0.5 * (v + 0.5)
    elif len(shape) == 1 and not name.startswith("fc"):  # BatchNorm affine
        v = 1.0 + 0.2 * v if name.endswith("weight") else 0.1 * v
    elif len(shape) == 1:  # linear bias
        v = 0.1 * v
    else:  # conv / linear weight: uniform with variance 1 / fan_in
        fan_in = int(np.prod(shape[1:]))
        v = v * 2.0 * math.sqrt(3.0 / fan_in)
    return v.reshape(shape)


def summary(t, k):
    """(2-norm, projection onto hash stream 3000 + k)."""
    f = t.detach().reshape(-1).double()
    return [f.norm().item(), (f * u(3000 + k, f.numel())).sum().item()]


def fmt(vals):
    return " ".join(repr(float(v)) for v in vals)


def case(out, name, arch, in_ch, size, n, dim, mlp, splits):
    m = build(arch, in_ch, dim, mlp, splits)
    sd = m.state_dict()
    with torch.no_grad():
        for k, (key, t) in enumerate(sd.items()):
            t.copy_(init_values(k, key, list(t.shape)))
    out.write(f"case {name} {arch} {in_ch} {size} {n} {dim} {int(mlp)} {splits}\n")
    for k, (key, t) in enumerate(sd.items()):
        out.write(f"entry {key} {'x'.join(map(str, t.shape)) or '-'}\n")
    x = (2.0 * u(1000, n * in_ch * size * size)).reshape(n, in_ch, size, size).requires_grad_(True)
    r = (2.0 * u(1001, n * dim)).reshape(n, dim)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    m.train()
    for step in range(2):
        opt.zero_grad()
        if x.grad is not None:
            x.grad = None
        y = m(x)
        loss = (y * r).sum()
        loss.backward()
        out.write(f"output {step} {fmt(y.detach().reshape(-1))}\n")
        out.write(f"loss {step} {loss.item()!r}\n")
        out.write(f"input_grad {step} {fmt(summary(x.grad, 999))}\n")
        for k, (key, p) in enumerate(m.named_parameters()):
            out.write(f"grad {step} {key} {fmt(summary(p.grad, k))}\n")
        for k, (key, t) in enumerate(m.state_dict().items()):
            if "running" in key:
                out.write(f"buffer {step} {key} {fmt(summary(t, k))}\n")
        opt.step()
        for k, (key, p) in enumerate(m.named_parameters()):
            out.write(f"param {step} {key} {fmt(summary(p, k))}\n")
    m.eval()
    with torch.no_grad():
        y = m(x)
    out.write(f"eval_output {fmt(y.reshape(-1))}\n")
    out.write("end\n")


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resnet_goldens.txt")
    with open(path, "w") as out:
        out.write(f"# made by make_resnet_goldens.py with torch {torch.__version__}, float64\n")
        case(out, "r8_linear", "resnet8", 1, 12, 8, 16, False, 1)
        case(out, "r8_mlp_split", "resnet8", 3, 16, 8, 16, True, 2)
        # Sizes keep at least 8 values per BatchNorm group in the last stage: with two values
        # per group, BatchNorm is too ill-conditioned for a 1e-9 comparison.
        case(out, "r18cifar_mlp_split", "resnet18-cifar", 3, 16, 4, 8, True, 2)
        case(out, "r18_linear", "resnet18", 3, 64, 4, 8, False, 1)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

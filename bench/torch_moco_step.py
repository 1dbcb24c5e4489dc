#!/usr/bin/env python3
"""A PyTorch MoCo training step with the same model, batch and queue as `moco bench`:
ResNet-18 with a 3x3 stride-1 stem and no max-pool (the MoCo CIFAR recipe), linear head to
128, K = 4096, m = 0.99, T = 0.1, SGD(lr 0.06, momentum 0.9, wd 5e-4), 32x32 inputs.

The step is the reference module's: query forward, momentum update (the seed's
per-parameter loop, and `_foreach_lerp_` as a second variant), key forward without
gradients (plain BatchNorm: the shuffle is a permutation on one device), logits, cross
entropy, backward, SGD step, enqueue. Timed with CUDA events after warm-up; TF32 off (moco's
convolutions run in fp32).

Variants: `loop` and `foreach` (eager), `compile` (`torch.compile` of both encoders, the
foreach momentum update), each with TF32 off; `tf32` is `foreach` with TF32 on for
convolutions and matmuls (against `moco bench --tf32`); `amp` is `foreach` under
`torch.autocast(bfloat16)` with both encoders and the inputs in channels_last (PyTorch's
fast mixed-precision path, the reference for `--precision bf16`). Besides
resnet18-cifar at batch 256 and 512, the launch-bound resnet8 and resnet20 (the crate's
CIFAR ResNets: 3x3 stem to 16 channels, stages of 16/32/64) at batch 256.

    python3 bench/torch_moco_step.py                       # the default table, on CUDA
    MOCO_TORCH_COMPILE=1 python3 bench/torch_moco_step.py  # with the torch.compile column
    python3 bench/torch_moco_step.py --arch resnet8 --batch 256 --variant compile
    python3 bench/torch_moco_step.py --device cpu --arch resnet8 --batch 32 --iters 2   # smoke test

Prints `RESULT torch_moco_step_<variant>_b<batch> <images/s> ...` lines (with the arch in
the name when it is not resnet18-cifar).
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.backends.cudnn.benchmark = True
dev = "cuda"


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18Cifar(nn.Module):
    def __init__(self, dim=128, arch="resnet18-cifar"):
        super().__init__()
        if arch == "resnet18-cifar":
            stem, stages = 64, [(64, 2), (128, 2), (256, 2), (512, 2)]
        elif arch in ("resnet8", "resnet20"):
            d = 1 if arch == "resnet8" else 3
            stem, stages = 16, [(16, d), (32, d), (64, d)]
        else:
            raise SystemExit(f"unsupported arch {arch}")
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, cin = [], stem
        for si, (cout, depth) in enumerate(stages):
            for bi in range(depth):
                layers.append(Block(cin, cout, 2 if si > 0 and bi == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, dim)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def run(batch, variant, arch="resnet18-cifar", K=4096, m=0.99, T=0.1, iters=20, warmup=5):
    tf32 = variant in ("tf32", "amp")
    amp = variant == "amp"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    fq, fk = ResNet18Cifar(arch=arch).to(dev), ResNet18Cifar(arch=arch).to(dev)
    fk.load_state_dict(fq.state_dict())
    for p in fk.parameters():
        p.requires_grad = False
    opt = torch.optim.SGD(fq.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    queue = F.normalize(torch.randn(128, K, device=dev), dim=0)
    ptr = [0]
    xq = torch.randn(batch, 3, 32, 32, device=dev)
    xk = torch.randn(batch, 3, 32, 32, device=dev)
    labels = torch.zeros(batch, dtype=torch.long, device=dev)
    if amp:
        fq, fk = fq.to(memory_format=torch.channels_last), fk.to(memory_format=torch.channels_last)
        xq, xk = xq.contiguous(memory_format=torch.channels_last), xk.contiguous(memory_format=torch.channels_last)
    pq, pk = list(fq.parameters()), list(fk.parameters())
    # torch.compile of both encoders (the key encoder's forward runs without gradients).
    gq, gk = (torch.compile(fq), torch.compile(fk)) if variant == "compile" else (fq, fk)

    def step():
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=amp):
            step_inner()

    def step_inner():
        q = F.normalize(gq(xq), dim=1)
        with torch.no_grad():
            if variant == "loop":
                for a, b in zip(pk, pq):
                    a.data = a.data * m + b.data * (1.0 - m)
            else:
                torch._foreach_lerp_(pk, pq, 1.0 - m)
            idx = torch.randperm(batch, device=dev)
            k = F.normalize(gk(xk[idx]), dim=1)[torch.argsort(idx)]
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
        loss = F.cross_entropy(torch.cat([l_pos, l_neg], dim=1) / T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            p = ptr[0]
            end = p + batch
            if end <= K:
                queue[:, p:end] = k.T
            else:
                queue[:, p:] = k[: K - p].T
                queue[:, : end - K] = k[K - p:].T
            ptr[0] = end % K

    for _ in range(warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            step()
        e.record()
        torch.cuda.synchronize()
        ms = s.elapsed_time(e) / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        ms = (time.perf_counter() - t0) * 1e3 / iters
    name = variant if arch == "resnet18-cifar" else f"{arch}_{variant}"
    print(f"RESULT torch_moco_step_{name}_b{batch} {batch / ms * 1e3:.0f} images/s ({ms:.2f} ms/step)",
          flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", help="one arch only (default: the whole table)")
    ap.add_argument("--batch", type=int, help="one batch size only")
    ap.add_argument("--variant", choices=["loop", "foreach", "compile", "tf32", "amp"])
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev = a.device
    if a.arch or a.batch or a.variant:
        run(a.batch or 256, a.variant or "foreach", a.arch or "resnet18-cifar", iters=a.iters,
            warmup=min(5, a.iters))
    else:
        # torch.compile takes a minute or more per model: its column only with
        # MOCO_TORCH_COMPILE=1 (the GPU suite's time is short).
        import os
        compiled = ["compile"] if os.environ.get("MOCO_TORCH_COMPILE") == "1" else []
        for b in (256, 512):
            for v in ["loop", "foreach", "tf32", "amp"] + compiled:
                run(b, v)
        for arch in ("resnet8", "resnet20"):
            for v in ["foreach", "amp"] + compiled:
                run(256, v, arch)

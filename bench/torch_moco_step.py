#!/usr/bin/env python3
"""A PyTorch MoCo training step with the same model, batch and queue as `moco bench`:
ResNet-18 with a 3x3 stride-1 stem and no max-pool (the MoCo CIFAR recipe), linear head to
128, K = 4096, m = 0.99, T = 0.1, SGD(lr 0.06, momentum 0.9, wd 5e-4), 32x32 inputs.

The step is the reference module's: query forward, momentum update (the seed's
per-parameter loop, and `_foreach_lerp_` as a second variant), key forward without
gradients (plain BatchNorm: the shuffle is a permutation on one device), logits, cross
entropy, backward, SGD step, enqueue. Timed with CUDA events after warm-up; TF32 off (moco's
convolutions run in fp32).

Prints `RESULT torch_moco_step_<variant>_b<batch> <images/s> ...` lines.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
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
    def __init__(self, dim=128):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, dim)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def run(batch, variant, K=4096, m=0.99, T=0.1, iters=20, warmup=5):
    torch.manual_seed(0)
    fq, fk = ResNet18Cifar().to(dev), ResNet18Cifar().to(dev)
    fk.load_state_dict(fq.state_dict())
    for p in fk.parameters():
        p.requires_grad = False
    opt = torch.optim.SGD(fq.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    queue = F.normalize(torch.randn(128, K, device=dev), dim=0)
    ptr = [0]
    xq = torch.randn(batch, 3, 32, 32, device=dev)
    xk = torch.randn(batch, 3, 32, 32, device=dev)
    labels = torch.zeros(batch, dtype=torch.long, device=dev)
    pq, pk = list(fq.parameters()), list(fk.parameters())

    def step():
        q = F.normalize(fq(xq), dim=1)
        with torch.no_grad():
            if variant == "loop":
                for a, b in zip(pk, pq):
                    a.data = a.data * m + b.data * (1.0 - m)
            else:
                torch._foreach_lerp_(pk, pq, 1.0 - m)
            idx = torch.randperm(batch, device=dev)
            k = F.normalize(fk(xk[idx]), dim=1)[torch.argsort(idx)]
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
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        step()
    e.record()
    torch.cuda.synchronize()
    ms = s.elapsed_time(e) / iters
    print(f"RESULT torch_moco_step_{variant}_b{batch} {batch / ms * 1e3:.0f} images/s ({ms:.2f} ms/step)")


if __name__ == "__main__":
    for b in (256, 512):
        for v in ("loop", "foreach"):
            run(b, v)

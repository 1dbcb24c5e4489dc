#!/usr/bin/env python3
"""PyTorch side-by-side for moco's kernels, timed with CUDA events on the same card.

* InfoNCE, the eager sequence of the reference MoCo (normalize, einsum, cat, /T,
  cross_entropy, backward to the unnormalized q) at (N, C, K) = (256, 128, 65536) and
  (512, 128, 4096).
* Momentum update of ResNet-18/50-shaped parameter lists: the seed's per-parameter loop
  (`k.data = k.data * m + q.data * (1 - m)`) and `torch._foreach_lerp_`, plus one flat
  buffer update for reference.
* Device copy bandwidth (`dst.copy_(src)`).

Prints `RESULT <name> <value> <unit>` lines (the GPU-check runner collects them).
"""
import torch
import torch.nn.functional as F

dev = "cuda"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def timeit(fn, iters=50, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1e3  # microseconds


def infonce(n, c, k, t):
    g = torch.Generator(device=dev).manual_seed(0)
    q_raw = torch.randn(n, c, device=dev, generator=g, requires_grad=True)
    kk = F.normalize(torch.randn(n, c, device=dev, generator=g), dim=1)
    queue = F.normalize(torch.randn(c, k, device=dev, generator=g), dim=0)
    labels = torch.zeros(n, dtype=torch.long, device=dev)

    def step():
        q = F.normalize(q_raw, dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, kk]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / t
        loss = F.cross_entropy(logits, labels)
        q_raw.grad = None
        loss.backward()

    us = timeit(step)
    flops = 4 * n * k * c
    print(f"RESULT torch_infonce_eager_{n}x{c}x{k} {us:.1f} us ({flops / us / 1e6:.2f} TFLOP/s)")


def resnet_shapes(arch):
    try:
        import torchvision

        m = getattr(torchvision.models, arch)(num_classes=128)
        return [p.shape for p in m.parameters()]
    except Exception:
        # Without torchvision: a parameter list with the same count and a similar mix.
        total = {"resnet18": 11_242_176, "resnet50": 23_770_304}[arch]
        shapes, left = [], total
        sizes = [64 * 64 * 9, 128 * 128 * 9, 256 * 256 * 9, 512 * 512 * 9, 64, 128, 256, 512]
        i = 0
        while left > 0:
            s = min(sizes[i % len(sizes)], left)
            shapes.append((s,))
            left -= s
            i += 1
        return shapes


def momentum(arch, m=0.999):
    shapes = resnet_shapes(arch)
    qs = [torch.randn(s, device=dev) for s in shapes]
    ks = [torch.randn(s, device=dev) for s in shapes]
    n = sum(x.numel() for x in qs)

    def loop():
        for pk, pq in zip(ks, qs):
            pk.data = pk.data * m + pq.data * (1.0 - m)

    def foreach():
        torch._foreach_lerp_(ks, qs, 1.0 - m)

    fq, fk = torch.randn(n, device=dev), torch.randn(n, device=dev)

    def flat():
        fk.lerp_(fq, 1.0 - m)

    for name, fn in [("loop", loop), ("foreach_lerp", foreach), ("flat_lerp", flat)]:
        us = timeit(fn)
        print(f"RESULT torch_momentum_{name}_{arch}_{n/1e6:.1f}M {us:.1f} us ({12 * n / us / 1e3:.0f} GB/s, {len(shapes)} tensors)")


def copy_bw():
    n = 256 * 1024 * 1024 // 4
    a, b = torch.randn(n, device=dev), torch.empty(n, device=dev)
    us = timeit(lambda: b.copy_(a))
    print(f"RESULT torch_copy_1GiB_rw {us:.1f} us ({8 * n / us / 1e3:.0f} GB/s)")


if __name__ == "__main__":
    print("torch", torch.__version__, torch.cuda.get_device_name())
    copy_bw()
    for shape in [(256, 128, 65536, 0.07), (512, 128, 4096, 0.2)]:
        infonce(*shape)
    for arch in ["resnet18", "resnet50"]:
        momentum(arch)

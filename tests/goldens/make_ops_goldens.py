#!/usr/bin/env python3
"""Goldens for moco's MoCo operations, computed with PyTorch in float64 on the CPU.

Writes ops.json: for each case the inputs (so the Rust test reads exactly these numbers)
and PyTorch's outputs: F.normalize, the logits of the reference MoCo forward
(cat([l_pos, l_neg]) / T), F.cross_entropy with label 0, the gradient with respect to the
unnormalized q, top-1 accuracy, the momentum update, and the enqueue (with wrap-around,
which the reference itself does not allow, emulated row by row).

Usage: python3 make_ops_goldens.py [OUT_PATH]   (default: beside this script)
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

torch.manual_seed(1234)
cases = []
for (n, c, k, t) in [(1, 1, 1, 0.07), (3, 5, 7, 0.2), (4, 8, 33, 0.07), (7, 3, 16, 0.1)]:
    q = torch.randn(n, c, dtype=torch.float64)
    kk = torch.randn(n, c, dtype=torch.float64)
    queue = F.normalize(torch.randn(c, k, dtype=torch.float64), dim=0)  # PyTorch layout C x K
    qv = q.clone().requires_grad_(True)
    qn = F.normalize(qv, dim=1)
    kn = F.normalize(kk, dim=1)
    l_pos = torch.einsum("nc,nc->n", [qn, kn]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [qn, queue])
    logits = torch.cat([l_pos, l_neg], dim=1) / t
    loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    loss.backward()
    acc = (logits.argmax(dim=1) == 0).double().mean().item()
    cases.append({
        "n": n, "c": c, "k": k, "t": t,
        "q": q.flatten().tolist(), "k_raw": kk.flatten().tolist(),
        "queue_rows": queue.t().contiguous().flatten().tolist(),  # moco layout K x C
        "q_normalized": qn.detach().flatten().tolist(),
        "logits": logits.detach().flatten().tolist(),
        "loss": loss.item(), "accuracy": acc,
        "grad_q": qv.grad.flatten().tolist(),
    })

m = 0.99
pk, pq = torch.randn(37, dtype=torch.float32), torch.randn(37, dtype=torch.float32)
ema = (pk * m + pq * (1.0 - m))
momentum = {"m": m, "key": pk.tolist(), "query": pq.tolist(), "out": ema.tolist()}

K, C, N = 5, 2, 3
qbuf = torch.zeros(C, K)
ptr, steps = 0, []
for s in range(3):
    keys = torch.randn(N, C)
    for i in range(N):  # the reference's queue[:, ptr:ptr+N] = keys.T, with wrap-around
        qbuf[:, (ptr + i) % K] = keys[i]
    ptr = (ptr + N) % K
    steps.append({"keys": keys.flatten().tolist(), "queue_ck": qbuf.flatten().tolist(), "ptr": ptr})
enqueue = {"k": K, "c": C, "n": N, "steps": steps}

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "ops.json")
with open(out, "w") as f:
    json.dump({"torch": torch.__version__, "cases": cases, "momentum": momentum, "enqueue": enqueue}, f)
print("wrote", out)

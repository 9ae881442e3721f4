"""Replays the runs of `test_train torch FILE` with PyTorch itself
(torch.optim.AdamW / SGD with two param_groups, LambdaLR for the schedule,
clip_grad_norm_) on the concatenated batch of every rank, and compares the
final weights: f32 within 1e-6 relative, f64 within 1e-13 (double
hyper-parameters and clip factor: PyTorch's f64 arithmetic up to summation
order). Usage: python3 torch_compare.py FILE WORLD"""
import math
import struct
import sys

import torch

IN, OUT, ROWS, STEPS = 5, 3, 4, 14


def sched_lr(kind, base, t):
    """The library's schedules (ddp.h, SCHEDULES), written out again."""
    if kind == "cosine":
        warmup, total, floor = 3, 12, 0.005
        if t < warmup:
            return base * (t + 1) / warmup
        if t >= total:
            return floor
        p = (t - warmup) / (total - warmup)
        return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * p))
    warmup, size, gamma = 2, 4, 0.5
    if t < warmup:
        return base * (t + 1) / warmup
    return base * gamma ** ((t - warmup) // size)


def run(opt_name, dtype, world):
    w0 = [float(torch.tensor(0.3 * math.sin(1.7 * k + 0.2), dtype=torch.float32)) for k in range(IN * OUT)]
    b0 = [float(torch.tensor(0.1 * k - 0.05, dtype=torch.float32)) for k in range(OUT)]
    W = torch.tensor(w0, dtype=dtype).reshape(OUT, IN).requires_grad_()
    b = torch.tensor(b0, dtype=dtype).requires_grad_()
    if opt_name == "adamw":
        base, wd = 0.05, 0.1
        groups = [{"params": [W], "lr": base * 0.5, "weight_decay": wd}, {"params": [b], "lr": base, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=base, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
        kind, clip = "cosine", 0.5
    else:
        base, wd = 0.1, 0.01
        groups = [{"params": [W], "lr": base * 0.5, "weight_decay": wd}, {"params": [b], "lr": base, "weight_decay": 0.0}]
        opt = torch.optim.SGD(groups, lr=base, momentum=0.9, nesterov=True, weight_decay=wd)
        kind, clip = "step", 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: sched_lr(kind, base, t) / base)
    for step in range(STEPS):
        rows = range(step * world * ROWS, (step + 1) * world * ROWS)
        X = torch.tensor([[math.sin(0.7 * r + 1.3 * k + 0.1) for k in range(IN)] for r in rows], dtype=dtype)
        T = torch.tensor([[math.cos(0.3 * r + o) * 0.5 for o in range(OUT)] for r in rows], dtype=dtype)
        opt.zero_grad()
        loss = 0.5 * ((X @ W.T + b - T) ** 2).sum(dim=1).mean()
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([W, b], clip)
        opt.step()
        sched.step()
    return [float(x) for x in W.detach().reshape(-1)] + [float(x) for x in b.detach()]


def main():
    path, world = sys.argv[1], int(sys.argv[2])
    data = open(path, "rb").read()
    n = IN * OUT + OUT
    cases = [("adamw", torch.float32, 1e-6), ("adamw", torch.float64, 1e-13),
             ("sgd", torch.float32, 1e-6), ("sgd", torch.float64, 1e-13)]
    if len(data) != len(cases) * n * 8:
        print("torch_compare: %s has %d bytes, expected %d" % (path, len(data), len(cases) * n * 8))
        return 1
    failed = 0
    for i, (opt_name, dtype, tol) in enumerate(cases):
        ours = struct.unpack("<%dd" % n, data[i * n * 8:(i + 1) * n * 8])
        ref = run(opt_name, dtype, world)
        scale = max(abs(x) for x in ref)
        diff = max(abs(a - r) for a, r in zip(ours, ref)) / scale
        ok = diff <= tol
        failed += not ok
        print("%s %-6s %s world=%d: max relative difference to PyTorch %.3g (tolerance %g)"
              % ("PASS" if ok else "FAIL", opt_name, str(dtype).replace("torch.", ""), world, diff, tol))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Gumbel-Sinkhorn forward+backward: l2r's memory-lean backward vs plain autograd.

Each variant runs in its own subprocess so peak memory is its own (CPU: peak RSS
growth over the process's baseline; CUDA: max_memory_allocated). Gradients are
compared in this process on the same inputs.

    python benchmarks/sinkhorn.py [--batch 32 --cells 784 --iters 30 --device cpu]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from l2r.ranking import log_sinkhorn, sinkhorn_log_alpha


def plain_sinkhorn(z: torch.Tensor, n_iters: int) -> torch.Tensor:
    for _ in range(n_iters):
        z = z - torch.logsumexp(z, dim=2, keepdim=True)
        z = z - torch.logsumexp(z, dim=1, keepdim=True)
    return z.exp()


VARIANTS = {"l2r": log_sinkhorn, "plain": plain_sinkhorn}


def inputs(batch, cells, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, cells, generator=g).to(device)
    upstream = torch.randn(batch, cells, cells, generator=g).to(device)
    return scores, upstream


def run_once(variant, scores, upstream, iters, tau=0.5):
    s = scores.clone().requires_grad_(True)
    p = VARIANTS[variant](sinkhorn_log_alpha(s) / tau, iters)
    (p * upstream).sum().backward()
    return s.grad


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(variant, batch, cells, iters, device):
    """Runs in a child: prints peak extra memory (MB) and seconds per forward+backward."""
    scores, upstream = inputs(batch, cells, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_mb()
    start = time.perf_counter()
    run_once(variant, scores, upstream, iters)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_mb() - base
    seconds = time.perf_counter() - start
    # A second, warm run for the time.
    start = time.perf_counter()
    run_once(variant, scores, upstream, iters)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = min(seconds, time.perf_counter() - start)
    print(json.dumps({"peak_mb": peak, "seconds": seconds}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cells", type=int, default=784)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", choices=list(VARIANTS))
    args = ap.parse_args()
    if args.child:
        measure(args.child, args.batch, args.cells, args.iters, args.device)
        return

    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
               "--cells", str(args.cells), "--iters", str(args.iters), "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:6s} peak {results[variant]['peak_mb']:9.1f} MB  "
              f"forward+backward {results[variant]['seconds']:.3f} s")

    scores, upstream = inputs(args.batch, args.cells, args.device)
    diff = (run_once("l2r", scores, upstream, args.iters) - run_once("plain", scores, upstream, args.iters))
    summary = {
        "batch": args.batch, "cells": args.cells, "iters": args.iters, "device": args.device,
        "memory_ratio": results["l2r"]["peak_mb"] / results["plain"]["peak_mb"],
        "time_ratio": results["l2r"]["seconds"] / results["plain"]["seconds"],
        "grad_max_abs_diff": diff.abs().max().item(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

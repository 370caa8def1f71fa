"""Polarization regularizer overhead per training step on ResNet-20 (Fashion-MNIST shape 1×28×28).

Times whole SGD steps (forward, CE, backward, step) with and without the regularizer (penalty in the
loss + clamp after the step), interleaved in rounds so that load changes hit both alike, and separately
the regularizer's own work (penalty forward + its backward + clamp). Writes the ``polarization-overhead``
section of BENCHMARKS.md.

    .venv/bin/python bench/polarization_overhead.py [--steps 20] [--rounds 5] [--batch 128] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, median, write_section

from prunekit.models import create
from prunekit.polarization import NetworkSlimming, PolarizationRegularizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create("resnet20", in_channels=1, input_size=28)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    regs = {"none": None, "polarization": PolarizationRegularizer(1e-4, 1.2), "slimming": NetworkSlimming(1e-4)}
    for r in regs.values():
        if r is not None:
            r.bind(model)

    def step(reg) -> None:
        loss = F.cross_entropy(model(x), y)
        if reg is not None:
            loss = loss + reg.penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if reg is not None:
            with torch.no_grad():
                reg.after_step(model)

    def reg_only(reg) -> None:
        p = reg.penalty(model)
        p.backward()
        with torch.no_grad():
            reg.after_step(model)

    for _ in range(3):  # warm-up
        step(regs["polarization"])
    times: dict[str, list[float]] = {k: [] for k in regs}
    alone: dict[str, list[float]] = {k: [] for k in regs if k != "none"}
    names = list(regs)
    for r in range(args.rounds * args.steps):  # alternate single steps (rotating order): load drifts hit all alike
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            step(regs[name])
            times[name].append((time.perf_counter() - t0) * 1e3)
    for _ in range(args.rounds):
        for name, own_times in alone.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                reg_only(regs[name])
            own_times.append((time.perf_counter() - t0) / args.steps * 1e3)
    base = median(times["none"])
    rows = [["no regularizer", median(times["none"]), "—", "—", "—"]]
    for name, own_times in alone.items():
        full = median(times[name])
        own = median(own_times)
        rows.append([name, full, f"{100 * (full / base - 1):+.1f} %", own, f"{100 * own / base:.2f} %"])
    n = regs["polarization"].factors.numel(model)
    table = markdown_table(["regularizer", "step (ms, median)", "step vs none", "regularizer alone (ms)",
                            "alone / step"], rows)
    body = (f"ResNet-20 (option A) on 1×28×28 inputs, batch {args.batch}, SGD momentum 0.9, "
            f"{args.threads} torch thread(s), {args.rounds * args.steps} steps per variant, alternated step by step; "
            f"{n} regularized factors (preset `engine`).\n\n{table}\n\n"
            "*step vs none* compares the medians of whole steps (noisy on a shared CPU: other jobs run at the same "
            "time); "
            "*alone* times only the regularizer's own work (penalty forward, its backward, clamp), the overhead "
            "it adds to a step. Target: ≤ 5 %.")
    print(body)
    if not args.no_write:
        write_section("polarization-overhead", "Polarization: regularizer overhead per training step", body)


if __name__ == "__main__":
    main()

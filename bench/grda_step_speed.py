"""Cost of one optimizer step: gRDA (multi-tensor and reference paths) against SGD with momentum 0.9.

ResNet-50's 161 parameter tensors (25,557,032 values), random gradients, every optimizer on its own copy
of the parameters. The optimizers are stepped round-robin (one step each per round, the order rotating)
so that a background load hits all of them alike; the median over the rounds after warm-up is reported.

    .venv/bin/python bench/grda_step_speed.py --rounds 40
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from common import markdown_table, median, write_section

from prunekit.models import create
from prunekit.optim import GRDA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (one step of each optimizer)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts to measure, one table each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    torch.manual_seed(0)
    template = [p.detach().to(device) for p in create("resnet50").parameters()]
    grads = [torch.randn_like(p) * 1e-2 for p in template]
    numel = sum(p.numel() for p in template)

    def params():
        ps = [torch.nn.Parameter(p.clone()) for p in template]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    optimizers = {
        "SGD momentum 0.9 (torch default path)": torch.optim.SGD(params(), lr=0.1, momentum=0.9),
        "SGD momentum 0.9 (foreach=True)": torch.optim.SGD(params(), lr=0.1, momentum=0.9, foreach=True),
        "SGD, no momentum (lower bound: one axpy)": torch.optim.SGD(params(), lr=0.1),
        "gRDA (foreach, default)": GRDA(params(), lr=0.1, c=0.005, mu=0.55),
        "gRDA (foreach=False, reference)": GRDA(params(), lr=0.1, c=0.005, mu=0.55, foreach=False),
    }
    names = list(optimizers)
    body = [(f"ResNet-50 parameters ({len(template)} tensors, {numel:,} values, fp32, {device.type}), random "
             f"gradients; {args.rounds} timed rounds after {args.warmup} warm-up rounds, the optimizers stepped "
             f"round-robin (rotating order) so that background load hits all alike, each on its own parameter "
             f"copy. The machine is shared with other jobs: the 1-min load average is given per table.")]
    summary = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {n: [] for n in names}
        load_before = os.getloadavg()[0]
        for r in range(args.warmup + args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                optimizers[n].step()
                if cuda:
                    torch.cuda.synchronize()
                if r >= args.warmup:
                    times[n].append(time.perf_counter() - t)
        load_after = os.getloadavg()[0]
        sgd_m = median(times[names[0]])
        rows = []
        for n in names:
            ts = sorted(times[n])
            med = median(ts)
            rows.append([n, 1e3 * med, 1e3 * ts[len(ts) // 10], 1e3 * ts[-1 - len(ts) // 10],
                         f"{med / sgd_m:.2f}×"])
            print(f"{threads} thr  {n:45s} median {1e3 * med:8.2f} ms   ÷ SGD-momentum {med / sgd_m:.2f}", flush=True)
        grda_ratio = median(times["gRDA (foreach, default)"]) / sgd_m
        ref_ratio = median(times["gRDA (foreach=False, reference)"]) / sgd_m
        summary.append(f"{threads} thread(s): gRDA {grda_ratio:.2f}×, reference path {ref_ratio:.2f}×")
        body += ["", f"**{threads} torch thread(s)** (load average {load_before:.1f} before, {load_after:.1f} after):",
                 "", markdown_table(["optimizer", "median step (ms)", "p10 (ms)", "p90 (ms)",
                                     "÷ SGD momentum (default path)"], rows)]
    body += ["", (f"**gRDA step ÷ SGD(momentum 0.9) step: {'; '.join(summary)}.** gRDA makes two elementwise "
                  f"passes per tensor (`_foreach_add_` of the gradient into the fp32 accumulator: read g, "
                  f"read/write v; one fused `softshrink` kernel writing the weights in place: read v, write p), "
                  f"SGD with momentum three (scale the buffer, add the gradient, add the buffer to the weights). "
                  f"The reference path allocates temporaries per tensor (sign, abs, subtract, clamp, multiply).")]
    body = "\n".join(body)
    if not args.no_write:
        write_section(f"grda-step-speed-{device.type}", f"gRDA optimizer step vs SGD ({device.type})", body)


if __name__ == "__main__":
    main()

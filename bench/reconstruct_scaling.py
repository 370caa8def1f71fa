"""Reconstruction time vs depth: resumed passes (O(L)) against every pass from the input (O(L²)), in one run.

Random-weight models of growing depth, the same plan at every depth, ``reconstruct`` with its defaults (greedy
survivors, every later layer refit), 64 token sequences / 256 images of calibration; each depth timed with the
compressed network's passes resumed (the default: ``prunekit.compensate.passes`` on an fx trace,
``.block_passes`` on a transformer's layer stack) and with every pass from the input (no cuts kept on the trace,
plain hooks for a model that does not trace: as before the resumed passes existed), alternated ``--repeats``
times; the refits must come out bit-identical.

* Llama (``transformers.LlamaForCausalLM``, hidden 128, 4 heads / 2 kv heads, intermediate 344, vocab 256,
  sequences of 128 tokens): 20 % of the heads and of the MLP neurons of every layer.
* CIFAR ResNet (``prunekit.models``, 1 × 28 × 28 inputs): preset ``resnet`` at ratio 0.5 (every block's conv1).

    .venv/bin/python bench/reconstruct_scaling.py [--repeats 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from common import markdown_table, median, write_section

SECTION = ("reconstruct-scaling", "Reconstruction time vs depth: resumed passes vs passes from the input (CPU)")


def llama(layers: int) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM(cfg).eval()
    data = torch.randint(0, 256, (64, 128), generator=torch.Generator().manual_seed(1))
    options = {"ratio": 0.0, "overrides": {"*.self_attn.q_proj": 0.2, "*.mlp.gate_proj": 0.2}}
    return model, data, options


def resnet(depth: int) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    from prunekit.models import create

    torch.manual_seed(0)
    model = create(f"resnet{depth}", num_classes=10, in_channels=1).eval()
    with torch.no_grad():  # trained-looking BatchNorm statistics (random weights otherwise)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    data = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return model, data, {"ratio": 0.5, "method_options": {"preset": "resnet"}}


def run_once(model, data, options, resumed: bool) -> tuple[float, torch.nn.Module]:
    import prunekit.compensate.reconstruct as reconstruct_module
    from prunekit.methods import PruneOptions, get_method

    original = reconstruct_module.ResumablePasses, reconstruct_module.find_chains
    if not resumed:  # every pass from the input: on the trace with no cuts kept, by hooks for the others
        reconstruct_module.ResumablePasses = lambda graph, max_bytes: original[0](graph, 0)
        reconstruct_module.find_chains = lambda model, probe: []
    try:
        mo = {"calibration": len(data), **options.get("method_options", {})}
        opts = PruneOptions(ratio=options["ratio"], overrides=options.get("overrides", {}), calibration_data=data,
                            method_options=mo)
        start = time.perf_counter()
        result = get_method("reconstruct")(model, data[:1], opts)
        return time.perf_counter() - start, result.model
    finally:
        reconstruct_module.ResumablePasses, reconstruct_module.find_chains = original


def refit_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama", type=int, nargs="*", default=[2, 4, 8, 16])
    ap.add_argument("--resnet", type=int, nargs="*", default=[20, 32, 56])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    cases = [("Llama", n, llama) for n in args.llama] + [("ResNet (CIFAR)", n, resnet) for n in args.resnet]
    for family, size, build in cases:
        model, data, options = build(size)
        times: dict[bool, list[float]] = {True: [], False: []}
        outputs = {}
        for _ in range(args.repeats):
            for resumed in (False, True):
                seconds, small = run_once(model, data, options, resumed)
                times[resumed].append(seconds)
                outputs[resumed] = torch.cat([p.detach().flatten() for p in small.state_dict().values()
                                              if p.is_floating_point()])
        same = torch.equal(outputs[True], outputs[False])
        if not same:
            sys.exit(f"{family} {size}: the resumed and the plain reconstruction differ")
        plain, fast = median(times[False]), median(times[True])
        rows.append([family, size, refit_layers(model), plain, fast, f"{plain / fast:.2f}×", "yes" if same else "no"])
        print(rows[-1], flush=True)
    body = (__doc__.split("\n\n")[1] + "\n\n" + markdown_table(
        ["model", "layers / depth", "Linear+conv layers", "from the input s (median)", "resumed s (median)",
         "speed-up", "bit-identical"], rows))
    write_section(*SECTION, body)


if __name__ == "__main__":
    main()

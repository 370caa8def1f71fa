"""LeNet-300-100 on real Fashion-MNIST with the paper recipe (the `make demo` model), several seeds.

Also evaluates the official Neuron Merging checkpoint when ../shared/checkpoints has it.

    .venv/bin/python bench/train_lenet.py --seeds 0 1 2 3 4
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import ROOT, markdown_table, median, write_section

from prunekit.data import get_dataset, make_loader
from prunekit.io import load_model
from prunekit.metrics import count_macs, count_params, evaluate
from prunekit.models import create
from prunekit.recipes import get_recipe
from prunekit.train import seed_everything, train

OFFICIAL = ROOT.parent / "shared/checkpoints/neuron-merging-lenet300-fashionmnist.pth.tar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's 60 epochs")
    args = parser.parse_args()

    recipe = get_recipe("lenet")
    if args.epochs:
        recipe = recipe.replace(epochs=args.epochs)
    train_set = get_dataset("fashion-mnist", "train")
    test_set = get_dataset("fashion-mnist", "test")

    rows, accuracies, best_accuracies = [], [], []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            seed_everything(seed)  # same initial weights as `prunekit train --seed SEED`
            result = train(create("lenet-300-100"), train_set, test_set, recipe, out_dir=Path(out), seed=seed,
                           progress=False)
            minutes = (time.perf_counter() - start) / 60
        accuracies.append(result.accuracy)
        best = max(result.history, key=lambda r: r["accuracy"])
        best_accuracies.append(best["accuracy"])
        rows.append([seed, recipe.epochs, result.accuracy, f"{best['accuracy']:.2f} (epoch {best['epoch'] + 1})",
                     minutes])
        print(f"seed {seed}: {result.accuracy:.2f} % in {minutes:.1f} min", flush=True)

    model = create("lenet-300-100")
    body = [
        (f"Recipe `lenet`: {recipe.epochs} epochs, SGD momentum {recipe.momentum}, lr {recipe.lr} ×{recipe.gamma} "
         f"every {recipe.step_size} epochs, weight decay {recipe.weight_decay}, batch {recipe.batch_size}. "
         f"Params {count_params(model):,}, MACs {count_macs(model, input_shape=(1, 28, 28)):,}. "
         f"Paper baseline: 89.80 %."),
        "",
        markdown_table(["seed", "epochs", "final test accuracy (%)", "best epoch's test accuracy (%)",
                        "wall time (min)"], rows),
        "",
        (f"**Median final test accuracy over {len(accuracies)} seeds: {median(accuracies):.2f} %** "
         f"(`make demo` = seed 0). The best-epoch column is the official script's protocol (it keeps the "
         f"epoch with the best *test* accuracy, which selects on the test set): median "
         f"{median(best_accuracies):.2f} %. prunekit reports the final epoch."),
    ]
    if OFFICIAL.exists():
        official, info = load_model(OFFICIAL, model_name="lenet-300-100")
        acc = evaluate(official, make_loader(test_set, 256, shuffle=False))["accuracy"]
        body += ["", (f"Official Neuron Merging checkpoint (`acc` field {info.get('acc')}): "
                      f"**{acc:.2f} %** on the Fashion-MNIST test set.")]
    write_section("train-lenet", "LeNet-300-100 on Fashion-MNIST (paper recipe)", "\n".join(body))


if __name__ == "__main__":
    main()

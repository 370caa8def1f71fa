"""`prunekit report`: classification of result files, the markdown tables, PNG plots, bad inputs."""
from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.report.collect import classify, collect
from prunekit.report.extract import compensation_series, factor_panels
from prunekit.report.histogram import magnitude_histogram
from prunekit.report.markdown import render

# ----------------------------------------------------------------------------- fixtures (the commands' schemas)

NM = {"study": "nm-lenet300-fmnist", "checkpoint": "c.pth.tar", "baseline": 89.8, "calibration": 1000, "rows": [
    {"criterion": "l1-norm", "ratio": 0.5, "params": 125810, "params_reduction": 52.81, "prune": 88.4, "merge": 88.69,
     "merged": 49, "removed": 200, "lstsq": 89.1, "lstsq_greedy": 89.05, "paper_prune": 88.4, "paper_merge": 88.69},
    {"criterion": "l1-norm", "ratio": 0.7, "params": 73690, "params_reduction": 72.36, "prune": 71.26, "merge": 82.75,
     "merged": 64, "removed": 280, "lstsq": 86.51, "lstsq_greedy": 87.63}]}
FACTORS = {"baseline (no regularizer)": [0.45, 0.52, 0.61, 0.38], "polarization (λ=0.001, t=1.2)": [0.0, 0.001, 0.02, 0.4]}
POLARIZATION = {"study": "polarization-resnet20-fmnist", "model": "resnet20", "dataset": "fashion-mnist", "epochs": 5,
                "finetune_epochs": 3, "lam": 0.001, "t": 1.2, "threshold": "auto", "out": "nowhere",
                "accuracy_baseline": 93.21, "accuracy_regularized": 92.27, "accuracy_pruned": 92.22,
                "accuracy_finetuned": 92.99, "macs_reduction": 0.5815, "params_reduction": 0.5556,
                "macs_baseline": 30821248, "params_baseline": 269434, "macs": 12899008, "params": 119724,
                "slimming": {"lam": 0.0005, "accuracy_regularized": 92.51, "accuracy_pruned": 10.0,
                             "macs_reduction": 0.5815, "params": 91600, "macs": 12899008, "accuracy_finetuned": 92.88},
                "factor_histogram": {k: magnitude_histogram(v) for k, v in FACTORS.items()}}
GRDA = {"study": "grda-lenet300-fmnist", "sgd_accuracy": 89.91, "recipe": "lenet", "epochs": 30, "rows": [
    {"mu": 0.6, "c": 0.005, "accuracy": 87.31, "sparsity": 95.12, "mp_accuracy": 80.5, "mp_ft_accuracy": 86.0},
    {"mu": 0.55, "c": 0.005, "accuracy": 88.12, "sparsity": 93.4, "mp_accuracy": 85.0, "mp_ft_accuracy": 87.5},
    {"mu": 0.51, "c": 0.002, "accuracy": 89.02, "sparsity": 41.2, "mp_accuracy": None, "mp_ft_accuracy": None}]}
LAYERS = [{"name": "fc1", "relative_l2": 0.031}, {"name": "fc2", "relative_l2": 0.0625}]
COMPARE = {"kind": "compare", "a": "runs/lenet", "b": "runs/lenet-m70", "accuracy_a": 89.8, "accuracy_b": 82.75,
           "samples": 10000, "output_relative_l2": 0.4321, "ware": 0.0789, "agreement": 0.8765, "kl": 0.2468,
           "layers": LAYERS}
DIRECTION = {"kind": "direction", "path": {"alpha": [0.0, 0.5, 1.0], "train_loss": [0.21, 0.35, 0.19],
                                           "test_accuracy": [89.9, 88.1, 89.3]},
             "bezier": {"alpha": [0.0, 0.5, 1.0], "train_loss": [0.21, 0.24, 0.19], "test_accuracy": [89.9, 89.5, 89.3]},
             "eigenvalues": [12.5, 3.25, 0.5, -0.01], "projection_fraction": 0.0123, "random_projection_fraction": 0.0004,
             "norm_ratio": {"sgd": [1.0, 0.9, 0.8], "grda": [1.0, 0.7, 0.4]}, "distance": 7.125}


def write(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def is_png(path: Path) -> tuple[int, int]:
    """Check the PNG signature, the IHDR chunk's CRC and the IEND trailer; return (width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    crc = struct.unpack(">I", data[16 + length:20 + length])[0]
    assert crc == zlib.crc32(data[12:16 + length])
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return struct.unpack(">II", data[16:24])


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def results(tmp_path, monkeypatch) -> Path:
    """A results directory with one file of every kind (labels are relative to tmp_path)."""
    monkeypatch.chdir(tmp_path)
    res = tmp_path / "res"
    for name, doc in (("nm.json", NM), ("pol/polarization.json", POLARIZATION), ("grda.json", GRDA),
                      ("compare.json", COMPARE), ("direction.json", DIRECTION)):
        write(res / name, doc)
    return res


# ----------------------------------------------------------------------------- end to end


def test_report_of_real_train_and_prune_runs_and_every_kind(capsys, results, tmp_path):
    code, out, err = run_cli(capsys, "train", "--model", "lenet-300-100", "--dataset", "synthetic", "--recipe", "fast",
                             "--epochs", "1", "--out", str(results / "train"), "--json")
    assert code == 0, err
    trained = json.loads(out)
    code, out, err = run_cli(capsys, "prune", "--checkpoint", str(results / "train"), "--dataset", "synthetic",
                             "--method", "merge", "--ratio", "0.5", "--latency-runs", "2", "--json")
    assert code == 0, err
    pruned = json.loads(out)
    pruned["preservation"] = {"samples": 512, "output_relative_l2": 0.0517, "ware": 0.0042, "agreement": 0.998,
                              "kl": 0.00031, "layers": LAYERS}
    write(results / "prune-merge.json", pruned)

    code, out, err = run_cli(capsys, "report", "res", "--out", "docs/results.md", "--no-plots", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["results"] == 7 and summary["plots"] == [] and summary["skipped"] == [
        {"path": "res/train/last.json", "reason": "training state (resume checkpoint), not a result"}]
    assert summary["sections"] == ["Runs", "Pruned models", "Merge vs prune vs lstsq", "Polarization: scaling factors",
                                   "gRDA: sparsity vs μ", "Directional analysis", "Output preservation",
                                   "Skipped inputs"]
    md = (tmp_path / "docs/results.md").read_text()
    assert "prunekit report res --out docs/results.md --no-plots" in md  # the regeneration command
    # runs: the trained model.json, with the numbers the train command printed
    assert (f"| `res/train` | lenet-300-100 | synthetic | fast | 1 | {trained['accuracy']:.2f} | "
            f"{trained['params']:,} | {trained['macs']:,} |") in md
    # the real prune --json: params 266,610 → 125,810 (fc1 300 → 150, fc2 100 → 50)
    assert "| `res/prune-merge.json` | merge | l1-norm | 0.50 | synthetic |" in md
    assert "125,810 (−52.8 %)" in md
    # merge vs prune vs lstsq: canonical column order, values per ratio
    assert "| ratio | prune | merge | lstsq | lstsq-greedy | paper prune | paper merge |" in md
    assert "| 0.70 | 71.26 | 82.75 | 86.51 | 87.63 | — | — |" in md
    # polarization study and its γ histograms (from factor_histogram): 3 of 4 polarized factors below 0.05
    assert "| polarization | 58.1 % | 119,724 (−55.6 %) | 92.27 | 92.22 | 92.99 |" in md
    assert "| network slimming | 58.1 % | 91,600 (−66.0 %) | 92.51 | 10.00 | 92.88 |" in md
    assert "| polarization-resnet20-fmnist: polarization (λ=0.001, t=1.2) | 4 | 75.0 % | 1 |" in md
    assert "| polarization-resnet20-fmnist: baseline (no regularizer) | 4 | 0.0 % | 1 |" in md
    # gRDA rows sorted by (c, μ), sparsity in percent, the SGD line
    grda_rows = ["| 0.51 | 0.002 | 89.02 | 41.2 % | — | — |", "| 0.55 | 0.005 | 88.12 | 93.4 % | 85.00 | 87.50 |",
                 "| 0.6 | 0.005 | 87.31 | 95.1 % | 80.50 | 86.00 |"]
    assert sorted(grda_rows, key=md.index) == grda_rows
    assert "SGD accuracy 89.91 %" in md
    # direction: distance, projection fractions, loss barriers (0.35 − 0.21, 0.24 − 0.21), eigenvalues
    assert "| `res/direction.json` | 7.125 | 0.0123 | 0.0004 | 0.1400 | 0.0300 | 4 | 12.5 |" in md
    # preservation: the prune record and the compare result, and their per-layer table
    assert "| 512 | 100.00 → 100.00 | 0.0517 | 0.0042 | 0.998 | 0.00031 |" in md
    assert "| `res/compare.json (runs/lenet vs runs/lenet-m70)` | 10,000 | 89.80 → 82.75 | 0.4321 | 0.0789 | " \
           "0.8765 | 0.2468 |" in md
    assert md.count("| fc2 | 0.0625 |") == 2
    assert "- skipped: unrecognised (training state (resume checkpoint), not a result): `res/train/last.json`" in md
    assert "![" not in md and not (tmp_path / "docs/results").exists()


def test_every_plot_is_a_png_linked_relatively(capsys, results, tmp_path):
    write(results / "run/model.json", {"format": "prunekit-model", "arch": {"name": "lenet-300-100"},
                                       "metadata": {"accuracy": 89.5, "params": 266610, "macs": 266200}})
    code, out, err = run_cli(capsys, "report", "res", "--out", "docs/results.md", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert "Accuracy vs size" in summary["sections"]
    md = (tmp_path / "docs/results.md").read_text()
    names = ["accuracy-vs-size.png", "compensation.png", "gamma-histograms.png", "grda-1.png", "loss-path.png",
             "eigen-spectrum.png"]
    assert sorted(Path(p).name for p in summary["plots"]) == sorted(names)
    for name in names:
        assert f"](results/{name})" in md
        width, height = is_png(tmp_path / "docs/results" / name)
        assert width > 200 and height > 200


def test_same_inputs_same_page_and_plots_and_stale_plots_removed(tmp_path, monkeypatch):
    from prunekit.report.markdown import write_report

    monkeypatch.chdir(tmp_path)
    inputs = [str(write(tmp_path / "nm.json", NM)), str(write(tmp_path / "grda.json", GRDA))]
    out = tmp_path / "page.md"
    first = write_report(inputs, out, command="cmd")
    pngs = {p.name: p.read_bytes() for p in first.plots}
    md = out.read_text()
    write(tmp_path / "page/grda-7.png", {})  # a plot of an earlier run that no longer has data
    (tmp_path / "page/notes.png").write_bytes(b"x")  # not ours: kept
    again = write_report(inputs, out, command="cmd")
    assert out.read_text() == md
    assert {p.name: p.read_bytes() for p in again.plots} == pngs
    assert not (tmp_path / "page/grda-7.png").exists() and (tmp_path / "page/notes.png").exists()


def test_only_sections_with_data_appear(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "nm.json", NM)
    code, out, err = run_cli(capsys, "report", "nm.json", "--out", "r.md", "--no-plots", "--json")
    assert code == 0, err
    assert json.loads(out)["sections"] == ["Merge vs prune vs lstsq"]
    md = (tmp_path / "r.md").read_text()
    assert "gRDA" not in md and "![" not in md and not (tmp_path / "r").exists()
    assert "| 0.50 | 88.40 | 88.69 | 89.10 | 89.05 | 88.40 | 88.69 |" in md


def test_compensation_study_with_fine_tuned_rows_and_a_baseline_record(tmp_path, monkeypatch, capsys):
    """``reproduce compensation-*``: ``baseline`` is a record (checkpoint, params) and ``baseline_accuracy`` the
    number; fine-tuned rows of a method become their own columns ("+k ep") instead of overwriting it."""
    monkeypatch.chdir(tmp_path)
    rows = [{"method": "reconstruct", "ratio": 0.5, "accuracy": 92.02},
            {"method": "torch-pruning", "ratio": 0.5, "accuracy": 12.14, "finetune_epochs": 0},
            {"method": "torch-pruning", "ratio": 0.5, "accuracy": 92.22, "finetune_epochs": 1}]
    write(tmp_path / "c.json", {"study": "compensation", "model": "resnet20", "baseline_accuracy": 92.91,
                                "baseline": {"checkpoint": "x", "params": 1}, "rows": rows})
    code, out, err = run_cli(capsys, "report", "c.json", "--out", "r.md", "--json")
    assert code == 0, err
    assert json.loads(out)["sections"] == ["Merge vs prune vs lstsq"]
    md = (tmp_path / "r.md").read_text()
    assert "unpruned 92.91 %" in md and "| ratio | reconstruct | torch-pruning | torch-pruning +1 ep |" in md
    assert "| 0.50 | 92.02 | 12.14 | 92.22 |" in md


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_files_are_listed_with_the_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "in/notes.json", {"hello": 1, "world": [1, "a"]})
    write(tmp_path / "in/list.json", [1, 2])
    write(tmp_path / "in/nm.json", NM)
    code, out, err = run_cli(capsys, "report", "in", "--out", "r.md", "--no-plots", "--json")
    assert code == 0, err
    skipped = {s["path"]: s["reason"] for s in json.loads(out)["skipped"]}
    assert skipped == {"in/list.json": "a JSON list that is not a list of prune-result tables "
                                       "({'rows': [{method, ratio, accuracy}]})",
                       "in/notes.json": "no known result keys (has: hello, world)"}
    assert "- skipped: unrecognised (no known result keys (has: hello, world)): `in/notes.json`" in \
        (tmp_path / "r.md").read_text()


def test_corrupt_json_is_an_error_naming_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "in/nm.json", NM)
    (tmp_path / "in/broken.json").write_text('{"study": "nm-lenet300-fmnist", "rows": [')
    code, _, err = run_cli(capsys, "report", "in", "--out", "r.md")
    assert code == 2
    assert "results file in/broken.json is not valid JSON" in err and "line 1" in err
    assert not (tmp_path / "r.md").exists()


def test_missing_input_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "report", "nope.json", "--out", "r.md")
    assert code == 2 and "results input 'nope.json' does not exist" in err


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    write(tmp_path / "nm.json", NM)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    col = collect([tmp_path])
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[plot\]'"):
        render(col, tmp_path / "r.md", command="c")
    assert "| 0.70 | 71.26 |" in render(col, tmp_path / "r.md", command="c", draw=False).markdown


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("doc, kind", [
    (NM, "nm-study"), (POLARIZATION, "polarization-study"), (GRDA, "grda-study"), (COMPARE, "compare"),
    (DIRECTION, "direction"), (FACTORS, "factors"),
    ({"format": "prunekit-model", "metadata": {"accuracy": 90.0, "params": 10}}, "run"),
    ({"model": "lenet-300-100", "dataset": "synthetic", "recipe": "fast", "accuracy": 97.5, "params": 1, "macs": 1},
     "run"),
    ({"method": "prune", "ratio": 0.5, "accuracy": 80.0, "accuracy_before": 90.0, "macs_reduction": 0.5}, "prune"),
    ([{"model": "vgg16", "baseline": 92.9, "rows": [{"method": "merge", "ratio": 0.1, "accuracy": 88.2}]}], "sweep"),
])
def test_classify_by_keys(doc, kind):
    assert classify(doc) == (kind, "")


@pytest.mark.parametrize("doc, reason", [
    ({"format": "prunekit-model", "metadata": {}}, "model checkpoint without metadata.accuracy"),
    ({"format": "prunekit-state", "tree": {}}, "training state (resume checkpoint), not a result"),
    ({"kind": "direction", "path": {}}, "'direction' result without ['eigenvalues', 'projection_fraction']"),
    (3.5, "top-level JSON is a float, not an object"),
    ({}, "no known result keys (has: nothing)"),
])
def test_classify_refuses_with_a_reason(doc, reason):
    assert classify(doc) == (None, reason)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                    max_leaves=20)


@settings(max_examples=100, deadline=None)
@given(JSON)
def test_classify_never_crashes_and_always_explains(doc):
    kind, reason = classify(doc)
    assert (kind is None) == bool(reason)


def test_magnitude_histogram_bins_absolute_values_on_unit_range():
    h = magnitude_histogram([0.0, 0.005, -0.5, 1.0, 2.0, float("nan")], bins=4)
    assert h == {"edges": [0.0, 0.5, 1.0, 1.5, 2.0], "counts": [2, 1, 1, 1]}
    assert magnitude_histogram([0.2, 0.9], bins=2) == {"edges": [0.0, 0.5, 1.0], "counts": [1, 1]}


def test_study_histogram_and_its_factors_file_give_one_panel_each(tmp_path):
    write(tmp_path / "study.json", POLARIZATION)
    write(tmp_path / "factors.json", FACTORS)  # the same factors as the study's histograms
    panels = factor_panels(collect([tmp_path]))
    assert [p.title for p in panels] == ["polarization-resnet20-fmnist: baseline (no regularizer)",
                                         "polarization-resnet20-fmnist: polarization (λ=0.001, t=1.2)"]
    assert [p.fraction_below(0.05) for p in panels] == [0.0, 0.75]


def test_rows_without_criterion_join_every_criterion_of_their_model(tmp_path):
    rows = [{"model": "vgg16", "method": m, "criterion": c, "ratio": 0.1, "accuracy": a}
            for m, c, a in (("prune", "l1-norm", 70.7), ("prune", "l2-GM", 74.1), ("lstsq-greedy", "—", 92.7))]
    write(tmp_path / "sweep.json", [{"model": "vgg16", "baseline": 92.94, "rows": rows}])
    series = compensation_series(collect([tmp_path / "sweep.json"]))
    assert [(s.title.rsplit(": ", 1)[1], dict(s.by_method)) for s in series] == [
        ("vgg16 (l1-norm)", {"prune": {0.1: 70.7}, "lstsq-greedy": {0.1: 92.7}}),
        ("vgg16 (l2-GM)", {"prune": {0.1: 74.1}, "lstsq-greedy": {0.1: 92.7}})]


def test_study_without_histograms_reads_its_factors_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = {k: v for k, v in POLARIZATION.items() if k != "factor_histogram"} | {"out": "runs/study"}
    write(tmp_path / "in/study.json", old)
    write(tmp_path / "runs/study/factors.json", FACTORS)  # OUT/factors.json, relative to the working directory
    panels = factor_panels(collect([tmp_path / "in"]))
    assert [(p.title, p.counts[:3], p.total) for p in panels] == [
        ("polarization-resnet20-fmnist: baseline (no regularizer)", [0, 0, 0], 4),
        ("polarization-resnet20-fmnist: polarization (λ=0.001, t=1.2)", [2, 0, 1], 4)]


def test_grda_sparsity_is_read_in_percent_even_when_small(tmp_path):
    from prunekit.report.extract import grda_rows

    tiny = {**GRDA, "rows": [{**r, "sparsity": r["sparsity"] / 100} for r in GRDA["rows"]]}  # < 1 % sparse
    pct = [[row["sparsity_pct"] for row in grda_rows(r)] for r in collect([write(tmp_path / "a.json", GRDA),
                                                                          write(tmp_path / "b.json", tiny)]).results]
    assert pct[0] == [41.2, 93.4, 95.12] and pct[1] == pytest.approx([0.412, 0.934, 0.9512], abs=1e-12)


def test_other_seeds_of_a_studys_repeats_do_not_replace_its_row(tmp_path):
    rows = [{"model": "resnet20", "method": "reconstruct", "criterion": "l1-norm", "ratio": 0.5, "accuracy": a, **s}
            for a, s in ((92.46, {}), (92.42, {"seed": 1}), (92.23, {"seed": 3}))]
    write(tmp_path / "sweep.json", [{"model": "resnet20", "baseline": 93.21, "rows": rows}])
    (series,) = compensation_series(collect([tmp_path / "sweep.json"]))
    assert dict(series.by_method) == {"reconstruct": {0.5: 92.46}}

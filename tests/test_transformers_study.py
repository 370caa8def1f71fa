"""The transformer studies end to end on a tiny model (``--checkpoint``): every method's row, the JSON keys
the issue asks for, the fine-tune row, and the table."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from prunekit.io import save_model
from prunekit.models import create
from prunekit.reproduce import StudyOptions, get_study


def test_llama_study_rows_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    from prunekit.studies import transformers as study

    class Blocks(torch.utils.data.Dataset):
        """Byte blocks of a repeating text (no corpus needed): (x, y) with y = x shifted by one."""

        task = "causal-lm"

        def __init__(self, n):
            ids = torch.tensor(list(b"to be, or not to be: that is the question. " * 40), dtype=torch.long)
            self.blocks = [ids[i:i + 33] for i in range(0, n * 7, 7)]

        def __len__(self):
            return len(self.blocks)

        def __getitem__(self, i):
            return self.blocks[i][:-1], self.blocks[i][1:]

    monkeypatch.setattr(study, "get_dataset", lambda name, split, **kw: Blocks(48 if split == "train" else 16))
    torch.manual_seed(0)
    save_model(tmp_path / "tiny", create("llama-shakespeare", hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64))
    options = StudyOptions(checkpoint=str(tmp_path / "tiny"), out=str(tmp_path / "out"), progress=False,
                           extra={"removed": [0.5], "calibration": 16, "sweep": [8], "finetune_steps": 2,
                                  "methods": ["magnitude", "wanda-sp", "flap", "merge", "lstsq", "reconstruct",
                                              "flap-adaptive", "reconstruct-global"]})
    report, table = get_study("llama-shakespeare")(options)
    assert report["dense_perplexity"] > 1
    rows = [r for r in report["rows"] if not r.get("finetune_steps") and r["target"] == "heads+mlp"]
    assert [r["method"] for r in rows] == ["magnitude", "wanda-sp", "flap", "merge", "lstsq", "reconstruct",
                                           "flap-adaptive", "reconstruct-global"]
    uniform = {r["method"]: r for r in rows}["reconstruct"]
    assert {r["method"]: r for r in rows}["reconstruct-global"]["params_reduction"] == pytest.approx(
        uniform["params_reduction"], abs=0.02)  # the same budget, spent elsewhere
    for r in rows:
        assert {"method", "removed", "params_reduction", "macs_reduction", "perplexity", "method_seconds"} <= set(r)
        assert r["removed"] == 0.5 and 0.1 < r["params_reduction"] < 0.6 and r["perplexity"] > 1
    assert {r["method"] for r in report["rows"] if r.get("finetune_steps") == 2} == {"magnitude", "reconstruct"}
    assert [r["calibration"] for r in report["sweep"]] == [8]
    assert "| reconstruct | 0.5 |" in table and (tmp_path / "out" / "results.json").exists()


def test_a_cached_fine_tune_is_resumed_only_for_the_same_pruned_weights(tmp_path):
    from torch import nn

    from prunekit.studies.transformers import _fresh_unless_same_start

    net = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)).to(torch.bfloat16)
    out = _fresh_unless_same_start(tmp_path / "ft", net)
    (out / "last.json").write_text("{}")
    assert (_fresh_unless_same_start(tmp_path / "ft", net) / "last.json").exists()  # same start: kept
    with torch.no_grad():
        net[0].weight[0, 0] += 1
    assert not (_fresh_unless_same_start(tmp_path / "ft", net) / "last.json").exists()  # other weights: emptied

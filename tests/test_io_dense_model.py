"""``load_model(path, model=dense)`` for models outside the zoo, and tied weights through save/load."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import CheckpointError, ConfigError
from prunekit.io import find_tied, load_model, save_model, tie_parameters


class MLP(nn.Module):
    """Not in prunekit's zoo (no ``prunekit_arch``)."""

    def __init__(self, hidden: int = 16, extra: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 4)
        if extra:
            self.fc4 = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TiedLM(nn.Module):
    """Embedding + MLP block + linear head whose weight IS the embedding's (unless ``tie=False``)."""

    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 16, tie: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        e = self.emb(ids)
        return self.head(e + self.fc2(torch.relu(self.fc1(e))))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _json(stem) -> dict:
    return json.loads(open(f"{stem}.json", encoding="utf-8").read())


# ---------------------------------------------------------------------------------------------
# (a) a pruned model outside the zoo reloads into a dense instance
# ---------------------------------------------------------------------------------------------


def test_pruned_custom_model_reloads_into_given_dense_model(tmp_path):
    torch.manual_seed(0)
    pruned = prunekit.prune(MLP().eval(), torch.randn(2, 8), ratio=0.5)
    assert pruned.fc1.out_features == 8 and pruned.fc2.out_features == 8  # really smaller
    record = prunekit.engine.record_of(pruned)
    stem = save_model(tmp_path / "m", pruned, extra={"prune_record": record.to_dict()})
    doc = _json(stem)
    assert doc["arch"] is None and doc["tied"] == []

    torch.manual_seed(1)
    dense = MLP()
    loaded, info = load_model(tmp_path / "m", model=dense)
    assert loaded is dense  # modified in place and returned
    assert info["arch"] is None and info["prune_record"] == record.to_dict()
    assert _shapes(loaded) == _shapes(pruned)
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert (loaded.eval()(x) - pruned(x)).abs().max().item() <= 1e-6
    assert prunekit.engine.record_of(loaded).to_dict() == record.to_dict()

    with pytest.raises(CheckpointError, match=r"no architecture recorded.*model="):
        load_model(tmp_path / "m")
    with pytest.raises(ConfigError, match="not both"):
        load_model(tmp_path / "m", model=MLP(), model_name="lenet-300-100")


def test_unpruned_custom_model_and_legacy_file_load_into_given_model(tmp_path):
    torch.manual_seed(0)
    m = MLP().eval()
    save_model(tmp_path / "plain", m)
    got, info = load_model(tmp_path / "plain", model=MLP())
    x = torch.randn(4, 8)
    assert torch.equal(got.eval()(x), m(x)) and "prune_record" not in info

    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "old.pth")
    got, info = load_model(tmp_path / "old.pth", model=MLP())
    assert info["format"] == "legacy" and torch.equal(got.eval()(x), m(x))


# ---------------------------------------------------------------------------------------------
# (d) the wrong dense model
# ---------------------------------------------------------------------------------------------


def test_wrong_dense_model_is_a_checkpoint_error_naming_keys(tmp_path):
    save_model(tmp_path / "m", MLP())
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\): fc4\.weight, fc4\.bias"):
        load_model(tmp_path / "m", model=MLP(extra=True))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fc1\.weight: checkpoint \(16, 8\) vs model \(32, 8\)"):
        load_model(tmp_path / "m", model=MLP(hidden=32))

    torch.manual_seed(0)
    pruned = prunekit.prune(MLP().eval(), torch.randn(2, 8), ratio=0.5)
    assert max(pruned.prunekit_record.to_dict()["steps"][0]["fc1"]["out"]) >= 8
    save_model(tmp_path / "p", pruned)  # the record is saved automatically
    with pytest.raises(CheckpointError, match=r"prune_record step 0: Sequential has no module 'fc1'"):
        load_model(tmp_path / "p", model=nn.Sequential(nn.Linear(8, 4)))
    with pytest.raises(CheckpointError, match=r"prune_record step 0: indices for 'fc1' \(out\) exceed its 8 channels"):
        load_model(tmp_path / "p", model=MLP(hidden=8))


def test_nonfinite_refused_with_given_model(tmp_path):
    m = MLP()
    with torch.no_grad():
        m.fc2.bias[0] = float("nan")
    save_model(tmp_path / "m", m)
    with pytest.raises(CheckpointError, match=r"NaN/Inf values in 1 tensor\(s\): fc2\.bias"):
        load_model(tmp_path / "m", model=MLP())
    got, _ = load_model(tmp_path / "m", model=MLP(), allow_nonfinite=True)
    assert torch.isnan(got.fc2.bias[0])


# ---------------------------------------------------------------------------------------------
# (b) tied weights
# ---------------------------------------------------------------------------------------------


def test_find_tied_and_tie_parameters():
    assert find_tied(TiedLM()) == [["emb.weight", "head.weight"]]
    lm = TiedLM(tie=False)
    assert find_tied(lm) == []
    emb = lm.emb.weight
    assert tie_parameters(lm, [["emb.weight", "head.weight"]]) is lm
    assert lm.head.weight is emb and lm.emb.weight is emb
    assert [n for n, _ in lm.named_parameters()] == ["emb.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    with pytest.raises(ConfigError, match=r"cannot tie 'fc2\.weight'"):
        tie_parameters(lm, [["fc1.weight", "fc2.weight"]])  # (16, 8) vs (8, 16)
    with pytest.raises(ConfigError, match=r"'fc1\.nope' is not a parameter or buffer"):
        tie_parameters(lm, [["fc1.weight", "fc1.nope"]])


def test_tied_model_saves_and_reloads_tied(tmp_path):
    torch.manual_seed(0)
    lm = TiedLM().eval()
    stem = save_model(tmp_path / "lm", lm)
    assert _json(stem)["tied"] == [["emb.weight", "head.weight"]]

    torch.manual_seed(1)
    dense = TiedLM(tie=False)  # the re-tie comes from the checkpoint, not from the constructor
    got, info = load_model(tmp_path / "lm", model=dense)
    assert got is dense and got.head.weight is got.emb.weight
    assert info["tied"] == [["emb.weight", "head.weight"]]
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        assert torch.equal(got.eval()(ids), lm(ids))


def test_pruned_tied_model_reloads_tied(tmp_path):
    torch.manual_seed(0)
    lm = TiedLM().eval()
    ids = torch.randint(0, 20, (2, 5))
    pruned = prunekit.prune(lm, ids, ratio=0.5)
    assert pruned.emb.embedding_dim < 8
    if pruned.head.weight is not pruned.emb.weight:  # surgery without tie support: re-tie by hand
        assert torch.equal(pruned.head.weight, pruned.emb.weight)
        tie_parameters(pruned, [["emb.weight", "head.weight"]])
    save_model(tmp_path / "p", pruned)
    got, _ = load_model(tmp_path / "p", model=TiedLM())
    assert got.head.weight is got.emb.weight
    assert _shapes(got) == _shapes(pruned)
    with torch.no_grad():
        assert torch.equal(got.eval()(ids), pruned(ids))


def test_untied_checkpoint_unties_a_tied_dense_model(tmp_path):
    """Saved untied with different values: loading into a model tied at construction must not let one
    key overwrite the other."""
    torch.manual_seed(0)
    lm = TiedLM().eval()
    lm.head.weight = nn.Parameter(lm.emb.weight.detach() * 2 + 1)
    stem = save_model(tmp_path / "u", lm)
    assert _json(stem)["tied"] == []
    got, _ = load_model(tmp_path / "u", model=TiedLM())
    assert got.head.weight is not got.emb.weight
    assert torch.equal(got.emb.weight, lm.emb.weight) and torch.equal(got.head.weight, lm.head.weight)
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        assert torch.equal(got.eval()(ids), lm(ids))


def test_tied_record_checked_against_values(tmp_path):
    torch.manual_seed(0)
    save_model(tmp_path / "u", TiedLM(tie=False))
    doc = _json(tmp_path / "u")
    doc["tied"] = [["emb.weight", "head.weight"]]  # a lie: their values differ
    (tmp_path / "u.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"'head\.weight' is recorded as tied to 'emb\.weight' but their saved values differ"):
        load_model(tmp_path / "u", model=TiedLM())
    doc["tied"] = [["emb.weight", "nope"]]
    (tmp_path / "u.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"corrupt 'tied' record"):
        load_model(tmp_path / "u", model=TiedLM())


def test_checkpoint_without_tied_record_keeps_agreeing_ties(tmp_path):
    """Files written before ``tied`` was recorded: the model's own ties stay when the saved values agree."""
    torch.manual_seed(0)
    lm = TiedLM().eval()
    save_model(tmp_path / "old", lm)
    doc = _json(tmp_path / "old")
    del doc["tied"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    got, info = load_model(tmp_path / "old", model=TiedLM())
    assert got.head.weight is got.emb.weight and info["tied"] == [["emb.weight", "head.weight"]]
    assert torch.equal(got.emb.weight, lm.emb.weight)


# ---------------------------------------------------------------------------------------------
# (c) a Hugging Face model
# ---------------------------------------------------------------------------------------------


def test_gpt2_roundtrip_keeps_lm_head_tied(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    stem = save_model(tmp_path / "gpt2", gpt)
    doc = _json(stem)
    assert doc["arch"] is None
    assert any({"lm_head.weight", "transformer.wte.weight"} <= set(g) for g in doc["tied"])

    torch.manual_seed(1)
    got, _ = load_model(tmp_path / "gpt2", model=transformers.GPT2LMHeadModel(cfg))
    assert got.lm_head.weight is got.transformer.wte.weight
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        a, b = got.eval()(ids).logits, gpt(ids).logits
    assert (a - b).abs().max().item() <= 1e-6

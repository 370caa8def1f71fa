"""Where dataset files live, and how to get them when they are missing.

``resolve_root(name)`` searches, in order: ``$PRUNEKIT_DATA`` (each folder, then ``<folder>/<name>``), the
user cache (``$XDG_CACHE_HOME`` or ``~/.cache``, then ``prunekit/<name>``), and well-known system folders
(``/usr/share/datasets/<name>``, where the Debian package ``dataset-fashion-mnist`` installs). A folder
counts only when the files the loader needs are all there. It returns the folder that directly holds
them (for CIFAR that is the ``cifar-10-batches-py`` / ``cifar-100-python`` folder).

``resolve_root(name, root)`` with an explicit root (``root=`` in Python, ``--data-root`` on the command
line) looks *only* there (the folder itself, then ``root/<name>`` and the usual sub-folder names): a root
that does not exist or lacks files is an error naming it and the missing files, never a reason to use
another copy. ``$PRUNEKIT_DATA`` is a search location, not an explicit root.

``fetch`` makes a dataset present: nothing to do → (only with ``allow_apt=True``, i.e. ``prunekit data
fetch NAME --apt``) the Debian package, as root → an archive source's file found as a local copy in the
search locations (``<location>/<archive name>``, also directly in the user cache folder) → download from
the official source; always with MD5 or SHA-256 verification, atomic renames and a path-traversal-safe
tar extraction. A dataset with a ``verify`` check (``shakespeare``) found corrupted is re-extracted in
place. Loading a dataset never installs system packages.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, DatasetError, unknown_name
from . import text as _text
from .text import unsafe_member_path

__all__ = [
    "LAYOUTS",
    "Layout",
    "Source",
    "cache_dir",
    "download",
    "fetch",
    "md5sum",
    "resolve_root",
    "safe_extract_tar",
    "search_locations",
    "sha256sum",
    "unsafe_member_path",
]

ENV_VAR = "PRUNEKIT_DATA"


@dataclass(frozen=True)
class Source:
    """One file of the official distribution: where to get it and its published MD5 (or pinned SHA-256)."""

    url: str
    filename: str
    md5: str | None = None
    extract: bool = False  # a tar(.gz) to unpack into the dataset folder, then delete
    sha256: str | None = None  # checked instead of md5 when given
    unpack: Callable[[Path, Path], object] | None = None  # (archive, folder) → extract; default safe_extract_tar

    def digest(self) -> tuple[str, str | None]:
        """(algorithm, expected hex digest) that the file is verified against."""
        return ("sha256", self.sha256.lower()) if self.sha256 else ("md5", self.md5.lower() if self.md5 else None)


def _idx_files() -> tuple[str, ...]:
    return ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class Layout:
    """What a dataset folder must contain, where to look, and how to obtain it."""

    files: tuple[str, ...] = ()  # all required, relative to the data folder
    gz_ok: bool = False  # each file may instead be present as <file>.gz
    any_dirs: tuple[str, ...] = ()  # at least one of these sub-folders must exist (image folders)
    inner: tuple[str, ...] = ("",)  # sub-folders of a candidate that may hold the files
    aliases: tuple[str, ...] = ()  # extra sub-folder names tried under a root, besides <name>
    system: tuple[str, ...] = ()
    apt_package: str | None = None
    sources: tuple[Source, ...] = ()
    describe: str = ""
    manual: str = ""  # how to get it when it cannot be fetched automatically
    extra: dict = field(default_factory=dict)
    verify: Callable[[Path], None] | None = None  # raises DatasetError when a found folder's files are corrupted


_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

_IDX_DESCRIBE = ("IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                 "t10k-labels-idx1-ubyte (each optionally .gz)")


def _idx_sources(url: str, md5s: tuple[str, str, str, str]) -> tuple[Source, ...]:
    """The four gzipped IDX files under ``url``, with their md5 sums in :func:`_idx_files` order."""
    return tuple(Source(f"{url}{f}.gz", f"{f}.gz", md5) for f, md5 in zip(_idx_files(), md5s, strict=True))


# Mutable on purpose: tests (and users with a mirror) may point sources elsewhere.
LAYOUTS: dict[str, Layout] = {
    "fashion-mnist": Layout(
        files=_idx_files(), gz_ok=True,
        aliases=("fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        system=("/usr/share/datasets/fashion-mnist",),
        apt_package="dataset-fashion-mnist",
        sources=_idx_sources(_FMNIST_URL, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                           "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
        describe=_IDX_DESCRIBE,
    ),
    "mnist": Layout(
        files=_idx_files(), gz_ok=True,
        aliases=("MNIST/raw", "MNIST"),
        system=("/usr/share/datasets/mnist",),
        sources=_idx_sources(_MNIST_URL, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                          "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
        describe=_IDX_DESCRIBE,
    ),
    "cifar10": Layout(
        files=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        inner=("", "cifar-10-batches-py"),
        aliases=("cifar-10", "CIFAR10"),
        system=("/usr/share/datasets/cifar10", "/usr/share/datasets/cifar-10"),
        sources=(Source("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                        "c58f30108f718f92721af3b95e74349a", extract=True),),
        describe="the python batches data_batch_1..data_batch_5 and test_batch (folder cifar-10-batches-py/)",
    ),
    "cifar100": Layout(
        files=("train", "test"),
        inner=("", "cifar-100-python"),
        aliases=("cifar-100", "CIFAR100"),
        system=("/usr/share/datasets/cifar100", "/usr/share/datasets/cifar-100"),
        sources=(Source("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", extract=True),),
        describe="the python files train and test (folder cifar-100-python/)",
    ),
    "shakespeare": Layout(
        files=_text.corpus_files(),
        aliases=("Shakespeare",),
        sources=(Source(_text.ARCHIVE_URL, _text.ARCHIVE_NAME, sha256=_text.ARCHIVE_SHA256, extract=True,
                        unpack=_text.unpack_corpus),),
        describe=(f"the {len(_text.WORKS)} Project Gutenberg texts <work>.txt extracted from {_text.ARCHIVE_NAME} "
                  f"and their {_text.MANIFEST}"),
        verify=_text.verify_corpus,
    ),
    "imagenet": Layout(
        any_dirs=("train", "val"),
        aliases=("ILSVRC2012", "imagenet-1k"),
        system=("/usr/share/datasets/imagenet", "/datasets/imagenet"),
        describe="class-per-folder images train/<wnid>/*.JPEG and val/<wnid>/*.JPEG",
        manual="ImageNet cannot be downloaded automatically (registration required): get ILSVRC2012 from "
               "https://image-net.org, arrange train/ and val/ as one sub-folder per class (wnid), and "
               "point --data-root or $PRUNEKIT_DATA at the folder holding train/ and val/.",
    ),
}


def _layout(name: str) -> Layout:
    if name == "synthetic":
        raise ConfigError("dataset 'synthetic' is generated in memory; it has no files to find or fetch")
    try:
        return LAYOUTS[name]
    except KeyError:
        raise unknown_name("dataset", name, list(LAYOUTS) + ["synthetic"]) from None


def cache_dir() -> Path:
    """The user cache folder for datasets: ``$XDG_CACHE_HOME/prunekit`` or ``~/.cache/prunekit``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "prunekit"


def _missing(layout: Layout, d: Path) -> list[str]:
    """What folder ``d`` lacks for the loader (empty: complete)."""
    if not d.is_dir():
        return ["(the folder does not exist)"]
    out = []
    if layout.any_dirs and not any((d / s).is_dir() for s in layout.any_dirs):
        out.append(" or ".join(f"{s}/" for s in layout.any_dirs))
    for f in layout.files:
        if not ((d / f).is_file() or (layout.gz_ok and (d / (f + ".gz")).is_file())):
            out.append(f + ("[.gz]" if layout.gz_ok else ""))
    return out


def _missing_note(layout: Layout, d: Path, limit: int = 5) -> str:
    """``": missing a, b"`` for a folder that exists but lacks files (a partial copy), else ``""``."""
    missing = _missing(layout, d) if d.is_dir() and layout.files else []
    if not missing or len(missing) == len(layout.files) + bool(layout.any_dirs):
        return ""  # absent, or nothing of this dataset in it (a parent root): no news
    more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
    return f": missing {', '.join(missing[:limit])}{more}"


def _has_files(layout: Layout, d: Path) -> bool:
    return d.is_dir() and not _missing(layout, d)


def search_locations(name: str, root: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """Candidate folders for ``name`` in search order, each with a label saying where it came from.

    With an explicit ``root`` only that root's candidates (the folder, ``root/<name>``, aliases).
    """
    layout = _layout(name)
    subs = (name,) + layout.aliases
    out: list[tuple[Path, str]] = []

    def add_base(base: Path, label: str) -> None:
        out.append((base, label))
        for s in subs:
            out.append((base / s, label))

    if root is not None:
        add_base(Path(root).expanduser(), "--data-root")
    else:
        env = os.environ.get(ENV_VAR)
        if env:
            for part in env.split(os.pathsep):
                if part:
                    add_base(Path(part).expanduser(), f"${ENV_VAR}")
        out.append((cache_dir() / name, "user cache"))
        for s in layout.system:
            out.append((Path(s), "system"))
    # A candidate may hold the files in an inner folder (cifar-10-batches-py); expand in place.
    expanded: list[tuple[Path, str]] = []
    for p, label in out:
        for inner in layout.inner:
            expanded.append((p / inner if inner else p, label))
    seen: set[Path] = set()
    unique = []
    for p, label in expanded:
        if p not in seen:
            seen.add(p)
            unique.append((p, label))
    return unique


def _instructions(name: str, layout: Layout) -> str:
    options = []
    if layout.sources:
        algo = "SHA-256" if layout.sources[0].sha256 else "MD5"
        options.append(f"run `prunekit data fetch {name}` (downloads the official files into the user cache, "
                       f"verified by {algo})")
    if layout.apt_package:
        options.append(f"as root on Debian/Ubuntu, install the package {layout.apt_package}: "
                       f"`prunekit data fetch {name} --apt` or `apt-get install {layout.apt_package}`")
    if layout.manual:
        options.append(layout.manual)
    options.append(f"pass --data-root DIR (root= in Python) or set ${ENV_VAR}=DIR, DIR being a folder that has them")
    return "To get it: " + "; or ".join(options) + "."


def _explicit_root_error(name: str, layout: Layout, root: Path, cands: list[tuple[Path, str]]) -> DatasetError:
    """The error for an explicit root that does not hold the dataset: which folders, which files."""
    how = (f"To put it there: `prunekit data fetch {name} --data-root {root}`"
           if layout.sources else (layout.manual or f"dataset '{name}' has no automatic source"))
    tail = (f"An explicit data root is used as given, never replaced by another copy. {how}; or leave out "
            f"--data-root (root=) to search ${ENV_VAR}, the user cache and the system folders.")
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        return DatasetError(f"dataset '{name}': the data root {root} {what}.\n{tail}")
    rows = []
    for p, _label in cands:
        if p.is_dir():
            missing = _missing(layout, p)
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            rows.append(f"  - {p}: missing {', '.join(missing[:8])}{more}")
    absent = [str(p.relative_to(root)) for p, _label in cands if not p.is_dir()]
    if absent:
        rows.append(f"  (no sub-folder {', '.join(absent)})")
    rows_text = "\n".join(rows)
    return DatasetError(f"dataset '{name}' is not complete in the data root {root}. Need {layout.describe}; "
                        f"found:\n{rows_text}\n{tail}")


def resolve_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """Return the folder holding dataset ``name``'s files.

    ``root``: an explicit data root, searched alone (see the module docstring); ``None``: the search
    order. Raises DatasetError listing every place tried and what is missing, with how to get the data.
    """
    layout = _layout(name)
    cands = search_locations(name, root)
    for p, _label in cands:
        if _has_files(layout, p):
            return p
    if root is not None:
        raise _explicit_root_error(name, layout, Path(root).expanduser(), cands)
    env_note = "" if os.environ.get(ENV_VAR) else f"\n  (${ENV_VAR} is not set)"
    tried = "\n".join(f"  - {p}  [{label}]{_missing_note(layout, p)}" for p, label in cands)
    raise DatasetError(
        f"dataset '{name}' not found. Looked for {layout.describe} in, in order:\n{tried}{env_note}\n"
        + _instructions(name, layout)
    )


# ---------------------------------------------------------------------------------------------
# Fetching


def _hasher(algo: str):
    return hashlib.sha256() if algo == "sha256" else hashlib.md5(usedforsecurity=False)


def file_digest(path: str | os.PathLike, algo: str = "md5", chunk: int = 1 << 20) -> str:
    """Hex ``md5`` or ``sha256`` of a file."""
    h = _hasher(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file (an integrity check against published digests, not a security one)."""
    return file_digest(path, "md5", chunk)


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    return file_digest(path, "sha256", chunk)


def _progress_bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but don't fail a download over a progress bar
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)


def download(url: str, dest: str | os.PathLike, md5: str | None = None, *, sha256: str | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` via a temp file in the same folder, verify SHA-256 (if given) or MD5,
    then rename.

    ``dest`` only ever appears complete and verified. Any ``urllib`` scheme works (``file://`` in
    tests). A digest mismatch raises DatasetError naming the file, the expected and actual digest.
    """
    dest = Path(dest)
    algo, expected = ("sha256", sha256) if sha256 else ("md5", md5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = _hasher(algo)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                bar = _progress_bar(int(length) if length and length.isdigit() else None, dest.name, progress)
                try:
                    while block := resp.read(1 << 20):
                        out.write(block)
                        h.update(block)
                        if bar is not None:
                            bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise DatasetError(f"could not download {url} to {dest}: {e}") from e
        actual = h.hexdigest()
        if expected is not None and actual != expected.lower():
            raise DatasetError(
                f"checksum mismatch for {dest.name} (from {url}): expected {algo} {expected.lower()}, got {actual}. "
                "The download is corrupted or the source changed; it was not kept."
            )
        os.replace(tmp, dest)
        return dest
    finally:
        if tmp.exists():
            tmp.unlink()


def safe_extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract a tar(.gz) into ``dest`` refusing absolute paths, ``..``, links and special files.

    Members are written into a temp folder inside ``dest`` first and the top-level entries renamed
    into place at the end, so a failed extraction leaves nothing half-written behind.
    Returns the top-level paths created.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                for m in tar:
                    p = PurePosixPath(m.name)
                    if unsafe_member_path(m.name):
                        raise DatasetError(f"{archive}: refusing unsafe member path {m.name!r} (path traversal)")
                    if not p.parts:
                        continue
                    target = tmp.joinpath(*p.parts)
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    elif m.isfile():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        src = tar.extractfile(m)
                        if src is None:
                            raise DatasetError(f"{archive}: member {m.name!r} has no data")
                        with src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
                    else:
                        kind = "link" if (m.issym() or m.islnk()) else "special file"
                        raise DatasetError(f"{archive}: refusing {kind} member {m.name!r}")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DatasetError(f"{archive}: corrupted or truncated archive ({e})") from e
        created = []
        for child in sorted(tmp.iterdir()):
            final = dest / child.name
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            elif final.exists() or final.is_symlink():
                final.unlink()
            os.replace(child, final)
            created.append(final)
        return created
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a command quietly (separate function so tests can replace it)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _try_apt(package: str, notes: list[str]) -> bool:
    if shutil.which("apt-get") is None:
        notes.append("apt-get is not available on this machine")
        return False
    if not _is_root():
        notes.append(f"not root, so `apt-get install {package}` was not tried")
        return False
    r = _run(["apt-get", "install", "-y", package])
    if r.returncode != 0:  # stale or missing package lists: update once and retry
        _run(["apt-get", "update"])
        r = _run(["apt-get", "install", "-y", package])
    if r.returncode != 0:
        last = (r.stderr or r.stdout or "").strip().splitlines()[-1:] or [""]
        notes.append(f"`apt-get install -y {package}` failed (exit {r.returncode}): {last[0]}")
        return False
    return True


def _local_copy(name: str, src: Source, explicit: Path | None, skip: Path) -> Path | None:
    """A verified copy of archive ``src.filename`` in the search locations (or the cache folder itself).

    A copy whose digest differs is an error naming it and both digests, never silently replaced.
    """
    algo, expected = src.digest()
    bases = [p for p, _label in search_locations(name, explicit)] + ([cache_dir()] if explicit is None else [])
    for base in dict.fromkeys(bases):
        path = base / src.filename
        if path == skip or not path.is_file():
            continue
        actual = file_digest(path, algo)
        if expected is not None and actual != expected:
            raise DatasetError(f"checksum mismatch for the local copy {path}: expected {algo} {expected}, got "
                               f"{actual}. Delete or replace that file.")
        return path
    return None


def _obtain(name: str, layout: Layout, dest: Path, explicit: Path | None, allow_download: bool,
            progress: bool) -> bool:
    """Put every source of ``layout`` into ``dest`` (local copy, else download); False when a download
    is needed but not allowed (then nothing is done)."""
    plan = []
    for src in layout.sources:
        target = dest / src.filename
        algo, expected = src.digest()
        local = target if target.is_file() and file_digest(target, algo) == expected else None
        if local is None and src.extract:
            local = _local_copy(name, src, explicit, target)
        plan.append((src, target, local))
    if not allow_download and any(local is None for _src, _t, local in plan):
        return False
    for src, target, local in plan:
        if local is None:
            local = download(src.url, target, src.md5, sha256=src.sha256, progress=progress)
        if src.extract:
            (src.unpack or safe_extract_tar)(local, dest)
            if local == target:
                target.unlink()
    return True


def fetch(name: str, root: str | os.PathLike | None = None, *, allow_apt: bool = False,
          allow_download: bool = True, progress: bool = True) -> Path:
    """Make dataset ``name`` present and return its folder (as :func:`resolve_root` would).

    Without ``root``: already present anywhere → with ``allow_apt=True`` only, ``apt-get install -y
    <package>`` when a Debian package exists, apt-get is there and we are root (installing system
    packages is always the caller's explicit choice) → a verified local copy of an archive source
    (see :func:`search_locations`; used even with ``allow_download=False``) → download the official
    files (MD5/SHA-256-verified) into the user cache → DatasetError saying what was tried.

    With ``root``: already in ``root`` → download into ``root/<name>``. ``root`` must be an existing
    folder: a mistyped path is an error, not a new folder filled with a download. The Debian package
    installs into the system folders, so ``allow_apt`` does not apply to an explicit root.

    A found folder that fails the layout's ``verify`` check is re-extracted in place.
    """
    layout = _layout(name)
    explicit = Path(root).expanduser() if root is not None else None
    repair: Path | None = None
    try:
        found = resolve_root(name, explicit)
    except DatasetError as e:
        not_found = str(e)
        if explicit is not None and not explicit.is_dir():
            raise
    else:
        try:
            if layout.verify is not None:
                layout.verify(found)
            return found
        except DatasetError as e:
            not_found, repair = str(e), found
    notes: list[str] = []
    if allow_apt and layout.apt_package:
        if explicit is not None:
            notes.append(f"the Debian package {layout.apt_package} installs into the system folders, not into "
                         f"{explicit}, so apt-get was not tried")
        elif _try_apt(layout.apt_package, notes):
            try:
                return resolve_root(name)
            except DatasetError:
                notes.append(f"`apt-get install {layout.apt_package}` succeeded but the files were not found")
    elif layout.apt_package and explicit is None:
        notes.append(f"installing the Debian package {layout.apt_package} was not asked for "
                     f"(`prunekit data fetch {name} --apt`, allow_apt=True)")
    if layout.sources:
        dest = repair or (explicit / name if explicit is not None else cache_dir() / name)
        try:
            done = _obtain(name, layout, dest, explicit, allow_download, progress)
        except DatasetError as e:
            tried = "".join(f"\n  - {n}" for n in notes)
            raise DatasetError(f"{e}{tried}\n{not_found}") from e
        if done:
            try:
                return resolve_root(name, dest)
            except DatasetError:
                raise DatasetError(
                    f"downloaded {name} into {dest} but the expected files ({layout.describe}) are not there"
                ) from None
        notes.append("downloading was not allowed")
    if not layout.sources and not layout.apt_package:
        notes.append(f"'{name}' has no automatic source")
    tried = "".join(f"\n  - {n}" for n in notes)
    raise DatasetError(f"could not fetch dataset '{name}'.{tried}\n{not_found}")

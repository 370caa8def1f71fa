"""Tests of prunekit.data: formats, validation, safety, determinism, sharding, root resolution, fetch.

Every dataset file here is written in the exact on-disk format of the real distribution (big-endian
IDX headers, gzip; Python-2-style protocol-2 CIFAR pickles; PNG/JPEG class folders), small enough
to keep the whole module well under the time budget.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
from pathlib import Path

import archive_util
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.data import (
    ArrayDataset,
    RandomCropFlip,
    dataset_info,
    epoch_permutation,
    fetch,
    get_dataset,
    list_datasets,
    make_loader,
    read_idx,
    resolve_root,
    safe_extract_tar,
    shard_indices,
)
from prunekit.data import roots as roots_mod
from prunekit.data.roots import Source
from prunekit.errors import ConfigError, DatasetError, UnknownNameError


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Never touch the real user cache or a developer's $PRUNEKIT_DATA."""
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# ------------------------------------------------------------------------------------------------
# Writers for the real on-disk formats (independent of the library's own reader code)


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX: 0x0000, type code, ndim, big-endian uint32 dims, big-endian data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def make_idx_dir(d: Path, *, n_train=12, n_test=7, hw=(28, 28), gz=True, seed=0, num_classes=10):
    """Write an MNIST-style folder; returns {split: (images uint8 (N,H,W), labels uint8 (N,))}."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (d / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (d / name).write_bytes(data)
        out[split] = (images, labels)
    return out


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING).

    That is how the official CIFAR batches were written by cPickle: the byte keys and the raw array
    buffer appear as py2 strings, and no ``_codecs.encode`` global is involved.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names numpy._core; the 2009 files name numpy.core. GLOBAL is text, so rename in place.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(n, num_classes, rng, *, label_key=b"labels"):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    d = {b"batch_label": b"training batch 1 of 5", b"data": data, label_key: labels,
         b"filenames": [b"img_%d.png" % i for i in range(n)]}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [v // 5 for v in labels]
    return d, data, labels


def make_cifar10_dir(root: Path, *, n=6, seed=0, py3=False) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``root/cifar-10-batches-py`` with 5 train batches, test_batch and batches.meta."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    dump = (lambda o: pickle.dumps(o, protocol=2)) if py3 else py2_pickle
    train_x, train_y = [], []
    for i in range(1, 6):
        b, x, y = cifar_batch(n, 10, rng)
        (d / f"data_batch_{i}").write_bytes(dump(b))
        train_x.append(x)
        train_y += y
    b, tx, ty = cifar_batch(n, 10, rng)
    (d / "test_batch").write_bytes(dump(b))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(dump({b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072}))
    return {"train": (np.concatenate(train_x), train_y), "test": (tx, ty)}


def make_cifar100_dir(root: Path, *, n=9, seed=1):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        b, x, y = cifar_batch(n, 100, rng, label_key=b"fine_labels")
        (d / split).write_bytes(py2_pickle(b))
        out[split] = (x, y)
    meta = {b"fine_label_names": [b"c%d" % i for i in range(100)], b"coarse_label_names": [b"s%d" % i for i in range(20)]}
    (d / "meta").write_bytes(py2_pickle(meta))
    return out


def unnormalize(x: torch.Tensor, info) -> np.ndarray:
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.int64).numpy()


# ------------------------------------------------------------------------------------------------
# Catalogue


def test_catalogue_names_and_standard_normalisation():
    assert list_datasets() == ["cifar10", "cifar100", "fashion-mnist", "imagenet", "mnist", "shakespeare", "synthetic"]
    f = dataset_info("fashion-mnist")
    assert (f.num_classes, f.input_shape, f.mean, f.std, f.train_size, f.test_size) == (
        10, (1, 28, 28), (0.5,), (0.5,), 60000, 10000)
    assert dataset_info("mnist").mean == (0.1307,) and dataset_info("mnist").std == (0.3081,)
    for name, k in (("cifar10", 10), ("cifar100", 100)):
        i = dataset_info(name)
        assert i.num_classes == k and i.input_shape == (3, 32, 32)
        assert i.mean == (0.4914, 0.4822, 0.4465) and i.std == (0.2023, 0.1994, 0.2010)
    im = dataset_info("imagenet")
    assert im.input_shape == (3, 224, 224) and im.mean == (0.485, 0.456, 0.406) and im.std == (0.229, 0.224, 0.225)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.num_classes = 3  # type: ignore[misc]
    s = dataset_info("synthetic", num_classes=4, input_shape=(3, 8, 8), size=40)
    assert (s.num_classes, s.input_shape, s.mean, s.train_size, s.test_size) == (4, (3, 8, 8), (0.5,) * 3, 40, 40)


def test_bad_names_splits_and_options_are_clear_errors():
    with pytest.raises(UnknownNameError, match="fashion-mnist"):
        get_dataset("fashion-mnst")
    with pytest.raises(ConfigError, match="split"):
        get_dataset("synthetic", "validation")
    with pytest.raises(ConfigError, match="input_shape"):
        get_dataset("cifar10", input_shape=(3, 8, 8), download=False)
    with pytest.raises(ConfigError, match="nothing|generated"):
        resolve_root("synthetic")


# ------------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_roundtrip_exact(tmp_path, name, gz):
    ref = make_idx_dir(tmp_path / name, gz=gz)
    info = dataset_info(name)
    for split in ("train", "test"):
        ds = get_dataset(name, split, root=tmp_path, download=False)  # found as root/<name>
        images, labels = ref[split]
        assert len(ds) == len(images) and ds.num_classes == 10
        x, y = ds.get_batch(torch.arange(len(ds)), epoch=0)
        assert x.dtype == torch.float32 and x.shape == (len(images), 1, 28, 28)
        assert y.dtype == torch.int64
        np.testing.assert_array_equal(unnormalize(x, info)[:, 0], images)
        np.testing.assert_array_equal(y.numpy(), labels)
        x0, y0 = ds[3]
        assert x0.shape == (1, 28, 28) and y0.dtype == torch.int64 and int(y0) == labels[3]
        torch.testing.assert_close(x0, x[3])
        assert ds.augment is None  # no standard augmentation for (fashion-)mnist
    raw = get_dataset(name, "test", root=tmp_path / name, download=False, normalize=False)
    np.testing.assert_array_equal((raw.get_batch(torch.arange(7))[0] * 255).round().numpy()[:, 0], ref["test"][0])


def test_read_idx_multibyte_big_endian(tmp_path):
    arr = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 70000
    p = tmp_path / "x.idx"
    p.write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(p), arr)


def _corrupt(d: Path, case: str) -> str:
    """Damage one file of an IDX folder; return the file name the error must mention."""
    img = d / "train-images-idx3-ubyte.gz"
    lab = d / "train-labels-idx1-ubyte.gz"
    raw_img = gzip.decompress(img.read_bytes())
    raw_lab = gzip.decompress(lab.read_bytes())
    if case == "bad-magic":
        img.write_bytes(gzip.compress(b"\x00\x00\x07\x03" + raw_img[4:]))
        return img.name
    if case == "truncated-data":
        img.write_bytes(gzip.compress(raw_img[:-100]))
        return img.name
    if case == "trailing-bytes":
        lab.write_bytes(gzip.compress(raw_lab + b"\x00"))
        return lab.name
    if case == "count-mismatch":
        n = struct.unpack(">I", raw_lab[4:8])[0]
        lab.write_bytes(gzip.compress(raw_lab[:4] + struct.pack(">I", n - 1) + raw_lab[8:-1]))
        return lab.name
    if case == "label-out-of-range":
        lab.write_bytes(gzip.compress(raw_lab[:-1] + b"\x0a"))
        return lab.name
    if case == "gzip-crc":
        b = bytearray(img.read_bytes())
        b[-8] ^= 0xFF  # the CRC32 field of the gzip trailer
        img.write_bytes(bytes(b))
        return img.name
    if case == "gzip-truncated":
        img.write_bytes(img.read_bytes()[:-40])
        return img.name
    if case == "empty-file":
        lab.write_bytes(b"")
        return lab.name
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["bad-magic", "truncated-data", "trailing-bytes", "count-mismatch",
                                  "label-out-of-range", "gzip-crc", "gzip-truncated", "empty-file"])
def test_idx_corruption_names_the_file(tmp_path, case):
    d = tmp_path / "fm"
    make_idx_dir(d, n_train=10)
    fname = _corrupt(d, case)
    with pytest.raises(DatasetError) as ei:
        get_dataset("fashion-mnist", "train", root=d, download=False)
    msg = str(ei.value)
    assert fname in msg
    expected = {"bad-magic": "magic", "truncated-data": "truncated", "trailing-bytes": "trailing",
                "count-mismatch": "labels but", "label-out-of-range": "out of range", "gzip-crc": "gzip",
                "gzip-truncated": "gzip", "empty-file": "too short"}[case]
    assert expected in msg


# ------------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("py3", [False, True], ids=["py2-cPickle", "py3-protocol2"])
def test_cifar10_roundtrip_exact(tmp_path, py3):
    ref = make_cifar10_dir(tmp_path / "c10", py3=py3)
    info = dataset_info("cifar10")
    train = get_dataset("cifar10", "train", root=tmp_path / "c10", download=False, augment=False)
    test = get_dataset("cifar10", "test", root=tmp_path / "c10", download=False)
    assert test.classes[0] == "airplane" and test.classes[9] == "truck"
    for ds, split in ((train, "train"), (test, "test")):
        data, labels = ref[split]
        assert len(ds) == len(labels)
        x, y = ds.get_batch(torch.arange(len(ds)), 0)
        assert x.dtype == torch.float32 and x.shape == (len(labels), 3, 32, 32) and y.dtype == torch.int64
        # The row is the R plane, then G, then B, each 32x32 row-major.
        np.testing.assert_array_equal(unnormalize(x, info), data.reshape(-1, 3, 32, 32))
        np.testing.assert_array_equal(unnormalize(x, info)[:, 1, 2, 5], data[:, 1024 + 2 * 32 + 5])
        assert y.tolist() == labels
    # Standard augmentation: crop+flip on train only.
    assert isinstance(get_dataset("cifar10", root=tmp_path / "c10", download=False).augment, RandomCropFlip)
    assert test.augment is None
    assert isinstance(get_dataset("cifar10", "test", root=tmp_path / "c10", augment=True).augment, RandomCropFlip)


def test_cifar100_uses_fine_labels(tmp_path):
    ref = make_cifar100_dir(tmp_path)
    ds = get_dataset("cifar100", "test", root=tmp_path, download=False)  # finds cifar-100-python/
    x, y = ds.get_batch(torch.arange(len(ds)), 0)
    assert ds.num_classes == 100 and ds.classes[42] == "c42"
    assert y.tolist() == ref["test"][1]
    np.testing.assert_array_equal(unnormalize(x, dataset_info("cifar100")), ref["test"][0].reshape(-1, 3, 32, 32))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    make_cifar10_dir(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "pwned"
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    with pytest.raises(DatasetError) as ei:
        get_dataset("cifar10", root=tmp_path, download=False)
    msg = str(ei.value)
    assert "data_batch_3" in msg and "forbidden global" in msg and "system" in msg
    assert not marker.exists()


@pytest.mark.parametrize("target", [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen"),
                                    ("_codecs", "decode")])
def test_restricted_unpickler_allows_only_array_globals(tmp_path, target):
    make_cifar10_dir(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "test_batch"
    mod, name = target
    p.write_bytes(b"\x80\x02c" + f"{mod}\n{name}\n".encode() + b"X\x01\x00\x00\x001\x85R.")
    with pytest.raises(DatasetError, match=f"test_batch.*{mod}.{name}"):
        get_dataset("cifar10", "test", root=tmp_path, download=False)


def _cifar_corrupt(d: Path, case: str) -> tuple[str, str]:
    rng = np.random.default_rng(5)
    b, _, _ = cifar_batch(6, 10, rng)
    if case == "missing-key":
        del b[b"labels"]
    elif case == "wrong-shape":
        b[b"data"] = b[b"data"][:, :1024]
    elif case == "wrong-dtype":
        b[b"data"] = b[b"data"].astype(np.float32)
    elif case == "label-count":
        b[b"labels"] = b[b"labels"][:-1]
    elif case == "label-range":
        b[b"labels"][0] = 10
    elif case == "not-a-dict":
        b = [1, 2, 3]
    if case == "truncated":
        blob = py2_pickle(b)[:-500]
    else:
        blob = py2_pickle(b)
    (d / "data_batch_2").write_bytes(blob)
    return "data_batch_2", {"missing-key": "missing key 'labels'", "wrong-shape": "(N, 3072)",
                            "wrong-dtype": "uint8", "label-count": "labels", "label-range": "out of range",
                            "not-a-dict": "dict", "truncated": "truncated"}[case]


@pytest.mark.parametrize("case", ["missing-key", "wrong-shape", "wrong-dtype", "label-count", "label-range",
                                  "not-a-dict", "truncated"])
def test_cifar_corruption_names_the_file(tmp_path, case):
    make_cifar10_dir(tmp_path)
    fname, what = _cifar_corrupt(tmp_path / "cifar-10-batches-py", case)
    with pytest.raises(DatasetError) as ei:
        get_dataset("cifar10", root=tmp_path, download=False)
    assert fname in str(ei.value) and what in str(ei.value)


# ------------------------------------------------------------------------------------------------
# Image folders (imagenet layout)


def make_image_folder(root: Path, *, classes=("n01", "n02", "n03"), per_class=3, size=(20, 14)):
    from PIL import Image

    colours = {}
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                colour = (40 * ci + 10 * k, 200 - 30 * ci, 7 * k + 3)
                ext = "png" if k % 2 == 0 else "JPEG"
                path = root / split / c / f"img{k}.{ext}"
                if split == "train":  # textured, so crops/flips are visible
                    rng = np.random.default_rng(ci * 10 + k)
                    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                    Image.fromarray(arr).save(path, format="PNG" if ext == "png" else "JPEG")
                else:  # flat colour, lossless PNG: exact values survive resize + crop
                    Image.new("RGB", size, colour).save(path.with_suffix(".png"), format="PNG")
                    colours[(c, k)] = colour
    return colours


def test_image_folder_eval_values_labels_and_loader(tmp_path):
    colours = make_image_folder(tmp_path / "imagenet")
    ds = get_dataset("imagenet", "test", root=tmp_path, download=False, image_size=8, resize_size=10)
    assert len(ds) == 9 and ds.classes == ["n01", "n02", "n03"] and ds.num_classes == 3
    info = dataset_info("imagenet")
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert y == ds.classes.index(path.parent.name)
        k = int(path.stem[-1])
        expect = np.array(colours[(path.parent.name, k)]).reshape(3, 1, 1)
        np.testing.assert_array_equal(unnormalize(x, info), np.broadcast_to(expect, (3, 8, 8)))
    # Loader falls back to a DataLoader for datasets without get_batch; uneven eval shards cover all once.
    seen = []
    for r in range(2):
        loader = make_loader(ds, 2, shuffle=False, rank=r, world_size=2)
        for xb, yb in loader:
            assert xb.shape[1:] == (3, 8, 8) and yb.dtype == torch.int64
            seen.append(len(yb))
    assert sum(seen) == 9


def test_image_folder_train_augmentation_is_seeded(tmp_path):
    make_image_folder(tmp_path)
    ds = get_dataset("imagenet", "train", root=tmp_path, download=False, image_size=8, seed=3)
    assert ds.train  # standard train augmentation for the train split
    ds.set_epoch(0)
    a = torch.stack([ds[i][0] for i in range(len(ds))])
    b = torch.stack([ds[i][0] for i in reversed(range(len(ds)))]).flip(0)
    torch.testing.assert_close(a, b)  # order of access does not matter
    torch.manual_seed(123)  # nor does global RNG state
    torch.testing.assert_close(a, torch.stack([ds[i][0] for i in range(len(ds))]))
    ds.set_epoch(1)
    c = torch.stack([ds[i][0] for i in range(len(ds))])
    assert not torch.equal(a, c)


def test_image_folder_errors(tmp_path, monkeypatch):
    make_image_folder(tmp_path)
    bad = tmp_path / "val" / "n02" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = get_dataset("imagenet", "test", root=tmp_path, download=False, image_size=8)
    i = [str(p) for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DatasetError, match="broken.jpg.*unreadable"):
        ds[i]
    (tmp_path / "val" / "n04").mkdir()
    (tmp_path / "train" / "n04").mkdir()
    with pytest.raises(DatasetError, match="n04.*empty image folder"):
        get_dataset("imagenet", "test", root=tmp_path, download=False)
    monkeypatch.setitem(sys.modules, "PIL", None)  # simulate Pillow not installed
    with pytest.raises(DatasetError, match="Pillow"):
        get_dataset("imagenet", "test", root=tmp_path, download=False)


# ------------------------------------------------------------------------------------------------
# Augmentation and loaders


def _indexed_dataset(n: int, *, augment=None, hw=8) -> ArrayDataset:
    """Images whose pixels encode the sample index; label = index (to identify samples)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8, generator=g)
    return ArrayDataset(images, torch.arange(n), mean=(0.5,) * 3, std=(0.25,) * 3, augment=augment, seed=11,
                        num_classes=n)


def test_crop_flip_is_vectorised_deterministic_and_correct():
    n = 40
    aug = RandomCropFlip(padding=2)
    ds = _indexed_dataset(n, augment=aug)
    ds.normalize = False
    full, _ = ds.get_batch(torch.arange(n), epoch=5)
    torch.manual_seed(999)
    again, _ = ds.get_batch(torch.arange(n), epoch=5)
    torch.testing.assert_close(full, again)
    sub = torch.tensor([31, 4, 17])
    torch.testing.assert_close(ds.get_batch(sub, epoch=5)[0], full[sub])  # independent of batch make-up
    assert ds.to("cpu") is ds and torch.equal(ds.get_batch(sub, epoch=5)[0], full[sub])
    other, _ = ds.get_batch(torch.arange(n), epoch=6)
    assert not torch.equal(full, other)
    # Reference: explicit per-sample pad → crop → flip with the drawn parameters.
    oy, ox, fl = aug.params(n, 11, 5)
    padded = np.pad(ds.images.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(n):
        ref = padded[i, :, oy[i]: oy[i] + 8, ox[i]: ox[i] + 8]
        if fl[i]:
            ref = ref[:, :, ::-1]
        np.testing.assert_array_equal((full[i] * 255).round().numpy(), ref)
    assert 0 < int(fl.sum()) < n and len(set(oy.tolist())) > 1  # both flips and several offsets occur


def _ids(batch) -> list[int]:
    return batch[1].tolist()


@pytest.mark.parametrize("n,bs,world", [(103, 8, 2), (50, 4, 3), (64, 8, 4)])
def test_loader_rank_batches_union_equals_single_batch(n, bs, world):
    ds = _indexed_dataset(n, augment=RandomCropFlip(padding=2))
    for epoch in (0, 3):
        single = make_loader(ds, bs * world, shuffle=True, seed=7, rank=0, world_size=1)
        single.set_epoch(epoch)
        ranks = [make_loader(ds, bs, shuffle=True, seed=7, rank=r, world_size=world) for r in range(world)]
        for lo in ranks:
            lo.set_epoch(epoch)
        assert all(len(lo) == len(single) for lo in ranks)
        assert torch.equal(torch.cat([single.indices()]), epoch_permutation(n, 7, epoch))
        rank_batches = list(zip(*ranks))
        single_batches = list(single)
        for i, (sb, rbs) in enumerate(zip(single_batches, rank_batches)):
            sid = _ids(sb)
            union = [j for rb in rbs for j in _ids(rb)]
            if i < len(single_batches) - 1 or n % world == 0:
                assert sorted(union) == sorted(sid)
            else:  # last batch: DistributedSampler-style padding may repeat a few head samples
                assert set(sid) <= set(union) and len(union) - len(sid) == (-n) % world
            # ... and every rank sees exactly the same augmented pixels as the single process
            pos = {j: k for k, j in enumerate(sid)}
            for rb in rbs:
                for row, j in enumerate(_ids(rb)):
                    if j in pos:
                        torch.testing.assert_close(rb[0][row], sb[0][pos[j]])


def test_eval_and_drop_last_sharding():
    n, bs, world = 23, 3, 2
    ds = _indexed_dataset(n)
    # Eval: no padding, uneven shards, each sample exactly once, union of i-th batches = single i-th batch.
    single = list(make_loader(ds, bs * world, shuffle=False, world_size=1, rank=0))
    per_rank = [list(make_loader(ds, bs, shuffle=False, rank=r, world_size=world)) for r in range(world)]
    assert sorted(j for rb in per_rank for b in rb for j in _ids(b)) == list(range(n))
    for i, sb in enumerate(single):
        union = [j for rb in per_rank if i < len(rb) for j in _ids(rb[i])]
        assert sorted(union) == _ids(sb)
    # drop_last: every rank gets n // (bs * world) full batches, no duplicates.
    loaders = [make_loader(ds, bs, shuffle=True, drop_last=True, rank=r, world_size=world) for r in range(world)]
    assert [len(lo) for lo in loaders] == [n // (bs * world)] * world
    ids = [j for lo in loaders for b in lo for j in _ids(b)]
    assert len(ids) == len(set(ids)) == (n // (bs * world)) * bs * world
    assert all(len(b[1]) == bs for lo in loaders for b in lo)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 120), bs=st.integers(1, 9), world=st.integers(1, 5), shuffle=st.booleans(),
       drop_last=st.booleans(), pad=st.booleans(), epoch=st.integers(0, 3))
def test_shard_indices_properties(n, bs, world, shuffle, drop_last, pad, epoch):
    kw = {"shuffle": shuffle, "seed": 1, "epoch": epoch, "drop_last": drop_last, "pad": pad}
    single = shard_indices(n, rank=0, world_size=1, batch_size=bs * world, **kw).tolist()
    shards = [shard_indices(n, rank=r, world_size=world, batch_size=bs, **kw).tolist() for r in range(world)]
    if drop_last:
        assert len(single) == (n // (bs * world)) * bs * world
        assert all(len(s) == (n // (bs * world)) * bs for s in shards)
    elif pad:
        assert all(len(s) == -(-n // world) for s in shards)
    else:  # eval: every sample exactly once
        assert sorted(j for s in shards for j in s) == list(range(n))
    n_batches = len(single) // (bs * world) if drop_last else -(-len(single) // (bs * world))
    for i in range(n_batches):
        union = sorted(j for s in shards for j in s[i * bs: (i + 1) * bs])
        want = sorted(single[i * bs * world: (i + 1) * bs * world])
        if drop_last or not pad or i < n_batches - 1:
            assert union == want
        else:
            assert set(want) <= set(union)


def test_loader_resume_and_fallback_agree():
    n = 30
    ds = _indexed_dataset(n, augment=RandomCropFlip(padding=1))
    a = make_loader(ds, 4, shuffle=True, seed=3)
    history = []
    for epoch in range(3):
        a.set_epoch(epoch)
        history.append([(x.clone(), y.clone()) for x, y in a])
    resumed = make_loader(ds, 4, shuffle=True, seed=3)
    resumed.set_epoch(2)
    for (x1, y1), (x2, y2) in zip(history[2], resumed):
        torch.testing.assert_close(x1, x2)
        assert torch.equal(y1, y2)
    assert [y.tolist() for _, y in history[0]] != [y.tolist() for _, y in history[1]]
    # A dataset without get_batch goes through torch's DataLoader with the same sample order.
    plain = torch.utils.data.TensorDataset(torch.zeros(n, 1), torch.arange(n))
    fb = make_loader(plain, 4, shuffle=True, seed=3, rank=1, world_size=2)
    fast = make_loader(ds, 4, shuffle=True, seed=3, rank=1, world_size=2)
    fb.set_epoch(1)
    fast.set_epoch(1)
    assert [y.tolist() for _, y in fb] == [y.tolist() for _, y in fast]
    assert len(fb) == len(fast) == 4
    with pytest.raises(ConfigError):
        make_loader(ds, 4, shuffle=True, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        make_loader(ds, 0, shuffle=True)


# ------------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_deterministic_and_learnable():
    tr = get_dataset("synthetic", "train")
    te = get_dataset("synthetic", "test")
    assert tr.images.shape == (2048, 1, 28, 28) and len(te) == 512
    assert torch.equal(tr.images, get_dataset("synthetic", "train").images)
    assert not torch.equal(tr.images, get_dataset("synthetic", "train", seed=1).images)
    assert torch.bincount(tr.labels).tolist() == [2048 // 10 + (k < 2048 % 10) for k in range(10)]
    small = get_dataset("synthetic", "train", num_classes=3, input_shape=(3, 8, 8), size=30)
    assert small.get_batch(torch.arange(30))[0].shape == (30, 3, 8, 8) and small.num_classes == 3
    # A linear model trained for 2 epochs through the loader generalises to the test split.
    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10)
    loader = make_loader(tr, 64, shuffle=True, seed=0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
            with torch.no_grad():  # plain SGD (torch.optim's first use imports dynamo: ~2 s)
                for p in model.parameters():
                    p -= 0.05 * p.grad
    x, y = te.get_batch(torch.arange(len(te)))
    acc = (model(x.flatten(1)).argmax(1) == y).float().mean().item()
    assert acc > 0.9


# ------------------------------------------------------------------------------------------------
# Root resolution and fetching


def _touch_idx(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / (f + ".gz")).write_bytes(b"")
    return d


def test_resolve_root_search_order(tmp_path, monkeypatch):
    system = tmp_path / "sys" / "mnist"
    monkeypatch.setitem(roots_mod.LAYOUTS, "mnist", dataclasses.replace(roots_mod.LAYOUTS["mnist"], system=(str(system),)))
    env = tmp_path / "env"
    cache = tmp_path / "xdg-cache" / "prunekit" / "mnist"
    monkeypatch.setenv("PRUNEKIT_DATA", str(env))

    with pytest.raises(DatasetError) as ei:
        resolve_root("mnist")
    msg = str(ei.value)
    for place in (env, env / "mnist", cache, system):
        assert str(place) in msg
    assert "prunekit data fetch mnist" in msg and "--data-root" in msg

    _touch_idx(system)
    assert resolve_root("mnist") == system
    _touch_idx(cache)
    assert resolve_root("mnist") == cache
    _touch_idx(env / "mnist")
    assert resolve_root("mnist") == env / "mnist"
    _touch_idx(env)
    assert resolve_root("mnist") == env
    # Without XDG_CACHE_HOME the cache is ~/.cache/prunekit/<name>.
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("PRUNEKIT_DATA")
    home_cache = _touch_idx(tmp_path / "home" / ".cache" / "prunekit" / "mnist")
    assert resolve_root("mnist") == home_cache
    # CIFAR: the batches folder inside a candidate is what is returned.
    make_cifar10_dir(tmp_path / "c")
    assert resolve_root("cifar10", tmp_path / "c") == tmp_path / "c" / "cifar-10-batches-py"


def test_explicit_root_is_searched_alone_and_names_what_is_missing(tmp_path, monkeypatch):
    """root= / --data-root is used as given: a copy elsewhere is never used instead."""
    elsewhere = _touch_idx(tmp_path / "xdg-cache" / "prunekit" / "mnist")
    monkeypatch.setenv("PRUNEKIT_DATA", str(_touch_idx(tmp_path / "env")))
    assert resolve_root("mnist") == tmp_path / "env"
    monkeypatch.delenv("PRUNEKIT_DATA")
    assert resolve_root("mnist") == elsewhere

    missing = tmp_path / "typo"
    for download in (False, True):  # never a download into (or a creation of) a mistyped folder
        with pytest.raises(DatasetError, match="data root .*typo does not exist") as ei:
            get_dataset("mnist", "test", root=missing, download=download)
        assert "prunekit data fetch mnist --data-root" in str(ei.value)
        assert not missing.exists()

    explicit = tmp_path / "explicit"
    (explicit / "mnist").mkdir(parents=True)
    (explicit / "mnist" / "t10k-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DatasetError) as ei:
        resolve_root("mnist", explicit)
    msg = str(ei.value)
    assert f"{explicit / 'mnist'}: missing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], " \
           "t10k-labels-idx1-ubyte[.gz]" in msg
    assert f"{explicit}: missing train-images-idx3-ubyte[.gz]" in msg and str(elsewhere) not in msg
    assert resolve_root("mnist", _touch_idx(explicit / "MNIST" / "raw")) == explicit / "MNIST" / "raw"
    assert resolve_root("mnist", explicit) == explicit / "MNIST" / "raw"  # an alias sub-folder of the root
    assert resolve_root("mnist", _touch_idx(explicit)) == explicit


def test_missing_fashion_mnist_error_gives_the_options(tmp_path, monkeypatch):
    monkeypatch.setitem(roots_mod.LAYOUTS, "fashion-mnist",
                        dataclasses.replace(roots_mod.LAYOUTS["fashion-mnist"], system=(str(tmp_path / "none"),)))
    with pytest.raises(DatasetError) as ei:
        get_dataset("fashion-mnist", download=False)
    msg = str(ei.value)
    for option in ("prunekit data fetch fashion-mnist`", "prunekit data fetch fashion-mnist --apt",
                   "apt-get install dataset-fashion-mnist", "--data-root DIR", "$PRUNEKIT_DATA"):
        assert option in msg


def _file_sources(monkeypatch, name: str, files: dict[str, bytes], src_dir: Path, *, extract=False, md5=None):
    src_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for fname, blob in files.items():
        (src_dir / fname).write_bytes(blob)
        digest = md5 or hashlib.md5(blob).hexdigest()
        sources.append(Source((src_dir / fname).as_uri(), fname, digest, extract=extract))
    layout = dataclasses.replace(roots_mod.LAYOUTS[name], sources=tuple(sources), system=())
    monkeypatch.setitem(roots_mod.LAYOUTS, name, layout)


def test_fetch_idx_from_file_url_into_cache(tmp_path, monkeypatch):
    ref = make_idx_dir(tmp_path / "origin", gz=True)
    files = {p.name: p.read_bytes() for p in (tmp_path / "origin").iterdir()}
    _file_sources(monkeypatch, "mnist", files, tmp_path / "server")
    ds = get_dataset("mnist", "test")  # not found anywhere → fetched (download=True is the default)
    np.testing.assert_array_equal(ds.labels.numpy(), ref["test"][1])
    got = resolve_root("mnist")
    assert got == tmp_path / "xdg-cache" / "prunekit" / "mnist"
    assert sorted(p.name for p in got.iterdir()) == sorted(files)  # no .part leftovers
    for f in (tmp_path / "server").iterdir():  # present now: fetch does not download again
        f.unlink()
    assert fetch("mnist", allow_apt=False, progress=False) == got


def test_fetch_into_an_explicit_root(tmp_path, monkeypatch):
    ref = make_idx_dir(tmp_path / "origin", gz=True)
    files = {p.name: p.read_bytes() for p in (tmp_path / "origin").iterdir()}
    _file_sources(monkeypatch, "mnist", files, tmp_path / "server")
    with pytest.raises(DatasetError, match="does not exist"):  # a root is never created by fetch
        fetch("mnist", tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()
    (tmp_path / "data").mkdir()
    # Loading with download=True fills an existing explicit root, as fetch(name, root) does.
    ds = get_dataset("mnist", "test", root=tmp_path / "data")
    np.testing.assert_array_equal(ds.labels.numpy(), ref["test"][1])
    assert resolve_root("mnist", tmp_path / "data") == tmp_path / "data" / "mnist"
    assert not (tmp_path / "xdg-cache" / "prunekit" / "mnist").exists()


def test_fetch_checksum_mismatch_keeps_nothing(tmp_path, monkeypatch):
    _file_sources(monkeypatch, "mnist", {"train-images-idx3-ubyte.gz": b"corrupted payload"}, tmp_path / "server",
                  md5="0" * 32)
    (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError) as ei:
        fetch("mnist", tmp_path / "data", allow_apt=False, progress=False)
    msg = str(ei.value)
    assert "train-images-idx3-ubyte.gz" in msg and "0" * 32 in msg
    assert hashlib.md5(b"corrupted payload").hexdigest() in msg
    dest = tmp_path / "data" / "mnist"
    assert not dest.exists() or list(dest.iterdir()) == []


def test_fetch_missing_url_and_no_download(tmp_path, monkeypatch):
    layout = dataclasses.replace(roots_mod.LAYOUTS["mnist"], system=(), sources=(
        Source((tmp_path / "absent.gz").as_uri(), "train-images-idx3-ubyte.gz", "0" * 32),))
    monkeypatch.setitem(roots_mod.LAYOUTS, "mnist", layout)
    with pytest.raises(DatasetError, match="could not download"):
        fetch("mnist", allow_apt=False, progress=False)
    with pytest.raises(DatasetError, match="not allowed.*\n.*not found"):
        fetch("mnist", allow_apt=False, allow_download=False)
    with pytest.raises(DatasetError, match="image-net.org"):
        fetch("imagenet", tmp_path)


_tar_gz = archive_util.tar_gz


def test_fetch_cifar_archive_and_safe_extraction(tmp_path, monkeypatch):
    ref = make_cifar10_dir(tmp_path / "origin")
    d = tmp_path / "origin" / "cifar-10-batches-py"
    archive = _tar_gz({f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in d.iterdir()})
    _file_sources(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": archive}, tmp_path / "server", extract=True)
    (tmp_path / "data").mkdir()
    got = fetch("cifar10", tmp_path / "data", allow_apt=False, progress=False)
    assert got == tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    assert not (tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz").exists()
    ds = get_dataset("cifar10", "test", root=tmp_path / "data", download=False)
    assert ds.labels.tolist() == ref["test"][1]

    for bad, why in ((_tar_gz({"../escape.txt": b"x"}), "unsafe"), (_tar_gz({"/abs.txt": b"x"}), "unsafe"),
                     (_tar_gz({}, links={"a/link": "/etc/passwd"}), "link")):
        arc = tmp_path / "bad.tar.gz"
        arc.write_bytes(bad)
        with pytest.raises(DatasetError, match=why):
            safe_extract_tar(arc, tmp_path / "out")
        assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "a").exists()
        assert list((tmp_path / "out").iterdir()) == []
    arc.write_bytes(archive[: len(archive) // 2])
    with pytest.raises(DatasetError, match="bad.tar.gz.*(corrupt|truncated)"):
        safe_extract_tar(arc, tmp_path / "out")


def test_fetch_uses_apt_only_when_asked_and_root(tmp_path, monkeypatch):
    system = tmp_path / "usr-share" / "fashion-mnist"
    layout = dataclasses.replace(roots_mod.LAYOUTS["fashion-mnist"], system=(str(system),), sources=())
    monkeypatch.setitem(roots_mod.LAYOUTS, "fashion-mnist", layout)
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        _touch_idx(system)  # what installing the package does
        return roots_mod.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(roots_mod, "_run", fake_run)
    monkeypatch.setattr(roots_mod.shutil, "which", lambda exe: "/usr/bin/" + exe)
    monkeypatch.setattr(roots_mod, "_is_root", lambda: True)
    # Loading never installs anything, and neither does fetch unless asked (allow_apt / --apt).
    with pytest.raises(DatasetError, match="not asked for .*--apt"):
        get_dataset("fashion-mnist", "test")
    with pytest.raises(DatasetError, match="not asked for"):
        fetch("fashion-mnist", progress=False)
    assert calls == []
    monkeypatch.setattr(roots_mod, "_is_root", lambda: False)
    with pytest.raises(DatasetError, match="not root"):
        fetch("fashion-mnist", allow_apt=True, progress=False)
    assert calls == []
    explicit = tmp_path / "mine"
    explicit.mkdir()
    with pytest.raises(DatasetError, match="installs into the system folders"):
        fetch("fashion-mnist", explicit, allow_apt=True, progress=False)
    assert calls == []
    monkeypatch.setattr(roots_mod, "_is_root", lambda: True)
    assert fetch("fashion-mnist", allow_apt=True, progress=False) == system
    assert calls == [["apt-get", "install", "-y", "dataset-fashion-mnist"]]


# ------------------------------------------------------------------------------------------------
# Real data


@pytest.mark.realdata
def test_real_fashion_mnist(fashion_mnist_root):
    train = get_dataset("fashion-mnist", "train", root=fashion_mnist_root, download=False)
    test = get_dataset("fashion-mnist", "test", root=fashion_mnist_root, download=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.num_classes == 10 and int(train.labels.max()) == 9
    assert int(train.labels[0]) == 9  # the first training image is an ankle boot
    x, y = train.get_batch(torch.arange(512), epoch=0)
    assert x.shape == (512, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.bincount(test.labels).tolist() == [1000] * 10

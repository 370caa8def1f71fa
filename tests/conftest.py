"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunekit.data.roots import resolve_root
from prunekit.errors import DatasetError

#: The official Neuron Merging LeNet-300-100 checkpoint, kept next to the repository (``../shared``).
OFFICIAL_LENET = Path(__file__).resolve().parents[2] / "shared/checkpoints/neuron-merging-lenet300-fashionmnist.pth.tar"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: ~100× faster than two threads contending on 2 cores.

    Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    """The Fashion-MNIST folder, found exactly as the library finds it (:func:`prunekit.data.roots.resolve_root`).

    Skips the test when the data is absent, saying how to get it.
    """
    try:
        return resolve_root("fashion-mnist")
    except DatasetError:
        pytest.skip("Fashion-MNIST not found: run `prunekit data fetch fashion-mnist` (add --apt to install the "
                    "Debian package dataset-fashion-mnist as root), or set $PRUNEKIT_DATA to a folder holding it")


@pytest.fixture(scope="session")
def official_lenet_checkpoint() -> Path:
    """Path of the official Neuron Merging LeNet-300-100 Fashion-MNIST checkpoint; skips when absent."""
    if not OFFICIAL_LENET.is_file():
        pytest.skip(f"official Neuron Merging checkpoint not found at {OFFICIAL_LENET} (see ../shared/checkpoints/README.md)")
    return OFFICIAL_LENET

"""Export a model with exact zeros (gRDA) for real savings: ``prunekit sparsify``.

* :mod:`.structured`: dead channels (all-zero producer rows / BN γ = 0 → constant, folded into the
  consumers; all-zero consumer columns → unused) removed physically through the engine;
* :mod:`.storage`: the remaining unstructured zeros stored compactly (bitmask / CSR safetensors);
* :mod:`.kernels`: CSR Linear kernels, used per layer only where they measure faster;
* :mod:`.export`: the pipeline and its report.

>>> from prunekit.sparse import export
>>> report = export(model, "out/sparse", input_shape=(1, 28, 28))
"""
from .export import SparsifyResult, export, sparsify
from .kernels import SparseLinear, choose_kernels, with_sparse_kernels
from .storage import SPARSE_FORMAT, decode_state, encode_state, encode_tensor, load_sparse, save_sparse
from .structured import DeadChannels, dead_channel_plan, remove_dead_channels

__all__ = [
    "SPARSE_FORMAT", "DeadChannels", "SparseLinear", "SparsifyResult", "choose_kernels", "dead_channel_plan",
    "decode_state", "encode_state", "encode_tensor", "export", "load_sparse", "remove_dead_channels", "save_sparse",
    "sparsify", "with_sparse_kernels",
]

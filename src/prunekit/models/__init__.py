"""Model zoo: ``create(name, **cfg)`` builds a registered architecture; ``arch_of(model)`` returns
``{"name", "config"}`` to rebuild it. Every model exposes ``input_shape`` = (C, H, W) of its default input.

Registered: lenet-300-100, lenet-5, vgg16, resnet20/32/56/110, resnet-cifar, wrn, wrn-40-4, wrn-28-10,
resnet50, mobilenetv2; with ``transformers`` installed: vit-fmnist, llama-shakespeare. Common cfg keys: ``num_classes``, ``in_channels``, ``input_size``.
"""
from . import hf, lenet, mobilenetv2, resnet, resnet_cifar, vgg, wide_resnet  # noqa: F401  (register models)
from .registry import MODELS, arch_of, create, list_models, register_model

__all__ = ["MODELS", "arch_of", "create", "list_models", "register_model"]

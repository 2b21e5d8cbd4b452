"""The model zoo: QLHS networks (Eq.(3)-(7)), ResNet50 and MobileNetV3-Large."""

from qlhs_jax.models.fold import apply_folded, fold_batchnorm
from qlhs_jax.models.layers import activation, derivative
from qlhs_jax.models.layout import convert_hidden_layout
from qlhs_jax.models.mobilenetv3 import MobileNetV3Large
from qlhs_jax.models.qlhs import QLHSBlock, QLHSNet
from qlhs_jax.models.registry import ModelInfo, create, info, names
from qlhs_jax.models.resnet import ResNet

__all__ = [
    "MobileNetV3Large", "ModelInfo", "QLHSBlock", "QLHSNet", "ResNet", "activation",
    "apply_folded", "convert_hidden_layout", "create", "derivative", "fold_batchnorm",
    "info", "names",
]

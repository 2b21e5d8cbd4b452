"""The model zoo: every row of the paper's Table 1, by name.

``names()`` lists them, ``create(name, **overrides)`` builds one (``num_classes``
defaults to 100, ImageNet-100), ``info(name)`` gives the paper's figures for the row.
Table 1 leaves the activation of the Eq.(4), (6) and (7) rows blank; we read them as the
paper's default softball@ds and say so in the README.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from qlhs_jax.models.mobilenetv3 import MobileNetV3Large
from qlhs_jax.models.qlhs import QLHSNet
from qlhs_jax.models.resnet import ResNet


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  name: str
  builder: Callable[..., Any]
  description: str
  paper_params: float | None = None  # Table 1, in millions (ImageNet-100 head)
  paper_top1: float | None = None    # Table 1, ImageNet-100 top-1 after 50 epochs
  table1: bool = True


def _qlhs(**kw):
  return functools.partial(QLHSNet, **kw)


_ZOO = [
    ModelInfo("resnet50", ResNet, "ResNet50 (timm resnet50)", 23.7, 84.52),
    ModelInfo("mobilenetv3_large_100", MobileNetV3Large,
              "MobileNetV3-Large 1.0 (timm mobilenetv3_large_100)", 4.33, 82.91),
    ModelInfo("eq3_relu_all", _qlhs(form="eq3", activation="relu", placement="all"),
              "Eq.(3), shared 3x3, x4, ReLU after every block", 8.61, 82.06),
    ModelInfo("eq3_hardtanh_ds", _qlhs(form="eq3", activation="hardtanh"),
              "Eq.(3), shared 3x3, x4, hardtanh at downsampling", 8.61, 82.34),
    ModelInfo("eq3_hardball_ds", _qlhs(form="eq3", activation="hardball"),
              "Eq.(3), shared 3x3, x4, hardball at downsampling", 8.61, 83.50),
    ModelInfo("eq3_softball_ds", _qlhs(form="eq3", activation="softball"),
              "Eq.(3), shared 3x3, x4, softball at downsampling", 8.61, 83.66),
    ModelInfo("eq3_nows_softball_ds", _qlhs(form="eq3", weight_sharing=False),
              "Eq.(3), per-channel 3x3 (no ws), x4, softball@ds", 8.73, 84.24),
    ModelInfo("eq3_nows_x6_softball_ds",
              _qlhs(form="eq3", weight_sharing=False, expansion=6),
              "Eq.(3), no ws, x6, softball@ds", 13.0, 84.58),
    ModelInfo("eq4_softball_ds", _qlhs(form="eq4"),
              "Eq.(4), shared 3x3, x4, softball@ds (activation blank in Table 1)",
              5.70, 81.88),
    ModelInfo("eq5_softball_ds", _qlhs(form="eq5"),
              "Eq.(5), shared 3x3, x4, softball@ds", 4.26, 78.64),
    ModelInfo("eq6_softball_ds", _qlhs(form="eq6"),
              "Eq.(6), shared 3x3, x4, BN after C, softball@ds (activation blank in "
              "Table 1)", 5.61, 82.52),
    ModelInfo("eq7_nows_x6_softball_ds",
              _qlhs(form="eq7", weight_sharing=False, expansion=6),
              "Eq.(7), no ws, x6, softball@ds (activation blank in Table 1)", 13.0, 84.96),
    # Not in the paper: the GL-closed variant of Eq.(3) (symmetry.md, 2b).
    ModelInfo("eq3w_softball_ds", _qlhs(form="eq3w"),
              "Eq.(3) with a 1x1 mixing W in front of D: A(D(W u) * (C u)); exact "
              "O(n) per stage with softball", table1=False),
    ModelInfo("eq3w_none", _qlhs(form="eq3w", activation="none"),
              "Eq.(3) with W, no activation: exact GL(n) per stage", table1=False),
]
_BY_NAME = {m.name: m for m in _ZOO}


def names(table1_only: bool = False) -> list[str]:
  """Registered model names (Table 1 rows first, in the paper's order)."""
  return [m.name for m in _ZOO if m.table1 or not table1_only]


def info(name: str) -> ModelInfo:
  if name not in _BY_NAME:
    raise KeyError(f"unknown model {name!r}; registered models: {', '.join(names())}")
  return _BY_NAME[name]


def create(name: str, **overrides):
  """Builds the Flax module of a registered model; ``overrides`` set module fields
  (``num_classes`` defaults to 100; e.g. ``widths``, ``depths``, ``dtype``)."""
  builder = info(name).builder
  kwargs = {"num_classes": 100, **overrides}
  try:
    return builder(**kwargs)
  except TypeError as err:
    raise TypeError(f"model {name!r} does not take {sorted(overrides)}: {err}") from None

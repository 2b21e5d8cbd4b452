r"""ResNet50 baseline (timm resnet50), ImageNet-100, 50 epochs, 224 px.

  python -m qlhs_jax.main --config=configs/resnet50.py --workdir=$HOME/runs/resnet50

Paper (Table 1): top-1 84.52, 23.7M parameters. ``configs/resnet50.py:quickstart`` is
the embedded-digits laptop version. Hardware: one H100 80GB, batch 256, bfloat16.
Expected time: ~14 minutes of GPU compute at the harness's 7.4k img/s (README, Speed;
H200), ~55 minutes when one 16-core host decodes the images. Not yet run end to end
here: expect the paper's top-1 above.
"""

from qlhs_jax import config as qconfig


def get_config(arg=None):
  model, options = qconfig.parse_arg(arg, {"resnet50": "resnet50"}, "resnet50")
  c = qconfig.base_config(model)
  return qconfig.apply_options(c, options)

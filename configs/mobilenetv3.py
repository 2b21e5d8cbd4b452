r"""MobileNetV3-Large 1.0 baseline (timm mobilenetv3_large_100), ImageNet-100, 50 epochs.

  python -m qlhs_jax.main --config=configs/mobilenetv3.py --workdir=$HOME/runs/mbv3

Paper (Table 1): top-1 82.91, 4.33M parameters, trained with the same recipe as every
row (the paper's "identical training strategy"; timm's own MobileNetV3 recipe differs).
``configs/mobilenetv3.py:quickstart`` is the embedded-digits laptop version (full
width: the architecture has no width knob here). Hardware: one H100 80GB, batch 256,
bfloat16. Expected time: bounded by the host's decoding (~55 minutes on one 16-core
host, README, Data); the GPU step was not measured yet. Not yet run end to end here:
expect the paper's top-1 above.
"""

from qlhs_jax import config as qconfig


def get_config(arg=None):
  model, options = qconfig.parse_arg(
      arg, {"mobilenetv3_large_100": "mobilenetv3_large_100"}, "mobilenetv3_large_100")
  c = qconfig.base_config(model)
  return qconfig.apply_options(c, options)

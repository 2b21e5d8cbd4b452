"""The training configuration: the paper's recipe as an ml_collections ConfigDict.

``base_config(model)`` holds the recipe (design/recipe.md); the files in ``configs/``
pick the model and document the command, hardware, time and expected result.
``apply_quickstart(config)`` shrinks any of them to the embedded digits dataset and a
tiny network that trains on a 2-core CPU in a few minutes; a config argument's
``,quickstart`` option applies it (``parse_arg``, ``apply_options``).
"""

from __future__ import annotations

import difflib
import json
import os

import ml_collections

from qlhs_jax import data as data_lib
from qlhs_jax import xla_options
from qlhs_jax.data import config as data_config
from qlhs_jax.kernels import settings as kernel_settings
from qlhs_jax.models import registry

# Keys that may change when a run resumes in the same workdir: how it runs, not what it
# computes. Every other difference needs --config.allow_config_change=True.
RUNTIME_KEYS = frozenset({
    "stop_after_steps", "progress_bar", "log_every_steps", "eval_only", "eval_checkpoint",
    "allow_config_change", "distributed", "nan_max_retries", "data.workers",
    "data.read_threads", "data.prefetch", "data.data_dir", "data.folder",
    "data.resized_dir", "data.index_cache_dir", "checkpoint_async",
    # The kernels' forms and tiles, and how the step writes its state: the same values up
    # to rounding, as on another device (kernels.d_kernel: D's kernel rounded to the
    # compute dtype, as the plain path rounds it).
    *(f"kernels.{key}" for key in kernel_settings.VARIABLES), "group_state_writes",
    "xla_fma",
})


def base_config(model: str = "eq3_softball_ds") -> ml_collections.ConfigDict:
  """The paper's recipe (section 5.2; timm's ResNeXt-50 script, peak lr 0.3, 50 epochs)
  on ImageNet-100 at 224 px."""
  c = ml_collections.ConfigDict()
  c.model = model                 # a name from qlhs_jax.models.names()
  # Module fields of the model; None keeps the registry's value. ResNet50 and
  # MobileNetV3 take only widths/depths/stem/stem_pool/stem_pad_channels/stem_conv
  # (ResNet) or none of them.
  # Typed placeholders, so that the command line can set them
  # (--config.model_overrides.fuse_d_bn=xla); a plain None cannot be overridden.
  ph = ml_collections.config_dict.placeholder
  c.model_overrides = ml_collections.ConfigDict(dict(
      d_impl=ph(str), remat=ph(str), hidden_layout=ph(str), fuse_d_bn=ph(str),
      block_max_width=ph(int), pin_hidden_layout=ph(bool), widths=ph(tuple),
      depths=ph(tuple), stem=ph(str), stem_pool=ph(str), stem_pad_channels=ph(int),
      stem_conv=ph(str), expansion=ph(int), weight_sharing=ph(bool),
      activation=ph(str), placement=ph(str), eq6_c_norm=ph(bool)))
  # Which kernels compute D + BatchNorm + product and BatchNorm's sums, and their tiles
  # (qlhs_jax.kernels.settings; benchmarks/NOTES.md has what each was measured at).
  # Empty: the QLHS_* environment variable of the same meaning, else the default ("auto":
  # the Pallas stencil kernels on NVIDIA GPUs, XLA's forms elsewhere).
  c.kernels = ml_collections.ConfigDict(kernel_settings.default_config())
  c.dtype = "bfloat16"            # compute dtype; parameters and logits stay float32
  # The train step writes its new state in a few grouped kernels (~30 for Eq.(3)) and
  # keeps the old state until then; False: a kernel per leaf (~95) and the old state
  # donated, one copy of the state less in memory. The same values up to rounding
  # (steps.keep_where; benchmarks/NOTES.md experiment 33).
  c.group_state_writes = True
  # LLVM's multiply-add contraction in the kernels XLA compiles for NVIDIA GPUs (one
  # instruction and one rounding for a * b + c, as nvcc and Triton do; XLA's default is
  # a multiply and an add): XLA_FLAGS gets --xla_backend_extra_options=-nvptx-fma-level=1
  # before JAX starts (qlhs_jax.xla_options; benchmarks/NOTES.md experiment 36). The
  # same values up to rounding; no effect on CPUs and TPUs.
  c.xla_fma = True
  c.data = data_lib.default_config()
  # uint8 train batches, normalised and erased inside the train step: the host's share
  # of the recipe's augmentation is smaller and a quarter of the bytes leave it.
  c.data.device_normalize = True

  c.batch_size = 256              # global batch (all devices, all hosts)
  c.eval_batch_size = 256
  # The paper does not state its single-GPU batch. Peak lr 0.3 is taken to hold at
  # batch 256 and scales linearly: lr = learning_rate * batch_size / lr_reference_batch.
  c.learning_rate = 0.3
  c.lr_reference_batch = 256
  c.epochs = 50
  c.warmup_epochs = 5
  c.warmup_lr = 1e-5
  c.min_lr = 0.0
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-4           # coupled L2, not on biases and 1-D parameters
  c.label_smoothing = 0.1
  c.seed = 0
  # BatchNorm: statistics per data-parallel replica (timm's DDP), running averages
  # averaged across replicas; True = statistics over the whole global batch (sync BN).
  c.sync_bn = False

  c.log_every_steps = 50
  c.progress_bar = True
  c.checkpoint_every_steps = 0    # 0: at the end of every epoch only
  c.keep_checkpoints = 3          # the last N, plus the best by validation top-1
  c.checkpoint_async = True
  c.init_from = ""                # a workdir or checkpoint step dir: weights only
  c.eval_only = False             # evaluate a checkpoint of this workdir and exit
  c.eval_checkpoint = "latest"    # 'latest' or 'best'
  c.allow_config_change = False   # resume a workdir whose saved config differs
  c.stop_after_steps = 0          # >0: save and stop after this many steps in all
  # The paper's failure mode: non-finite loss or gradients. The step skips such
  # updates; the loop then restores the last checkpoint and scales the lr.
  c.nan_lr_factor = 0.5
  c.nan_max_retries = 3
  c.distributed = False           # call jax.distributed.initialize() (multi-host)
  c.lock()  # a misspelled key fails where it is set
  return c


def apply_quickstart(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks ``c`` for a 2-core CPU: embedded digits at 32 px, widths (16, 32, 64, 128),
  one block per stage, the small stem, float32, a few epochs. Keeps c.model's form."""
  on_device = c.data.device_normalize, c.data.device_randaugment
  c.data = data_lib.digits_config(image_size=32)
  c.data.device_normalize, c.data.device_randaugment = on_device
  if c.model != "mobilenetv3_large_100":  # MobileNetV3 has no width/depth/stem knobs
    c.model_overrides.widths = (16, 32, 64, 128)
    c.model_overrides.depths = (1, 1, 1, 1)
    c.model_overrides.stem = "small"
  c.dtype = "float32"             # bfloat16 is emulated, hence slow, on CPUs
  c.batch_size = 64
  c.eval_batch_size = 120
  c.learning_rate = 0.3           # peak lr 0.3 at batch 64: the linear scaling rule's
  c.lr_reference_batch = 64       # 0.075 learns far slower on this small dataset
  c.epochs = 12
  c.warmup_epochs = 1
  c.log_every_steps = 10
  c.keep_checkpoints = 2
  return c


# The options a config argument may name after its variant: "quickstart"
# (:func:`apply_quickstart`) in every config; "dot_forms" (config.kernels set to
# ``kernel_settings.DOT_FORMS``) in those of the models with fused D + BatchNorm +
# product blocks that take it (configs/eq3.py, eq3w.py, eq5.py).
QUICKSTART = ("quickstart",)
FUSED_OPTIONS = ("quickstart", "dot_forms")


def parse_arg(arg: str | None, variants: dict, default: str,
              options: tuple[str, ...] = QUICKSTART) -> tuple[str, frozenset[str]]:
  """``"variant[,option...]"`` -> (variant value, the options named), with a clear
  error; ``options`` are the ones this config takes."""
  parts = [p for p in (arg or "").split(",") if p]
  named = frozenset(p for p in parts if p in options)
  parts = [p for p in parts if p not in options]
  if other := [p for p in parts if p in FUSED_OPTIONS]:
    raise ValueError(f"config argument {arg!r}: this config takes no {other[0]!r} "
                     f"(its options: {list(options)}); 'dot_forms' is for the models "
                     f"with fused D + BatchNorm + product blocks: configs/eq3.py, "
                     f"eq3w.py, eq5.py")
  if len(parts) > 1:
    raise ValueError(f"config argument {arg!r}: one variant at most, plus options "
                     f"{list(options)}; {parts[1]!r} is neither")
  name = parts[0] if parts else default
  if name not in variants:
    raise ValueError(f"unknown variant {name!r}; choose one of {sorted(variants)} "
                     f"(optionally followed by options {list(options)}, e.g. "
                     f"',{options[-1]}')")
  return variants[name], named


def apply_options(c: ml_collections.ConfigDict, options: frozenset[str]
                  ) -> ml_collections.ConfigDict:
  """``c`` with the config argument's ``options`` (:func:`parse_arg`) applied:
  "dot_forms" sets config.kernels to ``kernel_settings.DOT_FORMS``, "quickstart"
  shrinks it (:func:`apply_quickstart`)."""
  if "dot_forms" in options:
    c.kernels.update(kernel_settings.DOT_FORMS)
  return apply_quickstart(c) if "quickstart" in options else c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the problem and the fix."""
  data_config.reject_unknown_keys(c, base_config(), "config")
  if c.model not in registry.names():
    hint = difflib.get_close_matches(c.model, registry.names(), 1)
    raise ValueError(f"config.model={c.model!r} is not a registered model"
                     + (f" (did you mean {hint[0]!r}?)" if hint else "")
                     + f"; choose one of {registry.names()}")
  if c.dtype not in ("bfloat16", "float32", "float16", "float64"):
    raise ValueError(f"config.dtype={c.dtype!r}; use 'bfloat16' or 'float32'")
  if c.eval_checkpoint not in ("latest", "best"):
    raise ValueError(f"config.eval_checkpoint={c.eval_checkpoint!r}; use 'latest' or 'best'")
  for key in ("batch_size", "eval_batch_size", "epochs", "lr_reference_batch"):
    if c[key] <= 0:
      raise ValueError(f"config.{key}={c[key]} must be positive")
  if not 0 < c.nan_lr_factor < 1:
    raise ValueError(f"config.nan_lr_factor={c.nan_lr_factor} must lie in (0, 1)")
  data_config.validate(c.data)
  kernel_settings.check(c.kernels)
  if xla_options.ENV in os.environ and xla_options.env_setting() != c.xla_fma:
    raise ValueError(f"config.xla_fma={c.xla_fma} but {xla_options.ENV}="
                     f"{os.environ[xla_options.ENV]!r} in the environment: unset the "
                     f"variable, or make it agree with the config")


def model_overrides(c) -> dict:
  """The overrides that are set (not None), as plain Python values."""
  return {k: (tuple(v) if isinstance(v, list) else v)
          for k, v in flatten(c.model_overrides).items() if v is not None}


def flatten(c) -> dict:
  """``{"a.b": value}`` with JSON-comparable values (tuples become lists)."""
  out = {}

  def walk(prefix, d):
    for k, v in d.items():
      key = f"{prefix}{k}"
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(key + ".", v)
      else:
        out[key] = json.loads(json.dumps(v))
  walk("", c.to_dict() if isinstance(c, ml_collections.ConfigDict) else c)
  return out


def differences(saved: dict, current: dict) -> list[str]:
  """Keys whose values differ between two flattened configs, runtime keys excluded. A key
  one side lacks counts as None (unset): a run saved before a config key existed (a new
  ``model_overrides`` placeholder, say) resumes as long as the key stays unset."""
  keys = (set(saved) | set(current)) - RUNTIME_KEYS
  return sorted(k for k in keys if saved.get(k) != current.get(k))

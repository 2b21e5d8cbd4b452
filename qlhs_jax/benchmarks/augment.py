"""RandAugment on the device against Pillow: how many values differ, op by op and over
whole train examples.

  python -m qlhs_jax.benchmarks.augment [--examples 120] [--size 224]

For every op of :data:`qlhs_jax.device_augment.OPS` at arguments spanning timm's level
functions, with both filters, on photo-like and noise images: the largest difference
between :func:`qlhs_jax.device_augment.apply_op` and the host's Pillow op, and the
largest fraction of values that differ. Then whole train examples (crop, flip,
RandAugment ``--spec``) with the ops applied on the host and on the device, drawn from
the same generators. ``tests/test_device_augment.py`` bounds these figures.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from qlhs_jax.data import randaugment as ra
from qlhs_jax.data import transforms

FILL = (124, 116, 104)  # timm's mean pixel, the recipe's fill
# Each op's arguments, spanning what timm's level functions give (and their extremes).
ARGS = {
    "AutoContrast": [None], "Equalize": [None], "Invert": [None],
    "Posterize": [0, 1, 2, 4, 8], "Solarize": [0, 64, 128, 200, 256],
    "SolarizeAdd": [0, 40, 110],
    **{name: [0.1, 0.55, 1.0, 1.63, 1.9]
       for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    "Rotate": [-21.3, 0.0, 7.7, 30.0], "ShearX": [-0.3, 0.13], "ShearY": [-0.21, 0.3],
    "TranslateXRel": [-0.45, 0.131], "TranslateYRel": [0.2, -0.317],
}


def test_images(width: int = 96, height: int = 80, seed: int = 1) -> list[np.ndarray]:
  """Two photo-like images, uniform noise and a low-contrast image, uint8."""
  from qlhs_jax.benchmarks.input import synthetic_jpeg
  rng = np.random.default_rng(seed)
  out = [np.asarray(Image.open(io.BytesIO(synthetic_jpeg(rng))).convert("RGB")
                    .resize((width, height))) for _ in range(2)]
  out.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
  out.append(np.clip(rng.normal(128, 10, (height, width, 3)), 0, 255).astype(np.uint8))
  return out


def op_differences(images, name: str) -> tuple[int, float]:
  """(largest |device - Pillow|, largest fraction of values that differ) of op
  ``name`` over ``ARGS[name]``, both filters and ``images``."""
  import jax
  import jax.numpy as jnp
  from qlhs_jax import device_augment
  apply = jax.jit(device_augment.apply_op, static_argnums=4)
  host = ra.RandAugment(ops=(name,), fill=FILL)
  worst, fraction = 0, 0.0
  for arg in ARGS[name]:
    for resample, pil_filter in enumerate(ra.DEVICE_RESAMPLES):
      for img in images:
        ref = np.asarray(host.apply(Image.fromarray(img),
                                    [ra.DrawnOp(name, arg, pil_filter)]))
        out = np.asarray(apply(jnp.asarray(img), device_augment.op_code(name),
                               0.0 if arg is None else arg, resample, FILL))
        diff = np.abs(ref.astype(int) - out.astype(int))
        worst, fraction = max(worst, int(diff.max())), max(fraction, (diff > 0).mean())
  return worst, float(fraction)


def example_differences(examples: int = 48, size: int = 96,
                        spec: str = "rand-m9-mstd0.5-inc1",
                        seed: int = 0) -> tuple[np.ndarray, float]:
  """(|device - host| of whole train examples (uint8, before normalising), the fraction
  of op slots that apply an op): the same payloads and generators, RandAugment applied
  by Pillow or drawn for the device. Raises where the two paths drew other boxes or
  seeds, or where the host's examples carry ops."""
  import jax
  from qlhs_jax import device_augment
  from qlhs_jax.benchmarks.input import synthetic_jpeg
  rng = np.random.default_rng(seed)
  payloads = [synthetic_jpeg(rng) for _ in range(4)]
  aug = ra.parse(spec, fill=FILL)
  host = transforms.TrainTransform(size, randaugment=aug, reprob=0.5, recount=2)
  dev = transforms.TrainTransform(size, randaugment=aug, reprob=0.5, recount=2,
                                  device_randaugment=True)
  want, drawn = [], []
  for i in range(examples):
    h = host.device_example(payloads[i % 4], np.random.default_rng(i))
    d = dev.device_example(payloads[i % 4], np.random.default_rng(i))
    if not (np.array_equal(h["erase"], d["erase"]) and h["erase_seed"] == d["erase_seed"]):
      raise AssertionError(f"example {i}: the device path drew other boxes or seeds")
    if "ra_op" in h:
      raise AssertionError(f"example {i}: the host path, which applies RandAugment "
                           f"itself, handed ops to the device too")
    want.append(h["image"])
    drawn.append(d)
  batch = {k: np.stack([d[k] for d in drawn])
           for k in ("image", "ra_op", "ra_arg", "ra_resample")}
  got = jax.jit(lambda *a: device_augment.randaugment(*a, FILL))(
      batch["image"], batch["ra_op"], batch["ra_arg"], batch["ra_resample"])
  diff = np.abs(np.asarray(got).astype(int) - np.stack(want).astype(int))
  return diff, float((batch["ra_op"] >= 0).mean())


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m qlhs_jax.benchmarks.augment",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--examples", type=int, default=120)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--spec", default="rand-m7-mstd0.5-inc1", help="the recipe's")
  args = p.parse_args(argv)
  from qlhs_jax import xla_options
  xla_options.request_from_env()  # before JAX starts, as the step harness does
  images = test_images()
  print(f"Pillow {Image.__version__}; ops on {len(images)} images of 96x80, both filters")
  print("| op | largest difference | values that differ (worst case) |")
  print("|---|--:|--:|")
  for name in ARGS:
    worst, fraction = op_differences(images, name)
    print(f"| {name} | {worst} | {100 * fraction:.3f}% |")
  diff, applied = example_differences(args.examples, args.size, args.spec)
  print(f"\n{args.examples} train examples of {args.size} px ({args.spec}; "
        f"{100 * applied:.0f}% of op slots apply an op): {100 * (diff > 0).mean():.4f}% "
        f"of values differ, {(diff > 1).sum()} of {diff.size} by more than 1, largest "
        f"{diff.max()}")


if __name__ == "__main__":
  main()

"""Host-side input throughput: decode + augment img/s on one core, and the cores needed.

  python -m qlhs_jax.benchmarks.input [--num_images 64] [--seconds 4] [--target 6500]

Generates synthetic ImageNet-like JPEGs (500x375, noise fields from coarse to fine,
shapes and grain, ~100 KB at quality 90, like the ~108 KB of performance.md), then times, in this one process and thread:

* eval: decode + resize short side to 256 + centre crop 224 + normalise;
* train: decode + RandomResizedCrop 224 + flip + RandAugment rand-m7-mstd0.5-inc1 +
  normalise + random erasing (the recipe's transform);
* train with ``device_normalize``: the same up to the uint8 image, erasing's boxes
  and seed (normalisation and the fills move to the train step on the device);
* train with ``device_randaugment`` as well: RandAugment's ops are drawn, not applied
  (``qlhs_jax.device_augment`` applies them in the train step);
* the same from the pre-resized variant (short side 256, ``qlhs_jax.data.prepare``),
  and from full-size JPEGs with reduced-size DCT decoding (``jpeg_draft``);
* the whole grain pipeline (folder source, train transform, batches of 32) over the
  same images written to a temporary folder, in-process and with ``--workers`` worker
  processes (default: one per core), with float32 and with uint8
  (``device_normalize``) batches, and with ``device_randaugment``.

Prints img/s (per core, or in total for the worker rows) and how many cores feed
``--target`` img/s at that rate per core.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from qlhs_jax import data
from qlhs_jax.data import pipeline
from qlhs_jax.data import prepare
from qlhs_jax.data import transforms


def synthetic_jpeg(rng: np.random.Generator, width: int = 500, height: int = 375,
                   quality: int = 90) -> bytes:
  """A photo-like JPEG of ~100 KB: colour noise fields from coarse to fine (cells of
  125 down to 2 px), random ellipses and polygons, luminance and chroma grain."""
  img = np.zeros((height, width, 3), np.float32)
  for cells, amp in ((4, 90.0), (16, 40.0), (64, 25.0), (125, 30.0), (250, 20.0)):
    field = rng.uniform(-amp, amp, (cells * height // width + 1, cells, 3))
    small = Image.fromarray(np.uint8(np.clip(field + 128, 0, 255)))
    img += np.asarray(small.resize((width, height), Image.Resampling.BICUBIC),
                      np.float32) - 128
  canvas = Image.fromarray(np.uint8(np.clip(img + 128, 0, 255)))
  draw = ImageDraw.Draw(canvas)
  for _ in range(int(rng.integers(5, 15))):
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    r = rng.uniform(10, 120)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      draw.ellipse((x0 - r, y0 - r * 0.7, x0 + r, y0 + r * 0.7), fill=colour)
    else:
      pts = [(x0 + r * math.cos(a), y0 + r * math.sin(a))
             for a in np.sort(rng.uniform(0, 2 * math.pi, 5))]
      draw.polygon(pts, fill=colour)
  grain = rng.normal(0, 14, (height, width, 1)) + rng.normal(0, 4, (height, width, 3))
  out = np.uint8(np.clip(np.asarray(canvas, np.float32) + grain, 0, 255))
  buf = io.BytesIO()
  Image.fromarray(out).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _rate(fn, payloads, seconds: float) -> float:
  """Images per second of ``fn(payload, rng)`` over ``payloads``, for ~``seconds``."""
  fn(payloads[0], np.random.default_rng(0))  # Warm-up.
  n, t0 = 0, time.perf_counter()
  while True:
    for p in payloads:
      fn(p, np.random.default_rng(n))
      n += 1
    elapsed = time.perf_counter() - t0
    if elapsed >= seconds:
      return n / elapsed


# The host's share of the train transform: all of it, all but normalising and erasing,
# and also not RandAugment.
ON_DEVICE = {"": (), "device_normalize": ("device_normalize",),
             "device_randaugment": ("device_normalize", "device_randaugment")}


def _pipeline_rate(root: str, workers: int, seconds: float, batch: int = 32,
                   on_device: str = "") -> float:
  """Images per second out of ``build_input`` (train, folder source)."""
  config = data.default_config()
  config.name, config.folder, config.workers = "folder", root, workers
  for key in ON_DEVICE[on_device]:
    config[key] = True
  config.read_threads, config.prefetch = 0, 2
  inp = data.build_input(config, split="train", global_batch_size=batch, seed=0)
  it = inp.iterator()
  for _ in range(2 * workers + 1):  # Worker start-up, and every worker's first batch.
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += len(next(it)["label"])
  rate = n / (time.perf_counter() - t0)
  it.close()
  return rate


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m qlhs_jax.benchmarks.input",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--seconds", type=float, default=4.0)
  parser.add_argument("--target", type=float, default=6500.0)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--workers", default="0,{cores}",
                      help="worker counts of the grain pipeline rows ('' for none)")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  full = [synthetic_jpeg(rng) for _ in range(args.num_images)]
  small = [prepare.resize_jpeg(p, 256) for p in full]
  kb = np.mean([len(p) for p in full]) / 1024
  kb_small = np.mean([len(p) for p in small]) / 1024
  w_small, h_small = Image.open(io.BytesIO(small[0])).size

  config = data.default_config()
  config.image_size = args.image_size
  train = pipeline.make_transform(config, train=True)
  evalt = pipeline.make_transform(config, train=False)
  config.jpeg_draft = True
  train_draft = pipeline.make_transform(config, train=True)
  eval_draft = pipeline.make_transform(config, train=False)
  config.jpeg_draft = False
  config.device_normalize = config.device_randaugment = True
  train_ra = pipeline.make_transform(config, train=True)
  decode = lambda p, r: transforms.decode_rgb(transforms.open_image(p))

  rows = [
      ("decode only, full size", decode, full),
      ("eval, full size", evalt, full),
      ("train, full size", train, full),
      ("train, full size, device_normalize", train.device_example, full),
      ("train, full size, device_randaugment", train_ra.device_example, full),
      ("eval, full size, jpeg_draft", eval_draft, full),
      ("train, full size, jpeg_draft", train_draft, full),
      (f"decode only, pre-resized {w_small}x{h_small}", decode, small),
      ("eval, pre-resized", evalt, small),
      ("train, pre-resized", train, small),
      ("train, pre-resized, device_normalize", train.device_example, small),
      ("train, pre-resized, device_randaugment", train_ra.device_example, small),
  ]
  results = {}
  for name, fn, payloads in rows:
    results[name] = _rate(fn, payloads, args.seconds)

  cores = os.cpu_count() or 1
  worker_counts = [int(w) for w in args.workers.format(cores=cores).split(",") if w]
  workers_of = {}
  if worker_counts:
    with tempfile.TemporaryDirectory() as root:
      for kind, payloads in (("full size", full), ("pre-resized", small)):
        folder = os.path.join(root, kind.replace(" ", "_"))
        for k in range(max(128, len(payloads))):  # at least 4 batches of 32
          d = os.path.join(folder, "train", f"c{k % 4}")
          os.makedirs(d, exist_ok=True)
          with open(os.path.join(d, f"{k}.JPEG"), "wb") as f:
            f.write(payloads[k % len(payloads)])
        for w in worker_counts:
          for on_device in ON_DEVICE:
            name = f"train, {kind}, grain, " + (
                "in-process" if w == 0 else f"{w} workers (total)") + (
                    f", {on_device}" if on_device else "")
            results[name] = _pipeline_rate(folder, w, args.seconds,
                                           on_device=on_device)
            workers_of[name] = max(w, 1)

  print(f"machine: {_cpu_name()}, {cores} cores, Pillow {Image.__version__}")
  print(f"images: {args.num_images} synthetic 500x375 JPEGs, mean {kb:.0f} KB; "
        f"pre-resized {w_small}x{h_small}, mean {kb_small:.0f} KB; crop "
        f"{args.image_size}")
  width = max(len(name) for name in results)
  print(f"\n| {'measurement':<{width}} | img/s | cores for {args.target:,.0f} img/s |")
  print(f"|{'-' * (width + 2)}|------:|{'-' * 23}:|")
  for name, rate in results.items():
    # A row of w workers: the cores at its rate per worker.
    per_core = rate / workers_of.get(name, 1)
    print(f"| {name:<{width}} | {rate:5.0f} | {math.ceil(args.target / per_core):>22} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"cores": cores, "target": args.target, "img_per_s": results}, f,
                indent=1)


if __name__ == "__main__":
  main()

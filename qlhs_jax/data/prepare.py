"""Writes a pre-resized copy of a dataset (config name 'imagenet_resized').

Full-size ImageNet JPEGs (~500x375) cost more to decode than a 16-core host can afford
at the GPU's rate (README, "Data"). This re-encodes every image of a class subset with
its short side at most ``--short_side`` (JPEG, ``--quality``), into
``<out_dir>/<split>.array_record`` (one JPEG per record, read with random access),
``<out_dir>/<split>.labels.npy`` and ``<out_dir>/metadata.json``::

  python -m qlhs_jax.data.prepare --source imagenet2012 \\
      --data_dir ~/tensorflow_datasets --out_dir ~/data/imagenet100_256 --short_side 256
  python -m qlhs_jax.data.prepare --source folder --folder /data/imagenet \\
      --out_dir ~/data/imagenet100_256 --wnids qlhs_jax/data/imagenet100_cmc_wnids.txt

then train with ``config.data.name = 'imagenet_resized'`` and
``config.data.resized_dir = <out_dir>``. ``--wnids`` defaults to ImageNet-100 for
imagenet2012 and to every class for a folder. Images that cannot be decoded are skipped
and counted; ``metadata.json`` lists them.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
from typing import Optional

import numpy as np
from PIL import Image

from qlhs_jax.data import sources
from qlhs_jax.data.config import default_config
from qlhs_jax.data import transforms
from qlhs_jax.data.errors import DataError

_CHUNK = 64


def resize_jpeg(payload, short_side: int, quality: int = 90) -> bytes:
  """``payload`` with its short side scaled down to ``short_side`` (bicubic), as JPEG.

  An RGB JPEG already small enough is returned unchanged (no second lossy encode).
  """
  img = transforms.open_image(payload)
  w, h = img.size
  scale = short_side / min(w, h)
  if scale >= 1 and img.format == "JPEG" and img.mode == "RGB":
    return bytes(payload)
  size = (w, h)
  if scale < 1:
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # DCT-domain reduction down to no less than the target, then a bicubic resize.
    transforms.jpeg_draft(img, size)
  img = transforms.decode_rgb(img)
  if img.size != size:
    img = img.resize(size, Image.Resampling.BICUBIC)
  out = io.BytesIO()
  img.save(out, format="JPEG", quality=quality)
  return out.getvalue()


_WORKER_STATE = {}


def _init_worker(source, short_side, quality):
  _WORKER_STATE.update(source=source, short_side=short_side, quality=quality)


def _convert(start: int) -> list[tuple[Optional[bytes], str]]:
  """Records [start, start + _CHUNK): (jpeg or None, error description)."""
  src = _WORKER_STATE["source"]
  out = []
  for i in range(start, min(start + _CHUNK, len(src))):
    try:
      out.append((resize_jpeg(src.read(i), _WORKER_STATE["short_side"],
                              _WORKER_STATE["quality"]), ""))
    except DataError as e:
      out.append((None, f"{src.describe(i)}: {e}"))
  return out


def write_split(source, out_dir: str, split: str, short_side: int, quality: int,
                workers: int) -> dict:
  """Writes one split; returns its metadata entry."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  name = f"{split}.array_record"
  tmp = os.path.join(out_dir, name + ".tmp")
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  labels, skipped = [], []
  n = len(source)
  t0 = time.time()
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(max(1, workers), _init_worker, (source, short_side, quality)) as pool:
    i = 0
    for chunk in pool.imap(_convert, range(0, n, _CHUNK)):
      for jpeg, error in chunk:
        if jpeg is None:
          skipped.append(error)
          print(f"skipped {error}", file=sys.stderr)
        else:
          writer.write(jpeg)
          labels.append(int(source.labels[i]))
        i += 1
      if i % (_CHUNK * 100) == 0 or i == n:
        print(f"{split}: {i}/{n} images, {i / (time.time() - t0):.0f} img/s",
              file=sys.stderr)
  writer.close()
  os.replace(tmp, os.path.join(out_dir, name))
  np.save(os.path.join(out_dir, f"{split}.labels.npy"), np.asarray(labels, np.int32))
  return {"files": [name], "labels": f"{split}.labels.npy",
          "num_examples": len(labels), "num_skipped": len(skipped),
          "skipped": skipped}


def prepare(source_name: str, out_dir: str, short_side: int = 256, quality: int = 90,
            data_dir: str = "~/tensorflow_datasets", folder: str = "",
            wnids: sources.WnidsArg = None, splits=sources.SPLITS, workers: int = 0,
            index_cache_dir: str = "") -> dict:
  """Writes the pre-resized dataset to ``out_dir``; returns its metadata."""
  if source_name not in ("imagenet2012", "folder"):
    raise ValueError(f"--source must be 'imagenet2012' or 'folder', got {source_name!r}")
  out_dir = os.path.expanduser(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  meta = {"format": sources.RESIZED_FORMAT, "short_side": short_side,
          "quality": quality, "source": source_name, "splits": {}}
  workers = workers or os.cpu_count() or 1
  for split in splits:
    if source_name == "imagenet2012":
      src = sources.TfdsImagenetSource(data_dir, split, wnids, index_cache_dir)
    else:
      src = sources.FolderSource(folder, split, wnids)
    if "class_names" in meta and list(src.class_names) != meta["class_names"]:
      raise DataError(f"Split {split} has other classes than the previous split")
    meta["class_names"] = list(src.class_names)
    meta["splits"][split] = write_split(src, out_dir, split, short_side, quality, workers)
  with open(os.path.join(out_dir, "metadata.json.tmp"), "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(os.path.join(out_dir, "metadata.json.tmp"),
             os.path.join(out_dir, "metadata.json"))
  return meta


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m qlhs_jax.data.prepare", description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", default="imagenet2012",
                      choices=("imagenet2012", "folder"))
  parser.add_argument("--data_dir", default=os.environ.get(
      "TFDS_DATA_DIR", "~/tensorflow_datasets"), help="TFDS data_dir (imagenet2012)")
  parser.add_argument("--folder", default="", help="root of train/ and val/ (folder)")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--short_side", type=int, default=256)
  parser.add_argument("--quality", type=int, default=90)
  parser.add_argument("--wnids", default=None,
                      help="file of class ids, or ids separated by commas; default: "
                           "ImageNet-100 for imagenet2012, all classes for a folder")
  parser.add_argument("--splits", default="train,validation")
  parser.add_argument("--workers", type=int, default=0, help="0: one per CPU core")
  parser.add_argument("--index_cache_dir", default=default_config().index_cache_dir,
                      help="cache of imagenet2012 labels ('' = none)")
  args = parser.parse_args(argv)
  wnids = args.wnids
  if wnids and not os.path.isfile(os.path.expanduser(wnids)):
    wnids = [w for w in wnids.split(",") if w]
  try:
    meta = prepare(args.source, args.out_dir, args.short_side, args.quality,
                   args.data_dir, args.folder, wnids, tuple(args.splits.split(",")),
                   args.workers, args.index_cache_dir)
  except DataError as e:
    sys.exit(f"error: {e}")
  for split, info in meta["splits"].items():
    print(f"{split}: {info['num_examples']} images written, {info['num_skipped']} "
          f"skipped (unreadable), in {args.out_dir}")
  print(f"Train with config.data.name='imagenet_resized', "
        f"config.data.resized_dir={args.out_dir!r}")


if __name__ == "__main__":
  main()

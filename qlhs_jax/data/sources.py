"""Random-access sources of (encoded image, label) records.

A source has ``len()``, ``class_names``, ``labels`` (int32, one per record, already in
0..num_classes-1) and ``read(i)``, the image payload of record ``i``: encoded bytes or a
uint8 array. Class subsets are selected once, when the source is built, as a table of
record indices; nothing is dropped on the fly.

* ``digits``: scikit-learn's handwritten digits (no download).
* ``imagenet2012``: TFDS ``imagenet2012`` in array_record format via
  ``tfds.data_source`` (no TensorFlow at run time), subset by wnids.
* ``folder``: an ImageNet-style folder ``<root>/train/<class>/*``, ``<root>/val/<class>/*``.
* ``imagenet_resized``: the output of ``python -m qlhs_jax.data.prepare``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Any, Sequence, Union

from absl import logging
import numpy as np

from qlhs_jax.data.errors import DatasetNotFoundError, InvalidDataError

SOURCES = ("digits", "imagenet2012", "folder", "imagenet_resized")
SPLITS = ("train", "validation")
IMAGENET100_WNIDS_FILE = os.path.join(os.path.dirname(__file__),
                                      "imagenet100_cmc_wnids.txt")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
RESIZED_FORMAT = "qlhs_jax.resized/1"

WnidsArg = Union[None, str, Sequence[str]]


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def resolve_wnids(value: WnidsArg) -> list[str]:
  """Class ids from a config value: a path to a file (one id per line, '#' comments)
  or a sequence of strings; None gives ImageNet-100 (the shipped CMC list).
  Duplicates and empty lists are errors."""
  if value is None:
    value = IMAGENET100_WNIDS_FILE
  if isinstance(value, str):
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
      raise DatasetNotFoundError(f"wnids file {path!r} does not exist (config.data.wnids "
                                 "is a path to a file of class ids, one per line)")
    with open(path) as f:
      wnids = [line.split("#")[0].strip() for line in f]
    wnids = [w for w in wnids if w]
  else:
    wnids = [str(w) for w in value]
  if not wnids:
    raise InvalidDataError(f"The class list {value!r} is empty")
  dupes = sorted({w for w in wnids if wnids.count(w) > 1})
  if dupes:
    raise InvalidDataError(f"Duplicate class ids in the class list: {dupes}")
  return wnids


def imagenet100_wnids() -> list[str]:
  """The 100 wnids of ImageNet-100 (CMC, Tian et al. 2019), in label order."""
  return resolve_wnids(None)


def _select_classes(all_names: Sequence[str], wnids: WnidsArg,
                    where: str) -> list[str]:
  """``wnids`` (config value; None = all of ``all_names``), checked against them."""
  if wnids is None:
    return list(all_names)
  wanted = resolve_wnids(wnids)
  known = set(all_names)
  missing = [w for w in wanted if w not in known]
  if missing:
    raise InvalidDataError(f"Unknown class id(s) {missing} (not in {where}; "
                           f"{len(all_names)} classes there, e.g. {list(all_names[:3])})")
  return list(wanted)


def _subset(labels: np.ndarray, all_names: Sequence[str], names: list[str]):
  """Record indices whose label is in ``names``, and their labels remapped to the
  position of the class in ``names``."""
  remap = np.full(len(all_names), -1, np.int32)
  index = {n: i for i, n in enumerate(all_names)}
  for new, name in enumerate(names):
    remap[index[name]] = new
  new_labels = remap[labels]
  keep = np.flatnonzero(new_labels >= 0)
  return keep, new_labels[keep].astype(np.int32)


class DigitsSource:
  """scikit-learn's 8x8 handwritten digits, as 3-channel uint8 images.

  Split: ``train_test_split(test_size=0.2, stratify=labels, random_state=0)`` of the
  1797 images: 1437 train, 360 validation. Pixel values 0..16 map to round(v*255/16).
  """

  def __init__(self, split: str):
    check_split(split)
    from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    idx = np.arange(len(images))
    train, val = model_selection.train_test_split(
        idx, test_size=0.2, stratify=digits.target, random_state=0)
    idx = np.sort(train if split == "train" else val)
    self.images = images[idx]
    self.labels = digits.target[idx].astype(np.int32)
    self.class_names = tuple(str(d) for d in range(10))

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, i: int) -> np.ndarray:
    return np.repeat(self.images[i][:, :, None], 3, axis=2)

  def describe(self, i: int) -> str:
    return f"digits record {i}"


class FolderSource:
  """``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>`` (or
  ``validation/``). Classes: ``wnids`` in that order, or every class folder of
  ``train/`` sorted by name. Hidden files and non-image extensions are ignored."""

  def __init__(self, root: str, split: str, wnids: WnidsArg = None):
    check_split(split)
    root = os.path.expanduser(root or "")
    if not root or not os.path.isdir(root):
      raise DatasetNotFoundError(
          f"Image folder {root!r} does not exist. config.data.folder must hold "
          "train/<class>/<image> and val/<class>/<image>.")
    train_dir = os.path.join(root, "train")
    split_dir = train_dir
    if split == "validation":
      split_dir = next((os.path.join(root, d) for d in ("val", "validation")
                        if os.path.isdir(os.path.join(root, d))), None)
      if split_dir is None:
        raise DatasetNotFoundError(f"No val/ (or validation/) folder in {root!r}; "
                                   "expected val/<class>/<image>.")
    if not os.path.isdir(train_dir):
      raise DatasetNotFoundError(f"No train/ folder in {root!r}; expected "
                                 "train/<class>/<image> (the class list comes from it).")
    train_classes = self._class_dirs(train_dir)
    names = _select_classes(train_classes, wnids, train_dir)
    present = set(train_classes if split == "train" else self._class_dirs(split_dir))
    absent = [n for n in names if n not in present]
    if absent:
      raise InvalidDataError(f"{split_dir} lacks class folder(s) {absent[:10]}"
                             f"{' ...' if len(absent) > 10 else ''}")
    files, labels, empty = [], [], []
    for label, name in enumerate(names):
      class_dir = os.path.join(split_dir, name)
      found = sorted(e.name for e in os.scandir(class_dir)
                     if e.is_file() and not e.name.startswith(".")
                     and e.name.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        empty.append(class_dir)
      files += [os.path.join(class_dir, f) for f in found]
      labels += [label] * len(found)
    if empty:
      raise InvalidDataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in class "
                             f"folder(s) {empty[:10]}{' ...' if len(empty) > 10 else ''}")
    self.files = files
    self.labels = np.asarray(labels, np.int32)
    self.class_names = tuple(names)

  @staticmethod
  def _class_dirs(split_dir: str) -> list[str]:
    dirs = sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))
    if not dirs:
      loose = [e.name for e in os.scandir(split_dir) if e.is_file()][:3]
      raise InvalidDataError(
          f"{split_dir} has no class folders"
          f"{f' (files directly in it, e.g. {loose})' if loose else ''}; "
          "expected <split>/<class>/<image>.")
    return dirs

  def __len__(self) -> int:
    return len(self.files)

  def read(self, i: int) -> bytes:
    try:
      with open(self.files[i], "rb") as f:
        return f.read()
    except OSError as e:
      raise InvalidDataError(f"Cannot read image file {self.files[i]}: {e}") from e

  def describe(self, i: int) -> str:
    return f"image file {self.files[i]}"


def tfds_not_prepared_message(data_dir: str, split: str, detail: str = "") -> str:
  """The error text for an unprepared TFDS imagenet2012, with the exact command."""
  manual_dir = os.path.join(data_dir, "downloads", "manual")
  return (
      f"TFDS dataset 'imagenet2012' (split {split!r}) is not prepared in array_record "
      f"format in data_dir={data_dir!r} (looked in "
      f"{os.path.join(data_dir, 'imagenet2012')}).{detail}\n"
      "Prepare it once:\n"
      "  1. Download ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar "
      "(6.3 GB) from https://image-net.org/download-images (free registration) and put "
      f"both tar files, unextracted, in {manual_dir}\n"
      "  2. pip install tensorflow   # the build needs TensorFlow; reading does not\n"
      f"  3. tfds build imagenet2012 --manual_dir={manual_dir} "
      f"--file_format=array_record --data_dir={data_dir}\n"
      "or point config.data.data_dir at the data_dir where it was built.")


class TfdsImagenetSource:
  """TFDS ``imagenet2012`` (array_record), subset to ``wnids`` (default: ImageNet-100).

  The labels of all records of the split are read once (a full pass over the split:
  minutes for the 1.28M training images) and cached in ``cache_dir`` as a .npy file
  keyed by the dataset's location, version, split, size and build time; every later run
  selects its subset from that cache instantly. ``cache_dir=''`` disables the cache.
  """

  name = "imagenet2012"

  def __init__(self, data_dir: str, split: str, wnids: WnidsArg = None,
               cache_dir: str = ""):
    check_split(split)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    builder = tfds.builder(self.name, data_dir=data_dir)
    all_names = builder.info.features["label"].names
    names = _select_classes(all_names, resolve_wnids(wnids),
                            "ImageNet-1k (TFDS imagenet2012)")
    try:
      self.ds = tfds.data_source(
          self.name, split=split, data_dir=data_dir, download=False,
          decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # pylint: disable=broad-except
      raise self._diagnose(builder, data_dir, split, e) from e
    labels = self._all_labels(builder, data_dir, split, cache_dir)
    self.indices, self.labels = _subset(labels, all_names, names)
    self.class_names = tuple(names)

  @staticmethod
  def _diagnose(builder, data_dir: str, split: str, error: Exception) -> Exception:
    if not builder.is_prepared():
      return DatasetNotFoundError(tfds_not_prepared_message(data_dir, split))
    fmt = str(builder.info.file_format.value if builder.info.file_format else None)
    if fmt != "array_record":
      return DatasetNotFoundError(tfds_not_prepared_message(
          data_dir, split, f" It is prepared as {fmt}; random access needs array_record "
          "(delete that copy or use another data_dir)."))
    if split not in builder.info.splits:
      return DatasetNotFoundError(tfds_not_prepared_message(
          data_dir, split, f" The prepared dataset has splits {list(builder.info.splits)}"
          " (was the tar file of this split in manual_dir?)."))
    return error

  def _all_labels(self, builder, data_dir: str, split: str, cache_dir: str):
    n = len(self.ds)
    # Rebuilding the dataset in place rewrites dataset_info.json: a new cache key.
    info = os.path.join(builder.data_dir, "dataset_info.json")
    stamp = os.path.getmtime(info) if os.path.isfile(info) else None
    key = hashlib.sha1(
        json.dumps([data_dir, str(builder.version), split, n, stamp]).encode())
    path = os.path.join(os.path.expanduser(cache_dir),
                        f"{self.name}-{builder.version}-{split}-{n}-"
                        f"{key.hexdigest()[:12]}.labels.npy") if cache_dir else None
    if path and os.path.isfile(path):
      labels = np.load(path)
      if len(labels) == n:
        return labels
    logging.info("Reading the %d labels of %s/%s once (cached in %s)", n, self.name,
                 split, path)
    labels = read_labels(self.ds, n)
    if path:
      try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, labels)
        os.replace(tmp, path)
      except OSError as e:
        logging.warning("Could not cache labels in %s: %s", path, e)
    return labels

  def __len__(self) -> int:
    return len(self.indices)

  def read(self, i: int) -> Any:
    return self.ds[int(self.indices[i])]["image"]

  def describe(self, i: int) -> str:
    rec = int(self.indices[i])
    return f"{self.name} record {rec} ({self.ds[rec].get('file_name', b'')!r})"


def read_labels(ds, n: int, chunk: int = 256, threads: int = 8) -> np.ndarray:
  """``int(ds[i]['label'])`` for all i, read in parallel chunks (array_record reads
  release the GIL)."""
  def read(start):
    keys = list(range(start, min(n, start + chunk)))
    recs = ds.__getitems__(keys) if hasattr(ds, "__getitems__") else [ds[k] for k in keys]
    return np.asarray([int(r["label"]) for r in recs], np.int32)

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    parts = list(pool.map(read, range(0, n, chunk)))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class ResizedSource:
  """The pre-resized array_record dataset written by ``qlhs_jax.data.prepare``:
  ``metadata.json``, ``<split>.array_record`` (one JPEG per record) and
  ``<split>.labels.npy``. ``wnids`` (default: all its classes) selects a subset."""

  def __init__(self, root: str, split: str, wnids: WnidsArg = None):
    check_split(split)
    root = os.path.expanduser(root or "")
    meta_path = os.path.join(root, "metadata.json")
    if not os.path.isfile(meta_path):
      raise DatasetNotFoundError(
          f"No pre-resized dataset in {root!r} (no metadata.json). Write one with\n"
          "  python -m qlhs_jax.data.prepare --source imagenet2012 "
          "--data_dir ~/tensorflow_datasets --out_dir <dir> --short_side 256\n"
          "and set config.data.resized_dir to <dir>.")
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("format") != RESIZED_FORMAT or split not in meta.get("splits", {}):
      raise InvalidDataError(f"{meta_path} is not a {RESIZED_FORMAT} dataset with split "
                             f"{split!r}")
    from grain import sources as grain_sources  # pylint: disable=g-import-not-at-top
    info = meta["splits"][split]
    self.ds = grain_sources.ArrayRecordDataSource(
        [os.path.join(root, f) for f in info["files"]])
    labels = np.load(os.path.join(root, info["labels"]))
    if len(labels) != len(self.ds):
      raise InvalidDataError(f"{root}: {len(labels)} labels for {len(self.ds)} records")
    all_names = meta["class_names"]
    names = _select_classes(all_names, wnids, meta_path)
    self.indices, self.labels = _subset(labels, all_names, names)
    self.class_names = tuple(names)
    self.short_side = meta.get("short_side")

  def __len__(self) -> int:
    return len(self.indices)

  def read(self, i: int) -> bytes:
    return self.ds[int(self.indices[i])]

  def describe(self, i: int) -> str:
    return f"pre-resized record {int(self.indices[i])}"


def make_source(config, split: str):
  """The source named by ``config.name`` for ``split``."""
  name = config.name
  if name == "digits":
    return DigitsSource(split)
  if name == "imagenet2012":
    return TfdsImagenetSource(config.data_dir, split, config.wnids,
                              config.index_cache_dir)
  if name == "folder":
    return FolderSource(config.folder, split, config.wnids)
  if name == "imagenet_resized":
    return ResizedSource(config.resized_dir, split, config.wnids)
  raise ValueError(f"Unknown dataset name {name!r}; expected one of {SOURCES}")

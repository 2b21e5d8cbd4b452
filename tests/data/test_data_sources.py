"""Sources: digits, a generated folder, TFDS imagenet2012 (mocked and a tiny real
array_record build), the pre-resized variant, and their errors."""

import io
import json
import os
from unittest import mock

import numpy as np
from PIL import Image
import pytest

from data_testutil import colour_of, denormalize, jpeg_bytes, make_folder
from qlhs_jax import data
from qlhs_jax.data import prepare
from qlhs_jax.data import sources
from qlhs_jax.data.errors import DatasetNotFoundError, InvalidDataError


def folder_config(root, **kw):
  config = data.default_config()
  config.name, config.folder, config.image_size = "folder", root, 16
  config.crop_pct = 1.0
  for k, v in kw.items():
    config[k] = v
  return config


# --- Class lists ----------------------------------------------------------------------

def test_imagenet100_list_is_shipped():
  wnids = data.imagenet100_wnids()
  assert len(wnids) == 100 and len(set(wnids)) == 100
  assert wnids[0] == "n02869837" and wnids[-1] == "n02090622"
  assert all(w.startswith("n") and len(w) == 9 for w in wnids)


def test_resolve_wnids(tmp_path):
  path = tmp_path / "ids.txt"
  path.write_text("# my classes\nn01440764\n\nn01443537  # goldfish\n")
  assert data.resolve_wnids(str(path)) == ["n01440764", "n01443537"]
  assert data.resolve_wnids(("b", "a")) == ["b", "a"]
  with pytest.raises(InvalidDataError, match="Duplicate"):
    data.resolve_wnids(["a", "b", "a"])
  with pytest.raises(InvalidDataError, match="empty"):
    data.resolve_wnids([])
  with pytest.raises(DatasetNotFoundError, match="does not exist"):
    data.resolve_wnids(str(tmp_path / "missing.txt"))


# --- Digits ---------------------------------------------------------------------------

def test_digits_fixed_stratified_split():
  train, val = sources.DigitsSource("train"), sources.DigitsSource("validation")
  assert (len(train), len(val)) == (1437, 360)
  assert train.class_names == tuple("0123456789")
  counts = np.bincount(val.labels, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class
  img = train.read(0)
  assert img.shape == (8, 8, 3) and img.dtype == np.uint8
  assert train.images.max() == 255  # 16 -> 255
  # Disjoint: no validation image appears in train with the same label.
  seen = {(t.tobytes(), int(l)) for t, l in zip(train.images, train.labels)}
  dupes = sum((v.tobytes(), int(l)) in seen for v, l in zip(val.images, val.labels))
  assert dupes <= 2  # the digits data hold a few identical images


# --- Folder ---------------------------------------------------------------------------

def test_folder_classes_labels_and_subset(tmp_path):
  root = make_folder(str(tmp_path))
  train = sources.FolderSource(root, "train")
  assert train.class_names == ("cat", "dog", "emu")
  assert len(train) == 9 and list(train.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  sub = sources.FolderSource(root, "validation", wnids=["emu", "cat"])
  assert sub.class_names == ("emu", "cat") and len(sub) == 4
  assert [os.path.basename(os.path.dirname(f)) for f in sub.files] == [
      "emu", "emu", "cat", "cat"]
  assert list(sub.labels) == [0, 0, 1, 1]
  inp = data.build_input(folder_config(root, wnids=["emu", "cat"]), split="validation",
                         global_batch_size=4, seed=0)
  batch = next(inp.iterator())
  assert list(batch["label"]) == [0, 0, 1, 1]
  np.testing.assert_allclose(denormalize(batch["image"][0, 8, 8]), colour_of(2), atol=3)
  np.testing.assert_allclose(denormalize(batch["image"][3, 8, 8]), colour_of(0), atol=3)


def test_folder_errors(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="does not exist"):
    sources.FolderSource(str(tmp_path / "nowhere"), "train")
  with pytest.raises(DatasetNotFoundError, match="No train/"):
    sources.FolderSource(str(tmp_path), "train")
  (tmp_path / "train").mkdir()
  (tmp_path / "train" / "img.JPEG").write_bytes(b"x")
  with pytest.raises(InvalidDataError, match="no class folders.*img.JPEG"):
    sources.FolderSource(str(tmp_path), "train")
  (tmp_path / "train" / "cat").mkdir()
  with pytest.raises(InvalidDataError, match="No images.*cat"):
    sources.FolderSource(str(tmp_path), "train")
  root = make_folder(str(tmp_path / "ok"))
  with pytest.raises(InvalidDataError, match="Unknown class id.*'yak'"):
    sources.FolderSource(root, "train", wnids=["cat", "yak"])
  os.rename(os.path.join(root, "val", "dog"), os.path.join(root, "val", "dingo"))
  with pytest.raises(InvalidDataError, match="lacks class folder.*dog"):
    sources.FolderSource(root, "validation")
  with pytest.raises(ValueError, match="split"):
    sources.FolderSource(root, "test")


# --- TFDS imagenet2012 ----------------------------------------------------------------

def test_tfds_not_prepared_names_the_command(tmp_path):
  config = data.default_config()
  config.data_dir = str(tmp_path / "tfds")
  with pytest.raises(DatasetNotFoundError) as info:
    data.build_input(config, split="train", global_batch_size=8, seed=0)
  msg = str(info.value)
  data_dir = str(tmp_path / "tfds")
  manual = os.path.join(data_dir, "downloads", "manual")
  assert (f"tfds build imagenet2012 --manual_dir={manual} --file_format=array_record "
          f"--data_dir={data_dir}") in msg
  assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
  assert f"data_dir={data_dir!r}" in msg
  assert isinstance(info.value, FileNotFoundError)


def test_unknown_wnid_is_named(tmp_path):
  config = data.default_config()
  config.data_dir = str(tmp_path)
  config.wnids = ["n01440764", "n99999999"]
  with pytest.raises(InvalidDataError, match="n99999999"):
    data.build_input(config, split="validation", global_batch_size=2, seed=0)


NAMES = None


def imagenet_names():
  global NAMES
  if NAMES is None:
    import tensorflow_datasets as tfds
    NAMES = tfds.builder("imagenet2012", data_dir="/nonexistent").info.features[
        "label"].names
  return NAMES


def fake_records(labels):
  """imagenet2012 records as ``tfds.data_source(decoders={'image': SkipDecoding()})``
  returns them: JPEG bytes, int64 label, file name; flat colour per label."""
  names = imagenet_names()
  return [{"image": jpeg_bytes(np.zeros((30, 40, 3), np.uint8) + np.uint8(colour_of(l))),
           "label": np.int64(l), "file_name": f"{names[l]}_{i}.JPEG".encode()}
          for i, l in enumerate(labels)]


LABELS_1K = [7, 3, 500, 2, 7, 9, 3, 2, 999, 7, 2]


def check_subset(inp, wnid_labels):
  """``inp`` (validation, batch 4) holds exactly the records of LABELS_1K whose label is
  in ``wnid_labels``, in order, relabelled by their position in that list."""
  expected = [wnid_labels.index(l) for l in LABELS_1K if l in wnid_labels]
  assert inp.num_examples == len(expected) and inp.num_classes == len(wnid_labels)
  got, colours = [], []
  for batch in inp.iterator():
    for img, label, m in zip(batch["image"], batch["label"], batch["mask"]):
      if m:
        got.append(int(label))
        colours.append(denormalize(img[8, 8]))
  assert got == expected
  for label, colour in zip(got, colours):
    np.testing.assert_allclose(colour, colour_of(wnid_labels[label]), atol=4)


def test_tfds_mock_data_subset_and_remap(tmp_path):
  import tensorflow_datasets as tfds
  records = fake_records(LABELS_1K)
  calls = []

  def as_data_source(self, split, decoders=None, **kwargs):
    calls.append((split, decoders))
    return records

  names = imagenet_names()
  config = data.default_config()
  config.image_size, config.crop_pct = 16, 1.0
  config.index_cache_dir = str(tmp_path / "cache")
  config.wnids = [names[7], names[2], names[999]]
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    inp = data.build_input(config, split="validation", global_batch_size=4, seed=0)
    check_subset(inp, [7, 2, 999])
    config.wnids = [names[1]]  # a real class, but none of the records
    with pytest.raises(InvalidDataError, match="no examples"):
      data.build_input(config, split="validation", global_batch_size=4, seed=0)
  assert inp.class_names == (names[7], names[2], names[999])
  assert calls[0][0] == "validation"
  assert isinstance(calls[0][1]["image"], tfds.decode.SkipDecoding)


def build_tiny_imagenet(data_dir):
  """A real array_record ``imagenet2012`` in ``data_dir`` (no TensorFlow): TFDS's own
  builder and writer, with the tar-reading generator replaced by fake records."""
  import tensorflow_datasets as tfds
  builder_cls = tfds.builder_cls("imagenet2012")

  def split_generators(self, dl_manager):
    return [tfds.core.SplitGenerator(name=s, gen_kwargs={"split": s})
            for s in ("train", "validation")]

  def generate_examples(self, split):
    for i, rec in enumerate(fake_records(LABELS_1K)):
      yield f"{split}{i}", {"image": io.BytesIO(rec["image"]),
                            "label": int(rec["label"]),
                            "file_name": rec["file_name"].decode()}

  with mock.patch.object(builder_cls, "_split_generators", split_generators), \
       mock.patch.object(builder_cls, "_generate_examples", generate_examples):
    builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  build_tiny_imagenet(data_dir)
  return data_dir


def test_tfds_real_array_record_subset_and_label_cache(tiny_imagenet, tmp_path):
  names = imagenet_names()
  config = data.default_config()
  config.data_dir, config.image_size, config.crop_pct = tiny_imagenet, 16, 1.0
  config.index_cache_dir = str(tmp_path / "cache")
  config.wnids = [names[2], names[500], names[7]]
  # TFDS stores records shuffled: compare as multisets, then order by record.
  src = sources.TfdsImagenetSource(tiny_imagenet, "validation", config.wnids,
                                   config.index_cache_dir)
  assert sorted(src.labels.tolist()) == sorted(
      [[2, 500, 7].index(l) for l in LABELS_1K if l in (2, 500, 7)])
  for i in range(len(src)):
    rec = src.ds[int(src.indices[i])]
    assert names.index(rec["file_name"].decode().split("_")[0]) == [2, 500, 7][
        src.labels[i]]
  cached = os.listdir(config.index_cache_dir)
  assert len(cached) == 1 and cached[0].endswith(".labels.npy")
  # A second build reads the labels from the cache, not from the records.
  with mock.patch.object(sources, "read_labels", side_effect=AssertionError("rescan")):
    inp = data.build_input(config, split="validation", global_batch_size=4, seed=0)
  assert inp.num_examples == 7 and inp.class_names == tuple(config.wnids)
  # Rebuilding the dataset in place (a new dataset_info.json) invalidates the cache.
  info = os.path.join(tiny_imagenet, "imagenet2012", "5.1.0", "dataset_info.json")
  os.utime(info, (os.path.getmtime(info) + 10,) * 2)
  with mock.patch.object(sources, "read_labels", side_effect=AssertionError("rescan")):
    with pytest.raises(AssertionError, match="rescan"):
      data.build_input(config, split="validation", global_batch_size=4, seed=0)
  for batch in inp.iterator():
    for img, label, m in zip(batch["image"], batch["label"], batch["mask"]):
      if m:
        np.testing.assert_allclose(denormalize(img[8, 8]),
                                   colour_of([2, 500, 7][label]), atol=4)


def test_tfds_default_is_imagenet100(tiny_imagenet, tmp_path):
  config = data.default_config()
  config.data_dir, config.index_cache_dir = tiny_imagenet, ""
  src = sources.make_source(config, "train")
  cmc = set(data.imagenet100_wnids())
  names = imagenet_names()
  expected = sum(names[l] in cmc for l in LABELS_1K)
  assert len(src) == expected and src.class_names == tuple(data.imagenet100_wnids())


def test_tfds_missing_split_is_reported(tmp_path):
  import tensorflow_datasets as tfds
  data_dir = str(tmp_path)
  build_tiny_imagenet(data_dir)
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  err = sources.TfdsImagenetSource._diagnose(builder, data_dir, "test",
                                             KeyError("test"))
  assert isinstance(err, DatasetNotFoundError) and "splits" in str(err)


# --- Pre-resized variant --------------------------------------------------------------

def test_prepare_resized_from_folder_skips_and_counts_bad_images(tmp_path):
  root = make_folder(str(tmp_path / "src"), size=(80, 60))
  bad = os.path.join(root, "train", "dog", "broken.JPEG")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8 not really a jpeg")
  out = str(tmp_path / "resized")
  prepare.main(["--source", "folder", "--folder", root, "--out_dir", out,
                "--short_side", "24", "--workers", "1", "--wnids", "emu,dog"])
  meta = json.load(open(os.path.join(out, "metadata.json")))
  assert meta["class_names"] == ["emu", "dog"] and meta["short_side"] == 24
  assert meta["splits"]["train"]["num_examples"] == 6
  assert meta["splits"]["train"]["num_skipped"] == 1
  assert "broken.JPEG" in meta["splits"]["train"]["skipped"][0]
  src = sources.ResizedSource(out, "train")
  assert list(src.labels) == [0, 0, 0, 1, 1, 1]
  assert Image.open(io.BytesIO(src.read(0))).size == (32, 24)  # 80x60 -> short side 24
  config = data.default_config()
  config.name, config.resized_dir, config.image_size = "imagenet_resized", out, 16
  config.crop_pct, config.wnids = 1.0, ["dog"]
  inp = data.build_input(config, split="validation", global_batch_size=2, seed=0)
  assert inp.class_names == ("dog",) and inp.num_examples == 2
  batch = next(inp.iterator())
  np.testing.assert_allclose(denormalize(batch["image"][0, 8, 8]), colour_of(1), atol=4)


def test_resized_missing_names_the_prepare_command(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="python -m qlhs_jax.data.prepare"):
    sources.ResizedSource(str(tmp_path), "train")


def test_resize_jpeg_keeps_small_jpegs_and_shrinks_large_ones():
  small = jpeg_bytes(np.zeros((100, 200, 3), np.uint8))
  assert prepare.resize_jpeg(small, 256) == small
  big = jpeg_bytes(np.zeros((600, 800, 3), np.uint8) + 90)
  out = Image.open(io.BytesIO(prepare.resize_jpeg(big, 256)))
  assert out.size == (341, 256) and out.format == "JPEG"
  png = io.BytesIO()
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(png, format="PNG")
  assert Image.open(io.BytesIO(prepare.resize_jpeg(png.getvalue(), 256))).mode == "RGB"

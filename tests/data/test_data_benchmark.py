"""The input benchmark runs end to end (tiny settings) and makes ImageNet-like JPEGs."""

import io

import numpy as np
from PIL import Image

from qlhs_jax.benchmarks import input as bench


def test_synthetic_jpeg_is_imagenet_like():
  payload = bench.synthetic_jpeg(np.random.default_rng(0))
  img = Image.open(io.BytesIO(payload))
  assert img.size == (500, 375) and img.format == "JPEG"
  assert 70_000 < len(payload) < 150_000  # performance.md's images: ~108 KB
  assert np.asarray(img).std() > 30  # not a flat colour


def test_benchmark_prints_the_table(capsys, tmp_path):
  out = tmp_path / "r.json"
  bench.main(["--num_images", "2", "--seconds", "0.05", "--workers", "",
              "--image_size", "64", "--json", str(out)])
  text = capsys.readouterr().out
  assert "train, full size" in text and "cores for 6,500 img/s" in text
  assert out.exists()

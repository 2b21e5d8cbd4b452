"""Helpers for the data tests: tiny generated datasets and a hang guard."""

from __future__ import annotations

import contextlib
import io
import os
import signal

import numpy as np
from PIL import Image


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def colour_of(label: int) -> tuple[int, int, int]:
  """A flat colour per class, far apart for neighbouring labels."""
  return (40 * label % 256, 255 - 40 * label % 256, 60 + 50 * (label % 3))


def make_folder(root: str, classes=("cat", "dog", "emu"), per_class=(3, 2),
                size=(40, 30)) -> str:
  """``root/train/<class>/`` and ``root/val/<class>/`` of flat-colour images (one PNG
  and one grayscale JPEG among them), ``per_class`` images per split."""
  for split, n in zip(("train", "val"), per_class):
    for label, name in enumerate(classes):
      d = os.path.join(root, split, name)
      os.makedirs(d, exist_ok=True)
      for k in range(n):
        img = np.zeros((size[1], size[0], 3), np.uint8) + np.uint8(colour_of(label))
        if k == 1:
          Image.fromarray(img).save(os.path.join(d, f"{name}_{k}.png"))
        elif k == 2:
          Image.fromarray(img[:, :, 0]).save(os.path.join(d, f"{name}_{k}.JPEG"))
        else:
          with open(os.path.join(d, f"{name}_{k}.JPEG"), "wb") as f:
            f.write(jpeg_bytes(img))
      with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("not an image")
  return root


def denormalize(image: np.ndarray) -> np.ndarray:
  """Normalised float image -> uint8-range float (ImageNet mean/std)."""
  mean = np.asarray((0.485, 0.456, 0.406), np.float32)
  std = np.asarray((0.229, 0.224, 0.225), np.float32)
  return (image * std + mean) * 255.0


@contextlib.contextmanager
def deadline(seconds: int):
  """Fails the test instead of hanging if the block runs longer than ``seconds``."""
  def fail(signum, frame):
    raise TimeoutError(f"no answer within {seconds} s")
  old = signal.signal(signal.SIGALRM, fail)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)

"""The summary command: parameters and MACs against published figures."""

from qlhs_jax.models import create, summary


def test_macs_against_published_figures():
  # ResNet50 at 224: 4.09 GMACs (the torchvision / fvcore figure); MobileNetV3-Large
  # 1.0: 0.22 GMACs (timm / the MobileNetV3 paper's 219M MAdds).
  assert abs(summary.count_macs(create("resnet50")) / 1e9 - 4.09) < 0.01
  assert abs(summary.count_macs(create("mobilenetv3_large_100")) / 1e9 - 0.219) < 0.005


def test_eq3_macs_by_hand():
  """Eq.(3) ws x4 at 224, counted by hand: stem 118.0M; per block C and A
  (n_in*h + h*n_out per output pixel) and D (9 per hidden output); shortcuts; head."""
  stem = 112 * 112 * 7 * 7 * 3 * 64
  total = stem
  hw = {0: 56 * 56, 1: 28 * 28, 2: 14 * 14, 3: 7 * 7}
  widths, depths = (64, 128, 256, 512), (3, 4, 6, 3)
  n_in = 64
  for k, (w, d) in enumerate(zip(widths, depths)):
    for i in range(d):
      h = 4 * n_in
      total += hw[k] * (n_in * h + h * w + 9 * h)
      if n_in != w:
        total += hw[k] * n_in * w
      n_in = w
  total += 512 * 100
  assert summary.count_macs(create("eq3_softball_ds")) == total


def test_summary_text(capsys):
  summary.main(["eq3_softball_ds", "--size", "64"])
  out = capsys.readouterr().out
  assert "8,608,868 trainable" in out and "stage4_block2" in out and "83.66" in out


def test_summary_raises_no_array_warnings():
  """nn.tabulate reads every recorded module-method call's arguments as arrays; the
  block's helpers (a lambda, parameter names such as "a" and "d") made it warn (NumPy's
  dtype alias 'a', float64 for 'd', jnp.shape of a function: an error in a later JAX)."""
  import warnings
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    summary.summary("eq3_softball_ds", size=32)
    summary.summary("eq5_softball_ds", size=32)
  bad = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
         if "flax/linen/summary" in w.filename or "jax/_src/dtypes" in w.filename
         or "jax/_src/numpy" in w.filename]
  assert not bad, "\n".join(bad)

"""Eq.(3)'s hidden path ``A(BN(D u) * (C u))`` as Pallas kernels (qlhs_jax.kernels.eq3_block).

References: float64 NumPy loops for the forward, float64 autodiff of the plain formula
for the gradients; the kernels run in interpret mode in float32. That they lower to
Triton for a CUDA device is checked here too (the compile to PTX is not).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlhs_jax.kernels import eq3_block as eb

from tests.kernels.test_d_bn_product import EPS, loss_of, numpy_forward


def make_inputs(seed, b, h, w, n, e, kj, n_out, dtype=np.float64, stride=1):
  rng = np.random.default_rng(seed)
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  u = rng.normal(size=(b, h, w, n)) + 0.3  # an offset: the centred backward matters
  cw = rng.normal(size=(n, n * e)) / np.sqrt(n)
  aw = rng.normal(size=(n * e, n_out)) / np.sqrt(n * e)
  kernel = rng.normal(size=(3, 3, kj, e))
  scale = rng.uniform(0.5, 1.5, n * e) * rng.choice([-1, 1], n * e)
  bias = rng.normal(size=n * e)
  weights = (rng.normal(size=(b, ho, wo, n_out)), rng.normal(size=(1, n * e)),
             rng.normal(size=(1, n * e)))
  return tuple(a.astype(dtype) for a in (u, cw, aw, kernel, scale, bias)), weights


CASES = [  # (B, H, W, n), e, kernel's j axis (1 = shared "ws"), n_out, stride
    ((2, 5, 6, 16), 4, 1, 16, 1),    # 60 pixels: one 64-pixel tile, 4 rows of padding
    ((2, 7, 5, 32), 2, 32, 16, 1),   # per-channel kernel, n_out < n, two tiles
    ((1, 4, 4, 16), 4, 1, 32, 1),    # n_out > n, a 16-pixel tile
    ((2, 7, 6, 16), 4, 1, 32, 2),    # strided (gathered taps), odd height: 4 x 3 out
    ((3, 8, 8, 16), 2, 16, 32, 2),   # strided, per-channel kernel, 48 of 64 rows used
]


def numpy_block(u, cw, aw, kernel, scale, bias, stride):
  """Float64 NumPy: the 1x1 maps around d_bn_product's NumPy loops."""
  p, mean, var = numpy_forward(u, u[:, ::stride, ::stride] @ cw, kernel, scale, bias,
                               stride, 1)
  return p @ aw, mean, var


@pytest.mark.parametrize("shape,e,kj,n_out,stride", CASES)
def test_forward_matches_numpy(shape, e, kj, n_out, stride):
  args, _ = make_inputs(0, *shape, e, kj, n_out, stride=stride)
  want = numpy_block(*args, stride)
  got = eb.eq3_hidden(*(jnp.asarray(a, jnp.float32) for a in args), stride=stride,
                      eps=EPS, interpret=True)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5 * np.abs(w).max())


def assert_gradients_match(args, weights, stride=1):
  with jax.enable_x64(True):
    ref = jax.grad(loss_of(functools.partial(eb.reference, stride=stride, eps=EPS),
                           [jnp.asarray(w) for w in weights]), argnums=range(6))(
                               *(jnp.asarray(a) for a in args))
    ref = [np.asarray(r) for r in ref]
  op = functools.partial(eb.eq3_hidden, stride=stride, eps=EPS, interpret=True)
  got = jax.grad(loss_of(op, [jnp.asarray(w, jnp.float32) for w in weights]),
                 argnums=range(6))(*(jnp.asarray(a, jnp.float32) for a in args))
  for name, g, r in zip(("u", "C", "A", "kernel", "scale", "bias"), got, ref):
    assert g.shape == r.shape and g.dtype == jnp.float32, name
    err = np.abs(np.asarray(g) - r).max() / np.abs(r).max()
    assert err < 2e-5, f"d{name}: relative error {err:.1e}"


def assert_matches_float64(args, weights):
  """Stride 1, float32 kernels: all gradients against float64 autodiff, y against the
  NumPy loops."""
  assert_gradients_match(args, weights)
  want = numpy_block(*args, 1)[0]
  got = eb.eq3_hidden(*(jnp.asarray(a, jnp.float32) for a in args), eps=EPS,
                      interpret=True)[0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("shape,e,kj,n_out,stride", CASES)
def test_gradients_match_float64_autodiff(shape, e, kj, n_out, stride):
  assert_gradients_match(*make_inputs(1, *shape, e, kj, n_out, stride=stride), stride)


def test_channel_blocks_and_chunks_match_float64_autodiff(monkeypatch):
  """Smaller accumulators than the GPU default: the forward and dx passes loop over two
  channel blocks, the sums pass has two channel blocks per s and several tiles per
  program, and the tiles are 32 pixels (the last one partly padding)."""
  monkeypatch.setattr(eb, "ACC_VALUES", 1024)
  monkeypatch.setattr(eb, "SUMS_ACC_VALUES", 1024)
  monkeypatch.setattr(eb, "SUMS_PROGRAMS", 8)
  monkeypatch.setattr(eb, "FORWARD_BJ", 16)
  plan = eb._plan((2, 6, 7, 32), 32, 2)
  assert (plan["m"], plan["bj"], plan["bjf"]) == (32, 16, 16)
  # Several tiles per program; the last tile partly padding; one tile slot past the end.
  assert plan["tpc"] > 1 and plan["tiles"] * plan["m"] > plan["rows"]
  assert plan["chunks"] * plan["tpc"] > plan["tiles"]
  args, weights = make_inputs(2, 2, 6, 7, 32, 2, 1, 32)
  assert_matches_float64(args, weights)


def test_bfloat16_is_as_close_to_float64_as_the_plain_path():
  """In bfloat16 (the training dtype) the kernels are no further from the float64 values
  than the plain formula in bfloat16 is (whose D u, BatchNorm output and kernel
  gradient are rounded to bfloat16 where the kernels keep float32). The comparison is
  benchmarks.block_check's, which the GPU run repeats on the device."""
  from qlhs_jax.benchmarks import block_check
  rows = block_check.check_shape(2, 8, 32, 32, 1, seed=3)
  assert [name for name, *_ in rows] == list(block_check.NAMES)
  for name, k, p, _ in rows:
    assert k <= max(1.5 * p, 1e-2), (name, k, p)


def test_a_kernel_rounded_to_the_compute_dtype_is_the_rounded_kernels(monkeypatch):
  """QLHS_D_KERNEL=compute reaches fuse_d_bn="block" too: with bfloat16 u and 1x1 maps,
  y, the statistics and all six gradients are those of the float32 default given the
  kernel already rounded to bfloat16, and dL/dkernel stays float32."""
  args, weights = make_inputs(5, 2, 5, 6, 16, 4, 1, 16, np.float32)
  dtypes = (jnp.bfloat16,) * 3 + (jnp.float32,) * 3
  args = [jnp.asarray(a, d) for a, d in zip(args, dtypes)]
  ws = [jnp.asarray(w, jnp.float32) for w in weights]
  op = functools.partial(eb.eq3_hidden, eps=EPS, interpret=True)
  run = lambda a: jax.tree.leaves((op(*a), jax.grad(loss_of(op, ws), argnums=range(6))(*a)))
  rounded = args[:3] + [args[3].astype(jnp.bfloat16).astype(jnp.float32)] + args[4:]
  want, as_is = run(rounded), run(args)
  monkeypatch.setenv("QLHS_D_KERNEL", "compute")
  got = run(args)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  assert got[3 + 3].dtype == jnp.float32  # (y, mean, var), then du, dcw, daw, dkernel
  assert any((np.asarray(a, np.float32) != np.asarray(g, np.float32)).any()
             for a, g in zip(as_is, got))


def test_wrong_arguments_are_refused(monkeypatch):
  args, _ = make_inputs(0, 2, 6, 6, 16, 4, 1, 16, np.float32)
  u, cw, aw, kernel, scale, bias = (jnp.asarray(a) for a in args)
  with pytest.raises(ValueError, match="do not fit"):
    eb.eq3_hidden(u, cw[:, :32], aw, kernel, scale, bias)
  args8, _ = make_inputs(0, 2, 6, 6, 8, 4, 1, 16, np.float32)
  with pytest.raises(ValueError, match="power-of-two n >= 16.*fuse_d_bn='xla'"):
    eb.eq3_hidden(*(jnp.asarray(a) for a in args8), interpret=True)
  args3, _ = make_inputs(0, 2, 6, 6, 16, 3, 1, 16, np.float32)
  with pytest.raises(ValueError, match="power-of-two expansion e"):
    eb.eq3_hidden(*(jnp.asarray(a) for a in args3), interpret=True)
  monkeypatch.setattr(eb.dbn, "plt", None)  # a JAX without Pallas's Triton backend
  with pytest.raises(ValueError, match="needs Pallas's Triton backend.*fuse_d_bn='xla'"):
    eb.eq3_hidden(u, cw, aw, kernel, scale, bias, interpret=True)


def test_tiling_override(monkeypatch):
  """QLHS_BLOCK_TILING changes the tiles, not the numbers; a bad value is refused."""
  args, _ = make_inputs(4, 2, 5, 7, 16, 4, 1, 16, np.float32)
  args = [jnp.asarray(a) for a in args]
  run = lambda: np.asarray(eb.eq3_hidden(*args, interpret=True)[0])
  base = run()
  monkeypatch.setenv("QLHS_BLOCK_TILING", "16,8")
  assert eb._plan((2, 5, 7, 16), 16, 4)["m"] == 16 and eb.tiling() == (16, 8)
  np.testing.assert_allclose(run(), base, rtol=1e-6, atol=1e-6)
  for bad in ("24,4", "64", "64,3", "x,4", "sumz=32,4", "forward@5x7=32,4",
              "@5x7x16x16s1=32,4", "sums@=32,4", "sums=32,4 sums=64,4", "5x7x16=32,4",
              "sums=32,4,24", "forward=32,4,32", "dx@5x7x16x16s1=32,4,32", "32,4,8",
              "32,4,32,1"):
    monkeypatch.setenv("QLHS_BLOCK_TILING", bad)
    with pytest.raises(ValueError, match="want whitespace-separated"):
      eb.tiling()


def test_tiling_per_kernel_and_shape(monkeypatch):
  """The most specific entry wins (kernel@shape, shape, kernel, bare); with a different
  tile size in each of the three kernels (so dy is padded differently for the sums and
  dx passes) and the sums kernel at half its channels per slice, outputs and all
  gradients still match float64 autodiff."""
  key = eb.shape_key(6, 7, 32, 32, 1)
  assert key == "6x7x32x32s1"
  monkeypatch.setenv("QLHS_BLOCK_TILING",
                     f"16,8 sums=32,4 {key}=64,8 sums@{key}=128,4")
  assert eb.tiling("sums", key) == (128, 4) and eb.tiling("dx", key) == (64, 8)
  assert eb.tiling("sums", "1x1x16x16s1") == (32, 4) and eb.tiling("dx", "1x1x16x16s1") == (
      16, 8)
  assert eb.tiling() == (16, 8)
  # The sums kernel at 16 channels per slice (its automatic width here: all 32).
  spec = f"16,8 sums=32,4,16 dx@{key}=16,2 forward=64,4"
  monkeypatch.setenv("QLHS_BLOCK_TILING", spec)
  plans = {k: eb._plan((2, 6, 7, 32), 32, 2, 1, k) for k in eb.KERNELS}
  assert [(plans[k]["m"], plans[k]["warps"]) for k in eb.KERNELS] == [(64, 4), (32, 4),
                                                                      (16, 2)]
  assert plans["sums"]["bj"] == 16 and eb.tiling("sums", key) == (32, 4, 16)
  monkeypatch.delenv("QLHS_BLOCK_TILING")
  assert eb._plan((2, 6, 7, 32), 32, 2, 1, "sums")["bj"] == 32
  assert eb._plan((2, 6, 7, 32), 32, 2, 1, "sums", tile=(16, 4))["m"] == 16
  assert eb._plan((2, 6, 7, 32), 32, 2, 1, "sums", tile=(16, 4, 64))["bj"] == 32  # <= n
  monkeypatch.setenv("QLHS_BLOCK_TILING", spec)
  args, weights = make_inputs(5, 2, 6, 7, 32, 2, 1, 32)
  assert_matches_float64(args, weights)


def test_plan_at_the_network_shapes():
  """At Eq.(3)'s stride-1 shapes (batch 256, 224 px) each program's float32 accumulator
  stays within ACC_VALUES, tiles are powers of two, and the sums pass has about
  SUMS_PROGRAMS programs."""
  for side, n in ((56, 64), (28, 128), (14, 256), (7, 512)):
    plan = eb._plan((256, side, side, n), n, 4)
    assert plan["m"] * n <= eb.ACC_VALUES and plan["bj"] * 2 * n <= max(eb.SUMS_ACC_VALUES,
                                                                      16 * 2 * n)
    assert plan["m"] & (plan["m"] - 1) == 0 and plan["bj"] >= 16
    assert plan["tiles"] * plan["m"] == plan["rows"]  # dy needs no padding
    assert plan["chunks"] * plan["tpc"] >= plan["tiles"] > (plan["chunks"] - 1) * plan["tpc"]
    programs = (n // plan["bj"]) * 4 * plan["chunks"]
    assert 0.9 * eb.SUMS_PROGRAMS <= programs < 2 * eb.SUMS_PROGRAMS, (side, programs)


@pytest.mark.parametrize("side,n,stride", [(56, 64, 1), (14, 256, 2), (7, 512, 1)])
def test_kernels_lower_to_triton_for_cuda(side, n, stride):
  """Stage 1, stage 4's strided first block and stage 4 at batch 256: three Triton
  kernels, forward, sums and dx."""
  from qlhs_jax.benchmarks.triton_compile import lower_block_for_cuda
  text = lower_block_for_cuda(256, side, n, stride).as_text()
  assert text.count("xla.gpu.triton") == 3
  for name in ("forward_kernel", "sums_kernel", "dx_kernel"):
    assert f"qlhs_eq3_{name}" in text, name

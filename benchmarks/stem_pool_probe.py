"""The stem's max-pool with its taps read through a -inf padding or from the
convolution's output written with a margin (``config.kernels.stem_taps``), compiled for
an H100 on a CPU: each form's kernels with their registers, machine instructions a
thread, issue floor and copy time (``qlhs_jax.benchmarks.xla_floors``).

  python benchmarks/stem_pool_probe.py [--batch 256] [--size 224]

The stem alone, as both models build it (``common.ConvNorm``: the 7x7/2 convolution on
2x2 blocks of the image's 3 channels and a zero fourth, BatchNorm, ReLU and the 3x3/2
pool; bfloat16):
- "train": the train step's part, forward and backward (the loss a fixed cotangent
  times the pooled output, which is returned too, as the next block reads it;
  BatchNorm's statistics of the batch), with ``kernels.stem_taps`` set to each form;
- "eval": the BN-folded eval forward (the convolution, its bias, ReLU and the pool),
  which the library computes in the padded form only; the margin form here is
  ``common._relu_argmax_pool_in_margin`` on the convolution written with its margin.
The cuDNN convolutions have no PTX of XLA's and are not listed.

Result, 2026-12-05 (jax 0.11.2, Python 3.12, this project's 2-core CPU; triton 3.9.0's
ptxas; an H100's clock and 3.0 TB/s), the pool's kernel (floor, copy in ms;
instructions a thread; registers):
- train, the forward (BatchNorm applied, ReLU, the pool, its argmax and y at it): "pad"
  0.361, 0.223, 939, 72; "margin" 0.209, 0.228, 545, 48, as in the whole step
  (benchmarks/NOTES.md, experiment 35); dL/dy 0.352, 0.327, 229, 32 and 0.375, 0.332,
  244, 32 (it reads y at an offset in the margin);
- eval: "pad" 0.115, 0.171, 299, 32; "margin" 0.120, 0.176, 312, 40. Without the
  argmax and y at the tap the padded form is not bound by its instructions, and the
  margin would only add bytes: so the eval and folded forwards keep the padding.

Run with the GPU machine's JAX (0.11.2, `pip install "jax[cuda12]==0.11.2"`) and
`pip install triton==3.9.0` (its ptxas and nvdisasm).
"""

import argparse
import glob
import os
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="stem_pool_probe.")
# Before JAX starts: dump every kernel's PTX (benchmarks/NOTES.md, experiment 34).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} "
                           "--xla_dump_emitter_re=.* --xla_gpu_dump_llvmir=true")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qlhs_jax.benchmarks import aot, xla_floors  # noqa: E402
from qlhs_jax.kernels import settings  # noqa: E402
from qlhs_jax.models import common  # noqa: E402


def compile_forms(batch: int, size: int, width: int = 64):
  """Compiles the stem's train part and folded eval forward in both forms; returns
  ``{(part, form): path of the dumped HLO after optimizations}``."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding

  device = aot.compile_only_device()
  sharding = SingleDeviceSharding(device)
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
  bf16 = jnp.bfloat16
  x = jax.ShapeDtypeStruct((batch, size, size, 3), bf16, sharding=sharding)
  stem = common.ConvNorm(width, (7, 7), 2, pad_in_channels=4, space_to_depth=True,
                         relu_max_pool=True, train=True, dtype=bf16)
  variables = jax.tree.map(spec, jax.eval_shape(stem.init, jax.random.PRNGKey(0), x))
  kernel = jax.ShapeDtypeStruct((7, 7, 4, width), bf16, sharding=sharding)
  bias = jax.ShapeDtypeStruct((width,), bf16, sharding=sharding)
  pooled = jax.eval_shape(lambda v, x: stem.apply(v, x, mutable=["batch_stats"])[0],
                          variables, x)
  cotangent = jax.ShapeDtypeStruct(pooled.shape, jnp.float32, sharding=sharding)

  def train(params, batch_stats, x, ct):
    def loss(p):
      out, new = stem.apply({"params": p, "batch_stats": batch_stats}, x,
                            mutable=["batch_stats"])
      return jnp.sum(out.astype(jnp.float32) * ct), (out, new)
    # The pooled output returned too: in the step the next block reads it.
    return jax.grad(loss, has_aux=True)(params)

  def evaluate(form):
    def f(kernel, bias, x):  # ConvNorm(folded=True)'s forward, in either form
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1)))  # the zero fourth channel
      if form == "pad":
        return common.relu_max_pool_3x3_s2(common.stem_conv(x, kernel, 2, True) + bias)
      y_m = common.stem_conv(x, kernel, 2, True, common._STEM_MARGIN) + bias
      hw = common._conv_out(x, kernel, 2)
      return common._relu_argmax_pool_in_margin(y_m, None, *hw)[0]
    return f

  paths = {}
  for form in common.STEM_TAPS_FORMS:
    for part, fn, args in (
        ("train", train, (variables["params"], variables["batch_stats"], x, cotangent)),
        ("eval", evaluate(form), (kernel, bias, x))):
      name = f"{part}_{form}"
      # A new function each time (jax.jit caches a trace by function; the setting is
      # read at trace time), named for the dump's module.
      fn = (lambda fn: lambda *a: fn(*a))(fn)
      fn.__name__ = fn.__qualname__ = name
      with settings.use({"stem_taps": form}):
        jax.jit(fn).lower(*args).compile(aot.GEMM_OPTIONS["triton"])
      found = glob.glob(os.path.join(
          DUMP, f"module_*.jit_{name}.sm_9.0a_gpu_after_optimizations.txt"))
      if len(found) != 1:
        raise SystemExit(f"expected one dump of jit_{name} in {DUMP}, found {found}")
      paths[part, form] = found[0]
  return paths


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--size", type=int, default=224)
  args = p.parse_args(argv)
  import jax
  print(f"jax {jax.__version__}; the stem alone at batch {args.batch}, {args.size} px, "
        f"bfloat16, compiled for an H100; dumps in {DUMP}")
  for (part, form), path in compile_forms(args.batch, args.size).items():
    rows = xla_floors.floors(path)
    print(f"\n{part}, stem_taps={form}: {len(rows)} kernels with XLA's PTX")
    print("\n".join(xla_floors.table(rows)))


if __name__ == "__main__":
  main()

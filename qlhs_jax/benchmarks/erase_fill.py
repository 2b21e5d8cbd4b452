"""The train step's input kernel alone: uint8 batches normalised and erased with each
generator of the 'pixel' fills (``config.data.erase_noise``), timed in one process.

  python -m qlhs_jax.benchmarks.erase_fill [--batch 256] [--size 224] [--repeats 20]

Times the jitted :func:`qlhs_jax.device_input.normalize_and_erase` of a synthetic batch
(``benchmarks.step.synthetic_batch``: the recipe's boxes on 40% of the images), its
output cast to bfloat16 as the model's first convolution takes it, once per generator,
interleaved, and prints the median ms of each and their ratio. XLA computes a fill for
every pixel (both sides of the select), so the figure does not depend on the boxes. On
a CPU only the ratio means anything; in the step, the same work is fused into the stem's
first kernel (benchmarks/NOTES.md, experiment 32).
"""

from __future__ import annotations

import argparse
import json
import time


def time_generators(batch: int, size: int, repeats: int = 20) -> dict:
  """``{generator: median ms}`` over ``repeats`` calls each, alternating."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qlhs_jax import device_input
  from qlhs_jax.benchmarks.step import RECIPE_INPUT, synthetic_batch
  host = synthetic_batch(batch, size, "uint8")
  args = [jax.device_put(host[k]) for k in ("image", "erase", "erase_seed")]
  fns = {}
  for noise in device_input.ERASE_NOISES:
    fns[noise] = jax.jit(lambda i, e, s, noise=noise: device_input.normalize_and_erase(
        i, e, s, mean=RECIPE_INPUT.mean, std=RECIPE_INPUT.std, mode=RECIPE_INPUT.remode,
        noise=noise).astype(jnp.bfloat16))
    fns[noise](*args).block_until_ready()  # compile
  times = {noise: [] for noise in fns}
  for _ in range(repeats):
    for noise, fn in fns.items():
      start = time.perf_counter()
      fn(*args).block_until_ready()
      times[noise].append(time.perf_counter() - start)
  return {noise: float(np.median(t)) * 1e3 for noise, t in times.items()}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m qlhs_jax.benchmarks.erase_fill",
                              description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args(argv)
  from qlhs_jax import xla_options
  xla_options.request_from_env()  # before JAX starts, as the step harness does
  import jax
  ms = time_generators(args.batch, args.size, args.repeats)
  device = jax.devices()[0]
  print(json.dumps({"batch": args.batch, "size": args.size,
                    "device": f"{device.platform}:{device.device_kind}",
                    "jax": jax.__version__,
                    # 4 significant digits: on a CPU at small sizes a time is ~0.1 ms
                    **{f"{k}_ms": float(f"{v:.4g}") for k, v in ms.items()},
                    "threefry_over_hash": round(ms["threefry"] / ms["hash"], 3)}))


if __name__ == "__main__":
  main()

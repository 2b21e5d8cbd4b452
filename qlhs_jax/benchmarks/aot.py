"""Compile the real train step for an H100 on a machine without a GPU; count its bytes.

  pip install "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')"
  python -m qlhs_jax.benchmarks.aot --model eq3_softball_ds --vs resnet50 \
      [--set pin_hidden_layout=true] [--hlo-dir DIR] [--record FILE]

XLA's GPU compiler runs "deviceless" (ahead of time) when it is given the target GPU's
description instead of a device: this module builds a compile-only H100 from
:data:`H100_SXM` (the figures NVIDIA publishes for the H100 SXM 80GB, in XLA's
GpuTargetConfigProto text format), lowers the same train step that
``benchmarks.step`` times (``qlhs_jax.steps``: forward, backward, label smoothing,
weight decay, SGD-Nesterov, non-finite guard) and compiles it. Nothing runs. The
compiled program's HLO is the one the GPU would execute, so
:mod:`qlhs_jax.benchmarks.hlo_bytes` can count the bytes every kernel moves: on a
memory-bound model the first-order estimate of speed, and the way to try layouts and
formulations between GPU sessions.

A deviceless compile cannot autotune. ``--gemm triton`` keeps XLA's Triton GEMM fusions
with their default tilings (the device would also time cuBLAS for each and may pick
it); ``--gemm cublas`` turns them off, so cuBLAS does every matmul; ``auto`` (the
default) is "triton" where it compiles and "cublas" where it does not (JAX 0.10.2 fails
on some dots with "Couldn't find output tile sizes"; 0.11.2 compiles them). Records say
which. Calibration (benchmarks/NOTES.md, experiment 6; ``benchmarks/aot_at_commit.py``):
the commit the H100 ran, compiled here with jax 0.11.2 and "triton", moves 103.7 GB for
eq3_softball_ds and 102.1 GB for resnet50 (1009 and 1073 kernels); the HLO the H100
dumped moves 103.7 and 102.6 GB (1012 and 1085 kernels). With "cublas": 97.3 and 100.0
GB. XLA's peak-memory estimate was within 8% of the measured peak (13.2 vs 12.8 GB,
11.5 vs 10.7).
Run it in a fresh process: it keeps JAX on the CPU platform.
With ``fuse_d_bn="pallas"`` or ``"block"``, or ``QLHS_STATS_FORM``, ``QLHS_SUMS_FORM``
or ``QLHS_DU_FORM=pallas`` (kernels.stencil), the model's Pallas kernels are lowered for
the GPU (``QLHS_PALLAS_INTERPRET=0``; on a CPU host they would otherwise be interpreted)
under the compile-only device's mesh, and XLA compiles their Triton IR for the target:
a check that they compile, and their bytes (operands and results of each kernel; what
a kernel re-reads from its caches is not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

from qlhs_jax import xla_options

# NVIDIA H100 SXM5 80GB (sm_90): 132 SMs, 50 MiB L2, 3.35 TB/s HBM3, 228 KiB shared
# memory per SM (227 KiB per block opt-in), 64K registers per SM, 1.98 GHz boost.
H100_SXM = """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
TARGETS = {"h100": H100_SXM}


def _setup_host():
  """Keep JAX on the CPU and let the CUDA plugin load without a GPU to check."""
  import jax
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  jax.config.update("jax_platforms", "cpu")


def compile_only_devices(target: str = "h100", devices: int = 1):
  """``devices`` compile-only GPUs of one host, each described by ``TARGETS[target]``."""
  _setup_host()
  import jax
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc("", platform="cuda",
                                        target_config=TARGETS[target],
                                        topology=f"1x1x{devices}")
  except (NotImplementedError, RuntimeError) as e:
    raise SystemExit(
        f"compiling for a GPU without one needs JAX's CUDA plugin ({e}); install it "
        f"with: pip install \"jax[cuda13]=={jax.__version__}\" (it brings the CUDA "
        f"libraries and ptxas; no GPU or driver is needed; jax[cuda12] works too, up "
        f"to jax 0.12.0.1)") from e
  return topo.devices


def compile_only_device(target: str = "h100"):
  """One compile-only GPU device described by ``TARGETS[target]``."""
  return compile_only_devices(target)[0]


def single_device_mesh(device):
  """The harness's data-parallel mesh over one (compile-only) device."""
  import numpy as np
  from jax.sharding import Mesh
  from qlhs_jax import steps as S
  return Mesh(np.asarray([device]), (S.DATA_AXIS,))


def abstract_step_inputs(model, tx, mesh, batch: int, size: int, input: str = "float32"):
  """Shapes, dtypes and shardings of the train step's (state, batch): nothing is
  allocated. ``qlhs_jax.steps`` is imported here, so a caller that put an older
  checkout first on ``sys.path`` (benchmarks/aot_at_commit.py) gets that checkout's."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from qlhs_jax import steps as S
  state = jax.eval_shape(lambda: S.create_train_state(model, tx, jax.random.PRNGKey(0),
                                                      (size, size, 3)))
  repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(S.DATA_AXIS))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                       state)
  shapes = {"label": ((batch,), jnp.int32)}
  if input != "float32":  # benchmarks.step.synthetic_batch's
    from qlhs_jax.benchmarks.step import RANDAUGMENT_SLOTS, RECIPE_INPUT
    shapes.update(image=((batch, size, size, 3), jnp.uint8),
                  erase=((batch, RECIPE_INPUT.recount, 4), jnp.int32),
                  erase_seed=((batch,), jnp.uint32))
    if input == "uint8_randaugment":
      slots = (batch, RANDAUGMENT_SLOTS)
      shapes.update(ra_op=(slots, jnp.int32), ra_arg=(slots, jnp.float32),
                    ra_resample=(slots, jnp.int32))
  else:
    shapes["image"] = ((batch, size, size, 3), jnp.float32)
  data = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
          for k, (shape, dtype) in shapes.items()}
  return state, data


# XLA options per --gemm. Autotuning needs a device: level 0 takes the default tilings.
GEMM_OPTIONS = {"triton": {"xla_gpu_enable_triton_gemm": True, "xla_gpu_autotune_level": 0},
                "cublas": {"xla_gpu_enable_triton_gemm": False}}


def pallas_for_gpu():
  """QLHS_PALLAS_INTERPRET=0 while the step is traced, restored after (the tests call
  this module in their own process)."""
  from qlhs_jax.benchmarks.step import kernel_env
  return kernel_env("QLHS_PALLAS_INTERPRET", "0")


def compile_train_step(model_name: str, overrides: dict, batch: int = 256,
                       size: int = 224, dtype: str = "bfloat16", target: str = "h100",
                       gemm: str = "auto", devices: int = 1, input: str = "float32",
                       state_writes: str = "grouped", trace_out: dict | None = None):
  """The compiled train step of ``benchmarks.step`` for ``target`` (a
  ``jax.stages.Compiled``), the compile time in seconds and the ``gemm`` mode used
  ("triton" or "cublas"; "auto" tries them in that order). ``devices`` > 1: the step of
  one host with that many GPUs, ``batch`` the global batch split over them, per-replica
  BatchNorm as in training (the program XLA compiles is one device's). ``trace_out``:
  given a dict, its "jaxpr" is set to the traced step's (``xla_floors.pallas_loops``
  reads its Pallas kernels' trip counts there)."""
  if gemm not in ("auto", *GEMM_OPTIONS):
    raise SystemExit(f"--gemm {gemm!r}: choose auto, triton or cublas")
  if devices < 1 or batch % devices:
    raise SystemExit(f"--devices {devices}: want a count of GPUs that divides the batch "
                     f"({batch})")
  device_list = compile_only_devices(target, devices)
  import jax
  import jax.numpy as jnp

  from qlhs_jax import steps as S
  from qlhs_jax.benchmarks.step import harness_train_step, kernel_env_of
  from qlhs_jax.models import create

  # Pallas kernels in the step: fuse_d_bn's, or kernels.stencil's where the model uses a
  # form that QLHS_STATS_FORM, QLHS_SUMS_FORM or QLHS_DU_FORM sets to "pallas", or leaves
  # to its default, which picks them on the GPU (resolved as there).
  model = create(model_name, dtype=jnp.dtype(dtype), bn_groups=devices, **overrides)
  mesh = S.make_mesh(device_list)
  S.check_fuse_fits_mesh(overrides.get("fuse_d_bn"), mesh)
  with pallas_for_gpu(), S.batch_mesh(mesh):
    forms = kernel_env_of(overrides, model)
  pallas = runs_pallas(overrides.get("fuse_d_bn"), forms)
  tx, step = harness_train_step(model, mesh, input, state_writes)
  # Pallas kernels: the Triton kernels, not their interpretation on this CPU (qlhs.py),
  # lowered under the compile-only device's mesh, from which Pallas reads the GPU.
  with (pallas_for_gpu() if pallas else contextlib.nullcontext(),
        jax.set_mesh(mesh) if pallas else contextlib.nullcontext()):
    traced = step.trace(*abstract_step_inputs(model, tx, mesh, batch, size, input))
    lowered = traced.lower()
  if trace_out is not None:
    trace_out["jaxpr"] = traced.jaxpr
  modes = ["triton", "cublas"] if gemm == "auto" else [gemm]
  for i, mode in enumerate(modes):
    t0 = time.perf_counter()
    try:
      return lowered.compile(GEMM_OPTIONS[mode]), time.perf_counter() - t0, mode
    except Exception as e:  # XLA's compile errors have no narrower common type
      if i + 1 == len(modes):
        raise
      first = (str(e).strip().splitlines() or [""])[0][:200]
      print(f"{model_name}: Triton GEMM fusions do not compile without a device on jax "
            f"{jax.__version__} ({first}); compiling with cuBLAS for every matmul "
            f"(--gemm cublas; jax 0.11.2 compiles them)", file=sys.stderr, flush=True)


def runs_pallas(fuse: str | None, forms: dict) -> bool:
  """Whether a step of ``fuse`` (fuse_d_bn) with these kernel settings
  (``step.kernel_env_of``) runs Pallas kernels: fuse_d_bn's own, or a form variable's
  Pallas form ("pallas", "pallas_gram", "pallas_xhat", "pallas_dot", or "auto:pallas",
  a default that picks them). Until 2026-12-06 only "pallas" and "auto:pallas" counted:
  a step with every form set to "pallas_dot" was lowered with its kernels interpreted,
  as XLA's ops (98.89 GB a step instead of ~65; NOTES.md, experiment 41)."""
  from qlhs_jax.kernels.d_bn_product import PALLAS_FUSES
  return fuse in PALLAS_FUSES or any(
      v.startswith(("pallas", "auto:pallas")) for k, v in forms.items()
      if k.endswith("_FORM"))


def measure(model_name: str, overrides: dict, batch: int, size: int, dtype: str,
            target: str, hlo_dir: str | None = None, gemm: str = "auto",
            devices: int = 1, input: str = "float32",
            state_writes: str = "grouped") -> dict:
  """Compiles one model and returns a record of the bytes its train step moves (on
  one device of ``devices``)."""
  import jax

  from qlhs_jax import steps as S
  from qlhs_jax.benchmarks import hlo_bytes, xla_floors
  from qlhs_jax.benchmarks.step import hlo_tag, kernel_env_of, write_hlo
  from qlhs_jax.models import create
  traced = {}
  compiled, compile_s, gemm = compile_train_step(model_name, overrides, batch, size, dtype,
                                                 target, gemm, devices, input,
                                                 state_writes, traced)
  text = compiled.as_text()
  rows = hlo_bytes.analyse(text)
  # XLA's buffer assignment: parameters, optimizer state, batch, temporaries.
  peak = getattr(compiled.memory_analysis(), "peak_memory_in_bytes", None)
  by_kind, by_part = hlo_bytes.totals(rows)
  if hlo_dir:
    write_hlo(hlo_dir, model_name, overrides, "aot", text)
    loops = xla_floors.pallas_loops(traced["jaxpr"])
    if loops:  # the Pallas kernels' trip counts, for xla_floors and budget --floors
      with open(os.path.join(hlo_dir, f"{hlo_tag(model_name, overrides)}.aot."
                                      f"pallas_loops.json"), "w") as f:
        json.dump(loops, f, indent=0)
  record = {"kind": "aot_bytes", "model": model_name, "overrides": overrides,
            "batch": batch, "size": size, "dtype": dtype, "target": target, "gemm": gemm,
            "devices": devices, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "kernels": len(rows),
            "train_gbytes": sum(by_kind.values()) / 1e9,
            "gbytes_by_kind": {k: v / 1e9 for k, v in by_kind.most_common()},
            "gbytes_by_part": {k: v / 1e9 for k, v in by_part.most_common()},
            "peak_mem_gb_est": peak / 2**30 if peak else None, "compile_s": compile_s,
            **({"input": input} if input != "float32" else {}),
            "state_writes": state_writes,
            # multiply-add contraction (QLHS_XLA_FMA; records without it: none)
            "xla_fma": xla_options.fma_in_flags()}
  # the tilings and forms as they resolve for the GPUs, as the step's records carry
  # (the model: its expansion)
  with pallas_for_gpu(), S.batch_mesh(S.make_mesh(compile_only_devices(target, devices))):
    env = kernel_env_of(overrides, create(model_name, **overrides))
  if env:
    record["env"] = env
  return record


def main(argv=None):
  from qlhs_jax.benchmarks.step import (INPUTS, STATE_WRITES, _parse_overrides,
                                        append_records)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="model field override for --model, e.g. --set pin_hidden_layout=true")
  p.add_argument("--vs", default=None, help="a second model compiled in the same run")
  p.add_argument("--vs-set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--batch", type=int, default=256, help="the global batch")
  p.add_argument("--devices", type=int, default=1,
                 help="GPUs of one host splitting the batch (per-replica BatchNorm); the "
                      "bytes are one device's")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--input", default="float32", choices=INPUTS,
                 help="uint8: the step normalises and erases uint8 batches (training's "
                      "config.data.device_normalize); uint8_threefry: with the fills "
                      "from jax.random; uint8_randaugment: and applies "
                      "RandAugment's ops first (config.data.device_randaugment)")
  p.add_argument("--state-writes", default="grouped", choices=STATE_WRITES,
                 help="per_leaf: the step writes its new state leaf by leaf and donates "
                      "the old (config.group_state_writes=False); records without this "
                      "field compiled that step")
  p.add_argument("--target", default="h100", choices=sorted(TARGETS))
  p.add_argument("--gemm", default="auto", choices=["auto", *GEMM_OPTIONS],
                 help="matmuls as Triton GEMM fusions (XLA's default tilings) or all by "
                      "cuBLAS; auto: triton where it compiles")
  p.add_argument("--hlo-dir", default=None,
                 help="write each compiled HLO here (gzip), and beside it its Pallas "
                      "kernels' loop trips (.pallas_loops.json, for xla_floors --loops)")
  p.add_argument("--record", default=None, help="append the records to this JSON-lines file")
  args = p.parse_args(argv)
  xla_options.request_from_env()  # before JAX starts, as the GPU harness does
  from qlhs_jax.models import registry
  for name in filter(None, [args.model, args.vs]):
    registry.info(name)  # unknown names fail before the plugin loads
  runs = [(args.model, _parse_overrides(args.set))]
  if args.vs:
    runs.append((args.vs, _parse_overrides(args.vs_set)))
  records = [measure(m, o, args.batch, args.size, args.dtype, args.target, args.hlo_dir,
                     args.gemm, args.devices, args.input, args.state_writes)
             for m, o in runs]
  print(f"{'model':28s} {'GB per step':>12s} {'kernels':>8s} {'peak GB':>8s} {'matmuls':>8s}"
        f"  (train step compiled for {args.devices} x {args.target}, batch {args.batch}, "
        f"{args.size}px, "
        f"{args.dtype}; jax {records[0]['jax']})")
  for r in records:
    over = " ".join(f"{k}={v}" for k, v in sorted(r["overrides"].items()))
    mem = f"{r['peak_mem_gb_est']:.1f}" if r["peak_mem_gb_est"] else "-"
    print(f"{r['model']:28s} {r['train_gbytes']:12.2f} {r['kernels']:8d} {mem:>8s} "
          f"{r['gemm']:>8s}  {over}")
  if len({r["gemm"] for r in records}) > 1:
    print("the two models' matmuls compiled differently: compare with --gemm cublas")
  if args.vs:
    ratio = records[0]["train_gbytes"] / records[1]["train_gbytes"]
    records[0]["gbytes_ratio_vs"] = {args.vs: ratio}
    print(f"bytes {args.model} / {args.vs}: {ratio:.3f}")
  if args.record:
    append_records(args.record, records)


if __name__ == "__main__":
  main()

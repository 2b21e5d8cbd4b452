"""Throughput harness: the real training step and the BN-folded eval forward, in img/s.

  python -m qlhs_jax.benchmarks.step --model eq3_softball_ds --batch 256 --size 224 \
      --vs resnet50 [--record benchmarks/results.jsonl]

Times the training step that ``qlhs_jax.train`` runs (``qlhs_jax.steps``: forward,
backward, label smoothing, masked weight decay, SGD-Nesterov update, non-finite guard,
jitted over the device mesh) on synthetic inputs already on the device, and the eval
forward pass of the BN-folded model. ``--input uint8`` feeds what training feeds since
2026-12-04 (``config.data.device_normalize``): uint8 images and random erasing's boxes,
normalised and erased inside the step (``qlhs_jax.device_input``; ``--input
uint8_threefry`` draws the erased boxes' fills with ``jax.random`` as before 2026-12-05,
``config.data.erase_noise="threefry"``); ``--input uint8_randaugment`` adds
RandAugment's ops to the batch, applied in the step too
(``config.data.device_randaugment``, ``qlhs_jax.device_augment``); the default, float32
images, is what every record without an ``input`` field timed. ``--state-writes
per_leaf`` times the step writing its new state leaf by leaf, as every record without a
``state_writes`` field did (``config.group_state_writes=False``). Each step is timed to
completion; the figure is the median over ``--steps`` after ``--warmup`` steps. Every
model runs in its own process so that the peak device memory belongs to it. On CPU only
the ratio between models measured in the same run means anything. On NVIDIA GPUs both
models compile with multiply-add contraction (``qlhs_jax.xla_options``, as training's
``config.xla_fma``); ``QLHS_XLA_FMA=0`` times XLA's default, a multiply and an add. GPU
records carry ``xla_fma``; those without it (before 2026-12-05) compiled without.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import json
import os
import re
import subprocess
import sys
import time
import types

from qlhs_jax import xla_options
from qlhs_jax.provenance import code_version  # each record's commit


INPUTS = ("float32", "uint8", "uint8_threefry", "uint8_randaugment")
# The recipe's normalisation, erasing and RandAugment (qlhs_jax.data.default_config(); a
# test keeps them equal). Spelled out here: the GPU machine has no grain, which
# qlhs_jax.data needs.
RECIPE_INPUT = types.SimpleNamespace(device_normalize=True, mean=(0.485, 0.456, 0.406),
                                     std=(0.229, 0.224, 0.225), reprob=0.4,
                                     remode="pixel", recount=3, erase_noise="hash",
                                     randaugment="rand-m7-mstd0.5-inc1",
                                     device_randaugment=False)
# RandAugment's two ops per image, each applied with probability 0.5, and a typical
# argument of each device op (qlhs_jax.device_augment.OPS: every op is computed for
# every image, so the timing does not depend on the values).
RANDAUGMENT_SLOTS = 2
_TYPICAL_ARG = (0, 0, 0, 2, 128, 70, 1.3, 1.3, 1.3, 1.3, 14.0, 0.14, 0.14, 0.2, 0.2)


STATE_WRITES = ("grouped", "per_leaf")


def harness_train_step(model, mesh, input: str = "float32", state_writes: str = "grouped"):
  """The optimizer and the jitted train step the harness times (the recipe's: lr 0.3
  cosine over 50 epochs, 100 classes), also what ``benchmarks.aot`` compiles. ``input``
  "uint8": the step normalises and erases uint8 batches (:func:`synthetic_batch`);
  "uint8_threefry": the fills from ``jax.random`` instead of the counter hash;
  "uint8_randaugment": it applies their RandAugment ops first. ``state_writes``
  "per_leaf": ``steps.make_train_step(group_state_writes=False)``."""
  from qlhs_jax import device_input
  from qlhs_jax import steps as S
  if input not in INPUTS:
    raise SystemExit(f"--input {input!r}: choose one of {INPUTS}")
  if state_writes not in STATE_WRITES:
    raise SystemExit(f"--state-writes {state_writes!r}: choose one of {STATE_WRITES}")
  tx = S.make_optimizer()
  lr_fn = lambda epoch: S.timm_cosine_lr(epoch, base_lr=0.3, epochs=50)
  images_fn = None
  if input != "float32":
    images_fn = device_input.train_images_fn(types.SimpleNamespace(
        **{**vars(RECIPE_INPUT), "device_randaugment": input == "uint8_randaugment",
           "erase_noise": "threefry" if input == "uint8_threefry" else "hash"}))
  train_step = S.make_train_step(model, tx, lr_fn, num_classes=100, steps_per_epoch=1000,
                                 images_fn=images_fn,
                                 group_state_writes=state_writes == "grouped")
  return tx, S.jit_train_step(train_step, mesh)


def synthetic_batch(batch: int, size: int, input: str = "float32", seed: int = 0) -> dict:
  """A host batch as the pipeline hands it over: float32 images, or uint8 images with
  erasing boxes (40% of the images, as in the recipe, with 1-3 boxes of up to a quarter
  of the image) and seeds, and with "uint8_randaugment" two RandAugment ops per image
  (each skipped with probability 0.5). Only shapes and dtypes matter to the timing:
  the step fills every image's boxes alike and computes every op for every image, so
  neither need be drawn as the pipeline draws them."""
  import numpy as np
  rng = np.random.default_rng(seed)
  if input == "float32":  # drawn in this order since the first records
    return {"image": rng.standard_normal((batch, size, size, 3), np.float32),
            "label": rng.integers(0, 100, batch).astype(np.int32)}
  image = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, 100, batch).astype(np.int32)
  erase = np.zeros((batch, RECIPE_INPUT.recount, 4), np.int32)
  for i in np.flatnonzero(rng.random(batch) < RECIPE_INPUT.reprob):
    for k in range(int(rng.integers(1, RECIPE_INPUT.recount + 1))):
      h, w = (int(rng.integers(1, max(2, size // 2))) for _ in range(2))
      erase[i, k] = (rng.integers(0, size - h + 1), rng.integers(0, size - w + 1), h, w)
  out = {"image": image, "label": labels, "erase": erase,
         "erase_seed": rng.integers(0, 2**32, batch, dtype=np.uint32)}
  if input == "uint8_randaugment":
    shape = (batch, RANDAUGMENT_SLOTS)
    ops = rng.integers(0, len(_TYPICAL_ARG), shape).astype(np.int32)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    out.update(ra_op=np.where(rng.random(shape) < 0.5, ops, -1).astype(np.int32),
               ra_arg=(np.take(_TYPICAL_ARG, ops) * sign).astype(np.float32),
               ra_resample=rng.integers(0, 2, shape).astype(np.int32))
  return out


def measure(model_name: str, batch: int, size: int, steps: int, warmup: int,
            dtype: str, overrides: dict, hlo_dir: str | None = None,
            profile_dir: str | None = None, profile_steps: int = 3,
            on_record=None, input: str = "float32", state_writes: str = "grouped") -> dict:
  """Times one model in this process; returns a record. With ``profile_dir``, also traces
  ``profile_steps`` more train steps (of a second compile without XLA's command buffers,
  :data:`PROFILE_COMPILER_OPTIONS`), appends their per-kernel device times to
  ``profile_dir/kernels.jsonl`` and prints ``benchmarks.kernel_times``'s report to stderr.
  The profile comes last, after ``on_record(record)``: a profile that fails, hangs or is
  cut off by a time limit cannot cost the timing."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qlhs_jax import steps as S
  from qlhs_jax.models import apply_folded, create, fold_batchnorm

  mesh = S.make_mesh()
  S.check_batch_divides(batch, mesh)
  S.check_fuse_fits_mesh(overrides.get("fuse_d_bn"), mesh)
  model = create(model_name, dtype=jnp.dtype(dtype), bn_groups=mesh.size, **overrides)
  tx, step = harness_train_step(model, mesh, input, state_writes)
  state = S.replicate(S.create_train_state(model, tx, jax.random.PRNGKey(0),
                                           (size, size, 3)), mesh)
  data = S.shard_batch(synthetic_batch(batch, size, input), mesh)

  def timed(fn, n):
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - t0)
    return float(np.median(times))

  # Compile ahead of time: one compilation serves the timing and XLA's cost analysis.
  t0 = time.perf_counter()
  train_c = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state}

  def train_once():
    box["state"], metrics = train_c(box["state"], data)
    return metrics["loss"]
  timed(train_once, warmup)
  train_s = timed(train_once, steps)
  loss = float(train_once())

  st = box["state"]
  folded = fold_batchnorm(model, st.params, st.batch_stats)
  folded = jax.tree.map(lambda x: x.astype(jnp.float32), folded)
  # Evaluation batches are float32 either way (the pipeline normalises them on the host).
  eval_x = data["image"] if input == "float32" else S.shard_batch(
      synthetic_batch(batch, size), mesh)["image"]
  fwd = jax.jit(lambda f, x: apply_folded(model, f, x)).lower(folded, eval_x).compile()
  timed(lambda: fwd(folded, eval_x), warmup)
  eval_s = timed(lambda: fwd(folded, eval_x), steps)
  if hlo_dir:
    write_hlo(hlo_dir, model_name, overrides, "train", train_c.as_text())

  dev = jax.devices()[0]
  mem = dev.memory_stats() or {}
  record = {
      "model": model_name, "batch": batch, "size": size, "dtype": dtype,
      "overrides": overrides, "device": f"{dev.platform}:{dev.device_kind}",
      "devices": mesh.size, "jax": jax.__version__,
      "date": datetime.date.today().isoformat(),
      "train_img_s": batch / train_s, "eval_img_s": batch / eval_s,
      "train_step_ms": 1e3 * train_s, "eval_step_ms": 1e3 * eval_s,
      "peak_mem_gb": (mem["peak_bytes_in_use"] / 2**30
                      if "peak_bytes_in_use" in mem else None),
      "compile_s": compile_s, "final_loss": loss,
      **({"input": input} if input != "float32" else {}), "state_writes": state_writes,
      **_cost(train_c, "train_xla_"), **_cost(fwd, "eval_xla_"),
  }
  if dev.platform == "gpu":  # records without it compiled without contraction
    record["xla_fma"] = xla_options.fma_in_flags()
  # The Pallas tilings and forms this run used, where they change this model's kernels:
  # rows of one model differ by them.
  with S.batch_mesh(mesh):  # as the step resolved "auto"
    env = kernel_env_of(overrides, model)
  if env:
    record["env"] = env
  if on_record is not None:
    on_record(record)
  if profile_dir:
    try:
      # The profile runs its own compile of the step, with XLA's command buffers (CUDA
      # graphs) off: the trace shows a graph as one event for all its kernels (on the
      # H100, 98 ms of the "block" step's 159 ms was one graph). The same kernels, each
      # launched alone; the timing above keeps XLA's defaults.
      prof_c = step.lower(box["state"], data).compile(PROFILE_COMPILER_OPTIONS)

      def profiled_once():
        box["state"], metrics = prof_c(box["state"], data)
        return jax.block_until_ready(metrics["loss"])
      _profile(profile_dir, profile_steps, profiled_once, prof_c.as_text(), record)
    except Exception as e:  # the profile is extra: the timing above must still come out
      print(f"profiling {model_name} failed, the timing stands: {e!r}", file=sys.stderr)
  return record


# XLA options of the profiled compile: no command buffers, so that every kernel is seen.
PROFILE_COMPILER_OPTIONS = {"xla_gpu_enable_command_buffer": ""}


# Environment variables that change the kernels, and the fuse_d_bn settings they change
# ("shifted_t": fuse_d_bn="none" with d_impl="shifted_t", whose du takes QLHS_DU_FORM).
KERNEL_ENV = {"QLHS_PALLAS_TILING": ("pallas",), "QLHS_BLOCK_TILING": ("block",),
              "QLHS_DU_FORM": ("shifted_t", "pallas", "xla", "block"),
              "QLHS_STATS_FORM": ("xla", "block"), "QLHS_SUMS_FORM": ("xla",),
              "QLHS_DC_PASS": ("xla",), "QLHS_PRODUCT_FORM": ("xla",),
              "QLHS_D_TAPS": ("xla",), "QLHS_D_KERNEL": ("pallas", "xla", "block"),
              "QLHS_C_FORM": ("xla",), "QLHS_DP_FORM": ("xla",),
              "QLHS_WEIGHT_GRADS": ("xla",), "QLHS_DU_SUM": ("xla",),
              "QLHS_P_FORM": ("xla",),
              "QLHS_TAP_COPY": ("xla",),
              "QLHS_STENCIL_TILING": ("shifted_t", "pallas", "xla", "block"),
              "QLHS_STENCIL_GRID": ("shifted_t", "pallas", "xla", "block"),
              "QLHS_STENCIL_ROWS": ("shifted_t", "pallas", "xla", "block"),
              # every model's training-mode BatchNorm (models/common.py)
              "QLHS_BN_STATS": ("none", "shifted_t", "pallas", "xla", "block"),
              # every ResNet-stem model's stem (models/common.py)
              "QLHS_STEM_GRAD": ("none", "shifted_t", "pallas", "xla", "block"),
              "QLHS_STEM_TAPS": ("none", "shifted_t", "pallas", "xla", "block")}


def _expansion(model) -> int:
  """The hidden tensors' expansion e of ``model`` (a QLHSNet's field; 1 for a model
  without one, or none given: every power of two resolves alike)."""
  return getattr(model, "expansion", 1)


def _fuse_of(overrides: dict, model=None) -> str:
  """The KERNEL_ENV key of a model with these ``overrides`` ("auto" resolved as the
  model resolves it for an Eq.(3) block of 64 channels, ``model``'s expansion and
  per-replica BatchNorm on the mesh set by ``steps.batch_mesh``, if any)."""
  fuse = overrides.get("fuse_d_bn", "none")
  if fuse == "auto":
    from qlhs_jax.kernels import d_bn_product as dbn
    fuse = ("xla" if dbn.stencil_on_gpu(64, dbn.batch_shards(), _expansion(model))
            else "none")
  if fuse == "none" and overrides.get("d_impl") == "shifted_t":
    fuse = "shifted_t"
  return fuse


def auto_pallas_forms(overrides: dict, model=None) -> list[str]:
  """The stencil form variables, unset or "auto", that this model uses and that pick
  the Pallas kernels here (``d_bn_product.stencil_on_gpu``): on NVIDIA GPUs (one, or
  the mesh set by ``steps.batch_mesh``, with per-replica BatchNorm), or while
  benchmarks.aot compiles for one."""
  from qlhs_jax.kernels import d_bn_product as dbn
  fuse, e, groups = _fuse_of(overrides, model), _expansion(model), dbn.batch_shards()
  # du has no groups; on a mesh it runs on each device's slice, as the others do.
  resolve = {"QLHS_STATS_FORM": lambda: dbn.stats_form(64, groups),
             "QLHS_SUMS_FORM": lambda: dbn.sums_form(64, groups, e),
             "QLHS_DU_FORM": lambda: ("pallas" if dbn.stencil_on_gpu(64, groups, e)
                                      else "gather")}
  return [k for k, form in resolve.items()
          if fuse in KERNEL_ENV[k] and os.environ.get(k, "") in ("", "auto")
          and form() == "pallas"]


def kernel_env_of(overrides: dict, model=None) -> dict:
  """The KERNEL_ENV variables set now that change the kernels of a model with these
  ``overrides``: what its record must carry besides them. A form left to its default
  that picks the Pallas kernels is recorded as "auto:pallas": records without it ran
  XLA's forms (the default until 2026-11-27). Likewise QLHS_D_TAPS, "auto:copy" where
  its default reads the taps from a padded copy of u (records without it: "pad", the
  form until 2026-12-05), and only where an XLA pass of a block reads them (with every
  pass a Pallas kernel no copy is written)."""
  from qlhs_jax.kernels import d_bn_product as dbn
  fuse = _fuse_of(overrides, model)
  env = {k: os.environ[k] for k, fuses in KERNEL_ENV.items()
         if os.environ.get(k, "") not in ("", "auto") and fuse in fuses}
  env.update({k: "auto:pallas" for k in auto_pallas_forms(overrides, model)})
  if (fuse in KERNEL_ENV["QLHS_D_TAPS"] and "QLHS_D_TAPS" not in env
      and dbn.d_taps() == "copy"
      and any(any(dbn._xla_reads_taps(stride, 64, _expansion(model), dbn.batch_shards()))
              for stride in (1, 2))):  # a block of 64 channels, as _fuse_of resolves
    env["QLHS_D_TAPS"] = "auto:copy"
  return env


@contextlib.contextmanager
def kernel_env(name: str, value: str):
  """``name=value`` in the environment while a step is traced (the kernels read their
  settings then), restored after: one process may trace several settings."""
  old = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = old


def hlo_tag(model_name: str, overrides: dict) -> str:
  """``<model>_<key>-<value>...``: names a model's HLO file and its kernels.jsonl line."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(
      [model_name] + [f"{k}-{v}" for k, v in sorted(overrides.items())])).strip("-")


def write_hlo(hlo_dir: str, model_name: str, overrides: dict, kind: str, text: str):
  """Writes ``text`` to ``hlo_dir/<model>_<key>-<value>...<kind>.hlo.txt.gz``."""
  os.makedirs(hlo_dir, exist_ok=True)
  with gzip.open(os.path.join(hlo_dir, f"{hlo_tag(model_name, overrides)}.{kind}.hlo.txt.gz"),
                 "wt") as f:
    f.write(text)


def _profile(profile_dir, steps, run_once, hlo_text, timing):
  """Traces ``steps`` train steps; appends the per-kernel times, labelled from the
  ``timing`` record of :func:`measure`, to kernels.jsonl."""
  from qlhs_jax.benchmarks import kernel_times
  record = {"tag": hlo_tag(timing["model"], timing["overrides"]),
            **{k: timing[k] for k in ("model", "overrides", "device", "jax",
                                      "train_step_ms")},
            **kernel_times.trace_steps(run_once, steps, hlo_text)}
  append_records(os.path.join(profile_dir, "kernels.jsonl"), [record])  # adds "commit"
  print(f"== profile of {record['tag']} ({record['device']})\n"
        + kernel_times.report(record, hlo_text, record["train_step_ms"]), file=sys.stderr,
        flush=True)


def _cost(compiled, prefix) -> dict:
  """XLA's own estimate of FLOPs and bytes accessed per call (None where unavailable)."""
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {prefix + "gflop": ca.get("flops", float("nan")) / 1e9,
            prefix + "gbytes": ca.get("bytes accessed", float("nan")) / 1e9}
  except Exception:  # cost analysis is best effort across backends and versions
    return {}


# How long a child that has sent its record may go on profiling before it is stopped
# (the profile compiles the step again: ~37 s for Eq.(3) on the H100).
PROFILE_WAIT_S = 120


def run_child(cmd, wait_s: float = PROFILE_WAIT_S) -> dict:
  """Runs ``cmd`` (a ``--json-only`` harness process) and returns the record it prints.
  The child prints the record before it profiles; if it then goes on past ``wait_s``
  seconds it is stopped (the next model must not share the device with it) and the
  record stands. A child that fails before its record raises CalledProcessError."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
  record = None
  for line in proc.stdout:
    try:
      parsed = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(parsed, dict) and "train_img_s" in parsed:
      record = parsed
      break
  if record is None:
    rc = proc.wait()
    raise subprocess.CalledProcessError(rc, cmd)
  try:
    proc.communicate(timeout=wait_s)  # drains stdout, so the child never blocks on it
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    print(f"{record['model']}: its profile ran past {wait_s:.0f} s and was stopped; the "
          f"timing stands", file=sys.stderr, flush=True)
  else:
    if proc.returncode != 0:
      print(f"{record['model']}: exited with {proc.returncode} after its timing (in the "
            f"profile); the timing stands", file=sys.stderr, flush=True)
  return record


def _child(args, model_name, overrides, profile: bool = False) -> dict:
  cmd = [sys.executable, "-m", "qlhs_jax.benchmarks.step", "--model", model_name,
         "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--dtype", args.dtype, "--input", args.input,
         "--state-writes", args.state_writes, "--json-only"]
  if args.hlo_dir:
    cmd += ["--hlo-dir", args.hlo_dir]
  if profile and args.profile_dir:
    cmd += ["--profile-dir", args.profile_dir]
  for kv in overrides:
    cmd += ["--set", kv]
  return run_child(cmd)


def _parse_overrides(items):
  out = {}
  for kv in items:
    if "=" not in kv:
      raise SystemExit(f"--set expects key=value, got {kv!r}")
    k, v = kv.split("=", 1)
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out


def parser() -> argparse.ArgumentParser:
  """The command line of ``main`` (tests read gpu_h100.sh's rows with it)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--vs", default=None, help="a second model timed in the same run")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--input", default="float32", choices=INPUTS,
                 help="uint8: the step normalises and erases uint8 batches, as training "
                      "with config.data.device_normalize does (both models); "
                      "uint8_threefry: with the erased boxes' fills from jax.random "
                      "(config.data.erase_noise=threefry); uint8_randaugment: and "
                      "applies RandAugment's ops first (config.data.device_randaugment)")
  p.add_argument("--state-writes", default="grouped", choices=STATE_WRITES,
                 help="per_leaf: the step writes its new state leaf by leaf and donates "
                      "the old (config.group_state_writes=False)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="model field override for --model, e.g. --set d_impl=grouped")
  p.add_argument("--vs-set", action="append", default=[], metavar="KEY=VALUE",
                 help="model field override for the --vs model")
  p.add_argument("--record", default=None, help="append the records to this JSON-lines file")
  p.add_argument("--hlo-dir", default=None, help="write the compiled train-step HLO here")
  p.add_argument("--profile-dir", default=None,
                 help="trace 3 more train steps of --model (not --vs), compiled without "
                      "XLA's command buffers: per-kernel device time, bytes and GB/s "
                      "(benchmarks.kernel_times), appended to DIR/kernels.jsonl")
  p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  # Before JAX starts (QLHS_XLA_FMA; the --vs children inherit the variable).
  xla_options.request_from_env()
  from qlhs_jax.models import registry
  for name in filter(None, [args.model, args.vs]):
    registry.info(name)  # unknown names fail before any compilation

  if args.json_only:  # a child of --vs: the record goes out before any profile
    measure(args.model, args.batch, args.size, args.steps, args.warmup, args.dtype,
            _parse_overrides(args.set), args.hlo_dir, args.profile_dir,
            on_record=lambda r: print(json.dumps(r), flush=True), input=args.input,
            state_writes=args.state_writes)
    return
  if args.vs:
    records = []
    for i, (name, sets) in enumerate(((args.model, args.set), (args.vs, args.vs_set))):
      # Only the --model is profiled: each profile costs a second compile of the step.
      records.append(_child(args, name, sets, profile=i == 0))
      _announce(records[-1])
    for r in records:
      r["train_ratio_vs"] = {args.vs: records[0]["train_img_s"] / records[1]["train_img_s"]}
      r["eval_ratio_vs"] = {args.vs: records[0]["eval_img_s"] / records[1]["eval_img_s"]}
    _report(args, records)
  else:  # printed and recorded before the profile starts
    measure(args.model, args.batch, args.size, args.steps, args.warmup, args.dtype,
            _parse_overrides(args.set), args.hlo_dir, args.profile_dir,
            on_record=lambda r: _report(args, [r]), input=args.input,
            state_writes=args.state_writes)


def _announce(record):
  """One model of a --vs row, printed as soon as it is timed: a row stopped by its time
  limit while the other model runs (gpu_h100.sh's `timeout`) still leaves the figures
  and the whole record in the log; the table and the results file come at the end."""
  peak = record.get("peak_mem_gb")
  print(f"timed {record['model']}: train {record['train_img_s']:.1f} img/s, eval "
        f"{record['eval_img_s']:.1f} img/s, peak {'-' if peak is None else f'{peak:.2f}'} GB",
        flush=True)
  print(f"record {json.dumps(record)}", flush=True)


def _report(args, records):
  """Prints the table (and the ratio of a --vs run) and appends the records."""
  print(f"{'model':28s} {'device':22s} {'train img/s':>12s} {'eval img/s':>11s} "
        f"{'peak GB':>8s}")
  for r in records:
    mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
    over = " ".join(f"{k}={v}" for k, v in sorted(r["overrides"].items()))
    print(f"{r['model']:28s} {r['device']:22s} {r['train_img_s']:12.1f} "
          f"{r['eval_img_s']:11.1f} {mem:>8s}  {over}")
  if args.vs:
    print(f"ratio {args.model} / {args.vs}: train {records[0]['train_ratio_vs'][args.vs]:.3f}"
          f"  eval {records[0]['eval_ratio_vs'][args.vs]:.3f}  (batch {args.batch}, "
          f"{args.size}px, {args.dtype})")
  sys.stdout.flush()
  if args.record:
    append_records(args.record, records)


def append_records(path: str, records) -> None:
  """Appends ``records`` to the JSON-lines file ``path`` (made with its folder if new),
  each with the ``commit`` it was measured at (``provenance.code_version``)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  commit = code_version()
  with open(path, "a") as f:
    for r in records:
      f.write(json.dumps({**r, "commit": r.get("commit", commit)}) + "\n")


if __name__ == "__main__":
  main()

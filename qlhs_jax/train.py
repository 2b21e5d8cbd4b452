"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

The loop: a jitted data-parallel train step (qlhs_jax.steps) over every device of every
process; validation loss/top-1/top-5 each epoch; orbax checkpoints (last N and best)
holding the train state and the grain iterator state, so a rerun with the same workdir
continues bit-exactly; a workdir guard; SIGTERM saves at the next step boundary and
returns; non-finite steps are skipped inside the step and, when the loop sees one,
it restores the last checkpoint and scales the learning rate (the paper's NaN failure).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qlhs_jax import checkpoint as ckpt_lib
from qlhs_jax import config as config_lib
from qlhs_jax import data as data_lib
from qlhs_jax import steps as S
from qlhs_jax import device_input
from qlhs_jax import provenance
from qlhs_jax import xla_options
from qlhs_jax.kernels import settings as kernel_settings
from qlhs_jax.models import registry

log = logging.getLogger("qlhs_jax")


class NonFiniteTrainingError(RuntimeError):
  """Training kept producing non-finite losses or gradients after every retry."""


# ---------------------------------------------------------------------------------------
# Building blocks shared with checkpoint loading, the harness and the notebooks


def build_model(config, num_classes: int, mesh_size: int = 1, dtype: str | None = None):
  """The Flax module of ``config.model`` with its overrides; per-replica BN groups
  unless ``config.sync_bn``."""
  return registry.create(config.model, num_classes=num_classes,
                         dtype=jnp.dtype(dtype or config.dtype),
                         bn_groups=1 if config.sync_bn else mesh_size,
                         **config_lib.model_overrides(config))


def learning_rate_fn(config) -> Callable:
  """timm's per-epoch cosine with warmup, peak lr scaled linearly with the batch."""
  peak = config.learning_rate * config.batch_size / config.lr_reference_batch
  return functools.partial(S.timm_cosine_lr, base_lr=peak, epochs=config.epochs,
                           warmup_epochs=config.warmup_epochs, warmup_lr=config.warmup_lr,
                           min_lr=config.min_lr)


def make_optimizer(config):
  return S.make_optimizer(config.weight_decay, config.momentum, config.nesterov)


def abstract_train_state(config, num_classes: int | None = None, mesh_size: int = 1,
                         dtype: str | None = None):
  """``(model, tx, abstract TrainState)`` without allocating or reading data."""
  if num_classes is None:
    num_classes = _num_classes(config)
  model = build_model(config, num_classes, mesh_size, dtype)
  tx = make_optimizer(config)
  size = config.data.image_size
  abstract = jax.eval_shape(lambda: S.create_train_state(
      model, tx, jax.random.PRNGKey(0), (size, size, 3)))
  return model, tx, abstract


def _num_classes(config) -> int:
  """Number of classes without opening the dataset where the config tells it."""
  if config.data.name == "digits":
    return 10
  if config.data.name == "imagenet2012":
    return len(data_lib.sources.resolve_wnids(config.data.wnids))
  return data_lib.build_input(config.data, split="validation", global_batch_size=1,
                              seed=0).num_classes


# ---------------------------------------------------------------------------------------
# Evaluation


def _run_eval(eval_input, metrics_fn, mesh) -> dict:
  """One pass over ``eval_input``: sums the per-batch sums on the device, reads once."""
  total = None
  for batch in eval_input.iterator():
    sums = metrics_fn(S.shard_batch(batch, mesh))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  total = jax.device_get(total)
  n = float(total["count"])
  return {"loss": float(total["loss"]) / n, "top1": float(total["top1"]) / n,
          "top5": float(total["top5"]) / n, "count": int(n)}


def evaluate(config, logits_fn: Callable, split: str = "validation") -> dict:
  """Validation loss, top-1, top-5 of ``logits_fn(images) -> logits`` on ``split``
  (for example the BN-folded or transformed weights of a trained model)."""
  mesh = S.make_mesh()
  S.check_batch_divides(config.eval_batch_size, mesh)
  eval_input = data_lib.build_input(
      config.data, split=split, global_batch_size=config.eval_batch_size,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  num_classes = eval_input.num_classes

  @jax.jit
  def metrics_fn(batch):
    logits = logits_fn(batch["image"]).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    loss = S.smoothed_cross_entropy(logits, batch["label"], num_classes,
                                    config.label_smoothing)
    top5 = jnp.any(jax.lax.top_k(logits, min(5, num_classes))[1] ==
                   batch["label"][:, None], -1)
    top1 = jnp.argmax(logits, -1) == batch["label"]
    return {"loss": jnp.sum(loss * mask), "top1": jnp.sum(top1 * mask),
            "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask)}
  return _run_eval(eval_input, metrics_fn, mesh)


# ---------------------------------------------------------------------------------------
# Logging


def launch_record(config: ml_collections.ConfigDict, mesh) -> dict:
  """What one launch of a run ran with: WORKDIR/metrics.jsonl's "launch" record.

  config.json keeps the first launch's runtime keys (``config.RUNTIME_KEYS``), which a
  resume may change; so every launch records its own, with the commit of this checkout
  (None for an installed package), the package versions, the devices and the kernel
  settings in effect (``config.kernels``, else the ``QLHS_*`` variables; empty: the
  defaults): a run's img/s and its results' last digits depend on them."""
  flat = config_lib.flatten(config)
  kinds = sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()})
  return {
      "code": provenance.code_version(),
      "versions": provenance.package_versions(),
      "devices": f"{jax.device_count()} x {', '.join(kinds)}",
      "processes": jax.process_count(),
      "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
      "kernels": kernel_settings.chosen(),
      # Whether the GPU kernels compile with multiply-add contraction (config.xla_fma).
      "xla_fma": xla_options.fma_in_flags() and any(d.platform == "gpu"
                                                      for d in jax.devices()),
      "runtime": {k: flat[k] for k in sorted(config_lib.RUNTIME_KEYS) if k in flat},
  }


class MetricWriter:
  """JSON lines (WORKDIR/metrics.jsonl) and TensorBoard (WORKDIR/tb), process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, split: str, values: dict):
    if not self.enabled:
      return
    rec = {"step": int(step), "split": split, "time": time.time(), **values}
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def event(self, step: int, kind: str, message: str):
    log.warning("step %d: %s: %s", step, kind, message)
    self.write(step, "event", {"event": kind, "message": message})

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class _Progress:
  """A per-epoch progress bar in images (tqdm shows img/s and the ETA)."""

  def __init__(self, enabled: bool, batch: int, steps: int, epochs: int):
    self.enabled, self.batch, self.steps, self.bar = enabled, batch, steps, None
    self.epochs = epochs

  def start(self, epoch: int, done: int):
    if not self.enabled:
      return
    from tqdm import tqdm
    self.close()
    self.bar = tqdm(total=self.steps * self.batch, initial=done * self.batch, unit="img",
                    unit_scale=True, desc=f"epoch {epoch + 1}/{self.epochs}", leave=True, dynamic_ncols=True)

  def update(self, **postfix):
    if self.bar is not None:
      self.bar.update(self.batch)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def _any_process(flag: bool) -> bool:
  """``flag`` of any process, on every process (a collective: all must call it)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


@contextlib.contextmanager
def _sigterm_flag():
  """Sets ``flag.is_set()`` on SIGTERM (main thread only); restores the old handler."""
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  old = signal.signal(signal.SIGTERM, lambda *_: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns the last validation metrics
  with ``status`` ('finished', 'stopped' at stop_after_steps, or 'preempted')."""
  config_lib.validate(config)
  # Before JAX starts its backends, which read XLA_FLAGS once (config.xla_fma).
  xla_options.request_fma(config.xla_fma)
  # Every trace below (the steps, the model) picks its kernels from config.kernels.
  with kernel_settings.use(config.kernels):
    return _train_and_evaluate(config, os.path.abspath(os.path.expanduser(workdir)))


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = S.make_mesh()
  S.check_batch_divides(config.batch_size, mesh)
  S.check_batch_divides(config.eval_batch_size, mesh)
  S.check_fuse_fits_mesh(config.model_overrides.fuse_d_bn, mesh,
                        1 if config.sync_bn else mesh.size)
  pidx, pcount = jax.process_index(), jax.process_count()

  # The data first: a missing dataset fails before any compilation or writing.
  train_input = data_lib.build_input(config.data, split="train",
                                     global_batch_size=config.batch_size,
                                     seed=config.seed, process_index=pidx,
                                     process_count=pcount)
  eval_input = data_lib.build_input(config.data, split="validation",
                                    global_batch_size=config.eval_batch_size,
                                    seed=config.seed, process_index=pidx,
                                    process_count=pcount)
  ckpt_lib.save_or_check_config(workdir, config)
  ckpts = ckpt_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints,
                                  async_save=config.checkpoint_async)
  writer = MetricWriter(workdir, enabled=(pidx == 0))
  try:
    launch = launch_record(config, mesh)
    writer.write(ckpts.latest_step() or 0, "launch", launch)
    log.info("launch: %s on %s; kernel settings %s", launch["versions"],
             launch["devices"], launch["kernels"] or "default")
    if config.eval_only:
      return _eval_only(config, ckpts, eval_input, mesh, writer)
    return _train(config, workdir, train_input, eval_input, ckpts, mesh, writer)
  finally:
    ckpts.wait()
    ckpts.close()
    writer.close()


def _eval_only(config, ckpts, eval_input, mesh, writer) -> dict:
  step = ckpts.best_step() if config.eval_checkpoint == "best" else ckpts.latest_step()
  if step is None:
    raise FileNotFoundError(f"eval_only: no {config.eval_checkpoint} checkpoint in "
                            f"{ckpts.directory}; train first")
  model, _, abstract = abstract_train_state(config, eval_input.num_classes, mesh.size)
  # Restored straight onto the global mesh (any process count, any saved topology).
  state, _ = ckpts.restore(step, ckpt_lib.replicated_target(abstract, mesh))
  eval_step = S.jit_eval_step(S.make_eval_step(
      model, num_classes=eval_input.num_classes,
      label_smoothing=config.label_smoothing), mesh)
  variables = S.replicate({"params": state.params, "batch_stats": state.batch_stats}, mesh)
  metrics = _run_eval(eval_input, functools.partial(eval_step, variables), mesh)
  writer.write(step, "eval_only", metrics)
  log.info("eval of step %d: %s", step, metrics)
  return {**metrics, "step": step, "status": "evaluated"}


def _train(config, workdir, train_input, eval_input, ckpts, mesh, writer) -> dict:
  spe = train_input.steps_per_epoch
  total_steps = config.epochs * spe
  stop_at = min(total_steps, config.stop_after_steps or total_steps)
  num_classes = train_input.num_classes
  model = build_model(config, num_classes, mesh.size)
  tx = make_optimizer(config)
  lr_fn = learning_rate_fn(config)

  # Replicated over the global mesh before any save or restore: in a multi-process run
  # orbax writes and reads global arrays only (it refuses process-local ones).
  state = S.replicate(S.create_train_state(model, tx, jax.random.PRNGKey(config.seed),
                                           train_input.image_shape), mesh)
  train_iter = train_input.iterator()
  latest = ckpts.latest_step()
  if latest is not None:
    state, meta = ckpts.restore(latest, state, train_iter)
    retries = int(meta.get("nan_retries", 0))
    writer.event(latest, "resume", f"resumed from checkpoint at step {latest}")
  else:
    retries = 0
    if config.init_from:
      params, stats = ckpt_lib.load_weights(config.init_from, state, model)
      state = state.replace(params=params, batch_stats=stats)
      writer.event(0, "init_from", f"weights from {config.init_from}")
    # Step 0 is the last good checkpoint should the first epoch go non-finite.
    ckpts.save(0, state, train_iter, {"epoch": 0, "nan_retries": 0})
  state = S.replicate(state, mesh)
  host_step = int(jax.device_get(state.step))
  skipped_seen = int(jax.device_get(state.skipped))

  train_step = S.jit_train_step(S.make_train_step(
      model, tx, lr_fn, num_classes=num_classes, label_smoothing=config.label_smoothing,
      steps_per_epoch=spe, images_fn=device_input.train_images_fn(config.data),
      group_state_writes=config.group_state_writes), mesh)
  eval_step = S.jit_eval_step(S.make_eval_step(
      model, num_classes=num_classes, label_smoothing=config.label_smoothing), mesh)
  progress = _Progress(config.progress_bar and jax.process_index() == 0,
                       config.batch_size, spe, config.epochs)
  pending: list[dict] = []
  last_eval: dict = {}
  status = "finished"
  t_log = time.perf_counter()
  steps_since_log = 0

  def save(step, metrics=None):
    meta = {"epoch": step // spe, "step": step, "nan_retries": retries,
            "metrics": metrics, "model": config.model}
    ckpts.save(step, state, train_iter, meta, metrics=metrics)

  # A SIGTERM reaches the processes of a multi-process run at different steps (or only
  # some of them): they agree on it at log points, so that all save and stop together
  # (one that stopped alone would wait forever in the save's barrier).
  single_process = jax.process_count() == 1
  with _sigterm_flag() as sigterm:
    if host_step < stop_at:
      progress.start(host_step // spe, host_step % spe)
    while host_step < stop_at:
      batch = S.shard_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch)
      host_step += 1
      steps_since_log += 1
      pending.append(metrics)
      end_of_epoch = host_step % spe == 0
      save_now = bool(config.checkpoint_every_steps and
                      host_step % config.checkpoint_every_steps == 0)
      # Every save is preceded by a non-finite check, so a saved state is a good one.
      log_now = (host_step % config.log_every_steps == 0 or end_of_epoch or save_now or
                 host_step == stop_at or (single_process and sigterm.is_set()))
      progress.update()
      if log_now:
        # The only host synchronisation of the step loop.
        fetched = jax.device_get({"m": pending, "skipped": state.skipped})
        pending = []
        skipped = int(fetched["skipped"])
        dt = time.perf_counter() - t_log
        summary = {k: float(np.mean([m[k] for m in fetched["m"]]))
                   for k in ("loss", "accuracy", "lr")}
        summary.update(img_per_s=steps_since_log * config.batch_size / max(dt, 1e-9),
                       epoch=host_step / spe, skipped=skipped)
        t_log, steps_since_log = time.perf_counter(), 0
        writer.write(host_step, "train", summary)
        if progress.bar is not None:
          progress.bar.set_postfix(loss=f"{summary['loss']:.3f}", lr=f"{summary['lr']:.3g}")
        if skipped > skipped_seen:
          retries += 1
          if retries > config.nan_max_retries:
            raise NonFiniteTrainingError(
                f"non-finite loss or gradients at step <= {host_step}, still after "
                f"{config.nan_max_retries} restarts with the learning rate scaled by "
                f"{config.nan_lr_factor} each time. Try a lower --config.learning_rate, "
                "a bounded activation (hardtanh/hardball/softball) or more retries "
                "(--config.nan_max_retries).")
          good = ckpts.latest_step()
          ckpts.wait()
          # The restore target is the global state itself (device_get of it would fail
          # in a multi-process run).
          restored, _ = ckpts.restore(good, state, train_iter)
          factor = config.nan_lr_factor ** retries
          state = S.replicate(restored.replace(
              lr_scale=jnp.asarray(factor, jnp.float32),
              skipped=jnp.asarray(skipped, jnp.int32)), mesh)
          writer.event(host_step, "non_finite",
                       f"{skipped - skipped_seen} non-finite step(s) skipped; restored "
                       f"step {good}, lr scaled by {factor:g} (retry {retries} of "
                       f"{config.nan_max_retries})")
          skipped_seen = skipped
          host_step = good
          progress.start(host_step // spe, host_step % spe)
          continue
      if end_of_epoch:
        progress.close()
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        last_eval = _run_eval(eval_input, functools.partial(eval_step, variables), mesh)
        writer.write(host_step, "validation", {**last_eval, "epoch": host_step // spe})
        log.info("epoch %d/%d: %s", host_step // spe, config.epochs, last_eval)
        save(host_step, {"top1": last_eval["top1"], "top5": last_eval["top5"],
                         "loss": last_eval["loss"]})
        if host_step < stop_at:
          progress.start(host_step // spe, 0)
      elif save_now:
        save(host_step)
      stop = sigterm.is_set() if single_process else (
          log_now and _any_process(sigterm.is_set()))
      if stop and host_step < stop_at:
        if not (end_of_epoch or save_now):
          save(host_step)
        writer.event(host_step, "sigterm", "saved at the step boundary; rerun to resume")
        status = "preempted"
        break
    else:
      if host_step < total_steps:
        status = "stopped"
        if host_step not in ckpts.all_steps():
          save(host_step)
  progress.close()
  ckpts.wait()
  return {**last_eval, "step": host_step, "status": status, "nan_retries": retries}

"""The jitted training and evaluation steps, the optimizer and the learning-rate schedule.

Pure JAX (no data-loading imports), so the throughput harness and the training loop use
this very code. The recipe (design/recipe.md, timm's ResNeXt-50 script as the paper
adapts it): SGD with Nesterov momentum 0.9 and coupled L2 weight decay 1e-4 off biases
and 1-D parameters, label smoothing 0.1, a per-epoch cosine schedule with linear warmup
from 1e-5 that overlaps the cosine.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qlhs_jax.kernels import settings
from qlhs_jax.kernels.d_bn_product import BATCH_AXIS, FORM_VARIABLES

DATA_AXIS = BATCH_AXIS  # the kernels split the batch along it too (d_bn_product)


# ---------------------------------------------------------------------------------------
# Schedule and optimizer


def timm_cosine_lr(epoch, *, base_lr: float, epochs: int, warmup_epochs: int = 5,
                   warmup_lr: float = 1e-5, min_lr: float = 0.0):
  """timm's ``CosineLRScheduler`` stepped per epoch (t_in_epochs, warmup_prefix=False):

  ``epoch < warmup``: ``warmup_lr + epoch * (base_lr - warmup_lr) / warmup``;
  otherwise ``min_lr + (base_lr - min_lr) * (1 + cos(pi * epoch / epochs)) / 2``, and
  ``min_lr`` once ``epoch >= epochs``. ``epoch`` is an integer (array or Python).
  """
  e = jnp.asarray(epoch, jnp.float32)
  warm = warmup_lr + e * (base_lr - warmup_lr) / max(warmup_epochs, 1)
  cos = min_lr + 0.5 * (base_lr - min_lr) * (1 + jnp.cos(math.pi * e / epochs))
  lr = jnp.where(e < warmup_epochs, warm, cos)
  return jnp.where(e >= epochs, min_lr, lr)


def weight_decay_mask(params):
  """timm's rule: no weight decay on biases and on 1-D parameters (BN scales/offsets)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(weight_decay: float = 1e-4, momentum: float = 0.9,
                   nesterov: bool = True) -> optax.GradientTransformation:
  """PyTorch SGD: ``g + wd * p`` into a Nesterov momentum buffer. The learning rate is
  applied by the step (``p -= lr * update``), outside the optimizer state, so the
  schedule and the NaN-recovery scale stay plain numbers in the train state."""
  return optax.chain(optax.add_decayed_weights(weight_decay, weight_decay_mask),
                     optax.trace(decay=momentum, nesterov=nesterov))


def smoothed_cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.1):
  """Per-example cross-entropy against ``(1 - s) * onehot + s / K`` (timm's
  LabelSmoothingCrossEntropy), in float32."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


# ---------------------------------------------------------------------------------------
# State


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint needs to continue bit-exactly (with the data iterator)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array          # raw uint32 key data (checkpoints as a plain array)
  lr_scale: jax.Array     # NaN recovery multiplies it by config.nan_lr_factor
  skipped: jax.Array      # steps whose loss or gradients were not finite (update skipped)


def create_train_state(model, tx, rng, image_shape) -> TrainState:
  """Initialises parameters (He-normal, BN_out scale 0) and the optimizer state."""
  init_rng, state_rng = jax.random.split(rng)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, x, train=False))(init_rng)
  params, stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=tx.init(params), rng=jax.random.key_data(state_rng),
                    lr_scale=jnp.ones((), jnp.float32), skipped=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------------------
# Steps


def _all_finite(tree) -> jax.Array:
  """True where every element of every leaf of ``tree`` is finite.

  One reduction per group of leaves with the same last dimension and dtype: the group's
  leaves as rows, concatenated. XLA fuses each concatenation into its reduction, so the
  guard costs ~15 kernels a step; one reduction per leaf compiled to ~100 kernels of a
  few microseconds each, Eq.(3)'s and ResNet50's alike (NOTES.md experiment 28).
  """
  groups: dict = {}
  for x in jax.tree.leaves(tree):
    x = jnp.asarray(x)
    if x.size:  # an empty leaf is finite; reshape(-1, 0) could not infer its rows
      cols = x.shape[-1] if x.ndim else 1
      groups.setdefault((cols, x.dtype), []).append(x.reshape(-1, cols))
  flags = [jnp.all(jnp.isfinite(jnp.concatenate(rows))) for rows in groups.values()]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


# At most this many leaves of one dtype and size share one select in keep_where. Kernels
# of Eq.(3)'s step compiled for an H100 (benchmarks.aot, jax 0.11.2; per-leaf: 664) with
# groups of at most 2, 3, 4, 5, 6, 8, 10, 12, 16 leaves: 625, 596, 599, 595, 622, 629,
# 656, 704, 766. Past ~5, XLA writes a group's concatenation and slices each leaf out in
# a kernel of its own (NOTES.md experiment 33).
KEEP_GROUP_LEAVES = 4


def keep_where(keep, new, old, *, grouped: bool = True):
  """``jnp.where(keep, a, b)`` for each pair of leaves of ``new`` and ``old`` (trees of
  one structure; ``keep`` a scalar bool).

  ``grouped``: the leaves of one dtype and size, :data:`KEEP_GROUP_LEAVES` at a time, are
  flattened, concatenated, selected once and sliced back: the same values. XLA's GPU
  compiler merges no independent kernels (experiment 28), so a per-leaf select costs the
  train step one small kernel per state leaf (~95 for Eq.(3)); a group's select with
  the update math feeding it compiles to one kernel that writes each leaf (experiment
  33). Donating the old state then makes XLA copy every leaf back into its old buffer,
  which :func:`jit_train_step` avoids by not donating a grouped step's state.
  """
  if not grouped:
    return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)
  new_leaves, treedef = jax.tree.flatten(new)
  old_leaves = treedef.flatten_up_to(old)
  groups: dict = {}
  for i, (a, b) in enumerate(zip(new_leaves, old_leaves)):
    groups.setdefault((jnp.result_type(a, b), np.size(b)), []).append(i)
  out = list(new_leaves)
  for members in groups.values():
    for start in range(0, len(members), KEEP_GROUP_LEAVES):
      chunk = members[start:start + KEEP_GROUP_LEAVES]
      flat = lambda leaves: jnp.concatenate([jnp.ravel(leaves[i]) for i in chunk])
      kept = jnp.where(keep, flat(new_leaves), flat(old_leaves))
      offset = 0
      for i in chunk:
        size = np.size(old_leaves[i])
        out[i] = kept[offset:offset + size].reshape(np.shape(old_leaves[i]))
        offset += size
  return jax.tree.unflatten(treedef, out)


def make_train_step(model, tx, lr_fn: Callable, *, num_classes: int,
                    label_smoothing: float = 0.1, steps_per_epoch: int = 1,
                    images_fn: Callable | None = None, group_state_writes: bool = True):
  """Returns ``train_step(state, batch) -> (state, metrics)`` (not yet jitted).

  ``images_fn(batch)`` gives the model's input (default ``batch["image"]``); the
  training loop passes ``qlhs_jax.device_input.train_images_fn``, which normalises and
  erases uint8 batches on the device.

  ``lr_fn(epoch)`` gives the learning rate of an epoch; the step reads the epoch off
  ``state.step``, so the schedule needs no host. Non-finite loss or gradients skip the
  update inside the step (params, BN statistics and momentum stay as they were) and
  count it in ``state.skipped``: no host synchronisation per step.

  ``group_state_writes``: the new state's leaves are written by a few grouped kernels
  (:func:`keep_where`) and the step's ``donate_state`` attribute is False, which
  :func:`jit_train_step` follows. False: one kernel per leaf, the old state donated.
  Both give the same values up to rounding (XLA fuses the update math around the
  select differently); grouped holds one more copy of the state in memory.
  """

  def train_step(state: TrainState, batch):
    images = batch["image"] if images_fn is None else images_fn(batch)

    def loss_fn(params):
      logits, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                     images, train=True, mutable=["batch_stats"])
      loss = jnp.mean(smoothed_cross_entropy(logits, batch["label"], num_classes,
                                             label_smoothing))
      return loss, (logits, new_vars["batch_stats"])

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    lr = lr_fn(state.step // steps_per_epoch) * state.lr_scale
    new_params = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), state.params,
                              updates)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    params, batch_stats, opt_state = keep_where(
        finite, (new_params, new_stats, new_opt),
        (state.params, state.batch_stats, state.opt_state), grouped=group_state_writes)
    state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
               "lr": lr, "finite": finite.astype(jnp.float32)}
    return state, metrics

  train_step.donate_state = not group_state_writes
  return train_step


def make_eval_step(model, *, num_classes: int, label_smoothing: float = 0.1):
  """Returns ``eval_step(variables, batch) -> sums`` of loss, top-1, top-5 and count
  over the real (``mask``) examples of the batch."""

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, bool)).astype(jnp.float32)
    loss = smoothed_cross_entropy(logits, labels, num_classes, label_smoothing)
    k = min(5, num_classes)
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
    top1 = jnp.argmax(logits, -1) == labels
    return {"loss": jnp.sum(loss * mask), "top1": jnp.sum(top1 * mask),
            "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask)}

  return eval_step


# ---------------------------------------------------------------------------------------
# Sharding: data parallel over every device of every process.


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_divides(global_batch: int, mesh: Mesh):
  n = mesh.size
  if global_batch % n:
    raise ValueError(
        f"the global batch size {global_batch} does not divide by the {n} devices of the "
        f"mesh; choose a multiple of {n} (e.g. --config.batch_size={max(n, global_batch // n * n)})")


def check_fuse_fits_mesh(fuse_d_bn: str | None, mesh: Mesh,
                         bn_groups: int | None = None):
  """Refuses, before any step, kernels that cannot run on this mesh (training and the
  throughput harness). fuse_d_bn='block' is one device's kernels. fuse_d_bn='pallas'
  and the stencil forms' Pallas kernels (QLHS_*_FORM=pallas...) run on several devices
  on each device's slice of the batch (``d_bn_product``'s shard_map), which needs
  ``bn_groups`` (None: per-replica BatchNorm, one group per device) a multiple of the
  devices."""
  if mesh.size == 1:
    return
  if fuse_d_bn == "block":
    raise ValueError(f"model_overrides.fuse_d_bn='block' runs on one device; this mesh "
                     f"has {mesh.size}. Use fuse_d_bn='xla' or 'auto' (any mesh) or run "
                     f"on one device")
  groups = mesh.size if bn_groups is None else bn_groups
  asked = [f"{settings.name(var)}={settings.get(var)}" for var in FORM_VARIABLES
           if settings.get(var).startswith("pallas")]
  if fuse_d_bn == "pallas":
    asked.insert(0, "model_overrides.fuse_d_bn='pallas'")
  if asked and groups % mesh.size:
    raise ValueError(f"{', '.join(asked)} runs Pallas kernels on each device's slice of "
                     f"the batch, but {groups} BatchNorm group(s) do not split over the "
                     f"{mesh.size} devices of this mesh. Use per-replica BatchNorm "
                     f"(config.sync_bn=False, the default), or XLA's forms (unset those "
                     f"keys or variables; fuse_d_bn='xla' or 'auto')")


@contextlib.contextmanager
def batch_mesh(mesh: Mesh):
  """``mesh`` as the abstract mesh of what is traced inside: the model's fused blocks
  read it to run their Pallas kernels on each device's slice of the batch
  (``d_bn_product.batch_shards``). Nothing where JAX lacks ``use_abstract_mesh`` or
  ``shard_map`` (the kernels then stay off on several devices)."""
  use = getattr(jax.sharding, "use_abstract_mesh", None)
  if use is None or not hasattr(jax, "shard_map"):
    yield
    return
  with use(mesh.abstract_mesh):
    yield


def shard_batch(batch, mesh: Mesh):
  """Places this process's slice of the global batch: leading axis over the mesh."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def jit_train_step(train_step, mesh: Mesh):
  """jit with the state replicated and the batch split over the data axis. The state
  is donated where the step says so (``train_step.donate_state``, default True)."""
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(DATA_AXIS))

  @functools.wraps(train_step)  # keeps the name: profiles show "jit_train_step"
  def on_mesh(state, batch):
    with batch_mesh(mesh):
      return train_step(state, batch)
  return jax.jit(on_mesh, in_shardings=(repl, data), out_shardings=(repl, repl),
                 donate_argnums=0 if getattr(train_step, "donate_state", True) else ())


def jit_eval_step(eval_step, mesh: Mesh):
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(eval_step, in_shardings=(repl, data), out_shardings=repl)


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))

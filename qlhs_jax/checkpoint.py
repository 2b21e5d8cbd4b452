"""Checkpoints of a run: one orbax checkpoint per save holds the train state (params,
BN statistics, optimizer state, step, RNG, lr scale), the grain iterator state and a
small JSON record (epoch, metrics). Layout of a workdir::

  WORKDIR/config.json          the resolved config of the run (guards the workdir)
  WORKDIR/checkpoints/<step>/  orbax: items "state", "data", "meta"
  WORKDIR/metrics.jsonl        one JSON record per log line, event and launch
  WORKDIR/tb/                  TensorBoard event files

The manager keeps the last ``keep_checkpoints`` saves and the best by validation top-1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from qlhs_jax import config as config_lib
from qlhs_jax import steps

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model it is loaded into."""


def _top1(metrics) -> float:
  return float(metrics["top1"])


class RunCheckpoints:
  """The orbax CheckpointManager of one workdir."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    policy = ocp_policies.AnyPreservationPolicy([
        ocp_policies.LatestN(n=keep),
        ocp_policies.BestN(get_metric_fn=_top1, reverse=False, n=1,
                           keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save,
        read_only=read_only, create=not read_only)
    import grain
    # Naming the handler of every item lets a fresh manager (a resumed run, load_run)
    # read metadata and restore items it has not saved itself.
    registry = ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler(),
        data=grain.checkpoint.CheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=registry)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the highest validation top-1 among the kept checkpoints."""
    best, best_top1 = None, -1.0
    for step in self.all_steps():
      meta = self.meta(step)
      top1 = (meta.get("metrics") or {}).get("top1")
      if top1 is not None and top1 > best_top1:
        best, best_top1 = step, top1
    return best

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  def save(self, step: int, state, data_iterator, meta: dict,
           metrics: dict | None = None, force: bool = True):
    from qlhs_jax import data as data_lib
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      args["data"] = data_lib.checkpoint_save_args(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Returns ``(state, meta)``; sets ``data_iterator``'s state in place."""
    from qlhs_jax import data as data_lib
    self.check_compatible(step, abstract_state)
    args = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      args["data"] = data_lib.checkpoint_restore_args(data_iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out.state, out.meta

  def state_metadata(self, step: int):
    return self.manager.item_metadata(step)["state"]

  def check_compatible(self, step: int, abstract_state, subtrees=None):
    """Raises CheckpointMismatchError naming every missing, extra or reshaped array."""
    saved = _shapes(self.state_metadata(step))
    want = _shapes(abstract_state)
    if subtrees is not None:
      keep = lambda d: {k: v for k, v in d.items() if k.split("/")[0] in subtrees}
      saved, want = keep(saved), keep(want)
    problems = []
    for k in sorted(set(want) - set(saved)):
      problems.append(f"missing in checkpoint: {k} {want[k]}")
    for k in sorted(set(saved) - set(want)):
      problems.append(f"not in this model: {k} {saved[k]}")
    for k in sorted(set(saved) & set(want)):
      if tuple(saved[k]) != tuple(want[k]):
        problems.append(f"shape of {k}: checkpoint {tuple(saved[k])}, model {tuple(want[k])}")
    if problems:
      shown = "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more"
                                            if len(problems) > 20 else "")
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not fit this model "
          f"({len(problems)} mismatches):\n  {shown}\nIs it a checkpoint of another model "
          "or of other widths/depths/num_classes? Use the config it was trained with.")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def replicated_target(abstract, mesh=None):
  """``abstract`` with every leaf replicated over ``mesh`` (default: all devices).

  orbax restores a leaf without a sharding onto the devices it was saved from, and
  refuses when they differ (a checkpoint of a pod slice or of another process count);
  an explicit target sharding restores it onto this topology.
  """
  sharding = jax.sharding.NamedSharding(mesh or steps.make_mesh(),
                                        jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract)


def _shapes(tree) -> dict[str, tuple]:
  """``{"params/stage1_block0/c": shape}`` for every array leaf of a (metadata) tree."""
  if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
    tree = {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  for path, leaf in leaves:
    if hasattr(leaf, "shape"):
      key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))))
                     for p in path)
      out[key] = tuple(leaf.shape)
  return out


# ---------------------------------------------------------------------------------------
# The workdir's config guard


# What a key meant in runs saved before it existed, where that was not "unset" (None,
# which config.differences assumes): such runs normalised their train images on the
# host, so resuming one bit-exactly needs --config.data.device_normalize=False, which
# the workdir guard then names. RandAugment ran on the host before
# data.device_randaugment existed, as it does with the key False. Erased boxes' fills
# on the device came from jax.random before data.erase_noise existed.
_ABSENT_MEANT = {"data.device_normalize": False, "data.device_randaugment": False,
                 "data.erase_noise": "threefry"}


def _read_config_file(path: str) -> dict:
  """A run's flattened config.json, with :data:`_ABSENT_MEANT` for keys it predates."""
  with open(path) as f:
    return {**_ABSENT_MEANT, **json.load(f)}


def save_or_check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """First run: writes WORKDIR/config.json. Later runs: refuses a different config
  (runtime keys such as stop_after_steps excepted) unless allow_config_change, in which
  case the old file is kept as config.<time>.json. Only process 0 writes."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = config_lib.flatten(config)
  if os.path.exists(path):
    saved = _read_config_file(path)
    diff = config_lib.differences(saved, current)
    key = "model_overrides.hidden_layout"
    layouts = [d.get(key) or "j_major" for d in (saved, current)]
    if layouts[0] != layouts[1]:
      # Same shapes, permuted meaning: a resumed state would load silently and wrongly.
      raise ValueError(
          f"workdir {workdir} holds a run with hidden_layout={layouts[0]!r}, this config "
          f"has {layouts[1]!r}; a run cannot change it (not even with "
          "allow_config_change). Start a new --workdir with "
          f"--config.init_from={workdir}: init_from converts the weights.")
    if diff and not config.allow_config_change:
      lines = "\n  ".join(f"{k}: saved {saved.get(k, '<absent>')!r}, now "
                          f"{current.get(k, '<absent>')!r}" for k in diff)
      raise ValueError(
          f"workdir {workdir} holds a run with a different config:\n  {lines}\n"
          "Use a new --workdir, or pass --config.allow_config_change=True to continue "
          "this run with the new config (the old config is kept beside it).")
    if diff and jax.process_index() == 0:
      shutil.copy(path, os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json"))
    elif not diff:
      return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(current, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (from WORKDIR/config.json)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a qlhs_jax workdir "
                            "(written by python -m qlhs_jax.main)?")
  flat = _read_config_file(path)
  c = config_lib.base_config()
  for key, value in flat.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = tuple(value) if isinstance(value, list) else value
  return c


# ---------------------------------------------------------------------------------------
# Loading a run for inference, and weights for init_from


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  model: Any
  variables: dict
  step: int
  meta: dict


def load_run(workdir: str, which: str = "latest", dtype: str | None = None) -> Run:
  """Loads a run's model and weights: ``which`` is 'latest', 'best' or a step number."""
  from qlhs_jax import train  # the model and state are built exactly as training does
  config = load_config(workdir)
  ckpts = RunCheckpoints(workdir, read_only=True)
  if which == "latest":
    step = ckpts.latest_step()
  elif which == "best":
    step = ckpts.best_step()
  else:
    step = int(which)
  if step is None:
    raise FileNotFoundError(f"no {which} checkpoint in {ckpts.directory}")
  model, _, abstract = train.abstract_train_state(config, dtype=dtype)
  state, meta = ckpts.restore(step, replicated_target(abstract))
  return Run(config, model, {"params": state.params, "batch_stats": state.batch_stats},
             step, meta)


def load_weights(path: str, abstract_state, model=None):
  """``init_from``: params and batch_stats from a workdir (latest step) or a checkpoint
  step directory; errors name every mismatch with ``abstract_state``.

  With ``model``, a QLHS model whose ``hidden_layout`` differs from the source run's
  (read from its config.json; j-major when absent) gets converted weights: the two
  layouts have equal shapes, so nothing else would notice."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    ckpts, step = RunCheckpoints(path, read_only=True), None
  elif os.path.basename(os.path.dirname(path)) == CHECKPOINT_DIR and \
      os.path.basename(path).isdigit():
    ckpts = RunCheckpoints(os.path.dirname(os.path.dirname(path)), read_only=True)
    step = int(os.path.basename(path))
  else:
    raise FileNotFoundError(
        f"init_from={path}: expected a workdir (with {CHECKPOINT_DIR}/) or a checkpoint "
        f"step directory (WORKDIR/{CHECKPOINT_DIR}/<step>)")
  step = ckpts.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"init_from={path}: no checkpoint in {ckpts.directory}")
  ckpts.check_compatible(step, abstract_state, subtrees=("params", "batch_stats"))
  restored = ckpts.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  params, stats = restored.state.params, restored.state.batch_stats
  want = getattr(model, "hidden_layout", None)
  if want is not None:
    src_dir = os.path.dirname(ckpts.directory)
    src = "j_major"
    if os.path.exists(os.path.join(src_dir, CONFIG_FILE)):
      src = load_config(src_dir).model_overrides.hidden_layout or "j_major"
    if src != want:
      from qlhs_jax.models.layout import convert_hidden_layout
      # Under jit: the restored arrays are global (multi-process) and stay so.
      conv = jax.jit(lambda v: convert_hidden_layout(model, v, to=want))(
          {"params": params, "batch_stats": stats})
      params, stats = conv["params"], conv["batch_stats"]
  return params, stats

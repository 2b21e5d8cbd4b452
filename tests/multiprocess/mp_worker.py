"""One JAX process of the two-process training test (test_multiprocess_train.py).

  python mp_worker.py OUT_PREFIX [qlhs_jax.main flags ...]

Runs ``qlhs_jax.main`` (which calls ``jax.distributed.initialize()`` for
``--config.distributed=True`` or QLHS_DISTRIBUTED=1) with test-only wrappers: one
records a fingerprint of every training example the train step consumes, one keeps the
parameters that go into the first step and come out of the last, one keeps the result
of ``train_and_evaluate``. Writes ``OUT_PREFIX.p<process>.json`` (result, fingerprints
per step) and ``.npz`` (parameters).
"""

import hashlib
import json
import sys

import jax
import numpy as np

from qlhs_jax import steps as S


def fingerprint(image, label) -> str:
  """The identity of one augmented example: its float32 pixels and its label."""
  h = hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes())
  h.update(np.int32(label).tobytes())
  return h.hexdigest()


def local_copy(tree):
  """Host copy of a replicated global tree (this process's first shard of each leaf);
  fails if this process's devices disagree."""
  def leaf(x):
    shards = [np.asarray(s.data) for s in x.addressable_shards]
    for s in shards[1:]:
      if not np.array_equal(s, shards[0]):
        raise AssertionError("the local devices of one process hold different values")
    return shards[0]
  return jax.tree.map(leaf, tree)


def flat(tree) -> dict:
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main():
  out_prefix, argv = sys.argv[1], [sys.argv[0]] + sys.argv[2:]
  consumed = []   # per train step: fingerprints of this process's rows, in order
  states = {}

  shard_batch = S.shard_batch

  def recording_shard_batch(batch, mesh):
    if "mask" not in batch:  # validation batches carry a mask; train batches do not
      consumed.append([fingerprint(i, l) for i, l in zip(batch["image"], batch["label"])])
    return shard_batch(batch, mesh)

  jit_train_step = S.jit_train_step

  def recording_jit_train_step(train_step, mesh):
    jitted = jit_train_step(train_step, mesh)

    def step(state, batch):
      if "first" not in states:  # copied before the step donates its buffers
        states["first"] = local_copy(state.params)
      state, metrics = jitted(state, batch)
      states["last"] = state.params
      return state, metrics
    return step

  from qlhs_jax import train
  train_and_evaluate = train.train_and_evaluate

  def recording_train_and_evaluate(config, workdir):
    states["result"] = train_and_evaluate(config, workdir)
    return states["result"]

  S.shard_batch = recording_shard_batch
  S.jit_train_step = recording_jit_train_step
  train.train_and_evaluate = recording_train_and_evaluate

  from qlhs_jax import main as qmain
  qmain.FLAGS(argv)
  qmain.main([argv[0]])

  pid = jax.process_index()
  arrays = {}
  if "first" in states:
    arrays.update({"first" + k: v for k, v in flat(states["first"]).items()})
    arrays.update({"last" + k: v for k, v in flat(local_copy(states["last"])).items()})
  np.savez(f"{out_prefix}.p{pid}.npz", **arrays)
  with open(f"{out_prefix}.p{pid}.json", "w") as f:
    json.dump({"process_index": pid, "process_count": jax.process_count(),
               "local_devices": jax.local_device_count(), "devices": jax.device_count(),
               "result": states["result"], "consumed": consumed}, f)


if __name__ == "__main__":
  main()

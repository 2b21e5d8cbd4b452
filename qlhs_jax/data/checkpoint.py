"""Saving the iterator state in the same orbax checkpoint as the model.

grain ships an orbax ``CheckpointHandler`` with the argument types
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``; each JAX process writes its
own ``process_<i>-of-<n>.json``. With an ``ocp.CheckpointManager``::

  it = train_input.iterator()
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=checkpoint_save_args(it)))
  ...
  it = train_input.iterator()            # a fresh iterator of the same Input
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=checkpoint_restore_args(it)))
  # `it` (also restored.data) now yields the batches that followed the saved step.
"""

from __future__ import annotations

import grain


def checkpoint_save_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
  """Orbax save args for ``iterator``'s state (an item of ``ocp.args.Composite``)."""
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(
    iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
  """Orbax restore args that set ``iterator``'s state in place from the checkpoint."""
  return grain.checkpoint.CheckpointRestore(iterator)

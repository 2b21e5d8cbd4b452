"""Command line: ``python -m qlhs_jax.main --config=configs/eq3.py --workdir=DIR``.

Only parses flags; the work is ``qlhs_jax.train.train_and_evaluate(config, workdir)``.
Config files are ml_collections config files; any key can be overridden with
``--config.key=value`` (e.g. ``--config.batch_size=128``).
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
config_flags.DEFINE_config_file("config", None, "A config file from configs/, e.g. "
                                "configs/eq3.py:hardball_ds or configs/quickstart.py.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed():
  """``jax.distributed.initialize()``: Cloud TPU VMs, SLURM, Open MPI and Kubernetes
  are detected by JAX; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
  import jax
  # JAX reads JAX_COORDINATOR_ADDRESS itself but not the process count and id.
  kwargs = {}
  for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(env):
      kwargs[arg] = int(os.environ[env])
  jax.distributed.initialize(**kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  # XLA_FLAGS before anything may start JAX's backends (train_and_evaluate asks again).
  from qlhs_jax import xla_options
  xla_options.request_fma(config.xla_fma)
  if config.distributed or os.environ.get("QLHS_DISTRIBUTED") == "1":
    initialize_distributed()
  # orbax and grain log every checkpoint step at INFO through absl; keep ours only.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("qlhs_jax").setLevel(logging.INFO)
  from qlhs_jax import train
  result = train.train_and_evaluate(config, FLAGS.workdir)
  print({k: v for k, v in result.items()})
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())

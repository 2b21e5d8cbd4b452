"""A real multi-process run: two JAX processes on localhost, two CPU devices each.

Both run ``python -m qlhs_jax.main``'s code (``jax.distributed.initialize``, gloo
collectives between the processes) on the embedded digits with per-process data
sharding. The first run is started as ``--config.distributed=True`` with
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, and stopped early by a
SIGTERM to process 1 only (a preemption notice that reaches one host): both processes
must save the same step and exit. The second resumes in the same workdir across the end
of the first epoch (22 steps of 64) into the second, started as srun would start it
(QLHS_DISTRIBUTED=1 and the SLURM_* variables of two tasks on one node, which JAX's
cluster detection reads). Last, both evaluate the best checkpoint (eval_only).

Checked: both processes hold identical parameters; the batches they consumed are the
pipeline's (the p-th slice of every global batch of the epoch's permutation), so
together they consumed each example of the epoch exactly once; the resumed run starts
from exactly the state the first one saved; eval_only reproduces the saved validation
numbers; the checkpoint loads on another topology (this process, 8 devices) with the
same parameters.
"""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from mp_worker import fingerprint
from qlhs_jax import checkpoint as ckpt_lib
from qlhs_jax import config as qconfig
from qlhs_jax import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp_worker.py")
PROCESSES, LOCAL_DEVICES = 2, 2
BATCH, SEED = 64, 0          # 22 steps per epoch on the 1,437 training digits
FLAGS = ["--config.data.image_size=16", "--config.model_overrides.widths=(4,8)",
         "--config.model_overrides.depths=(1,1)", f"--config.batch_size={BATCH}",
         "--config.progress_bar=False", "--config.log_every_steps=5"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_processes(tmp_path, workdir: str, tag: str, stop_after: int, slurm: bool,
                   sigterm_to: int | None = None, extra=()) -> list[dict]:
  """Starts both processes, waits for both; returns what each recorded. With
  ``sigterm_to``, sends that process a SIGTERM once the run has logged a train step."""
  port = _free_port()
  procs, logs = [], []
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("SLURM_", "JAX_", "QLHS_"))}
  for pid in range(PROCESSES):
    env = {**base,
           "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get(
               "PYTHONPATH")] if p]),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
           "JAX_PLATFORMS": "cpu",
           # Cross-process collectives on CPUs need gloo (the default has none).
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    flags = [f"--config={REPO}/configs/quickstart.py", f"--workdir={workdir}",
             f"--config.stop_after_steps={stop_after}", *FLAGS, *extra]
    if slurm:  # what srun gives task `pid` of a 2-task step on one node
      env.update(QLHS_DISTRIBUTED="1", SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost",
                 SLURM_NTASKS=str(PROCESSES), SLURM_PROCID=str(pid),
                 SLURM_LOCALID=str(pid), SLURM_STEP_NUM_NODES="1",
                 JAX_COORDINATOR_PORT=str(port))
    else:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(pid))
      flags.append("--config.distributed=True")
    log = open(tmp_path / f"{tag}.p{pid}.log", "w")
    logs.append(log)
    procs.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path / tag), *flags],
                                  cwd=str(tmp_path), env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
  deadline = time.time() + 240
  metrics = os.path.join(workdir, "metrics.jsonl")
  try:
    # A process that fails leaves its peer waiting in a collective: stop both then.
    while time.time() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      if (sigterm_to is not None and os.path.exists(metrics) and
          '"train"' in open(metrics).read()):
        procs[sigterm_to].send_signal(signal.SIGTERM)
        sigterm_to = None
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for log in logs:
      log.close()
  codes = [p.returncode for p in procs]
  if codes != [0] * PROCESSES:
    tails = "\n".join(f"--- process {i} (exit {c}):\n" +
                      (tmp_path / f"{tag}.p{i}.log").read_text()[-4000:]
                      for i, c in enumerate(codes))
    raise AssertionError(f"{tag}: the processes failed or timed out\n{tails}")
  out = []
  for pid in range(PROCESSES):
    rec = json.loads((tmp_path / f"{tag}.p{pid}.json").read_text())
    arrays = np.load(tmp_path / f"{tag}.p{pid}.npz")
    rec["first"] = {k[len("first"):]: arrays[k] for k in arrays.files if k.startswith("first")}
    rec["last"] = {k[len("last"):]: arrays[k] for k in arrays.files if k.startswith("last")}
    out.append(rec)
  return out


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _example_index(inp, epoch: int) -> dict:
  """Fingerprint of each training example as augmented in ``epoch`` -> its index.

  Computed per example from the documented augmentation seed
  ``default_rng([2, seed, epoch, index])``, independently of any batching."""
  ex = inp.examples
  assert ex.device_normalize  # the training configs': the batches carry uint8 images
  table = {}
  for i in range(inp.num_examples):
    example = ex.transform.device_example(ex.source.read(i),
                                          np.random.default_rng([2, SEED, epoch, i]))
    table[fingerprint(example["image"], ex.source.labels[i])] = i
  assert len(table) == inp.num_examples  # fingerprints tell every example apart
  return table


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  workdir = str(tmp_path / "run")
  first = _run_processes(tmp_path, workdir, "first", stop_after=200, slurm=False,
                         sigterm_to=1)
  events = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  stopped = [e["step"] for e in events if e.get("event") == "sigterm"]
  assert len(stopped) == 1, events
  k = stopped[0]  # the log point (every 5 steps) where both agreed to stop
  assert k % 5 == 0 and ckpt_lib.RunCheckpoints(workdir, read_only=True).latest_step() == k
  end = max(24, k + 4)  # across the end of the first epoch (22 steps)
  second = _run_processes(tmp_path, workdir, "second", stop_after=end, slurm=True)

  for rec in first + second:
    assert (rec["process_count"], rec["local_devices"], rec["devices"]) == (
        PROCESSES, LOCAL_DEVICES, PROCESSES * LOCAL_DEVICES)
  assert [len(r["consumed"]) for r in first + second] == [k, k, end - k, end - k]
  assert all(r["result"]["status"] == "preempted" and r["result"]["step"] == k
             for r in first)
  assert all(r["result"]["status"] == "stopped" and r["result"]["step"] == end
             for r in second)

  # Identical parameters in both processes, after the first run and after the resume;
  # training moved them (the comparisons are not vacuous).
  for run in (first, second):
    assert _same(run[0]["first"], run[1]["first"])
    assert _same(run[0]["last"], run[1]["last"])
    assert not _same(run[0]["first"], run[0]["last"])
  # The resumed run starts from exactly the state the first one ended with.
  assert _same(second[0]["first"], first[0]["last"])

  # The batches each process consumed: the p-th slice of every global batch, in the
  # order of the epoch's permutation.
  config = qconfig.apply_quickstart(qconfig.base_config())
  config.data.image_size = 16
  inp = data_lib.build_input(config.data, split="train", global_batch_size=BATCH, seed=SEED)
  spe, local = inp.steps_per_epoch, BATCH // PROCESSES
  assert spe == 22
  tables = [_example_index(inp, e) for e in range((end - 1) // spe + 1)]
  seen = collections.Counter()
  for pid in range(PROCESSES):
    steps = first[pid]["consumed"] + second[pid]["consumed"]
    for step, rows in enumerate(steps):
      epoch, s = divmod(step, spe)
      indices = [tables[epoch][fp] for fp in rows]
      start = s * BATCH + pid * local
      np.testing.assert_array_equal(indices, inp.examples.permutation(epoch)[start:start + local],
                                    err_msg=f"process {pid}, step {step}")
      if epoch == 0:
        seen.update(indices)
  # Together, each example of the first epoch exactly once (the last 1437 mod 64 = 29
  # examples of the permutation are dropped, as documented).
  assert len(seen) == spe * BATCH and set(seen.values()) == {1}

  # The workdir: metrics from process 0 only, the resume, one validation pass per epoch
  # over all 360 digits split across the processes.
  events = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [e["step"] for e in events if e.get("event") == "resume"] == [k]
  val = [e for e in events if e["split"] == "validation"]
  assert [(e["step"], e["count"]) for e in val] == [(s, 360) for s in range(spe, end + 1, spe)]
  train_steps = [e["step"] for e in events if e["split"] == "train"]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == end

  # eval_only on both processes: the best checkpoint (an end of epoch) restored onto the
  # global mesh gives the validation numbers recorded when it was saved.
  best = max(val, key=lambda e: e["top1"])
  evals = _run_processes(tmp_path, workdir, "eval", stop_after=end, slurm=False,
                         extra=["--config.eval_only=True", "--config.eval_checkpoint=best"])
  for rec in evals:
    r = rec["result"]
    assert (r["status"], r["step"], r["count"]) == ("evaluated", best["step"], 360)
    assert abs(r["top1"] - best["top1"]) < 1e-9 and abs(r["loss"] - best["loss"]) < 1e-5

  # The checkpoint of the two-process run loads in this single process (8 devices).
  run = ckpt_lib.load_run(workdir)
  assert run.step == end and jax.device_count() == 8
  params = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(run.variables["params"])[0]}
  assert _same(params, second[0]["last"])

"""launch/*.sh: the commands their dry runs print, their argument checks, a real
single-host run on the CPU, and the SLURM batch script run against a stand-in srun."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
LATENCY = "--xla_gpu_enable_latency_hiding_scheduler=true"
TINY = ["--config.data.image_size=16", "--config.model_overrides.widths=(4,8)",
        "--config.model_overrides.depths=(1,1)", "--config.progress_bar=False"]


def launch(script, *args, env=None, cwd=REPO):
  # XLA_FLAGS from conftest would be appended to the scripts' own: start without it.
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=cwd,
                        env={**base, **(env or {})}, capture_output=True, text=True,
                        timeout=300)


def lines(out: str) -> list[list[str]]:
  return [shlex.split(l) for l in out.splitlines() if l and not l.startswith("#")]


# ---------------------------------------------------------------------------------------
# One GPU host


def test_single_gpu_dry_run_prints_the_command(tmp_path):
  wd = str(tmp_path / "run")
  p = launch("single_gpu.sh", "--config=configs/eq3.py:hardball_ds", f"--workdir={wd}",
             "--gpus=0,1", "--dry-run", "--", "--config.batch_size=128",
             "--config.model_overrides.widths=(64, 128, 256, 512)")
  assert p.returncode == 0, p.stderr
  assert lines(p.stdout) == [[
      "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", f"XLA_FLAGS={LATENCY}",
      "PYTHONUNBUFFERED=1", "CUDA_VISIBLE_DEVICES=0,1", "python3", "-m",
      "qlhs_jax.main", "--config=configs/eq3.py:hardball_ds", f"--workdir={wd}",
      "--config.batch_size=128", "--config.model_overrides.widths=(64, 128, 256, 512)"]]
  assert not os.path.exists(wd)  # a dry run runs nothing
  # All GPUs unless --gpus; the user's XLA_FLAGS are kept after ours.
  p = launch("single_gpu.sh", "--config=configs/eq3.py", f"--workdir={wd}", "--dry-run",
             env={"XLA_FLAGS": "--xla_dump_to=/tmp/hlo"})
  cmd = lines(p.stdout)[0]
  assert f"XLA_FLAGS={LATENCY} --xla_dump_to=/tmp/hlo" in cmd
  assert not any(a.startswith("CUDA_VISIBLE_DEVICES") for a in cmd)


def test_single_gpu_runs_the_training_on_the_cpu(tmp_path):
  """The printed command is the one that runs: a tiny quickstart for 2 steps."""
  wd = str(tmp_path / "run")
  p = launch("single_gpu.sh", "--config=configs/quickstart.py", f"--workdir={wd}",
             f"--python={sys.executable}", "--", *TINY, "--config.stop_after_steps=2",
             env={"JAX_PLATFORMS": "cpu",
                  "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get(
                      "PYTHONPATH")]))})
  assert p.returncode == 0, p.stdout + p.stderr
  assert p.stdout.startswith("env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 ")
  assert "'step': 2, 'status': 'stopped'" in p.stdout
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["0", "2"]


# ---------------------------------------------------------------------------------------
# Cloud TPU pod slice


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  wd = "/mnt/shared/runs/eq3"
  p = launch("tpu_pod.sh", "--tpu=my-v4-32", "--zone=us-central2-b",
             "--project=my-project", "--config=configs/eq3.py:hardball_ds",
             f"--workdir={wd}", "--setup", "--dry-run", "--", "--config.batch_size=1024",
             "--config.model_overrides.widths=(64, 128)")
  assert p.returncode == 0, p.stderr
  cmds = lines(p.stdout)
  where = ["--zone=us-central2-b", "--worker=all", "--project=my-project"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32", *where]
  assert cmds[0] == ssh + ["--command=mkdir -p qlhs_jax"]
  assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", *where] + [
      os.path.join(REPO, f) for f in ("pyproject.toml", "README.md", "qlhs_jax", "configs")
  ] + ["my-v4-32:qlhs_jax/"]
  assert cmds[2] == ssh + ["--command=cd qlhs_jax && pip install -q -U 'jax[tpu]' && "
                           "pip install -q -e ."]
  assert cmds[3][:-1] == ssh and len(cmds) == 4
  # The remote shell splits the command into exactly these words, on every worker.
  remote = shlex.split(cmds[3][-1][len("--command="):])
  assert remote == ["cd", "qlhs_jax", "&&", "QLHS_DISTRIBUTED=1", "PYTHONUNBUFFERED=1",
                    "python3", "-m", "qlhs_jax.main", "--config=configs/eq3.py:hardball_ds",
                    f"--workdir={wd}", "--config.batch_size=1024",
                    "--config.model_overrides.widths=(64, 128)"]
  # Without --setup and --project: the training command only, gcloud's default project.
  p = launch("tpu_pod.sh", "--tpu=t1", "--zone=europe-west4-a", "--config=configs/eq5.py",
             "--workdir=/mnt/runs/eq5", "--dry-run")
  assert [c[:8] for c in lines(p.stdout)] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--zone=europe-west4-a",
       "--worker=all"]]
  assert len(lines(p.stdout)[0]) == 9


# ---------------------------------------------------------------------------------------
# SLURM


def _batch_script(stdout: str) -> tuple[str, str, list[str]]:
  """(path, script, sbatch command) from slurm.sh --dry-run."""
  head, rest = stdout.split("\n", 1)
  script, submit = rest.split("# submit:\n")
  return head[2:-1], script, shlex.split(submit)


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_slurm_dry_run_prints_the_batch_script(tmp_path, per):
  wd = str(tmp_path / "runs" / "eq3")
  p = launch("slurm.sh", "--config=configs/eq3.py:hardball_ds", f"--workdir={wd}",
             "--nodes=2", "--gpus_per_node=4", f"--per={per}", "--partition=gpu",
             "--time=24:00:00", "--dry-run", "--", "--config.batch_size=512")
  assert p.returncode == 0, p.stderr
  path, script, submit = _batch_script(p.stdout)
  assert path == os.path.join(wd, "qlhs.sbatch") and submit == ["sbatch", path]
  assert not os.path.exists(wd)
  directives = [l.split(" ", 1)[1] for l in script.splitlines() if l.startswith("#SBATCH")]
  assert directives == ["--job-name=qlhs", "--nodes=2",
                        f"--ntasks-per-node={4 if per == 'gpu' else 1}",
                        "--gpus-per-node=4", f"--output={wd}/slurm-%j.out",
                        "--partition=gpu", "--time=24:00:00"]
  assert "export QLHS_DISTRIBUTED=1" in script
  assert ("export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script) == (per == "node")
  assert shlex.split(script.strip().splitlines()[-1]) == [
      "srun", "--kill-on-bad-exit=1", "python3", "-m", "qlhs_jax.main",
      f"--config={REPO}/configs/eq3.py:hardball_ds", f"--workdir={wd}",
      "--config.batch_size=512"]
  syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
  assert syntax.returncode == 0, syntax.stderr


def _stand_in(bin_dir, name: str, record: str):
  """An executable ``name`` that records its arguments and environment as JSON."""
  path = os.path.join(bin_dir, name)
  with open(path, "w") as f:
    f.write(f"#!{sys.executable}\nimport json, os, sys\n"
            f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, "
            f"open({record!r}, 'w'))\n")
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_slurm_submits_a_script_that_runs(tmp_path):
  """Without --dry-run: the script is written to the workdir and given to sbatch; run
  by bash (as sbatch would on the first node), it hands srun the training command with
  the distributed environment."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stand_in(str(bin_dir), "sbatch", str(tmp_path / "sbatch.json"))
  _stand_in(str(bin_dir), "srun", str(tmp_path / "srun.json"))
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  wd = str(tmp_path / "run")
  p = launch("slurm.sh", "--config=configs/quickstart.py", f"--workdir={wd}",
             "--nodes=1", "--gpus_per_node=2", "--per=node", "--port=23456",
             "--job_name=digits", "--", "--config.epochs=1", env=env)
  assert p.returncode == 0, p.stderr
  script = os.path.join(wd, "digits.sbatch")
  assert json.load(open(tmp_path / "sbatch.json"))["argv"] == [script]
  run = subprocess.run(["bash", script], env={**os.environ, **env, "XLA_FLAGS": "--x=1"},
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  srun = json.load(open(tmp_path / "srun.json"))
  assert srun["argv"] == ["--kill-on-bad-exit=1", "python3", "-m", "qlhs_jax.main",
                          f"--config={REPO}/configs/quickstart.py", f"--workdir={wd}",
                          "--config.epochs=1"]
  e = srun["env"]
  assert (e["QLHS_DISTRIBUTED"], e["JAX_LOCAL_DEVICE_IDS"], e["JAX_COORDINATOR_PORT"]) == (
      "1", "0,1", "23456")
  assert e["XLA_FLAGS"] == f"{LATENCY} --x=1"


# ---------------------------------------------------------------------------------------
# Argument checks: a clear message, exit status 2, nothing printed or run.

CFG, WD = "--config=configs/eq3.py", "--workdir=/mnt/shared/run"
TPU = ["--tpu=t1", "--zone=us-central2-b"]
SLURM = ["--nodes=2", "--gpus_per_node=8"]
BAD = [
    ("single_gpu.sh", [WD], "--config is required"),
    ("single_gpu.sh", [CFG], "--workdir is required"),
    ("single_gpu.sh", ["--config=configs/eq9.py", WD], "no such file configs/eq9.py"),
    ("single_gpu.sh", ["--config=configs/base.txt", WD], "expected a Python config file"),
    ("single_gpu.sh", [CFG, WD, "--gpus=0;1"], "--gpus must be comma-separated"),
    ("single_gpu.sh", [CFG, WD, "--batch_size=8"], "unknown argument '--batch_size=8'"),
    ("single_gpu.sh", [CFG, WD, "--", "batch_size=8"], "'batch_size=8' after -- is not"),
    ("tpu_pod.sh", [CFG, WD, "--zone=us-central2-b"], "--tpu is required"),
    ("tpu_pod.sh", [CFG, WD, "--tpu=t1"], "--zone is required"),
    ("tpu_pod.sh", [CFG, WD, "--tpu=My_TPU", "--zone=us-central2-b"], "a TPU name is"),
    ("tpu_pod.sh", [CFG, WD, "--tpu=t1", "--zone=us-central2"], "expected a zone"),
    ("tpu_pod.sh", [CFG, "--workdir=gs://bucket/run", *TPU], "writes the workdir with file"),
    ("tpu_pod.sh", [CFG, "--workdir=runs/eq3", *TPU], "give an absolute path"),
    ("tpu_pod.sh", [f"--config={REPO}/configs/eq3.py", WD, *TPU], "relative to the repo"),
    ("tpu_pod.sh", [CFG, WD, *TPU, "--project=X"], "not a Google Cloud project id"),
    ("slurm.sh", [CFG, WD, "--gpus_per_node=8"], "--nodes is required"),
    ("slurm.sh", [CFG, WD, "--nodes=0", "--gpus_per_node=8"], "--nodes must be a positive"),
    ("slurm.sh", [CFG, WD, "--nodes=2", "--gpus_per_node=x"], "--gpus_per_node must be"),
    ("slurm.sh", [CFG, WD, *SLURM, "--per=socket"], "--per must be 'gpu' or 'node'"),
    ("slurm.sh", [CFG, WD, *SLURM, "--time=1 day"], "expected [D-]HH:MM:SS"),
    ("slurm.sh", [CFG, WD, *SLURM, "--port=80"], "--port must be a port number"),
    ("slurm.sh", [CFG, WD, *SLURM, "--partition=a b"], "letters, digits and -_. only"),
]


@pytest.mark.parametrize("script,args,message", BAD,
                         ids=[f"{s}:{m[:28]}" for s, _, m in BAD])
def test_bad_arguments_fail_clearly(script, args, message):
  p = launch(script, *args, "--dry-run")
  assert p.returncode == 2 and message in p.stderr, p.stderr
  assert p.stdout == ""


def test_slurm_without_sbatch_says_where_to_run(tmp_path):
  if shutil.which("sbatch"):
    pytest.skip("sbatch is installed here")
  p = launch("slurm.sh", CFG, WD, *SLURM)
  assert p.returncode == 2 and "sbatch not found" in p.stderr


@pytest.mark.parametrize("script", ["single_gpu.sh", "tpu_pod.sh", "slurm.sh"])
def test_help(script):
  p = launch(script, "--help")
  assert p.returncode == 0 and "--dry-run" in p.stdout and "--config=" in p.stdout

"""Deviceless compilation of the train step for an H100 (needs JAX's CUDA plugin; the
tests that compile are skipped without it, the error paths run everywhere)."""

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlhs_jax import xla_options
from qlhs_jax.benchmarks import aot

# JAX's CUDA plugin, of jax[cuda12] or jax[cuda13], whatever JAX_PLATFORMS says.
HAS_CUDA_PLUGIN = xla_options.cuda_possible({})
TINY = ["widths=[8,16]", "depths=[1,1]", "stem=\"small\""]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "qlhs_jax.benchmarks.aot", *args],
                        capture_output=True, text=True)


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="the CUDA plugin is installed here")
def test_without_the_cuda_plugin_it_names_the_install_command():
  p = _run("--model", "eq3_softball_ds", "--batch", "2", "--size", "16")
  assert p.returncode != 0
  assert 'pip install "jax[cuda13]==' in p.stderr, p.stderr[-2000:]


def test_unknown_models_are_refused_before_compiling():
  p = _run("--model", "eq9")
  assert p.returncode != 0 and "eq9" in p.stderr


def test_pallas_kernels_are_asked_for_only_while_tracing(monkeypatch):
  """QLHS_PALLAS_INTERPRET=0 (Triton kernels on a CPU host) holds inside the context and
  is restored after it, also after an error, so other models in this process still
  interpret their kernels on the CPU."""
  from qlhs_jax.models import qlhs
  monkeypatch.delenv("QLHS_PALLAS_INTERPRET", raising=False)
  with aot.pallas_for_gpu():
    assert qlhs._pallas_interpret("block") is False
  assert "QLHS_PALLAS_INTERPRET" not in aot.os.environ
  monkeypatch.setenv("QLHS_PALLAS_INTERPRET", "1")
  with pytest.raises(RuntimeError):
    with aot.pallas_for_gpu():
      raise RuntimeError
  assert aot.os.environ["QLHS_PALLAS_INTERPRET"] == "1"


def test_every_pallas_form_lowers_the_triton_kernels():
  """A step runs Pallas kernels under fuse_d_bn's Pallas settings and under any form
  variable's Pallas form, set or picked by "auto": each of them, alone, is lowered as
  the GPU's kernels (with every form "pallas_dot" the step was lowered interpreted
  until 2026-12-06, 98.89 GB a step). XLA's forms and the other settings are not."""
  assert aot.runs_pallas("pallas", {}) and aot.runs_pallas("block", {})
  assert not aot.runs_pallas("xla", {}) and not aot.runs_pallas(None, {})
  for form in ("pallas", "pallas_gram", "pallas_xhat", "pallas_dot", "auto:pallas"):
    assert aot.runs_pallas("xla", {"QLHS_DU_FORM": "gather", "QLHS_SUMS_FORM": form})
  assert not aot.runs_pallas("xla", {"QLHS_DU_FORM": "gather", "QLHS_STATS_FORM": "xla",
                                     "QLHS_STENCIL_TILING": "du=32,16,4",
                                     "QLHS_D_TAPS": "auto:copy"})


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
def test_compiles_gpu_code_and_counts_its_bytes(tmp_path):
  record = tmp_path / "aot.jsonl"
  args = ["--model", "eq3_softball_ds", "--batch", "8", "--size", "16", "--record",
          str(record), "--hlo-dir", str(tmp_path), "--vs", "eq3_softball_ds",
          "--vs-set", "pin_hidden_layout=true"]
  for kv in TINY:
    args += ["--set", kv, "--vs-set", kv]
  p = _run(*args)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(l) for l in record.read_text().splitlines()]
  assert [r["overrides"].get("pin_hidden_layout", False) for r in rows] == [False, True]
  for r in rows:
    assert r["kind"] == "aot_bytes" and r["train_gbytes"] > 0 and r["peak_mem_gb_est"] > 0
    assert r["gemm"] in ("triton", "cublas")  # auto: triton where this JAX compiles it
    assert abs(sum(r["gbytes_by_kind"].values()) - r["train_gbytes"]) < 1e-9
    assert {"stage1_block0", "stage2_block0"} <= set(r["gbytes_by_part"])
  hlos = sorted(tmp_path.glob("*.aot.hlo.txt.gz"))
  assert len(hlos) == 2
  text = gzip.open(hlos[0], "rt").read()
  # GPU code: cuBLAS/cuDNN library calls and GPU fusion kinds, not the CPU backend's.
  assert "__cublas$" in text or "__cudnn$" in text
  assert "kind=kInput" in text


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
@pytest.mark.parametrize("input", ["uint8", "uint8_randaugment"])
def test_uint8_input_compiles_with_the_erasing_in_the_step(tmp_path, input):
  """--input uint8: the step takes the pipeline's uint8 images, boxes and seeds (and
  with uint8_randaugment the ops), and the record says so."""
  record = tmp_path / "aot.jsonl"
  args = ["--model", "eq3_softball_ds", "--batch", "8", "--size", "16", "--record",
          str(record), "--hlo-dir", str(tmp_path), "--input", input]
  for kv in TINY:
    args += ["--set", kv]
  p = _run(*args)
  assert p.returncode == 0, p.stderr[-3000:]
  (row,) = [json.loads(l) for l in record.read_text().splitlines()]
  assert row["input"] == input and row["train_gbytes"] > 0
  (hlo,) = tmp_path.glob("*.aot.hlo.txt.gz")
  text = gzip.open(hlo, "rt").read()
  entry = text[text.index("ENTRY"):]
  params = entry[:entry.index("\n}")]
  assert "u8[8,16,16,3]" in params and "s32[8,3,4]" in params and "u32[8]" in params
  assert ("f32[8,2]" in params) == (input == "uint8_randaugment")


def test_records_get_their_own_table(tmp_path):
  from qlhs_jax.benchmarks import table
  rec = {"kind": "aot_bytes", "model": "eq3_softball_ds", "overrides": {"d_impl": "shifted_t"},
         "batch": 256, "size": 224, "target": "h100", "jax": "0.10.2", "date": "2026-11-27",
         "kernels": 798, "train_gbytes": 78.846}
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps(rec) + "\n")
  out = table.table(str(path))
  assert ("| 2026-11-27 | - | h100 (deviceless, cuBLAS) | 0.10.2 | eq3_softball_ds | "
          "d_impl=shifted_t | 256 | 224 | 78.8 | 798 | - |") in out
  path.write_text(json.dumps({**rec, "gemm": "triton"}) + "\n")
  assert "| h100 (deviceless, Triton GEMM) | 0.10.2 |" in table.table(str(path))
  path.write_text(json.dumps({**rec, "devices": 8}) + "\n")  # one device's bytes of 8
  assert "| 8 x h100 (deviceless, cuBLAS) | 0.10.2 |" in table.table(str(path))


def test_records_carry_the_commit(tmp_path):
  """append_records stamps each record with the checkout's commit, and the aot table
  shows it: the same model and overrides move other bytes once the code changes."""
  from qlhs_jax.benchmarks import step, table
  repo = Path(__file__).resolve().parents[2]
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True, cwd=repo).stdout.strip()
  rec = {"kind": "aot_bytes", "model": "resnet50", "overrides": {}, "batch": 256,
         "size": 224, "target": "h100", "jax": "0.10.2", "date": "2026-11-27",
         "kernels": 1016, "train_gbytes": 97.43}
  path = tmp_path / "r.jsonl"
  step.append_records(str(path), [rec, {**rec, "commit": "abc1234"}])
  got = [json.loads(line)["commit"] for line in path.read_text().splitlines()]
  if head:
    assert got[0] in (head, head + "+changes")
  else:  # not a git checkout (an sdist): no commit to record
    assert got[0] is None
  assert got[1] == "abc1234"  # a record that has one keeps it
  assert f"| 2026-11-27 | {got[0] or '-'} | h100 (deviceless, cuBLAS) |" in table.table(str(path))


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_gemm_mode_decides_who_does_the_matmuls(tmp_path, gemm):
  args = ["--model", "eq3_softball_ds", "--batch", "8", "--size", "16", "--gemm", gemm,
          "--hlo-dir", str(tmp_path), "--record", str(tmp_path / "r.jsonl")]
  for kv in TINY:
    args += ["--set", kv]
  p = _run(*args)
  if gemm == "triton" and "Couldn't find output tile sizes" in p.stderr:
    pytest.skip("this JAX cannot compile Triton GEMM fusions without a device (0.10.2)")
  assert p.returncode == 0, p.stderr[-3000:]
  (r,) = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
  assert r["gemm"] == gemm
  (hlo,) = tmp_path.glob("*.aot.hlo.txt.gz")
  text = gzip.open(hlo, "rt").read()
  if gemm == "cublas":
    assert "__cublas$" in text and "__triton" not in text
  else:
    assert "__triton" in text and "__cublas$" not in text


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
def test_grouped_state_writes_compile_to_fewer_kernels(tmp_path):
  """The new state written by a few multi-output kernels (steps.keep_where) against one
  kernel per leaf, and no leaf copied back: the grouped step's state is not donated
  (NOTES.md experiment 33; at full size Eq.(3) compiles to 599 kernels, not 664)."""
  record = tmp_path / "aot.jsonl"
  for writes in ("per_leaf", "grouped"):
    # four blocks a stage: leaves of one size to group (depths [1, 1]: 92 and 86)
    p = _run("--model", "eq3_softball_ds", "--batch", "8", "--size", "16",
             "--state-writes", writes, "--set", "widths=[8,16]", "--set", "depths=[4,4]",
             "--set", 'stem="small"', "--record", str(record),
             "--hlo-dir", str(tmp_path / writes))
    assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(l) for l in record.read_text().splitlines()]
  assert [r["state_writes"] for r in rows] == ["per_leaf", "grouped"]
  # 2026-12-05, jax 0.11.2: 287 and 254
  assert rows[1]["kernels"] < rows[0]["kernels"] - 20, [r["kernels"] for r in rows]
  text = gzip.open(next((tmp_path / "grouped").glob("*.aot.hlo.txt.gz")), "rt").read()
  assert not re.search(r"= f32\[[0-9,]*\]\{[0-9,]*\} copy\(", text)


def test_unknown_gemm_mode_is_refused():
  with pytest.raises(SystemExit, match="--gemm 'magma': choose auto, triton or cublas"):
    aot.compile_train_step("eq3_softball_ds", {}, batch=2, size=16, gemm="magma")


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
def test_compiles_the_block_kernels_for_the_gpu(tmp_path):
  """fuse_d_bn="block": XLA compiles the Pallas kernels' Triton IR for the H100 (the
  model's widths of at least 16 are the kernels' smallest dot)."""
  record = tmp_path / "aot.jsonl"
  p = _run("--model", "eq3_softball_ds", "--batch", "8", "--size", "32", "--set",
           'fuse_d_bn="block"', "--set", "widths=[16,32]", "--set", "depths=[2,1]",
           "--record", str(record))
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(record.read_text().splitlines()[0])
  assert r["gbytes_by_kind"].get("custom-call __gpu$xla.gpu.triton", 0) > 0, r


def test_a_device_count_that_does_not_divide_the_batch_is_refused():
  p = _run("--model", "eq3_softball_ds", "--batch", "8", "--size", "16", "--devices", "3")
  want = "--devices 3: want a count of GPUs that divides the batch (8)"
  assert p.returncode != 0 and want in p.stderr, p.stderr[-2000:]


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
def test_compiles_the_stencil_kernels_for_gpus_splitting_the_batch(tmp_path):
  """--devices 2: fuse_d_bn="auto" resolves to the stencil kernels on each GPU's half of
  the batch (d_bn_product's shard_map), XLA compiles their Triton IR, and the gradients
  are summed across the GPUs (all-reduce in one device's program)."""
  record = tmp_path / "aot.jsonl"
  p = _run("--model", "eq3_softball_ds", "--batch", "8", "--size", "16", "--devices", "2",
           "--set", 'fuse_d_bn="auto"', *[a for kv in TINY for a in ("--set", kv)],
           "--record", str(record), "--hlo-dir", str(tmp_path))
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(record.read_text().splitlines()[0])
  assert r["devices"] == 2 and r["env"]["QLHS_STATS_FORM"] == "auto:pallas", r
  assert r["gbytes_by_kind"].get("custom-call __gpu$xla.gpu.triton", 0) > 0, r
  text = gzip.open(next(tmp_path.glob("*.aot.hlo.txt.gz")), "rt").read()
  assert "all-reduce-start(" in text or "all-reduce(" in text
  # beside the HLO, the Pallas kernels' loops, each joined to one of its custom calls
  loops = json.loads(next(tmp_path.glob("*.aot.pallas_loops.json")).read_text())
  assert {d["name"] for d in loops} >= {"qlhs_lag_sums", "qlhs_bn_sums"}, loops
  assert all(d["trips"] >= 1 and d["inner"] >= 1 for d in loops)
  from qlhs_jax.benchmarks import xla_floors
  assert len(xla_floors.loop_trips(text, loops)) == len(loops)


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
def test_the_strided_shortcut_and_c_stay_two_matmuls(tmp_path):
  """At the strided block (8 -> 16 channels, 32 hidden) the shortcut and C read the same
  strided u. With the fused D + BN + product, whose kernels take C as an operand of its
  own, they stay two matmuls (32 and 16 columns) forward and for their weights' gradient:
  XLA's dot merger made them one of 48 columns, and C was copied out of it."""
  p = _run("--model", "eq3_softball_ds", "--batch", "8", "--size", "16", "--gemm", "triton",
           "--set", 'fuse_d_bn="auto"', *[a for kv in TINY for a in ("--set", kv)],
           "--hlo-dir", str(tmp_path))
  assert p.returncode == 0, p.stderr[-3000:]
  text = gzip.open(next(tmp_path.glob("*.aot.hlo.txt.gz")), "rt").read()
  dots = set(re.findall(r"%gemm_fusion_dot[.\d]* = (bf16\[\d+,\d+\])", text))
  assert {"bf16[512,32]", "bf16[512,16]"} <= dots, dots
  assert not any(d.endswith(",48]") for d in dots), dots


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
def test_the_profile_options_compile_without_command_buffers(tmp_path):
  """For the H100, XLA puts a run of kernels into a command buffer (one CUDA graph: one
  event in a profile); benchmarks.step's PROFILE_COMPILER_OPTIONS compile the same
  function with none (thunks named in XLA's dump, one dump folder per compile)."""
  code = """
import glob, sys
from qlhs_jax.benchmarks import aot, step
dev = aot.compile_only_device()
import jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

def f(x):
  for _ in range(4):
    x = jnp.tanh(x @ x) + x.sum(0)
  return x

x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=SingleDeviceSharding(dev))
for i, opts in enumerate(({}, step.PROFILE_COMPILER_OPTIONS)):
  d = f"{sys.argv[1]}/{i}"
  jax.jit(f).lower(x).compile({**opts, "xla_dump_to": d})
  print(sum(open(p).read().count('profile_annotation: "command_buffer')
            for p in glob.glob(d + "/*thunk_metadata.txt")))
"""
  p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                     text=True)
  assert p.returncode == 0, p.stderr[-3000:]
  default, with_options = map(int, p.stdout.split()[-2:])
  assert default >= 1 and with_options == 0, (default, with_options)

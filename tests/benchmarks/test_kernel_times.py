"""Per-kernel device time from a profiler trace: which events count, how they are named,
and the bandwidth the report derives, against hand-computed figures."""

import gzip
import json
import textwrap

import pytest

from qlhs_jax.benchmarks import kernel_times, step


def _meta(pid, name, tid=None):
  if tid is None:
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
  return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def _ev(pid, tid, name, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur, "name": name, "args": args}


def test_gpu_trace_counts_the_first_devices_stream_kernels_only():
  trace = {"traceEvents": [
      _meta(1, "/host:CPU"), _meta(2, "/device:GPU:0"), _meta(3, "/device:GPU:10"),
      _meta(4, "/device:CUSTOM:0"),
      _meta(2, "Stream #14(Compute)", 10), _meta(2, "XLA Ops", 11),
      _meta(2, "XLA Modules", 12), _meta(3, "Stream #14(Compute)", 10),
      # host-side launch annotations carry hlo_op too: not device time
      _ev(1, 5, "loop_convert_fusion.1", 7, hlo_op="loop_convert_fusion.1"),
      # two steps of each kernel; the first is named after its fusion, "." -> "_"
      _ev(2, 10, "loop_convert_fusion_1", 100), _ev(2, 10, "loop_convert_fusion_1", 100),
      _ev(2, 10, "sm90_xmma_gemm_bf16", 300, hlo_op="custom-call.129"),
      _ev(2, 10, "sm90_xmma_gemm_bf16", 300, hlo_op="custom-call.129"),
      _ev(2, 10, "k", 40, long_name="k:#hlo_op=input_reduce_fusion.48,hlo_module=m#"),
      _ev(2, 10, "some_library_kernel", 50),
      # a kernel inside a command buffer carries the buffer's hlo_op: its name decides
      _ev(2, 10, "loop_convert_fusion_1", 5, hlo_op="command_buffer.3"),
      _ev(2, 10, "other_kernel", 6, hlo_op="command_buffer.3"),
      # the derived lines repeat the kernels; the second GPU runs the same program
      _ev(2, 11, "loop_convert_fusion.1", 1000), _ev(2, 12, "jit_train_step", 5000),
      _ev(3, 10, "loop_convert_fusion_1", 100), _ev(4, 10, "loop_convert_fusion_1", 100),
  ]}
  times, lost, source = kernel_times.kernel_times(
      trace, ["loop_convert_fusion.1", "custom-call.129", "input_reduce_fusion.48"])
  assert source == "gpu streams"
  assert times == {"loop_convert_fusion.1": 205, "custom-call.129": 600,
                   "input_reduce_fusion.48": 40, "command_buffer.3": 6}
  assert lost == {"some_library_kernel": 50}


def test_device_without_stream_lines_skips_the_derived_lines():
  trace = {"traceEvents": [
      _meta(2, "/device:GPU:0"), _meta(2, "XLA Ops", 11), _meta(2, "kernels", 13),
      _ev(2, 11, "fusion.1", 999, hlo_op="fusion.1"),
      _ev(2, 13, "fusion_1", 10, hlo_op="fusion.1")]}
  assert kernel_times.kernel_times(trace, ["fusion.1"]) == ({"fusion.1": 10}, {},
                                                            "device lines")


def test_cpu_trace_counts_the_first_devices_thunks():
  trace = {"traceEvents": [
      _meta(1, "/host:CPU"),
      _ev(1, 1, "dot.1", 5, hlo_op="dot.1", device_ordinal="0"),
      _ev(1, 2, "dot.1", 6, hlo_op="dot.1", device_ordinal="1"),
      _ev(1, 1, "ThunkExecutor::Execute", 50, device_ordinal="0"),
      _ev(1, 1, "end: dot.1", 0)]}
  assert kernel_times.kernel_times(trace, ["dot.1"]) == ({"dot.1": 5}, {}, "host thunks")


HLO = textwrap.dedent("""\
    HloModule m
    ENTRY %main (a: f32[250000000]) -> f32[1] {
      %a = f32[250000000]{0} parameter(0)
      %loop_add_fusion = f32[250000000]{0} fusion(f32[250000000]{0} %a), kind=kLoop, calls=%f, metadata={op_name="jit(f)/stage1_block0/add"}
      ROOT %input_reduce_fusion = f32[1]{0} fusion(f32[250000000]{0} %loop_add_fusion), kind=kInput, calls=%g, metadata={op_name="jit(f)/head/reduce_sum"}
    }
    """)


def test_report_divides_bytes_by_time():
  # The loop reads and writes 1 GB in 1 ms: 2000 GB/s; the reduction reads 1 GB (+4 B)
  # in 2 ms: 500 GB/s. 1 ms more is a kernel no instruction claims.
  record = {"source": "gpu streams", "steps": 3,
            "us_per_step": {"loop_add_fusion": 1000.0, "input_reduce_fusion": 2000.0,
                            "fusion.9": 500.0},
            "unattributed_us_per_step": {"library_kernel": 500.0}}
  out = kernel_times.report(record, HLO, step_ms=5.0)
  assert "kernel time 4.00 ms per step (step 5.00 ms: kernels fill 80%)" in out
  assert "75% of it matched to 2 of the 2 top-level instructions" in out
  assert "1.000 ms   2.000 GB   2000 GB/s  element-wise loop" in out
  assert "2.000 ms   1.000 GB    500 GB/s  reduction" in out
  lines = out.splitlines()
  kind_rows = lines[lines.index("") + 2:lines.index("") + 4]
  assert kind_rows[0].split() == ["reduction", "2.000", "50.0", "1.000", "500"]
  assert kind_rows[1].split() == ["element-wise", "loop", "1.000", "25.0", "2.000", "2000"]
  tail = out.split("not matched to a top-level instruction:")[1]
  assert "0.500 ms  fusion.9" in tail and "0.500 ms  library_kernel" in tail
  assert "time above a copy" not in out  # no device named: no copy rate to compare with


def test_kernels_outside_the_model_by_operation():
  """The train step's own kernels (no block, stem or head in their op names) are summed
  by operation: the guard's two reductions apart from the optimizer's update."""
  hlo = textwrap.dedent("""\
      HloModule m
      ENTRY %main (a: f32[1000]) -> f32[1000] {
        %a = f32[1000]{0} parameter(0)
        %input_reduce_fusion.1 = pred[] fusion(f32[1000]{0} %a), kind=kInput, calls=%r, metadata={op_name="jit(train_step)/reduce_and"}
        %input_reduce_fusion.2 = pred[] fusion(f32[1000]{0} %a), kind=kInput, calls=%r, metadata={op_name="jit(train_step)/reduce_and"}
        %loop_add_fusion = f32[1000]{0} fusion(f32[1000]{0} %a), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/stage1_block0/add"}
        ROOT %loop_select_fusion = f32[1000]{0} fusion(f32[1000]{0} %a), kind=kLoop, calls=%s, metadata={op_name="jit(train_step)/jit(_where)/select_n"}
      }
      """)
  record = {"source": "gpu streams", "steps": 1,
            "us_per_step": {"input_reduce_fusion.1": 3.0, "input_reduce_fusion.2": 4.0,
                            "loop_add_fusion": 50.0, "loop_select_fusion": 2.0}}
  out = kernel_times.report(record, hlo)
  section = out.split("outside the model, by operation")[1].splitlines()
  # 1000 float32 read (+1 byte written) by each reduction; read and written by the select
  assert section[1].split() == ["reduce_and", "2", "0.007", "0.000"]
  assert section[2].split() == ["jit(_where)/select_n", "1", "0.002", "0.000"]
  assert not section[3].strip()  # the block's add is not outside the model
  assert "outside the model" not in kernel_times.report(
      {**record, "us_per_step": {"loop_add_fusion": 50.0}}, HLO)


def test_time_above_a_copy_on_an_h100():
  """At the H100's 3.0 TB/s the loop's 2 GB take 0.667 ms (it ran 1 ms: 0.333 above) and
  the reduction's 1 GB 0.333 ms (it ran 2 ms: 1.667 above)."""
  record = {"source": "gpu streams", "steps": 3, "device": "gpu:NVIDIA H100 80GB HBM3",
            "us_per_step": {"loop_add_fusion": 1000.0, "input_reduce_fusion": 2000.0}}
  out = kernel_times.report(record, HLO)
  section = out.split("time above a copy at 3.00 TB/s: ")[1].splitlines()
  # 2.000 ms above of 3.000; at the copy rate the two kernels would take 1.000 ms
  assert section[0] == ("2.000 ms per step of 3.000 ms (with every matched kernel at that "
                        "rate, the kernels would take 1.000 ms)")
  assert section[1] == "  by kind: reduction 1.667 ms, element-wise loop 0.333 ms"
  assert section[3].split()[:5] == ["1.667", "2.000", "1.000", "500", "reduction"]
  assert section[4].split()[:5] == ["0.333", "1.000", "2.000", "2000", "element-wise"]
  h200 = kernel_times.report({**record, "device": "gpu:NVIDIA H200"}, HLO)
  assert "time above a copy at 4.30 TB/s" in h200
  forced = kernel_times.report({**record, "device": "cpu:cpu"}, HLO, rate=2e12)
  assert "time above a copy at 2.00 TB/s: 1.500 ms" in forced


def test_harness_profile_on_the_cpu_mesh(tmp_path, capsys):
  # conftest's 8 CPU devices: the thunks of one device are counted, all of them named
  # after top-level instructions of the HLO the harness writes; the command line finds
  # the line by the HLO file's name.
  overrides = {"widths": [8, 16], "depths": [1, 1], "stem": "small"}
  r = step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32", overrides,
                   hlo_dir=str(tmp_path), profile_dir=str(tmp_path), profile_steps=2)
  assert "kernel time" in capsys.readouterr().err
  (line,) = [json.loads(l) for l in (tmp_path / "kernels.jsonl").read_text().splitlines()]
  assert line["tag"] == step.hlo_tag("eq3_softball_ds", overrides) and line["steps"] == 2
  assert line["source"] == "host thunks" and line["commit"] == step.code_version()
  assert line["train_step_ms"] == pytest.approx(1e3 * 8 / r["train_img_s"])
  (hlo,) = tmp_path.glob("*.train.hlo.txt.gz")
  with gzip.open(hlo, "rt") as f:
    names = {row[3] for row in kernel_times.hlo_bytes.analyse(f.read())}
  us = line["us_per_step"]
  assert us and all(v > 0 for v in us.values())
  assert sum(v for k, v in us.items() if k in names) >= 0.9 * sum(us.values())
  kernel_times.main([str(tmp_path / "kernels.jsonl"), str(hlo), "--top", "3"])
  assert "slowest 3 kernels:" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="no line of .* has tag 'other'"):
    kernel_times.main([str(tmp_path / "kernels.jsonl"), str(tmp_path / "other.train.hlo.txt")])


def test_a_failing_profile_leaves_the_timing(tmp_path, capsys, monkeypatch):
  def broken(*a, **k):
    raise RuntimeError("no CUPTI")
  monkeypatch.setattr(kernel_times, "trace_steps", broken)
  r = step.measure("eq3_softball_ds", 8, 16, 1, 1, "float32",
                   {"widths": [8, 16], "depths": [1, 1], "stem": "small"},
                   profile_dir=str(tmp_path))
  assert r["train_img_s"] > 0
  assert "profiling eq3_softball_ds failed, the timing stands: RuntimeError('no CUPTI')" \
      in capsys.readouterr().err
  assert not (tmp_path / "kernels.jsonl").exists()


def test_raw_xspace_and_its_json_conversion_give_the_same_times(tmp_path):
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(0) + jnp.exp(x).mean())
  x = jnp.ones((64, 64))
  hlo = f.lower(x, x).compile().as_text()
  names = [r[3] for r in kernel_times.hlo_bytes.analyse(hlo)]
  f(x, x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      f(x, x).block_until_ready()
  raw = kernel_times.kernel_times(kernel_times.load_trace(str(tmp_path), "xplane"), names)
  conv = kernel_times.kernel_times(kernel_times.load_trace(str(tmp_path), "json"), names)
  assert raw[2] == conv[2] == "host thunks"
  assert set(raw[0]) == set(conv[0]) and set(raw[0]) <= set(names) and raw[0]
  for op, us in raw[0].items():
    assert conv[0][op] == pytest.approx(us, abs=0.01)
  with pytest.raises(FileNotFoundError, match="no readable profiler trace"):
    kernel_times.load_trace(str(tmp_path / "empty"))

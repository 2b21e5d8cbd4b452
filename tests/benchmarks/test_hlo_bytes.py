"""The HLO byte counter against hand-computed sizes."""

import textwrap

import pytest

from qlhs_jax.benchmarks import hlo_bytes

HLO = textwrap.dedent("""\
    HloModule m
    %fused_computation (p: bf16[8,4]) -> f32[8] {
      ROOT %r = f32[8]{0} parameter(0)
    }
    ENTRY %main (a: bf16[8,4], b: f32[4,4]) -> f32[8] {
      %a = bf16[8,4]{1,0} parameter(0)
      %b = f32[4,4]{1,0} parameter(1)
      %gemm = (bf16[8,4]{1,0}, s8[16]{0}) custom-call(bf16[8,4]{1,0} %a, f32[4,4]{1,0} %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/stage1_block0/dot"}
      %gte = bf16[8,4]{1,0} get-tuple-element((bf16[8,4]{1,0}, s8[16]{0}) %gemm), index=0
      ROOT %input_reduce_fusion = f32[8]{0} fusion(bf16[8,4]{1,0} %gte), kind=kInput, calls=%fused_computation, metadata={op_name="jit(f)/head/reduce"}
    }
    """)


def test_counts_operands_and_results():
  rows = sorted(hlo_bytes.analyse(HLO))
  # matmul: operands 8*4*2 + 4*4*4 = 128, result 8*4*2 = 64 (its s8[16] workspace is
  # scratch, not counted); reduction: operand 64, result 8*4 = 32
  assert rows == [(96, "reduction", "head", "input_reduce_fusion"),
                  (192, "matmul (cuBLAS)", "stage1_block0", "gemm")]


def test_only_a_library_calls_workspace_is_left_out():
  """The s8 tuple element of a cuBLAS/cuDNN call is scratch; another custom call's s8
  result (e.g. an argmax index) is data."""
  def row(target):
    text = ("HloModule m\nENTRY %main (a: bf16[8,4]) -> bf16[8,4] {\n"
            "  %a = bf16[8,4]{1,0} parameter(0)\n"
            "  ROOT %c = (bf16[8,4]{1,0}, s8[1000]{0}) custom-call(bf16[8,4]{1,0} %a), "
            f'custom_call_target="{target}"\n}}\n')
    return hlo_bytes.analyse(text)[0][0]
  assert row("__cublas$lt$matmul") == 64 + 64
  assert row("__cudnn$convForward") == 64 + 64
  assert row("my_kernel") == 64 + 64 + 1000


def test_operands_written_without_shapes_are_looked_up_past_index_comments():
  """XLA prints a long operand list by name only, with /*index=5*/ before the sixth."""
  params = "\n".join(f"  %p{i} = f32[10]{{0}} parameter({i})" for i in range(7))
  text = ("HloModule m\nENTRY %main () -> f32[10] {\n" + params + "\n"
          "  ROOT %loop_add_fusion = f32[10]{0} fusion(%p0, %p1, %p2, %p3, %p4, "
          "/*index=5*/%p5, %p6), kind=kLoop, calls=%f\n}\n")
  assert hlo_bytes.analyse(text) == [(8 * 40, "element-wise loop", "-", "loop_add_fusion")]


def test_tuple_elements_written_as_name_hash_index_are_looked_up():
  """``--xla_dump_to`` files write element k of a multi-output fusion as ``%x#k``
  (``compiled.as_text()`` writes a get-tuple-element instead); both count the same."""
  head = ("HloModule m\nENTRY %main () -> f32[10] {\n"
          "  %p = bf16[2,5]{1,0} parameter(0)\n"
          "  %multi = (f32[2,5]{1,0}, (bf16[3]{0}, s32[7]{0}), bf16[4,5]{1,0}) "
          "fusion(%p), kind=kLoop, calls=%f\n")
  dump = head + ("  ROOT %loop_add_fusion = f32[10]{0} fusion(%multi#0, %multi#2, %multi#1), "
                 "kind=kLoop, calls=%g\n}\n")
  gte = head + ("  %g0 = f32[2,5]{1,0} get-tuple-element(%multi), index=0\n"
                "  %g2 = bf16[4,5]{1,0} get-tuple-element(%multi), index=2\n"
                "  %g1 = (bf16[3]{0}, s32[7]{0}) get-tuple-element(%multi), index=1\n"
                "  ROOT %loop_add_fusion = f32[10]{0} fusion(%g0, %g2, %g1), "
                "kind=kLoop, calls=%g\n}\n")
  # operands: f32[2,5] 40 + bf16[4,5] 40 + the nested tuple (bf16[3] 6 + s32[7] 28) = 114,
  # result f32[10] 40
  for text in (dump, gte):
    assert hlo_bytes.analyse(text)[-1] == (154, "element-wise loop", "-", "loop_add_fusion")
  assert hlo_bytes.analyse(dump)[0] == (20 + 40 + 34 + 40, "element-wise loop", "-", "multi")


def test_launch_dims_join_the_thunk_files_xla_dumps(tmp_path):
  """``--launch`` reads grid and block size from the thunk files beside an XLA dump, by
  thunk id, and flags a kernel with fewer threads than an H100 keeps resident."""
  prefix = tmp_path / "module_0001.jit_f."
  (tmp_path / "module_0001.jit_f.sm_9.0a_gpu_after_optimizations.txt").write_text(HLO)
  prefix.with_name(prefix.name + "thunk_metadata.txt").write_text(
      'thunk_metadata {\n  thunk_info {\n    profile_annotation: "command_buffer"\n  }\n}\n'
      'thunk_metadata {\n  thunk_info {\n    profile_annotation: "input_reduce_fusion"\n'
      '    thunk_id: 7\n  }\n  thunk_kind: "kCustomKernel"\n}\n')
  prefix.with_name(prefix.name + "thunk_sequence.txt").write_text(
      "003: kCustomKernel [source | sink] loop_x grid: [9, 9, 9] threads: [1, 1, 1]\n"
      "007: kCustomKernel [source | sink] input_reduce_fusion_1 grid: [66, 2, 1] "
      "threads: [512, 1, 1]  shared_memory: 0 bytes\n")
  path = str(tmp_path / "module_0001.jit_f.sm_9.0a_gpu_after_optimizations.txt")
  assert hlo_bytes.launch_dims(path) == {"input_reduce_fusion": (132, 512)}
  out = hlo_bytes.report(path, launch=True)
  # 132 * 512 = 67,584 threads of 132 * 2,048 resident: a quarter of one wave
  assert "132 x 512" in out and "< one wave (25%)" in out
  assert "1 launch fewer threads" in out and "moving 0.00 GB" in out
  with pytest.raises(SystemExit, match="xla_dump_to"):
    hlo_bytes.launch_dims(str(tmp_path / "step.hlo.txt"))


def test_report_runs(tmp_path):
  p = tmp_path / "m.hlo.txt"
  p.write_text(HLO)
  out = hlo_bytes.report(str(p), top=2)
  assert "2 kernels" in out and "matmul (cuBLAS)" in out and "66.7%" in out


def test_part_report_lists_one_block(tmp_path):
  p = tmp_path / "m.hlo.txt"
  p.write_text(HLO)
  out = hlo_bytes.part_report(str(p), "stage1_block0")
  assert "1 kernels, 0.00 GB" in out and "gemm" in out and "dot" in out
  assert "input_reduce_fusion" not in out  # the head's kernel
  with pytest.raises(SystemExit, match="no kernel of part 'stage9_block0'"):
    hlo_bytes.part_report(str(p), "stage9_block0")


def test_the_h100_steps_the_notes_quote(monkeypatch):
  """The HLO the H100 dumped (benchmarks/device_hlo): the calibration figures of
  benchmarks/NOTES.md, experiment 6; what they leave out is exactly the s8 workspace
  (s8 or u8) each cuBLAS/cuDNN call returns."""
  import gzip
  import re
  from pathlib import Path
  folder = Path(__file__).resolve().parents[2] / "benchmarks" / "device_hlo"
  for model, kernels, gbytes in (("eq3_softball_ds", 1012, 103.72),
                                 ("resnet50", 1085, 102.55)):
    text = gzip.open(folder / f"h100_b94c9c1_{model}.train.hlo.txt.gz", "rt").read()
    counted = sum(r[0] for r in hlo_bytes.analyse(text))
    assert (len(hlo_bytes.analyse(text)), round(counted / 1e9, 2)) == (kernels, gbytes)
    calls = [l.split("custom-call(")[0] for l in text[text.index("\nENTRY"):].splitlines()
             if re.search(r'custom_call_target="__(cublas|cudnn)', l)]
    workspaces = [int(m) for c in calls for m in re.findall(r"[su]8\[(\d+)\]", c)]
    assert calls and len(workspaces) == len(calls)  # one each
    with monkeypatch.context() as m:
      m.setattr(hlo_bytes, "_WORKSPACE", re.compile(r"(?!)"))  # matches nothing
      everything = sum(r[0] for r in hlo_bytes.analyse(text))
    assert everything - counted == sum(workspaces)


def test_ops_counts_one_fusions_instructions_by_kind(tmp_path, capsys):
  """A fusion of 2 parameters, a constant and its broadcast (index-only) and 3 computing
  instructions; another computation's instructions and the entry's are not counted."""
  text = textwrap.dedent("""\
      HloModule m
      %fused_add.1 (p0: u32[4], p1: u32[4]) -> u32[4] {
        %p0 = u32[4]{0} parameter(0)
        %p1 = u32[4]{0} parameter(1)
        %c = u32[] constant(9)
        %b = u32[4]{0} broadcast(u32[] %c), dimensions={}
        %s = u32[4]{0} shift-right-logical(u32[4]{0} %p0, u32[4]{0} %b)
        %x = u32[4]{0} xor(u32[4]{0} %s, u32[4]{0} %p1)
        ROOT %a = u32[4]{0} add(u32[4]{0} %x, u32[4]{0} %p1)
      }
      %fused_add (q: u32[4]) -> u32[4] {
        %q = u32[4]{0} parameter(0)
        ROOT %m = u32[4]{0} multiply(u32[4]{0} %q, u32[4]{0} %q)
      }
      ENTRY %main (a: u32[4], b: u32[4]) -> u32[4] {
        %a = u32[4]{0} parameter(0)
        %b = u32[4]{0} parameter(1)
        %loop_add_fusion = u32[4]{0} fusion(%a), kind=kLoop, calls=%fused_add
        ROOT %loop_add_fusion.1 = u32[4]{0} fusion(%loop_add_fusion, %b), kind=kLoop, calls=%fused_add.1
      }
      """)
  assert hlo_bytes.fusion_ops(text, "loop_add_fusion.1") == {
      "parameter": 2, "constant": 1, "broadcast": 1, "shift-right-logical": 1, "xor": 1,
      "add": 1}
  assert hlo_bytes.fusion_ops(text, "loop_add_fusion") == {"parameter": 1, "multiply": 1}
  p = tmp_path / "m.hlo.txt"
  p.write_text(text)
  hlo_bytes.main([str(p), "--ops", "loop_add_fusion.1"])
  assert "7 instructions, 3 computing" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="no fusion named 'gemm'"):
    hlo_bytes.fusion_ops(text, "gemm")


def test_the_input_kernels_instructions_the_notes_quote():
  """NOTES.md experiment 32: the stem's input kernel of the H200 step of experiment 23,
  with jax.random's threefry for the erased boxes' fills, computes 172 instructions a
  value."""
  import os
  path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "device_hlo",
                      "h200_6e0def0_eq3_softball_ds.train.hlo.txt.gz")
  kinds = hlo_bytes.fusion_ops(hlo_bytes.read_hlo(path), "loop_transpose_fusion.1")
  assert sum(n for k, n in kinds.items() if k not in hlo_bytes._INDEX_ONLY) == 172
  assert kinds["xor"] == 21 and kinds["shift-left"] == 20  # threefry's 20 rounds

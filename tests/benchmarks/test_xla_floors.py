"""``benchmarks.xla_floors``: registers, occupancy, machine instructions and issue floors
of the kernels XLA dumped with a compiled step. The parsers run everywhere; assembling a
PTX kernel needs the ``triton`` package's ptxas and nvdisasm (``pip install
triton==3.9.0``; not a dependency, CI skips that test)."""

import importlib.util

import pytest

from qlhs_jax.benchmarks import hlo_bytes, triton_compile, warp_cycles, xla_floors

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="needs Triton's ptxas and nvdisasm: pip install triton==3.9.0")


@pytest.mark.parametrize("registers,threads,warps", [
    (56, 128, 36),   # 56 x 32 = 1,792 a warp; 65,536 / (1,792 x 4) = 9 blocks of 4 warps
    (70, 128, 28),   # 2,240 a warp, rounded up to 2,304: 7 blocks
    (32, 128, 64),   # 16 blocks of 4 warps: the 64-warp limit
    (88, 128, 20),   # 2,816 a warp: 5 blocks
    (33, 128, 48),   # 33 x 32 = 1,056, rounded up to 1,280 a warp: 12 blocks
    (16, 32, 32),    # 32 blocks of one warp: the block limit, not the registers
    (255, 1024, 0),  # 8,192 a warp x 32 warps: more than an SM has
])
def test_resident_warps_follow_the_h100_limits(registers, threads, warps):
  """Worked by hand from an H100 SM's limits (65,536 registers handed out per warp in
  units of 256, 64 warps, 32 blocks), as CUDA's occupancy calculator counts them."""
  assert xla_floors.resident_warps(registers, threads) == warps


@pytest.mark.parametrize("registers,shared,warps", [
    (47, 0, 40),             # registers alone: 10 blocks of 4 warps
    (47, 131072, 4),         # du as products' 128 KiB: 233,472 // 132,096 = 1 block
    (47, 54 * 1024, 16),     # 55 KiB a block with the reserve: 4 blocks
    (254, 86016, 8),         # the sums at stage 1 (84 KiB): 2 blocks either way
    (254, 200704, 4),        # the sums at stage 2 (196 KiB): 1 block
])
def test_resident_warps_count_shared_memory(registers, shared, warps):
  """By hand: an SM's 228 KiB of shared memory over a block's bytes plus the 1 KiB the
  system reserves for each block limits the blocks as registers do (blocks of 128
  threads)."""
  assert xla_floors.resident_warps(registers, 128, shared) == warps


def test_shared_memory_is_read_from_ptxas_and_tritons_ir(tmp_path):
  """Static shared memory from ptxas's report, dynamic (Triton's kernels: extern in the
  PTX) from the ``ttg.shared`` of the Triton IR that XLA dumps beside the PTX; a kernel
  with no such file has none."""
  assert xla_floors.shared_by_entry(PTXAS) == {"loop_add_fusion": 0,
                                               "input_reduce_fusion_1": 128}
  ptx = tmp_path / "module_0001.jit_train_step.7.ptx"
  ptx.write_text("")
  (tmp_path / "jit_train_step.qlhs_bn_sums_dot__1.triton-to-llvm.txt").write_text(
      'module attributes {"ttg.num-warps" = 4 : i32, ttg.shared = 200704 : i32} {')
  assert xla_floors.dynamic_shared(str(ptx), "qlhs_bn_sums_dot__1") == 200704
  assert xla_floors.dynamic_shared(str(ptx), "qlhs_bn_sums_dot") == 0  # not __1's


PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'loop_add_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
ptxas info    : Compile time = 54.523 ms
ptxas info    : Compiling entry function 'input_reduce_fusion_1' for 'sm_90a'
ptxas info    : Function properties for input_reduce_fusion_1
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 128 bytes smem
"""

# nvdisasm pads a section's name with spaces to a fixed width.
SASS = """	.elftype	@"ET_EXEC"
//--------------------- .text.loop_add_fusion     --------------------------
loop_add_fusion:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   EXIT ;
.L_x_0:
        /*0030*/                   BRA `(.L_x_0);
//--------------------- .text.input_reduce_fusion_1 --------------------------
input_reduce_fusion_1:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   EXIT ;
"""


def test_ptxas_and_nvdisasm_listings_are_split_by_function():
  assert xla_floors.registers_by_entry(PTXAS) == {"loop_add_fusion": 40,
                                                  "input_reduce_fusion_1": 32}
  sections = xla_floors.sass_by_entry(SASS)
  assert set(sections) == {"loop_add_fusion", "input_reduce_fusion_1"}
  # The trap loop after EXIT is not a loop: 4 instructions, none in a loop.
  assert triton_compile.sass_counts(sections["loop_add_fusion"]) == {
      "instructions": 4, "loop": 0}
  assert triton_compile.sass_counts(sections["input_reduce_fusion_1"])["instructions"] == 2


BRANCHES = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/               @P0 BRA `(.L_x_0) ;
        /*0020*/                   IADD3 R1, R0, 0x1, RZ ;
        /*0030*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0040*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0050*/                   BRA `(.L_x_1) ;
.L_x_0:
        /*0060*/                   IMAD R1, R0, 0x2, RZ ;
.L_x_1:
        /*0070*/                   STG.E desc[UR4][R2.64], R1 ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
        /*00a0*/                   NOP;
"""


def test_a_thread_issues_its_way_through_the_branches_not_the_listing():
  """Two ways through an if/else: S2R, BRA, IMAD, STG, EXIT (5) and S2R, BRA, three
  IADD3, BRA, STG, EXIT (8); the trap loop and the padding after EXIT are never issued.
  A branch back (a loop) gives None."""
  assert triton_compile.sass_counts(BRANCHES)["instructions"] == 11
  assert xla_floors.path_lengths(BRANCHES) == (5, 8)
  loop = BRANCHES.replace("BRA `(.L_x_1) ;", "BRA `(.L_x_0) ;").replace(
      ".L_x_0:\n", "").replace("        /*0010*/               @P0 BRA `(.L_x_0) ;",
                                ".L_x_0:\n        /*0010*/               @P0 BRA `(.L_x_1) ;")
  assert xla_floors.path_lengths(loop) is None
  # The threads past the end of a launch leave early (a predicated EXIT): the threads
  # that work go on, and their way counts.
  early = BRANCHES.replace("        /*0010*/               @P0 BRA",
                           "        /*0008*/               @P1 EXIT ;\n"
                           "        /*0010*/               @P0 BRA")
  assert xla_floors.path_lengths(early) == (6, 9)


HLO = """HloModule jit_f

ENTRY %main {
  %p = f32[1048576]{0} parameter(0)
  %q = f32[1048576]{0} parameter(1)
  ROOT %loop_add_fusion.3 = f32[1048576]{0} fusion(%p, %q), kind=kLoop, calls=%f
}
"""

PTX = """.version 8.0
.target sm_90a
.address_size 64

.visible .entry loop_add_fusion_1(
	.param .u64 loop_add_fusion_1_param_0
)
{
	ret;
}
"""


def _dump(tmp_path):
  """A one-kernel XLA dump: the HLO, the thunk files and the kernel's PTX."""
  prefix = "module_0001.jit_f."
  hlo = tmp_path / (prefix + "sm_9.0a_gpu_after_optimizations.txt")
  hlo.write_text(HLO)
  (tmp_path / (prefix + "thunk_metadata.txt")).write_text(
      'thunk_metadata {\n  thunk_info {\n    profile_annotation: "loop_add_fusion.3"\n'
      '    thunk_id: 4\n  }\n  thunk_kind: "kCustomKernel"\n}\n')
  (tmp_path / (prefix + "thunk_sequence.txt")).write_text(
      "004: kCustomKernel [source | sink] loop_add_fusion_1 grid: [2048, 1, 1] "
      "threads: [128, 1, 1]  shared_memory: 0 bytes\n")
  (tmp_path / (prefix + "1.ptx")).write_text(PTX)
  return str(hlo)


def test_launches_name_the_function_they_run(tmp_path):
  path = _dump(tmp_path)
  assert hlo_bytes.kernel_launches(path) == {"loop_add_fusion.3": ("loop_add_fusion_1",
                                                                   2048, 128)}
  assert hlo_bytes.launch_dims(path) == {"loop_add_fusion.3": (2048, 128)}


def test_launches_are_read_from_jax_0_12_1_thunk_lines_too(tmp_path):
  """jax 0.12.1's XLA writes a launch as "kernel=NAME, ..., launch dimensions=blocks:
  {..}, threads/block: {..}" (its line, shortened), where 0.11.2 wrote "NAME grid: [..]
  threads: [..]"; the same launch either way."""
  path = _dump(tmp_path)
  (tmp_path / "module_0001.jit_f.thunk_sequence.txt").write_text(
      "003: kCustomKernel [source | sink] kernel=loop_x_1, profile_annotation=loop_x, "
      "launch dimensions=blocks: {9, 9, 9}, threads/block: {1, 1, 1}, shmem_bytes=0\n"
      "004: kCustomKernel [source        | next=584 (583)] kernel=loop_add_fusion_1, "
      "profile_annotation=loop_add_fusion.3, launch dimensions=blocks: {1024, 2, 1}, "
      "threads/block: {64, 2, 1}, cluster_dim=nullopt, shmem_bytes=0, use_pdl=true\n")
  assert hlo_bytes.kernel_launches(path) == {"loop_add_fusion.3": ("loop_add_fusion_1",
                                                                   2048, 128)}


def test_no_ptx_beside_the_hlo_names_the_flags(tmp_path):
  path = _dump(tmp_path)
  (tmp_path / "module_0001.jit_f.1.ptx").unlink()
  with pytest.raises(SystemExit, match="xla_dump_emitter_re"):
    xla_floors.machine_code(path)


@needs_triton
def test_floor_and_copy_of_an_assembled_kernel(tmp_path):
  """The kernel's PTX assembled for sm_90a: its row joins the HLO instruction, the launch
  and the machine code; the floor is its instructions x 4 warps x 2,048 blocks over 528
  schedulers at 1.98 GHz, the copy its 12 MiB at 3.0 TB/s."""
  path = _dump(tmp_path)
  (row,) = xla_floors.floors(path)
  assert (row["name"], row["kernel"], row["blocks"], row["threads"]) == (
      "loop_add_fusion.3", "loop_add_fusion_1", 2048, 128)
  assert row["bytes"] == 3 * 4 * 1048576 and row["loop"] == 0
  # A return; the listing adds the trap loop after it and the padding to 128 bytes.
  assert 2 <= row["instructions"] <= 32 and row["path"][0] < row["instructions"]
  warp_instructions = row["path"][0] * 4 * 2048
  assert row["floor_ms"] == pytest.approx(warp_instructions / (528 * 1.98e9) * 1e3)
  assert row["copy_ms"] == pytest.approx(3 * 4 * 1048576 / 3.0e12 * 1e3)
  assert row["warps"] == xla_floors.resident_warps(row["registers"], 128)
  out = xla_floors.report(path)
  assert "1 launches with machine code" in out
  assert "loop_add_fusion.3 (loop_add_fusion_1)" in out


def _sass(*lines: str) -> str:
  """nvdisasm-style lines (labels as they are, instructions with an address)."""
  out = []
  for i, line in enumerate(lines):
    out.append(line if line.endswith(":") else f"        /*{16 * i:04x}*/  {line} ;")
  return "\n".join(out)


# Counted by hand: each wait is an instruction that reads (or writes) a register that a
# global load has not yet filled; every load issued before it returns with it.
ROUNDS = [
    ("together", _sass(
        "LDG.E R4, desc[UR4][R2.64]", "LDG.E.128 R8, desc[UR4][R2.64+0x10]",
        "FADD R5, R4, R11", "STG.E desc[UR4][R2.64], R5", "EXIT"), (1, 2, 0)),
    ("one after the other", _sass(
        "LDG.E R4, desc[UR4][R2.64]", "FADD R5, R4, R4",
        "LDG.E R6, desc[UR4][R2.64+0x4]", "FADD R5, R5, R6",
        "LDG.E.64 R6, desc[UR4][R2.64+0x8]", "STG.E desc[UR4][R2.64], R7", "EXIT"),
     (3, 3, 0)),
    # A pointer loaded, then loaded through: its address is the first load's value.
    ("through a loaded pointer", _sass(
        "LDG.E.64 R4, desc[UR4][R2.64]", "LDG.E R6, desc[UR4][R4.64]",
        "STG.E desc[UR4][R2.64], R6", "EXIT"), (2, 2, 0)),
    # A 128-bit load fills R8..R11; a 128-bit store reads R8..R11.
    ("a wide load", _sass(
        "LDG.E.128 R8, desc[UR4][R2.64]", "FADD R5, R10, R10", "EXIT"), (1, 1, 0)),
    ("a wide store", _sass(
        "LDG.E R11, desc[UR4][R2.64]", "STG.E.128 desc[UR4][R2.64+0x10], R8", "EXIT"),
     (1, 1, 0)),
    # Overwriting a register a load has not filled waits for it too.
    ("overwritten", _sass(
        "LDG.E R4, desc[UR4][R2.64]", "MOV R4, RZ", "LDG.E R6, desc[UR4][R2.64+0x4]",
        "STG.E desc[UR4][R2.64], R6", "EXIT"), (2, 2, 0)),
    # XLA's bounds test around a tap: the way where every test passes loads both taps.
    ("bounds tests", _sass(
        "@!P0 BRA `(.L_x_0)", "LDG.E.U16 R4, desc[UR4][R2.64]", "SHF.L.U32 R4, R4, 0x10, RZ",
        ".L_x_0:", "@!P1 BRA `(.L_x_1)", "LDG.E.U16 R6, desc[UR4][R2.64+0x2]",
        "SHF.L.U32 R6, R6, 0x10, RZ", ".L_x_1:", "FADD R5, R4, R6",
        "STG.E desc[UR4][R2.64], R5", "EXIT"), (2, 2, 0)),
    # Past an unconditional branch nothing runs until its target.
    ("a branch over code", _sass(
        "LDG.E R4, desc[UR4][R2.64]", "BRA `(.L_x_0)", "FADD R5, R4, R4", ".L_x_0:",
        "EXIT"), (0, 1, 0)),
    # A loop loading and using in the same trip: one round a trip. On the way through
    # (the body once) the load before the loop returns with the first trip's.
    ("a loop", _sass(
        "LDG.E R9, desc[UR4][R2.64]", ".L_x_0:", "LDG.E R4, desc[UR4][R2.64]",
        "FFMA R5, R4, R9, R5", "ISETP.NE.AND P0, PT, R2, R3, PT", "@P0 BRA `(.L_x_0)",
        "STG.E desc[UR4][R2.64], R5", "EXIT"), (1, 2, 1)),
    # A loop that loads the next trip's value before using this trip's: the wait is for a
    # load the previous trip issued, overlapped with that trip's work.
    ("a loop a load ahead", _sass(
        "LDG.E R4, desc[UR4][R2.64]", ".L_x_0:", "MOV R6, R4",
        "LDG.E R4, desc[UR4][R2.64+0x4]", "FADD R5, R5, R6",
        "@P0 BRA `(.L_x_0)", "STG.E desc[UR4][R2.64], R5", "EXIT"), (1, 2, 0)),
]


@pytest.mark.parametrize("sass,expected", [r[1:] for r in ROUNDS],
                         ids=[r[0] for r in ROUNDS])
def test_load_rounds_count_the_waits_for_global_loads(sass, expected):
  assert xla_floors.load_rounds(sass) == expected


def test_loop_ops_count_a_trips_barriers_copies_and_products():
  """In the first loop only: a barrier, two asynchronous copies (one past L1), two
  tensor-core products and a wait for the asynchronous one; the copy, barrier and wait
  after the loop are not in a trip."""
  sass = _sass("LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]", ".L_x_0:",
               "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]",
               "LDGSTS.E.64 [R1+0x10], desc[UR4][R2.64+0x10]", "LDGDEPBAR",
               "DEPBAR.LE SB0, 0x1", "BAR.SYNC.DEFER_BLOCKING 0x0",
               "WARPGROUP.ARRIVE", "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], R24, gsb0",
               "WARPGROUP.DEPBAR.LE gsb0, 0x0",
               "HMMA.16816.F32.BF16 R4, R8, R12, R4", "@P0 BRA `(.L_x_0)",
               "BAR.SYNC.DEFER_BLOCKING 0x0", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "EXIT")
  assert xla_floors.loop_ops(sass) == {"barriers": 1, "copies": 2, "past_l1": 1,
                                       "mma": 2, "mma_waits": 1}
  assert xla_floors.loop_ops(_sass("BAR.SYNC.DEFER_BLOCKING 0x0", "EXIT")) == {
      "barriers": 0, "copies": 0, "past_l1": 0, "mma": 0, "mma_waits": 0}


def test_rounds_group_the_measured_kernels():
  """Two loop-free kernels of one round, one of three and a loop: the loop and a kernel
  under 20 us are left out; the ratio is the measured time over the summed bounds."""
  row = dict(path=(10, 10), floor_ms=0.1, copy_ms=0.2, latency_ms=0.05)
  rows = [dict(row, name="a", rounds=1), dict(row, name="b", rounds=1, copy_ms=0.3),
          dict(row, name="c", rounds=3, latency_ms=0.8),
          dict(row, name="d", rounds=1, path=None), dict(row, name="e", rounds=2)]
  us = {"a": 210.0, "b": 290.0, "c": 400.0, "d": 900.0, "e": 19.0}
  groups = xla_floors.by_rounds(rows, us)
  assert [(g["rounds"], g["kernels"]) for g in groups] == [(1, 2), (3, 1)]
  assert groups[0]["measured_ms"] == pytest.approx(0.5)
  assert groups[0]["ratio"] == pytest.approx(0.5 / 0.5)
  assert groups[1]["ratio"] == pytest.approx(0.4 / 0.2)
  # The model takes the latency floor where it is the largest: c's 0.8.
  assert groups[0]["model_ratio"] == pytest.approx(0.5 / 0.5)
  assert groups[1]["model_ratio"] == pytest.approx(0.4 / 0.8)
  # Launch by launch, a 1.05, b 0.97, c 0.5 over the model (1.05, 0.97, 2.0 over the
  # bounds): the 10th percentile the smallest, the 50th the middle.
  text = xla_floors.spread(rows, us)
  assert text.startswith("3 launches; over the model 0.50 0.50 0.97 1.05 1.05; over "
                         "the bounds 0.97 0.97 1.05 2.00 2.00")


def test_functions_group_a_pallas_kernels_instances_and_keep_xlas_fusions_apart():
  """Launches of one Pallas kernel (qlhs_bn_sums, qlhs_bn_sums_1, ...) are one
  function; XLA's fusions (loop_convert_fusion, loop_convert_fusion_3) each their own;
  the most time above its bounds first, against hand sums."""
  assert xla_floors.function_family("qlhs_bn_sums_12") == "qlhs_bn_sums"
  assert xla_floors.function_family("qlhs_bn_sums_dot__6") == "qlhs_bn_sums_dot"
  assert xla_floors.function_family("loop_convert_fusion_3") == "loop_convert_fusion_3"
  row = dict(path=(10, 10), floor_ms=0.1, copy_ms=0.2, latency_ms=0.0)
  rows = [dict(row, name="s0", kernel="qlhs_bn_sums"),
          dict(row, name="s1", kernel="qlhs_bn_sums_1", copy_ms=0.3),
          dict(row, name="f", kernel="loop_convert_fusion"),
          dict(row, name="f3", kernel="loop_convert_fusion_3", floor_ms=0.5),
          dict(row, name="gone", kernel="qlhs_bn_sums_2")]
  us = {"s0": 600.0, "s1": 700.0, "f": 900.0, "f3": 600.0}
  groups = xla_floors.by_function(rows, us)
  assert [(g["function"], g["launches"]) for g in groups] == [
      ("qlhs_bn_sums", 2), ("loop_convert_fusion", 1), ("loop_convert_fusion_3", 1)]
  assert groups[0]["measured_ms"] == pytest.approx(1.3)
  assert groups[0]["bound_ms"] == pytest.approx(0.5)
  assert groups[0]["above_ms"] == pytest.approx(0.8)
  assert groups[0]["model_ms"] == pytest.approx(0.5)
  assert groups[1]["above_ms"] == pytest.approx(0.7)
  assert groups[2]["above_ms"] == pytest.approx(0.1)


CHASE_PTX = """.version 8.0
.target sm_90a
.address_size 64

.visible .entry chase(.param .u64 chase_p, .param .u64 chase_q)
{
	.reg .b64 %rd<6>;
	.reg .f32 %f<4>;
	ld.param.u64 %rd1, [chase_p];
	ld.param.u64 %rd2, [chase_q];
	cvta.to.global.u64 %rd3, %rd1;
	cvta.to.global.u64 %rd4, %rd2;
	ld.global.u64 %rd5, [%rd3];
	ld.global.f32 %f1, [%rd5];
	ld.global.f32 %f2, [%rd3+8];
	add.f32 %f3, %f1, %f2;
	st.global.f32 [%rd4], %f3;
	ret;
}

.visible .entry together(.param .u64 together_p, .param .u64 together_q)
{
	.reg .b64 %rd<5>;
	.reg .f32 %f<4>;
	ld.param.u64 %rd1, [together_p];
	ld.param.u64 %rd2, [together_q];
	cvta.to.global.u64 %rd3, %rd1;
	cvta.to.global.u64 %rd4, %rd2;
	ld.global.f32 %f1, [%rd3];
	ld.global.f32 %f2, [%rd3+8];
	add.f32 %f3, %f1, %f2;
	st.global.f32 [%rd4], %f3;
	ret;
}
"""


@needs_triton
def test_load_rounds_of_assembled_kernels():
  """ptxas may reorder loads, not a load through a pointer another load returns: the
  chase waits twice (for the pointer, then for the value through it, with the
  independent load beside one of them); two independent loads share one wait."""
  _, cubin = triton_compile.assemble(CHASE_PTX, "90a")
  sass = xla_floors.sass_by_entry(triton_compile._disassemble(cubin))
  assert xla_floors.load_rounds(sass["chase"]) == (2, 3, 0)
  assert xla_floors.load_rounds(sass["together"]) == (1, 2, 0)


@needs_triton
def test_assembled_kernels_wait_for_memory_as_their_loads_chain():
  """ptxas's scoreboards: the pointer chase waits for memory twice in turn, the two
  independent loads once; 500 more cycles a load add 1,000 and 500. The encoded
  listing, its hex taken out, is nvdisasm's plain one."""
  _, cubin = triton_compile.assemble(CHASE_PTX, "90a")
  plain = xla_floors.sass_by_entry(triton_compile._disassemble(cubin))
  encoded = xla_floors.sass_by_entry(triton_compile._disassemble(cubin, encodings=True))
  for name in ("chase", "together"):
    listing, controls = warp_cycles.split_hex(encoded[name])
    assert listing.split() == plain[name].split()
    ops, labels = xla_floors._listing(listing)
    assert len(controls) == len(ops)

  def cycles(name, mem):
    listing, controls = warp_cycles.split_hex(encoded[name])
    return warp_cycles.walk(*xla_floors._listing(listing), controls, mem)["cycles"]
  assert cycles("chase", 1500) - cycles("chase", 1000) == 1000
  assert cycles("together", 1500) - cycles("together", 1000) == 500


@needs_triton
def test_a_dump_folder_lists_its_functions(tmp_path):
  """A folder instead of a step's HLO: a line per function of its PTX files, in module
  order, with its rounds and loads; --match keeps the functions it names."""
  (tmp_path / "module_0012.jit_f.1.ptx").write_text(CHASE_PTX)
  (tmp_path / "module_0003.jit_g.1.ptx").write_text(PTX)
  out = xla_floors.functions_report(str(tmp_path)).splitlines()
  assert [line.split()[-2] for line in out[1:]] == ["loop_add_fusion_1", "chase",
                                                    "together"]
  chase = out[2].split()
  assert (chase[3], chase[4]) == ("2", "3")
  only = xla_floors.functions_report(str(tmp_path), match="^tog").splitlines()
  assert len(only) == 2 and "together (module_0012.jit_f.1.ptx)" in only[1]


def _looped_kernel(x_ref, o_ref):
  """Five trips of a loop holding a loop of four (a tile's loop over channel blocks)."""
  from jax import lax

  def trip(i, acc):
    return lax.fori_loop(0, 4, lambda j, a: a + x_ref[...] * j, acc) + i
  o_ref[...] = lax.fori_loop(0, 5, trip, x_ref[...] * 0)


def _plain_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2


def _sided_kernel(x_ref, o_ref):
  """After a loop of 5 trips, loops in turn (stencil._lags_kernel's sides): of 3 trips;
  of 1 holding one of 6 (the machine code's loop: the 6); of 1 (no loop); of 2."""
  from jax import lax
  add = lambda i, a: a + x_ref[...] * i
  acc = lax.fori_loop(0, 5, add, x_ref[...] * 0)
  acc = lax.fori_loop(0, 3, add, acc)
  acc = lax.fori_loop(0, 1, lambda i, a: lax.fori_loop(0, 6, add, a), acc)
  acc = lax.fori_loop(0, 1, add, acc)
  o_ref[...] = lax.fori_loop(0, 2, add, acc)


def test_pallas_loops_reads_each_calls_trip_counts_and_scope():
  """The traced program's Pallas calls, forward and backward: their names, grids, the
  trips of the first loop and of the loop nested in it, and the scope their HLO
  custom call's op_name holds."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import pallas as pl

  def call(kernel, name, x):
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(3,), name=name, interpret=True)(x)

  @jax.custom_vjp
  def op(x):
    return call(_sided_kernel, "qlhs_sides", call(_looped_kernel, "qlhs_fwd", x))

  def fwd(x):
    return op(x), x

  def bwd(x, g):
    return (call(_plain_kernel, "qlhs_bwd", g),)
  op.defvjp(fwd, bwd)

  def loss(x):
    with jax.named_scope("stage1_block0"):
      return op(x).sum()
  loops = xla_floors.pallas_loops(jax.jit(jax.grad(loss)).trace(
      jnp.ones((8, 128), jnp.float32)).jaxpr)
  assert [(d["name"], d["grid"], d["trips"], d["inner"], d["later"]) for d in loops] == [
      ("qlhs_fwd", [3], 5, 4, []), ("qlhs_sides", [3], 5, 1, [3, 6, 2]),
      ("qlhs_bwd", [3], 1, 1, [])]
  assert all("stage1_block0" in d["scope"] for d in loops)
  assert ["transpose(" in d["scope"] for d in loops] == [False, False, True]


def test_loop_trips_join_the_hlo_calls_by_name_part_and_direction():
  hlo = """HloModule m
ENTRY %main {
  %p = bf16[64,8]{1,0} parameter(0)
  %pallas_call.3 = bf16[64,8]{1,0} custom-call(%p), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/transpose(jvp(Net))/stage1_block0/bn_d/qlhs_k/pallas_call"}
  %pallas_call.1 = bf16[64,8]{1,0} custom-call(%p), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(Net)/stage1_block0/bn_d/qlhs_k/pallas_call"}
  ROOT %pallas_call.2 = bf16[64,8]{1,0} custom-call(%p), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(Net)/stage2_block0/bn_d/qlhs_k/pallas_call"}
}
"""
  loops = [{"scope": "jvp(Net)/stage1_block0/bn_d", "name": "qlhs_k", "trips": 96,
            "inner": 1},
           {"scope": "jvp(Net)/stage2_block0/bn_d", "name": "qlhs_k", "trips": 12,
            "inner": 4},
           {"scope": "transpose(jvp(Net))/stage1_block0/bn_d", "name": "qlhs_k",
            "trips": 48, "inner": 1, "later": [2, 2]}]
  # (a file written before "later" was recorded: none)
  assert xla_floors.loop_trips(hlo, loops) == {
      "pallas_call.1": (96, 1, ()), "pallas_call.2": (12, 4, ()),
      "pallas_call.3": (48, 1, (2, 2))}
  assert xla_floors.loop_trips(hlo, loops[:1]) == {"pallas_call.1": (96, 1, ())}


def test_a_warp_issues_its_listing_and_every_other_trip():
  """A listing of 100 instructions holding a loop of 30 that holds a loop of 8: run 5
  and 4 times, the outer body 4 more times, the inner 3 more times in each of 5 trips."""
  assert triton_compile.issued_a_warp(100, 30, 8, 5, 4) == 100 + 30 * 4 + 8 * 3 * 5
  assert triton_compile.issued_a_warp(100, 30, 0, 1, 1) == 100
  # then loops of 40 and 20 instructions, run 3 times and twice: 2 and 1 more
  assert triton_compile.issued_a_warp(100, 30, 8, 5, 4, [(40, 3), (20, 2)]) == (
      100 + 30 * 4 + 8 * 3 * 5 + 40 * 2 + 20)


@pytest.mark.parametrize("traced,nested,machine", [
    ((1, 16), False, (16, 1)),  # the one-trip loop folded: the first loop is the inner
    ((1, 16), True, (1, 16)),   # (a nested loop in the machine code: as traced)
    ((5, 4), True, (5, 4)),
    ((5, 1), False, (5, 1)),    # the inner loop of one trip folded
    ((1, 1), False, (1, 1)),
])
def test_the_machine_codes_loops_run_as_traced_less_the_folded_ones(traced, nested,
                                                                     machine):
  assert triton_compile.machine_trips(*traced, nested) == machine


def _one_pallas_launch(tmp_path, monkeypatch):
  """A step's HLO of one Pallas launch, qlhs_k at 100 programs of 128 threads."""
  path = tmp_path / "module_0001.jit_f.sm_9.0a_gpu_after_optimizations.txt"
  path.write_text("""HloModule m
ENTRY %main {
  %p = bf16[64,8]{1,0} parameter(0)
  ROOT %pallas_call.1 = bf16[64,8]{1,0} custom-call(%p), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/jvp(Net)/stage1_block0/qlhs_k/pallas_call"}
}
""")
  monkeypatch.setattr(hlo_bytes, "kernel_launches",
                      lambda _: {"pallas_call.1": ("qlhs_k", 100, 128)})
  return path


def test_floors_count_a_pallas_kernels_loops_as_often_as_they_run(tmp_path, monkeypatch):
  """With the step's loops a Pallas launch's floor counts every trip (5 of a 30-
  instruction loop, 4 of an 8-instruction loop in it), at 4 warps x 100 programs;
  without them its loop once."""
  path = _one_pallas_launch(tmp_path, monkeypatch)
  listing = xla_floors._listing(_sass(".L_x_0:", "FFMA R1, R2, R3, R1",
                                      "LDGSTS.E.BYPASS.LTC128B.128 [R4], desc[UR4][R2.64]",
                                      "@P0 BRA `(.L_x_0)", "EXIT"))
  stall_1 = {"stall": 1, "write": 7, "read": 7, "wait": 0}
  monkeypatch.setattr(xla_floors, "machine_code", lambda *_: {"qlhs_k": {
      "registers": 64, "instructions": 100, "loop": 30, "inner": 8, "path": None,
      "rounds": 1, "loads": 2, "loop_rounds": 1, "listing": listing,
      "controls": [stall_1] * 4, "shared": 0}})
  loops = [{"scope": "jvp(Net)/stage1_block0", "name": "qlhs_k", "grid": [100],
            "trips": 5, "inner": 4}]
  (row,) = xla_floors.floors(str(path), loops=loops, l2_bytes_per_s=1e12)
  assert row["trips"] == (5, 4)
  assert row["floor_ms"] == pytest.approx(
      triton_compile.issue_floor_ms(100 + 30 * 4 + 8 * 3 * 5, 0, 1, 4, 100))
  # The warp walks its loop 5 times (3 cycles a trip) and the EXIT: 16 cycles. At 64
  # registers an SM holds 8 blocks, so the 100 blocks are one wave with one block an SM:
  # its scheduler's warp issues 340 instructions, more than the 16 cycles it waits.
  assert row["warp_cycles"] == 16
  assert row["latency_ms"] == pytest.approx(340 / 1.98e9 * 1e3)
  # 16 bytes past L1 a trip, 5 trips, 128 threads x 100 blocks; at 1 TB/s from L2.
  assert row["past_l1_bytes"] == 16 * 5 * 128 * 100
  assert row["l2_ms"] == pytest.approx(16 * 5 * 128 * 100 / 1e12 * 1e3)
  assert xla_floors.modelled(dict(row, l2_ms=0.5)) == 0.5
  assert row["l2_ms"] > max(row["floor_ms"], row["copy_ms"], row["latency_ms"])
  assert xla_floors.modelled(row) == pytest.approx(row["l2_ms"])  # the L2's, here
  (once,) = xla_floors.floors(str(path))
  assert once["trips"] is None and once["l2_ms"] == 0.0  # no rate, no L2 bound
  assert once["floor_ms"] == pytest.approx(
      triton_compile.issue_floor_ms(100, 0, 1, 4, 100))
  # Traced, a loop of one trip holding a loop of 16 (stencil.product_a at one tile a
  # chunk); the machine code has one loop and nothing in it: that loop is the inner
  # one, run 16 times, not once.
  monkeypatch.setattr(xla_floors, "machine_code", lambda *_: {"qlhs_k": {
      "registers": 64, "instructions": 100, "loop": 30, "inner": 0, "path": None,
      "rounds": 1, "loads": 2, "loop_rounds": 1, "listing": listing,
      "controls": [stall_1] * 4, "shared": 0}})
  (folded,) = xla_floors.floors(str(path), loops=[dict(loops[0], trips=1, inner=16)])
  assert folded["trips"] == (16, 1)
  assert folded["floor_ms"] == pytest.approx(
      triton_compile.issue_floor_ms(100 + 30 * 15, 0, 1, 4, 100))
  assert folded["warp_cycles"] == 3 * 16 + 1
  assert folded["past_l1_bytes"] == 16 * 16 * 128 * 100


def test_floors_count_the_loops_after_the_first_as_often_as_they_run(tmp_path,
                                                                      monkeypatch):
  """A listing of 100 instructions whose first loop (30) runs 5 times, then a loop of 2
  instructions run 3 times (stencil._lags_kernel's sides after its tiles): 2 x 2 more
  instructions a warp; where the traced program has more loops after the first than the
  machine code (the compiler unrolled some), those run once; where the traced first
  loop has no loop at all, the machine code's first loop is the next traced one."""
  path = _one_pallas_launch(tmp_path, monkeypatch)
  listing = xla_floors._listing(_sass(".L_x_0:", "FFMA R1, R2, R3, R1",
                                      "@P0 BRA `(.L_x_0)", ".L_x_1:",
                                      "FFMA R4, R2, R3, R4", "@P1 BRA `(.L_x_1)", "EXIT"))
  stall_1 = {"stall": 1, "write": 7, "read": 7, "wait": 0}
  monkeypatch.setattr(xla_floors, "machine_code", lambda *_: {"qlhs_k": {
      "registers": 64, "instructions": 100, "loop": 30, "inner": 0, "path": None,
      "rounds": 1, "loads": 2, "loop_rounds": 1, "listing": listing,
      "controls": [stall_1] * 5, "shared": 0}})
  loop = {"scope": "jvp(Net)/stage1_block0", "name": "qlhs_k", "grid": [100],
          "trips": 5, "inner": 1}

  def floor(instructions):
    return pytest.approx(triton_compile.issue_floor_ms(instructions, 0, 1, 4, 100))
  (row,) = xla_floors.floors(str(path), loops=[dict(loop, later=[3])])
  assert row["trips"] == (5, 1) and row["later"] == ((2, 3),)
  assert row["floor_ms"] == floor(100 + 30 * 4 + 2 * 2)
  assert row["warp_cycles"] == 5 * 2 + 3 * 2 + 1  # 2 cycles a trip, then the EXIT
  (unrolled,) = xla_floors.floors(str(path), loops=[dict(loop, later=[3, 4])])
  assert unrolled["later"] == () and unrolled["floor_ms"] == floor(100 + 30 * 4)
  assert unrolled["warp_cycles"] == 5 * 2 + 2 + 1
  (old,) = xla_floors.floors(str(path), loops=[loop])  # a file without "later"
  assert old["later"] == () and old["floor_ms"] == floor(100 + 30 * 4)
  (first,) = xla_floors.floors(str(path), loops=[dict(loop, trips=1, later=[6, 3])])
  assert first["trips"] == (6, 1) and first["later"] == ((2, 3),)
  assert first["floor_ms"] == floor(100 + 30 * 5 + 2 * 2)
  assert first["warp_cycles"] == 6 * 2 + 3 * 2 + 1


def test_pallas_kernels_are_summed_by_function_every_trip_counted():
  def row(kernel, part, floor, copy, regs, warps, trips=(4, 1), loop=10, latency=0.0,
          past_l1=0):
    return {"kernel": kernel, "part": part, "floor_ms": floor, "copy_ms": copy,
            "registers": regs, "warps": warps, "trips": trips, "loop": loop,
            "latency_ms": latency, "past_l1_bytes": past_l1}
  rows = [row("qlhs_k", "stage1_block0", 0.3, 0.1, 128, 16, latency=0.5, past_l1=2e9),
          row("qlhs_k__1", "stage2_block1", 0.1, 0.2, 168, 8),
          row("qlhs_k__2", "stage2_block2", 0.1, 0.2, 170, 8),
          row("qlhs_du", "stage1_block0", 0.2, 0.1, 56, 36, trips=None, loop=0),
          row("qlhs_once", "stage1_block0", 9.0, 9.0, 64, 32, trips=None),  # not counted
          row("loop_add_fusion", "stage1_block0", 9.0, 9.0, 20, 64, trips=None, loop=0)]
  assert xla_floors.pallas_by_function(rows) == [
      {"function": "qlhs_k", "launches": 3, "floor_ms": pytest.approx(0.5),
       "copy_ms": pytest.approx(0.5), "bound_ms": pytest.approx(0.7),
       "latency_ms": pytest.approx(0.5), "model_ms": pytest.approx(0.9),
       "past_l1_gb": pytest.approx(2.0),
       "parts": {"stage1": ([128], [16]), "stage2": ([168, 170], [8])},
       # each launch's largest of floor, copy and latency, summed by part
       "part_model_ms": {"stage1": pytest.approx(0.5), "stage2": pytest.approx(0.4)}},
      {"function": "qlhs_du", "launches": 1, "floor_ms": 0.2, "copy_ms": 0.1,
       "bound_ms": 0.2, "latency_ms": 0.0, "model_ms": 0.2, "past_l1_gb": 0.0,
       "parts": {"stage1": ([56], [36])}, "part_model_ms": {"stage1": 0.2}}]

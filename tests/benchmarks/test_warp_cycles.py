"""``benchmarks.warp_cycles``: control codes decoded from nvdisasm's encodings, one warp
walked through a listing, and a launch's latency floor. Expected values are worked by
hand from the Volta-on control-code layout (bits 105-125 of an instruction) and the
walk's rules. Kernels assembled by ptxas are walked in test_xla_floors.py (beside the
PTX they share)."""

import pytest

from qlhs_jax.benchmarks import warp_cycles, xla_floors


@pytest.mark.parametrize("high,stall,write,read,wait", [
    # The high words of instructions ptxas emitted for qlhs_bn_sums_dot (sm_90a). Bits
    # 41-63 of the word hold the control code: 0x000fe2 >> 1 = 0x7f1: stall 1, yield,
    # write and read 7 (none), no wait.
    (0x000fe20000000800, 1, 7, 7, 0),            # LDC R1, c[0x0][0x28]
    (0x000e620000002500, 1, 1, 7, 0),            # S2R R0, SR_CTAID.X: 0x731, sets SB1
    (0x000fca0000000f00, 5, 7, 7, 0),            # MOV R22, 0x1: 0x7e5
    (0x016e680008000c00, 4, 1, 7, 0b010110),     # LDS.128: 0xb734, waits on SB1, 2, 4
    (0x082fe60000041894, 3, 7, 7, 0b000010),     # HMMA.16816: 0x417f3, waits on SB1
])
def test_control_codes_decode_by_hand(high, stall, write, read, wait):
  assert warp_cycles.control(high) == {"stall": stall, "write": write, "read": read,
                                       "wait": wait}


def _encoded(stall=1, write=7, read=7, wait=0) -> str:
  c = stall | 1 << 4 | write << 5 | read << 8 | wait << 11
  return f"0x{c << 41:016x}"


def _listing(*lines):
  """``(ops, labels, controls)`` of nvdisasm-style lines: a label ("L:") or ``(text,
  control fields)``."""
  text, controls = [], []
  for line in lines:
    if isinstance(line, str):
      text.append(f".{line}" if line.endswith(":") else line)
      continue
    op, fields = line
    text.append(f"        /*{16 * len(controls):04x}*/  {op} ;")
    controls.append(warp_cycles.control(int(_encoded(**fields), 16)))
  ops, labels = xla_floors._listing("\n".join(text))
  return ops, labels, controls


def test_split_hex_gives_the_plain_listing_and_each_instructions_control():
  hex_text = "\n".join([
      "//--------------------- .text.k --------------------------",
      ".L_x_0:",
      "        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;"
      "        /* 0x0000000402027981 */",
      f"                                                        /* {_encoded(2, 0)} */",
      "        /*0010*/                   @P0 BRA `(.L_x_0) ;"
      "        /* 0x0000000000008947 */",
      f"                                               /* {_encoded(5, wait=1)} */",
  ])
  plain, controls = warp_cycles.split_hex(hex_text)
  assert plain.splitlines() == [
      "//--------------------- .text.k --------------------------", ".L_x_0:",
      "        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;",
      "        /*0010*/                   @P0 BRA `(.L_x_0) ;"]
  assert controls == [{"stall": 2, "write": 0, "read": 7, "wait": 0},
                      {"stall": 5, "write": 7, "read": 7, "wait": 1}]
  ops, labels = xla_floors._listing(plain)
  assert [op for op, *_ in ops] == ["LDG.E", "BRA"] and labels == {".L_x_0": 0}


def test_a_warp_waits_its_stalls():
  """Issue times 0, 4, 6 and past the EXIT 7."""
  ops, labels, ctl = _listing(("FFMA R1, R2, R3, R1", dict(stall=4)),
                              ("FFMA R4, R2, R3, R4", dict(stall=2)), ("EXIT", {}))
  assert warp_cycles.walk(ops, labels, ctl, mem=100) == {"cycles": 7, "mma": 0,
                                                         "past_l1": 0}


def test_a_warp_waits_for_its_loads_scoreboard():
  """LDG at 0 releases SB0 at 100; the IADD issues at 1, the FADD that waits on SB0 at
  100, the EXIT at 101. A conversion's scoreboard takes its table's 15 cycles."""
  ops, labels, ctl = _listing(("LDG.E R2, desc[UR4][R4.64]", dict(write=0)),
                              ("IADD3 R5, R5, 0x1, RZ", {}),
                              ("FADD R3, R2, R3", dict(wait=0b1)), ("EXIT", {}))
  assert warp_cycles.walk(ops, labels, ctl, mem=100)["cycles"] == 102
  ops, labels, ctl = _listing(("F2F.BF16.F32 R2, R4", dict(write=3)),
                              ("FADD R3, R2, R3", dict(wait=0b1000)), ("EXIT", {}))
  assert warp_cycles.walk(ops, labels, ctl, mem=100)["cycles"] == 15 + 2
  # A store's read scoreboard: its register may be written again 10 cycles on.
  ops, labels, ctl = _listing(("STG.E desc[UR4][R4.64], R2", dict(read=2)),
                              ("MOV R2, RZ", dict(wait=0b100)), ("EXIT", {}))
  assert warp_cycles.walk(ops, labels, ctl, mem=100)["cycles"] == 10 + 2


def test_loops_run_as_often_as_they_run_and_the_nested_one_each_trip():
  ops, labels, ctl = _listing("L_x_0:", ("FFMA R1, R2, R3, R1", dict(stall=2)),
                              ("@P0 BRA `(.L_x_0)", {}), ("EXIT", {}))
  assert warp_cycles.walk(ops, labels, ctl, 100, trips=5)["cycles"] == 5 * 3 + 1
  assert warp_cycles.walk(ops, labels, ctl, 100)["cycles"] == 3 + 1
  ops, labels, ctl = _listing("L_x_0:", ("FFMA R1, R2, R3, R1", {}), "L_x_1:",
                              ("HMMA.16816.F32.BF16 R4, R8, R12, R4", {}),
                              ("@P1 BRA `(.L_x_1)", {}), ("@P0 BRA `(.L_x_0)", {}),
                              ("EXIT", {}))
  assert warp_cycles.loops(ops, labels) == ((0, 3), (1, 2))
  # A trip: the FFMA, 4 x (HMMA, branch), the branch back: 10 cycles; 3 trips, EXIT.
  assert warp_cycles.walk(ops, labels, ctl, 100, trips=3, inner_trips=4) == {
      "cycles": 31, "mma": 12, "past_l1": 0}


def test_loops_one_after_another_run_as_often_as_each_runs():
  """A first loop holding a loop, then two loops in turn (stencil._lags_kernel's sides
  after its tiles' loop): later_loops finds the two, not the nested one, and the walk
  runs each as often as ``later`` says; without ``later`` once each."""
  ops, labels, ctl = _listing("L_x_0:", ("FFMA R1, R2, R3, R1", {}), "L_x_1:",
                              ("FFMA R4, R2, R3, R4", {}), ("@P1 BRA `(.L_x_1)", {}),
                              ("@P0 BRA `(.L_x_0)", {}), "L_x_2:",
                              ("FFMA R5, R2, R3, R5", dict(stall=3)),
                              ("@P2 BRA `(.L_x_2)", {}), "L_x_3:",
                              ("FFMA R6, R2, R3, R6", dict(stall=5)),
                              ("@P3 BRA `(.L_x_3)", {}), ("EXIT", {}))
  assert warp_cycles.loops(ops, labels) == ((0, 3), (1, 2))
  assert warp_cycles.later_loops(ops, labels) == [(4, 5), (6, 7)]
  # first loop: 2 trips of (FFMA, 3 x (FFMA, branch), branch) = 2 x 8; then 4 trips of
  # 3 + 1 cycles, 2 trips of 5 + 1, the EXIT
  assert warp_cycles.walk(ops, labels, ctl, 100, trips=2, inner_trips=3,
                          later=(4, 2))["cycles"] == 2 * 8 + 4 * 4 + 2 * 6 + 1
  assert warp_cycles.walk(ops, labels, ctl, 100, trips=2,
                          inner_trips=3)["cycles"] == 2 * 8 + 4 + 6 + 1
  with pytest.raises(ValueError, match="trips for 3 later loops, but the listing has 2"):
    warp_cycles.walk(ops, labels, ctl, 100, later=(4, 2, 2))


def test_a_cp_async_wait_lets_the_newest_groups_run_on():
  """Two groups committed at 1 and 3 (their copies issued at 0 and 2) are done at 100
  and 102: DEPBAR.LE SB0, 1 waits for the first only, SB0, 0 for both."""
  def walk(keep):
    ops, labels, ctl = _listing(("LDGSTS.E [R1], desc[UR4][R2.64]", {}),
                                ("LDGDEPBAR", {}),
                                ("LDGSTS.E [R1+0x100], desc[UR4][R4.64]", {}),
                                ("LDGDEPBAR", {}), (f"DEPBAR.LE SB0, 0x{keep:x}", {}),
                                ("EXIT", {}))
    return warp_cycles.walk(ops, labels, ctl, mem=100)["cycles"]
  assert walk(1) == 100 + 2
  assert walk(0) == 102 + 2
  assert walk(2) == 4 + 2  # both may still run: no wait
  # A commit's own scoreboard (ptxas gives LDGDEPBAR one) is released with its group:
  # waiting on it waits for the copies, not for a load's latency from the commit.
  ops, labels, ctl = _listing(("LDGSTS.E [R1], desc[UR4][R2.64]", {}), ("NOP", {}),
                              ("LDGDEPBAR", dict(write=0)), ("NOP", dict(wait=0b1)),
                              ("EXIT", {}))
  assert warp_cycles.walk(ops, labels, ctl, mem=100)["cycles"] == 100 + 2


def test_latencies_follow_the_table_by_opcode():
  assert warp_cycles.latency("LDG.E.128.CONSTANT", 800) == 800
  assert warp_cycles.latency("RED.E.ADD.F32.FTZ.RN", 800) == 800
  assert warp_cycles.latency("REDUX.SUM", 800) == 25  # a warp's reduction, not memory
  assert warp_cycles.latency("LDSM.16.MT88.4", 800) == 30
  assert warp_cycles.latency("LDC.64", 800) == 15
  assert warp_cycles.latency("VOTEU.ANY", 800) == warp_cycles.OTHER_LATENCY


def test_copies_past_l1_are_counted_every_trip():
  """A 16-byte copy past L1 and an 8-byte one through it, 6 trips: 96 bytes from L2."""
  ops, labels, ctl = _listing(
      "L_x_0:", ("LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64]", {}),
      ("LDGSTS.E.64 [R1+0x800], desc[UR4][R4.64]", {}), ("LDGDEPBAR", {}),
      ("@P0 BRA `(.L_x_0)", {}), ("EXIT", {}))
  assert warp_cycles.walk(ops, labels, ctl, 100, trips=6)["past_l1"] == 6 * 16


def test_a_loop_without_an_exit_is_refused():
  ops, labels, ctl = _listing("L_x_0:", ("NOP", {}), ("BRA `(.L_x_0)", {}))
  with pytest.raises(RuntimeError, match="without an exit"):
    warp_cycles.walk(ops, labels, ctl, 100, trips=10**9, limit=1000)


@pytest.mark.parametrize("warp,issued,blocks,resident,wave", [
    # 1,056 blocks of 4 warps at 8 warps an SM: 2 blocks an SM, 4 waves; a scheduler
    # holds 2 warps: 2 x 300 issued, 2 x 50 x 6 for the tensor core, or the warp's 1,000.
    ({"cycles": 1000, "mma": 50}, 300, 1056, 8, 4 * 1000),
    ({"cycles": 1000, "mma": 100}, 300, 1056, 8, 4 * 1200),   # the tensor core's
    ({"cycles": 1000, "mma": 0}, 700, 1056, 8, 4 * 1400),     # the issue's
    # 66 blocks: one a scheduler's worth on half the SMs, one wave.
    ({"cycles": 1000, "mma": 0}, 1200, 66, 8, 1200),
    # 401,408 blocks at 28 warps an SM: 7 blocks, 435 waves, 7 warps a scheduler.
    ({"cycles": 3000, "mma": 0}, 241, 401408, 28, 435 * 3000),
])
def test_the_latency_floor_by_hand(warp, issued, blocks, resident, wave):
  assert warp_cycles.floor_ms(warp, issued, blocks, 128, resident) == pytest.approx(
      wave / 1.98e9 * 1e3)


def test_the_way_takes_branches_as_a_thread_whose_bounds_tests_pass():
  """An unconditional branch forward is taken, a conditional one is not, a predicated
  EXIT goes on, a branch back is a loop, a branch to itself (the trap loop) ends it."""
  ops, labels, _ = _listing(("@P0 BRA `(.L_x_1)", {}), ("BRA `(.L_x_1)", {}),
                            ("@P1 EXIT", {}), "L_x_1:", ("NOP", {}),
                            ("@P2 BRA `(.L_x_1)", {}), ("EXIT", {}), "L_x_2:",
                            ("BRA `(.L_x_2)", {}))
  assert [warp_cycles.way(ops, labels, i) for i in range(len(ops))] == [
      ("next", 1), ("next", 3), ("next", 3), ("next", 4), ("back", 3), ("exit", 5),
      ("exit", 6)]

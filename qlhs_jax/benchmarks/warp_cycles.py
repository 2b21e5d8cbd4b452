"""How many cycles one warp of a kernel needs, from the control codes in its machine code:
a launch's latency floor, where the issue floor (``triton_compile.issue_floor_ms``) and
the copy time are the other two bounds (``benchmarks.xla_floors``).

Why: the issue floor assumes a scheduler always has a warp ready. With few warps an SM
(the stack's dot kernels hold 8, two a scheduler) a warp's own waits can leave the
scheduler idle: for a stall the compiler set, for a shared-memory load, for memory.
From Volta on, every 128-bit instruction carries its control code in bits 105-125
(Jia et al., "Dissecting the NVIDIA Volta GPU Architecture via Microbenchmarking", 2018;
the same layout on Hopper): the stall, the cycles the warp waits before it issues its
next instruction (ptxas covers fixed-latency dependencies with it: an FMA's, an
HMMA's); a write scoreboard (0-5, 7 none) that a variable-latency instruction (a load,
a conversion, S2R) releases when its result is written; a read scoreboard, released
when its operands are read (a store's); and the scoreboards this instruction waits on.
``nvdisasm -hex`` prints them.

:func:`walk` takes one warp along the way a thread takes when every bounds test passes
(:func:`way`, which ``xla_floors.load_rounds`` follows too), each loop as often as it
runs where the trips are known (``xla_floors.pallas_loops``; else once), and times it:
an instruction issues after the previous one's stall and after the scoreboards it waits
on are released; a cp.async group (LDGDEPBAR) is complete ``mem`` cycles after its last
copy issued, and DEPBAR.LE SB0, N waits until at most N groups are not. Latencies:
:data:`LATENCY`, rounded from published microbenchmarks of Ampere and Hopper (shared
memory ~30 cycles, S2R ~25, a conversion ~15), except memory's, ``mem``, one figure for
every global load whether it hits a cache or not, fitted to a measured profile
(``xla_floors.fit_mem``).

A warp alone, so a lower bound: :func:`floor_ms` takes a launch's waves (blocks over
what 132 SMs hold at once) times the largest of the warp's cycles, the instructions its
scheduler must issue for the warps it holds, and their tensor-core time. Not modelled:
warps of one scheduler delaying each other (issue slots are counted, order is not), bank
conflicts, a loaded memory's longer latency beyond ``mem``, and Hopper's asynchronous
HGMMA and TMA (XLA's GEMM fusions: their waits count as stalls only).
"""

from __future__ import annotations

import math
import re

from qlhs_jax.benchmarks import triton_compile

# An H100's clock, SMs and schedulers an SM, as triton_compile's issue floor takes them.
SCHEDULERS = 4
CLOCK_HZ = triton_compile.H100_CLOCK_HZ
SMS = triton_compile.H100_SCHEDULERS // SCHEDULERS
_HEX_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+.*?/\* (0x[0-9a-f]{16}) \*/\s*$")
_HEX_HIGH = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/\s*$")
_HEX_COMMENT = re.compile(r"\s*/\* 0x[0-9a-f]{16} \*/")
NONE = 7  # a scoreboard field's "none"

# Cycles from issue to a variable-latency instruction's scoreboard release, by opcode
# prefix (first match). MEM stands for the global loads' figure (``mem``).
MEM = "mem"
LATENCY = (("LDGSTS", MEM), ("LDG", MEM), ("LD.", MEM), ("ATOMG", MEM), ("ATOM.", MEM),
           ("RED.", MEM), ("LDL", 35), ("LDSM", 30), ("LDS", 30), ("ATOMS", 30),
           ("S2R", 25), ("S2UR", 25), ("SHFL", 25), ("REDUX", 25), ("MATCH", 25),
           ("LDC", 15), ("MUFU", 15), ("F2F", 15), ("I2F", 15), ("F2I", 15),
           ("FRND", 15), ("I2I", 15), ("POPC", 15), ("FLO", 15), ("BREV", 15))
# A global load's cycles, the default of ``mem``: fitted so that the H200's profiled
# kernels without a loop (78 of 20 us or more, experiment 23's step at 6e0def0) add up
# to their measured time (14.46 ms modelled, 14.47 measured); 404 ns at 1.98 GHz.
MEM_CYCLES = 800.0
# An HMMA.16816 (2,048 multiply-adds) occupies its scheduler's tensor core this long:
# the stall ptxas sets between two independent ones on sm_90a (the lags' and the sums'
# loops), the interval it schedules one warp's products at. Two warps of one scheduler
# share that tensor core, so their products queue: an assumption, not a measurement.
MMA_CYCLES = 6
OTHER_LATENCY = 20  # any other instruction that sets a write scoreboard
READ_LATENCY = 10  # a read scoreboard: the operands of a store or copy are read


def control(high: int) -> dict:
  """The control code of one instruction from its encoding's high 64 bits: ``stall``
  (cycles before the warp's next instruction), ``write`` and ``read`` (scoreboards it
  releases, 7 none) and ``wait`` (a bit per scoreboard it waits on)."""
  c = high >> 41  # bits 105-127 of the 128-bit instruction
  return {"stall": c & 15, "write": (c >> 5) & 7, "read": (c >> 8) & 7,
          "wait": (c >> 11) & 63}


def split_hex(text: str) -> tuple[str, list[dict]]:
  """``(listing, controls)`` from ``nvdisasm -hex``'s text: the listing as plain
  ``nvdisasm -c`` prints it, and each instruction's :func:`control`, in order."""
  lines = text.splitlines()
  plain, controls = [], []
  for i, line in enumerate(lines):
    if _HEX_HIGH.match(line):
      continue  # an instruction's second word, read with its first
    if _HEX_LINE.match(line):
      high = _HEX_HIGH.match(lines[i + 1]) if i + 1 < len(lines) else None
      if high is None:
        raise ValueError(f"no second word after instruction: {line.strip()}")
      controls.append(control(int(high.group(1), 16)))
    plain.append(_HEX_COMMENT.sub("", line))
  return "\n".join(plain), controls


def latency(op: str, mem: float) -> float:
  """Cycles until a variable-latency instruction ``op`` releases its write scoreboard."""
  for prefix, cycles in LATENCY:
    if op.startswith(prefix):
      return mem if cycles == MEM else cycles
  return OTHER_LATENCY


def copy_bytes(op: str) -> int:
  """The bytes a thread moves with one copy or load ``op``: .128 16, .64 8, else 4."""
  return 16 if ".128" in op else 8 if ".64" in op else 4


def way(ops, labels, i) -> tuple[str, int]:
  """Where the way a thread takes when every bounds test passes goes after instruction
  ``i`` of a listing (``xla_floors._listing``'s ``ops`` and ``labels``): ``("exit",
  i)`` at an EXIT or the trap loop after the last one (a branch to itself), ``("back",
  target)`` at a branch back (a loop), else ``("next", index)``: an unconditional
  branch's target, or the next instruction (a conditional branch forward is taken as
  not taken, a predicated EXIT too: the threads that work go on)."""
  op, conditional, target, _ = ops[i]
  if op == "EXIT" and not conditional:
    return "exit", i
  if op == "BRA" and target is not None:
    to = labels.get(target, i + 1)
    if to == i:
      return "exit", i
    if to < i:
      return "back", to
    if not conditional:
      return "next", to
  return "next", i + 1


def loops(ops, labels) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
  """``(first, inner)``: a listing's first loop and the first loop nested in it, each
  ``(start, index of its branch back)`` (None without), as ``triton_compile.first_loop``
  and ``inner_loop`` find them: the first label with a branch back to it, its first."""
  backs = [(to, j) for j in range(len(ops)) for kind, to in [way(ops, labels, j)]
           if kind == "back"]
  if not backs:
    return None, None
  first = min(backs)
  inner = [b for b in backs if first[0] < b[0] and b[1] < first[1]]
  return first, (min(inner) if inner else None)


def later_loops(ops, labels) -> list[tuple[int, int]]:
  """The loops after :func:`loops`' first that no other loop holds, in the listing's
  order, each ``(start, index of its branch back)``: a kernel's loops one after another
  (``stencil._lags_kernel``'s four over the image sides, after its loop over tiles)."""
  backs = sorted((to, j) for j in range(len(ops)) for kind, to in [way(ops, labels, j)]
                 if kind == "back")
  if not backs:
    return []
  first = min(backs)
  return [b for b in backs if b[0] > first[1]
          and not any(o != b and o[0] <= b[0] and b[1] < o[1] for o in backs)]


def walk(ops, labels, controls, mem: float, trips: int = 1, inner_trips: int = 1,
         limit: int = 50_000_000, later: tuple[int, ...] = ()) -> dict:
  """One warp from entry to EXIT (see the module's docstring): ``{"cycles", "mma",
  "past_l1"}``, its cycles, the tensor-core products (HMMA) it issues and the bytes a
  thread copies past L1 (16-byte cp.async, LDGSTS.BYPASS: each a read from L2, which
  no floor here counts). ``ops`` and ``labels`` as
  ``xla_floors._listing`` gives them, ``controls`` from :func:`split_hex`, the first
  loop run ``trips`` times and the loop nested in it ``inner_trips`` times a trip;
  ``later``: the trips of each of :func:`later_loops`, or () (other loops once)."""
  if len(ops) != len(controls):
    raise ValueError(f"{len(ops)} instructions but {len(controls)} control codes")
  first, inner = loops(ops, labels)
  runs = {}
  if first:
    runs[first[1]] = trips
  if inner:
    runs[inner[1]] = inner_trips
  if later:
    after = later_loops(ops, labels)
    if len(after) != len(later):
      raise ValueError(f"trips for {len(later)} later loops, but the listing has "
                       f"{len(after)}")
    runs.update({back: n for (_, back), n in zip(after, later)})
  ready = [0.0] * 8  # when each scoreboard is released
  groups: list[float] = []  # committed cp.async groups not yet waited for: when done
  copies = -1.0  # the last cp.async issued since the last commit (-1: none)
  taken: dict[int, int] = {}
  t, i, steps, mma, past_l1 = 0.0, 0, 0, 0, 0
  while i < len(ops):
    steps += 1
    if steps > limit:
      raise RuntimeError(f"more than {limit} instructions walked: a loop without an exit")
    op, _, _, rest = ops[i]
    c = controls[i]
    mma += op.startswith("HMMA")
    at = max([t] + [ready[b] for b in range(6) if c["wait"] >> b & 1])
    if op.startswith("DEPBAR"):
      m = re.search(r"SB0,\s*(0x[0-9a-f]+|\d+)", rest)
      if m:
        cut = max(len(groups) - int(m.group(1), 0), 0)  # all but the newest N are done
        at = max([at] + groups[:cut])
        groups = groups[cut:]
    done = at + latency(op, mem)  # when its write scoreboard is released
    if op.startswith("LDGSTS"):
      copies = at
      past_l1 += copy_bytes(op) if "BYPASS" in op else 0
    elif op == "LDGDEPBAR":  # its scoreboard counts the group's copies
      done = copies + mem if copies >= 0 else at
      groups.append(done)
      copies = -1.0
    if c["write"] != NONE:
      ready[c["write"]] = max(ready[c["write"]], done)
    if c["read"] != NONE:
      ready[c["read"]] = max(ready[c["read"]], at + READ_LATENCY)
    t = at + max(c["stall"], 1)
    kind, to = way(ops, labels, i)
    if kind == "exit":
      break
    if kind == "back":  # again, as often as the loop runs
      taken[i] = taken.get(i, 0) + 1
      if taken[i] < runs.get(i, 1):
        i = to
        continue
      taken[i], to = 0, i + 1
    i = to
  return {"cycles": t, "mma": mma, "past_l1": past_l1}


def floor_ms(warp: dict, issued: float, blocks: int, threads: int,
             resident: int) -> float:
  """A launch's latency floor in ms: its waves (``blocks`` over the 132 SMs' blocks at
  ``resident`` warps an SM) times the largest of one warp's cycles (``warp``, from
  :func:`walk`), the instructions (``issued`` a warp) a scheduler issues for its share
  of an SM's warps, and the cycles its tensor cores take for their products
  (:data:`MMA_CYCLES` an HMMA), at 1.98 GHz."""
  warps = math.ceil(threads / 32)
  per_sm = max(resident // warps, 1)
  waves = math.ceil(blocks / (SMS * per_sm))
  busy = max(min(per_sm, math.ceil(blocks / SMS)) * warps / SCHEDULERS, 1.0)
  wave = max(warp["cycles"], issued * busy, warp["mma"] * MMA_CYCLES * busy)
  return waves * wave / CLOCK_HZ * 1e3

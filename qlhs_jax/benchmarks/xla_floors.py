"""``python -m qlhs_jax.benchmarks.xla_floors DUMP/...gpu_after_optimizations.txt [--top
30]``: what bounds each kernel of a compiled step, from its machine code, no GPU.

``benchmarks.triton_compile`` reads the Pallas kernels' machine code; this reads every
kernel XLA itself emits (its loop, reduction and transpose fusions, its Triton GEMM
fusions, and the Pallas kernels as XLA compiles them). Dump a deviceless compile with
the PTX (``--xla_dump_emitter_re`` is what makes this XLA write it)::

  XLA_FLAGS="--xla_dump_to=D --xla_dump_emitter_re=.* --xla_gpu_dump_llvmir=true" \\
    python -m qlhs_jax.benchmarks.aot --model eq3_softball_ds --set fuse_d_bn=auto \\
    --input uint8
  python -m qlhs_jax.benchmarks.xla_floors \\
    D/module_0001.jit_train_step.sm_9.0a_gpu_after_optimizations.txt

(jax[cuda13] or jax[cuda12] for the compile, ``pip install triton==3.9.0`` for its ptxas
and nvdisasm; PTX newer than its ptxas knows, e.g. 9.5 from jax 0.12.1's CUDA 13 plugin,
is assembled by the plugin's own ptxas.)
For each launch of the step (``hlo_bytes.kernel_launches``) it assembles the launched
function's PTX for sm_90a and prints its registers a thread, the warps an H100 SM can
hold at that count, its machine instructions a thread, the issue floor of the launch
(``triton_compile.issue_floor_ms``: every warp instruction issued at one a cycle per
scheduler) and the time an H100 needs to copy the kernel's bytes (``hlo_bytes``: operands
and results, at ``kernel_times``'s 3.0 TB/s). A kernel measured near the larger of the
two is bound by it; one far above both is bound by neither: latency, too few warps to
hide it, or a cache. A thread issues the instructions on its way from the entry to an
EXIT, not the whole listing (XLA's concatenate kernels branch per operand): the floor
counts the shortest way (:func:`path_lengths`). A kernel with a loop (reductions,
matmuls, the stencil kernels) counts its listing and its loop once, so its floor is a
lower bound; with ``--loops`` (the ``.pallas_loops.json`` that ``benchmarks.aot
--hlo-dir`` writes for the same compile: each Pallas kernel's trip counts, from the
traced step, :func:`pallas_loops`) the Pallas kernels' loops count as often as they run.

A third bound, the latency floor (``benchmarks.warp_cycles``): one warp walked through
its machine code by the control codes ptxas set (stalls, scoreboards, cp.async groups),
a global load ``--mem`` cycles (default ``warp_cycles.MEM_CYCLES``, 800: fitted with
``--fit-mem`` so that the H200's profiled loop-free kernels add up to their measured
time), times the launch's waves. Where a kernel holds few warps an SM, a warp's own
waits leave its scheduler idle: the floor counts them. :func:`modelled`, the largest
of the three, is the latency model of a launch's time.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re

from qlhs_jax.benchmarks import hlo_bytes, kernel_times, triton_compile, warp_cycles

# H100 SM: 65,536 registers, at most 64 warps and 32 blocks; registers are handed out per
# warp in units of 256 (8 a thread).
SM_REGISTERS, SM_WARPS, SM_BLOCKS, REGISTER_UNIT = 65536, 64, 32, 256
# An H100 SM's shared memory (228 KiB at the largest carveout) and what the system
# reserves of it for each resident block (1 KiB).
SM_SHARED, BLOCK_SHARED_RESERVED = 228 * 1024, 1024
_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_THREADS = re.compile(r"\.entry\s+(\w+)\s*\([^{]*?\.(?:req|max)ntid\s+(\d+)", re.S)
_SASS_SECTION = re.compile(r"^//-+ \.text\.(\S+)\s+-+$", re.M)


def resident_warps(registers: int, threads: int, shared: int = 0) -> int:
  """Warps of blocks of ``threads`` that one H100 SM holds at ``registers`` a thread
  and ``shared`` bytes of shared memory a block: registers, warps, blocks and shared
  memory are the limits. (Until 2026-12-07 shared memory was not counted, and the
  latency model took the dot forms' kernels at up to 10x the warps an SM holds of
  them: benchmarks/NOTES.md, experiment 54.)"""
  warps = math.ceil(threads / 32)
  per_warp = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
  blocks = min(SM_REGISTERS // (per_warp * warps), SM_BLOCKS, SM_WARPS // warps)
  if shared:
    blocks = min(blocks, SM_SHARED // (shared + BLOCK_SHARED_RESERVED))
  return blocks * warps


def _by_entry(report: str, pattern: str) -> dict[str, int]:
  """``{function: the number ``pattern`` captures in its part of ptxas -v's report}``,
  0 where it does not match."""
  out = {}
  parts = _PTXAS_ENTRY.split(report)  # [head, name, text, name, text, ...]
  for name, text in zip(parts[1::2], parts[2::2]):
    used = re.search(pattern, text)
    out[name] = int(used.group(1)) if used else 0
  return out


def shared_by_entry(report: str) -> dict[str, int]:
  """``{function: bytes of static shared memory}`` from ptxas -v's report."""
  return _by_entry(report, r"(\d+) bytes smem")


def dynamic_shared(ptx_path: str, name: str) -> int:
  """Bytes of dynamic shared memory that XLA launches the Triton kernel ``name`` with
  (Pallas's kernels, whose PTX declares it extern): ``ttg.shared`` of the kernel's
  Triton IR that XLA dumped beside ``ptx_path`` (``*.{name}.triton-to-llvm.txt``);
  0 where there is none."""
  for path in glob.glob(os.path.join(os.path.dirname(ptx_path),
                                     f"*.{name}.triton-to-llvm.txt")):
    with open(path) as f:
      found = re.search(r"ttg\.shared = (\d+)", f.read())
    if found:
      return int(found.group(1))
  return 0


def registers_by_entry(report: str) -> dict[str, int]:
  """``{function: registers a thread}`` from ptxas -v's report."""
  return _by_entry(report, r"Used (\d+) registers")


def sass_by_entry(sass: str) -> dict[str, str]:
  """``{function: its disassembly}`` from nvdisasm's listing of a cubin."""
  parts = _SASS_SECTION.split(sass)
  return dict(zip(parts[1::2], parts[2::2]))


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-7T] )?([A-Z][A-Z0-9_.]*)(.*)$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def _listing(sass: str) -> tuple[list[tuple[str, bool, str | None, str]], dict[str, int]]:
  """A disassembly's instructions, ``(opcode, predicated, branch target or None,
  operands)`` each, and ``{label: index of the instruction after it}``."""
  ops, labels = [], {}
  for line in sass.splitlines():
    label = _LABEL.match(line.strip())
    if label:
      labels[label.group(1)] = len(ops)
      continue
    m = _LINE.match(line)
    if m:
      pred = (m.group(2) or "").strip()
      target = _TARGET.search(m.group(4))
      ops.append((m.group(3), pred not in ("", "@PT"), target.group(1) if target else None,
                  m.group(4)))
  return ops, labels


def path_lengths(sass: str) -> tuple[int, int] | None:
  """``(shortest, longest)``: the machine instructions a thread issues on its shortest
  and longest way from the entry to its last EXIT, for a function without loops; None if
  it has one (a branch back, other than the trap loop after the last EXIT). XLA's
  concatenate kernels branch per operand: a thread runs one branch, not the whole
  listing. A predicated EXIT (the threads past the end of a launch that does not divide
  the work) is taken as not taken: the threads that work go on."""
  ops, labels = _listing(sass)
  n = len(ops)
  big = 1 << 30
  # Instructions from i to an EXIT, over the branches forward: fewest and most.
  shortest, longest = [big] * (n + 1), [-big] * (n + 1)  # past the end: no EXIT
  for i in range(n - 1, -1, -1):
    op, conditional, target, _ = ops[i]
    nexts = [] if op == "EXIT" and not conditional else [i + 1]
    if op == "BRA" and target is not None:
      t = labels.get(target, -1)
      if t == i:  # the trap loop after the last EXIT: a branch to itself
        continue
      if t < i:
        return None  # a loop
      nexts = [t, i + 1] if conditional else [t]
    last = op == "EXIT" and not conditional
    lo = [1 + shortest[j] for j in nexts] + ([1] if last else [])
    hi = [1 + longest[j] for j in nexts] + ([1] if last else [])
    shortest[i], longest[i] = min(min(lo), big), max(max(hi), -big)
  if shortest[0] >= big:
    return None
  return shortest[0], longest[0]


_REGISTER = re.compile(r"(?<![A-Za-z_])R(\d+)(\.64)?")
# Opcodes without a register result: their first operand is read (an address, a value).
_NO_RESULT = ("ST", "RED.", "BRA", "EXIT", "BAR", "MEMBAR", "NOP", "RET", "CALL", "WARPSYNC",
              "ISETP", "FSETP", "HSETP", "DSETP", "PLOP3", "VOTE", "ACQBULK", "ERRBAR",
              "LDGSTS")


def _global_load(op: str) -> bool:
  """A load from global (or generic) memory, whose result a thread waits for: LDG, LD."""
  if op.startswith("LDG"):
    return not op.startswith(("LDGSTS", "LDGDEPBAR"))  # copies to shared memory
  return op.split(".")[0] == "LD"


def _width(op: str) -> int:
  """Registers an opcode's result (or a store's value) spans: .64 two, .128 four."""
  if ".128" in op:
    return 4
  if ".64" in op or ".WIDE" in op or op == "CS2R":
    return 2
  return 1


def _operands(op: str, rest: str) -> tuple[set[int], set[int]]:
  """``(written, read)`` registers of one instruction (``rest``: its operands)."""
  parts = [p.strip() for p in rest.split(";")[0].split(",")]
  written, read = set(), set()
  first_is_result = not op.startswith(_NO_RESULT)
  for i, part in enumerate(parts):
    for m in _REGISTER.finditer(part):
      r = int(m.group(1))
      if i == 0 and first_is_result and m.start() == 0:
        written.update(range(r, r + _width(op)))
      elif m.group(2):  # an address of two registers
        read.update((r, r + 1))
      elif op.startswith("ST") and i == len(parts) - 1:  # the stored value
        read.update(range(r, r + _width(op)))
      else:
        read.add(r)
  return written, read


def load_rounds(sass: str) -> tuple[int, int, int]:
  """``(rounds, loads, loop_rounds)``: how often a thread waits for global loads in turn.

  A warp issues in order: an instruction that reads (or overwrites) a register a global
  load has not yet filled stalls it until the load returns. Each such wait is a round
  trip to memory; the loads issued before it share it. Along the way a thread takes when
  every bounds test passes (a conditional branch not taken, an unconditional one taken,
  a predicated EXIT not taken), ``rounds`` counts the waits and ``loads`` the global
  loads, the first loop's body once; ``loop_rounds`` counts the waits of one trip of the
  first loop for loads of that same trip (its body swept twice, the second counted): a
  loop that loads the next trip's operands before it computes on this trip's waits for
  loads its previous trip issued, which that trip's work overlapped, and counts 0. 0
  without a loop.

  A kernel that loads each of nine taps after the last one returned has ~9 rounds; one
  that issues its loads together and then uses them, 1. On the H200 (NOTES.md,
  experiment 39), 19 of the step's 21 loop-free kernels with one round ran at
  0.97-1.06x the larger of their copy time and issue floor, 49 of the 57 with more at
  1.31-2.02x. ptxas decides it: it may move loads down to their uses to keep a
  thread's registers few, whatever order the PTX has. A round on loads that hit L1
  costs little, so the count is an upper bound on the trips to memory."""
  ops, labels = _listing(sass)

  def sweep(start, stop, pending, trip=0):
    """Walks ops[start:stop] along the bounds-passing way, ``pending`` {register: the
    trip whose load fills it}; returns (waits, waits for this trip's loads, loads, back):
    back is (loop start, loop end) at the first branch back, else None."""
    waits = own = loads = 0
    i = start
    while i < stop:
      op, _, _, rest = ops[i]
      kind, to = warp_cycles.way(ops, labels, i)
      if kind == "exit":
        break
      if kind == "back":
        return waits, own, loads, (to, i)
      written, read = _operands(op, rest)  # none for a branch
      waited = [pending[r] for r in written | read if r in pending]
      if waited:  # the warp stalls; the loads issued with these have returned too
        waits += 1
        own += trip in waited
        pending.clear()
      if _global_load(op):
        loads += 1
        pending.update(dict.fromkeys(written, trip))
      i = to
    return waits, own, loads, None

  pending: dict[int, int] = {}
  rounds, _, loads, back = sweep(0, len(ops), pending)
  loop_rounds = 0
  if back is not None:
    start, stop = back
    carried: dict[int, int] = {}
    sweep(start, stop, carried, trip=1)
    loop_rounds = sweep(start, stop, carried, trip=2)[1]
    # Past the loop: the way on from its last branch back, not taken.
    more, _, more_loads, _ = sweep(stop + 1, len(ops), pending)
    rounds, loads = rounds + more, loads + more_loads
  return rounds, loads, loop_rounds


def loop_ops(sass: str) -> dict[str, int]:
  """What a trip of a kernel's first loop (``triton_compile.first_loop``) does besides
  arithmetic: ``barriers`` (BAR.SYNC), ``copies`` (LDGSTS: cp.async, global to shared
  memory, which Triton's pipeliner issues trips ahead), ``past_l1`` (those that bypass
  L1: 16-byte copies, each a read from L2), ``mma`` (tensor-core products, HMMA and
  Hopper's HGMMA) and ``mma_waits`` (WARPGROUP.DEPBAR: the warps wait for their
  asynchronous HGMMA to finish; HMMA need none); all 0 without a loop."""
  body = triton_compile.first_loop(sass) or ""
  ops = re.findall(r"\b(BAR\.SYNC|LDGSTS\S*|HG?MMA|WARPGROUP\.DEPBAR)\b", body)
  return {"barriers": sum(op == "BAR.SYNC" for op in ops),
          "copies": sum(op.startswith("LDGSTS") for op in ops),
          "past_l1": sum(op.startswith("LDGSTS") and "BYPASS" in op for op in ops),
          "mma": sum(op in ("HMMA", "HGMMA") for op in ops),
          "mma_waits": sum(op == "WARPGROUP.DEPBAR" for op in ops)}


def machine_code(hlo_path: str, arch: str = "90a") -> dict[str, dict]:
  """``{function: {"registers", "instructions", "loop", "inner", "path", "rounds",
  "loads", "loop_rounds", "file", "name", "threads", "shared"}}`` for every function in
  the PTX files XLA dumped beside ``hlo_path`` (``triton_compile.sass_counts``;
  "inner": a loop nested in the first, ``triton_compile.inner_count``;
  :func:`path_lengths`, :func:`load_rounds`; "shared": static and dynamic shared
  memory a block, :func:`shared_by_entry`, :func:`dynamic_shared`)."""
  return {c["name"]: c for c in _functions(
      sorted(glob.glob(hlo_bytes.dump_prefix(hlo_path) + "*.ptx")), arch,
      f"beside {hlo_path}")}


def _functions(ptx_files, arch: str, where: str) -> list[dict]:
  """One dict a function of the PTX files, in their order (see :func:`machine_code`)."""
  if not ptx_files:
    raise SystemExit(f"no PTX {where}: dump with XLA_FLAGS=\"--xla_dump_to=DIR "
                     f"--xla_dump_emitter_re=.* --xla_gpu_dump_llvmir=true\"")
  out = []
  for path in ptx_files:
    with open(path) as f:
      ptx = f.read()
    if not _ENTRY.search(ptx):
      continue
    report, cubin = triton_compile.assemble(ptx, arch)
    regs, static = registers_by_entry(report), shared_by_entry(report)
    threads = dict(_THREADS.findall(ptx))
    sass = sass_by_entry(triton_compile._disassemble(cubin, encodings=True))
    order = _ENTRY.findall(ptx)  # nvdisasm lists them in another order
    for name, encoded in sorted(sass.items(), key=lambda kv: (
        order.index(kv[0]) if kv[0] in order else len(order))):
      code, controls = warp_cycles.split_hex(encoded)
      rounds, loads, loop_rounds = load_rounds(code)
      out.append({"name": name, "registers": regs.get(name, 0),
                  **triton_compile.sass_counts(code),
                  "inner": triton_compile.inner_count(code),
                  "loop_ops": loop_ops(code),
                  "path": path_lengths(code), "rounds": rounds, "loads": loads,
                  "loop_rounds": loop_rounds, "file": path,
                  "listing": _listing(code), "controls": controls,
                  "threads": int(threads[name]) if name in threads else None,
                  "shared": static.get(name, 0) + dynamic_shared(path, name)})
  return out


def dump_functions(dump_dir: str, arch: str = "90a") -> list[dict]:
  """Every function of every PTX file in ``dump_dir``, in module order: as
  :func:`machine_code` describes them, with ``"name"`` and ``"threads"`` (its block's,
  from the PTX). For dumps without one step's HLO, such as ``benchmarks.stencil_times
  --compile-only``'s (a module an entry, in the order it prints them)."""
  return _functions(sorted(glob.glob(os.path.join(dump_dir, "*.ptx")), key=_module_number),
                    arch, f"in {dump_dir}")


def functions_report(dump_dir: str, match: str = "", arch: str = "90a") -> str:
  """:func:`dump_functions` whose name matches ``match`` (a regular expression), a line
  each: registers, the warps an SM holds at them, machine instructions and load rounds,
  and in a trip of its loop (:func:`loop_ops`) barriers, asynchronous copies (those
  past L1), tensor-core products and the waits for them."""
  code = dump_functions(dump_dir, arch)
  lines = [f"{'regs':>4s} {'warps/SM':>8s} {'instr':>15s} {'rounds':>6s} {'loads':>5s} "
           f"{'bar':>4s} {'copies':>7s} {'mma':>4s} {'waits':>5s}  function (file)"]
  for c in code:
    name = c["name"]
    if not re.search(match, name):
      continue
    warps = (resident_warps(c["registers"], c["threads"], c["shared"]) if c["threads"]
             else 0)
    instr = (f"{c['instructions']}+{c['loop']}" if c["loop"] else f"{c['instructions']}")
    if c["inner"]:  # a loop inside the loop (stencil.product_a's blocks in its tiles)
      instr += f"({c['inner']})"
    rounds = f"{c['rounds']}+{c['loop_rounds']}" if c["loop"] else f"{c['rounds']}"
    ops = c["loop_ops"]
    copies = f"{ops['copies']}({ops['past_l1']})"
    lines.append(f"{c['registers']:4d} {warps:8d} {instr:>15s} {rounds:>6s} "
                 f"{c['loads']:5d} {ops['barriers']:4d} {copies:>7s} {ops['mma']:4d} "
                 f"{ops['mma_waits']:5d}  "
                 f"{name} ({os.path.basename(c['file'])})")
  return "\n".join(lines)


def _module_number(path: str) -> tuple:
  """Sorts XLA's dump files by module number, then name (module_0001 before module_1988
  before module_10597)."""
  m = re.search(r"module_(\d+)", os.path.basename(path))
  return (int(m.group(1)) if m else -1, path)


def pallas_loops(jaxpr) -> list[dict]:
  """Every Pallas call of a traced program (``jax.jit(f).trace(...).jaxpr``), in trace
  order: ``{"scope", "name", "grid", "trips", "inner", "later"}``. ``scope``: its name
  stack (what its HLO custom call's op_name holds before "/pallas_call"); ``trips``: how
  often its kernel's first loop runs (a ``fori_loop`` of static bounds, traced as a
  scan; 1 without one), ``inner``: the first loop nested in that one (1 without);
  ``later``: the trips of the loops after the first that no loop holds, as the machine
  code runs them (a loop of one trip folded, the loop it holds in its place; those of
  one trip left out: ``triton_compile.machine_trips``' rule). The trip counts the
  machine code does not show: with them :func:`floors` counts a Pallas kernel's loops
  as often as they run, not once."""
  def subjaxprs(params):
    for value in params.values():
      for x in value if isinstance(value, (list, tuple)) else [value]:
        x = getattr(x, "jaxpr", x)  # a ClosedJaxpr's
        if hasattr(x, "eqns"):
          yield x

  def scans(j):  # the scans no scan holds, in order
    for e in j.eqns:
      if e.primitive.name == "scan":
        yield e
      else:
        for sub in subjaxprs(e.params):
          yield from scans(sub)

  def first_scan(j):
    return next(scans(j), None)

  def length(e):
    return int(e.params["length"]) if e is not None else 1

  def body(e):
    return getattr(e.params["jaxpr"], "jaxpr", e.params["jaxpr"])

  def machine(e):  # the trips of the machine code's loop for scan e, 1: none
    trips = length(e)
    return trips if trips > 1 else length(first_scan(body(e)))

  out = []

  def walk(j, outer: str):
    for e in j.eqns:
      scope = "/".join(filter(None, (outer, str(e.source_info.name_stack))))
      if e.primitive.name == "pallas_call":
        p = e.params
        name = getattr(p.get("name_and_src_info"), "name", None) or p.get("name")
        loops = list(scans(getattr(p["jaxpr"], "jaxpr", p["jaxpr"])))
        loop = loops[0] if loops else None
        inner = first_scan(body(loop)) if loop is not None else None
        out.append({"scope": scope, "name": name,
                    "grid": [int(g) for g in p["grid_mapping"].grid],
                    "trips": length(loop), "inner": length(inner),
                    "later": [n for n in map(machine, loops[1:]) if n > 1]})
      else:
        for sub in subjaxprs(e.params):
          walk(sub, scope)

  walk(getattr(jaxpr, "jaxpr", jaxpr), "")
  return out


def read_loops(path: str | None) -> list[dict] | None:
  """:func:`pallas_loops`' list from the JSON file ``benchmarks.aot --hlo-dir`` writes
  (None for None)."""
  if path is None:
    return None
  with open(path) as f:
    return json.load(f)


def _pallas_key(op_name: str) -> tuple[str, str, bool]:
  """(kernel name, model part, backward?) of a Pallas call's scope or HLO op_name."""
  path = op_name.removesuffix("/pallas_call")
  part = re.search(r"(stage\d+_block\d+|stem|head)", path)
  return (path.rsplit("/", 1)[-1], part.group(1) if part else "-", "transpose(" in path)


def loop_trips(hlo_text: str, loops: list[dict]) -> dict[str, tuple[int, int, tuple]]:
  """``{HLO instruction: (trips, inner, later)}`` for the Pallas calls of ``hlo_text``
  that :func:`pallas_loops` of the same program describes, matched by kernel name, model
  part and direction (the ``scope``); where a key repeats, in order. ``later``: a tuple
  (empty in files written before it was recorded)."""
  queue: dict[tuple, list] = {}
  for loop in loops:
    queue.setdefault(_pallas_key(loop["scope"] + "/" + loop["name"]), []).append(loop)
  names = hlo_bytes.op_names(hlo_text)
  out = {}
  for name, op_name in names.items():
    if op_name.endswith("/pallas_call"):
      waiting = queue.get(_pallas_key(op_name))
      if waiting:
        loop = waiting.pop(0)
        out[name] = (loop["trips"], loop["inner"], tuple(loop.get("later", ())))
  return out


def floors(hlo_path: str, arch: str = "90a", copy_bytes_per_s: float | None = None,
           loops: list[dict] | None = None, mem: float | None = None,
           code: dict | None = None, l2_bytes_per_s: float | None = None):
  """One row per launch of the step: ``{"name", "kind", "part", "bytes", "kernel",
  "blocks", "threads", "registers", "warps", "instructions", "loop", "path", "trips",
  "floor_ms", "copy_ms", "warp_cycles", "mem", "latency_ms", "past_l1_bytes"}``
  (the bytes its threads copy past L1, each a read from L2), launches whose function
  has no PTX in the dump (library calls) left out. ``path``: :func:`path_lengths` (None
  with a loop); the floor counts the shortest path's instructions, or with a loop the
  listing's, the loop once; with ``loops`` (:func:`pallas_loops` of the same program)
  a Pallas kernel's loops as often as they run (``trips``: (outer, inner) as the
  machine code runs them, ``triton_compile.machine_trips``; None where not known;
  ``later``: ``(instructions, trips)`` of each loop after the first,
  ``warp_cycles.later_loops``, () where not known).
  ``warp_cycles`` and ``latency_ms``: ``warp_cycles.walk`` and ``floor_ms``, with
  ``mem`` cycles a global load (default ``warp_cycles.MEM_CYCLES``), the loops counted
  as the floor counts them. ``code``: :func:`machine_code` of ``hlo_path``, where the
  caller has it already. ``l2_ms``: the bytes copied past L1 at ``l2_bytes_per_s`` (0
  without a rate: no L2 bound)."""
  rate = copy_bytes_per_s or kernel_times.COPY_BYTES_PER_S["H100"]
  launches = hlo_bytes.kernel_launches(hlo_path)
  code = code or machine_code(hlo_path, arch)
  text = hlo_bytes.read_hlo(hlo_path)
  trips = loop_trips(text, loops) if loops else {}
  mem = warp_cycles.MEM_CYCLES if mem is None else mem
  rows, warp_times = [], {}
  for nbytes, kind, part, name in hlo_bytes.analyse(text):
    if name not in launches or launches[name][0] not in code:
      continue
    kernel, blocks, threads = launches[name]
    c = code[kernel]
    # A thread issues its way's instructions, not every branch's; with a loop, the
    # listing's (the loop in it once), or where the trips are known, every trip's.
    issued = c["path"][0] if c["path"] else c["instructions"]
    runs, later = None, ()  # the machine code's loops' trips, where known
    if name in trips and c["loop"]:
      traced, inner, after = trips[name]
      if traced == inner == 1 and after:  # no first loop: the first is a later one
        traced, after = after[0], after[1:]
      runs = triton_compile.machine_trips(traced, inner, nested=bool(c["inner"]))
      loops = warp_cycles.later_loops(*c["listing"])
      # Counted where the machine code has as many (else once: the compiler unrolled
      # some, stencil._lags_kernel's sides at stage 4 before experiment 58)
      if len(loops) == len(after):
        later = tuple((back - start + 1, n) for (start, back), n in zip(loops, after))
      issued = triton_compile.issued_a_warp(c["instructions"], c["loop"], c["inner"],
                                            *runs, later)
    floor = triton_compile.issue_floor_ms(issued, 0, 1, math.ceil(threads / 32), blocks)
    warps = resident_warps(c["registers"], threads, c["shared"])
    key = (kernel, runs or (1, 1), tuple(n for _, n in later))
    if key not in warp_times:
      warp_times[key] = warp_cycles.walk(*c["listing"], c["controls"], mem, *key[1],
                                         later=key[2])
    past_l1 = warp_times[key]["past_l1"] * threads * blocks  # bytes read from L2
    rows.append({"name": name, "kind": kind, "part": part, "bytes": nbytes,
                 "kernel": kernel, "blocks": blocks, "threads": threads,
                 "registers": c["registers"],
                 "warps": warps, "warp_cycles": warp_times[key]["cycles"], "mem": mem,
                 "latency_ms": warp_cycles.floor_ms(warp_times[key], issued, blocks,
                                                    threads, warps),
                 "past_l1_bytes": past_l1,
                 "l2_ms": past_l1 / l2_bytes_per_s * 1e3 if l2_bytes_per_s else 0.0,
                 "instructions": c["instructions"], "loop": c["loop"], "path": c["path"],
                 "rounds": c["rounds"], "loads": c["loads"],
                 "loop_rounds": c["loop_rounds"],
                 "trips": runs or (trips[name][:2] if name in trips else None),
                 "later": later,
                 "floor_ms": floor, "copy_ms": nbytes / rate * 1e3})
  return rows


def _bound(row) -> float:
  """The larger of a row's issue floor and copy time, ms."""
  return max(row["floor_ms"], row["copy_ms"])


def modelled(row) -> float:
  """The largest of a row's issue floor, copy time, latency floor
  (``warp_cycles.floor_ms``) and, where ``--l2-tbps`` gave a rate, the time its copies
  past L1 take from L2, ms: the latency model of a launch's time."""
  return max(row["floor_ms"], row["copy_ms"], row["latency_ms"], row.get("l2_ms", 0.0))


def table(rows, top: int | None = None) -> list[str]:
  """A header and a line per row of :func:`floors`, the largest bound (floor or copy)
  first, ``top`` of them (None: all)."""
  lines = [f"{'floor':>7s} {'copy':>7s} {'latency':>7s}  {'GB':>6s}  {'regs':>4s} "
           f"{'warps/SM':>8s} "
           f"{'instr':>8s} {'rounds':>6s}  {'blocks x threads':>16s}  "
           f"instruction (function), part"]
  for r in sorted(rows, key=_bound, reverse=True)[:top]:
    if r["path"]:
      lo, hi = r["path"]
      instr = f"{lo}" if lo == hi else f"{lo}-{hi}"
      rounds = f"{r['rounds']}"
    else:
      instr = f"{r['instructions']}+{r['loop']}"
      rounds = f"{r['rounds']}+{r['loop_rounds']}"
    lines.append(
        f"{r['floor_ms']:7.3f} {r['copy_ms']:7.3f} {r['latency_ms']:7.3f}  "
        f"{r['bytes'] / 1e9:6.3f}  "
        f"{r['registers']:4d} {r['warps']:8d} {instr:>8s} {rounds:>6s}  "
        f"{r['blocks']:>8d} x {r['threads']:<5d}  {r['name']} ({r['kernel']}), {r['part']}")
  return lines


def by_rounds(rows, us_per_step: dict, least_us: float = 20.0) -> list[dict]:
  """The measured kernels without a loop, grouped by their load rounds: ``{"rounds",
  "kernels", "measured_ms", "bound_ms", "ratio"}`` per count (ratio: measured over the
  larger of copy time and issue floor, summed), from a profile's ``us_per_step`` ({HLO
  instruction: microseconds a step}, ``benchmarks.kernel_times``) of the same program.
  Kernels under ``least_us`` are left out: launch overhead, not memory, sets them."""
  groups = _measured_groups(rows, us_per_step, lambda r: r["rounds"],
                            lambda r, us: r["path"] and us >= least_us)
  return [{"rounds": k, "kernels": n, "measured_ms": t, "bound_ms": b, "ratio": t / b,
           "model_ms": m, "model_ratio": t / m}
          for k, (n, t, b, m) in sorted(groups.items())]


def _measured_groups(rows, us_per_step: dict, key, keep=lambda r, us: True) -> dict:
  """``{key(row): [launches, measured ms, bound ms, model ms]}`` over the rows measured
  in ``us_per_step`` that ``keep(row, us)`` admits (:func:`_bound`,
  :func:`modelled`)."""
  groups = {}
  for r in rows:
    us = us_per_step.get(r["name"])
    if us is None or not keep(r, us):
      continue
    g = groups.setdefault(key(r), [0, 0.0, 0.0, 0.0])
    g[0] += 1
    g[1] += us / 1e3
    g[2] += _bound(r)
    g[3] += modelled(r)
  return groups


def _measured_plain(rows, us_per_step: dict, least_us: float) -> list[tuple]:
  """``(measured ms, row)`` for the launches without a loop measured at ``least_us`` or
  more (:func:`by_rounds`' kernels)."""
  return [(us_per_step[r["name"]] / 1e3, r) for r in rows
          if r["path"] and us_per_step.get(r["name"], 0) >= least_us]


def spread(rows, us_per_step: dict, least_us: float = 20.0) -> str:
  """Measured over :func:`modelled`, and over :func:`_bound`, for the launches without
  a loop of ``least_us`` or more (:func:`_measured_plain`): the 10th, 25th, 50th, 75th
  and 90th percentiles of each, one launch a value."""
  pairs = _measured_plain(rows, us_per_step, least_us)
  if not pairs:
    return "no launch"

  def tiles(values):
    v = sorted(values)
    return " ".join(f"{v[min(int(len(v) * q), len(v) - 1)]:.2f}"
                    for q in (0.1, 0.25, 0.5, 0.75, 0.9))
  return (f"{len(pairs)} launches; over the model "
          f"{tiles(m / modelled(r) for m, r in pairs)}"
          f"; over the bounds {tiles(m / _bound(r) for m, r in pairs)} (percentiles 10, "
          f"25, 50, 75, 90)")


MEM_GRID = tuple(range(400, 1700, 100))


def fit_mem(hlo_path: str, us_per_step: dict, arch: str = "90a",
            copy_bytes_per_s: float | None = None, loops: list[dict] | None = None,
            grid=MEM_GRID, least_us: float = 20.0) -> list[dict]:
  """How a global load's cycles (``mem``) set the latency model against a profile of
  the same program: per value of ``grid``, ``{"mem", "launches", "measured_ms",
  "model_ms", "bound_ms", "log_error"}`` over the launches without a loop of
  ``least_us`` or more (:func:`_measured_plain`): their summed measured time, model
  (:func:`modelled`) and bounds, and the mean of |log(measured / model)|.
  ``warp_cycles.MEM_CYCLES`` is the value whose model sums to the measured time."""
  code = machine_code(hlo_path, arch)
  out = []
  for mem in grid:
    pairs = _measured_plain(floors(hlo_path, arch, copy_bytes_per_s, loops, mem, code),
                            us_per_step, least_us)
    out.append({"mem": mem, "launches": len(pairs),
                "measured_ms": sum(m for m, _ in pairs),
                "model_ms": sum(modelled(r) for _, r in pairs),
                "bound_ms": sum(_bound(r) for _, r in pairs),
                "log_error": sum(abs(math.log(m / modelled(r))) for m, r in pairs)
                / max(len(pairs), 1)})
  return out


def function_family(kernel: str) -> str:
  """The function a launch runs, one name for all its instances: the Pallas kernels
  (``qlhs_...``) are one function at every block, which XLA names ``qlhs_bn_sums``,
  ``qlhs_bn_sums_1``, ...; XLA's own fusions keep their names (each is its own code)."""
  return re.sub(r"(_+\d+)+$", "", kernel) if kernel.startswith("qlhs_") else kernel


def pallas_by_function(rows) -> list[dict]:
  """The Pallas launches of :func:`floors`' rows whose loops were counted every trip,
  grouped by :func:`function_family` in order of first launch: ``{"function",
  "launches", "floor_ms", "copy_ms", "bound_ms", "latency_ms", "model_ms",
  "past_l1_gb", "parts", "part_model_ms"}`` (:func:`modelled`; GB copied past L1,
  read from L2), ``parts`` ``{part's first six letters ("stage1"): (sorted registers,
  sorted warps an SM)}`` in the order met, ``part_model_ms`` {the same: model ms}: where
  a tiling's time goes, since the best tiles differ by the blocks' widths
  (benchmarks/NOTES.md, experiment 55)."""
  groups: dict[str, dict] = {}
  for r in rows:
    if not (r["kernel"].startswith("qlhs_") and (r["trips"] or not r["loop"])):
      continue
    g = groups.setdefault(function_family(r["kernel"]), {
        "function": function_family(r["kernel"]), "launches": 0, "floor_ms": 0.0,
        "copy_ms": 0.0, "bound_ms": 0.0, "latency_ms": 0.0, "model_ms": 0.0,
        "past_l1_gb": 0.0, "parts": {}, "part_model_ms": {}})
    g["launches"] += 1
    g["floor_ms"] += r["floor_ms"]
    g["copy_ms"] += r["copy_ms"]
    g["bound_ms"] += _bound(r)
    g["latency_ms"] += r["latency_ms"]
    model = modelled(r)
    g["model_ms"] += model
    g["past_l1_gb"] += r.get("past_l1_bytes", 0) / 1e9
    part = r["part"][:6]
    g["part_model_ms"][part] = g["part_model_ms"].get(part, 0.0) + model
    regs, warps = g["parts"].setdefault(part, (set(), set()))
    regs.add(r["registers"])
    warps.add(r["warps"])
  for g in groups.values():
    g["parts"] = {k: (sorted(a), sorted(b)) for k, (a, b) in g["parts"].items()}
  return list(groups.values())


def by_function(rows, us_per_step: dict) -> list[dict]:
  """The measured launches grouped by :func:`function_family`, the most time above its
  bounds first: ``{"function", "launches", "measured_ms", "bound_ms", "above_ms",
  "model_ms"}`` (:func:`modelled`)
  (bound: the larger of copy time and issue floor, summed; with a loop the floor counts
  it once, so there the copy time is the bound that matters), from a profile's
  ``us_per_step`` of the same program (:func:`by_rounds`). Where the step's time above
  its bounds lies, by kernel."""
  groups = _measured_groups(rows, us_per_step, lambda r: function_family(r["kernel"]))
  out = [{"function": k, "launches": n, "measured_ms": t, "bound_ms": b,
          "above_ms": t - b, "model_ms": m} for k, (n, t, b, m) in groups.items()]
  return sorted(out, key=lambda g: -g["above_ms"])


def report(hlo_path: str, top: int = 30, arch: str = "90a",
           copy_bytes_per_s: float | None = None, measured: dict | None = None,
           loops: list[dict] | None = None, mem: float | None = None,
           l2_bytes_per_s: float | None = None) -> str:
  rows = floors(hlo_path, arch, copy_bytes_per_s, loops, mem,
                l2_bytes_per_s=l2_bytes_per_s)
  rate = copy_bytes_per_s or kernel_times.COPY_BYTES_PER_S["H100"]
  plain = [r for r in rows if r["path"]]  # the floor counted a thread's way
  tripped = [r for r in rows if not r["path"] and r["trips"]]  # every trip counted
  looped = [r for r in rows if not r["path"] and not r["trips"]]
  lines = [
      f"{hlo_path}: {len(rows)} launches with machine code (sm_{arch}); issue floor "
      f"(one warp instruction a cycle per scheduler, 528 at 1.98 GHz) and copy time "
      f"(bytes at {rate / 1e12:.1f} TB/s) in ms",
      f"  without a loop ({len(plain)}): floors {sum(r['floor_ms'] for r in plain):.3f}, "
      f"copies {sum(r['copy_ms'] for r in plain):.3f}, the larger of each "
      f"{sum(_bound(r) for r in plain):.3f}; latency floors "
      f"{sum(r['latency_ms'] for r in plain):.3f}, the largest of the three "
      f"{sum(modelled(r) for r in plain):.3f}",
      *([f"  Pallas kernels, every trip of their loops counted ({len(tripped)}): "
         f"floors {sum(r['floor_ms'] for r in tripped):.3f}, copies "
         f"{sum(r['copy_ms'] for r in tripped):.3f}, the larger of each "
         f"{sum(_bound(r) for r in tripped):.3f}; latency floors "
         f"{sum(r['latency_ms'] for r in tripped):.3f}, the largest of the three "
         f"{sum(modelled(r) for r in tripped):.3f}"] if tripped else []),
      f"  with a loop ({len(looped)}, counted once: floors at least): floors "
      f"{sum(r['floor_ms'] for r in looped):.3f}, the larger of each "
      f"{sum(_bound(r) for r in looped):.3f}",
      "", *table(rows, top), ""]
  lines.append("instr: machine instructions a thread issues from entry to exit (a-b: "
               "its shortest and longest way; N+L: a kernel with a loop, its listing and "
               "the loop's, in the count once); warps/SM: what the registers allow (64 "
               "at most); rounds: the times a thread waits for global loads in turn "
               "(load_rounds; N+L: a loop's, and L in each trip); latency: the "
               "launch's latency floor (benchmarks.warp_cycles: one warp's cycles from "
               f"its control codes, a global load {rows[0]['mem'] if rows else '-'} "
               "cycles, over the warps an SM holds)")
  if tripped:
    lines += ["", "Pallas kernels by function, every loop trip counted (ms; part: the "
                  "model part's first six letters, stage1 ... stage4)",
              f"{'launches':>8s} {'floors':>7s} {'copies':>7s} {'bounds':>7s} "
              f"{'latency':>7s} {'model':>7s} {'L2 GB':>6s} {'TB/s':>5s}  function: "
              f"registers / warps an SM / model ms by part"]
    pallas = pallas_by_function(rows)
    for g in pallas:
      parts = ", ".join(f"{part} {'/'.join(map(str, regs))} / {'/'.join(map(str, warps))}"
                        f" / {g['part_model_ms'][part]:.3f}"
                        for part, (regs, warps) in g["parts"].items())
      lines.append(f"{g['launches']:8d} {g['floor_ms']:7.3f} {g['copy_ms']:7.3f} "
                   f"{g['bound_ms']:7.3f} {g['latency_ms']:7.3f} {g['model_ms']:7.3f} "
                   f"{g['past_l1_gb']:6.2f} {g['past_l1_gb'] / g['model_ms']:5.1f}  "
                   f"{g['function']}: {parts}")
    lines.append(f"{sum(g['launches'] for g in pallas):8d} "
                 + " ".join(f"{sum(g[k] for g in pallas):7.3f}" for k in (
                     "floor_ms", "copy_ms", "bound_ms", "latency_ms", "model_ms"))
                 + f" {sum(g['past_l1_gb'] for g in pallas):6.2f}        all")
    lines.append("(L2 GB: copied past L1, each byte a read from L2, which the model "
                 "counts only at --l2-tbps; TB/s: the L2 rate at which those reads take "
                 "the model's time)")
  if measured is not None:
    lines += ["", f"measured ({measured.get('device', '?')}, {measured.get('tag', '?')}): "
                  "kernels without a loop, 20 us a step or more, by load rounds",
              f"{'rounds':>6s} {'kernels':>7s} {'measured ms':>11s} {'bound ms':>8s} "
              f"{'ratio':>5s} {'model ms':>8s} {'ratio':>5s}"]
    groups = by_rounds(rows, measured["us_per_step"])
    total = [{"rounds": "all", **{k: sum(x[k] for x in groups) for k in (
        "kernels", "measured_ms", "bound_ms", "model_ms")}}] if groups else []
    for g in groups + total:
      lines.append(f"{g['rounds']:>6} {g['kernels']:7d} {g['measured_ms']:11.3f} "
                   f"{g['bound_ms']:8.3f} {g['measured_ms'] / g['bound_ms']:5.2f} "
                   f"{g['model_ms']:8.3f} {g['measured_ms'] / g['model_ms']:5.2f}")
    lines.append("  measured / model, launch by launch: "
                 + spread(rows, measured["us_per_step"]))
    functions = by_function(rows, measured["us_per_step"])
    lines += ["", f"by function, the most time above its bounds first "
                  f"({min(top, len(functions))} of {len(functions)}; all launches: "
                  f"{sum(g['measured_ms'] for g in functions):.3f} ms measured, "
                  f"{sum(g['above_ms'] for g in functions):.3f} above the bounds)",
              f"{'launches':>8s} {'measured ms':>11s} {'bound ms':>8s} {'above':>7s} "
              f"{'model ms':>8s}  function"]
    for g in functions[:top]:
      lines.append(f"{g['launches']:8d} {g['measured_ms']:11.3f} {g['bound_ms']:8.3f} "
                   f"{g['above_ms']:7.3f} {g['model_ms']:8.3f}  {g['function']}")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("path", help="the ...sm_9.0a_gpu_after_optimizations.txt of an XLA dump "
                              "with the PTX (see the module's docstring), or a dump's "
                              "folder: every function of its PTX files (--match)")
  p.add_argument("--match", default="", help="with a folder: functions whose name "
                                             "matches this regular expression")
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--arch", default="90a", help="sm_ architecture (H100: 90a)")
  p.add_argument("--copy-tbps", type=float, default=None,
                 help="the copy rate for the copy column (default: H100, 3.0)")
  p.add_argument("--measured", default=None,
                 help="a kernels.jsonl of benchmarks.step --profile-dir, profiled from the "
                      "same program: adds each kernel's measured time, grouped by rounds")
  p.add_argument("--line", type=int, default=-1, help="which line of --measured (0-based)")
  p.add_argument("--l2-tbps", type=float, default=None,
                 help="an L2 read rate: the copies past L1 at it join the model (no "
                      "default: no L2 rate of the H100 or H200 is measured here; "
                      "published microbenchmarks give 5.5-12 TB/s)")
  p.add_argument("--mem", type=float, default=None,
                 help="a global load's cycles in the latency floors (default: "
                      "warp_cycles.MEM_CYCLES, fitted to the H200's profile)")
  p.add_argument("--fit-mem", action="store_true",
                 help="with --measured: the latency model at a global load's cycles "
                      "from 400 to 1,600 against the profile (fit_mem), then exit")
  p.add_argument("--loops", default=None,
                 help="the step's .pallas_loops.json (benchmarks.aot --hlo-dir, the same "
                      "compile): the Pallas kernels' loops counted as often as they run")
  args = p.parse_args(argv)
  rate = args.copy_tbps * 1e12 if args.copy_tbps else None
  measured = None
  if args.measured:
    with open(args.measured) as f:
      measured = [json.loads(line) for line in f if line.strip()][args.line]
  if args.fit_mem:
    if measured is None:
      raise SystemExit("--fit-mem needs --measured (and --line): the profile to fit to")
    print(f"{'mem':>5s} {'launches':>8s} {'measured ms':>11s} {'model ms':>8s} "
          f"{'bounds ms':>9s} {'mean |log|':>10s}  (launches without a loop, 20 us or "
          f"more)")
    for f in fit_mem(args.path, measured["us_per_step"], args.arch, rate,
                     read_loops(args.loops)):
      print(f"{f['mem']:5.0f} {f['launches']:8d} {f['measured_ms']:11.3f} "
            f"{f['model_ms']:8.3f} {f['bound_ms']:9.3f} {f['log_error']:10.3f}")
    return
  try:
    if os.path.isdir(args.path):
      print(functions_report(args.path, args.match, args.arch))
    else:
      print(report(args.path, args.top, args.arch, rate, measured, read_loops(args.loops),
                   args.mem, args.l2_tbps * 1e12 if args.l2_tbps else None))
  except BrokenPipeError:  # `| head` closed the pipe
    pass


if __name__ == "__main__":
  main()

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

(jax[cuda12] for the compile, ``pip install triton==3.9.0`` for its ptxas and nvdisasm.)
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
lower bound: see ``triton_compile --op stencil`` for the stencil kernels' trip counts.
"""

from __future__ import annotations

import argparse
import glob
import math
import re

from qlhs_jax.benchmarks import hlo_bytes, kernel_times, triton_compile

# H100 SM: 65,536 registers, at most 64 warps and 32 blocks; registers are handed out per
# warp in units of 256 (8 a thread).
SM_REGISTERS, SM_WARPS, SM_BLOCKS, REGISTER_UNIT = 65536, 64, 32, 256
_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_SASS_SECTION = re.compile(r"^//-+ \.text\.(\S+)\s+-+$", re.M)


def resident_warps(registers: int, threads: int) -> int:
  """Warps of blocks of ``threads`` that one H100 SM holds at ``registers`` a thread
  (registers, warps and blocks are the limits; shared memory is not counted)."""
  warps = math.ceil(threads / 32)
  per_warp = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
  blocks = min(SM_REGISTERS // (per_warp * warps), SM_BLOCKS, SM_WARPS // warps)
  return blocks * warps


def registers_by_entry(report: str) -> dict[str, int]:
  """``{function: registers a thread}`` from ptxas -v's report."""
  out = {}
  parts = _PTXAS_ENTRY.split(report)  # [head, name, text, name, text, ...]
  for name, text in zip(parts[1::2], parts[2::2]):
    used = re.search(r"Used (\d+) registers", text)
    out[name] = int(used.group(1)) if used else 0
  return out


def sass_by_entry(sass: str) -> dict[str, str]:
  """``{function: its disassembly}`` from nvdisasm's listing of a cubin."""
  parts = _SASS_SECTION.split(sass)
  return dict(zip(parts[1::2], parts[2::2]))


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-7T] )?([A-Z][A-Z0-9_.]*)(.*)$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def path_lengths(sass: str) -> tuple[int, int] | None:
  """``(shortest, longest)``: the machine instructions a thread issues on its shortest
  and longest way from the entry to its last EXIT, for a function without loops; None if
  it has one (a branch back, other than the trap loop after the last EXIT). XLA's
  concatenate kernels branch per operand: a thread runs one branch, not the whole
  listing. A predicated EXIT (the threads past the end of a launch that does not divide
  the work) is taken as not taken: the threads that work go on."""
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
      ops.append((m.group(3), pred not in ("", "@PT"), target.group(1) if target else None))
  n = len(ops)
  big = 1 << 30
  # Instructions from i to an EXIT, over the branches forward: fewest and most.
  shortest, longest = [big] * (n + 1), [-big] * (n + 1)  # past the end: no EXIT
  for i in range(n - 1, -1, -1):
    op, conditional, target = ops[i]
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


def machine_code(hlo_path: str, arch: str = "90a") -> dict[str, dict]:
  """``{function: {"registers", "instructions", "loop", "path"}}`` for every function in
  the PTX files XLA dumped beside ``hlo_path`` (``triton_compile.sass_counts``,
  :func:`path_lengths`)."""
  ptx_files = sorted(glob.glob(hlo_bytes.dump_prefix(hlo_path) + "*.ptx"))
  if not ptx_files:
    raise SystemExit(f"no PTX beside {hlo_path}: dump with XLA_FLAGS=\"--xla_dump_to=DIR "
                     f"--xla_dump_emitter_re=.* --xla_gpu_dump_llvmir=true\"")
  out = {}
  for path in ptx_files:
    with open(path) as f:
      ptx = f.read()
    if not _ENTRY.search(ptx):
      continue
    report, cubin = triton_compile.assemble(ptx, arch)
    regs = registers_by_entry(report)
    for name, code in sass_by_entry(triton_compile._disassemble(cubin)).items():
      out[name] = {"registers": regs.get(name, 0), **triton_compile.sass_counts(code),
                   "path": path_lengths(code)}
  return out


def floors(hlo_path: str, arch: str = "90a", copy_bytes_per_s: float | None = None):
  """One row per launch of the step: ``{"name", "kind", "part", "bytes", "kernel",
  "blocks", "threads", "registers", "warps", "instructions", "loop", "path",
  "floor_ms", "copy_ms"}``, launches whose function has no PTX in the dump (library
  calls) left out. ``path``: :func:`path_lengths` (None with a loop); the floor counts
  the shortest path's instructions, or with a loop the listing's, the loop once."""
  rate = copy_bytes_per_s or kernel_times.COPY_BYTES_PER_S["H100"]
  launches = hlo_bytes.kernel_launches(hlo_path)
  code = machine_code(hlo_path, arch)
  rows = []
  for nbytes, kind, part, name in hlo_bytes.analyse(hlo_bytes.read_hlo(hlo_path)):
    if name not in launches or launches[name][0] not in code:
      continue
    kernel, blocks, threads = launches[name]
    c = code[kernel]
    # A thread issues its way's instructions, not every branch's; with a loop, the
    # listing's (the loop in it once).
    issued = c["path"][0] if c["path"] else c["instructions"]
    floor = triton_compile.issue_floor_ms(issued, 0, 1, math.ceil(threads / 32), blocks)
    rows.append({"name": name, "kind": kind, "part": part, "bytes": nbytes,
                 "kernel": kernel, "blocks": blocks, "threads": threads,
                 "registers": c["registers"],
                 "warps": resident_warps(c["registers"], threads),
                 "instructions": c["instructions"], "loop": c["loop"], "path": c["path"],
                 "floor_ms": floor, "copy_ms": nbytes / rate * 1e3})
  return rows


def _bound(row) -> float:
  """The larger of a row's issue floor and copy time, ms."""
  return max(row["floor_ms"], row["copy_ms"])


def table(rows, top: int | None = None) -> list[str]:
  """A header and a line per row of :func:`floors`, the largest bound (floor or copy)
  first, ``top`` of them (None: all)."""
  lines = [f"{'floor':>7s} {'copy':>7s}  {'GB':>6s}  {'regs':>4s} {'warps/SM':>8s} "
           f"{'instr':>8s}  {'blocks x threads':>16s}  instruction (function), part"]
  for r in sorted(rows, key=_bound, reverse=True)[:top]:
    if r["path"]:
      lo, hi = r["path"]
      instr = f"{lo}" if lo == hi else f"{lo}-{hi}"
    else:
      instr = f"{r['instructions']}+{r['loop']}"
    lines.append(
        f"{r['floor_ms']:7.3f} {r['copy_ms']:7.3f}  {r['bytes'] / 1e9:6.3f}  "
        f"{r['registers']:4d} {r['warps']:8d} {instr:>8s}  "
        f"{r['blocks']:>8d} x {r['threads']:<5d}  {r['name']} ({r['kernel']}), {r['part']}")
  return lines


def report(hlo_path: str, top: int = 30, arch: str = "90a",
           copy_bytes_per_s: float | None = None) -> str:
  rows = floors(hlo_path, arch, copy_bytes_per_s)
  rate = copy_bytes_per_s or kernel_times.COPY_BYTES_PER_S["H100"]
  plain = [r for r in rows if r["path"]]  # the floor counted a thread's way
  looped = [r for r in rows if not r["path"]]
  lines = [
      f"{hlo_path}: {len(rows)} launches with machine code (sm_{arch}); issue floor "
      f"(one warp instruction a cycle per scheduler, 528 at 1.98 GHz) and copy time "
      f"(bytes at {rate / 1e12:.1f} TB/s) in ms",
      f"  without a loop ({len(plain)}): floors {sum(r['floor_ms'] for r in plain):.3f}, "
      f"copies {sum(r['copy_ms'] for r in plain):.3f}, the larger of each "
      f"{sum(_bound(r) for r in plain):.3f}",
      f"  with a loop ({len(looped)}, counted once: floors at least): floors "
      f"{sum(r['floor_ms'] for r in looped):.3f}, the larger of each "
      f"{sum(_bound(r) for r in looped):.3f}",
      "", *table(rows, top), ""]
  lines.append("instr: machine instructions a thread issues from entry to exit (a-b: "
               "its shortest and longest way; N+L: a kernel with a loop, its listing and "
               "the loop's, in the count once); warps/SM: what the registers allow (64 "
               "at most)")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("path", help="the ...sm_9.0a_gpu_after_optimizations.txt of an XLA dump "
                              "with the PTX (see the module's docstring)")
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--arch", default="90a", help="sm_ architecture (H100: 90a)")
  p.add_argument("--copy-tbps", type=float, default=None,
                 help="the copy rate for the copy column (default: H100, 3.0)")
  args = p.parse_args(argv)
  rate = args.copy_tbps * 1e12 if args.copy_tbps else None
  try:
    print(report(args.path, args.top, args.arch, rate))
  except BrokenPipeError:  # `| head` closed the pipe
    pass


if __name__ == "__main__":
  main()

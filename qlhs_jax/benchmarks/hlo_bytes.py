"""``python -m qlhs_jax.benchmarks.hlo_bytes STEP.hlo.txt[.gz] [--top 25] [--part
stage1_block1] [--launch] [--ops NAME]``: where the bytes of a compiled step go.

Reads the optimized HLO that ``python -m qlhs_jax.benchmarks.step --hlo-dir DIR`` writes,
and for every top-level instruction of the entry computation (each is one kernel launch
or library call: fusions, cuBLAS/cuDNN custom calls, copies) counts the bytes of its
operands plus its results: what the kernel must at least move through device memory
(a library call's scratch workspace is not counted).
Prints the total, the split by kind (matmuls, convolutions, reductions, element-wise
loops) and by model part (the block named in the op metadata), and the largest
kernels; ``--part`` lists one block's kernels in program order with their op names
(benchmarks/NOTES.md's per-block table); ``--launch``, on a file that XLA dumped
(``XLA_FLAGS=--xla_dump_to=DIR``), adds each kernel's grid and block size and flags the
kernels launched with fewer threads than an H100 keeps resident; ``--ops NAME`` counts
the instructions of one fusion's computation by kind: how much a kernel computes for
each value it writes. It is the offline half of the speed analysis: it needs no GPU.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
# A cuBLAS or cuDNN call returns (result..., s8/u8[N] workspace): scratch space sized by the
# chosen algorithm (4 MiB untuned; autotuned 33 MB per matmul, 0.2 GB for the H100 stem
# convolution), not data the kernel streams.
_WORKSPACE = re.compile(r",\s*([su]8\[\d+\])(\{0\})?\)\s*$")


def read_hlo(path: str) -> str:
  """An HLO text file, gzipped (``.gz``, as the harness writes it) or not."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return f.read()


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in ``text`` (a result or operand list)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def _entry_lines(text: str):
  lines = text.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("ENTRY"))
  for line in lines[start + 1:]:
    if line.startswith("}"):
      return
    yield line


def _kind(op: str, rest: str) -> str:
  if op == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    t = target.group(1) if target else "?"
    if "gemm" in t or "matmul" in t:
      return "matmul (cuBLAS)"
    if "conv" in t:
      return "convolution (cuDNN)"
    return f"custom-call {t}"
  if op == "fusion":
    kind = re.search(r"kind=(k\w+)", rest)
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    k = kind.group(1) if kind else "?"
    name = calls.group(1) if calls else ""
    if "gemm" in name or "dot" in name or "triton" in name:
      return "matmul (fused)"
    if re.search(r"convolution|conv\b|cudnn", name):
      return "convolution (fused)"
    return {"kLoop": "element-wise loop", "kInput": "reduction",
            "kOutput": "output fusion", "kCustom": "custom fusion"}.get(k, k)
  return op


def _part(rest: str) -> str:
  m = re.search(r'op_name="([^"]+)"', rest)
  if not m:
    return "-"
  name = m.group(1)
  for pat in (r"(stage\d+_block\d+)", r"\b(stem)\b", r"\b(head)\b"):
    hit = re.search(pat, name)
    if hit:
      return hit.group(1)
  return "other"


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape ``(a, (b, c), d)``; ``[shape]`` otherwise.
  Commas inside layouts (``{4,3,2,1,0}``) and dimensions do not split."""
  shape = shape.strip()
  if not shape.startswith("("):
    return [shape]
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        parts.append(shape[start:i])
        break
    elif ch == "," and depth == 1:
      parts.append(shape[start:i])
      start = i + 1
  return [p.strip() for p in parts if p.strip()]


def _operand_shape(shapes: dict[str, str], operand: str) -> str:
  """The shape of an operand written by name: ``%x``, or ``%x#1`` (element 1 of the tuple
  ``x``: the form XLA's ``--xla_dump_to`` files use instead of get-tuple-element)."""
  name = operand.strip().lstrip("%")
  if "#" in name:
    name, index = name.rsplit("#", 1)
    elements = _tuple_elements(shapes.get(name, ""))
    return elements[int(index)] if index.isdigit() and int(index) < len(elements) else ""
  return shapes.get(name, "")


def analyse(text: str):
  """``[(bytes, kind, part, name)]`` for every top-level instruction."""
  shapes: dict[str, str] = {}
  out = []
  for line in _entry_lines(text):
    m = _INSTR.match(line)
    if not m:
      continue
    _, name, result, op, rest = m.groups()
    shapes[name] = result
    if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast",
              "after-all", "partition-id", "replica-id"):
      continue
    # Operands are written with their shapes in optimized HLO; fall back to lookups.
    # Long operand lists carry /*index=5*/-style comments; they are not part of a name.
    args = re.sub(r"/\*.*?\*/", "", rest.split("),", 1)[0])
    operand_bytes = shape_bytes(args)
    if operand_bytes == 0:
      operand_bytes = sum(shape_bytes(_operand_shape(shapes, a)) for a in args.split(","))
    result_bytes = shape_bytes(result)
    workspace = _WORKSPACE.search(result) if op == "custom-call" else None
    if workspace and re.search(r'custom_call_target="__(cublas|cudnn)', rest):
      result_bytes -= shape_bytes(workspace.group(1))
    out.append((operand_bytes + result_bytes, _kind(op, rest), _part(rest), name))
  return out


def op_names(text: str) -> dict[str, str]:
  """The ``op_name`` metadata of every top-level instruction ("" where it has none)."""
  out = {}
  for line in _entry_lines(text):
    m = _INSTR.match(line)
    if m:
      on = re.search(r'op_name="([^"]+)"', m.group(5))
      out[m.group(2)] = on.group(1) if on else ""
  return out


def part_report(path: str, part: str, min_gb: float = 0.0) -> str:
  """Every kernel of one model part (e.g. ``stage1_block1``) in program order, with its
  bytes, kind and the end of its op name: which operation of a block moves what."""
  text = read_hlo(path)
  names = op_names(text)
  rows = [r for r in analyse(text) if r[2] == part]
  if not rows:
    raise SystemExit(f"no kernel of part {part!r} in {path}; parts are the block names "
                     f"the full report lists (stem, stage1_block0, ..., head, other, -)")
  total = sum(r[0] for r in rows)
  lines = [f"{path}, {part}: {len(rows)} kernels, {total / 1e9:.2f} GB"]
  for b, kind, _, name in rows:
    if b >= min_gb * 1e9:
      op = names.get(name, "").split(f"{part}/", 1)[-1]
      lines.append(f"  {b / 1e9:7.3f} GB  {kind:24s} {name[:36]:36s} {op[-90:]}")
  return "\n".join(lines)


# Instructions that compute no value of their own: they name, index or relabel one.
_INDEX_ONLY = frozenset({"parameter", "constant", "broadcast", "bitcast", "reshape"})


def fusion_ops(text: str, name: str) -> collections.Counter:
  """The instructions of top-level fusion ``name``'s computation, counted by kind: each
  runs once for every value the kernel writes."""
  call = re.search(r"^\s*(?:ROOT\s+)?%?" + re.escape(name) + r"\s*=.*?\bcalls=%?([\w.\-]+)",
                   text, re.M)
  if not call:
    raise SystemExit(f"no fusion named {name!r} in the entry computation (the names "
                     f"--part and the full report list)")
  lines = text.splitlines()
  head = re.compile(r"^%?" + re.escape(call.group(1)) + r"\s")
  start = next(i for i, line in enumerate(lines) if head.match(line))
  kinds = collections.Counter()
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    m = _INSTR.match(line)
    if m:
      kinds[m.group(4)] += 1
  return kinds


def ops_report(path: str, name: str) -> str:
  kinds = fusion_ops(read_hlo(path), name)
  computing = sum(n for k, n in kinds.items() if k not in _INDEX_ONLY)
  return (f"{path}, {name}: {sum(kinds.values())} instructions, {computing} computing "
          f"({', '.join(sorted(_INDEX_ONLY))} left out)\n  "
          + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))


def totals(rows):
  """Bytes of ``analyse``'s rows summed by kind and by model part: two Counters."""
  by_kind, by_part = collections.Counter(), collections.Counter()
  for b, kind, part, _ in rows:
    by_kind[kind] += b
    by_part[part] += b
  return by_kind, by_part


# Threads an H100 keeps resident at once (132 SMs x 2,048): a kernel launched with fewer
# leaves SMs idle however fast each thread streams.
H100_RESIDENT_THREADS = 132 * 2048
_THUNK_ID = re.compile(r'profile_annotation: "([^"]+)"\s*thunk_id: (\d+)')
# A kernel's line in thunk_sequence.txt: "NAME grid: [..] threads: [..]" (jax 0.11), or
# "kernel=NAME, ..., launch dimensions=blocks: {..}, threads/block: {..}" (jax 0.12.1).
_THUNK_LAUNCH = re.compile(
    r"^\s*(\d+): kCustomKernel.*?(?: (\S+) grid: \[(\d+), (\d+), (\d+)\] "
    r"threads: \[(\d+), (\d+), (\d+)\]| kernel=([^,\s]+),.*?blocks: \{(\d+), (\d+), "
    r"(\d+)\}, threads/block: \{(\d+), (\d+), (\d+)\})", re.M)


def dump_prefix(hlo_path: str) -> str:
  """``DIR/module_0001.jit_train_step.`` for ``DIR/module_0001.jit_train_step.sm_9.0a_
  gpu_after_optimizations.txt``: what the other files of that XLA dump start with."""
  prefix = re.sub(r"(sm_[\w.]+_)?gpu_after_optimizations\.txt(\.gz)?$", "", hlo_path)
  if prefix == hlo_path:
    raise SystemExit(f"launch dimensions and machine code come from the files XLA dumps "
                     f"beside *gpu_after_optimizations.txt; {hlo_path} is not such a file "
                     f"(dump with XLA_FLAGS=--xla_dump_to=DIR)")
  return prefix


def kernel_launches(hlo_path: str) -> dict[str, tuple[str, int, int]]:
  """``{instruction: (kernel, blocks, threads per block)}`` for the kernels of an HLO file
  that XLA dumped (``XLA_FLAGS=--xla_dump_to=DIR``), read from the ``thunk_metadata.txt``
  and ``thunk_sequence.txt`` files it wrote beside ``...gpu_after_optimizations.txt``.
  ``kernel`` is the name of the launched function (XLA launches one function for
  identical fusions: three stage-1 blocks' ``loop_convert_fusion.1``, ``.3``, ``.5`` may
  all run ``loop_convert_fusion_2``)."""
  prefix = dump_prefix(hlo_path)
  try:
    meta = read_hlo(prefix + "thunk_metadata.txt")
    seq = read_hlo(prefix + "thunk_sequence.txt")
  except FileNotFoundError as e:
    raise SystemExit(f"{e.filename} is missing: XLA writes it with --xla_dump_to "
                     f"(jax 0.11 or newer)") from e
  names = {int(i): name for name, i in _THUNK_ID.findall(meta)}
  out = {}
  for m in _THUNK_LAUNCH.finditer(seq):
    fields = m.groups()[1:8] if m.group(2) else m.groups()[8:]
    i, g = int(m.group(1)), [int(x) for x in fields[1:]]
    if i in names:
      out[names[i]] = (fields[0], g[0] * g[1] * g[2], g[3] * g[4] * g[5])
  return out


def launch_dims(hlo_path: str) -> dict[str, tuple[int, int]]:
  """``{instruction: (blocks, threads per block)}``: :func:`kernel_launches` without the
  kernel names."""
  return {k: (blocks, threads)
          for k, (_, blocks, threads) in kernel_launches(hlo_path).items()}


def report(path: str, top: int = 25, launch: bool = False) -> str:
  rows = analyse(read_hlo(path))
  dims = launch_dims(path) if launch else {}
  threads = {name: blocks * per_block for name, (blocks, per_block) in dims.items()}
  total = sum(r[0] for r in rows)
  lines = [f"{path}: {len(rows)} kernels, {total / 1e9:.2f} GB moved per step "
           "(operands + results of each top-level instruction)", "", "by kind:"]
  by_kind, by_part = totals(rows)
  for k, b in by_kind.most_common():
    lines.append(f"  {k:28s} {b / 1e9:8.2f} GB  {100 * b / total:5.1f}%")
  lines += ["", "by model part:"]
  for k, b in by_part.most_common(12):
    lines.append(f"  {k:28s} {b / 1e9:8.2f} GB  {100 * b / total:5.1f}%")
  lines += ["", f"largest {top} kernels:"]
  for b, kind, part, name in sorted(rows, reverse=True)[:top]:
    line = f"  {b / 1e9:7.3f} GB  {kind:24s} {part:16s} {name}"
    if name in dims:
      line = f"{line:90s} {dims[name][0]:>8d} x {dims[name][1]:<4d}"
      if threads[name] < H100_RESIDENT_THREADS:
        line += f" < one wave ({threads[name] / H100_RESIDENT_THREADS:.0%})"
    lines.append(line)
  if launch:
    small = [(b, n) for b, _, _, n in rows
             if n in threads and threads[n] < H100_RESIDENT_THREADS]
    lines += ["", f"launch dims (blocks x threads) of {len(dims)} kernels; "
              f"{len(small)} launch fewer threads than an H100 keeps resident "
              f"({H100_RESIDENT_THREADS:,}), moving {sum(b for b, _ in small) / 1e9:.2f} GB"]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("path")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--part", default=None,
                 help="list every kernel of this model part instead (e.g. stage1_block1)")
  p.add_argument("--min-gb", type=float, default=0.05,
                 help="with --part: leave out kernels that move less than this")
  p.add_argument("--launch", action="store_true",
                 help="add each kernel's launch dimensions, from the thunk files XLA "
                      "dumps beside PATH (XLA_FLAGS=--xla_dump_to=DIR)")
  p.add_argument("--ops", default=None, metavar="NAME",
                 help="count the instructions of fusion NAME's computation instead")
  args = p.parse_args(argv)
  try:
    if args.ops:
      print(ops_report(args.path, args.ops))
    else:
      print(part_report(args.path, args.part, args.min_gb) if args.part
            else report(args.path, args.top, args.launch))
  except BrokenPipeError:  # `| head` closed the pipe
    pass


if __name__ == "__main__":
  main()

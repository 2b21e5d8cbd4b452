"""Where the time of a compiled step goes: per-kernel device time from a profiler trace,
joined with the bytes each kernel moves (``hlo_bytes``).

  python -m qlhs_jax.benchmarks.step --model eq3_softball_ds --profile-dir DIR ...
  python -m qlhs_jax.benchmarks.kernel_times DIR/kernels.jsonl DIR/<model>.train.hlo.txt.gz

The harness traces a few extra train steps with ``jax.profiler``, reads the trace (the
raw XSpace through ``jax.profiler.ProfileData``, else its ``trace.json.gz`` conversion),
reduces it to the device time of each HLO instruction per step, appends that to ``DIR/kernels.jsonl``
(one small line per model: the raw trace is not kept, the GPU machine returns few files)
and prints the report. This module's command line prints the same report later, offline,
from that line and the HLO the harness wrote with ``--hlo-dir``.

Bytes say what a kernel must move; time says what it costs. Their ratio, a kernel's
achieved bandwidth, shows which kernels run far below the device's (an H100 streams
~3 TB/s): there the byte count is the wrong proxy and the kernel itself is the problem.
On an H100 or H200 the report ends with the time each kernel takes above a copy of its
bytes (``--copy-tbps`` elsewhere): the kernels a better implementation would pay for,
ranked by what they would give back.

Which trace events count: on a GPU, the kernels on the first device's stream lines (the
profiler's derived "XLA Ops"/"XLA Modules" lines repeat them and are skipped). A kernel is
attributed to the HLO instruction its ``hlo_op`` argument names, else to the instruction
whose name, with every character but letters and digits turned into "_", is the kernel's
name (XLA names fusion kernels that way); the rest is reported as unattributed, by kernel
name (library kernels inside a command buffer, for instance). On a CPU the thunks of the
first device carry ``hlo_op``; they may overlap in time, so their sum is not wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

from qlhs_jax.benchmarks import hlo_bytes

_DERIVED_LINES = ("xla ops", "xla modules", "steps", "framework", "source", "scope",
                  "tensorflow", "launch stats")


def _sanitize(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9]", "_", name)


def kernel_times(trace: dict, hlo_names=()) -> tuple[dict, dict, str]:
  """Device time per HLO instruction in a Chrome-format trace (``*.trace.json.gz``).

  Returns ``(times, unattributed, source)``: microseconds summed per HLO instruction name,
  microseconds per kernel name that could not be attributed, and which events were used
  ("gpu streams", "device lines" or "host thunks").
  """
  events = trace.get("traceEvents", [])
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e.get("args", {}).get("name", "")
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  def device_order(item):  # GPUs first, by ordinal: /device:GPU:2 before /device:GPU:10
    name = item[0]
    ordinal = re.search(r"(\d+)$", name)
    return (not name.startswith("/device:GPU"), int(ordinal.group(1)) if ordinal else 0, name)
  devices = sorted(((name, pid) for pid, name in procs.items() if name.startswith("/device:")),
                   key=device_order)
  if devices:
    pid = devices[0][1]  # data-parallel: every device runs the same program
    mine = [e for e in complete if e["pid"] == pid]
    stream = [e for e in mine
              if threads.get((pid, e.get("tid")), "").lower().startswith("stream")]
    if stream:
      chosen, source = stream, "gpu streams"
    else:
      chosen = [e for e in mine if not any(
          d in threads.get((pid, e.get("tid")), "").lower() for d in _DERIVED_LINES)]
      source = "device lines"
  else:
    thunks = [e for e in complete if "hlo_op" in e.get("args", {})]
    ordinals = sorted({str(e["args"].get("device_ordinal", "0")) for e in thunks})
    first = ordinals[0] if ordinals else "0"
    chosen = [e for e in thunks if str(e["args"].get("device_ordinal", "0")) == first]
    source = "host thunks"
  hlo_names = set(hlo_names)
  by_kernel_name = {_sanitize(n): n for n in hlo_names}
  times, unattributed = collections.Counter(), collections.Counter()
  for e in chosen:
    args = e.get("args", {})
    op = args.get("hlo_op")
    if not op:
      hit = re.search(r"hlo_op=([^,#]+)", str(args.get("long_name", "")) + e["name"])
      op = hit.group(1) if hit else None
    if by_kernel_name and op not in hlo_names:
      # e.g. a kernel launched inside a command buffer carries the buffer's hlo_op
      op = by_kernel_name.get(_sanitize(e["name"]), op)
    if op:
      times[op] += float(e["dur"])
    else:
      unattributed[e["name"]] += float(e["dur"])
  return dict(times), dict(unattributed), source


def xspace_to_trace(xspace) -> dict:
  """A ``jax.profiler.ProfileData`` (the raw XSpace) in the Chrome-trace form that
  :func:`kernel_times` reads: a process per plane, a thread per line."""
  events = []
  for pid, plane in enumerate(xspace.planes):
    events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": plane.name}})
    for tid, line in enumerate(plane.lines):
      events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                     "args": {"name": line.name}})
      for e in line.events:
        events.append({"ph": "X", "pid": pid, "tid": tid, "name": e.name,
                       "dur": e.duration_ns / 1e3, "args": dict(e.stats)})
  return {"traceEvents": events}


def load_trace(log_dir: str, form: str = "any") -> dict:
  """The newest trace ``jax.profiler.trace`` wrote under ``log_dir``: the raw
  ``*.xplane.pb`` (``form="xplane"``) or its ``*.trace.json.gz`` conversion (``"json"``);
  ``"any"`` takes the first of the two this JAX can read."""
  def newest(pattern):
    paths = glob.glob(os.path.join(log_dir, "**", pattern), recursive=True)
    return max(paths, key=os.path.getmtime) if paths else None
  errors = []
  if form in ("any", "xplane"):
    path = newest("*.xplane.pb")
    try:
      from jax.profiler import ProfileData
      if path:
        return xspace_to_trace(ProfileData.from_file(path))
      errors.append("no *.xplane.pb")
    except Exception as e:  # an older or newer JAX without ProfileData: try the JSON
      errors.append(f"{path}: {e!r}")
  if form in ("any", "json"):
    path = newest("*.trace.json.gz")
    if path:
      with gzip.open(path, "rt") as f:
        return json.load(f)
    errors.append("no *.trace.json.gz")
  raise FileNotFoundError(f"no readable profiler trace under {log_dir} ({'; '.join(errors)})")


def trace_steps(run_once, steps: int, hlo_text: str) -> dict:
  """Runs ``run_once`` (which must block until done) ``steps`` times under the profiler
  and returns the per-step kernel record: ``{"steps", "source", "us_per_step": {op: us},
  "unattributed_us_per_step": {kernel: us}}``."""
  import jax
  names = [r[3] for r in hlo_bytes.analyse(hlo_text)]
  with tempfile.TemporaryDirectory(prefix="qlhs_trace_") as d:
    with jax.profiler.trace(d):
      for _ in range(steps):
        run_once()
    times, unattributed, source = kernel_times(load_trace(d), names)
  return {"steps": steps, "source": source,
          "us_per_step": {k: v / steps for k, v in times.items()},
          "unattributed_us_per_step": {k: v / steps for k, v in unattributed.items()}}


# Device-to-device copy rate (bytes read + written per second) measured on the GPU
# machines this project borrows (2026-11): H100 80GB HBM3 ~3.0 TB/s, H200 ~4.3 TB/s. The
# most a kernel that only streams memory can expect: the time a kernel takes above
# bytes / this rate is what a better kernel could win back.
COPY_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.3e12}


def copy_rate(device: str) -> float | None:
  """The copy rate of a record's ``device`` ("gpu:NVIDIA H100 80GB HBM3"); None if not
  known (a CPU, another GPU)."""
  return next((r for k, r in COPY_BYTES_PER_S.items() if k in device), None)


def report(record: dict, hlo_text: str, step_ms: float | None = None, top: int = 25,
           rate: float | None = None) -> str:
  """Time, bytes and achieved bandwidth by kind, by model part and per kernel; and, on a
  device whose copy rate is known (or with ``rate`` in bytes/s), the time each kernel
  takes above a copy of its bytes: where a faster kernel would pay."""
  rows = {name: (b, kind, part) for b, kind, part, name in hlo_bytes.analyse(hlo_text)}
  us = record["us_per_step"]
  lost = record.get("unattributed_us_per_step", {})
  outside = {k: v for k, v in us.items() if k not in rows}  # e.g. inside a conditional
  total = sum(us.values()) + sum(lost.values())
  matched = sum(v for k, v in us.items() if k in rows)
  head = (f"{record['source']}, {record['steps']} traced steps: kernel time "
          f"{total / 1e3:.2f} ms per step")
  if step_ms:
    head += f" (step {step_ms:.2f} ms: kernels fill {100 * total / 1e3 / step_ms:.0f}%"
    head += ", thunks overlap on a CPU)" if record["source"] == "host thunks" else ")"
  head += (f"; {100 * matched / max(total, 1e-9):.0f}% of it matched to "
           f"{sum(1 for k in us if k in rows)} of the {len(rows)} top-level instructions")
  lines = [head]

  def table(title, groups):
    lines.extend(["", f"{title:28s} {'ms':>8s} {'time %':>7s} {'GB':>8s} {'GB/s':>8s}"])
    for key, (t, b) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
      bw = f"{b / (t * 1e-6) / 1e9:8.0f}" if t > 0 else "       -"
      lines.append(f"  {key:26s} {t / 1e3:8.3f} {100 * t / max(total, 1e-9):7.1f} "
                   f"{b / 1e9:8.3f} {bw}")

  by_kind, by_part = collections.defaultdict(lambda: [0.0, 0]), \
      collections.defaultdict(lambda: [0.0, 0])
  for name, (b, kind, part) in rows.items():
    t = us.get(name, 0.0)
    for g, key in ((by_kind, kind), (by_part, part)):
      g[key][0] += t
      g[key][1] += b
  table("by kind", by_kind)
  table("by model part", dict(sorted(by_part.items(), key=lambda kv: -kv[1][0])[:16]))
  # Outside the blocks the op names say whose kernels they are: the guard's reduce_and,
  # the optimizer's select_n, the input's and the loss's own.
  names, by_op = hlo_bytes.op_names(hlo_text), collections.defaultdict(lambda: [0, 0.0, 0])
  for name, (b, _, part) in rows.items():
    if part == "other" and name in us:
      g = by_op[names.get(name, "").split("train_step)/", 1)[-1] or name]
      g[0], g[1], g[2] = g[0] + 1, g[1] + us[name], g[2] + b
  if by_op:
    lines.extend(["", f"{'outside the model, by operation':50s} {'kernels':>7s} "
                  f"{'ms':>8s} {'GB':>8s}"])
  for op, (n, t, b) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:8]:
    lines.append(f"  {op[-48:]:48s} {n:7d} {t / 1e3:8.3f} {b / 1e9:8.3f}")
  lines.extend(["", f"slowest {top} kernels:"])
  for name, t in sorted(((k, v) for k, v in us.items() if k in rows),
                        key=lambda kv: -kv[1])[:top]:
    b, kind, part = rows[name]
    lines.append(f"  {t / 1e3:7.3f} ms {b / 1e9:7.3f} GB {b / (t * 1e-6) / 1e9:6.0f} GB/s  "
                 f"{kind:22s} {part:14s} {name}")
  rate = rate or copy_rate(record.get("device", ""))
  if rate:
    excess = {name: t - rows[name][0] / rate * 1e6 for name, t in us.items() if name in rows}
    over = sum(max(e, 0.0) for e in excess.values())
    lines.extend(["", f"time above a copy at {rate / 1e12:.2f} TB/s: {over / 1e3:.3f} ms "
                  f"per step of {total / 1e3:.3f} ms (with every matched kernel at that rate, "
                  f"the kernels would take {(total - sum(excess.values())) / 1e3:.3f} ms)"])
    by = collections.defaultdict(float)
    for name, e in excess.items():
      by[rows[name][1]] += max(e, 0.0)
    lines.append("  by kind: " + ", ".join(f"{k} {v / 1e3:.3f} ms" for k, v in
                                           sorted(by.items(), key=lambda kv: -kv[1])))
    lines.append("  most above it (ms above, ms, GB, GB/s):")
    for name, e in sorted(excess.items(), key=lambda kv: -kv[1])[:top]:
      b, kind, part = rows[name]
      t = us[name]
      lines.append(f"  {e / 1e3:7.3f} {t / 1e3:7.3f} {b / 1e9:7.3f} "
                   f"{b / (t * 1e-6) / 1e9:6.0f}  {kind:22s} {part:14s} {name}")
  if outside or lost:
    lines.extend(["", "not matched to a top-level instruction:"])
    for name, t in sorted({**outside, **lost}.items(), key=lambda kv: -kv[1])[:10]:
      lines.append(f"  {t / 1e3:7.3f} ms  {name[:100]}")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("kernels", help="kernels.jsonl written by benchmarks.step --profile-dir")
  p.add_argument("hlo", help="the same model's .train.hlo.txt[.gz] (benchmarks.step --hlo-dir)")
  p.add_argument("--line", type=int, default=None,
                 help="which line of KERNELS (0-based); default: the last one whose model "
                      "and overrides match the HLO file's name")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--copy-tbps", type=float, default=None,
                 help="the device's copy rate in TB/s for the 'time above a copy' table "
                      "(default: known for H100 3.0 and H200 4.3)")
  args = p.parse_args(argv)
  with open(args.kernels) as f:
    records = [json.loads(l) for l in f if l.strip()]
  if args.line is not None:
    record = records[args.line]
  else:
    base = os.path.basename(args.hlo).split(".train.hlo")[0]
    hits = [r for r in records if r.get("tag") == base]
    if not hits:
      raise SystemExit(f"no line of {args.kernels} has tag {base!r} (tags: "
                       f"{sorted({r.get('tag') for r in records})}); pass --line N")
    record = hits[-1]
  print(report(record, hlo_bytes.read_hlo(args.hlo), record.get("train_step_ms"), args.top,
               args.copy_tbps * 1e12 if args.copy_tbps else None))


if __name__ == "__main__":
  main()

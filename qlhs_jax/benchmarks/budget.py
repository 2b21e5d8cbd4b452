"""``python -m qlhs_jax.benchmarks.budget STEP.hlo.txt[.gz]``: how much time a step's
Pallas kernels may take for Eq.(3) to reach the goal's ratio to ResNet50, from a profile
measured on another step on the same GPU. No GPU needed.

The kernels that are not Pallas calls (XLA's loops, reductions and matmuls, cuDNN) run
the same code generators in every variant of the step, so their time is projected from
a profiled step, per class: a kernel under :data:`SMALL_BYTES` takes the mean time of the
class's small profiled kernels (launch-bound: ~1.5-3 us each on the H200), a larger one
``t0 + bytes / rate`` fitted by least squares over the class's larger kernels (plain
``bytes / rate`` for fewer than :data:`MIN_FIT` of them). That is applied to each
kernel of STEP (bytes from
:mod:`~qlhs_jax.benchmarks.hlo_bytes`, e.g. on a deviceless compile by
``benchmarks.aot --hlo-dir``), plus the profiled step's time between kernels a launch.
What the target leaves, ResNet50's fastest recorded step on that GPU over the ratio,
is the budget of STEP's Pallas kernels. The profiled step's own Pallas kernels (other
code: the element-wise forms of 2026-12-04) give a point of comparison, not a
prediction::

  python -m qlhs_jax.benchmarks.aot --model eq3_softball_ds --set fuse_d_bn=auto \\
      --input uint8 --hlo-dir H
  python -m qlhs_jax.benchmarks.budget H/eq3_softball_ds_fuse_d_bn-auto.aot.hlo.txt.gz

Defaults: the profile is ``benchmarks/device_hlo/h200_kernels.jsonl`` line 3 (the default
step of 6e0def0 on an H200, NOTES.md experiment 23) with that step's HLO, the baseline
the fastest ResNet50 record of the profile's GPU in ``benchmarks/results.jsonl`` at
batch 256, 224 px, and the ratio 1.2. A projection from bytes, which a GPU must confirm
(NOTES.md experiment 52). With ``--floors DUMP/...gpu_after_optimizations.txt --loops
H/....pallas_loops.json`` (the same step dumped with its PTX and compiled by ``aot
--hlo-dir H``; ``benchmarks.xla_floors``) it also divides the budget by the larger of
each Pallas launch's issue floor and copy time: how far above their bounds the kernels
may run; and by the sum of each launch's latency model (``xla_floors.modelled``: the
larger of those and its latency floor, ``benchmarks.warp_cycles``; NOTES.md
experiment 53), with ``--l2-tbps R`` its copies past L1 at that L2 rate too.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from qlhs_jax.benchmarks import hlo_bytes, kernel_times, xla_floors

_HERE = os.path.dirname(os.path.abspath(__file__))
_BENCH = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "benchmarks")
PROFILE = os.path.join(_BENCH, "device_hlo", "h200_kernels.jsonl")
PROFILE_LINE = 3
PROFILE_HLO = os.path.join(_BENCH, "device_hlo",
                           "h200_6e0def0_eq3_softball_ds.train.hlo.txt.gz")
RESULTS = os.path.join(_BENCH, "results.jsonl")
PALLAS = "pallas"
# Fewer profiled kernels than this in a class: no intercept is fitted (two cuDNN
# convolutions cannot say what a launch costs apart from its bytes).
MIN_FIT = 5
# Kernels that move less than this are timed as their class's small profiled kernels'
# mean: on the H200 the element-wise loops under 2 MB took 1.46 us on average and the
# reductions 2.85, where a line through the larger kernels gives them ~0.5 (NOTES.md
# experiment 52). A step with fewer large kernels but as many small ones (the stack)
# would otherwise be projected short.
SMALL_BYTES = 2e6


def kernel_class(kind: str) -> str:
  """The class a kernel's time is fitted in: ``hlo_bytes``' kind, with cuBLAS and XLA's
  Triton GEMM fusions one class (a deviceless compile places matmuls where the device's
  autotuning may choose the other), copies with the element-wise loops (XLA emits both
  as loops), and the Pallas calls (Triton custom calls) apart."""
  if kind.startswith("matmul"):
    return "matmul"
  if kind == "copy":
    return "element-wise loop"
  if kind == "custom-call __gpu$xla.gpu.triton":
    return PALLAS
  return kind


def fit(rows, us_per_step: dict) -> dict[str, dict]:
  """``{class: {"small_us", "t0_us", "us_per_byte", "kernels", "ms", "gb"}}`` from a
  profile's ``us_per_step`` ({HLO instruction: us a step}, ``benchmarks.kernel_times``)
  and the same program's ``hlo_bytes.analyse`` rows. ``small_us``: the mean time of the
  class's kernels under :data:`SMALL_BYTES` (None without any); ``t = t0 + bytes *
  us_per_byte`` by least squares over the others, t0 clipped at 0 (then through the
  origin), and through the origin under :data:`MIN_FIT` of them; without any, through
  the origin over every kernel of the class. Each part keeps its kernels' measured sum."""
  by_class: dict[str, list[tuple[int, float]]] = {}
  for nbytes, kind, _, name in rows:
    if name in us_per_step:
      by_class.setdefault(kernel_class(kind), []).append((nbytes, us_per_step[name]))
  out = {}
  for cls, pairs in by_class.items():
    b = np.array([p[0] for p in pairs], float)
    t = np.array([p[1] for p in pairs], float)
    small = b < SMALL_BYTES
    bl, tl = (b[~small], t[~small]) if (~small).any() else (b, t)
    t0, slope = 0.0, tl.sum() / bl.sum() if bl.sum() else 0.0
    if len(bl) >= MIN_FIT and (~small).any():
      t0, slope = np.linalg.lstsq(np.stack([np.ones_like(bl), bl], 1), tl, rcond=None)[0]
      if t0 < 0 or slope <= 0:
        t0, slope = 0.0, tl.sum() / bl.sum()
    out[cls] = {"small_us": float(t[small].mean()) if small.any() else None,
                "t0_us": float(t0), "us_per_byte": float(slope), "kernels": len(pairs),
                "ms": float(t.sum()) / 1e3, "gb": float(b.sum()) / 1e9}
  return out


def kernel_us(nbytes: float, f: dict) -> float:
  """A kernel's projected time from its class's :func:`fit`, us."""
  if nbytes < SMALL_BYTES and f["small_us"] is not None:
    return f["small_us"]
  return f["t0_us"] + nbytes * f["us_per_byte"]


def project(rows, fits: dict) -> dict[str, dict]:
  """``{class: {"kernels", "gb", "ms"}}`` for a step's ``hlo_bytes.analyse`` rows, each
  kernel's time by :func:`kernel_us` (``ms`` None for the Pallas class and for a class
  the profile has no kernels of)."""
  out: dict[str, dict] = {}
  for nbytes, kind, _, _ in rows:
    cls = kernel_class(kind)
    g = out.setdefault(cls, {"kernels": 0, "gb": 0.0, "ms": 0.0})
    g["kernels"] += 1
    g["gb"] += nbytes / 1e9
    f = fits.get(cls)
    if cls == PALLAS or f is None or g["ms"] is None:
      g["ms"] = None
    else:
      g["ms"] += kernel_us(nbytes, f) / 1e3
  return out


def baseline(results: str, device: str) -> dict:
  """The fastest measured ResNet50 train step on ``device`` at batch 256, 224 px, in
  bfloat16 among ``results``' records (JSON lines): the record. Raises, naming the
  fix, if there is none."""
  best = None
  with open(results) as f:
    for line in f:
      r = json.loads(line) if line.strip() else {}
      if (r.get("model") == "resnet50" and r.get("device") == device
          and r.get("train_step_ms") and (r.get("batch"), r.get("size"), r.get("dtype"))
          == (256, 224, "bfloat16")
          and (best is None or r["train_step_ms"] < best["train_step_ms"])):
        best = r
  if best is None:
    raise SystemExit(f"no ResNet50 train step measured on {device} (batch 256, 224 px, "
                     f"bfloat16) in {results}: give --baseline-ms, or measure it with "
                     f"benchmarks/gpu_h100.sh on that GPU")
  return best


def budget(rows, profile: dict, profile_rows, baseline_ms: float, ratio: float) -> dict:
  """The projection of a step (its ``hlo_bytes.analyse`` rows) against the target
  ``baseline_ms / ratio``, from a profiled step (its record and rows): ``{"fits",
  "classes", "gap_us", "launches", "other_ms", "gaps_ms", "target_ms", "pallas_gb",
  "pallas_ms", "pallas_tbps", "pallas_copies", "profiled_copies", "at_profile"}``.
  ``pallas_ms``: the time the step's Pallas kernels may take; ``pallas_tbps`` the
  average rate that is (their bytes over it), ``pallas_copies`` the multiple of a copy
  of their bytes at the GPU's copy rate (``kernel_times.copy_rate``; None for a GPU it
  does not know), ``profiled_copies`` the profiled Pallas kernels' measured multiple;
  ``at_profile`` the step's time and ratio with its Pallas kernels at the profiled
  Pallas kernels' fit. Raises where the profile and its HLO share no kernel, or a class
  of the step has no profiled kernels."""
  us = profile["us_per_step"]
  if not any(name in us for *_, name in profile_rows):
    raise SystemExit("the profile names none of its HLO's instructions: give the HLO the "
                     "profiled step ran (benchmarks.step --hlo-dir of the same call)")
  fits = fit(profile_rows, us)
  classes = project(rows, fits)
  missing = sorted(c for c, g in classes.items() if g["ms"] is None and c != PALLAS)
  if missing:
    raise SystemExit(f"the profile has no kernels of class {', '.join(missing)}: "
                     f"no rate to project them with")
  measured = sum(us.get(name, 0.0) for *_, name in profile_rows) / 1e3
  gap_us = (profile["train_step_ms"] - measured) * 1e3 / sum(
      name in us for *_, name in profile_rows)
  launches = sum(g["kernels"] for g in classes.values())
  other = sum(g["ms"] for c, g in classes.items() if c != PALLAS)
  gaps = launches * gap_us / 1e3
  target = baseline_ms / ratio
  pallas = classes.get(PALLAS, {"kernels": 0, "gb": 0.0})
  budget_ms = target - other - gaps
  rate = kernel_times.copy_rate(profile.get("device", ""))
  f = fits.get(PALLAS)
  out = {"fits": fits, "classes": classes, "gap_us": gap_us, "launches": launches,
         "other_ms": other, "gaps_ms": gaps, "target_ms": target,
         "pallas_gb": pallas["gb"], "pallas_ms": budget_ms,
         "pallas_tbps": pallas["gb"] / budget_ms if budget_ms > 0 else None,
         "pallas_copies": (budget_ms / (pallas["gb"] * 1e9 / rate * 1e3)
                           if rate and budget_ms > 0 and pallas["gb"] else None),
         "profiled_copies": (f["ms"] / (f["gb"] * 1e9 / rate * 1e3)
                             if rate and f else None),
         "at_profile": None}
  if f is not None:
    pallas_ms = sum(kernel_us(b, f) / 1e3
                    for b, kind, _, _ in rows if kernel_class(kind) == PALLAS)
    step = other + gaps + pallas_ms
    out["at_profile"] = {"pallas_ms": pallas_ms, "step_ms": step,
                         "ratio": baseline_ms / step}
  return out


def pallas_bounds(floor_rows) -> dict | None:
  """The Pallas launches of ``xla_floors.floors``' rows whose loops were counted every
  trip: ``{"launches", "floor_ms", "copy_ms", "bound_ms", "latency_ms", "model_ms"}``
  (bound: the larger of each launch's issue floor and copy time, summed; latency:
  ``warp_cycles``' floors; model: ``xla_floors.modelled``, the largest of each
  launch's); None without any. Raises if some Pallas launch's trips are unknown (a
  floor that counts its loop once is no bound to divide by)."""
  pallas = [r for r in floor_rows if kernel_class(r["kind"]) == PALLAS]
  unknown = [r["name"] for r in pallas if r["loop"] and not r["trips"]]
  if unknown:
    raise SystemExit(f"no trip counts for {len(unknown)} Pallas launches ({unknown[0]}, "
                     f"...): give --loops the .pallas_loops.json that benchmarks.aot "
                     f"--hlo-dir wrote for the same compile")
  if not pallas:
    return None
  return {"launches": len(pallas), "floor_ms": sum(r["floor_ms"] for r in pallas),
          "copy_ms": sum(r["copy_ms"] for r in pallas),
          "bound_ms": sum(max(r["floor_ms"], r["copy_ms"]) for r in pallas),
          "latency_ms": sum(r["latency_ms"] for r in pallas),
          "model_ms": sum(xla_floors.modelled(r) for r in pallas)}


def report(step_hlo: str, profile: dict, profile_hlo: str, base: dict,
           ratio: float, bounds: dict | None = None) -> str:
  rows = hlo_bytes.analyse(hlo_bytes.read_hlo(step_hlo))
  prows = hlo_bytes.analyse(hlo_bytes.read_hlo(profile_hlo))
  base_ms = base["train_step_ms"]
  b = budget(rows, profile, prows, base_ms, ratio)
  lines = [f"{step_hlo}: {b['launches']} kernels, "
           f"{sum(g['gb'] for g in b['classes'].values()):.2f} GB",
           f"profile: {profile.get('device', '?')}, {profile.get('tag', '?')} at "
           f"{profile.get('commit', '?')}, step {profile['train_step_ms']:.2f} ms; "
           f"between kernels {b['gap_us']:.2f} us a launch",
           f"target: ResNet50 {base_ms:.2f} ms ({base.get('commit', '?')}, "
           f"{base.get('overrides') or 'defaults'}) / {ratio} = "
           f"{b['target_ms']:.2f} ms", "",
           f"{'class':30s} {'profiled: kernels':>17s} {'small':>6s} {'t0 us':>6s} "
           f"{'TB/s':>5s}   {'this step: kernels':>18s} {'GB':>6s} {'ms':>7s}"]
  for cls, g in sorted(b["classes"].items(), key=lambda kv: -kv[1]["gb"]):
    f = b["fits"].get(cls)
    small = f"{f['small_us']:6.2f}" if f and f["small_us"] is not None else f"{'-':>6s}"
    fitted = (f"{f['kernels']:17d} {small} {f['t0_us']:6.2f} "
              f"{1e-6 / f['us_per_byte']:5.2f}" if f else f"{'-':>17s} {'-':>6s} "
              f"{'-':>6s} {'-':>5s}")
    ms = "budget" if cls == PALLAS else f"{g['ms']:7.3f}"
    lines.append(f"{cls:30s} {fitted}   {g['kernels']:18d} {g['gb']:6.2f} {ms:>7s}")
  lines += [f"(small: each kernel under {SMALL_BYTES / 1e6:g} MB takes its class's small "
            f"profiled kernels' mean, us)",
            "", f"the other kernels {b['other_ms']:.2f} ms + between kernels "
                f"{b['gaps_ms']:.2f} ms = {b['other_ms'] + b['gaps_ms']:.2f} ms"]
  if b["pallas_ms"] > 0:
    lines.append(f"Pallas budget: {b['pallas_ms']:.2f} ms for {b['pallas_gb']:.2f} GB, "
                 f"{b['pallas_tbps']:.2f} TB/s on average at least")
    if b["pallas_copies"]:
      lines.append(f"  = {b['pallas_copies']:.2f}x a copy of their bytes at most (the "
                   f"profiled Pallas kernels ran at {b['profiled_copies']:.2f}x theirs)")
  else:
    lines.append(f"no Pallas budget: the other kernels alone exceed the target by "
                 f"{-b['pallas_ms']:.2f} ms")
  if bounds and b["pallas_ms"] > 0:
    lines.append(f"  = {b['pallas_ms'] / bounds['bound_ms']:.2f}x their bounds at most: "
                 f"{bounds['launches']} launches, issue floors "
                 f"{bounds['floor_ms']:.2f} ms (every loop trip counted), copies "
                 f"{bounds['copy_ms']:.2f}, the larger of each {bounds['bound_ms']:.2f}")
    lines.append(f"  = {b['pallas_ms'] / bounds['model_ms']:.2f}x their latency model at "
                 f"most: latency floors {bounds['latency_ms']:.2f} ms (benchmarks."
                 f"warp_cycles), the largest of each launch's bounds "
                 f"{bounds['model_ms']:.2f}")
  if b["at_profile"]:
    a = b["at_profile"]
    lines.append(f"with the profiled Pallas kernels' fit: {a['pallas_ms']:.2f} ms, a step "
                 f"of {a['step_ms']:.2f} ms, {a['ratio']:.2f}x ResNet50 (other kernels: a "
                 f"point of comparison, not a prediction)")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("step",
                 help="the step's HLO (benchmarks.aot or benchmarks.step --hlo-dir)")
  p.add_argument("--profile", default=PROFILE, help="kernels.jsonl of benchmarks.step "
                                                    "--profile-dir on the target GPU")
  p.add_argument("--line", type=int, default=PROFILE_LINE,
                 help="which line of --profile (0-based)")
  p.add_argument("--profile-hlo", default=PROFILE_HLO,
                 help="the profiled step's HLO, from the same call")
  p.add_argument("--baseline-ms", type=float, default=None,
                 help="ResNet50's step; default: its fastest record on the profile's GPU "
                      "in --results")
  p.add_argument("--results", default=RESULTS)
  p.add_argument("--ratio", type=float, default=1.2)
  p.add_argument("--floors", default=None,
                 help="the same step's ...gpu_after_optimizations.txt of an XLA dump with "
                      "its PTX (see benchmarks.xla_floors; needs triton): the budget "
                      "against the Pallas kernels' issue floors too")
  p.add_argument("--loops", default=None,
                 help="with --floors: the step's .pallas_loops.json (benchmarks.aot "
                      "--hlo-dir)")
  p.add_argument("--l2-tbps", type=float, default=None,
                 help="with --floors: an L2 read rate, at which the copies past L1 join "
                      "the latency model (xla_floors --l2-tbps)")
  args = p.parse_args(argv)
  for path, flag in ((args.profile, "--profile"), (args.profile_hlo, "--profile-hlo"),
                     (args.results, "--results")):
    if not os.path.exists(path):
      raise SystemExit(f"{path} not found: the defaults are the repository's "
                       f"benchmarks/ files (run from a checkout), or give {flag}")
  with open(args.profile) as f:
    records = [json.loads(line) for line in f if line.strip()]
  if not -len(records) <= args.line < len(records):
    raise SystemExit(f"--line {args.line}: {args.profile} has {len(records)} lines")
  profile = records[args.line]
  base = ({"train_step_ms": args.baseline_ms, "commit": "given"}
          if args.baseline_ms else baseline(args.results, profile.get("device", "")))
  bounds = None
  if args.floors:
    rate = kernel_times.copy_rate(profile.get("device", ""))
    l2 = args.l2_tbps * 1e12 if args.l2_tbps else None
    bounds = pallas_bounds(xla_floors.floors(args.floors, copy_bytes_per_s=rate,
                                             loops=xla_floors.read_loops(args.loops),
                                             l2_bytes_per_s=l2))
  print(report(args.step, profile, args.profile_hlo, base, args.ratio, bounds))


if __name__ == "__main__":
  main()

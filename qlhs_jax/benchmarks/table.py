"""``python -m qlhs_jax.benchmarks.table benchmarks/results.jsonl``: the records as the
Markdown tables of README "Speed" (newest last): one row per train-step record of
``benchmarks.step``, then one per ``benchmarks.fused`` record (kind "fused_op"), then
one per deviceless compile of ``benchmarks.aot`` (kind "aot_bytes": bytes, no times,
with the commit they were compiled at: the same model and overrides move other bytes
when the code changes), then one per ``benchmarks.block_tune`` run (kind "block_tune":
fuse_d_bn="block"'s kernels alone, their current and their fastest tilings), then one per
``benchmarks.stencil_times`` run (kind "stencil_times": the statistics, pass 3's sums and
du alone, the XLA forms against the fastest Pallas tilings; pass 4 and du as the default
step runs them against their one walk, dx_du, and the sums, pass 4 and du against
bwd's two walks, "-" where not timed)."""

import json
import sys


def table(path: str) -> str:
  rows = ["| date | device | jax | model | overrides | batch | size | train img/s | "
          "eval img/s (BN folded) | peak GB | train ratio |",
          "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
  fused = ["| date | device | jax | batch | Pallas tiling | none ms | xla ms | pallas ms | "
           "pallas / none |",
           "|---|---|---|---:|---|---:|---:|---:|---:|"]
  aot = ["| date | code | compiled for | jax | model | overrides | batch | size | "
         "GB per step (per device) | kernels | peak GB (XLA's estimate) |",
         "|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
  tune = ["| date | device | jax | batch | shapes timed | kernels' ms, current tiling | "
          "kernels' ms, tuned | QLHS_BLOCK_TILING (tuned) | block_max_width |",
          "|---|---|---|---:|---|---:|---:|---|---:|"]
  stencil = ["| date | device | jax | batch | shapes timed | stats: XLA ms | stats: Pallas "
             "ms | sums: XLA ms | sums: Pallas ms | du: gather ms | du: Pallas ms | pass 4, "
             "du: two kernels ms | pass 4, du: one walk ms | backward: three kernels ms | "
             "backward: bwd's walks ms | chosen |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  gb = lambda v: "-" if v is None else f"{v:.1f}"
  # Model overrides, then the kernels' environment settings (tilings) of step records,
  # then the input where it is not float32 images, then the state's writes where they
  # are grouped (records before 2026-12-05 have no field: per leaf), then "fma" where the
  # GPU kernels compiled with multiply-add contraction (config.xla_fma; records without
  # the field: without).
  overrides = lambda r: ", ".join(
      [f"{k}={v}" for k, v in sorted(r.get("overrides", {}).items())]
      + [f"{k}={v}" for k, v in sorted(r.get("env", {}).items())]
      + ([f"input={r['input']}"] if "input" in r else [])
      + (["grouped writes"] if r.get("state_writes") == "grouped" else [])
      + (["fma"] if r.get("xla_fma") else [])) or "-"
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if r.get("kind") == "fused_op":
        ms = {i: r["network_ms"].get(i, float("nan")) for i in ("none", "xla", "pallas")}
        cell = lambda v, fmt: "-" if v != v else format(v, fmt)  # NaN: not timed
        tiling = ",".join(map(str, r["tiling_values"])) if "tiling_values" in r else (
            r.get("tiling") or "default")
        fused.append(f"| {r['date']} | {r['device']} | {r['jax']} | {r['batch']} | "
                     f"{tiling} | {cell(ms['none'], '.2f')} | {cell(ms['xla'], '.2f')} | "
                     f"{cell(ms['pallas'], '.2f')} | "
                     f"{cell(ms['pallas'] / ms['none'], '.2f')} |")
        continue
      if r.get("kind") == "block_tune":
        ms = r["network_ms"]
        tune.append(f"| {r['date']} | {r['device']} | {r['jax']} | {r['batch']} | "
                    f"{', '.join(s['name'] for s in r['shapes'])} | {ms['current']:.2f} | "
                    f"{ms['tuned']:.2f} | `{r['spec']}` | "
                    f"{'-' if r.get('block_max_width') is None else r['block_max_width']} |")
        continue
      if r.get("kind") == "stencil_times":
        from qlhs_jax.benchmarks.stencil_times import best
        cells = []
        for kernel, xla in (("stats", "stats xla"), ("sums", "sums xla"),
                            ("du", "du gather")):
          _, _, totals = best(r["shapes"], r["blocks"], kernel)
          pallas = min((v for k, v in totals.items() if "@" in k), default=float("inf"))
          cells += [f"{totals.get(xla, float('inf')):.2f}", f"{pallas:.2f}"]
        # dx_du (stride-1 shapes): the default step's pass 4 and du, and the one walk;
        # bwd: the default step's sums, pass 4 and du, and bwd's two walks
        for kernel in ("dx_du", "bwd"):
          _, _, totals = best(r["shapes"], r["blocks"], kernel)
          walk = min((v for k, v in totals.items() if "@" in k), default=None)
          cells += ["-" if v is None else f"{v:.2f}"
                    for v in (totals.get(f"{kernel} pallas"), walk)]
        stencil.append(f"| {r['date']} | {r['device']} | {r['jax']} | {r['batch']} | "
                       f"{', '.join(r['shapes'])} | {' | '.join(cells)} | "
                       f"`{r['forms']} QLHS_STENCIL_TILING={r['spec']}` |")
        continue
      if r.get("kind") == "aot_bytes":
        # records from before --gemm were all compiled with cuBLAS for every matmul
        gemm = {"triton": "Triton GEMM"}.get(r.get("gemm", "cublas"), "cuBLAS")
        n = r.get("devices", 1)  # the bytes of one device's program
        target = f"{n} x {r['target']}" if n > 1 else r["target"]
        aot.append(f"| {r['date']} | {r.get('commit') or '-'} | {target} (deviceless, "
                   f"{gemm}) | "
                   f"{r['jax']} | {r['model']} | "
                   f"{overrides(r)} | {r['batch']} | {r['size']} | {r['train_gbytes']:.1f} | "
                   f"{r['kernels']} | {gb(r.get('peak_mem_gb_est'))} |")
        continue
      ratio = ", ".join(f"{v:.2f}x {k}" for k, v in r.get("train_ratio_vs", {}).items()
                        if k != r["model"]) or "-"
      rows.append(f"| {r['date']} | {r['device']} | {r['jax']} | {r['model']} | "
                  f"{overrides(r)} | {r['batch']} | {r['size']} | {r['train_img_s']:,.0f} | "
                  f"{r['eval_img_s']:,.0f} | {gb(r.get('peak_mem_gb'))} | {ratio} |")
  out = "\n".join(rows)
  if len(fused) > 2:
    out += ("\n\nBN(D u) * c alone, forward + backward summed over Eq.(3)'s 16 blocks "
            "(`benchmarks.fused`):\n\n" + "\n".join(fused))
  if len(aot) > 2:
    out += ("\n\nBytes the compiled train step moves, from compiling for the GPU on a CPU "
            "host (`benchmarks.aot`, counted by `benchmarks.hlo_bytes`):\n\n" + "\n".join(aot))
  if len(tune) > 2:
    out += ("\n\nfuse_d_bn=\"block\"'s three kernels alone, summed over the blocks of the "
            "shapes timed (`benchmarks.block_tune`):\n\n" + "\n".join(tune))
  if len(stencil) > 2:
    out += ("\n\nThe stencil's statistics, pass 3's sums and du alone, summed over the blocks "
            "of the shapes "
            "timed, in ms (`benchmarks.stencil_times`; inf: none passed):\n\n"
            + "\n".join(stencil))
  return out


if __name__ == "__main__":
  print(table(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results.jsonl"))

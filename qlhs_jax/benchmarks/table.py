"""``python -m qlhs_jax.benchmarks.table benchmarks/results.jsonl``: the harness records
as the Markdown table of README "Speed" (one row per record, newest last)."""

import json
import sys


def table(path: str) -> str:
  rows = ["| date | device | jax | model | overrides | batch | size | train img/s | "
          "eval img/s (BN folded) | peak GB | train ratio |",
          "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      over = ", ".join(f"{k}={v}" for k, v in sorted(r.get("overrides", {}).items())) or "-"
      ratio = ", ".join(f"{v:.2f}x {k}" for k, v in r.get("train_ratio_vs", {}).items()
                        if k != r["model"]) or "-"
      mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "-"
      rows.append(f"| {r['date']} | {r['device']} | {r['jax']} | {r['model']} | {over} | "
                  f"{r['batch']} | {r['size']} | {r['train_img_s']:,.0f} | "
                  f"{r['eval_img_s']:,.0f} | {mem} | {ratio} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(table(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results.jsonl"))

"""benchmarks.stencil_times: its choice of forms and tilings, and a CPU smoke run."""

import json
import subprocess
import sys

import pytest

from qlhs_jax.benchmarks import stencil_times, table
from tests.benchmarks.test_aot import HAS_CUDA_PLUGIN


def test_the_choice_weights_blocks_and_skips_wrong_results():
  """The network time weights each shape by its blocks; a Pallas result that disagrees
  with the XLA form never wins; a form is chosen only where it beats the others."""
  ok = lambda ms: {"ms": ms, "err": 0.0}
  results = {
      "a": {"stats xla": ok(4.0), "stats pallas@32,16,4,3": ok(1.0),
            "stats pallas@16,16,4,1": {"ms": 0.1, "err": 0.5},  # WRONG
            "du gather": ok(1.0), "du autodiff": ok(2.0), "du pallas@32,16,4": ok(3.0)},
      "b": {"stats xla": ok(1.0), "stats pallas@32,16,4,3": ok(2.0),
            "stats pallas@16,16,4,1": ok(0.1),
            "du gather": ok(1.0), "du autodiff": ok(0.5), "du pallas@32,16,4": ok(0.1),
            "du pallas@16,32,4": {"error": "did not compile"}},
  }
  blocks = {"a": 3, "b": 1}
  name, ms, _ = stencil_times.best(results, blocks, "stats")
  assert (name, ms) == ("stats pallas@32,16,4,3", 5.0)  # 3*1 + 2 < xla's 3*4 + 1
  assert stencil_times.best(results, blocks, "du")[0] == "du gather"  # 4.0 < 9.1, 6.5
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert spec == "stats=32,16,4,3 du=32,16,4"
  # Named, XLA's forms too (unset, a form is "auto": the kernels on a GPU); the sums,
  # not timed, left as the environment has them.
  assert forms == "QLHS_STATS_FORM=pallas QLHS_DU_FORM=gather"
  # A walk that wins is the Pallas form with its kernel in QLHS_STENCIL_ROWS.
  results["a"]["du pallas_rows@16,32,4"] = ok(0.5)
  results["b"]["du pallas_rows@16,32,4"] = ok(0.5)
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert spec == "stats=32,16,4,3 du=16,32,4"
  assert forms == "QLHS_STATS_FORM=pallas QLHS_DU_FORM=pallas QLHS_STENCIL_ROWS=du"
  results["a"]["sums pallas_rows_now@8,8,4"] = ok(0.1)  # the walk, its rows loaded late
  results["b"]["sums pallas_rows_now@8,8,4"] = ok(0.1)
  assert stencil_times.spec_and_forms(results, blocks)[1] == (
      "QLHS_STATS_FORM=pallas QLHS_SUMS_FORM=pallas QLHS_DU_FORM=pallas "
      "QLHS_STENCIL_ROWS=sums,du")
  # dx_du (pass 4 and du as one walk; no form variable): named in QLHS_STENCIL_ROWS,
  # with its tiling, only where the walk beats the two kernels (shape a only: stride 2
  # shapes have no dx_du entries).
  results["a"].update({"dx_du xla": ok(3.0), "dx_du pallas": ok(1.0),
                       "dx_du pallas_rows@32,8,4": ok(1.2)})
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert "dx_du" not in spec and "dx_du" not in forms, (spec, forms)
  results["a"]["dx_du pallas_rows_now@32,4,4"] = ok(0.6)
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert spec == "stats=32,16,4,3 sums=8,8,4 du=16,32,4 dx_du=32,4,4", spec
  assert forms.endswith("QLHS_STENCIL_ROWS=sums,du,dx_du"), forms
  # dx_du runs where du runs as Pallas: chosen, it keeps du's Pallas form
  results["a"]["du gather"] = ok(0.01)
  forms = stencil_times.spec_and_forms(results, blocks)[1]
  assert "QLHS_DU_FORM=pallas" in forms and "QLHS_DU_FORM=gather" not in forms, forms
  results["a"]["dx_du pallas_rows_now@32,4,4"] = {"ms": 0.1, "err": 0.5}  # WRONG
  forms = stencil_times.spec_and_forms(results, blocks)[1]
  assert "dx_du" not in forms and "QLHS_DU_FORM=gather" in forms, forms
  results["a"]["du gather"] = ok(1.0)
  # The product: its form variable, XLA's named where it wins; a winning walk is
  # QLHS_PRODUCT_FORM=pallas with the product in QLHS_STENCIL_ROWS.
  for shape in "ab":
    results[shape].update({"product xla": ok(1.0), "product pallas@32,16,4": ok(1.1)})
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert "product=32,16,4" in spec and "QLHS_PRODUCT_FORM=xla" in forms, (spec, forms)
  for shape in "ab":
    results[shape]["product pallas_rows@32,8,4"] = ok(0.8)
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert "product=32,8,4" in spec and "QLHS_PRODUCT_FORM=pallas" in forms, (spec, forms)
  assert forms.endswith("QLHS_STENCIL_ROWS=sums,du,product"), forms
  # A dot form that wins is its form value, its tiling under its own entry (with the
  # stages); the other forms' best tiling stays in the spec under theirs.
  for shape in "ab":
    results[shape]["sums pallas_dot@64,16,4,3"] = ok(0.05)
    results[shape]["sums pallas_dot@32,16,4,3"] = ok(0.06)
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert "sums=8,8,4 sums_dot=64,16,4,3" in spec, spec
  assert "QLHS_SUMS_FORM=pallas_dot" in forms and "rows=sums" not in forms, forms
  assert forms.endswith("QLHS_STENCIL_ROWS=du,product"), forms
  # du's likewise, its walk then no longer named
  for shape in "ab":
    results[shape]["du pallas_dot@64,8,4,3"] = ok(0.01)
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert "du=16,32,4 du_dot=64,8,4,3" in spec, spec
  assert "QLHS_DU_FORM=pallas_dot" in forms, forms
  assert forms.endswith("QLHS_STENCIL_ROWS=product"), forms
  # the product's: its walk no longer named either
  for shape in "ab":
    results[shape]["product pallas_dot@64,4,4,2"] = ok(0.5)
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert "product=32,8,4 product_dot=64,4,4,2" in spec, spec
  assert "QLHS_PRODUCT_FORM=pallas_dot" in forms and "ROWS" not in forms, forms


def test_bwd_is_chosen_only_where_its_walks_beat_both_alternatives():
  """bwd (pass 3's sums, dc and du's share from g in one walk, then du_bn) is named in
  QLHS_STENCIL_ROWS, with its tiling, and the sums and du forced to Pallas (where it
  runs), only where its walks beat, at the stride-1 shapes, both the default step's
  three kernels and the sums plus pass 4 and du as the sweep chose them; a WRONG walk
  never."""
  ok = lambda ms: {"ms": ms, "err": 0.0}
  results = {
      "s1": {"sums xla": ok(5.0), "sums pallas@32,8,4": ok(1.0), "du gather": ok(0.5),
             "du pallas@32,16,4": ok(1.0), "dx_du pallas": ok(2.0),
             "bwd xla": ok(9.0), "bwd pallas": ok(3.0), "bwd pallas_rows@32,4,4": ok(3.5)},
      "s2": {"sums xla": ok(5.0), "sums pallas@32,8,4": ok(1.0), "du gather": ok(0.1),
             "du pallas@32,16,4": ok(1.0)},  # strided: no bwd or dx_du entries
  }
  blocks = {"s1": 2, "s2": 1}
  forms = stencil_times.spec_and_forms(results, blocks)[1]
  assert "bwd" not in forms and "QLHS_DU_FORM=gather" in forms, forms  # 3.5 > 3.0
  results["s1"]["bwd pallas_rows_now@32,8,4"] = ok(2.5)  # beats 3.0, the sums + pass 4, du
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert spec == "sums=32,8,4 du=32,16,4 bwd=32,8,4", spec
  assert forms == ("QLHS_SUMS_FORM=pallas QLHS_DU_FORM=pallas "
                   "QLHS_STENCIL_ROWS=bwd"), forms
  # the dx_du walk chosen too (1.2 < 2.0): bwd must beat the sums plus that walk, 2.2
  results["s1"]["dx_du pallas_rows@32,8,4"] = ok(1.2)
  forms = stencil_times.spec_and_forms(results, blocks)[1]
  assert forms.endswith("QLHS_STENCIL_ROWS=dx_du"), forms
  results["s1"]["bwd pallas_rows_now@32,8,4"] = ok(2.1)
  spec, forms = stencil_times.spec_and_forms(results, blocks)
  assert "bwd=32,8,4" in spec and forms.endswith("QLHS_STENCIL_ROWS=dx_du,bwd"), forms
  results["s1"]["bwd pallas_rows_now@32,8,4"] = {"ms": 0.1, "err": 0.5}  # WRONG
  assert "bwd" not in stencil_times.spec_and_forms(results, blocks)[1]


def test_cpu_smoke_run(tmp_path, capsys):
  """Interpreted on the CPU at a small size: every form runs, agrees with the XLA form,
  the two lines gpu_h100.sh reads come out, and the record reaches the results table."""
  rec = tmp_path / "r.jsonl"
  assert stencil_times.main(["--batch", "1", "--size-scale", "8", "--calls", "1",
                             "--repeats", "1", "--shapes", "stage2_block0",
                             "--stats-tilings", "8,16,4,3", "--sums-tilings", "8,8,4",
                             "--du-tilings", "8,16,4", "--product-tilings", "8,8,4",
                             "--sums-dot-tilings", "8,16,4,2", "--stats-dot-tilings",
                             "8,16,4,3", "--du-dot-tilings", "8,8,4,2",
                             "--product-dot-tilings", "8,4,4,2", "--record",
                             str(rec)]) == 0
  out = capsys.readouterr().out
  assert "WRONG" not in out and "failed" not in out, out
  assert ("stencil_tiling: stats=8,16,4,3 stats_dot=8,16,4,3 sums=8,8,4 sums_dot=8,16,4,2 "
          "du=8,16,4 du_dot=8,8,4,2 product=8,8,4 product_dot=8,4,4,2") in out, out
  assert "stencil_forms: QLHS_STATS_FORM=" in out, out
  r = json.loads(rec.read_text().splitlines()[-1])
  assert r["kind"] == "stencil_times" and set(r["shapes"]["stage2_block0"]) == {
      "stats xla", "stats pallas@8,16,4,3", "stats pallas_gram@8,16,4,3",
      "stats pallas_rows@8,16,4,3", "stats pallas_rows_now@8,16,4,3", "sums xla",
      "sums pallas@8,8,4", "sums pallas_xhat@8,8,4", "sums pallas_rows@8,8,4",
      "sums pallas_rows_now@8,8,4", "stats pallas_dot@8,16,4,3",
      "sums pallas_dot@8,16,4,2", "du gather", "du autodiff", "du pallas@8,16,4",
      "du pallas_rows@8,16,4", "du pallas_rows_now@8,16,4", "du pallas_dot@8,8,4,2",
      "product xla",
      "product pallas@8,8,4", "product pallas_rows@8,8,4", "product pallas_rows_now@8,8,4",
      "product pallas_dot@8,4,4,2"}
  assert "| stage2_block0 |" in table.table(str(rec)).split("benchmarks.stencil_times")[1]


def test_d_kernel_compute_gives_every_entry_a_bfloat16_kernel(tmp_path, capsys,
                                                              monkeypatch):
  """--d-kernel compute: D's kernel in bfloat16 to every entry, so the product's
  products take one part of it, at the one-part tilings unless named; the entries agree
  with XLA's form, and the forms line and the record name the setting."""
  from qlhs_jax.kernels import stencil
  parts, real = [], stencil._k_block
  monkeypatch.setattr(stencil, "_k_block",
                      lambda k, e, bj, p, *a, **kw: parts.append(p) or real(k, e, bj, p,
                                                                            *a, **kw))
  rec = tmp_path / "r.jsonl"
  assert stencil_times.main(["--batch", "1", "--size-scale", "8", "--calls", "1",
                             "--repeats", "1", "--shapes", "stage2_block0", "--kernels",
                             "product", "--forms", "pallas_dot", "--d-kernel", "compute",
                             "--record", str(rec)]) == 0
  out = capsys.readouterr().out
  assert "WRONG" not in out and "failed" not in out, out
  assert "D's kernel compute" in out and "QLHS_D_KERNEL=compute" in out, out
  r = json.loads(rec.read_text().splitlines()[-1])
  assert r["d_kernel"] == "compute"
  assert set(r["shapes"]["stage2_block0"]) == {"product xla"} | {
      f"product pallas_dot@{t}" for t in stencil_times.PRODUCT_DOT_ONE_PART_TILINGS}
  assert parts and set(parts) == {1}, parts
  with pytest.raises(SystemExit):
    stencil_times.main(["--d-kernel", "bfloat16"])


def test_kernels_runs_only_the_kernels_named(tmp_path, capsys):
  """--kernels sums: pass 3's sums and their XLA reference only (what gpu_h100.sh's
  ncu_kernel runs under the profiler); a kernel it does not know is refused by name."""
  rec = tmp_path / "r.jsonl"
  assert stencil_times.main(["--batch", "1", "--size-scale", "8", "--calls", "1",
                             "--repeats", "1", "--shapes", "stage2_block0",
                             "--sums-tilings", "8,8,4", "--kernels", "sums",
                             "--record", str(rec)]) == 0
  out = capsys.readouterr().out
  assert "network so far, sums" in out and "network so far, du" not in out, out
  r = json.loads(rec.read_text().splitlines()[-1])
  assert set(r["shapes"]["stage2_block0"]) == {"sums xla", "sums pallas@8,8,4",
                                               "sums pallas_xhat@8,8,4",
                                               "sums pallas_rows@8,8,4",
                                               "sums pallas_rows_now@8,8,4",
                                               "sums pallas_dot@64,16,4,3",
                                               "sums pallas_dot@32,16,4,3"}
  with pytest.raises(SystemExit):
    stencil_times.main(["--kernels", "sums,gram"])
  assert "--kernels 'sums,gram': name some of stats, sums, du" in capsys.readouterr().err
  # --forms: the Pallas forms named only (the XLA forms always: the reference), at every
  # shape (the second shape's once timed the forms that the first one's choice named)
  assert stencil_times.main(["--batch", "1", "--size-scale", "8", "--calls", "1",
                             "--repeats", "1", "--shapes", "stage2,stage3", "--du-tilings",
                             "8,16,4", "--kernels", "du", "--forms", "pallas_rows",
                             "--record", str(rec)]) == 0
  r = json.loads(rec.read_text().splitlines()[-1])
  assert set(r["shapes"]) == {"stage2", "stage3"}
  for shape in ("stage2", "stage3"):
    assert set(r["shapes"][shape]) == {"du gather", "du autodiff",
                                       "du pallas_rows@8,16,4"}, r["shapes"]
  assert "stencil_forms: QLHS_DU_FORM=" in capsys.readouterr().out  # du alone
  # dx_du at a stride-1 shape: XLA's pass 4 and du (the reference), XLA's pass 4 and
  # du's tiles (the default step's), and the walk both ways, all agreeing
  assert stencil_times.main(["--batch", "1", "--size-scale", "8", "--calls", "1",
                             "--repeats", "1", "--shapes", "stage2", "--kernels", "dx_du",
                             "--dx-du-tilings", "8,4,4", "--record", str(rec)]) == 0
  out = capsys.readouterr().out
  assert "WRONG" not in out and "failed" not in out, out
  assert "network so far, dx_du" in out and "network so far, du:" not in out, out
  r = json.loads(rec.read_text().splitlines()[-1])
  assert set(r["shapes"]["stage2"]) == {"dx_du xla", "dx_du pallas",
                                        "dx_du pallas_rows@8,4,4",
                                        "dx_du pallas_rows_now@8,4,4"}, r["shapes"]
  # the table's dx_du times, over the blocks of that shape: the default step's two
  # kernels, the fastest walk (then bwd's two)
  row = table.table(str(rec)).splitlines()[-1].split(" | ")
  times, blocks = r["shapes"]["stage2"], r["blocks"]["stage2"]
  walk = min(times[f"dx_du {f}@8,4,4"]["ms"] for f in ("pallas_rows", "pallas_rows_now"))
  assert row[-5:-3] == [f"{times['dx_du pallas']['ms'] * blocks:.2f}",
                        f"{walk * blocks:.2f}"], row
  # bwd at a stride-1 shape: XLA's sums, pass 4 and du (the reference), the default
  # step's three kernels, and bwd's two walks both ways, all agreeing; the table's last
  # two times are theirs
  assert stencil_times.main(["--batch", "1", "--size-scale", "8", "--calls", "1",
                             "--repeats", "1", "--shapes", "stage2", "--kernels", "bwd",
                             "--bwd-tilings", "8,4,4", "--record", str(rec)]) == 0
  out = capsys.readouterr().out
  assert "WRONG" not in out and "failed" not in out, out
  assert "network so far, bwd" in out, out
  r = json.loads(rec.read_text().splitlines()[-1])
  times = r["shapes"]["stage2"]
  assert set(times) == {"bwd xla", "bwd pallas", "bwd pallas_rows@8,4,4",
                        "bwd pallas_rows_now@8,4,4"}, times
  row = table.table(str(rec)).splitlines()[-1].split(" | ")
  walk = min(times[f"bwd {f}@8,4,4"]["ms"] for f in ("pallas_rows", "pallas_rows_now"))
  assert row[-3:-1] == [f"{times['bwd pallas']['ms'] * blocks:.2f}",
                        f"{walk * blocks:.2f}"], row
  with pytest.raises(SystemExit):
    stencil_times.main(["--forms", "pallas,rows"])
  assert "--forms 'pallas,rows': name some of pallas, pallas_gram" in (
      capsys.readouterr().err)


def test_each_entry_is_traced_with_its_own_settings(monkeypatch):
  """Every tiling and form is its own trace: the grids the kernels are launched with
  follow each entry's tiling, and the walk and its late-loading twin are different
  programs. (jax.jit reuses a function object's first trace; the same lambda jitted
  again timed the first tiling's kernel for every tiling until 2026-12-04.)"""
  from qlhs_jax.kernels import stencil
  launched, real = [], stencil.pl.pallas_call

  def spy(kernel, *a, **k):
    launched.append((kernel.func.__name__, k["grid"], kernel.keywords["plan"].get("ahead")))
    return real(kernel, *a, **k)
  monkeypatch.setattr(stencil.pl, "pallas_call", spy)
  out = stencil_times.time_shape(2, 8, 8, 1, (), (), ("8,8,4", "4,4,2"), True, 1, 1,
                                 kernels=("du",))
  assert not any("error" in r for r in out.values()), out
  grids = {}
  for name, grid, ahead in launched:
    grids.setdefault(name, []).append((grid, ahead))
  # the tiles: 8 then 4 pixels a tile, 8 then 4 channels a block
  assert grids["_du_kernel"] == [((16, 1), None), ((32, 2), None)], grids
  # the walks: strips of 8 then 4 columns, loading ahead, then where used
  assert [g for g, _ in grids["_du_rows_kernel"]] == [(16, 1), (32, 2), (16, 1), (32, 2)]
  assert [a for _, a in grids["_du_rows_kernel"]] == [True, True, False, False], grids
  launched.clear()  # dx_du: whole rows of 8 lanes, then 8 then 4 channels a program
  out = stencil_times.time_shape(2, 8, 8, 1, (), (), (), True, 1, 1, kernels=("dx_du",),
                                 dx_du_tilings=("8,8,4", "8,4,2"))
  assert not any("error" in r for r in out.values()), out
  walks = [(g, a) for name, g, a in launched if name == "_dx_du_rows_kernel"]
  # (each of 2 images in 8 chunks of a row: ROWS_PROGRAMS)
  assert walks == [((16, 1), True), ((16, 2), True), ((16, 1), False),
                   ((16, 2), False)], walks
  launched.clear()  # the dot form's tilings: its own entry of QLHS_STENCIL_TILING
  out = stencil_times.time_shape(2, 8, 8, 1, (), (), (), True, 1, 1, kernels=("sums",),
                                 sums_dot_tilings=("8,8,4,2", "4,4,2,1"))
  assert not any("error" in r for r in out.values()), out
  dots = [g for name, g, _ in launched if name == "_bn_sums_dot_kernel"]
  assert dots == [(16, 1), (32, 2)], dots
  launched.clear()  # du's (16 then 32 tiles, one a program; 1 then 2 channel blocks)
  out = stencil_times.time_shape(2, 8, 8, 1, (), (), (), True, 1, 1, kernels=("du",),
                                 du_dot_tilings=("8,8,4,2", "4,4,2,1"))
  assert not any("error" in r for r in out.values()), out
  dots = [g for name, g, _ in launched if name == "_du_dot_kernel"]
  assert dots == [(16, 1), (32, 2)], dots
  launched.clear()  # the product's: at stride 1 a program a chunk of tiles
  out = stencil_times.time_shape(2, 8, 8, 1, (), (), (), True, 1, 1, kernels=("product",),
                                 forms=("pallas_dot",),
                                 product_dot_tilings=("8,8,4,2", "4,4,2,1"))
  assert not any("error" in r for r in out.values()), out
  dots = [g for name, g, _ in launched if name == "_product_kernel"]
  assert dots == [(16, 1), (32, 2)], dots


def test_du_bn_is_compiled_once_a_shape_and_form_for_all_of_bwds_tilings(monkeypatch):
  """bwd's walks at two tilings each way: the walk is its own program at every entry,
  du_bn's is compiled once for the walks loading ahead and once for those loading where
  used (its own tiling is the default; 12-15 s a compile at stage 1), and each entry
  still gives XLA's dc, du and sums."""
  from qlhs_jax.kernels import stencil
  launched, real = [], stencil.pl.pallas_call

  def spy(kernel, *a, **k):
    launched.append((kernel.func.__name__, kernel.keywords["plan"].get("ahead")))
    return real(kernel, *a, **k)
  monkeypatch.setattr(stencil.pl, "pallas_call", spy)
  out = stencil_times.time_shape(2, 8, 8, 1, (), (), (), True, 1, 1, kernels=("bwd",),
                                 forms=("pallas_rows", "pallas_rows_now"),
                                 bwd_tilings=("8,4,4", "8,8,4"))
  assert set(out) == {"bwd xla", "bwd pallas", "bwd pallas_rows@8,4,4",
                      "bwd pallas_rows@8,8,4", "bwd pallas_rows_now@8,4,4",
                      "bwd pallas_rows_now@8,8,4"}, out
  assert all(r["err"] < stencil_times.WRONG["bwd"] for r in out.values()), out
  walks = [a for name, a in launched if name == "_bwd_rows_kernel"]
  du_bn = [a for name, a in launched if name == "_du_bn_rows_kernel"]
  # each walk traced once, to compile it
  assert walks == [True, True, False, False], walks
  assert du_bn == [True, False], du_bn


def test_rel_is_the_largest_difference_over_the_largest_reference_value():
  """_rel (reduced where the arrays are, in float32) against NumPy float64, over a
  tuple of arrays of different sizes and dtypes: the largest difference of any array
  over the largest magnitude of any reference array. Outputs of other shapes than the
  reference's are refused, not broadcast."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(3)
  ref = (rng.normal(size=(5, 7)), 40 * rng.normal(size=(3,)))
  got = (ref[0] + 1e-3 * rng.normal(size=(5, 7)), 1.5 * ref[1])
  cast = lambda t: (jnp.asarray(t[0], jnp.float32), jnp.asarray(t[1], jnp.bfloat16))
  ref32, got32 = cast(ref), cast(got)
  r64, g64 = ([np.asarray(x, np.float64) for x in t] for t in (ref32, got32))
  want = (max(np.abs(g - r).max() for g, r in zip(g64, r64))
          / max(np.abs(r).max() for r in r64))
  assert want > 0.2  # the bfloat16 array's difference, over its largest value
  assert stencil_times._rel(got32, ref32) == pytest.approx(want, rel=1e-6)
  assert stencil_times._rel(ref32, ref32) == 0.0
  with pytest.raises(ValueError, match="shapes"):
    stencil_times._rel((ref32[0].T, ref32[1]), ref32)


def test_compile_only_is_refused_with_record_and_for_unknown_targets(tmp_path):
  with pytest.raises(SystemExit):
    stencil_times.main(["--compile-only", "h100", "--record", str(tmp_path / "r.jsonl")])
  with pytest.raises(SystemExit, match="targets are h100"):
    stencil_times.main(["--compile-only", "a100", "--shapes", "none"])
  assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs JAX's CUDA plugin")
def test_compile_only_compiles_each_entry_for_the_gpu():
  """--compile-only h100: every entry compiled for the GPU without one (its own
  process: the compile-only device keeps JAX on the CPU), the walks as Triton kernels
  (bwd: its walk and du_bn), the XLA forms as none; nothing run."""
  p = subprocess.run(
      [sys.executable, "-m", "qlhs_jax.benchmarks.stencil_times", "--compile-only",
       "h100", "--batch", "2", "--size-scale", "8", "--shapes", "stage1",
       "--kernels", "du,bwd", "--forms", "pallas,pallas_rows", "--du-tilings", "8,8,4",
       "--bwd-tilings", "8,4,4"], capture_output=True, text=True)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = {l.split(" compiled in ")[0].strip(): l for l in p.stdout.splitlines()
           if " compiled in " in l}
  assert set(lines) == {"du gather", "du autodiff", "du pallas@8,8,4",
                        "du pallas_rows@8,8,4", "bwd xla", "bwd pallas",
                        "bwd pallas_rows@8,4,4"}, p.stdout
  kernels = {k: int(l.split("(")[-1].split()[0]) for k, l in lines.items()}
  assert kernels == {"du gather": 0, "du autodiff": 0, "du pallas@8,8,4": 1,
                     "du pallas_rows@8,8,4": 1, "bwd xla": 0, "bwd pallas": 2,
                     "bwd pallas_rows@8,4,4": 2}, kernels
  assert "compiles at stage1:" in p.stdout and "(0 failed)" in p.stdout, p.stdout

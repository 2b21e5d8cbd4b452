"""Compiles the Pallas kernels of ``fuse_d_bn="pallas"`` (or ``"block"``) for an H100,
without a GPU.

  pip install triton==3.9.0        # Triton's compiler and ptxas (~650 MB), not a dependency
  python -m qlhs_jax.benchmarks.triton_compile [--batch 256] [--arch 90a] [--op eq3_block]

For each block shape of Eq.(3) at 224 px (``benchmarks.fused.EQ3_SHAPES``) it lowers the
forward and backward of ``d_bn_product(impl="pallas")`` for CUDA on this machine,
captures the Triton IR of the four kernels that JAX's Pallas lowering emits, compiles it
with the ``triton`` package to PTX and a cubin for ``sm_<arch>``, and prints what ptxas
reports: registers per thread, spill bytes, and Triton's shared memory. It also
disassembles the cubin (the package's ``nvdisasm``) and counts each kernel's machine
instructions: per warp, in its main loop's body, and (``--op stencil``, whose loops'
trip counts follow from the plan) the issue floor, the time one H100 needs to issue
every warp instruction of the launch at one instruction per cycle per scheduler
(:func:`issue_floor_ms`). A kernel whose floor is near its measured time is bound by
its instructions, not its bytes (benchmarks/NOTES.md, experiment 16). On a GPU, XLA
compiles the same IR with the Triton build inside jaxlib; this check catches kernels
that do not compile, spill, or need too many registers before a GPU session is spent on
them. Triton's own pipeline, used here, fuses multiply-adds; XLA's does so only with
``config.xla_fma`` (the default since 2026-12-05, ``qlhs_jax.xla_options``). Without
it the GPU ran more instructions than these counts (du's tiles at stage 1: 715 a
thread against 616; experiment 36), and other registers: ``benchmarks.xla_floors`` on
a step compiled by ``benchmarks.aot`` reads what XLA's pipeline emits. Exit status 1 if
a kernel fails to compile. Uses a private JAX function
(``jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module``) to see the IR.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import subprocess
import sys
import tempfile


def abstract_inputs(batch: int, side: int, n: int, stride: int, e: int = 4):
  """``(u, c, kernel, scale, bias)`` of d_bn_product as bfloat16/float32 shapes only."""
  import jax
  import jax.numpy as jnp

  from qlhs_jax.models.layers import _out_size
  ho = _out_size(side, stride)
  s = jax.ShapeDtypeStruct
  return (s((batch, side, side, n), jnp.bfloat16), s((batch, ho, ho, n * e), jnp.bfloat16),
          s((3, 3, 1, e), jnp.float32), s((n * e,), jnp.float32), s((n * e,), jnp.float32))


# The GPU Pallas lowers for where no GPU is attached: JAX >= 0.11 reads its compute
# capability from an abstract mesh's device (before, the lowering did not ask).
TARGET_KIND = "NVIDIA H100 80GB HBM3"


def lower_on_cuda(fn, *args):
  """``jax.jit(fn)`` traced at ``args`` (shapes) and lowered for CUDA on this machine,
  under an abstract one-device mesh whose device is an H100 (``TARGET_KIND``)."""
  import jax
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
  device = AbstractDevice(device_kind=TARGET_KIND, num_cores=132, platform="gpu")
  mesh = AbstractMesh((1,), ("data",), (AxisType.Explicit,), abstract_device=device)
  with use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def lower_for_cuda(batch: int, side: int, n: int, stride: int):
  """Forward and backward of ``d_bn_product(impl="pallas")``, lowered for CUDA here."""
  import jax
  import jax.numpy as jnp

  from qlhs_jax.kernels import d_bn_product as dbn

  def loss(*a):
    p, mean, _ = dbn.d_bn_product(*a, stride=stride, impl="pallas")
    return p.astype(jnp.float32).sum() + mean.sum()
  # value_and_grad: the loss needs the forward kernel (JAX >= 0.12 drops it from a
  # bare gradient whose formula does not use the product).
  return lower_on_cuda(jax.value_and_grad(loss, argnums=range(5)),
                       *abstract_inputs(batch, side, n, stride))


def lower_block_for_cuda(batch: int, side: int, n: int, stride: int = 1, e: int = 4):
  """Forward and backward of ``eq3_block.eq3_hidden`` (``fuse_d_bn="block"``; n_out = n,
  or 2n with a stride, as in Eq.(3)) in bfloat16, lowered for CUDA here."""
  import jax
  import jax.numpy as jnp

  from qlhs_jax.benchmarks.fused import eq3_n_out
  from qlhs_jax.kernels import eq3_block
  s, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  n_out = eq3_n_out(n, stride)
  args = (s((batch, side, side, n), bf), s((n, n * e), bf), s((n * e, n_out), bf),
          s((3, 3, 1, e), jnp.float32), s((n * e,), jnp.float32), s((n * e,), jnp.float32))

  def loss(*a):
    y, mean, _ = eq3_block.eq3_hidden(*a, stride=stride)
    return y.astype(jnp.float32).sum() + mean.sum()
  return lower_on_cuda(jax.value_and_grad(loss, argnums=range(6)), *args)  # as above


def lower_stencil_for_cuda(batch: int, side: int, n: int, stride: int = 1, e: int = 4):
  """``stencil.tap_stats`` of u (the 54-product kernel, and at stride 1 the lag kernel),
  ``stencil.bn_sums``, ``stencil.d_transpose`` of dx (with an addend, as eq3_block
  calls it), ``stencil.product``, ``stencil.dx_dc`` and at stride 1 ``stencil.dx_du``,
  ``stencil.bwd`` and ``stencil.du_bn`` in bfloat16, lowered for CUDA here."""
  import jax
  import jax.numpy as jnp

  from qlhs_jax.kernels import stencil
  from qlhs_jax.models.layers import _out_size
  s, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  ho = _out_size(side, stride)

  def kernels(u, dx, k9, add, vec):
    # the kernels at stride 1 only: the lag sums, pass 4 with du as one walk, and the
    # backward's walk with du_bn
    lags = (stencil.lag_sums(u, interpret=False),) if stride == 1 else ()
    walks = ((stencil.dx_du(u, dx, dx, k9, vec, vec, vec, vec, vec, bf, interpret=False),
              stencil.bwd(u, dx, dx, k9, vec, vec, vec, vec, interpret=False),
              stencil.du_bn(u, k9, vec, vec, vec, add, bf, interpret=False),)
             if stride == 1 else ())
    return (stencil.tap_stats(u, stride, interpret=False, lags=False), *lags,
            stencil.bn_sums(u, dx, dx, k9, vec, vec, stride, interpret=False),
            stencil.d_transpose(dx, k9, stride, (side, side), addends=(add, add),
                                out_dtype=bf, interpret=False),
            stencil.product(u, dx, k9, vec, vec, stride, interpret=False),
            *stencil.dx_dc(u, dx, dx, k9, vec, vec, vec, vec, vec, stride, bf,
                           interpret=False), *walks)
  return lower_on_cuda(kernels, s((batch, side, side, n), bf), s((batch, ho, ho, n, e), bf),
                       s((9, n, e), jnp.float32), s((batch, side, side, n), jnp.float32),
                       s((1, n, e), jnp.float32))


def lower_product_a_for_cuda(batch: int, side: int, n: int, stride: int = 1, e: int = 4):
  """``stencil.product_a`` (QLHS_P_FORM=kernels: y = p @ A in the forward product's
  kernel) in bfloat16 with D's kernel in one bfloat16 part (QLHS_D_KERNEL=compute), to
  n_out = n, or 2n with a stride, as in Eq.(3), lowered for CUDA here."""
  import jax
  import jax.numpy as jnp

  from qlhs_jax.benchmarks.fused import eq3_n_out
  from qlhs_jax.kernels import stencil
  s, bf = jax.ShapeDtypeStruct, jnp.bfloat16

  def kernel(u, cw, aw, k9, vec):
    return stencil.product_a(u, cw, aw, k9, vec, vec, stride, interpret=False)
  return lower_on_cuda(kernel, s((batch, side, side, n), bf), s((n, n * e), bf),
                       s((n * e, eq3_n_out(n, stride)), bf), s((9, n, e), bf),
                       s((1, n, e), jnp.float32))


def product_a_plan(batch: int, side: int, n: int, stride: int) -> dict:
  """``stencil.product_a``'s ``{"blocks", "tpc", "programs"}`` at one shape: the inner
  loop's trips (blocks of input channels) a tile, the outer loop's (tiles) a program,
  and the programs."""
  from qlhs_jax.kernels import stencil
  m0, bj0 = stencil.tiling("product_a_dot")[:2]
  plan = stencil._chunked_plan((batch, side, side, n), stride, m0, bj0, every_block=True)
  return {"blocks": n // plan["bj"], "tpc": plan["tpc"], "programs": plan["chunks"]}


OPS = ("d_bn_product", "eq3_block", "stencil", "product_a")


def block_warps(kernel_name: str, side: int, n: int, stride: int) -> int:
  """The warps QLHS_BLOCK_TILING gives an eq3_block kernel (``qlhs_eq3_<kernel>_kernel``)
  at one of Eq.(3)'s block shapes (n_out = n, or 2n with a stride)."""
  from qlhs_jax.benchmarks.fused import eq3_n_out
  from qlhs_jax.kernels import eq3_block
  kernel = next(k for k in eq3_block.KERNELS if f"_{k}_" in kernel_name)
  key = eq3_block.shape_key(side, side, n, eq3_n_out(n, stride), stride)
  return eq3_block.tiling(kernel, key)[1]


def triton_ir(batch: int, side: int, n: int, stride: int,
              op: str = "d_bn_product") -> list[tuple[str, str, tuple[int, ...]]]:
  """``[(kernel name, Triton IR text, grid)]`` of the Pallas kernels of ``op`` at one
  shape: d_bn_product's four passes, eq3_block's three kernels, or kernels.stencil's."""
  from jax._src.pallas.triton import lowering
  from jax._src.pallas.triton import pallas_call_registration as registration
  captured = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    text = result.module.operation.get_asm(enable_debug_info=False)
    captured.append((re.search(r"module @(\w+)", text).group(1), text,
                     tuple(args[1].grid)))
    return result
  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    if op == "eq3_block":
      lower_block_for_cuda(batch, side, n, stride)
    elif op == "product_a":
      lower_product_a_for_cuda(batch, side, n, stride)
    elif op == "stencil":
      lower_stencil_for_cuda(batch, side, n, stride)
    else:
      lower_for_cuda(batch, side, n, stride)
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
  return captured


def _ptxas_candidates() -> list[str]:
  """ptxas binaries to try: those bundled with ``triton``, then those of the NVIDIA wheels
  that JAX's CUDA plugin installs (``nvidia/cu13/bin``, ``nvidia/cuda_nvcc/bin``). Why the
  second: XLA of jax 0.12.1 with the CUDA 13 plugin writes PTX 9.5, which triton 3.9.0's
  ptxas (PTX 8.8) refuses."""
  import triton
  bins = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends",
                                       "nvidia", "bin", "ptxas*")), reverse=True)
  try:
    import nvidia
    for root in nvidia.__path__:
      bins += sorted(glob.glob(os.path.join(root, "*", "bin", "ptxas")))
  except ImportError:
    pass
  return bins


def assemble(ptx: str, arch: str) -> tuple[str, bytes]:
  """``(report, cubin)``: ptxas -v's report (registers and spills of every kernel in the
  PTX) and the cubin, from the first ptxas (:func:`_ptxas_candidates`) that assembles
  this PTX."""
  bins = _ptxas_candidates()
  with tempfile.TemporaryDirectory() as tmp:
    path, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
    with open(path, "w") as f:
      f.write(ptx)
    for ptxas in bins:
      r = subprocess.run([ptxas, f"-arch=sm_{arch}", "-v", path, "-o", out],
                         capture_output=True, text=True)
      if r.returncode == 0:
        with open(out, "rb") as f:
          return r.stderr, f.read()
  raise RuntimeError(f"no ptxas in {bins} assembled the PTX: {r.stderr[-500:]}")


# One H100 SXM: 132 SMs of 4 schedulers, each issuing at most one warp instruction a
# cycle, at the 1,980 MHz that nvidia-smi gives as its maximum SM clock.
H100_SCHEDULERS, H100_CLOCK_HZ = 132 * 4, 1.98e9
_SASS_OP = re.compile(  # "/*0a30*/  [@!P0 ]OPCODE..." in nvdisasm's listing
    r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-7T] )?([A-Z][A-Z0-9_.]*)", re.M)


def first_loop(sass: str) -> str | None:
  """The text of a kernel's first loop in its disassembly (nvdisasm's text), from a
  label to the first branch back to it; None without a loop. ptxas ends a loop with a
  conditional branch back, or, where the body holds a branch of its own (a
  ``lax.cond``), with an unconditional one; the trap loop after EXIT, a label and a
  branch to itself, is not a loop."""
  lines = sass.splitlines()
  for i, line in enumerate(lines):
    label = re.match(r"^(\.L_x_\d+):", line)
    if not label:
      continue
    back = re.compile(r"(?:@!?P[0-7] )?BRA `\(" + re.escape(label.group(1)) + r"\)")
    end = next((j for j in range(i + 1, len(lines)) if back.search(lines[j])), None)
    if end is not None and end > i + 1:
      return "\n".join(lines[i:end + 1])
  return None


def inner_loop(sass: str) -> str | None:
  """The text of the first loop inside :func:`first_loop`'s body, a loop nested in it;
  None without one."""
  body = first_loop(sass)
  return first_loop("\n".join(body.splitlines()[1:])) if body else None


def inner_count(sass: str) -> int:
  """The machine instructions of :func:`inner_loop`, 0 without one."""
  inner = inner_loop(sass)
  return len(_SASS_OP.findall(inner)) if inner else 0


def sass_counts(sass: str) -> dict:
  """``{"instructions", "loop"}`` of a kernel's disassembly: every machine instruction,
  and those of its first loop (:func:`first_loop`; 0 without one). A branch inside the
  body counts whole, taken or not."""
  body = first_loop(sass)
  return {"instructions": len(_SASS_OP.findall(sass)),
          "loop": len(_SASS_OP.findall(body)) if body else 0}


def issued_a_warp(instructions: int, loop: int, inner: int, trips: int,
                  inner_trips: int, later=()) -> int:
  """The instructions a warp issues in a kernel whose listing has ``instructions``, a
  loop of ``loop`` run ``trips`` times, and in it a loop of ``inner`` run
  ``inner_trips`` times a trip, then ``later``: ``(instructions, trips)`` of each loop
  after the first (``warp_cycles.later_loops``); the listing holds each loop once."""
  return (instructions + loop * max(trips - 1, 0)
          + inner * max(inner_trips - 1, 0) * trips
          + sum(size * max(n - 1, 0) for size, n in later))


def machine_trips(trips: int, inner_trips: int, nested: bool) -> tuple[int, int]:
  """(trips of the machine code's first loop, of the loop nested in it) for a kernel
  whose traced first loop runs ``trips`` times with a loop in it of ``inner_trips``;
  ``nested``: whether the machine code has a loop inside its first. A loop of one trip
  is no loop in the machine code (the compiler folds it away), so where the traced
  first loop runs once and nothing is nested, the machine code's first loop is the
  traced inner one (``stencil.product_a`` at one tile a chunk: its loop over the
  channel blocks)."""
  if trips == 1 and inner_trips > 1 and not nested:
    return inner_trips, 1
  return trips, inner_trips


def issue_floor_ms(instructions: int, loop: int, trips: int, warps: int,
                   programs: int) -> float:
  """The time in ms one H100 needs to issue a launch's warp instructions: per warp the
  kernel's instructions plus its loop body ``trips - 1`` more times (the loop once is
  in the count), times ``warps * programs``, over 528 schedulers at 1.98 GHz. A lower
  bound: stalls, a lower clock and the tail of the last wave all add to it."""
  per_warp = instructions + loop * max(trips - 1, 0)
  return per_warp * warps * programs / (H100_SCHEDULERS * H100_CLOCK_HZ) * 1e3


def _disassemble(cubin: bytes, encodings: bool = False) -> str:
  """nvdisasm's listing of ``cubin``; with ``encodings``, each instruction's encoding
  too (``-hex``: the control codes ``benchmarks.warp_cycles`` reads)."""
  import triton
  nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                          "nvdisasm")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "k.cubin")
    with open(path, "wb") as f:
      f.write(cubin)
    r = subprocess.run([nvdisasm, "-c", *(["-hex"] if encodings else []), path],
                       capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"nvdisasm failed: {r.stderr[-500:]}")
  return r.stdout


def compile_ir(name: str, text: str, arch: str, num_warps: int,
               num_stages: int = 1) -> dict:
  """Compiles one kernel's IR; ``{"kernel", "ok", "registers", "spill_bytes",
  "shared_bytes", "instructions", "loop", "inner"}`` (:func:`sass_counts`; "inner": the
  instructions of a loop nested in the first, :func:`inner_count`) or
  ``{"kernel", "ok": False, "error"}``."""
  import triton
  from triton.backends.compiler import GPUTarget
  cc = int(re.match(r"\d+", arch).group(0))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{name}.ttir")
    with open(path, "w") as f:
      f.write(text)
    try:
      k = triton.compile(path, target=GPUTarget("cuda", cc, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages})
      report = assemble(k.asm["ptx"], arch)[0]
      sass = _disassemble(k.asm["cubin"])
      counts = dict(sass_counts(sass), inner=inner_count(sass))
    except Exception as ex:  # compile errors come from several layers
      return {"kernel": name, "ok": False, "error": f"{type(ex).__name__}: {ex}"[:2000]}
  regs = re.search(r"Used (\d+) registers", report)
  spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
  return {"kernel": name, "ok": True, "registers": int(regs.group(1)) if regs else None,
          "spill_bytes": sum(spills), "shared_bytes": k.metadata.shared, **counts}


def stencil_trips(kernel: str, batch: int, side: int, n: int, stride: int) -> int:
  """How often a kernels.stencil kernel's main loop runs per program at this shape:
  the summing kernels' tiles per chunk, 1 for the others (no loop); in a row walk
  (QLHS_STENCIL_ROWS), the rows of its chunk (two more for du)."""
  from qlhs_jax.kernels import stencil
  name = next(k for k, v in stencil.NAMES.items() if v == kernel)
  walk = {"dx": "product", "lags": "stats"}.get(name, name)
  if walk in ("dx_du", "bwd"):  # whole rows, two steps more than the chunk
    return stencil._whole_rows_plan(name, batch, side, side, n, 4, False)[0]["span"] + 2
  if walk == "du_bn" or (walk in stencil.ROWS_KERNELS
                         and stencil._walks_rows(walk, stride)):
    m0, bj0 = stencil.tiling(name, rows=True)[:2]
    plan = stencil._rows_plan(batch, side, side, n, 4, m0, bj0, False)
    if walk == "du_bn" and stencil.du_bn_unrolled(plan):  # five rows a trip; the first
      # row and the last up to the bottom row's written out, counted once (as is the
      # loop after them, where a chunk has rows past the bottom row's step)
      return stencil.du_bn_unrolled(plan)
    return plan["span"] + 2 * (walk == "du")
  if name not in ("stats", "lags", "sums"):
    return 1
  m0, bj0 = stencil.tiling(name)[:2]
  return stencil._chunked_plan((batch, side, side, n), stride, m0, bj0)["tpc"]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--arch", default="90a", help="sm_ architecture (H100: 90a)")
  p.add_argument("--shapes", default="", help="comma-separated shape names (default all)")
  p.add_argument("--op", default="d_bn_product", choices=OPS,
                 help="whose kernels: fuse_d_bn='pallas' (d_bn_product), 'block' "
                      "(eq3_block), QLHS_STATS_FORM/QLHS_DU_FORM=pallas (stencil), or "
                      "QLHS_P_FORM=kernels's forward product (product_a)")
  args = p.parse_args(argv)
  try:
    import triton
  except ImportError:
    print("this check needs Triton's compiler: pip install triton==3.9.0", file=sys.stderr)
    return 2
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, quietly
  # JAX on the CPU (read when jax is first imported): with the CUDA plugin installed and
  # no GPU, it would try CUDA first and log the failure.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from qlhs_jax.benchmarks.fused import EQ3_SHAPES, eq3_n_out
  from qlhs_jax.kernels import eq3_block, stencil
  from qlhs_jax.kernels.d_bn_product import DP_KERNELS_MAX_N, tiling
  if args.op == "product_a":
    warps, stages = stencil.tiling("product_a_dot")[2:]
    print(f"triton {triton.__version__}, sm_{args.arch}, batch {args.batch}, product_a "
          f"tiling (pixels, channels, warps, stages) {stencil.tiling('product_a_dot')} "
          f"(QLHS_STENCIL_TILING's product_a_dot), blocks of at most "
          f"{DP_KERNELS_MAX_N['kernels']} channels in and out (where pass 4 sums A's "
          f"gradient)")
  elif args.op == "stencil":
    stages = 1
    print(f"triton {triton.__version__}, sm_{args.arch}, batch {args.batch}, stencil "
          f"tilings (pixels, channels, warps[, splits]) stats {stencil.tiling('stats')}, "
          f"sums {stencil.tiling('sums')}, du {stencil.tiling('du')} "
          f"(QLHS_STENCIL_TILING)")
  elif args.op == "eq3_block":
    stages = 1
    print(f"triton {triton.__version__}, sm_{args.arch}, batch {args.batch}, eq3_block "
          f"QLHS_BLOCK_TILING={os.environ.get('QLHS_BLOCK_TILING', '')!r} (default "
          f"pixels, warps = {eq3_block.DEFAULT_TILING})")
  else:
    warps, stages = tiling()[2], tiling()[4]
    print(f"triton {triton.__version__}, sm_{args.arch}, batch {args.batch}, tiling "
          f"(rows, elems, warps, cols, stages) = {tiling()}")
  wanted = set(filter(None, args.shapes.split(",")))
  ok = True
  for name, side, n, stride, _ in EQ3_SHAPES:
    if wanted and name not in wanted:
      continue
    if args.op == "product_a" and max(n, eq3_n_out(n, stride)) > DP_KERNELS_MAX_N[
        "kernels"]:
      continue  # (wider blocks keep p: pass 4 does not sum A's gradient there)
    for kernel, text, grid in triton_ir(args.batch, side, n, stride, args.op):
      if args.op == "eq3_block":  # each kernel's own warps at this shape
        warps = block_warps(kernel, side, n, stride)
      elif args.op == "stencil":  # each kernel's own warps
        warps = stencil.tiling(next(k for k, v in stencil.NAMES.items() if v == kernel))[2]
      r = compile_ir(kernel, text, args.arch, warps, stages)
      ok &= r["ok"]
      if r["ok"]:
        floor = ""
        if args.op == "product_a":  # the tiles' loop, each with its blocks' loop
          a = product_a_plan(args.batch, side, n, stride)
          runs = machine_trips(a["tpc"], a["blocks"], r["inner"] > 0)
          issued = issued_a_warp(r["instructions"], r["loop"], r["inner"], *runs)
          ms = issue_floor_ms(issued, 0, 1, warps, a["programs"])
          floor = (f"  inner loop {r['inner']} x {a['blocks']} a tile" if r["inner"] else
                   f"  one tile a program: the loop x {runs[0]}")
          floor += f", issue floor {ms:.3f} ms"
        elif args.op == "stencil" or not r["loop"]:  # trip counts known
          trips = stencil_trips(kernel, args.batch, side, n, stride) if r["loop"] else 1
          ms = issue_floor_ms(r["instructions"], r["loop"], trips, warps, math.prod(grid))
          floor = f"  issue floor {ms:.3f} ms"
        print(f"  {name:14s} {kernel:20s} {r['registers']:4d} registers  "
              f"{r['spill_bytes']:5d} B spilled  {r['shared_bytes']:6d} B shared  "
              f"{warps} warps  {r['instructions']:5d} instructions, loop {r['loop']:4d}"
              f"{floor}")
      else:
        print(f"  {name:14s} {kernel:20s} FAILED: {r['error']}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

"""``BN(D u) * c`` in training mode as one operation with a hand-written backward.

The Eq.(3), Eq.(5) and eq3w blocks compute ``p = BN(D u) * (C u)`` on the hidden tensor
(h = n*e channels, the tensor that costs the bytes: 411 MB per stage-1 block at batch 256
in bfloat16). Autodiff through ``derivative``, ``BatchNorm`` and the product stores D u,
re-reads the hidden tensors for every reduction and moves ~30 hidden tensors per block
(benchmarks/NOTES.md). Here the same function is written as five passes, D u is never
stored (it is recomputed from the n-channel ``u``, 9 taps, in registers), and each
hidden tensor is read or written once per pass:

=========  ==============================================  ===========================
pass       work                                            hidden tensors moved
=========  ==============================================  ===========================
forward 1  per-channel sums of D u and (D u)^2             none (reads u)
forward 2  p = (D u * mul + add) * c                       c in, p out
backward 3 dc = dp * BN(D u); sums of g = dp*c, g*xhat     c, dp in, dc out
backward 4 dx = dL/d(D u); partial sums of dL/dkernel      c, dp in, dx out
backward 5 du = D^T dx (XLA, see _d_transpose)            dx in
=========  ==============================================  ===========================

(``impl="xla"`` takes dL/dkernel's sums in pass 3 instead, see :func:`_xla_kernel_grad`,
and writes dc in pass 4, next to dx, see :func:`dc_pass`; with QLHS_STENCIL_ROWS naming
"dx_du", passes 4 and 5 are one kernel that never stores dx, ``stencil.dx_du``; naming
"bwd", passes 3-5 read c and dp once: ``stencil.bwd`` takes pass 3's sums, dc and
D^T(g * mul), and ``stencil.du_bn`` adds D^T of dx's other part, a 5x5 stencil of u,
see :func:`_bwd_walks`. With QLHS_C_FORM=kernels the operation takes C's weight instead
of c, and the dot forms' kernels make c = C u themselves, so no pass moves c: see
:func:`c_form`. Given the weight of the 1x1 map A that follows (``a``), it returns
y = p @ A, and with QLHS_DP_FORM=kernels passes 3 and 4 make dp = dy A^T from dy, so
no pass moves dp: see :func:`dp_form`.)

``impl="xla"`` writes the passes in jax.numpy (XLA fuses each one); ``impl="pallas"``
runs passes 1-4 as Pallas kernels for the Triton GPU backend (``interpret=True`` runs
them on any backend, which is how the CPU tests check them against the XLA passes).
What it takes for XLA to fuse the passes as the table says (benchmarks/NOTES.md,
experiment 4, from compiling for an H100 with ``benchmarks.aot``): the statistics come
from the 9x9 Gram matrix of u's taps, not from D u (:func:`_xla_stats`); each pass
recomputes D u from its own copy of u (optimization barriers, else XLA merges them into
one float32 D u that it stores), its taps read on an NVIDIA GPU as slices of one copy of
u padded by one pixel, written once a block (:func:`d_taps`: a pad inside the fusion
became a branch around each tap's load); dc is computed apart from the sums; dx is stored in
the input dtype behind a barrier; the hidden outputs are pinned row-major; dL/dkernel
comes from sums that pass 3 and the forward statistics take anyway
(:func:`_xla_kernel_grad`), so nothing reads dx but du. Compiled so, a stage-1 block
(in a chain of three) moves 8.6 GB per step where the plain path moves 14.9 (impl "xla"
used to move 27.7; experiments 4 and 5 of the notes).
``impl="none"`` is not handled here: it is the model's plain autodiff path, the
reference both are tested against (tests/kernels).

Statistics follow :class:`qlhs_jax.models.common.BatchNorm`: float32, one pass
(E[x^2] - E[x]^2, clipped at 0), biased variance returned (the caller keeps the running
averages), ``groups`` equal slices of the batch with separate statistics. Unlike the
plain path, D u is accumulated in float32 from the (bfloat16) ``u``, and D's kernel
stays float32 unless QLHS_D_KERNEL=compute rounds it as the plain path does
(:func:`d_kernel`); in float32 runs the two agree to rounding.

Layouts: j-major hidden channels (``j*e + s``), one input channel per D group (S = 1),
``kernel`` (3, 3, 1, e) (shared, "ws") or (3, 3, n, e). Pallas needs ``e`` a power of
two (Triton's block shapes); the model refuses other combinations with a message.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qlhs_jax.kernels import settings

try:
  from jax.experimental.pallas import triton as plt
except ImportError:  # Pallas's Triton backend is deprecated since JAX 0.11.0
  plt = None

FUSE_IMPLS = ("none", "xla", "pallas")
# The model's fuse_d_bn settings that run Pallas kernels ("block": kernels/eq3_block.py,
# one device only), interpreted on a CPU, lowered for the GPU by benchmarks.aot.
PALLAS_FUSES = ("pallas", "block")
F32 = jnp.float32
# Pallas tiling: one program handles `rows` output rows of one image, `cols` columns
# (0: all of them, padded to a power of two) and bj input channels (bj*e hidden channels,
# as many as fit): `elems` bounds one (columns, bj, e) float32 tile. The default is the
# fastest of six tilings timed on an H100 (2026-11-27, benchmarks/results.jsonl, kind
# "fused_op"): whole rows of 8,192 values at 4 warps, 36.8 ms for the 16 blocks against
# 48.9 ms at 2,048 values; longer contiguous runs of channels were what helped, although
# ptxas then needs up to 255 registers and spills up to 272 bytes in the backward
# kernels (benchmarks.triton_compile). `cols` > 0 keeps all channels in one tile (one
# contiguous run per pixel) and splits the columns instead; `stages` > 1 asks Triton to
# software-pipeline the row loop's loads. QLHS_PALLAS_TILING="rows,elems,warps[,cols[,
# stages]]" overrides the default at trace time, so that one GPU session can try several
# without editing code.
DEFAULT_TILING = (4, 8192, 4, 0, 1)


def tiling() -> tuple[int, int, int, int, int]:
  """(rows, elems, warps, cols, stages) from QLHS_PALLAS_TILING, else
  :data:`DEFAULT_TILING` (cols 0 and stages 1 where the variable leaves them out)."""
  raw = settings.get("QLHS_PALLAS_TILING")
  if not raw:
    return DEFAULT_TILING
  try:
    vals = [int(v) for v in raw.split(",")]
    if not 3 <= len(vals) <= 5:
      raise ValueError
    rows, elems, warps, cols, stages = vals + [0, 1][len(vals) - 3:]
  except ValueError:
    rows = elems = warps = cols = stages = 0
  if (rows < 1 or elems < 1 or elems & (elems - 1) or warps not in (1, 2, 4, 8, 16)
      or cols < 0 or cols & (cols - 1) or not 1 <= stages <= 4):
    raise ValueError(f"{settings.name('QLHS_PALLAS_TILING')}={raw!r}: want "
                     f"'rows,elems,warps[,cols[,stages]]', e.g. '4,8192,4' or "
                     f"'4,8192,8,16,2' (rows >= 1, elems a power of two, warps 1-16, cols 0 "
                     f"= whole rows or a power of two, stages 1-4)")
  return rows, elems, warps, cols, stages


def _kernel9(kernel: jax.Array, n: int) -> jax.Array:
  """D's kernel (3, 3, 1 or n, e) as (9, n, e) float32, tap t = 3*dy + dx."""
  e = kernel.shape[-1]
  return jnp.broadcast_to(kernel.astype(F32), (3, 3, n, e)).reshape(9, n, e)


def _d_xla(u: jax.Array, k9: jax.Array, stride: int, taps: str | None = None,
           up: jax.Array | None = None) -> jax.Array:
  """D u in float32 as (B, Ho, Wo, n, e) with the (9, n, e) kernel: ``layers.derivative``'s
  shifted form, its taps read as :func:`_u_taps` reads them (:func:`d_taps` or ``taps``;
  from ``up`` where given)."""
  return _d_from_taps(_u_taps(u, stride, taps, up), k9)


def _d_from_taps(taps, k9: jax.Array) -> jax.Array:
  """D u (B, Ho, Wo, n, e) from u's nine float32 taps (B, Ho, Wo, n): the sum of
  ``layers.derivative``'s shifted form, term by term in its order (the same values)."""
  out = None
  for t, tap in enumerate(taps):
    term = tap[..., None] * k9[t]
    out = term if out is None else out + term
  return out


D_TAPS_FORMS = ("auto", "copy", "pad")


def d_taps() -> str:
  """Where impl "xla"'s passes (the forward product, pass 4 with dc, and the XLA forms
  of the statistics and of pass 3's sums) read u's nine taps: QLHS_D_TAPS, else "auto":
  "copy" where the program is compiled for an NVIDIA GPU (as :func:`stencil_on_gpu`
  tells one: the GPU itself, or QLHS_PALLAS_INTERPRET=0), "pad" elsewhere.

  "pad" pads u by one pixel inside each pass's fusion (``layers._taps``). XLA's GPU
  emitter loads every element of a pad behind a bounds check: in the H100 machine code
  of pass 4 each of eight taps is a 2-byte load in a branch of its own, converted
  before the next branch, so a thread waits for its loads one after the other; those
  fusions ran at 1.9x the larger of their copy time and instruction floor on the H200,
  where the branch-free element-wise kernels ran at theirs (benchmarks/NOTES.md,
  experiments 34 and 37). "copy" writes u padded by one pixel (in u's dtype) in a kernel
  of its own, behind a barrier so that XLA cannot fuse the pad back, and the pass reads
  its taps as plain slices of it: no branch, nine loads in flight, for one more kernel
  that reads u and writes it with its margin. The same values either way
  (tests/kernels/test_d_bn_product.py)."""
  form = settings.choice("QLHS_D_TAPS", D_TAPS_FORMS)
  if form != "auto":
    return form
  gpu = os.environ.get("QLHS_PALLAS_INTERPRET") == "0" or _nvidia_gpu()
  return "copy" if gpu else "pad"


def padded_copy(u: jax.Array) -> jax.Array:
  """u (B, H, W, n) padded by one zero pixel, in u's dtype, written by a kernel of its
  own: the barrier keeps XLA from fusing the pad into the passes that read it."""
  return lax.optimization_barrier(jnp.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0))))


def _u_taps(u: jax.Array, stride: int, taps: str | None = None,
            up: jax.Array | None = None) -> list[jax.Array]:
  """u's nine taps (tap t = 3*dy + dx) in float32, 9 x (B, Ho, Wo, n), read as
  :func:`d_taps` (or ``taps``) says: "copy" slices ``up`` (:func:`padded_copy` of u),
  written here where not given."""
  from qlhs_jax.models import layers  # models imports this module
  if up is not None or (taps or d_taps()) == "copy":
    h, w = u.shape[1:3]
    up = padded_copy(u) if up is None else up
    ho, wo = layers._out_size(h, stride), layers._out_size(w, stride)
    return [t.astype(F32) for t in layers.tap_slices(up, stride, ho, wo)]
  return [t[..., 0] for t in layers._taps(u.astype(F32)[..., None], stride)]


DU_FORMS = ("gather", "autodiff", "pallas", "pallas_dot")
STATS_FORMS = ("xla", "pallas", "pallas_gram", "pallas_dot")
SUMS_FORMS = ("xla", "pallas", "pallas_xhat", "pallas_dot")
# Unset, each form variable means "auto": stencil_on_gpu() picks.
FORM_DEFAULT = "auto"


# The mesh axis that splits the batch over devices (steps.DATA_AXIS is this one).
BATCH_AXIS = "data"
# The variables that can ask for the stencil kernels (each pass's form).
FORM_VARIABLES = ("QLHS_STATS_FORM", "QLHS_SUMS_FORM", "QLHS_DU_FORM", "QLHS_PRODUCT_FORM")


def _context_mesh():
  """The abstract mesh of the step being traced (``steps.jit_train_step`` sets it), or
  None: none set, or a JAX without ``jax.sharding.get_abstract_mesh``."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get() if get is not None else None
  return mesh if mesh is not None and getattr(mesh, "shape", None) else None


def batch_shards() -> int:
  """How many devices split the batch that the code being traced sees: the size of the
  "data" axis of the step's mesh; 1 without a mesh, and inside :func:`d_bn_product`'s
  shard_map (the axis is manual there: each device sees its own slice)."""
  mesh = _context_mesh()
  if mesh is None or BATCH_AXIS in getattr(mesh, "manual_axes", ()):
    return 1
  return dict(mesh.shape).get(BATCH_AXIS, 1)


def _batch_split_only() -> bool:
  """Whether each device can run the kernels on its own slice of the batch: one device,
  or a step whose mesh has no axis but the batch's (there :func:`d_bn_product` runs
  them under shard_map)."""
  mesh = _context_mesh()
  if mesh is None:
    return jax.device_count() == 1
  return dict(mesh.shape).get(BATCH_AXIS, 0) == mesh.size


def stencil_on_gpu(n: int | None, groups: int = 1, e: int = 1) -> bool:
  """What the stencil forms' default, "auto", picks: kernels.stencil's Pallas kernels
  on NVIDIA GPUs where they apply (power-of-two ``n`` and expansion ``e``; one
  BatchNorm group per device for the sums), XLA's forms elsewhere. On an H100 the
  kernels made fuse_d_bn="xla" 2.8x faster (benchmarks/NOTES.md, experiment 13). XLA's
  forms stay the reference: on a CPU (the tests check the kernels, interpreted, against
  them), on a TPU, and where a mesh has other axes than the batch's or no mesh is set
  on several devices (a Triton call has no sharding rule, so XLA would gather its
  operands onto every device). On several GPUs, ``steps.jit_train_step`` sets the
  mesh and :func:`d_bn_product` runs the kernels on each device's slice of the batch
  (shard_map); ``groups`` counts the BatchNorm groups of the batch the traced code
  sees (the whole batch in the model: per-replica BatchNorm has one per device).
  QLHS_PALLAS_INTERPRET=0 (benchmarks.aot, compiling for an H100 on a CPU machine)
  counts as one GPU."""
  shards = batch_shards()
  if (plt is None or n is None or n < 1 or n & (n - 1) or e < 1 or e & (e - 1)
      or groups != shards):
    return False
  if os.environ.get("QLHS_PALLAS_INTERPRET") == "0":
    return True
  return _nvidia_gpu() and _batch_split_only()


def _nvidia_gpu() -> bool:
  return jax.default_backend() == "gpu" and "NVIDIA" in jax.devices()[0].device_kind


def _form(var: str, forms: tuple, xla_form: str, n: int | None, groups: int,
          e: int) -> str:
  form = settings.get(var) or FORM_DEFAULT
  if form == "auto":
    return "pallas" if stencil_on_gpu(n, groups, e) else xla_form
  if form not in forms:
    raise ValueError(f"{settings.name(var)}={form!r}: choose one of {forms + ('auto',)} "
                     f"(unset: auto)")
  return form


def du_form(n: int | None = None, e: int = 1) -> str:
  """How pass 5 computes du = D^T dx for ``n`` input channels and expansion ``e``:
  QLHS_DU_FORM, else "auto" (:func:`stencil_on_gpu`: "pallas", else "gather").
  "pallas_dot": at stride 1 the taps' sums as matrix products on the tensor cores
  (``stencil._du_dot_kernel``; at stride 2 "pallas"'s kernel); not yet timed. At its
  tiles it holds 128 KB of shared memory, one program (4 warps) an SM: by the latency
  model 5.3 ms a step against the element-wise kernel's 2.4 (benchmarks/NOTES.md,
  experiment 54). Both Pallas forms start with "pallas" (:func:`du_pallas`)."""
  return _form("QLHS_DU_FORM", DU_FORMS, "gather", n, 1, e)


def du_pallas(n: int | None = None, e: int = 1) -> bool | None:
  """Whether :func:`du_form` runs ``stencil.d_transpose`` as matrix products (True,
  "pallas_dot") or element-wise (False, "pallas"); None for XLA's forms."""
  form = du_form(n, e)
  return form == "pallas_dot" if form.startswith("pallas") else None


def sums_form(n: int | None = None, groups: int = 1, e: int = 1) -> str:
  """How pass 3 of impl "xla" sums g, g * xhat and the tap products of g:
  QLHS_SUMS_FORM, else "auto" (:func:`stencil_on_gpu`: "pallas", ``stencil.bn_sums``;
  else "xla", one stacked reduction). "pallas_xhat" is that kernel as it was before
  2026-12-04, summing g * xhat from D u itself, kept to time against it on the GPU.
  "pallas_dot": the same sums as matrix products over each tile's pixels, so that
  Triton pipelines their loads (``stencil._bn_sums_dot_kernel``); not yet timed."""
  return _form("QLHS_SUMS_FORM", SUMS_FORMS, "xla", n, groups, e)


def stats_form(n: int | None = None, groups: int = 1) -> str:
  """How the statistics' tap sums and Gram matrix are summed: QLHS_STATS_FORM, else
  "auto" (:func:`stencil_on_gpu`: "pallas", ``stencil.tap_stats``, from 13 lag products
  at stride 1; else "xla", :func:`_xla_stats`'s one stacked reduction). "pallas_gram" is
  the kernel that forms all 54 products at every stride (experiment 13's), kept to time
  against the lags on the GPU. "pallas_dot": the lags as matrix products, so that Triton
  pipelines their loads (``stencil._lags_dot_loop``; at stride 2 "pallas"'s kernel); not
  yet timed."""
  return _form("QLHS_STATS_FORM", STATS_FORMS, "xla", n, groups, 1)


DC_PASSES = ("dx", "sums")
PRODUCT_FORMS = ("xla", "pallas", "pallas_dot")
D_KERNELS = ("float32", "compute")


def d_kernel() -> str:
  """QLHS_D_KERNEL: D's kernel in every pass in float32 (the default), or "compute":
  rounded first to u's dtype (bfloat16 in training), as the plain path rounds it
  (``layers.derivative`` casts it to its input's dtype); D u is still summed in float32,
  and dL/dkernel, taken at the rounded kernel, reaches the float32 parameter unrounded
  (the plain path rounds it too). The point: with a bfloat16 kernel, the products of
  QLHS_PRODUCT_FORM=pallas_dot take one bfloat16 part of it, not three, which exact
  products of a float32 kernel need (``stencil._k_parts``): a quarter of the columns, so
  4x the channels a block for the same shared memory (benchmarks/NOTES.md, experiment
  43). du's products (QLHS_DU_FORM=pallas_dot) keep three parts."""
  return settings.choice("QLHS_D_KERNEL", D_KERNELS)


def fused_kernel(kernel: jax.Array, dtype) -> jax.Array:
  """D's ``kernel`` as the fused passes take it (:func:`d_kernel`): under "compute"
  rounded to ``dtype`` (kept in its own dtype), its gradient passed through unrounded
  (r - k is exact, r being k to fewer bits, so k + (r - k) is r); else as it is."""
  if d_kernel() != "compute":
    return kernel
  rounded = kernel.astype(dtype).astype(kernel.dtype)
  return kernel + lax.stop_gradient(rounded - kernel)


def _parts_k9(k9: jax.Array, dtype) -> jax.Array:
  """D's kernel for ``stencil.product`` and ``stencil.dx_dc``, whose products take it
  in parts (``stencil._k_parts``): in the compute ``dtype`` where QLHS_D_KERNEL=compute
  rounded it so (the cast then exact; one part), else as it is."""
  return k9.astype(dtype) if d_kernel() == "compute" else k9


def product_form(groups: int = 1) -> str:
  """How impl "xla" runs the element-wise passes that recompute D u, the forward product
  and pass 4 (dx, with dc): QLHS_PRODUCT_FORM, else "xla" (XLA's loop fusions, 1.5-1.8
  TB/s on the H100 in experiment 13). "pallas": ``stencil.product`` and
  ``stencil.dx_dc``, one BatchNorm group per GPU; they write dc in pass 4 whatever
  QLHS_DC_PASS says. "pallas_dot": the same kernels with D u as matrix products
  (``stencil._dot_d``), every load of a trip copied a trip ahead by Triton (experiment
  42). Not yet timed, hence not the default (benchmarks/NOTES.md, experiment 14)."""
  form = settings.choice("QLHS_PRODUCT_FORM", PRODUCT_FORMS)
  if form.startswith("pallas") and groups != 1:
    from qlhs_jax.kernels import stencil  # imports this module
    stencil.check(1, "QLHS_PRODUCT_FORM", groups)
  return form


def product_pallas(groups: int = 1) -> bool | None:
  """Whether :func:`product_form` runs ``stencil.product`` and ``stencil.dx_dc`` with
  D u as matrix products (True, "pallas_dot") or element-wise (False, "pallas"); None
  for XLA's fusions (as :func:`du_pallas`)."""
  form = product_form(groups)
  return form == "pallas_dot" if form.startswith("pallas") else None


C_FORMS = ("stored", "kernels", "kernels_wide")


def c_form() -> str:
  """QLHS_C_FORM: where impl "xla"'s passes get c = C u (eq3 and eq5, whose 1x1 map C
  reads D's input u). "stored" (the default): the model's matmul writes c, and the
  forward product, pass 3's sums and pass 4 read it. "kernels": the fused operation takes
  C's weight instead, and the kernels of QLHS_PRODUCT_FORM=pallas_dot (the product,
  pass 4) and of QLHS_SUMS_FORM=pallas_dot (pass 3's sums) make each tile of c from u's
  centre tap as one more matrix product (``stencil._c_tile``), so c is never stored nor
  read: one write and three reads of the hidden tensor less a block (benchmarks/NOTES.md,
  experiment 47); a pass of another form gets c from XLA's matmul, redone in the
  backward; blocks wider than :data:`C_KERNELS_MAX_N` channels keep the stored c (128;
  "kernels_wide": 256, stage 3 too, to time against it). c is rounded to the compute
  dtype as the stored c is, but its sums run in another order: the same values up to
  one rounding of c. Refused unless QLHS_PRODUCT_FORM is "pallas_dot". Not yet
  timed."""
  return _made_in_dot_kernels("QLHS_C_FORM", C_FORMS, "c = C u")


def _made_in_dot_kernels(var: str, forms: tuple[str, ...], what: str) -> str:
  """The form ``var`` names (:func:`c_form`, :func:`dp_form`), refused, naming the fix,
  where it makes ``what`` in the dot forms' kernels and QLHS_PRODUCT_FORM is not theirs."""
  form = settings.choice(var, forms)
  if form != "stored" and (product := product_form()) != "pallas_dot":
    raise ValueError(f"{settings.name(var)}={form!r} makes {what} inside the "
                     f"matrix-product kernels of product_form 'pallas_dot', but "
                     f"{settings.name('QLHS_PRODUCT_FORM')} gives {product!r}: set "
                     f"product_form='pallas_dot' (and sums_form='pallas_dot' for pass 3), "
                     f"or unset {var[len('QLHS_'):].lower()}")
  return form


# The widest blocks whose kernels make c, by QLHS_C_FORM: stages 1 and 2 ("kernels");
# stage 3 too ("kernels_wide"), for a GPU to say whether what follows costs. Each of
# a kernel's n/16 channel blocks reads u's centre tap, all n channels, from L2, so the
# extra L2 reads grow as n^2 while the DRAM bytes saved (c) grow as n: at 256 channels
# (stage 3) ~6.5 GB more L2 reads a step for 2.3 GB less DRAM traffic, and the product's
# and pass 3's sums' issue floors would rise above their copy times; at 512 (stage 4)
# the sums would need 331 KB of shared memory, where an H100 has 227 KB
# (benchmarks/NOTES.md, experiment 47).
C_KERNELS_MAX_N = {"kernels": 128, "kernels_wide": 256}

DP_FORMS = ("stored", "kernels")


def dp_form() -> str:
  """QLHS_DP_FORM: where the backward's passes get dp = dy A^T, the gradient of the
  product p through the 1x1 map A that follows it (eq3 and eq3w: y = A(p), y = p @ A).
  "stored" (the default): the model's matmul, differentiated by JAX, writes dp, and pass
  3's sums and pass 4 read it. "kernels": the fused operation takes A's weight too and
  returns y, and the kernels of QLHS_PRODUCT_FORM=pallas_dot (pass 4) and of
  QLHS_SUMS_FORM=pallas_dot (pass 3's sums) make each tile of dp from dy and A's
  columns as one more matrix product (``stencil._dp_tile``), so dp is never stored nor
  read: one write and two reads of the hidden tensor less a block, for two reads of dy
  (benchmarks/NOTES.md, experiment 48); a pass of another form reads dp from XLA's
  matmul; blocks wider than :data:`DP_KERNELS_MAX_N` channels, in or out, keep the
  stored dp. dp is rounded to the compute dtype as the stored dp is, its sums in
  another order: the same values up to one rounding of dp. Refused unless
  QLHS_PRODUCT_FORM is "pallas_dot". Not yet timed."""
  return _made_in_dot_kernels("QLHS_DP_FORM", DP_FORMS, "dp = dy A^T")


# The widest blocks whose kernels make dp, by QLHS_DP_FORM, in input or output channels
# (stages 1 and 2; stage 3's first block maps 128 channels to 256): as for c
# (C_KERNELS_MAX_N), each of a kernel's n/16 channel blocks reads dy's tile, all n_out
# channels, from L2; and pass 3's sums hold dy's tiles in the pipeline's shared memory
# next to u's taps (and centre tap, where c is made too): with c made, 250 KB at 128
# channels in and 256 out, where an H100 has 227 KB (benchmarks/NOTES.md, experiment 48).
DP_KERNELS_MAX_N = {"kernels": 128}


def _makes_c(n: int, groups: int, impl: str) -> bool:
  """Whether the kernels make c for a block of ``n`` input channels when the operation
  is given C's weight: the dot form's product (:func:`c_form`), at most
  :data:`C_KERNELS_MAX_N` channels."""
  return (impl != "pallas" and product_pallas(groups) is True
          and n <= C_KERNELS_MAX_N.get(c_form(), 0))


WEIGHT_GRADS = ("xla", "pass4")


def weight_grads() -> str:
  """QLHS_WEIGHT_GRADS: where the gradients of the 1x1 maps around the product, C's
  (u^T dc) and A's (p^T dy), are summed in a block whose kernels make both c and dp
  (:func:`c_form`, :func:`dp_form`). "xla" (the default): XLA's matmuls, reading dc and
  u, and p (kept from the forward) and dy. "pass4": pass 4's kernel, which has u's
  centre tap and dy's tile loaded for c's and dp's products and makes dc and p (= BN(D
  u) * c, as the forward rounds it), sums both over its tiles as two more products a
  trip (``stencil._dx_dc_kernel``, one partial sum a program, added up by XLA), at 4
  warps (QLHS_STENCIL_TILING's ``grads_dot``: 255 registers a thread, fewer
  instructions and a lower latency floor than 8 warps' 128-170; benchmarks/NOTES.md,
  experiment 53); p is then not kept for the backward. About 1 GB a stage-1 block less
  (benchmarks/NOTES.md, experiment 48). Refused unless c and dp are made in the
  kernels. Not yet timed."""
  form = settings.choice("QLHS_WEIGHT_GRADS", WEIGHT_GRADS)
  if form != "xla" and (c_form() == "stored" or dp_form() == "stored"):
    raise ValueError(f"{settings.name('QLHS_WEIGHT_GRADS')}={form!r} sums C's and A's "
                     f"gradients in pass 4's kernel, which needs c and dp made there: "
                     f"set c_form='kernels' and dp_form='kernels' (with "
                     f"product_form='pallas_dot'), or unset weight_grads")
  return form


def _pass4_grads(stride: int, n: int, e: int, n_out: int, groups: int, impl: str
                 ) -> bool:
  """Whether pass 4's kernel sums C's and A's gradients (:func:`weight_grads`) for a
  block of ``n`` input and ``n_out`` output channels given C's and A's weights: where
  its kernel makes both c and dp, and pass 4 is that kernel (no row walk)."""
  return (weight_grads() == "pass4" and _makes_c(n, groups, impl)
          and _makes_dp(n, n_out, groups, impl)
          and not _bwd_walks(stride, n, e, groups)
          and not _dx_du_walks(stride, n, e, groups))


DU_SUMS = ("xla", "kernel")


def du_sum() -> str:
  """QLHS_DU_SUM: where u's gradient adds up in a block whose shortcut is the identity
  (eq3, eq5). "xla" (the default): du's kernel stores D^T dx, and an XLA add reads it
  back with C's share (dc C^T, where the operation makes c) and the shortcut's
  gradient. "kernel": the model routes its shortcut through the operation
  (``d_bn_product(..., through=True)`` hands u back), so the shortcut's gradient comes
  into the backward, and du's Pallas kernel adds both shares before its one store:
  two reads and a write of u's size less a block where XLA's add stood alone, one
  where XLA had merged it into the next reduction (benchmarks/NOTES.md, experiment 50).
  The same sum in float32, rounded once. Not yet timed."""
  return settings.choice("QLHS_DU_SUM", DU_SUMS)


P_FORMS = ("stored", "kernels")


def p_form() -> str:
  """QLHS_P_FORM: where the forward applies the 1x1 map A that follows the product (eq3
  and eq3w: y = p @ A) in a block whose pass 4 sums A's gradient (:func:`weight_grads`,
  so that p is not kept for the backward). "stored" (the default): the product's kernel
  stores p and XLA's matmul reads it back. "kernels": one kernel makes D u, c, p and y =
  p @ A tile by tile (``stencil.product_a``), so p is never stored nor read: a write
  and a read of the hidden tensor less a block, 0.82 GB at stage 1 (benchmarks/NOTES.md,
  experiment 51). p is rounded to the compute dtype as the stored p is; y is summed in
  float32 in blocks of hidden channels, another order than the matmul's: the same
  values up to float32 rounding. Refused unless weight_grads is "pass4" (which makes c
  and dp in the kernels too). Not yet timed."""
  form = settings.choice("QLHS_P_FORM", P_FORMS)
  if form != "stored" and weight_grads() != "pass4":
    raise ValueError(f"{settings.name('QLHS_P_FORM')}={form!r} applies A inside the "
                     f"product's kernel, which needs A's gradient summed in pass 4 (p is "
                     f"not kept for it): set weight_grads='pass4' (with c_form and "
                     f"dp_form 'kernels', product_form 'pallas_dot'), or unset p_form")
  return form


def _makes_dp(n: int, n_out: int, groups: int, impl: str) -> bool:
  """Whether pass 4's kernel (and pass 3's, in its dot form) makes dp = dy A^T for a
  block of ``n`` input and ``n_out`` output channels when the operation is given A's
  weight: the dot form's pass 4 (:func:`dp_form`), at most :data:`DP_KERNELS_MAX_N`
  channels either way."""
  return (impl != "pallas" and product_pallas(groups) is True
          and max(n, n_out) <= DP_KERNELS_MAX_N.get(dp_form(), 0))


def a_of(p: jax.Array, aw: jax.Array) -> jax.Array:
  """y = A p as the model's 1x1 map computes it: ``p`` @ ``aw`` (h, n_out), in their
  dtype."""
  return jnp.dot(p, aw)


def c_of(u: jax.Array, cw: jax.Array, stride: int) -> jax.Array:
  """c = C u as the model's 1x1 map computes it: u subsampled at ``stride``
  (``layers.subsample``) @ ``cw`` (n, h), in their dtype."""
  return jnp.dot(u if stride == 1 else u[:, ::stride, ::stride, :], cw)


def _dx_du_walks(stride: int, n: int, e: int, groups: int) -> bool:
  """Whether impl "xla" runs pass 4 and du as one row walk (``stencil.dx_du``, dx never
  stored): QLHS_STENCIL_ROWS names "dx_du", du runs as Pallas (:func:`du_form`), at
  stride 1 with one BatchNorm group (elsewhere pass 4 and du run as they would)."""
  from qlhs_jax.kernels import stencil  # imports this module
  return (groups == 1 and stencil._walks_rows("dx_du", stride)
          and du_form(n, e) == "pallas")


def _bwd_walks(stride: int, n: int, e: int, groups: int) -> bool:
  """Whether impl "xla" runs its backward over the hidden tensors as one row walk
  (``stencil.bwd``: pass 3's sums, dc and du's share from g; then ``stencil.du_bn``,
  du's share from u): QLHS_STENCIL_ROWS names "bwd" (or "all"), pass 3's sums and du run
  as Pallas (:func:`sums_form`, :func:`du_form`), at stride 1 with one BatchNorm group.
  It takes the place of the sums' walk and of dx_du there."""
  from qlhs_jax.kernels import stencil  # imports this module
  return (groups == 1 and stencil._walks_rows("bwd", stride)
          and sums_form(n, groups, e) == "pallas" and du_form(n, e) == "pallas")


def _xla_reads_taps(stride: int, n: int, e: int, groups: int) -> tuple[bool, bool]:
  """Whether impl "xla" runs a pass as XLA's, one that reads u's taps, in the forward
  (the statistics, the product) and in the backward (pass 3's sums, dc's own pass, pass
  4): where none does, no padded copy of u is written (:func:`d_taps`), or kept."""
  forward = stats_form(n, groups) == "xla" or product_form(groups) == "xla"
  if _bwd_walks(stride, n, e, groups):
    return forward, False
  # pass 4 as XLA's (and dc's own pass, which comes only with it), or XLA's sums
  kernels_dx = (product_pallas(groups) is not None
                or _dx_du_walks(stride, n, e, groups))
  return forward, not kernels_dx or sums_form(n, groups, e) == "xla"


def dc_pass() -> str:
  """Where impl "xla" computes dc = dp * BN(D u): QLHS_DC_PASS, else "dx". "dx" (pass 4,
  in the function that writes dx, from the same D u) or "sums" (after pass 3, from its
  own copy of u behind a barrier, as before 2026-12-03). Compiled for the H100, XLA
  puts dc in pass 4's fusion either way, but "sums" hands it u twice: "dx" moves 0.80
  GB less per step (65.52 against 66.32 GB, 838 kernels against 840;
  benchmarks/NOTES.md, experiment 14). The same dc either way (tests/kernels)."""
  return settings.choice("QLHS_DC_PASS", DC_PASSES)


def _d_transpose(dx: jax.Array, k9: jax.Array, stride: int, hw: tuple[int, int],
                 form: str | None = None) -> jax.Array:
  """du = D^T dx in float32: ``dx`` (B, Ho, Wo, n, e), ``k9`` (9, n, e), ``hw`` = u's
  (H, W); returns (B, H, W, n).

  "autodiff" is JAX's transpose of ``_d_xla``: per tap a reduction over e, then the nine
  shifted (padded) results added. On an H100 XLA wrote that as one 8-output float32
  reduction plus an add, ~4.4 GB per stage-1 block at batch 256 where the tensors are
  0.5 GB (benchmarks/NOTES.md). "gather" is ``layers.shifted_transpose``: the same sum
  the other way round, as the stencil of the transposed convolution, summed over taps
  and e in one loop fusion, so that dx is read once and du written once (with the
  residual's gradient added on the way, experiment 5); on the H100 that fusion ran at
  136 GB/s, 5.3 ms per stage-1 block (experiment 12): it evaluates the nine-tap sum once
  per s. "pallas" is ``stencil.d_transpose``, the same gather as a Pallas kernel.
  """
  form = form or du_form(*dx.shape[-2:])
  h, w = hw
  if form.startswith("pallas"):
    from qlhs_jax.kernels import stencil  # imports this module
    return stencil.d_transpose(dx, k9, stride, hw, dot=form == "pallas_dot")
  if form == "autodiff":
    u0 = jnp.zeros(dx.shape[:1] + (h, w) + dx.shape[3:4], F32)
    # Its taps through the in-fusion pad: JAX's transpose of the pad, not of a barrier.
    return jax.vjp(lambda v: _d_xla(v, k9, stride, "pad"), u0)[1](dx.astype(F32))[0]
  from qlhs_jax.models.layers import shifted_transpose  # models imports this module
  n, e = k9.shape[1:]
  return shifted_transpose(dx, k9.reshape(3, 3, n, e), stride, (h, w))[..., 0]


def _per_group(v: jax.Array, groups: int, b: int) -> jax.Array:
  """(G, n, e) per-group vector broadcast against (B, Ho, Wo, n, e)."""
  return jnp.repeat(v, b // groups, axis=0)[:, None, None]


def _group_sum(x: jax.Array, groups: int) -> jax.Array:
  """Sums (B, ...rows..., n, e) over everything but (n, e), per batch group."""
  xg = x.reshape((groups, -1) + x.shape[-2:])
  return xg.sum(1)


def _stacked_group_sums(pieces, groups: int, keep: int) -> jax.Array:
  """Per-group sums of K pieces of one shape (B, Ho, Wo, *kept) over (Ho, Wo) and the
  batch group, as one reduction of one stack: (K, G, *kept), with ``keep`` = len(kept).
  The stack's axis is the major one on purpose: stacked along the minor axis (next to
  the channels), XLA's GPU reduction gives neighbouring threads of a warp different
  pieces of the concatenation to compute, and the warp runs the pieces' branches one
  after the other. On the H100 that made the 54-piece statistics of a stage-1 block take
  89 ms for 0.11 GB (benchmarks/NOTES.md, experiment 11); stacked major, a thread block
  works on one piece."""
  x = jnp.stack(pieces, axis=0)
  kept = x.shape[x.ndim - keep:]
  return x.reshape((x.shape[0], groups, -1) + kept).sum(2)


def reference(u, c, kernel, scale, bias, *, stride=1, groups=1, eps=1e-5):
  """The plain path's formula, differentiated by autodiff: ``layers.derivative`` in the
  input dtype, then :class:`qlhs_jax.models.common.BatchNorm`'s one-pass float32
  statistics and affine map, cast back, times ``c``. Returns ``(p, mean, var)`` like
  :func:`d_bn_product`; the reference of the tests and of ``benchmarks.fused``."""
  from qlhs_jax.models.layers import derivative  # models imports this module
  x = derivative(u[..., None], kernel, stride)
  b = x.shape[0]
  sdt = jnp.promote_types(x.dtype, F32)
  xg = x.reshape((groups, b // groups) + x.shape[1:]).astype(sdt)
  mean = xg.mean((1, 2, 3), keepdims=True)
  var = jnp.maximum((xg * xg).mean((1, 2, 3), keepdims=True) - mean * mean, 0.0)
  mul = lax.rsqrt(var + eps) * scale.astype(xg.dtype)
  y = (xg * mul + (bias.astype(xg.dtype) - mean * mul)).astype(x.dtype)
  return y.reshape(x.shape) * c, mean.reshape(groups, -1), var.reshape(groups, -1)


# ------------------------------------------------------------------------------------
# The passes in jax.numpy (impl="xla").

# The 45 tap pairs (t <= t2) of the Gram matrix of u's taps, and where each (t, t2) lands.
_PAIRS = [(t, t2) for t in range(9) for t2 in range(t, 9)]
_PAIR_OF = [[_PAIRS.index((min(a, b), max(a, b))) for b in range(9)] for a in range(9)]


def _xla_stats(u, k9, stride, groups, up=None):
  """Per-group sums of D u and (D u)^2, (G, n, e), from u alone: D u = sum_t k_t tap_t,
  so sum(D u) = sum_t k_t sum(tap_t) and sum((D u)^2) = k^T M k with M the 9x9 Gram
  matrix of the taps of each input channel. One reduction over (9 + 45) products of the
  n-channel u instead of one over the (n*e)-channel D u, which XLA would then store.
  Float32 cancellation: k^T M k loses relative precision by about
  sum|k_a k_b M_ab| / (k^T M k), large only where D u is much smaller than u's taps (a
  kernel that nearly sums to zero on a channel with a large offset). tests/kernels
  checks that case against float64: a zero-sum kernel on u offset by 100 standard
  deviations gives the variance to 3.6e-6 (the bound there is 1e-4).
  Also returns the per-group tap sums and Gram entries, (9 + 45, G, n), that the
  backward's dL/dkernel reuses (:func:`_xla_kernel_grad`)."""
  taps = _u_taps(u, stride, up=up)  # 9 x (B, Ho, Wo, n)
  sums = _stacked_group_sums(taps + [taps[a] * taps[b] for a, b in _PAIRS], groups, 1)
  return _stats_from_sums(sums, k9)


def _stats(u, k9, stride, groups, up=None):
  """:func:`_xla_stats`, with its tap sums and Gram entries from ``stencil.tap_stats``
  where QLHS_STATS_FORM=pallas or pallas_gram (the same (54, G, n) sums; s1 and s2 from
  them alike)."""
  form = stats_form(u.shape[-1], groups)
  if form == "xla":
    return _xla_stats(u, k9, stride, groups, up)
  from qlhs_jax.kernels import stencil  # imports this module
  if groups != 1:
    stencil.check(u.shape[-1], "QLHS_STATS_FORM", groups)
  return _stats_from_sums(stencil.tap_stats(u, stride, lags=form != "pallas_gram",
                                            dot=form == "pallas_dot"), k9)


def _stats_from_sums(sums, k9):
  """s1, s2 (G, n, e) of D u from the (54, G, n) tap sums and Gram entries.

  These per-channel contractions, and dL/dkernel's (:func:`_xla_kernel_grad`), are
  written as sums of float32 products, not einsums (pass 3's sum of g * xhat,
  ``stencil._sums_out``, is an einsum at HIGHEST). Why: XLA compiles a float32 einsum at
  DEFAULT precision for an NVIDIA GPU with TF32 inputs (10-bit mantissas; bfloat16
  passes on TPUs). Until 2026-12-05 s2 = k^T M k was one, and every GPU run normalised
  with variances ~3e-4 off (more where u has an offset; ``benchmarks/tf32_probe.py``,
  NOTES.md experiment 27), which no CPU test could see. Written out, they also fuse
  with BatchNorm's arithmetic: one kernel after the statistics' reduction where the
  einsums took five (757 kernels a step against 849, deviceless)."""
  s1 = sum(sums[t][..., None] * k9[t] for t in range(9))
  s2 = sum((2.0 if a != b else 1.0) * sums[9 + i][..., None] * (k9[a] * k9[b])
           for i, (a, b) in enumerate(_PAIRS))
  return s1, s2, sums


def _bn_times(x, v, mul, add, groups, dtype):
  """BN(x) * v = (x * mul + add) * v per BatchNorm group, pinned row-major, in
  ``dtype``: the forward product (v = c) and dc (v = dp)."""
  b = x.shape[0]
  f1 = x * _per_group(mul, groups, b) + _per_group(add, groups, b)
  return _pin((f1 * v.astype(F32)).astype(dtype))


def _xla_apply(u, c5, k9, mul, add, stride, groups, up=None):
  return _bn_times(_d_xla(u, k9, stride, up=up), c5, mul, add, groups, c5.dtype)


def _xla_backward_sums(u, c5, dp5, k9, mul, add, mean, rstd, stride, groups,
                       with_dc=True, up=None, cw=None, aw=None):
  """Pass 3: dc (None unless ``with_dc``: :func:`dc_pass`), and per group the sums of
  g = dp*c and g*xhat (BatchNorm's backward) and of tap_t(u) * g, (G, n, 9, e)
  (dL/dkernel's share that needs g). ``cw`` (C's weight) in place of ``c5`` (None):
  the dot form's kernel makes c (:func:`c_form`); ``aw`` (A's weight), with ``dp5``
  dy: the dot form's kernel makes dp (:func:`dp_form`)."""
  b = u.shape[0]
  # The same sums as one Pallas kernel (kernels.stencil), where the form picks it.
  form = sums_form(u.shape[-1], groups, k9.shape[-1])
  if form != "xla":
    from qlhs_jax.kernels import stencil  # imports this module
    if groups != 1:
      stencil.check(u.shape[-1], "QLHS_SUMS_FORM", groups)
    sg, sgx, tg = stencil.bn_sums(u, c5, dp5, k9, mean, rstd, stride,
                                  xhat=form == "pallas_xhat", dot=form == "pallas_dot",
                                  cw=cw, aw=aw)
  else:
    g = dp5.astype(F32) * c5.astype(F32)
    taps = _u_taps(u, stride, up=up)  # 9 x (B, Ho, Wo, n): D u's and the sums' alike
    xhat = ((_d_from_taps(taps, k9) - _per_group(mean, groups, b))
            * _per_group(rstd, groups, b))
    # One reduction of one stack, so that XLA reads dp and c once (as nine sums of their
    # own, XLA split them over fusions that each read dp and c again). On the H100 its
    # PTX loads each piece's operands as scalars behind a branch per piece, like the
    # statistics' (benchmarks/NOTES.md, experiment 12).
    sums = _stacked_group_sums([g, g * xhat] + [t[..., None] * g for t in taps],
                               groups, 2)
    sg, sgx = sums[0], sums[1]  # (G, n, e)
    tg = jnp.moveaxis(sums[2:], 0, 2)  # (G, n, 9, e)
  if not with_dc:
    return None, sg, sgx, tg
  # dc in a fusion of its own, from its own copy of u: asked for in the same fusion as
  # the sums, XLA stores D u in float32 first (2.98 GB per stage-1 block instead of
  # 0.93 + 0.92).
  u_dc, up_dc, _ = lax.optimization_barrier((u, up, sg))
  return (_xla_dc(u_dc, dp5, k9, mul, add, stride, groups, c5.dtype, up_dc), sg, sgx,
          tg)


def _xla_dc(u, dp5, k9, mul, add, stride, groups, dtype, up=None):
  """dc = dp * BN(D u), in ``dtype``."""
  return _bn_times(_d_xla(u, k9, stride, up=up), dp5, mul, add, groups, dtype)


def _xla_backward_dx(u, c5, dp5, k9, mul, cx, c0, mean, stride, groups, dx_dtype,
                     add=None, up=None):
  """Pass 4: dx = dL/d(D u), stored in ``dx_dtype`` for du = D^T dx; with ``add`` (the
  forward's BatchNorm shift, :func:`dc_pass` "dx") also dc = dp * BN(D u), returned as
  ``(dx, dc)``: both from the same D u, read from the same c, dp and u."""
  x = _d_xla(u, k9, stride, up=up)
  b = u.shape[0]
  g = dp5.astype(F32) * c5.astype(F32)
  dx = _pin((g * _per_group(mul, groups, b)
             + (x - _per_group(mean, groups, b)) * _per_group(cx, groups, b)
             + _per_group(c0, groups, b)).astype(dx_dtype))
  # Store dx in dx_dtype: without the barrier XLA drops the round trip through bfloat16
  # (excess precision) and keeps a float32 dx for du, twice the bytes.
  if add is None:
    return lax.optimization_barrier(dx)
  dc = _bn_times(x, dp5, mul, add, groups, c5.dtype)
  return lax.optimization_barrier((dx, dc))


def _xla_kernel_grad(tg, tstats, k9, mean, mul, cx, c0):
  """dL/dkernel (9, n, e) without reading dx: the sum over pixels of tap_t(u) * dx, with
  dx = mul*g + cx*(D u - mean) + c0 per group, is
  mul * sum(tap_t g) + cx * (sum_t' k_t' M[t, t'] - mean * sum(tap_t)) + c0 * sum(tap_t):
  the tap products of g from pass 3 (``tg``), the Gram matrix M and the tap sums from
  the forward statistics (``tstats``). Pass 4 then writes dx for du alone, and nothing
  reads it back for dL/dkernel (0.52 GB per stage-1 block at batch 256). The middle
  term cancels like the variance of :func:`_xla_stats` where u has a large offset;
  tests/kernels checks dL/dkernel at an offset of 100 standard deviations against
  float64."""
  out = []
  for t in range(9):  # per tap: sum_t' k_t' M[t, t'] - mean * sum(tap_t), (G, n, e)
    tx = (sum(tstats[9 + _PAIR_OF[t][b]][..., None] * k9[b] for b in range(9))
          - tstats[t][..., None] * mean)
    out.append((tg[:, :, t] * mul + tx * cx + tstats[t][..., None] * c0).sum(0))
  return jnp.stack(out)


def _pin(x):
  from qlhs_jax.models.layers import pin_row_major  # models imports this module
  return pin_row_major(x)


# ------------------------------------------------------------------------------------
# The same passes as Pallas kernels (impl="pallas").

def _plan(u_shape, e, stride):
  """Static tiling for the Pallas passes (DEFAULT_TILING or QLHS_PALLAS_TILING)."""
  b, h, w, n = u_shape
  from qlhs_jax.models.layers import _out_size  # models imports this module
  rows, elems, warps, cols, stages = tiling()
  ho, wo = _out_size(h, stride), _out_size(w, stride)
  tw = pl.next_power_of_2(wo)
  tc = tw if cols == 0 else min(cols, tw)  # columns per tile
  bj = 1
  while n % (2 * bj) == 0 and 2 * bj * e * tc <= elems:
    bj *= 2
  ncb = -(-wo // tc)  # column blocks
  rows = min(rows, ho)
  # u is zero-padded by one pixel, plus enough columns on the right that the tc-wide
  # strided tap loads of the last column block stay inside the array (the extra columns
  # are masked out).
  extra = max(0, (ncb * tc - 1) * stride + 3 - (w + 2))
  return dict(b=b, h=h, w=w, n=n, e=e, ho=ho, wo=wo, tc=tc, ncb=ncb, bj=bj, nj=n // bj,
              rows=rows, nrb=-(-ho // rows), stride=stride, pad_right=1 + extra,
              warps=warps, stages=stages)


def _pad_u(u, plan):
  return jnp.pad(u, ((0, 0), (1, 1), (1, plan["pad_right"]), (0, 0)))


def _block(plan):
  """This program's (image, slot of its partial sums, first column, first input
  channel); the slot numbers the (row block, column block) pairs of one image."""
  pid = pl.program_id(2)  # column blocks and channel blocks share the grid's last axis
  cb = pid // plan["nj"]
  return (pl.program_id(0), pl.program_id(1) * plan["ncb"] + cb, cb * plan["tc"],
          (pid % plan["nj"]) * plan["bj"])


def _tap(up_ref, b, oy, x0, j0, t, plan):
  """Input tap t = 3*dy + dx of output row ``oy``, columns x0..: (tc, bj) float32."""
  dy, dx = divmod(t, 3)
  st = plan["stride"]
  return up_ref[b, oy * st + dy, pl.ds(x0 * st + dx, plan["tc"], st),
                pl.ds(j0, plan["bj"])].astype(F32)


def _tile_d(up_ref, k_ref, b, oy, x0, j0, plan):
  """D u for output row ``oy`` of image ``b``, columns x0.., channels j0..j0+bj:
  (tc, bj, e) float32."""
  acc = None
  for t in range(9):
    k = k_ref[t, pl.ds(j0, plan["bj"]), :]
    term = _tap(up_ref, b, oy, x0, j0, t, plan)[:, :, None] * k[None]
    acc = term if acc is None else acc + term
  return acc


def _row_loop(plan, x0, body, init):
  """Runs ``body(oy, ok, carry)`` over this program's rows; ``ok`` (tc, 1, 1) masks the
  columns and rows outside the image (rows past the end are clamped and masked)."""
  rb = pl.program_id(1)
  ok_cols = ((x0 + jnp.arange(plan["tc"])) < plan["wo"])[:, None, None]

  def step(r, carry):
    oy = rb * plan["rows"] + r
    ok = ok_cols & (oy < plan["ho"])
    return body(jnp.minimum(oy, plan["ho"] - 1), ok, carry)
  return lax.fori_loop(jnp.int32(0), jnp.int32(plan["rows"]), step, init)


def _hidden_at(ref, b, oy, x0, j0, plan):
  return ref.at[b, oy, pl.ds(x0, plan["tc"]), pl.ds(j0, plan["bj"]), :]


def _group_vecs(refs, b, j0, plan, per_group):
  """This program's (bj, e) slices of per-group vectors (G, n, e)."""
  return [ref[b // per_group, pl.ds(j0, plan["bj"]), :] for ref in refs]


def _load(ref, b, oy, x0, j0, plan, mask):
  """A (tc, bj, e) tile of a hidden tensor in float32, 0 where ``mask`` is off."""
  return plt.load(_hidden_at(ref, b, oy, x0, j0, plan), mask=mask, other=0.0).astype(F32)


def _store(ref, b, oy, x0, j0, plan, value, mask):
  plt.store(_hidden_at(ref, b, oy, x0, j0, plan), value.astype(ref.dtype), mask=mask)


def _full(mask, plan):
  return jnp.broadcast_to(mask, (plan["tc"], plan["bj"], plan["e"]))


def _backward_tiles(up_ref, k_ref, c_ref, dp_ref, b, oy, ok, x0, j0, plan):
  """What both backward kernels read for one output row: D u, the mask as a tile, and
  the c and dp tiles: ``(x, m, c, dp)``."""
  m = _full(ok, plan)
  return (_tile_d(up_ref, k_ref, b, oy, x0, j0, plan), m,
          _load(c_ref, b, oy, x0, j0, plan, m), _load(dp_ref, b, oy, x0, j0, plan, m))


def _stats_kernel(up_ref, k_ref, s1_ref, s2_ref, *, plan):
  b, part, x0, j0 = _block(plan)

  def body(oy, ok, carry):
    x = jnp.where(ok, _tile_d(up_ref, k_ref, b, oy, x0, j0, plan), 0.0)
    return carry[0] + x.sum(0), carry[1] + (x * x).sum(0)
  z = jnp.zeros((plan["bj"], plan["e"]), F32)
  s1, s2 = _row_loop(plan, x0, body, (z, z))
  s1_ref[b, part, pl.ds(j0, plan["bj"]), :] = s1
  s2_ref[b, part, pl.ds(j0, plan["bj"]), :] = s2


def _apply_kernel(up_ref, c_ref, k_ref, mul_ref, add_ref, p_ref, *, plan, per_group):
  b, _, x0, j0 = _block(plan)
  mul, add = _group_vecs((mul_ref, add_ref), b, j0, plan, per_group)

  def body(oy, ok, carry):
    x = _tile_d(up_ref, k_ref, b, oy, x0, j0, plan)
    m = _full(ok, plan)
    c = _load(c_ref, b, oy, x0, j0, plan, m)
    _store(p_ref, b, oy, x0, j0, plan, (x * mul + add) * c, m)
    return carry
  _row_loop(plan, x0, body, 0)


def _sums_kernel(up_ref, c_ref, dp_ref, k_ref, mul_ref, add_ref, mean_ref, rstd_ref,
                 dc_ref, sg_ref, sgx_ref, *, plan, per_group):
  b, part, x0, j0 = _block(plan)
  mul, add, mean, rstd = _group_vecs((mul_ref, add_ref, mean_ref, rstd_ref), b, j0, plan,
                                     per_group)

  def body(oy, ok, carry):
    x, m, c, dp = _backward_tiles(up_ref, k_ref, c_ref, dp_ref, b, oy, ok, x0, j0, plan)
    _store(dc_ref, b, oy, x0, j0, plan, dp * (x * mul + add), m)
    g = dp * c  # zero outside the image: dp and c loaded as 0 there
    return carry[0] + g.sum(0), carry[1] + (g * ((x - mean) * rstd)).sum(0)
  z = jnp.zeros((plan["bj"], plan["e"]), F32)
  sg, sgx = _row_loop(plan, x0, body, (z, z))
  sg_ref[b, part, pl.ds(j0, plan["bj"]), :] = sg
  sgx_ref[b, part, pl.ds(j0, plan["bj"]), :] = sgx


def _dx_kernel(up_ref, c_ref, dp_ref, k_ref, mul_ref, cx_ref, c0_ref, mean_ref,
               dx_ref, dk_ref, *, plan, per_group):
  b, part, x0, j0 = _block(plan)
  mul, cx, c0, mean = _group_vecs((mul_ref, cx_ref, c0_ref, mean_ref), b, j0, plan,
                                  per_group)

  def body(oy, ok, dk):
    x, m, c, dp = _backward_tiles(up_ref, k_ref, c_ref, dp_ref, b, oy, ok, x0, j0, plan)
    dx = jnp.where(ok, dp * c * mul + (x - mean) * cx + c0, 0.0)
    _store(dx_ref, b, oy, x0, j0, plan, dx, m)
    # dL/dkernel[t] = sum over pixels of dx * (input tap t). The taps are loaded again
    # (cache hits) rather than kept live from D's loop: nine fewer tiles in registers.
    return tuple(dk[t] + (dx * _tap(up_ref, b, oy, x0, j0, t, plan)[:, :, None]).sum(0)
                 for t in range(9))
  z = jnp.zeros((plan["bj"], plan["e"]), F32)
  dk = _row_loop(plan, x0, body, (z,) * 9)
  for t in range(9):
    dk_ref[b, part, t, pl.ds(j0, plan["bj"]), :] = dk[t]


def _call(kernel, plan, out_shape, args, interpret, **kw):
  return pl.pallas_call(
      functools.partial(kernel, plan=plan, **kw), out_shape=out_shape,
      grid=(plan["b"], plan["nrb"], plan["ncb"] * plan["nj"]),
      compiler_params=plt.CompilerParams(num_warps=plan["warps"],
                                         num_stages=plan["stages"]),
      interpret=interpret, name=f"qlhs_{kernel.__name__.strip('_')}")(*args)


def _partials(plan, *extra):
  return jax.ShapeDtypeStruct(
      (plan["b"], plan["nrb"] * plan["ncb"]) + extra + (plan["n"], plan["e"]), F32)


def _pallas_stats(u, k9, stride, groups, interpret):
  plan = _plan(u.shape, k9.shape[-1], stride)
  s1, s2 = _call(_stats_kernel, plan, (_partials(plan), _partials(plan)),
                 (_pad_u(u, plan), k9), interpret)
  return _group_sum(s1, groups), _group_sum(s2, groups)


def _pallas_apply(u, c5, k9, mul, add, stride, groups, interpret):
  plan = _plan(u.shape, k9.shape[-1], stride)
  return _call(_apply_kernel, plan, jax.ShapeDtypeStruct(c5.shape, c5.dtype),
               (_pad_u(u, plan), c5, k9, mul, add), interpret,
               per_group=u.shape[0] // groups)


def _pallas_backward_sums(u, c5, dp5, k9, mul, add, mean, rstd, stride, groups,
                          interpret):
  plan = _plan(u.shape, k9.shape[-1], stride)
  dc, sg, sgx = _call(
      _sums_kernel, plan,
      (jax.ShapeDtypeStruct(c5.shape, c5.dtype), _partials(plan), _partials(plan)),
      (_pad_u(u, plan), c5, dp5, k9, mul, add, mean, rstd), interpret,
      per_group=u.shape[0] // groups)
  return dc, _group_sum(sg, groups), _group_sum(sgx, groups)


def _pallas_backward_dx(u, c5, dp5, k9, mul, cx, c0, mean, stride, groups, dx_dtype,
                        interpret):
  plan = _plan(u.shape, k9.shape[-1], stride)
  dx, dk = _call(
      _dx_kernel, plan,
      (jax.ShapeDtypeStruct(c5.shape, dx_dtype), _partials(plan, 9)),
      (_pad_u(u, plan), c5, dp5, k9, mul, cx, c0, mean), interpret,
      per_group=u.shape[0] // groups)
  return dx, dk.sum((0, 1))


# ------------------------------------------------------------------------------------
# The operation.

def _hidden_shape(u_shape, stride: int, h: int) -> tuple[int, int, int, int]:
  """c's and p's shape (B, Ho, Wo, h) for u of ``u_shape`` at ``stride``."""
  from qlhs_jax.models.layers import _out_size  # models imports this module
  b, hh, w, _ = u_shape
  return (b, _out_size(hh, stride), _out_size(w, stride), h)


def _check(u, c, kernel, scale, stride, groups, impl, c_weights=False, a=None):
  if impl not in FUSE_IMPLS[1:]:
    raise ValueError(f"unknown d_bn_product impl {impl!r}; choose one of {FUSE_IMPLS[1:]} "
                     f"(the model's fuse_d_bn='none' is the plain autodiff path)")
  if u.ndim != 4 or c.ndim != (2 if c_weights else 4):
    raise ValueError(f"d_bn_product expects u (B, H, W, n) and "
                     f"{'C (n, h)' if c_weights else 'c (B, Ho, Wo, h)'}, got {u.shape} "
                     f"and {c.shape}")
  b, h, w, n = u.shape
  kh, kw, kj, e = kernel.shape
  want = (n, n * e) if c_weights else _hidden_shape(u.shape, stride, n * e)
  if (kh, kw) != (3, 3) or kj not in (1, n) or c.shape != want or scale.shape != (n * e,):
    raise ValueError(f"d_bn_product: kernel {kernel.shape}, "
                     f"{'C' if c_weights else 'c'} {c.shape}, scale "
                     f"{scale.shape} do not fit u {u.shape} (want {want})")
  if a is not None and (a.ndim != 2 or a.shape[0] != n * e):
    raise ValueError(f"d_bn_product: A's weight {a.shape} does not fit the hidden "
                     f"channels of u {u.shape} and kernel {kernel.shape} (want "
                     f"({n * e}, n_out))")
  if b % groups:
    raise ValueError(f"batch {b} does not split into {groups} BatchNorm groups")
  if impl == "pallas":
    check_pallas(e)


def pallas_interpret(setting: str, fix: str) -> bool:
  """Whether Pallas kernels run interpreted: on a CPU (correct, slow: tests), not on an
  NVIDIA GPU. QLHS_PALLAS_INTERPRET=0 asks for the Triton kernels on any host:
  benchmarks.aot sets it to compile the step for an H100 on a CPU machine. Any other
  backend is refused, naming the ``setting`` that asked for the kernels and the ``fix``."""
  if os.environ.get("QLHS_PALLAS_INTERPRET") == "0":
    return False
  backend = jax.default_backend()
  if backend not in ("gpu", "cuda", "cpu"):
    raise ValueError(f"{setting} runs Triton kernels on an NVIDIA GPU (or interpreted on "
                     f"a CPU), not on {backend!r}; {fix}")
  return backend == "cpu"


def check_pallas(e: int, fuse: str = "pallas"):
  """fuse_d_bn ``fuse`` ("pallas" here, "block" in eq3_block) needs Pallas's Triton
  backend and a power-of-two expansion ``e`` (Triton's block shapes); the model calls
  this too, to refuse a config before any training step."""
  if plt is None:
    raise ValueError(f"fuse_d_bn={fuse!r} needs Pallas's Triton backend "
                     f"(jax.experimental.pallas.triton), which JAX {jax.__version__} does "
                     f"not have; use fuse_d_bn='xla'")
  if e < 1 or e & (e - 1):
    raise ValueError(f"fuse_d_bn={fuse!r} needs a power-of-two expansion e (Triton block "
                     f"shapes), got {e}; use fuse_d_bn='xla'")


def bn_affine(s1, s2, count, scale, bias, eps):
  """Training-mode BatchNorm of D u from its sums ``s1``, ``s2`` (G, n, e) over ``count``
  values: ``(mean, var, rstd, mul, add)``, BN(x) = x * mul + add (biased variance)."""
  n, e = s1.shape[-2:]
  mean = s1 / count
  var = jnp.maximum(s2 / count - mean * mean, 0.0)
  rstd = lax.rsqrt(var + eps)
  mul = scale.astype(F32).reshape(n, e) * rstd
  return mean, var, rstd, mul, bias.astype(F32).reshape(n, e) - mean * mul


def bn_backward_coeffs(mul, rstd, sg, sgx, dmean, dvar, count):
  """BatchNorm's backward: dL/dx = mul * (g - mean(g) - xhat * mean(g * xhat)) plus the
  direct terms of the mean and variance outputs, written as
  mul * g + cx * (x - mean) + c0 (x centred, to keep float32 cancellation small);
  ``sg``, ``sgx`` the sums of g and g * xhat. Returns ``(cx, c0)``."""
  cx = -mul * rstd * sgx / count + 2.0 * dvar / count
  c0 = -mul * sg / count + dmean / count
  return cx, c0


def kernel_grad_like(dk9, kernel):
  """dL/dkernel (9, n, e) in the shape and dtype of D's ``kernel`` (3, 3, 1 or n, e):
  summed over the channels where the kernel is shared ("ws")."""
  dk = dk9.reshape((3, 3) + dk9.shape[1:])
  if kernel.shape[2] == 1:
    dk = dk.sum(2, keepdims=True)
  return dk.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11, 12))
def _op(u, c, kernel, scale, bias, a, stride, groups, eps, impl, interpret, c_weights,
        through):
  return _forward(u, c, kernel, scale, bias, a, stride, groups, eps, impl, interpret,
                  c_weights, through)[0]


def _forward(u, c, kernel, scale, bias, a, stride, groups, eps, impl, interpret,
             c_weights, through):
  b, _, _, n = u.shape
  e = kernel.shape[-1]
  k9 = _kernel9(kernel, n)
  shape = _hidden_shape(u.shape, stride, n * e)
  # c_weights: c is C u, ``c`` C's weight (QLHS_C_FORM=kernels). The dot form's product
  # makes c itself (``made``); elsewhere XLA's matmul does, as the model's would.
  cw = c if c_weights else None
  made = c_weights and _makes_c(n, groups, impl)
  if c_weights and not made:
    c = c_of(u, cw, stride)
  c5 = None if made else c.reshape(shape[:3] + (n, e))
  # One padded copy of u (d_taps "copy") for the forward's XLA passes and, kept as a
  # residual, for the backward's: a copy a block, not one a pass, and none where no XLA
  # pass reads u's taps (an unread copy would live on in the backward's barriers).
  forward_reads, backward_reads = (
      _xla_reads_taps(stride, n, e, groups) if impl != "pallas" and d_taps() == "copy"
      else (False, False))
  up = padded_copy(u) if forward_reads or backward_reads else None
  res_up = up if backward_reads else None
  if impl == "pallas":
    (s1, s2), tstats = _pallas_stats(u, k9, stride, groups, interpret), None
  else:
    s1, s2, tstats = _stats(u, k9, stride, groups, up)
  count = (b // groups) * shape[1] * shape[2]
  mean, var, rstd, mul, add = bn_affine(s1, s2, count, scale, bias, eps)
  # QLHS_P_FORM=kernels: A applied in the product's kernel, where pass 4 sums A's
  # gradient (p is not kept for the backward), which makes c there too.
  pass4 = a is not None and made and _pass4_grads(stride, n, e, a.shape[-1], groups, impl)
  if pass4 and p_form() == "kernels":
    from qlhs_jax.kernels import stencil  # imports this module
    p5 = None
    y = stencil.product_a(u, cw, a, _parts_k9(k9, u.dtype), mul, add, stride)
  elif impl == "pallas":
    p5 = _pallas_apply(u, c5, k9, mul, add, stride, groups, interpret)
  elif (product_dot := product_pallas(groups)) is not None:
    from qlhs_jax.kernels import stencil  # imports this module
    p5 = stencil.product(u, c5, _parts_k9(k9, u.dtype), mul, add, stride,
                         dot=product_dot, cw=cw if made else None)
  else:
    p5 = _xla_apply(u, c5, k9, mul, add, stride, groups, up)
  h = n * e
  # a: the 1x1 map A that follows the product (y = p @ a), kept for its gradient, which
  # needs p (as autodiff of the model's matmul keeps it) unless pass 4 sums it, and for
  # dp's.
  if p5 is not None:
    p = p5.reshape(shape)
    y = p if a is None else a_of(p, a)
  out = (y, mean.reshape(groups, h), var.reshape(groups, h)) + ((u,) if through else ())
  keep_p = a is not None and not pass4
  return out, (u, c5, cw, a, p if keep_p else None, kernel, scale, bias, mean, rstd,
               mul, add, tstats, res_up)


def _fwd(u, c, kernel, scale, bias, a, stride, groups, eps, impl, interpret, c_weights,
         through):
  return _forward(u, c, kernel, scale, bias, a, stride, groups, eps, impl, interpret,
                  c_weights, through)


def _bwd(stride, groups, eps, impl, interpret, c_weights, through, res, cts):
  del eps, c_weights, through  # (cw is None unless c_weights; cts has du_through)
  u, c5, cw, a, p, kernel, scale, bias, mean, rstd, mul, add, tstats, up = res
  # (dy: dp where no A follows; du_through: the gradient of the u handed back)
  dy, dmean, dvar, *du_through = cts
  b, _, _, n = u.shape
  e = kernel.shape[-1]
  h = n * e
  k9 = _kernel9(kernel, n)
  dp_shape = dy.shape[:3] + (n, e)
  # dp = dy A^T where A follows (QLHS_DP_FORM=kernels): pass 4's dot form makes it from
  # dy and A (a_dx), and so does pass 3's sums as a dot form (a_sums); a pass of another
  # form reads XLA's, the model's matmul transposed (unused, XLA drops it). A's gradient
  # is that matmul's, from p, or pass 4's sum (w_grads: :func:`weight_grads`, with C's).
  # (The forward keeps p unless pass 4 sums A's gradient: _pass4_grads.)
  da, a_dx, w_grads = None, None, p is None and a is not None
  if a is None:
    dp5 = dy.reshape(dp_shape)
  else:
    dp_xla = jax.linear_transpose(lambda p_: a_of(p_, a), jax.ShapeDtypeStruct(
        dy.shape[:3] + (h,), dy.dtype))(dy)[0]
    if not w_grads:
      da = jax.vjp(lambda a_: a_of(p, a_), a)[1](dy)[0]
    a_dx = a if _makes_dp(n, a.shape[-1], groups, impl) else None
    dp5 = None if a_dx is not None else dp_xla.reshape(dp_shape)
  one_walk = impl != "pallas" and _bwd_walks(stride, n, e, groups)
  fused_du = impl != "pallas" and _dx_du_walks(stride, n, e, groups)
  # c made in the forward's kernel (QLHS_C_FORM=kernels): pass 4's dot form makes it
  # again, and so do pass 3's sums as a dot form; a pass of another form reads it from
  # XLA's matmul, made again here as the model's.
  # The same for dp where pass 4 makes it (a_dx).
  cw_dx = cw if c5 is None else None
  others = one_walk or fused_du or sums_form(n, groups, e) != "pallas_dot"
  if c5 is None and others:
    c5 = c_of(u, cw, stride).reshape(dp_shape)
  if dp5 is None and others:
    dp5 = dp_xla.reshape(dp_shape)
  cw_sums = cw if c5 is None else None
  a_sums = a if dp5 is None else None
  # What pass 3's and pass 4's kernels read in dp's place: dy where they make dp.
  dp_sums = dp5 if a_sums is None else dy
  dp_dx = dp5 if a_dx is None else dy
  if impl == "pallas":
    dc5, sg, sgx = _pallas_backward_sums(u, c5, dp5, k9, mul, add, mean, rstd, stride,
                                         groups, interpret)
  elif one_walk:  # c and dp read once: the sums, dc and D^T(g * mul) in one walk
    from qlhs_jax.kernels import stencil  # imports this module
    dc5, du_g, (sg, sgx, tg) = stencil.bwd(u, c5, dp5, k9, mul, add, mean, rstd,
                                           dy.dtype)
  else:
    # Each XLA pass recomputes D u from u (or from its padded copy up). The barriers give
    # each pass its own copy of u, so that XLA cannot merge the three D u (forward and
    # two backward passes) into one float32 tensor stored in the forward and read back
    # twice.
    u_sums, up_sums, dp_sums = lax.optimization_barrier((u, up, dp_sums))
    product_dot = product_pallas(groups)
    pallas_dx = product_dot is not None
    dc_with_dx = pallas_dx or fused_du or dc_pass() == "dx"
    dc5, sg, sgx, tg = _xla_backward_sums(u_sums, c5, dp_sums, k9, mul, add, mean, rstd,
                                          stride, groups, with_dc=not dc_with_dx,
                                          up=up_sums, cw=cw_sums, aw=a_sums)
  count = (b // groups) * dy.shape[1] * dy.shape[2]
  dmean = dmean.astype(F32).reshape(groups, n, e)
  dvar = dvar.astype(F32).reshape(groups, n, e)
  cx, c0 = bn_backward_coeffs(mul, rstd, sg, sgx, dmean, dvar, count)
  du = None
  if impl == "pallas":
    dx, dk9 = _pallas_backward_dx(u, c5, dp5, k9, mul, cx, c0, mean, stride, groups,
                                  dy.dtype, interpret)
  elif one_walk:  # du's share from BatchNorm's mean and variance terms, from u alone
    # cx and c0 as one small kernel's outputs: else XLA stores sgx for its many consumers
    # (du_bn's table), and the update of each block's BatchNorm scale no longer shares
    # an operand with its bias's, nor a kernel (16 more a step, deviceless).
    cx, c0 = lax.optimization_barrier((cx, c0))
    from qlhs_jax.kernels import stencil  # imports this module
    du = stencil.du_bn(u, k9, cx, c0, mean, du_g, u.dtype)
    dk9 = _xla_kernel_grad(tg, tstats, k9, mean, mul, cx, c0)
  else:
    u_dx, up_dx, _ = lax.optimization_barrier((u, up, sg))
    if fused_du:  # pass 4 and du in one walk: dx is not stored
      from qlhs_jax.kernels import stencil  # imports this module
      dc5, du = stencil.dx_du(u_dx, c5, dp5, k9, mul, add, cx, c0, mean, u.dtype,
                              dy.dtype)
    elif pallas_dx:
      from qlhs_jax.kernels import stencil  # imports this module
      dx, dc5, *sums = stencil.dx_dc(u_dx, c5, dp_dx, _parts_k9(k9, u.dtype), mul, add,
                                     cx, c0, mean, stride, dy.dtype, dot=product_dot,
                                     cw=cw_dx, aw=a_dx, w_grads=w_grads)
      if w_grads:  # C's and A's gradients, summed by pass 4
        dcw, da = (g.astype(w.dtype) for g, w in zip(sums, (cw, a)))
    elif dc_with_dx:
      dx, dc5 = _xla_backward_dx(u_dx, c5, dp5, k9, mul, cx, c0, mean, stride, groups,
                                 dy.dtype, add=add, up=up_dx)
    else:
      dx = _xla_backward_dx(u_dx, c5, dp5, k9, mul, cx, c0, mean, stride, groups,
                            dy.dtype, up=up_dx)
    dk9 = _xla_kernel_grad(tg, tstats, k9, mean, mul, cx, c0)
  dscale = sgx.sum(0).reshape(h).astype(scale.dtype)
  dbias = sg.sum(0).reshape(h).astype(bias.dtype)
  dc = dc5.reshape(dy.shape[:3] + (h,))
  # u's other shares: C's where c = C u is made inside the operation (as autodiff of the
  # model's matmul gives it, with C's gradient unless pass 4 summed that), and the
  # shortcut's where u was handed back (``through``).
  shares = list(du_through)
  if w_grads:
    shares.insert(0, jax.vjp(lambda u_: c_of(u_, cw, stride), u)[1](dc)[0])
    dc = dcw
  elif cw is not None:
    du_c, dc = jax.vjp(lambda u_, w_: c_of(u_, w_, stride), u, cw)[1](dc)
    shares.insert(0, du_c)
  du_dot = du_pallas(u.shape[-1], e)
  if du is None and du_dot is not None:  # in u's dtype by the kernel
    from qlhs_jax.kernels import stencil  # imports this module
    # With u handed back, the shares go into du's kernel: one store of du, where an XLA
    # add would read it back (du_sum "kernel").
    adds, shares = (shares, []) if du_through else ((), shares)
    du = stencil.d_transpose(dx, k9, stride, u.shape[1:3], addends=adds,
                             out_dtype=u.dtype, dot=du_dot)
  elif du is None:  # (not None: dx_du gave it)
    du = _d_transpose(dx, k9, stride, u.shape[1:3]).astype(u.dtype)
  for share in shares:
    du = du + share
  return du, dc, kernel_grad_like(dk9, kernel), dscale, dbias, da


_op.defvjp(_fwd, _bwd)


def d_bn_product(u: jax.Array, c: jax.Array, kernel: jax.Array, scale: jax.Array,
                 bias: jax.Array, *, stride: int = 1, groups: int = 1, eps: float = 1e-5,
                 impl: str = "xla", interpret: bool = False, c_weights: bool = False,
                 a: jax.Array | None = None, through: bool = False):
  """``p = BN(D u) * c`` with training-mode batch statistics.

  ``u`` (B, H, W, n); ``c`` (B, Ho, Wo, n*e) in the hidden (j-major) order; ``kernel``
  (3, 3, 1 or n, e), in float32 or rounded to u's dtype (:func:`d_kernel`); ``scale``,
  ``bias`` (n*e,) the BatchNorm parameters. Returns ``(p, mean, var)``: p (B, Ho, Wo,
  n*e); mean and biased variance of D u per BatchNorm group, (groups, n*e) float32.
  ``c_weights``: ``c`` is instead C's weight (n, n*e) in the compute dtype and the
  hidden tensor is c = C u (:func:`c_of`), made where :func:`c_form` says.
  ``a``: the weight (n*e, n_out) of the 1x1 map A that follows, in the compute dtype:
  the operation returns y = p @ a (:func:`a_of`) in p's place, and its backward makes
  dp = dy a^T where :func:`dp_form` says.
  ``through``: return ``(p, mean, var, u)``, u itself for the caller's other uses of u
  (the block's shortcut, :func:`du_sum`): their gradient comes back as that output's
  cotangent, and du's Pallas kernel adds it (and C's share) before it stores du.
  Differentiable in every array argument (the backward is the hand-written passes of
  the module docstring).
  """
  _check(u, c, kernel, scale, stride, groups, impl, c_weights, a)
  kernel = fused_kernel(kernel, u.dtype)
  if _kernels_per_device(u.shape[-1], kernel.shape[-1], groups, impl):
    return _per_device_op(u, c, kernel, scale, bias, a, stride, groups, eps, impl,
                          interpret, c_weights, through)
  return _op(u, c, kernel, scale, bias, a, stride, groups, eps, impl, interpret,
             c_weights, through)


def _kernels_per_device(n, e, groups, impl) -> bool:
  """Whether a call on a batch split over several devices (:func:`batch_shards`) runs
  Pallas kernels, which then run on each device's slice (:func:`_per_device_op`):
  impl "pallas", or a stencil form that picks its kernels. The slices must hold whole
  BatchNorm groups, as per-replica BatchNorm (the default) has them; refused otherwise,
  naming the fix."""
  shards = batch_shards()
  if shards == 1:
    return False
  local = groups // shards if groups % shards == 0 else 0
  forms = (stats_form(n, groups), sums_form(n, groups, e), du_form(n, e), product_form())
  asked = [f"{settings.name(k)}={v}" for k, v in zip(FORM_VARIABLES, forms)
           if v.startswith("pallas")]
  if impl == "pallas":
    asked.insert(0, "fuse_d_bn='pallas'")
  if not asked:
    return False
  if not local:
    raise ValueError(f"{', '.join(asked)} runs Pallas kernels on each device's slice of "
                     f"the batch, split over {shards} devices here, but the batch's "
                     f"{groups} BatchNorm group(s) do not split with it; use per-replica "
                     f"BatchNorm (config.sync_bn=False, the default: bn_groups = devices)"
                     f", or XLA's forms (unset those keys or variables; fuse_d_bn='xla')")
  return True


def _per_device_op(u, c, kernel, scale, bias, a, stride, groups, eps, impl, interpret,
                   c_weights, through):
  """:func:`_op` on each device's slice of the batch: shard_map over the step's mesh,
  the batch (u, c, p or y and the per-group statistics) split along its "data" axis,
  the parameters whole. Each device's BatchNorm groups are its own, so the forward needs
  nothing from the other devices; shard_map's transpose sums the parameters' gradients
  over the devices (a psum, as the plain path's gradients get). check_vma=False: the
  Pallas calls and the custom VJP carry no replication types; unchecked, the transpose
  sums the gradients of every input given whole, which is what is wanted here."""
  shards = batch_shards()
  split, whole = jax.sharding.PartitionSpec(BATCH_AXIS), jax.sharding.PartitionSpec()

  weights = () if a is None else (a,)  # A's weight, whole, where given

  def body(u, c, kernel, scale, bias, *weights):
    return _op(u, c, kernel, scale, bias, weights[0] if weights else None, stride,
               groups // shards, eps, impl, interpret, c_weights, through)

  return jax.shard_map(body, mesh=_context_mesh(),
                       in_specs=((split, whole if c_weights else split) + (whole,) * 3
                                 + (whole,) * len(weights)),
                       out_specs=(split,) * (4 if through else 3),
                       check_vma=False)(u, c, kernel, scale, bias, *weights)

"""Which group acts on a model's folded parameters (design/symmetry.md).

A group is described by *slots*, each a factor of a direct product:

* one matrix slot per stage *stream* (``T_k``, one for the whole stage because the
  identity shortcut passes the stream through unchanged), and
* per block, the *hidden* slots: tori of non-zero scalings (QLHS products) or matrix
  slots on hidden layers (ResNet's and MobileNetV3's 1x1/3x3 layers).

Matrix kinds, from large to small:

=========  ==================================  ============================
kind       elements                            continuous dimension
=========  ==================================  ============================
GL         invertible matrices                 n^2
O          orthogonal matrices                 n(n-1)/2
MONO       permutation x non-zero diagonal     n
POSMONO    permutation x positive diagonal     n
SIGNPERM   permutation x diagonal of +-1       0
PERM       permutations                        0
TORUS      non-zero diagonal (a vector)        n
=========  ==================================  ============================

Matrices use the specification's column convention: the stream ``u`` becomes ``T u``.
A TORUS slot may be *moved* by the permutation of a stream (``induced``): in the literal
Eq.(3)-(7) a stream permutation ``sigma`` relabels the hidden channels ``(j, s)`` as
``(sigma(j), s)``, and the torus is read in the relabelled frame.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qlhs_jax.models.mobilenetv3 import LARGE_BLOCKS, MobileNetV3Large
from qlhs_jax.models.qlhs import QLHSNet
from qlhs_jax.models.resnet import ResNet

GL, O, MONO, POSMONO, SIGNPERM, PERM, TORUS = (
    "GL", "O", "MONO", "POSMONO", "SIGNPERM", "PERM", "TORUS")
MATRIX_KINDS = (GL, O, MONO, POSMONO, SIGNPERM, PERM)
# Monomial kinds by the set their diagonal entries lie in.
_MONO_SCALES = {MONO: "nonzero", POSMONO: "positive", SIGNPERM: "sign", PERM: "one"}
_SCALE_MONO = {v: k for k, v in _MONO_SCALES.items()}
_SCALE_MEET = {("nonzero", "positive"): "positive", ("nonzero", "sign"): "sign",
               ("positive", "sign"): "one"}

# The group an activation on the stream allows (symmetry.md 2a).
ACTIVATION_KIND = {"none": GL, "softball": O, "hardball": O, "relu": POSMONO,
                   "hardtanh": SIGNPERM}
# Forms whose D (or a factor of the product) reads the stream channels directly.
LITERAL_FORMS = ("eq3", "eq4", "eq5", "eq6", "eq7")
# Forms whose block output is a channel-wise product in the stream's own basis.
PRODUCT_WRITE_FORMS = ("eq4", "eq5")

_DESCRIPTION = {
    GL: "GL(n): every invertible matrix",
    O: "O(n): orthogonal matrices",
    MONO: "monomial: permutation x non-zero diagonal",
    POSMONO: "positive monomial: permutation x positive diagonal",
    SIGNPERM: "signed permutations",
    PERM: "permutations",
    TORUS: "torus (R*)^n of non-zero scalings",
}


def meet(a: str, b: str) -> str:
  """The intersection of two matrix kinds (a kind again)."""
  if a == b or b == GL:
    return a
  if a == GL:
    return b
  if O in (a, b):  # O(n) meets a monomial kind in its +-1 part
    other = b if a == O else a
    return _SCALE_MONO[_meet_scales(_MONO_SCALES[other], "sign")]
  return _SCALE_MONO[_meet_scales(_MONO_SCALES[a], _MONO_SCALES[b])]


def _meet_scales(x: str, y: str) -> str:
  if x == y or y == "nonzero":
    return x
  if x == "nonzero":
    return y
  if "one" in (x, y):
    return "one"
  return _SCALE_MEET.get((x, y)) or _SCALE_MEET[(y, x)]


def dimension(kind: str, n: int) -> int:
  """Dimension of the continuous part (the Lie algebra) of a slot."""
  return {GL: n * n, O: n * (n - 1) // 2, MONO: n, POSMONO: n, TORUS: n}.get(kind, 0)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One factor of the group.

  Attributes:
    name: ``stage<k>`` for a stream, else the hidden layer's name inside its block.
    size: number of channels it acts on.
    kind: one of ``MATRIX_KINDS`` or ``TORUS``.
    why: the reason for the kind, for humans.
    induced: for a TORUS, ``(stage, multiplicity)`` when the permutation of that stage's
      stream (each channel repeated ``multiplicity`` times, ``j*m + s``) relabels it.
    tied: for a stream, ``(stage, ratio)`` when its permutation is forced to be that
      stage's, inflated by ``ratio`` (Eq.(5): output ``o`` sums fixed hidden channels).
    allows: for a stream, what the activations (and the stem) alone would allow; it is
      larger than ``kind`` where the block form restricts the group (symmetry.md 2b),
      and that gap is where weak (data) symmetries are searched for.
  """
  name: str
  size: int
  kind: str
  why: str = ""
  induced: tuple[int, int] | None = None
  tied: tuple[int, int] | None = None
  allows: str | None = None


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """What ``act`` needs to know about one block: its name, the stages it reads and
  writes, and its hidden slots."""
  name: str
  stage_in: int
  stage_out: int
  hidden: tuple[Slot, ...]
  info: tuple[tuple[str, Any], ...] = ()  # e.g. (("expansion", 4),)

  def get(self, key, default=None):
    return dict(self.info).get(key, default)


@dataclasses.dataclass(frozen=True)
class Group:
  """The symmetry group of one model's folded parameters (hashable: it is static under
  ``jax.jit`` and carried by every :class:`~qlhs_jax.symmetry.elements.Element`)."""
  family: str                     # "qlhs", "resnet" or "mobilenetv3"
  form: str | None                # the QLHS block form
  stages: tuple[Slot, ...]        # stream slots, one per stage (segment)
  blocks: tuple[BlockSpec, ...]
  notes: tuple[str, ...] = ()

  @property
  def dimension(self) -> int:
    """Dimension of the group's continuous part."""
    slots = self.stages + tuple(s for b in self.blocks for s in b.hidden)
    return sum(dimension(s.kind, s.size) for s in slots)

  def describe(self) -> str:
    """A human-readable account, one line per slot."""
    head = f"{self.family}" + (f" {self.form}" if self.form else "")
    lines = [f"Symmetry group of the folded {head} model "
             f"(continuous dimension {self.dimension}):", "Streams:"]
    for s in self.stages:
      tie = f"; permutation tied to stage{s.tied[0] + 1}'s" if s.tied else ""
      gap = (f" [the activations alone would allow {s.allows}]"
             if s.allows not in (None, s.kind) else "")
      lines.append(f"  {s.name} ({s.size} ch): {_DESCRIPTION[s.kind]}"
                   f"{' - ' + s.why if s.why else ''}{tie}{gap}")
    lines.append("Hidden layers:")
    for b in self.blocks:
      parts = [f"{s.name}[{s.size}] {s.kind}" for s in b.hidden]
      lines.append(f"  {b.name}: {', '.join(parts) if parts else 'none'}")
    lines += list(self.notes)
    return "\n".join(lines)


def group_for(model) -> Group:
  """The symmetry group of a zoo model (a Flax module of qlhs_jax.models).

  Raises:
    NotImplementedError: for a module this package does not know, an Eq.(5) layout
      whose output groups do not follow the stream's channels, or an s-major QLHSNet
      (convert it to j-major first).
  """
  if isinstance(model, QLHSNet):
    if model.hidden_layout != "j_major":
      # The slots and the action index hidden channels as j*e + s.
      raise NotImplementedError(
          f"the symmetry tools expect hidden_layout='j_major', not "
          f"{model.hidden_layout!r}: convert the variables with qlhs_jax.models."
          "convert_hidden_layout(model, variables, to='j_major') and use "
          "model.clone(hidden_layout='j_major')")
    return _qlhs_group(model)
  if isinstance(model, ResNet):
    return _resnet_group(model)
  if isinstance(model, MobileNetV3Large):
    return _mobilenet_group(model)
  raise NotImplementedError(f"no symmetry group is declared for {type(model).__name__}; "
                            "group_for covers QLHSNet, ResNet and MobileNetV3Large")


def _qlhs_group(model: QLHSNet) -> Group:
  layout = model.block_layout()
  form, e = model.form, model.expansion
  n_stages = len(model.widths)
  kinds = [GL] * n_stages
  allows = [GL] * n_stages    # the same, from activations and the stem only
  # Per stage: reason -> blocks that cause it (one line per reason in describe()).
  why = [dict() for _ in range(n_stages)]

  def restrict(k, kind, reason, where=None, by_form=False):
    kinds[k] = meet(kinds[k], kind)
    if not by_form:
      allows[k] = meet(allows[k], kind)
    if kind != GL:
      why[k].setdefault(reason, [])
      if where:
        why[k][reason].append(where)

  restrict(0, POSMONO, "the stem's ReLU feeds it")
  for k, i, n_in, n_out, stride, act in layout:
    k_in = k - 1 if (k > 0 and i == 0) else k
    where = f"{k + 1}.{i}"
    if act != "none":
      restrict(k, ACTIVATION_KIND[act], f"{act} after block", where)
    if form in LITERAL_FORMS:
      restrict(k_in, MONO, f"{form}'s D reads it directly in block", where, True)
    if form in PRODUCT_WRITE_FORMS:
      restrict(k, MONO, f"{form}'s product writes it in block", where, True)
  if model.placement == "ds" and model.activation != "none":
    restrict(n_stages - 1, ACTIVATION_KIND[model.activation],
             f"{model.activation} before pooling")

  tied = [None] * n_stages
  blocks = []
  for k, i, n_in, n_out, stride, act in layout:
    k_in = k - 1 if (k > 0 and i == 0) else k
    h = e * n_in
    if form == "eq5" and k_in != k:
      # Hidden channel (j, s) feeds output (j*e + s) // g: the output permutation is
      # the input's, inflated by n_out / n_in.
      if n_out % n_in or (e * n_in) % n_out:
        raise NotImplementedError(
            f"eq5 block {k + 1}.{i}: {n_in} -> {n_out} channels, expansion {e}: the "
            "output groups do not follow the input channels; no group is declared")
      tied[k] = (k_in, n_out // n_in)
    lit = (k_in, e) if form in LITERAL_FORMS else None
    slots = {
        "eq3": [Slot("dout", h, TORUS, "D's output vs C", lit),
                Slot("prod", h, TORUS, "product vs A", lit)],
        "eq3w": [Slot("din", n_in, TORUS, "W's output vs D"),
                 Slot("dout", h, TORUS, "D's output vs C"),
                 Slot("prod", h, TORUS, "product vs A")],
        "eq4": [Slot("dout", h, TORUS, "D's output vs A", lit),
                Slot("prod", n_out, TORUS, "C vs A in the output product", (k, 1))],
        "eq5": [Slot("dout", h, TORUS, "D's output vs C", lit)],
        "eq6": [Slot("din", n_in, TORUS, "C's output vs D", (k_in, 1)),
                Slot("dout", h, TORUS, "D's output vs A", lit)],
        "eq7": [Slot("din", h, TORUS, "C's output vs D", lit),
                Slot("dout", h, TORUS, "D's output vs A", lit)],
    }[form]
    blocks.append(BlockSpec(f"stage{k + 1}_block{i}", k_in, k, tuple(slots),
                            (("form", form), ("expansion", e), ("n_out", n_out))))
  stages = tuple(
      Slot(f"stage{k + 1}", w, kinds[k],
           "; ".join(r + (" " + ", ".join(b) if b else "") for r, b in why[k].items()),
           tied=tied[k], allows=allows[k])
      for k, w in enumerate(model.widths))
  notes = ["Hidden tori: non-zero scalings (any sign) of one factor, compensated in the "
           "other or in the consumer (symmetry.md 1).",
           "Not declared: permutations of hidden channels that no stream permutation "
           "induces (discrete relabelings)."]
  if form in LITERAL_FORMS:
    notes.append(f"{form} reads the stream with D channel by channel, so every stream "
                 "read by a block is at most monomial; a stage read only by the head "
                 "keeps the group its activations allow (symmetry.md 2b).")
  return Group("qlhs", form, stages, tuple(blocks), tuple(notes))


def _resnet_group(model: ResNet) -> Group:
  # Slot 0 is the stem's output (it differs in width from stage 1's stream, so it is a
  # layer of its own); slot k + 1 is stage k + 1's stream.
  stages = [Slot("stem", model.widths[0], POSMONO, "ReLU (and max-pool) after the stem")]
  blocks = []
  for k, (width, depth) in enumerate(zip(model.widths, model.depths)):
    stages.append(Slot(f"stage{k + 1}", width * 4, POSMONO,
                       "ReLU after every residual add"))
    for i in range(depth):
      hidden = (Slot("h1", width, POSMONO, "ReLU after conv1"),
                Slot("h2", width, POSMONO, "ReLU after conv2"))
      blocks.append(BlockSpec(f"stage{k + 1}_block{i}", k if i == 0 else k + 1, k + 1,
                              hidden))
  return Group("resnet", None, tuple(stages), tuple(blocks),
               ("ReLU everywhere: every layer admits permutations and positive scalings "
                "only.",))


def _mobilenet_group(model: MobileNetV3Large) -> Group:
  stages = [Slot("segment0", LARGE_BLOCKS[0][3], PERM,
                 "hard-swish after the stem; block0's depthwise conv reads it")]
  blocks, width = [], 16
  for i, (kernel, stride, mid, out, se, act) in enumerate(LARGE_BLOCKS):
    seg_in = len(stages) - 1
    residual = stride == 1 and width == out
    if not residual:
      stages.append(Slot(f"segment{len(stages)}", out, GL,
                         "linear bottleneck: no activation on the stream"))
    seg_out = len(stages) - 1
    hidden = []
    if i > 0:  # block 0 has no expansion: its depthwise conv runs in segment 0's frame
      # ReLU blocks allow positive scalings (one per channel, shared by the expansion's
      # and the depthwise conv's outputs: a subgroup); hard-swish only permutations.
      hidden.append(Slot("mid", mid, POSMONO if act == "relu" else PERM,
                         f"{act} after the expansion and the depthwise conv"))
    if se:
      hidden.append(Slot("se", _se_width(mid), POSMONO, "ReLU in squeeze-excite"))
    blocks.append(BlockSpec(f"block{i}", seg_in, seg_out, tuple(hidden)))
    width = out
  return Group("mobilenetv3", None, tuple(stages), tuple(blocks),
               ("Streams are MobileNetV3's linear bottlenecks: GL(n) on every segment "
                "after the first (segment = run of blocks joined by identity shortcuts).",
                "Not declared: permutations of final_conv's and head_conv's channels."))


def _se_width(c: int) -> int:
  from qlhs_jax.models.mobilenetv3 import make_divisible
  return make_divisible(c * 0.25)

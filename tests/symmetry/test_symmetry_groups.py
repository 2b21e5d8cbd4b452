"""group_for: the declared groups, against symmetry.md, without compiling anything."""

import itertools

import pytest

from qlhs_jax.models import QLHSNet, registry
from qlhs_jax.symmetry import groups as G
from qlhs_jax.symmetry import group_for

from tests.symmetry.symmetry_helpers import TINY, tiny


def kinds(model):
  return [s.kind for s in group_for(model).stages]


def test_meet_is_the_intersection():
  allk = G.MATRIX_KINDS
  for a, b in itertools.product(allk, allk):
    assert G.meet(a, b) == G.meet(b, a)
    assert G.meet(a, G.meet(a, b)) == G.meet(a, b)
  assert G.meet(G.O, G.MONO) == G.SIGNPERM        # O(n) meets monomials in +-1
  assert G.meet(G.O, G.POSMONO) == G.PERM
  assert G.meet(G.SIGNPERM, G.POSMONO) == G.PERM
  assert G.meet(G.MONO, G.POSMONO) == G.POSMONO
  assert G.meet(G.GL, G.O) == G.O


@pytest.mark.parametrize("name,expected", [
    # stage 1 is fed by the stem's ReLU: positive monomial at most (symmetry.md 2).
    ("eq3w_none", [G.POSMONO, G.GL]),
    ("eq3w_softball_ds", [G.POSMONO, G.O]),
    # The literal Eq.(3): D reads every stream => monomial; O(n) shrinks to +-perms.
    ("eq3_softball_ds", [G.POSMONO, G.SIGNPERM]),
    ("eq3_hardball_ds", [G.POSMONO, G.SIGNPERM]),
    ("eq3_hardtanh_ds", [G.POSMONO, G.SIGNPERM]),
    ("eq3_relu_all", [G.POSMONO, G.POSMONO]),
    ("eq4_softball_ds", [G.POSMONO, G.SIGNPERM]),
])
def test_stream_groups(name, expected):
  assert kinds(tiny(name)) == expected


def test_activation_and_form_table():
  for form, act in itertools.product(("eq3", "eq3w"), ("none", "relu", "hardtanh")):
    got = kinds(QLHSNet(form=form, activation=act, placement="all", **TINY))
    want = {"none": G.GL if form == "eq3w" else G.MONO, "relu": G.POSMONO,
            "hardtanh": G.SIGNPERM}[act]
    assert got == [G.meet(G.POSMONO, want if act != "none" else G.GL), want], (form, act)


def test_stage_read_only_by_the_head_keeps_the_activation_group():
  """Quickstart layout (one block per stage): the last stream of the literal Eq.(3)
  is written by A and a shortcut and read only by the head, so O(n) holds exactly."""
  m = registry.create("eq3_softball_ds", widths=(4, 8, 16), depths=(1, 1, 1),
                      stem="small")
  assert kinds(m) == [G.POSMONO, G.SIGNPERM, G.O]
  # eq4 writes the stream with a channel-wise product: monomial even there.
  assert kinds(m.clone(form="eq4"))[-1] == G.SIGNPERM


def test_eq5_ties_permutations_across_stages():
  g = group_for(tiny("eq5_softball_ds"))
  assert g.stages[0].tied is None and g.stages[1].tied == (0, 2)
  with pytest.raises(NotImplementedError, match="eq5 block 2.0"):
    # 4 -> 6 channels, e = 3: output 1 sums hidden (0, 2) and (1, 0), two inputs.
    group_for(QLHSNet(form="eq5", expansion=3, widths=(4, 6), depths=(1, 1),
                      stem="small", num_classes=5))


def test_hidden_tori_and_dimension():
  g = group_for(tiny("eq3w_none"))
  blk = dict((b.name, b) for b in g.blocks)["stage2_block0"]
  assert [(s.name, s.size, s.kind) for s in blk.hidden] == [
      ("din", 4, G.TORUS), ("dout", 16, G.TORUS), ("prod", 16, G.TORUS)]
  # GL(8) on stage 2, positive diagonal on stage 1; tori 4+16+16 on the two blocks
  # reading 4 channels, 8+32+32 on the last.
  assert g.dimension == 64 + 4 + 36 + 36 + 72
  text = g.describe()
  assert "stage1 (4 ch): positive monomial" in text and "GL(n)" in text


def test_baselines_and_unknown_models():
  r = group_for(tiny("resnet50"))
  assert [s.kind for s in r.stages] == [G.POSMONO] * 3
  assert all(s.kind == G.POSMONO for b in r.blocks for s in b.hidden)
  mb = group_for(tiny("mobilenetv3_large_100"))
  assert [s.kind for s in mb.stages] == [G.PERM] + [G.GL] * 5   # linear bottlenecks
  assert dict((b.name, b) for b in mb.blocks)["block6"].hidden[0].kind == G.PERM
  with pytest.raises(NotImplementedError, match="Dense"):
    import flax.linen as nn
    group_for(nn.Dense(3))


def test_every_registered_model_has_a_group():
  for name in registry.names():
    assert group_for(tiny(name)).stages
  assert TINY["depths"] == (1, 2)

"""Symmetries of the folded models: groups, sampled elements, the action, checks and
lossless sparsification (design/symmetry.md)."""

from qlhs_jax.symmetry.action import act
from qlhs_jax.symmetry.elements import Element, compose, identity, inverse, sample
from qlhs_jax.symmetry.groups import Group, Slot, group_for
from qlhs_jax.symmetry.measure import check, deviation, prepare

__all__ = ["Element", "Group", "Slot", "act", "check", "compose", "deviation",
           "group_for", "identity", "inverse", "prepare", "sample"]

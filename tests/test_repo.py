"""Repository-level promises: CI runs the README's test command, configs load and say
how to run them."""

import glob
import importlib.util
import os
import re

import pytest

from qlhs_jax import config as qconfig
from qlhs_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_lines():
  text = open(os.path.join(REPO, "README.md")).read()
  block = re.search(r"## Quickstart\n\n```\n(.*?)```", text, re.S).group(1)
  return [l for l in block.splitlines() if l.strip()]


def test_quickstart_is_three_lines_and_ci_runs_its_test_command():
  lines = quickstart_lines()
  assert len(lines) == 3
  assert lines[0].startswith("pip install") and "qlhs_jax.main" in lines[1]
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  assert lines[2] in ci.splitlines(), (lines[2], "is not a line of .ci/run")


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_files_load_validate_and_document(path):
  mod = _load(path)
  doc = mod.__doc__ or ""
  name = os.path.basename(path)
  assert f"python -m qlhs_jax.main --config=configs/{name}" in doc
  assert re.search(r"Hardware|hardware", doc) and re.search(r"[Ee]xpect", doc)
  variants = getattr(mod, "VARIANTS", {None: None})
  for v in variants:
    c = mod.get_config(v)
    qconfig.validate(c)
    assert c.model in registry.names()
    if name != "quickstart.py":
      meta = registry.info(c.model)
      if meta.paper_top1:
        assert str(meta.paper_top1) in doc, (name, meta.paper_top1)
      q = mod.get_config(f"{v},quickstart" if v else "quickstart")
      assert q.data.name == "digits" and q.model == c.model


def test_config_argument_errors():
  mod = _load(os.path.join(REPO, "configs", "eq3.py"))
  with pytest.raises(ValueError, match="unknown variant 'softbal_ds'"):
    mod.get_config("softbal_ds")
  with pytest.raises(ValueError, match="one variant at most.*'hardball_ds' is neither"):
    mod.get_config("softball_ds,hardball_ds")
  eq4 = _load(os.path.join(REPO, "configs", "eq4.py"))
  with pytest.raises(ValueError, match=r"takes no 'dot_forms' \(its options: "
                     r"\['quickstart'\]\).*configs/eq3.py, eq3w.py, eq5.py"):
    eq4.get_config("dot_forms")
  q = _load(os.path.join(REPO, "configs", "quickstart.py"))
  with pytest.raises(ValueError, match="unknown model"):
    q.get_config("eq9")


FUSED_CONFIGS = ("eq3.py", "eq3w.py", "eq5.py")


@pytest.mark.parametrize("name", FUSED_CONFIGS)
def test_the_dot_forms_option_sets_the_stacked_kernels(name):
  """``,dot_forms`` sets config.kernels to the stack gpu_h100.sh's dot_forms times, and
  nothing else: the readers then give the stacked forms (the same keys under use() as
  the benchmark's QLHS_... variables), with and without quickstart; the docstring says
  how to ask for it."""
  from qlhs_jax.kernels import d_bn_product, settings
  mod = _load(os.path.join(REPO, "configs", name))
  assert f"configs/{name}:softball_ds,dot_forms" in mod.__doc__
  plain = mod.get_config("softball_ds")
  assert not any(plain.kernels.values())  # the defaults: every key empty
  for arg in ("softball_ds,dot_forms", "dot_forms,softball_ds,quickstart", "dot_forms"):
    c = mod.get_config(arg)
    qconfig.validate(c)
    assert c.model == plain.model
    assert {k: v for k, v in c.kernels.items() if v} == settings.DOT_FORMS
    assert (c.data.name == "digits") == ("quickstart" in arg)
    with settings.use(c.kernels):
      assert d_bn_product.product_form() == "pallas_dot"
      assert (d_bn_product.c_form(), d_bn_product.dp_form(), d_bn_product.weight_grads(),
              d_bn_product.du_sum(), d_bn_product.p_form()) == (
                  "kernels_wide", "kernels", "pass4", "kernel", "kernels")
  # Nothing but those keys differs from the plain config (and they may change when a
  # run resumes, as the device may: runtime keys).
  a, b = qconfig.flatten(plain), qconfig.flatten(mod.get_config("softball_ds,dot_forms"))
  diff = {k for k in a if a[k] != b[k]}
  assert diff == {f"kernels.{k}" for k in settings.DOT_FORMS} and set(a) == set(b)
  assert diff <= qconfig.RUNTIME_KEYS

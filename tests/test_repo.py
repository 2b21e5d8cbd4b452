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
  q = _load(os.path.join(REPO, "configs", "quickstart.py"))
  with pytest.raises(ValueError, match="unknown model"):
    q.get_config("eq9")

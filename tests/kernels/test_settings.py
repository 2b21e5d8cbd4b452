"""config.kernels: each key reaches its reader, falls back on its QLHS_* variable, and
bad or clashing values are refused by name."""

import os
import pathlib
import re

import pytest

from qlhs_jax import config as qconfig
from qlhs_jax.kernels import d_bn_product, eq3_block, settings, stencil
from qlhs_jax.models import common

PACKAGE = pathlib.Path(qconfig.__file__).parent

def _with_dot_products(reader, **needs):
  """``reader`` (``d_bn_product.c_form``, ``dp_form``, ``weight_grads`` or ``p_form``)
  where the
  product's dot form, which "kernels" needs, is asked for, and ``needs``' variables set
  (by their variables, set for the call)."""
  def read():
    env = dict(needs, QLHS_PRODUCT_FORM="pallas_dot")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
      return reader()
    finally:
      for k, v in saved.items():
        os.environ.pop(k)
        if v is not None:
          os.environ[k] = v
  return read


# key -> (a value other than the default, the reader, what it returns for that value,
# what it returns with neither the key nor the variable set).
READERS = {
    "stats_form": ("pallas_gram", lambda: d_bn_product.stats_form(4), "pallas_gram",
                   "xla"),
    "sums_form": ("pallas", lambda: d_bn_product.sums_form(4), "pallas", "xla"),
    "du_form": ("autodiff", lambda: d_bn_product.du_form(4), "autodiff", "gather"),
    "product_form": ("pallas", d_bn_product.product_form, "pallas", "xla"),
    "dc_pass": ("sums", d_bn_product.dc_pass, "sums", "dx"),
    "d_kernel": ("compute", d_bn_product.d_kernel, "compute", "float32"),
    "d_taps": ("copy", d_bn_product.d_taps, "copy", "pad"),  # "auto": "pad" on a CPU
    "c_form": ("kernels", _with_dot_products(d_bn_product.c_form), "kernels", "stored"),
    "dp_form": ("kernels", _with_dot_products(d_bn_product.dp_form), "kernels",
                "stored"),
    "weight_grads": ("pass4", _with_dot_products(d_bn_product.weight_grads,
                                                 QLHS_C_FORM="kernels",
                                                 QLHS_DP_FORM="kernels"), "pass4", "xla"),
    "du_sum": ("kernel", d_bn_product.du_sum, "kernel", "xla"),
    "p_form": ("kernels", _with_dot_products(d_bn_product.p_form, QLHS_C_FORM="kernels",
                                             QLHS_DP_FORM="kernels",
                                             QLHS_WEIGHT_GRADS="pass4"), "kernels",
               "stored"),
    "bn_stats": ("two", common.bn_stats_form, "two", "one"),
    "stem_grad": ("classes", common.stem_grad_form, "classes", "pass"),
    "stem_taps": ("pad", common.stem_taps_form, "pad", "margin"),
    "stencil_grid": ("channels", stencil.grid_order, "channels", "pixels"),
    "stencil_rows": ("du,sums", stencil.rows_kernels, ("du", "sums"), ()),
    "tap_copy": ("l1", stencil.tap_copy, "l1", "widest"),
    "stencil_tiling": ("du=16,8,2", lambda: stencil.tiling("du"), (16, 8, 2),
                       stencil.DEFAULT_TILING["du"]),
    "pallas_tiling": ("2,4096,8", d_bn_product.tiling, (2, 4096, 8, 0, 1),
                      d_bn_product.DEFAULT_TILING),
    "block_tiling": ("64,8", eq3_block.tiling, (64, 8), eq3_block.DEFAULT_TILING),
}


@pytest.fixture(autouse=True)
def _no_variables(monkeypatch):
  for var in settings.VARIABLES.values():
    monkeypatch.delenv(var, raising=False)


def test_the_table_covers_every_key():
  assert set(READERS) == set(settings.VARIABLES) == set(qconfig.base_config().kernels)


@pytest.mark.parametrize("key", sorted(READERS))
def test_each_key_reaches_its_reader_inside_use_only(key, monkeypatch):
  value, read, meant, default = READERS[key]
  assert read() == default
  with settings.use({key: value}):
    assert read() == meant
    assert settings.name(settings.VARIABLES[key]) == f"config.kernels.{key}"
  assert read() == default  # the context is left as it was
  # An empty key falls back on the variable, which names itself.
  monkeypatch.setenv(settings.VARIABLES[key], value)
  with settings.use({key: ""}):
    assert read() == meant
    assert settings.name(settings.VARIABLES[key]) == settings.VARIABLES[key]
  with settings.use({key: value}):  # both, agreeing
    assert read() == meant


def test_a_key_and_its_variable_that_disagree_are_refused(monkeypatch):
  monkeypatch.setenv("QLHS_STATS_FORM", "xla")
  with pytest.raises(ValueError, match=r"config.kernels.stats_form='pallas' but "
                                       r"QLHS_STATS_FORM='xla' in the environment: "
                                       r"unset"):
    with settings.use({"stats_form": "pallas"}):
      pass
  monkeypatch.setenv("QLHS_STATS_FORM", "")  # set but empty means unset
  with settings.use({"stats_form": "pallas_gram"}):
    assert d_bn_product.stats_form(4) == "pallas_gram"
  with pytest.raises(ValueError, match=r"config.kernels has no key\(s\) \['stats'\]"):
    with settings.use({"stats": "pallas"}):
      pass


def test_chosen_names_what_is_set_and_leaves_out_the_defaults(monkeypatch):
  """The launch record's kernel settings (train.launch_record)."""
  assert settings.chosen() == {}
  monkeypatch.setenv("QLHS_DU_FORM", "autodiff")
  monkeypatch.setenv("QLHS_DC_PASS", "")  # set but empty: unset, as for get
  assert settings.chosen() == {"du_form": "autodiff"}
  with settings.use({"bn_stats": "two", "du_form": "", "sums_form": ""}):
    assert settings.chosen() == {"bn_stats": "two", "du_form": "autodiff"}
  assert settings.chosen() == {"du_form": "autodiff"}


def test_the_context_is_left_after_an_error():
  with pytest.raises(RuntimeError):
    with settings.use({"bn_stats": "two"}):
      raise RuntimeError("inside")
  assert common.bn_stats_form() == "one"
  with pytest.raises(KeyError, match="QLHS_PALLAS_INTERPRET is not a kernel setting"):
    settings.get("QLHS_PALLAS_INTERPRET")


# A bad value of every key, and the message that refuses it (by its key).
BAD_VALUES = [
    ("stats_form", "fast", r"config.kernels.stats_form='fast': choose one of \('xla', "
                           r"'pallas', 'pallas_gram', 'pallas_dot', 'auto'\)"),
    ("sums_form", "fast", r"config.kernels.sums_form='fast': choose one of \('xla', "
                          r"'pallas', 'pallas_xhat', 'pallas_dot', 'auto'\)"),
    ("du_form", "pallas_gram", r"config.kernels.du_form='pallas_gram': choose one of"),
    ("product_form", "auto", r"config.kernels.product_form='auto': choose one of "
                             r"\('xla', 'pallas', 'pallas_dot'\)"),
    ("dc_pass", "pass4", r"config.kernels.dc_pass='pass4'"),
    ("d_kernel", "bfloat16", r"config.kernels.d_kernel='bfloat16': choose one of "
                             r"\('float32', 'compute'\)"),
    ("d_taps", "margin", r"config.kernels.d_taps='margin': choose one of \('auto', "
                         r"'copy', 'pad'\)"),
    ("c_form", "recompute", r"config.kernels.c_form='recompute': choose one of "
                            r"\('stored', 'kernels', 'kernels_wide'\)"),
    ("c_form", "kernels", r"config.kernels.c_form='kernels' makes c = C u inside the "
                          r"matrix-product kernels of product_form 'pallas_dot', but "
                          r"QLHS_PRODUCT_FORM gives 'xla': set product_form='pallas_dot'"),
    ("dp_form", "made", r"config.kernels.dp_form='made': choose one of "
                        r"\('stored', 'kernels'\)"),
    ("dp_form", "kernels", r"config.kernels.dp_form='kernels' makes dp = dy A\^T inside "
                           r"the matrix-product kernels of product_form 'pallas_dot', "
                           r"but QLHS_PRODUCT_FORM gives 'xla': set "
                           r"product_form='pallas_dot'"),
    ("weight_grads", "matmuls", r"config.kernels.weight_grads='matmuls': choose one of "
                                r"\('xla', 'pass4'\)"),
    ("weight_grads", "pass4", r"config.kernels.weight_grads='pass4' sums C's and A's "
                              r"gradients in pass 4's kernel, which needs c and dp made "
                              r"there: set c_form='kernels' and dp_form='kernels'"),
    ("du_sum", "shortcut", r"config.kernels.du_sum='shortcut': choose one of "
                           r"\('xla', 'kernel'\)"),
    ("p_form", "made", r"config.kernels.p_form='made': choose one of "
                       r"\('stored', 'kernels'\)"),
    ("p_form", "kernels", r"config.kernels.p_form='kernels' applies A inside the "
                          r"product's kernel, which needs A's gradient summed in pass 4"),
    ("bn_stats", "three", r"config.kernels.bn_stats='three': choose one of \('one', "
                          r"'two'\)"),
    ("stem_grad", "stack", r"config.kernels.stem_grad='stack': choose one of \('pass', "
                           r"'classes'\)"),
    ("stem_taps", "edge", r"config.kernels.stem_taps='edge': choose one of \('margin', "
                          r"'pad'\)"),
    ("stencil_grid", "rows", r"config.kernels.stencil_grid='rows'"),
    ("stencil_rows", "lags", r"config.kernels.stencil_rows='lags': want 'all' or"),
    ("tap_copy", "l2", r"config.kernels.tap_copy='l2': choose one of \('widest', "
                       r"'l1'\)"),
    ("stencil_tiling", "du=15,8,2", r"config.kernels.stencil_tiling='du=15,8,2': entry "
                                    r"'du=15,8,2' is not valid"),
    ("pallas_tiling", "4,8192", r"config.kernels.pallas_tiling='4,8192': want"),
    ("block_tiling", "64", r"config.kernels.block_tiling='64': entry '64' is not valid"),
]


def test_every_key_has_a_bad_value_that_validate_refuses():
  """A new key whose reader ``settings.check`` does not call would pass validate with
  any value (QLHS_DU_SUM did, until it was added to both)."""
  assert {key for key, _, _ in BAD_VALUES} == set(settings.VARIABLES)


@pytest.mark.parametrize("key,value,message", BAD_VALUES)
def test_validate_refuses_a_bad_value_by_its_key(key, value, message):
  c = qconfig.base_config()
  c.kernels[key] = value
  with pytest.raises(ValueError, match=message):
    qconfig.validate(c)
  c.kernels[key] = ""
  qconfig.validate(c)  # the default config passes


def test_the_kernel_keys_may_change_on_resume_and_nothing_else_did():
  saved = qconfig.flatten(qconfig.base_config())
  current = qconfig.base_config()
  current.kernels.product_form = "pallas"
  current.kernels.stencil_tiling = "du=16,8,2"
  assert qconfig.differences(saved, qconfig.flatten(current)) == []
  current.momentum = 0.8  # what the run computes still counts
  assert qconfig.differences(saved, qconfig.flatten(current)) == ["momentum"]
  # A config.json written before config.kernels existed resumes too.
  old = {k: v for k, v in saved.items() if not k.startswith("kernels.")}
  assert qconfig.differences(old, qconfig.flatten(current)) == ["momentum"]


def test_every_variable_is_read_through_settings():
  """Each variable of the table is read by some module through ``settings.get`` (or
  ``settings.choice``, which calls it), and no module reads one of them from os.environ
  directly (which config.kernels would miss)."""
  sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")
             if p.name != "settings.py" and "benchmarks" not in p.parts}
  read = set()
  for path, text in sources.items():
    read |= set(re.findall(r'settings\.(?:get|choice)\("(QLHS_\w+)"', text))
    for var in settings.VARIABLES.values():
      assert not re.search(rf'environ(\.get\(|\[)"{var}"', text), (path, var)
  # _form reads the three form variables through its argument, _made_in_dot_kernels
  # the forms of the tensors made in the dot kernels.
  dbn = sources[PACKAGE / "kernels" / "d_bn_product.py"]
  read |= {"QLHS_STATS_FORM", "QLHS_SUMS_FORM", "QLHS_DU_FORM"} & set(
      re.findall(r'_form\("(QLHS_\w+)"', dbn))
  read |= {"QLHS_C_FORM", "QLHS_DP_FORM"} & set(
      re.findall(r'_made_in_dot_kernels\("(QLHS_\w+)"', dbn))
  assert read == set(settings.VARIABLES.values())

"""benchmarks/gpu_h100.sh, the script of the GPU session, checked on the CPU in seconds.

A GPU session is drawn by chance and lasts 15 minutes, so a flag renamed in a benchmark
module or a model field the script sets that no longer exists would only show there, and
cost the run. Its whole CPU smoke run (the command in its header) takes ~14 minutes on 2
cores, too long for the suite; these tests check what it calls instead: the bash syntax,
every flag it passes to each ``python3 -m qlhs_jax.benchmarks.X`` (also through the
``bench``/``fused_op`` helpers and the smoke run's FUSED_ARGS/TUNE_ARGS/STENCIL_ARGS)
against that module's own parser, and each model and ``--set`` override it times against
the models.
"""

import os
import re
import shlex
import subprocess

import jax
import jax.numpy as jnp
import pytest

from qlhs_jax.benchmarks import block_check, block_tune, erase_fill, fused
from qlhs_jax.benchmarks import input as input_bench
from qlhs_jax.benchmarks import stencil_times, step
from qlhs_jax.models import registry

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu_h100.sh")
MAINS = {"step": step.main, "block_tune": block_tune.main, "block_check": block_check.main,
         "fused": fused.main, "stencil_times": stencil_times.main,
         "input": input_bench.main, "erase_fill": erase_fill.main}
# (benchmarks.table takes no flags: one results file)
HELPERS = {"bench": "step", "fused_op": "fused"}  # shell functions: NAME SECONDS ARGS...
# Values the script computes on the GPU; stand-ins of the right kind.
SHELL_VALUES = {"width": "128", "w": "64", "t": "4,4096,4,16", "H": "/tmp/hlo",
                "OUT": "/tmp/out", "R": "/tmp/r.jsonl"}


def _text():
  with open(SCRIPT) as f:
    return f.read()


def _commands():
  """``(module, [argument, ...])`` for each call of a benchmark module in the script."""
  out = []
  lines = [ln for ln in _text().replace("\\\n", " ").splitlines()
           if not ln.lstrip().startswith("#")]
  for line in lines:
    for m in re.finditer(r"python3 -m qlhs_jax\.benchmarks\.(\w+)(.*)", line):
      out.append((m.group(1), _args(m.group(2))))
    words = line.split()
    at = 0
    while at < len(words) and re.fullmatch(r"[A-Z_]+=\S*", words[at]):  # VAR=... helper
      at += 1
    if at < len(words) and words[at] in HELPERS:
      out.append((HELPERS[words[at]], _args(" ".join(words[at + 2:]))))
  # The CPU smoke run in the header passes these to fused, block_tune and stencil_times.
  header = re.sub(r"\n#\s*", " ", _text())  # the comment's lines joined
  for var, module in (("FUSED_ARGS", "fused"), ("TUNE_ARGS", "block_tune"),
                      ("STENCIL_ARGS", "stencil_times")):
    for m in re.finditer(var + r'="([^"]*)"', header):
      out.append((module, _args(m.group(1))))
  return out


def _args(rest):
  """The module's own arguments: up to the redirection or pipe, shell variables given
  stand-in values, "$@" and ${VAR:-default} expansions left out (they are checked where
  they are set)."""
  rest = re.split(r"2>&1|[|>)]", rest)[0]
  rest = re.sub(r"\$(\w+)\b", lambda m: SHELL_VALUES.get(m.group(1), m.group(0)), rest)
  words = shlex.split(rest)
  return [w for w in words if w != "$@" and not w.startswith("${") and not w.startswith("$(")]


def _option_strings(module, capsys):
  with pytest.raises(SystemExit) as exit_:
    MAINS[module](["--help"])
  assert exit_.value.code == 0
  return set(re.findall(r"(--[a-z][a-z0-9-]*)", capsys.readouterr().out))


def test_the_script_is_valid_bash():
  result = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_every_flag_the_script_passes_is_one_its_module_takes(capsys):
  commands = _commands()
  # All seven modules and both helpers are found: a parser that missed them would pass.
  assert {m for m, _ in commands} == {*MAINS, "table"}, commands
  assert sum(m == "step" for m, _ in commands) >= 9, commands
  for module, args in commands:
    known = _option_strings(module, capsys) if module in MAINS else set()
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    assert flags <= known, f"gpu_h100.sh passes {sorted(flags - known)} to {module}: {args}"


def test_the_flag_check_catches_a_renamed_flag(capsys):
  assert "--budget" in _option_strings("block_tune", capsys)
  assert "--budget-s" not in _option_strings("block_tune", capsys)


def _step_rows():
  """``(model, overrides)`` for each train step the script times, --vs models included,
  read with benchmarks.step's own parser."""
  rows = []
  for module, args in _commands():
    if module != "step" or "--model" not in args:  # bench's own call: "$@" left out
      continue
    a = step.parser().parse_args(args)
    rows.append((a.model, step._parse_overrides(a.set)))
    if a.vs:
      rows.append((a.vs, step._parse_overrides(a.vs_set)))
  return rows


def test_every_model_and_override_the_script_times_builds():
  """Each model with its --set fields traced at 32 px (shapes only, no compilation): an
  unknown model, a field the model lost or a value it no longer takes fails here."""
  rows = _step_rows()
  assert ("eq3_softball_ds", {"fuse_d_bn": "block", "block_max_width": 128}) in rows, rows
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  for name, overrides in rows:
    model = registry.create(name, **overrides)
    jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x, train=True))


def test_a_bad_override_fails_the_build_check():
  model = registry.create("eq3_softball_ds", fuse_d_bn="blok")
  with pytest.raises(ValueError, match="blok"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                      train=True))


def _settings_before(line, helper):
  """The ``QLHS_...=value`` words a call of ``helper`` in ``line`` sets."""
  words = line.split()
  return dict(w.split("=", 1) for w in words[:words.index(helper)] if w.startswith("QLHS_"))


def test_the_stack_it_times_and_checks_is_the_configs_dot_forms_option():
  """dot_forms' last row (the opt-in kernels stacked) and c_kernels' check of their
  values on the device set what the configs' ``,dot_forms`` option sets
  (settings.DOT_FORMS): a row timed for another stack would not say how that option
  trains."""
  from qlhs_jax.kernels import settings
  want = {settings.VARIABLES[k]: v for k, v in settings.DOT_FORMS.items()}
  text = _text().replace("\\\n", " ")
  check = next(ln for ln in text.splitlines() if "fused_op 120 --weights --check-only" in ln)
  assert _settings_before(check, "fused_op") == want
  part = text[text.index('if [ "$PART" = dot_forms ]'):]
  part = part[:part.index("\nfi\n")]
  last = re.search(r"for forms in ([^;]*);", part).group(1).split()[-1]
  row = next(ln for ln in part.splitlines() if " bench " in ln and "QLHS_C_FORM" in ln)
  got = _settings_before(row, "bench")
  names = ("QLHS_C_FORM", "QLHS_DP_FORM", "QLHS_WEIGHT_GRADS", "QLHS_DU_SUM",
           "QLHS_P_FORM")
  assert [got[n] for n in names] == ["$c_form", "$dp_form", "$grads", "$du_sum",
                                     "$p_form"]
  got.update(zip(names, last.split(",")))
  assert got == want


def test_the_ablation_drops_one_piece_of_the_stack_a_row():
  """"ablate"'s first row is the configs' ``,dot_forms`` stack (settings.DOT_FORMS), and
  each later row differs from it in its named piece alone (weight_grads also turns
  p_form off, which needs it), each a setting that validate accepts: a row that silently
  timed another stack, or one refused at trace time, would waste device time."""
  from qlhs_jax.kernels import settings
  want = {settings.VARIABLES[k]: v for k, v in settings.DOT_FORMS.items()}
  text = _text().replace("\\\n", " ")
  part = text[text.index('if [ "$PART" = ablate ]'):]
  part = part[:part.index("\nfi\n")]
  rows = re.search(r"for forms in ([^;]*);", part).group(1).split()
  line = next(ln for ln in part.splitlines() if " bench " in ln)
  got = _settings_before(line, "bench")
  names = ("QLHS_WEIGHT_GRADS", "QLHS_DU_SUM", "QLHS_P_FORM")
  assert [got[n] for n in names] == ["$grads", "$du_sum", "$p_form"]
  stacks = [dict(got, **dict(zip(names, row.split(",")))) for row in rows]
  assert stacks[0] == want
  dropped = [{k for k in want if s[k] != want[k]} for s in stacks[1:]]
  assert dropped == [{"QLHS_P_FORM"}, {"QLHS_DU_SUM"},
                     {"QLHS_WEIGHT_GRADS", "QLHS_P_FORM"}], dropped
  key = {v: k for k, v in settings.VARIABLES.items()}
  for s in stacks:
    settings.check({key[v]: value for v, value in s.items()})


def test_the_tiles_part_times_the_stack_at_valid_tilings(monkeypatch):
  """"tiles" times the configs' ``,dot_forms`` stack (settings.DOT_FORMS) in every row,
  first as it is (its tap copies, no QLHS_STENCIL_TILING), then each row differing in
  one thing: a tiling the kernels accept that differs from today's defaults, or the
  other tap copy. A refused value would fail on the GPU, one equal to the default would
  time the first row twice."""
  from qlhs_jax.kernels import settings, stencil
  want = {settings.VARIABLES[k]: v for k, v in settings.DOT_FORMS.items()}
  text = _text().replace("\\\n", " ")
  part = text[text.index('if [ "$PART" = tiles ]'):]
  part = part[:part.index("\nfi\n")]
  rows = re.findall(r'"([^"]*)"', re.search(r"for row in ([^;]*);", part).group(1))
  assert 'IFS=: read -r taps spec <<< "$row"' in part
  line = next(ln for ln in part.splitlines() if " bench " in ln)
  got = _settings_before(line, "bench")
  assert got.pop("QLHS_STENCIL_TILING") == '"$spec"'
  assert got.pop("QLHS_TAP_COPY") == "$taps"
  assert dict(got, QLHS_TAP_COPY=want["QLHS_TAP_COPY"]) == want
  rows = [row.split(":") for row in rows]
  assert rows[0] == [want["QLHS_TAP_COPY"], ""] and len(rows) == 4
  assert len({tuple(r) for r in rows}) == len(rows), rows  # none timed twice
  # the stack's D kernel is one part (QLHS_D_KERNEL=compute): its tiles' defaults
  assert want["QLHS_D_KERNEL"] == "compute"
  defaults = dict(stencil.DEFAULT_TILING, **stencil.ONE_PART_TILING)
  for taps, spec in rows[1:]:
    assert (taps != want["QLHS_TAP_COPY"]) != bool(spec), (taps, spec)  # one change
    monkeypatch.setenv("QLHS_TAP_COPY", taps)
    assert stencil.tap_copy() == taps
    monkeypatch.setenv("QLHS_STENCIL_TILING", spec)
    for entry in spec.split():
      kernel, value = entry.split("=")
      tiles = stencil.tiling(kernel)
      assert tiles == tuple(int(v) for v in value.split(","))
      assert tiles != defaults[kernel], entry

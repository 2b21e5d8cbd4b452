"""Multiply-add contraction for the GPU kernels (qlhs_jax.xla_options): the XLA_FLAGS it
writes, when it acts, the config key and variable, and (where JAX's CUDA plugin and
Triton are installed) that the option reaches the machine code XLA compiles for an
H100: fused multiply-adds in XLA's own fusions and in a Pallas kernel."""

import glob
import importlib.util
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from qlhs_jax import config as qconfig
from qlhs_jax import xla_options as xo
from tests.benchmarks.test_aot import HAS_CUDA_PLUGIN

OPTION = "--xla_backend_extra_options=-nvptx-fma-level=1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.parametrize("flags, want", [
    ("", OPTION),
    ("--xla_dump_to=/tmp/d", "--xla_dump_to=/tmp/d " + OPTION),
    # the user's own LLVM options keep theirs and gain ours
    ("--xla_backend_extra_options=-foo=2 --xla_dump_to=D",
     "--xla_backend_extra_options=-foo=2,-nvptx-fma-level=1 --xla_dump_to=D"),
    ("--xla_backend_extra_options=", OPTION),
    # a level the user chose stands, off included
    ("--xla_backend_extra_options=-nvptx-fma-level=0",
     "--xla_backend_extra_options=-nvptx-fma-level=0"),
    ("--xla_backend_extra_options=-a=1,-nvptx-fma-level=2",
     "--xla_backend_extra_options=-a=1,-nvptx-fma-level=2"),
])
def test_the_option_joins_xla_flags(flags, want):
  assert xo.with_fma(flags) == want


@pytest.mark.parametrize("flags, on", [
    ("", False), (OPTION, True), ("--xla_backend_extra_options=-nvptx-fma-level=0", False),
    ("--xla_backend_extra_options=-x=1,-nvptx-fma-level=2", True),
])
def test_fma_in_flags(flags, on):
  assert xo.fma_in_flags(flags) is on


def _fake_cuda_plugin(tmp_path, monkeypatch):
  """A jax_plugins.xla_cuda12 on sys.path (jax_plugins is a namespace package)."""
  (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
  (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))


def test_it_acts_only_where_jax_may_use_an_nvidia_gpu(tmp_path, monkeypatch):
  if not HAS_CUDA_PLUGIN:
    assert not xo.cuda_possible({})  # CPU-only JAX: nothing to do
  _fake_cuda_plugin(tmp_path, monkeypatch)
  assert xo.cuda_possible({})
  assert xo.cuda_possible({"JAX_PLATFORMS": "cuda,cpu"})
  assert xo.cuda_possible({"JAX_PLATFORMS": "gpu"})
  assert not xo.cuda_possible({"JAX_PLATFORMS": "cpu"})
  assert not xo.cuda_possible({"JAX_PLATFORMS": "tpu,cpu"})


def test_request_writes_xla_flags_before_jax_starts(monkeypatch, caplog):
  monkeypatch.setattr(xo, "cuda_possible", lambda environ=None: True)
  monkeypatch.setattr(xo, "backends_started", lambda: False)
  monkeypatch.setattr(xo, "cpu_backend_accepts", lambda option=xo.FMA_OPTION: True)
  env = {"XLA_FLAGS": "--xla_dump_to=D"}
  assert xo.request_fma(True, env) is True
  assert env["XLA_FLAGS"] == "--xla_dump_to=D " + OPTION
  assert xo.request_fma(True, env) is True  # once is enough
  assert env["XLA_FLAGS"] == "--xla_dump_to=D " + OPTION
  off = {"XLA_FLAGS": "--xla_dump_to=D"}
  assert xo.request_fma(False, off) is False and off == {"XLA_FLAGS": "--xla_dump_to=D"}
  # Too late: a started backend has read XLA_FLAGS; it says so and leaves them.
  monkeypatch.setattr(xo, "backends_started", lambda: True)
  late = {}
  with caplog.at_level(logging.WARNING, logger="qlhs_jax.xla_options"):
    assert xo.request_fma(True, late) is False
  assert late == {}
  assert "before any JAX computation" in caplog.text and OPTION in caplog.text
  # A level the user set, off included, stands, with no warning.
  caplog.clear()
  mine = {"XLA_FLAGS": "--xla_backend_extra_options=-nvptx-fma-level=0"}
  with caplog.at_level(logging.WARNING, logger="qlhs_jax.xla_options"):
    assert xo.request_fma(True, dict(mine)) is False
  assert caplog.text == ""
  # No GPU backend possible: nothing changes.
  monkeypatch.setattr(xo, "cuda_possible", lambda environ=None: False)
  monkeypatch.setattr(xo, "backends_started", lambda: False)
  cpu = {}
  assert xo.request_fma(True, cpu) is False and cpu == {}


def test_the_variable_is_on_unless_zero_and_refuses_other_values():
  assert xo.env_setting({}) is True
  assert xo.env_setting({"QLHS_XLA_FMA": "1"}) is True
  assert xo.env_setting({"QLHS_XLA_FMA": "0"}) is False
  with pytest.raises(ValueError, match=r"QLHS_XLA_FMA='yes'.*set 1.*or 0"):
    xo.env_setting({"QLHS_XLA_FMA": "yes"})


def test_config_key_is_a_runtime_bool_that_must_agree_with_the_variable(monkeypatch):
  monkeypatch.delenv("QLHS_XLA_FMA", raising=False)
  c = qconfig.base_config()
  assert c.xla_fma is True and "xla_fma" in qconfig.RUNTIME_KEYS
  qconfig.validate(c)
  monkeypatch.setenv("QLHS_XLA_FMA", "0")
  with pytest.raises(ValueError, match=r"config.xla_fma=True but QLHS_XLA_FMA='0'.*unset"):
    qconfig.validate(c)
  c.xla_fma = False
  qconfig.validate(c)


def test_the_option_is_set_only_where_the_cpu_backend_accepts_it(monkeypatch, caplog):
  """The option is NVPTX's, and JAX starts its CPU backend beside the GPU's. Where this
  JAX's CPU backend, given the option, still compiles and runs (jaxlib 0.11.2, 0.12.0.1),
  request_fma sets it; where it exits instead (0.12.1: an unknown LLVM option), it
  leaves XLA_FLAGS alone and says why."""
  code = "import jax.numpy as j; print(float(j.dot(j.arange(4.0), j.arange(4.0) + 1)))"
  env = dict(os.environ, XLA_FLAGS=OPTION, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  accepts = p.returncode == 0 and p.stdout.strip() == "20.0"
  if not accepts:
    assert "Unknown command line argument '-nvptx-fma-level=1'" in p.stderr, p.stderr[-2000:]
  xo.cpu_backend_accepts.cache_clear()
  assert xo.cpu_backend_accepts() is accepts
  monkeypatch.setattr(xo, "cuda_possible", lambda environ=None: True)
  monkeypatch.setattr(xo, "backends_started", lambda: False)
  env = {"XLA_FLAGS": "--xla_dump_to=D"}
  with caplog.at_level(logging.WARNING, logger="qlhs_jax.xla_options"):
    assert xo.request_fma(True, env) is accepts
  assert env["XLA_FLAGS"] == ("--xla_dump_to=D " + OPTION if accepts else "--xla_dump_to=D")
  assert ("CPU backend" in caplog.text) is not accepts
  # Either way, a refusing backend leaves the flags alone.
  monkeypatch.setattr(xo, "cpu_backend_accepts", lambda option=xo.FMA_OPTION: False)
  env = {}
  assert xo.request_fma(True, env) is False and env == {}


_COMPILE = textwrap.dedent("""
    import functools, numpy as np
    from qlhs_jax import xla_options
    xla_options.request_from_env()
    from qlhs_jax.benchmarks import aot
    from qlhs_jax.kernels import stencil
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, SingleDeviceSharding
    dev = aot.compile_only_device()
    sh = SingleDeviceSharding(dev)
    s = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    # XLA's own loop fusion of a * b + c, and the Pallas du kernel's multiply-adds
    jax.jit(lambda a, b, c: a * b + c).lower(
        s((4096,)), s((4096,)), s((4096,))).compile()
    du = jax.jit(lambda dx, k: stencil.d_transpose(dx, k, 1, (8, 8), interpret=False))
    with aot.pallas_for_gpu(), jax.set_mesh(Mesh(np.array([dev]), ("data",))):
      lowered = du.lower(s((2, 8, 8, 8, 4), jnp.bfloat16), s((9, 8, 4)))
    lowered.compile(aot.GEMM_OPTIONS["triton"])
""")


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and HAS_TRITON),
                    reason="needs JAX's CUDA plugin and triton")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_the_option_reaches_the_machine_code_for_an_h100(tmp_path, setting):
  """Compiled for an H100 without one: with the default, XLA's fusion and the Pallas
  kernel hold fused multiply-adds (fma.rn.f32); with QLHS_XLA_FMA=0 a multiply and an
  add, each rounded (mul.rn.f32, add.rn.f32). Where this jaxlib's CPU backend refuses
  the option (0.12.1), the default compiles as QLHS_XLA_FMA=0 does. The user's own
  XLA_FLAGS (the dump) stay."""
  env = dict(os.environ, QLHS_XLA_FMA=setting,
             XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_emitter_re=.* "
                       "--xla_gpu_dump_llvmir=true")
  env.pop("JAX_PLATFORMS", None)
  p = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                     env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert p.returncode == 0, p.stderr[-3000:]
  ptx = {f: open(f).read() for f in glob.glob(str(tmp_path / "*.ptx"))}
  fusion = [t for t in ptx.values() if ".entry" in t and "qlhs_" not in t]
  du = [t for t in ptx.values() if "qlhs_d_transpose" in t]
  assert fusion and du, sorted(ptx)
  for text in (du[0], *fusion[:1]):
    if setting == "1" and xo.cpu_backend_accepts():
      assert "fma.rn.f32" in text and "mul.rn.f32" not in text
    else:
      assert "fma.rn.f32" not in text and "mul.rn.f32" in text

"""Which code and packages ran: the commit of this checkout and the versions of the
packages the traced program depends on. Training's launch records
(``train.launch_record``) and the benchmarks' records (``benchmarks.step``) carry them."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess

# The packages whose versions a launch record names: what the traced program depends on.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")

# The checkout this package sits in, when it sits in one (an editable install).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version(root: str = _ROOT) -> str | None:
  """The commit of the git checkout at ``root`` (short hash), with "+changes" when
  tracked files differ from it; None when ``root`` is not the top of a git checkout
  (an installed package whose folder lies inside some other repository included)."""
  try:
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True,
                                    text=True, check=True).stdout.strip()
    if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
      return None
    return git("rev-parse", "--short", "HEAD") + (
        "+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def package_versions(packages=PACKAGES) -> dict[str, str | None]:
  """``{package: version}``, None for a package that is not installed."""
  def version(package):
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None
  return {p: version(p) for p in packages}

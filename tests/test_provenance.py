"""provenance: the checkout's commit (against git itself) and the package versions."""

import os
import subprocess

import jax
import pytest

from qlhs_jax import provenance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(cwd, *args):
  return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                        cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_this_checkout_gives_git_own_answer():
  if not os.path.isdir(os.path.join(REPO, ".git")):
    pytest.skip("not a git checkout")
  want = git(REPO, "rev-parse", "--short", "HEAD")
  if git(REPO, "status", "--porcelain", "--untracked-files=no"):
    want += "+changes"
  assert provenance.code_version() == want


def test_a_repository_of_its_own(tmp_path):
  repo = tmp_path / "checkout"
  repo.mkdir()
  git(repo, "init", "-q")
  (repo / "a.py").write_text("x = 1\n")
  git(repo, "add", "a.py")
  git(repo, "commit", "-q", "-m", "first")
  head = git(repo, "rev-parse", "--short", "HEAD")
  assert provenance.code_version(str(repo)) == head
  (repo / "untracked.txt").write_text("not part of the code\n")
  assert provenance.code_version(str(repo)) == head
  (repo / "a.py").write_text("x = 2\n")
  assert provenance.code_version(str(repo)) == head + "+changes"


def test_a_folder_inside_another_repository_or_none_is_not_a_checkout(tmp_path):
  """An installed package whose site-packages lies inside some other repository (a
  virtual environment in a project folder) must not take that repository's commit."""
  git(tmp_path, "init", "-q")
  (tmp_path / "f").write_text("")
  git(tmp_path, "add", "f")
  git(tmp_path, "commit", "-q", "-m", "other project")
  inside = tmp_path / "venv" / "lib" / "site-packages"
  inside.mkdir(parents=True)
  assert provenance.code_version(str(inside)) is None
  assert provenance.code_version(str(tmp_path / "missing")) is None


def test_package_versions():
  versions = provenance.package_versions()
  assert set(versions) == set(provenance.PACKAGES)
  assert versions["jax"] == jax.__version__
  assert provenance.package_versions(("no-such-package-qlhs",)) == {
      "no-such-package-qlhs": None}

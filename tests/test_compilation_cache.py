"""JAX's persistent compilation cache: on by default, movable, off."""

import os
import pathlib
import subprocess
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]
_COMPILE = (
    "import afl, jax, jax.numpy as jnp; "
    "jax.jit(lambda x: x * 3 + 1)(jnp.ones(3)).block_until_ready(); "
    "print(jax.config.jax_compilation_cache_dir)"
)


def compile_once(tmp_path, **env) -> str:
  environ = dict(os.environ, PYTHONPATH=str(_REPO), **env)
  environ["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
  environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # the tests' own cache
  result = subprocess.run(
      [sys.executable, "-c", _COMPILE],
      env=environ,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Error" not in result.stderr, result.stderr[-2000:]
  return result.stdout.strip()


def entries(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(folder.glob("*-cache")) if folder.is_dir() else []


def test_the_cache_is_on_by_default_and_can_be_moved_or_turned_off(tmp_path):
  default = tmp_path / "xdg" / "afl" / "jax"
  assert compile_once(tmp_path) == str(default)
  assert entries(default)  # the compiled programs are stored
  moved = tmp_path / "moved"
  assert compile_once(tmp_path, AFL_COMPILATION_CACHE=str(moved)) == str(moved)
  assert entries(moved)
  before = entries(default)
  assert compile_once(tmp_path, AFL_COMPILATION_CACHE="off") == "None"
  assert entries(default) == before

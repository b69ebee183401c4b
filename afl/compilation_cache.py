"""JAX's persistent compilation cache, on by default.

Compiling dominates short runs (the README's main job trains in about 1.5 s
and compiles for 10-30 s), and every run of a command used to compile the
same programs again. Importing `afl` points JAX's persistent compilation
cache at a per-user folder, `$XDG_CACHE_HOME/afl/jax` (`~/.cache/afl/jax`),
so that a later process (the same command again, a study's next run, the
other processes of a multi-process run) loads the executables instead of
compiling them. Only compilation is cached: a loaded executable is the one
a fresh compile gives, so results do not depend on the cache.

  AFL_COMPILATION_CACHE=DIR   another folder;
  AFL_COMPILATION_CACHE=off   no cache ("0", "false" and "" too);
  JAX_COMPILATION_CACHE_DIR   set already: JAX's own setting wins (the tests
                              set it to a folder of their session).

Every compiled program is stored (JAX's default keeps only those over one
second, but most of a run's compile time is in programs of 0.1 - 1 s), and
the folder is kept under MAX_BYTES by JAX, least recently used first.

The settings go to JAX through its environment (JAX_COMPILATION_CACHE_DIR,
...) when JAX is not imported yet, so that importing `afl` imports no JAX
(`afl.host.set_jax_options`); else through `jax.config`.
"""

import os
import pathlib

from afl import host

ENV = "AFL_COMPILATION_CACHE"
MAX_BYTES = 4 * 2**30
_OFF = ("",) + host.OFF


def default_dir() -> pathlib.Path:
  cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(cache).expanduser() / "afl" / "jax"


def enable() -> str | None:
  """Points JAX's persistent cache at the folder the environment asks for
  (module docstring); returns it, or None if the cache is off."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  wanted = os.environ.get(ENV)
  if wanted is not None and wanted.strip().lower() in _OFF:
    return None
  folder = (
      str(pathlib.Path(wanted).expanduser()) if wanted else str(default_dir())
  )
  host.set_jax_options(
      jax_compilation_cache_dir=folder,
      jax_persistent_cache_min_compile_time_secs=0.0,
      jax_persistent_cache_min_entry_size_bytes=0,
      jax_compilation_cache_max_size=MAX_BYTES,
  )
  return folder

"""Algorithms by name: their builders, their settings and the papers'
defaults.

Each algorithm is registered (`register`) with its builder `(hparams,
federation) -> algorithm.Algorithm`, the settings it reads (`Field`s, each
declared once by the package that owns it), and its defaults, possibly by
dataset (the papers' hyperparameters). The project's own register in
catalog modules that import no JAX, naming the module that holds the
builder (in its BUILDERS) instead of the builder: it is imported when a run
builds the algorithm (`builder`), so an entry point checks its flags and
settings before JAX loads. The analytic
algorithms register in `afl.catalog`, which `afl.config` imports; the
baselines in `baselines.catalog`, when `baselines` is imported (the entry
points under `experiments/` do). The run loop (`afl.runtime`) and the
configuration (`afl.config`) know algorithms only through here, so adding
one touches its module and a catalog line.
"""

import importlib
import math
from typing import Any, Callable, NamedTuple


class Field(NamedTuple):
  """One setting: its type, help and allowed values.

  Attributes:
    type: bool, int, float or str.
    help: one line for `--help`.
    choices: the allowed values, or None.
    minimum: the least value allowed (numbers), or None.
    maximum: the largest value allowed (numbers), or None.
    open_minimum: the value must exceed `minimum`.
    open_maximum: the value must be below `maximum`.
    default: a common setting's default (an algorithm's settings take
      theirs from its registry entry).
    infinite: a float setting may also be inf (e.g. --dp_epsilon=inf).
  """

  type: type
  help: str
  choices: tuple | None = None
  minimum: float | None = None
  maximum: float | None = None
  open_minimum: bool = False
  open_maximum: bool = False
  default: Any = None
  infinite: bool = False

  def coerce(self, value: Any) -> Any:
    """`value` as this field's type where that loses nothing (an integer
    for a float setting, 3.0 for an integer one)."""
    if (
        self.type is float
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
      return float(value)
    if self.type is int and isinstance(value, float) and value.is_integer():
      return int(value)
    return value

  def check(self, name: str, value: Any) -> None:
    """Raises ValueError naming `--name`, the value and what is allowed."""
    if self.choices is not None:
      if value not in self.choices:
        raise ValueError(
            f"--{name}={value!r} is not one of {', '.join(map(str, self.choices))}"
        )
      return
    if self.type in (int, float) and not isinstance(value, bool):
      if not isinstance(value, (int, float)) or (
          self.type is int and not float(value).is_integer()
      ):
        raise ValueError(f"--{name}={value!r} must be {self.type.__name__}")
      if not math.isfinite(value) and not (self.infinite and value == math.inf):
        raise ValueError(f"--{name}={value} must be finite")
      low = self.minimum
      if low is not None and (
          value <= low if self.open_minimum else value < low
      ):
        raise ValueError(
            f"--{name}={value} must be {'>' if self.open_minimum else '>='} "
            f"{low}"
        )
      high = self.maximum
      if high is not None and (
          value >= high if self.open_maximum else value > high
      ):
        raise ValueError(
            f"--{name}={value} must be {'<' if self.open_maximum else '<='} "
            f"{high}"
        )
    elif not isinstance(value, self.type):
      raise ValueError(f"--{name}={value!r} must be {self.type.__name__}")


def positive(kind: type, text: str, default=None) -> Field:
  return Field(kind, text, minimum=0, open_minimum=True, default=default)


def non_negative(kind: type, text: str, default=None) -> Field:
  return Field(kind, text, minimum=0, default=default)


class Entry(NamedTuple):
  """A registered algorithm.

  Attributes:
    name: its `--algorithm` name.
    builder: (hparams ConfigDict, federation) -> algorithm.Algorithm, or
      the name of the module whose BUILDERS[name] it is (imported when a
      run builds it: a catalog declares an algorithm without JAX).
    defaults: (dataset, given) -> {setting: default} for every setting the
      algorithm reads (given: the settings the user chose, for defaults that
      depend on them).
    description: one line for `--help`.
    validate: (hparams, config) -> None, raising ValueError for settings
      out of range together (e.g. more groups than clients); or None.
  """

  name: str
  builder: Callable[..., Any] | str
  defaults: Callable[[str, dict], dict]
  description: str
  validate: Callable[[Any, Any], None] | None = None


_ENTRIES: dict[str, Entry] = {}
_FIELDS: dict[str, Field] = {}


def declare(fields: dict[str, Field]) -> None:
  """Declares settings that registered algorithms read (once each)."""
  for name, field in fields.items():
    if _FIELDS.get(name, field) != field:
      raise ValueError(f"setting {name!r} is declared twice, differently")
    _FIELDS[name] = field


def register(entry: Entry) -> Entry:
  """Adds `entry`; its defaults must name declared settings only."""
  if entry.name in _ENTRIES and _ENTRIES[entry.name] != entry:
    raise ValueError(f"algorithm {entry.name!r} is registered twice")
  unknown = set(entry.defaults("synthetic", {})) - set(_FIELDS)
  if unknown:
    raise ValueError(f"{entry.name}: undeclared settings {sorted(unknown)}")
  _ENTRIES[entry.name] = entry
  return entry


def get(name: str) -> Entry:
  """The entry of `name`; ValueError listing the registered ones if none."""
  if name not in _ENTRIES:
    raise ValueError(
        f"--algorithm={name!r} is not one of {', '.join(names())} (the "
        "baselines are registered by `import baselines`)"
    )
  return _ENTRIES[name]


def builder(name: str) -> Callable[..., Any]:
  """The builder of algorithm `name` (its module imported now, if named)."""
  found = get(name).builder
  if isinstance(found, str):
    return importlib.import_module(found).BUILDERS[name]
  return found


def names() -> tuple[str, ...]:
  return tuple(_ENTRIES)


def fields() -> dict[str, Field]:
  """Every declared algorithm setting."""
  return dict(_FIELDS)


def settings_of(name: str) -> tuple[str, ...]:
  """The settings algorithm `name` reads."""
  return tuple(get(name).defaults("synthetic", {}))

"""Every command and code snippet of README.md runs as documented.

The Python snippets run as they are (in a temporary folder). The main job
runs for real; every other `python -m experiments.run` command (also inside
the launcher's command) runs with `--dry_run` appended, which checks its
flags and settings and stops; the paper scripts' commands must name only
flags that the script has.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from afl.data import files

_REPO = pathlib.Path(__file__).resolve().parents[1]
_README = (_REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", _README, re.S)


def commands() -> list[str]:
  """The shell commands of the bash blocks, continuation lines joined."""
  found = []
  for block in blocks("bash"):
    text = re.sub(r"\\\n\s*", "", block)
    found += [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
  return found


def run(command: list[str], cwd, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(_REPO))
  env.pop("XLA_FLAGS", None)  # one device, as a user's shell has
  return subprocess.run(
      command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


def test_the_readme_has_its_commands():
  assert len(commands()) >= 10 and len(blocks("python")) >= 2


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippets_run(index, tmp_path, data_dir):
  result = run([sys.executable, "-c", blocks("python")[index]], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]


def test_the_main_job_runs_and_prints_rounds(tmp_path):
  (main_job,) = [c for c in commands() if c.startswith("python3 -m venv")][:1]
  command = main_job.split("&&")[-1].split()
  assert command[:3] == ["python", "-m", "experiments.run"]
  result = run([sys.executable] + command[1:], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "runs" / "quickstart" / "results.json").exists()
  line = re.compile(r"round \d+/\d+: .*; \d+\.\d{3}s \(\+\d+\.\ds compile\)")
  assert line.search(result.stdout), result.stdout
  assert "libtpu" not in result.stderr  # JAX's TPU probe is not news
  example = re.search(r"e\.g\. `(round .*?)`", _README, re.S).group(1)
  assert line.fullmatch(re.sub(r"\s+", " ", example))


def experiments_run_commands() -> list[list[str]]:
  """Every `python -m experiments.run ...` of the README's bash blocks (the
  launcher's inner command too) and the sbatch line's flags."""
  found = []
  for command in commands():
    words = command.split()
    for start in range(len(words) - 2):
      if words[start : start + 3] == ["python", "-m", "experiments.run"]:
        found.append(words[start + 3 :])
  sbatch = re.search(r"`sbatch launch/slurm.sbatch\s+(.*?)`", _README, re.S)
  found.append(sbatch.group(1).split())
  return found


def dry_run(flags, cwd):
  result = run(
      [sys.executable, "-m", "experiments.run", *flags, "--dry_run"], cwd
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


@pytest.mark.parametrize("flags", experiments_run_commands(), ids=str)
def test_run_commands_have_valid_settings(flags, tmp_path):
  """A --config file that another command's run writes is that command's
  configuration (what its dry run prints)."""
  for flag in flags:
    if flag.startswith("--config="):
      path = flag.split("=", 1)[1]
      (writer,) = [
          f
          for f in experiments_run_commands()
          if f"--output_dir={pathlib.Path(path).parent}" in f
      ]
      (tmp_path / path).parent.mkdir(parents=True)
      (tmp_path / path).write_text(
          json.dumps({"config": dry_run(writer, _REPO)})
      )
    if flag.startswith("--split_file="):  # the split that a run writes
      path = flag.split("=", 1)[1]
      (writer,) = [
          f
          for f in experiments_run_commands()
          if f"--output_dir={pathlib.Path(path).parent}" in f
      ]
      clients = dry_run(writer, _REPO)["num_clients"]
      (tmp_path / path).parent.mkdir(parents=True)
      files.save_split(
          tmp_path / path,
          [[i] for i in range(clients)],
          [[clients + i] for i in range(clients)],
      )
  assert "algorithm" in dry_run(flags, tmp_path)


def test_the_launcher_command_starts_its_processes(tmp_path):
  (command,) = [c for c in commands() if "launch.local" in c]
  words = command.split() + ["--dry_run"]
  words = [
      f"--process_log_dir={tmp_path}"
      if w.startswith("--process_log_dir")
      else w
      for w in words
  ]
  result = run([sys.executable] + words[1:], _REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  logs = sorted(tmp_path.glob("process_*.log"))
  assert len(logs) == 2
  assert all('"algorithm": "pfedacnnl"' in p.read_text() for p in logs)


def study_commands() -> list[list[str]]:
  """The tables' commands and the bash blocks' other entry points (e.g.
  experiments.edit): module, then flags."""
  table = re.findall(r"\| `python -m (experiments\.\w+)([^`]*)` \|", _README)
  others = [
      c.split()[2:]
      for c in commands()
      if c.startswith("python -m experiments.")
      and not c.startswith("python -m experiments.run ")
  ]
  return [[module] + flags.split() for module, flags in table] + others


@pytest.mark.parametrize("command", study_commands(), ids=str)
def test_study_commands_name_flags_the_script_has(command):
  result = run([sys.executable, "-m", command[0], "--helpfull"], _REPO, 120)
  assert result.returncode == 0, result.stderr[-3000:]
  for flag in command[1:]:
    name = flag.split("=")[0]
    assert re.search(rf"\s{re.escape(name)}:", result.stdout), name

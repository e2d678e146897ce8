"""Every command of the README runs as written, in a fresh copy of the checkout.

The commands are read from the README's ``bash`` blocks (a line ending in
``\\`` continues on the next) and run one after the other with bash, in a
copy of the files git tracks (and the untracked ones it does not ignore),
from its root, as a new user runs them: relative paths included, a later
command reading what an earlier one wrote. ``$HOME`` is an empty folder.

* The install and test block (``pip install``, ``pytest``) is what CI runs
  itself; it is not run again here.
* A ``--smoke`` command must end with exit 0 and its results.
* The demo runs with ``--smoke`` added: its full run takes minutes, and
  ``--smoke`` runs the same code at toy size.
* A real run names a dataset folder that is not on this machine: it must stop
  at once with one ``error:`` line naming that folder, exit 2, and create
  nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(text: str) -> list[str]:
    """The commands of the ``bash`` blocks of ``text``, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def test_the_parser_joins_continuations_and_drops_comments():
    text = ("intro\n```bash\n# a comment\npython -m a --x 1 \\\n    --y 2   # note\n```\n"
            "```python\nprint(1)\n```\n```bash\npytest\n```\n")
    assert readme_commands(text) == ["python -m a --x 1 --y 2", "pytest"]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A copy of the checkout's files (tracked, or untracked and not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    copy = tmp_path_factory.mktemp("clone")
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def _out(command: str) -> str:
    return re.search(r"--out (\S+)", command).group(1)


def test_every_readme_command_runs_as_written(fresh, tmp_path):
    commands = readme_commands((fresh / "README.md").read_text())
    setup = [c for c in commands if c.startswith(("pip ", "pytest"))]
    assert setup, "the README lost its install and test commands"
    runs = [c for c in commands if c not in setup]
    assert any("experiments.demo" in c for c in runs) and any("--smoke" in c for c in runs)
    home = tmp_path / "home"
    home.mkdir()
    # The suite's compilation cache (see conftest) is kept; HOME is empty, so ~/data is absent.
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(fresh)}
    ran = []
    for command in runs:
        data = re.search(r"--data-dir (\S+)", command)
        line = command + (" --smoke" if "experiments.demo" in command and "--smoke" not in command
                          else "")
        done = subprocess.run(["bash", "-c", line.replace("python ", f"{sys.executable} ", 1)],
                              cwd=fresh, env=env, capture_output=True, text=True, timeout=900)
        out = fresh / _out(command)
        if data is None:
            assert done.returncode == 0, (command, done.stderr[-3000:])
            assert (out / "results.json").is_file(), command
        else:
            missing = data.group(1).replace("~", str(home), 1)
            assert done.returncode == 2, (command, done.stdout[-2000:], done.stderr[-2000:])
            assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
            assert missing in done.stderr, done.stderr
            assert not out.exists(), command
        ran.append(command)
    assert ran == runs

"""Output folders and atomic writes."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfpk_jax.storage import files

pytestmark = pytest.mark.slow








def test_write_json_is_atomic_on_failure(tmp_path):
    path = tmp_path / "results.json"
    files.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        files.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# A writer that is killed: ``os.fsync`` (between writing the temporary file and
# renaming it) announces itself and then hangs, so the kill lands mid-write.
_STALLED_WRITER = """
import os, sys, time
from sfpk_jax.storage import files
path, ready = sys.argv[1], sys.argv[2]
def stall(fd):
    open(ready, "w").close()
    time.sleep(600)
os.fsync = stall
files.write_json(path, {"version": "new", "payload": "y" * 5_000_000})
"""

# A writer rewriting the same file in a loop, killed at a random moment.
_LOOPING_WRITER = """
import sys
from sfpk_jax.storage import files
path = sys.argv[1]
i = 0
while True:
    i += 1
    files.write_json(path, {"version": i, "payload": str(i % 10) * 2_000_000})
"""


def _python(code, *argv):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=env)


@pytest.mark.parametrize("old", [True, False], ids=["over_an_old_file", "new_file"])
def test_write_killed_midway_leaves_the_old_file_or_none(tmp_path, old):
    path = tmp_path / "results.json"
    if old:
        files.write_json(path, {"version": "old"})
    ready = tmp_path / "ready"
    proc = _python(_STALLED_WRITER, path, ready)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # The half-done write is a hidden temporary file, never the real name.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("results.json", "ready")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".results.json.")
    assert leftovers[0].endswith(".tmp")
    if old:
        assert json.loads(path.read_text()) == {"version": "old"}
    else:
        assert not path.exists()
        # ... so the folder does not read as holding finished results.
        assert not (tmp_path / "results.json").exists()


def test_write_killed_at_a_random_moment_leaves_a_complete_file(tmp_path):
    path = tmp_path / "metrics.json"
    proc = _python(_LOOPING_WRITER, path)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(random.uniform(0.05, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    record = json.loads(path.read_text())  # complete JSON
    assert record["payload"] == str(record["version"] % 10) * 2_000_000


def test_written_files_get_the_usual_permissions(tmp_path):
    files.write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask

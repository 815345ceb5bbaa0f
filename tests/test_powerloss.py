"""Power cuts under load: acknowledged mail survives them (bench/powerloss.py, a few moments).

SIGKILL (test_durability.py) keeps the page cache: what the server wrote
reaches the disk later anyway.  A power cut does not, and only it shows a
missing flush.  bench/powerloss.py makes one that is true to the disk: the
ext4 image holding the mail root is cloned atomically (a reflink on XFS,
DESIGN.md "Measuring on these machines") while the load runs, then checked,
mounted and recovered, and every message acknowledged before the clone must
be in its mailboxes, byte-exact, once.

The method is held to account both ways: with ``--fsync off`` acknowledged
mail must be lost, or the harness could not see a loss at all and its
"nothing lost" for the safe modes would mean nothing.

Root and working loop devices are needed (probed by attaching one); without
them the module is skipped.  The script runs as a child process, bounded in
time, and is stopped with SIGTERM, on which it undoes its mounts and loop
devices itself.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TIMEOUT = 240.0


def _unusable() -> str | None:
    spec = importlib.util.spec_from_file_location("loopfs", BENCH / "loopfs.py")
    assert spec is not None and spec.loader is not None
    loopfs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loopfs)
    return loopfs.unusable()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def loop_devices() -> None:
    reason = _unusable()
    if reason:
        pytest.skip(reason)


def powerloss(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """Run bench/powerloss.py; its JSON summary and its output."""
    summary = tmp_path / "powerloss.json"
    cmd = [sys.executable, str(BENCH / "powerloss.py"), "--scratch", str(tmp_path), "--json", str(summary), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the script must get to unmount and detach.
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"powerloss.py ran over {TIMEOUT:g} s:\n{output}")
    assert summary.exists(), f"powerloss.py wrote no summary (exit {proc.returncode}):\n{output}"
    return json.loads(summary.read_text()), output


@pytest.mark.parametrize("mode,moments", [("batch", 3), ("always", 2)])
def test_power_cut_loses_nothing_acknowledged(tmp_path: Path, loop_devices: None, mode: str, moments: int) -> None:
    result, output = powerloss(tmp_path, "--fsync", mode, "--moments", str(moments), "--workers", "1,2")
    totals = result["totals"]
    assert totals["errors"] == 0, output
    assert totals["acked"] > 0, f"nothing acknowledged before a cut; the test proves nothing:\n{output}"
    assert (totals["lost"], totals["dup"], totals["partial"]) == (0, 0, 0), output


def test_power_cut_loses_what_fsync_off_acknowledged(tmp_path: Path, loop_devices: None) -> None:
    # A second or more of load: ext4 commits every 5 s and writes dirty
    # data back after 30, so what was acknowledged in the last second is
    # in the page cache only.
    result, output = powerloss(tmp_path, "--fsync", "off", "--moments", "1", "--min-delay", "1", "--max-delay", "2")
    totals = result["totals"]
    assert totals["errors"] == 0, output
    assert totals["lost"] > 0, f"--fsync off lost nothing: the harness cannot see a loss:\n{output}"

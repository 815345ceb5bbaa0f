"""A short, deterministic run of the fuzz harnesses in fuzz/, for CI.

The long runs are manual (fuzz/README.md).  Here each harness's ``check``
runs over the seed corpus and a few thousand seeded mutations of it (the
plain loop in fuzz/_plain.py: the same inputs every time, so never flaky),
and, where atheris is installed, once more under libFuzzer with a fixed
``-seed`` and ``-runs``.  Two more tests make sure the harnesses are not
vacuous: a planted bug must make ``check`` fail.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
CORPUS = FUZZ / "corpus"


@pytest.fixture(scope="module")
def fuzz_dir() -> object:
    sys.path.insert(0, str(FUZZ))
    yield
    sys.path.remove(str(FUZZ))


def harness(name: str) -> ModuleType:
    return importlib.import_module(name)


def test_corpus_is_small_and_present() -> None:
    files = sorted(CORPUS.iterdir())
    assert len(files) >= 10
    assert sum(f.stat().st_size for f in files) < 64 * 1024


@pytest.mark.parametrize("name,runs", [("fuzz_session", 3000), ("fuzz_parser", 5000)])
def test_plain_run(fuzz_dir: object, tmp_path: Path, name: str, runs: int) -> None:
    if name == "fuzz_parser":
        pytest.importorskip("fastsmtp._parser")  # differential: needs the compiled module
    plain = harness("_plain")
    mod = harness(name)
    done, _ = plain.run(mod.check, plain.load_corpus([str(CORPUS)]), runs, seed=1, artifact_prefix=f"{tmp_path}/")
    assert done == runs


def test_session_harness_catches_a_crash(fuzz_dir: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastsmtp.events import Noop
    from fastsmtp.session import Session

    mod = harness("fuzz_session")

    class Broken(Session):
        def next_event(self):  # type: ignore[no-untyped-def]
            event = super().next_event()
            if isinstance(event, Noop):
                raise IndexError("planted")
            return event

    monkeypatch.setattr(mod, "Session", Broken)
    with pytest.raises(IndexError):
        mod.check(b"\x00\x00EHLO x\r\nNOOP\r\n")


def test_parser_harness_catches_a_mismatch(fuzz_dir: object, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastsmtp._parser")
    from fastsmtp import _parser_py

    mod = harness("fuzz_parser")
    monkeypatch.setattr(_parser_py.LineReader, "take", lambda self: b"")
    with pytest.raises(AssertionError):
        mod.check(b"\x00\xff\x00a partial line with no CRLF")


@pytest.mark.parametrize("name,runs", [("fuzz_session", 3000), ("fuzz_parser", 10000)])
def test_atheris_run(tmp_path: Path, name: str, runs: int) -> None:
    pytest.importorskip("atheris")
    if name == "fuzz_parser":
        pytest.importorskip("fastsmtp._parser")
    # New inputs go into the first folder: a scratch one, not the seeds.
    cmd = [
        sys.executable,
        str(FUZZ / f"{name}.py"),
        str(tmp_path),
        str(CORPUS),
        f"-dict={FUZZ / 'smtp.dict'}",
        f"-runs={runs}",
        "-seed=1",
        "-max_total_time=20",
        f"-artifact_prefix={tmp_path}/",
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Done " in proc.stderr
    assert not list(tmp_path.glob("crash-*"))

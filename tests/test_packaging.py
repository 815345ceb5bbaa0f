"""What users install: the wheel, the command it puts on PATH, and the systemd unit.

The wheel is built from a clean copy of the source tree (no compiled module
or generated C file from a development build can leak into it), installed
into a fresh virtual environment, and run from there.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fastsmtp.config import Config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "fastsmtp.service"
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "src/fastsmtp/_version.py").read_text()).group(1)

# Build outputs and caches: what a fresh checkout does not have.
SOURCE_IGNORE = shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__", "*.egg-info", "*.py[cod]")
OFFLINE = ("No matching distribution found", "Could not find a version", "Failed to establish a new connection",
           "Network is unreachable", "Temporary failure in name resolution")


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def skip_if_offline(proc: subprocess.CompletedProcess[str], what: str) -> None:
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(sign in out for sign in OFFLINE):
        pytest.skip(f"{what}: the package index cannot be reached:\n{out[-2000:]}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    # Every step runs from tmp: in the source tree, setuptools' own build/
    # output folder would shadow the "build" package ("python -m build").
    if run([sys.executable, "-c", "import build.__main__"], cwd=tmp).returncode != 0:
        proc = run([sys.executable, "-m", "pip", "install", "-q", "build"], cwd=tmp)
        skip_if_offline(proc, "pip install build")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    src = tmp / "src-tree"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=SOURCE_IGNORE)
    dist = tmp / "dist"
    # Without isolation when this interpreter already has the build
    # requirements (python -m build checks them): no download, and a minute
    # less.  Otherwise the isolated build fetches them.
    isolation = []
    if all(importlib.util.find_spec(m) for m in ("setuptools", "Cython")):
        isolation = ["--no-isolation"]
    proc = run([sys.executable, "-m", "build", "--wheel", *isolation, "--outdir", str(dist), str(src)], cwd=tmp)
    if isolation and proc.returncode != 0 and "Missing dependencies" in proc.stdout + proc.stderr:
        proc = run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)], cwd=tmp)
    skip_if_offline(proc, "python -m build")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_compiled_parser_and_no_c_source(wheel: Path) -> None:
    assert wheel.name.startswith(f"fastsmtp-{VERSION}-")
    # A platform wheel: it carries a compiled module.
    assert not wheel.name.endswith("-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    compiled = [n for n in names if re.fullmatch(r"fastsmtp/_parser\..*\.so|fastsmtp/_parser\.so", n)]
    assert len(compiled) == 1, names
    assert [n for n in names if n.endswith((".c", ".h", ".html"))] == []
    # The typed twin, stubs and marker ship too; a fresh install works without Cython.
    for needed in ("fastsmtp/_parser_py.py", "fastsmtp/_parser.pyi", "fastsmtp/py.typed", "fastsmtp/cli.py"):
        assert needed in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fastsmtp = fastsmtp.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    proc = run([sys.executable, "-m", "venv", str(venv)])
    assert proc.returncode == 0, proc.stderr
    py = venv / "bin" / "python"
    proc = run([str(py), "-m", "pip", "install", "-q", str(wheel)])
    skip_if_offline(proc, "pip install of the wheel's dependencies")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    proc = run([str(venv / "bin" / "fastsmtp"), "--version"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastsmtp {VERSION}"

    # Run outside the source tree so that nothing but the installed copy is found.
    proc = run([str(py), "-c", "import fastsmtp._parser; print(fastsmtp._parser.__file__)"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    where = Path(proc.stdout.strip())
    assert where.suffix == ".so" and where.is_relative_to(venv), where


# -- the systemd unit ------------------------------------------------------------------


def read_unit() -> configparser.ConfigParser:
    # systemd's syntax is INI; strict: a key given twice would be a mistake here.
    unit = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",), comment_prefixes=("#", ";"))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text())
    return unit


def test_service_unit_has_the_key_settings() -> None:
    unit = read_unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["ExecStart"].startswith("/usr/local/bin/fastsmtp serve ")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert service["User"] == "fastsmtp"
    assert "CAP_NET_BIND_SERVICE" in service["AmbientCapabilities"].split()
    assert service["CapabilityBoundingSet"].split() == ["CAP_NET_BIND_SERVICE"]
    # systemd SIGKILLs what is left after TimeoutStopSec: it must outlast the
    # graceful shutdown, or transactions in progress are cut.
    assert float(service["TimeoutStopSec"]) > Config().shutdown_timeout
    assert int(service["LimitNOFILE"]) >= 65536
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert service[key] == value, key
    # The only writable place is the mail root the unit serves.
    assert service["ReadWritePaths"].split() == ["/srv/mail"]
    assert unit["Unit"]["RequiresMountsFor"] == "/srv/mail"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_service_unit_flags_exist() -> None:
    """Every flag the unit passes (ExecStart, and the flag form in its comments) is one ``serve`` knows."""
    text = UNIT.read_text()
    commands = [read_unit()["Service"]["ExecStart"]]
    commands += [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("# ExecStart=")]
    assert len(commands) == 2
    proc = run([sys.executable, "-m", "fastsmtp", "serve", "--help"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    known = set(re.findall(r"--[a-z][a-z-]+", proc.stdout))
    used = {flag for command in commands for flag in re.findall(r"(?<!\S)--[a-z][a-z-]+", command)}
    unknown = used - known
    if unknown == {"--config"}:
        pytest.skip("fastsmtp serve has no --config yet")
    assert unknown == set()


def test_service_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's binary exists: point it at a stand-in.
    # The unit's user need not exist for verify.
    binary = tmp_path / "fastsmtp"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    copy = tmp_path / "fastsmtp.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/fastsmtp", str(binary)))
    proc = run(["systemd-analyze", "verify", str(copy)], timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "fastsmtp.service" not in out, out  # verify warns about our unit without failing

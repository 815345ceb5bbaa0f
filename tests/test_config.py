"""The configuration file: layering, one-line errors, config check/show, SIGHUP.

Settings are layered as built-in defaults < the --config file < flags
given on the command line; every error names the file and the key in one
line on stderr, with exit status 2.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Callable

import pytest

from conftest import HOSTNAME, Client, RunningServer, start_server

from fastsmtp.cli import _config_from, main
from fastsmtp.config import Config, ConfigError, layer, read_file, server_defaults, setting_keys, to_toml

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "fastsmtp.example.toml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- layering ----------------------------------------------------------------------


def test_a_list_flag_repeats_in_order_and_replaces_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "fastsmtp.toml", 'milter = ["inet:1@127.0.0.1"]\n')
    config = _config_from(["serve", "--config", str(conf), "--milter", "inet:2@127.0.0.1",
                           "--milter", "inet:3@127.0.0.1", "inet:4@127.0.0.1"])
    assert config.milter == ("inet:2@127.0.0.1", "inet:3@127.0.0.1", "inet:4@127.0.0.1")
    assert _config_from(["serve", "--trusted-networks", "10.0.0.0/8"]).trusted_networks == ("10.0.0.0/8",)


def test_file_values_apply(tmp_path: Path) -> None:
    conf = write(tmp_path / "fastsmtp.toml", """
listen = "[::1]:2526"
mail-root = "spool"            # relative to the file's directory
hostname = "mx.file.example"
max-message-size = "50M"
max-recipients = 7
idle-timeout = 600             # an integer is a number of seconds too
fsync = "always"
bare-lf = "normalize"
workers = 3
proxy-trusted = ["10.0.0.0/8", "fd00::/8"]
tls-cert = ""
""")
    config = _config_from(["serve", "--config", str(conf)])
    assert (config.host, config.port) == ("::1", 2526)
    assert config.mail_root == str(tmp_path / "spool")
    assert config.hostname == "mx.file.example"
    assert config.max_message_size == 50 << 20
    assert config.max_recipients == 7
    assert config.idle_timeout == 600.0 and isinstance(config.idle_timeout, float)
    assert (config.fsync, config.bare_lf, config.workers) == ("always", "normalize", 3)
    assert config.proxy_trusted == ("10.0.0.0/8", "fd00::/8")
    # What the file leaves out keeps its built-in default.
    assert config.max_errors == Config().max_errors
    assert config.loop == Config().loop


def test_flags_override_the_file_and_only_flags_given_do(tmp_path: Path) -> None:
    conf = write(tmp_path / "fastsmtp.toml", 'hostname = "mx.file.example"\nmax-recipients = 7\nfsync = "always"\n')
    config = _config_from([
        "serve", "--config", str(conf), "--hostname", "mx.flag.example",
        "--max-recipients", "100",  # the built-in default, given explicitly: it still wins
    ])
    assert config.hostname == "mx.flag.example"
    assert config.max_recipients == 100
    assert config.fsync == "always"  # argparse's default for --fsync does not clobber the file


def test_flags_alone_are_the_defaults_plus_the_flags() -> None:
    config = _config_from(["serve", "--max-errors", "3"])
    expected = Config(**{**server_defaults(), "max_errors": 3}).validate()
    assert config == expected


def test_help_still_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--config FILE" in out
    assert f"(default: {Config().max_recipients})" in out


# -- errors: one line naming the file and the key ------------------------------------

ERRORS = [
    # unknown keys
    ("max_recipients = 5\n", "max_recipients: unknown key (did you mean 'max-recipients'?)"),
    ("max-recipent = 5\n", "max-recipent: unknown key (did you mean 'max-recipients'?)"),
    ("colour = 'blue'\n", "colour: unknown key"),
    ("port = 25\n", "port: unknown key (did you mean 'listen'"),
    ("[server]\nlisten = '0.0.0.0:25'\n", "server: unknown key (settings are top-level keys, not tables)"),
    # wrong types
    ('max-recipients = "5"\n', 'max-recipients: must be an integer, not the string "5"'),
    ("workers = true\n", "workers: must be an integer, not the boolean true"),
    ("idle-timeout = '5m'\n", 'idle-timeout: must be a number of seconds, not the string "5m"'),
    ("fsync = true\n", 'fsync: must be "batch" or "always" or "off", not the boolean true'),
    ("proxy-trusted = '10.0.0.0/8'\n", 'proxy-trusted: must be an array of strings, not the string "10.0.0.0/8"'),
    ("listen = 25\n", 'listen: must be a string like "0.0.0.0:25", not the integer 25'),
    ("max-message-size = 1.5\n", "max-message-size: must be a number of bytes"),
    # bad choices and values (Config.validate's own sentences)
    ("fsync = 'sometimes'\n", "fsync must be one of batch, always, off, not 'sometimes'"),
    ("log-level = 'loud'\n", "log-level must be one of debug, info, warning, error, not 'loud'"),
    ("max-recipients = 0\n", "max-recipients must be at least 1"),
    ("idle-timeout = inf\n", "idle-timeout must be a finite number of seconds"),
    ("listen = 'localhost'\n", "listen: 'localhost' is not HOST:PORT"),
    ("proxy-trusted = ['10.0.0.0/33']\n", "proxy-trusted: '10.0.0.0/33' is not an address or network"),
    ("tls-listen = '0.0.0.0:465'\n", "tls-listen needs tls-cert and tls-key"),
    # bad sizes
    ("max-message-size = '25Q'\n", "max-message-size: '25Q' is not a size in bytes (like 25M)"),
    ("max-message-size = 0\n", "max-message-size must be at least 1 byte"),
    # TOML syntax, with the line and column (the column as tomllib counts it)
    ("hostname = 'a'\nfsync = \n", "not valid TOML: Invalid value (at line 2, column "),
    ("fsync = 'off'\nfsync = 'batch'\n", "not valid TOML: Cannot overwrite a value (at line 2, column "),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[m.split(":")[0].split(" ")[0] for _, m in ERRORS])
def test_each_error_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    conf = write(tmp_path / "bad.toml", text)
    for argv in (["config", "check", str(conf)], ["serve", "--config", str(conf)]):
        code, out, err = run(argv, capsys)
        assert code == 2
        assert out == ""
        assert err.count("\n") == 1, err
        assert err.startswith(f"fastsmtp: error: {conf}: {message}"), err
    # serve stopped before doing anything: not even the default mail root was created.
    assert not (tmp_path / "mail").exists()


def test_unreadable_and_non_utf8_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["config", "check", str(tmp_path / "missing.toml")], capsys)
    assert (code, err) == (2, f"fastsmtp: error: {tmp_path / 'missing.toml'}: cannot read it: No such file or directory\n")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'hostname = "m\xe9l"\n')
    code, _, err = run(["config", "check", str(latin1)], capsys)
    assert (code, err) == (2, f"fastsmtp: error: {latin1}: not valid TOML: the file is not UTF-8\n")


def test_an_error_the_flags_cause_does_not_blame_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write(tmp_path / "fastsmtp.toml", "max-recipients = 7\n")
    code, _, err = run(["config", "show", "--config", str(conf), "--max-errors", "0"], capsys)
    assert (code, err) == (2, "fastsmtp: error: max-errors must be at least 1\n")
    # A bad value in the file that a flag overrides is no error at all.
    write(conf, "max-recipients = 0\n")
    assert _config_from(["serve", "--config", str(conf), "--max-recipients", "5"]).max_recipients == 5


def test_an_error_of_file_and_flags_together_names_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "fastsmtp.toml", "tls-listen = '0.0.0.0:465'\n")
    with pytest.raises(ConfigError, match=f"^{conf}: tls-listen needs tls-cert and tls-key$"):
        _config_from(["serve", "--config", str(conf), "--max-errors", "3"])


# -- config check and config show ----------------------------------------------------


def test_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write(tmp_path / "fastsmtp.toml", "max-recipients = 7\n")
    assert run(["config", "check", str(conf)], capsys) == (0, f"{conf}: ok\n", "")


def test_config_show_prints_every_key_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["config", "show"], capsys)
    assert (code, err) == (0, "")
    keys = [line.split(" = ")[0] for line in out.splitlines()]
    assert keys == list(setting_keys())
    assert "listen" in keys and "host" not in keys and "port" not in keys
    assert len(keys) == len(dataclasses.fields(Config)) - 1  # host and port are one key


def test_config_show_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write(tmp_path / "fastsmtp.toml", """
listen = "[::1]:0"
mail-root = "spool"
hostname = "mx.file.example"
max-message-size = "1.5M"
recipient-delimiter = ""
proxy-trusted = ["192.0.2.0/24"]
tls-listen = ""
""")
    argv = ["config", "show", "--config", str(conf), "--max-errors", "9", "--proxy-trusted", "10.0.0.0/8", "::1",
            "--recipient-delimiter", "-"]
    code, shown, err = run(argv, capsys)
    assert (code, err) == (0, "")
    effective = _config_from(argv)
    assert tomllib.loads(shown)["max-errors"] == 9
    # Fed back through --config, the output gives the same configuration ...
    again = write(tmp_path / "shown.toml", shown)
    assert _config_from(["serve", "--config", str(again)]) == effective
    # ... and shows the same text, so it can be diffed.
    assert run(["config", "show", "--config", str(again)], capsys) == (0, shown, "")


@pytest.mark.parametrize("text", ['a"b\\c', "tab\there", "\x01\x7f", "é ✓ 𝄞"])
def test_strings_survive_show(text: str) -> None:
    config = dataclasses.replace(Config().validate(), recipient_delimiter=text, group=text)
    assert tomllib.loads(to_toml(config))["group"] == text


# -- the example file ----------------------------------------------------------------


def test_example_file_is_valid_and_is_the_defaults(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["config", "check", str(EXAMPLE)], capsys) == (0, f"{EXAMPLE}: ok\n", "")
    # Its mail-root "mail" is relative to the file, the default to the working
    # directory: the same folder when run from the repository root.
    monkeypatch.chdir(REPO)
    assert layer(server_defaults(), str(EXAMPLE), {}) == layer(server_defaults(), None, {})


def test_example_file_lists_every_key() -> None:
    text = EXAMPLE.read_text()
    keys = set(tomllib.loads(text))
    # workers defaults to the CPUs of the machine, so the example shows it commented out.
    assert "\n# workers = " in text
    missing = set(setting_keys()) - keys - {"workers"}
    assert not missing, f"add these keys to {EXAMPLE.name}: {sorted(missing)}"
    assert set(read_file(str(EXAMPLE))) >= {"host", "port", "mail_root"}


# -- a real server -------------------------------------------------------------------


def _start(cmd: list[str], timeout: float = 20.0) -> tuple[subprocess.Popen[str], int, list[str]]:
    """Run ``cmd`` until it prints "listening on HOST:PORT"; the process, the port, its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    output: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            output += [line.decode() for line in lines]
            for line in output:
                if "listening on " in line:
                    return proc, int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1]), output
    proc.kill()
    proc.wait(5)
    raise RuntimeError("server did not start:\n" + "\n".join(output))


def test_server_started_with_only_a_config_file(tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    conf = write(tmp_path / "fastsmtp.toml", """
listen = "127.0.0.1:0"
mail-root = "mail"              # tmp_path/mail: relative to this file, not to the working directory
hostname = "mx.file.example"
workers = 0
loop = "asyncio"
greeting-delay = 0.0
""")
    proc, port, _ = _start([sys.executable, "-m", "fastsmtp", "serve", "--config", str(conf)])
    srv = RunningServer("127.0.0.1", port, tmp_path / "mail", proc)
    try:
        c = Client(srv.connect())
        assert c.reply().startswith(b"220 mx.file.example ")
        c.close()
    finally:
        assert srv.stop() == 0


def test_server_with_config_and_flags(tmp_path: Path) -> None:
    # start_server passes --hostname itself: the flag wins over the file,
    # while the file's other settings apply.
    conf = write(tmp_path / "fastsmtp.toml", 'hostname = "mx.file.example"\nmax-recipients = 1\nworkers = 0\n')
    srv = start_server(tmp_path / "mail", "--config", str(conf))
    try:
        c = Client(srv.connect())
        assert c.reply().startswith(f"220 {HOSTNAME} ".encode())
        c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\n")
        replies = c.replies(4)
        assert replies[2].startswith(b"250 ")
        assert replies[3].startswith(b"452 ")
        c.close()
    finally:
        assert srv.stop() == 0


def _wait_for(check: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _second_rcpt(srv: RunningServer) -> bytes:
    c = Client(srv.connect())
    try:
        c.reply()
        c.send(b"EHLO c.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\n")
        return c.replies(4)[3][:3]
    finally:
        c.close()


def test_sighup_reads_the_config_file_again(tmp_path: Path) -> None:
    conf = write(tmp_path / "fastsmtp.toml", "max-recipients = 1\n")
    srv = start_server(tmp_path / "mail", "--workers", "1", "--config", str(conf))
    try:
        assert _second_rcpt(srv) == b"452"
        old = srv.workers()
        write(conf, "max-recipients = 2\n")
        srv.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: srv.workers() and not set(old) & set(srv.workers()), "the new worker")
        assert _second_rcpt(srv) == b"250"
        # A file that no longer validates keeps the running configuration.
        old = srv.workers()
        write(conf, 'max-recipients = "two"\n')
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert srv.workers() == old
        assert _second_rcpt(srv) == b"250"
    finally:
        assert srv.stop() == 0
    assert srv.proc.stdout is not None
    output = "".join(srv.output) + srv.proc.stdout.read()
    assert "reload complete" in output
    assert f"reload failed, keeping the running configuration: {conf}: max-recipients: must be an integer" in output

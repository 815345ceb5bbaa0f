"""The table of settings is the one source: the views agree with it.

Every Config field has exactly one row, every flag of ``serve`` and
``config show`` comes from a row, and the committed README table and
``fastsmtp.example.toml`` are exactly what the table generates now.
After changing a row, regenerate both files with

    PYTHONPATH=src python tests/test_settings_table.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fastsmtp import config
from fastsmtp.cli import build_parser, main
from fastsmtp.config import Config, ConfigError, read_file, setting_keys, to_toml
from fastsmtp.settings import BY_KEY, SETTINGS, Kind, Setting, example_toml, readme_table

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "fastsmtp.example.toml"
README = REPO / "README.md"
TABLE_START = "| flag | default | meaning |\n"


def readme_with_table(readme: str, table: str) -> str:
    """``readme`` with its "Configuration flags" table replaced by ``table``."""
    start = readme.index(TABLE_START, readme.index("## Configuration flags\n"))
    end = readme.index("\n\n", start) + 1
    return readme[:start] + table + readme[end:]


def test_every_field_has_exactly_one_setting() -> None:
    owners: dict[str, list[str]] = {}
    for setting in SETTINGS:
        for name in setting.fields:
            owners.setdefault(name, []).append(setting.key)
    assert {name: keys for name, keys in owners.items() if len(keys) != 1} == {}
    assert set(owners) == {f.name for f in dataclasses.fields(Config)}
    assert len(BY_KEY) == len(SETTINGS)  # no key twice


def test_config_and_table_must_agree_or_the_package_does_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    config._check_table()  # what importing fastsmtp.config did
    recipients = BY_KEY["max-recipients"]
    changed = tuple(dataclasses.replace(s, default=99) if s is recipients else s for s in SETTINGS)
    monkeypatch.setattr(config, "SETTINGS", changed)
    with pytest.raises(TypeError, match="^settings: Config and the table differ in max_recipients$"):
        config._check_table()
    monkeypatch.setattr(config, "SETTINGS", tuple(s for s in SETTINGS if s is not recipients))
    with pytest.raises(TypeError, match="differ in max_recipients$"):
        config._check_table()


def test_config_defaults_are_the_table_defaults() -> None:
    defaults = Config()
    for setting in SETTINGS:
        values = tuple(getattr(defaults, name) for name in setting.fields)
        if setting.kind is Kind.LISTEN:
            assert ":".join(map(str, values)) == setting.default
        else:
            assert values == (setting.default,), setting.key


def _serve_flags(parser: argparse.ArgumentParser, *path: str) -> dict[str, argparse.Action]:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("path", [("serve",), ("config", "show")])
def test_every_flag_comes_from_the_table(path: tuple[str, ...]) -> None:
    flags = _serve_flags(build_parser(), *path)
    assert list(flags) == ["--config"] + [f"--{s.key}" for s in SETTINGS]
    for setting in SETTINGS:
        action = flags[f"--{setting.key}"]
        assert action.help == setting.help
        assert action.choices == (setting.choices or None)
        if setting.metavar is not None:
            assert action.metavar == setting.metavar


def test_every_key_reads_back_from_the_example_and_from_show() -> None:
    defaults = dataclasses.asdict(Config())
    # The example's mail-root is made absolute, and workers is commented out.
    from_example = read_file(str(EXAMPLE))
    assert set(from_example) == set(defaults) - {"workers"}
    assert {k: v for k, v in from_example.items() if k != "mail_root"} == {
        k: v for k, v in defaults.items() if k not in ("mail_root", "workers")}
    shown = tomllib.loads(to_toml(Config()))
    assert list(shown) == list(setting_keys())
    assert sorted(shown) == sorted(BY_KEY)


def test_the_example_file_is_generated() -> None:
    assert EXAMPLE.read_text() == example_toml(), "regenerate it: python tests/test_settings_table.py"


def test_config_example_prints_the_example_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "example"]) == 0
    assert capsys.readouterr() == (EXAMPLE.read_text(), "")


def test_the_readme_table_is_generated() -> None:
    readme = README.read_text()
    assert readme_with_table(readme, readme_table()) == readme, "regenerate it: python tests/test_settings_table.py"
    assert readme_table().count("\n") == len(SETTINGS) + 2


def test_rows_are_grouped_by_section() -> None:
    seen: list[str] = []
    for setting in SETTINGS:
        if not seen or seen[-1] != setting.section:
            assert setting.section not in seen, f"{setting.key}: its section {setting.section!r} is split"
            seen.append(setting.section)


def test_every_row_has_its_texts() -> None:
    for previous, setting in zip((None, *SETTINGS), SETTINGS):
        assert setting.doc, setting.key
        # A row without a comment shares the one above it, in its section.
        assert setting.comment or (previous is not None and previous.section == setting.section), setting.key
        # An empty default says nothing in the README's default column.
        assert setting.default not in ("", ()) or setting.shown_default, setting.key


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.key for s in SETTINGS])
def test_each_default_passes_its_own_check(setting: Setting) -> None:
    value = tuple(getattr(Config(), n) for n in setting.fields)
    assert setting.problem(value if len(value) > 1 else value[0]) is None


def test_a_choice_out_of_the_table_is_refused() -> None:
    for setting in SETTINGS:
        if setting.choices:
            changed: dict[str, Any] = {setting.fields[0]: "nonsense"}
            with pytest.raises(ConfigError, match=f"^{setting.key} must be .*, not 'nonsense'$"):
                dataclasses.replace(Config(), **changed).validate()


if __name__ == "__main__":
    EXAMPLE.write_text(example_toml())
    README.write_text(readme_with_table(README.read_text(), readme_table()))
    sys.exit(0)

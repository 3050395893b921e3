"""The `lorakit` entry point: command list, --help everywhere, one-line errors with exit status 2."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lorakit import cli

MINE = ["demo", "train", "generate", "chat", "merge", "inspect"]


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lorakit argv…`, run in this process."""
    code = cli.main(list(argv))  # returns the status, even for --help and usage errors
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert set(MINE) <= set(cli.COMMANDS)
    assert re.findall(r"^    (\w+)\b", out, re.M) == list(cli.COMMANDS)  # one row each, in table order


def test_table_names_estimate_and_serve():
    assert cli.COMMANDS["estimate"] == "lorakit.commands.estimate"
    assert cli.COMMANDS["serve"] == "lorakit.commands.serve"


def test_missing_command_module_is_an_error(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "later", "lorakit.commands.not_written_yet")
    with pytest.raises(ModuleNotFoundError, match="not_written_yet"):
        cli.main(["--help"])


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_module_has_the_interface(name):
    module = importlib.import_module(cli.COMMANDS[name])
    assert isinstance(module.HELP, str) and "\n" not in module.HELP
    assert callable(module.add_arguments) and callable(module.run)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_help(capsys, name):
    code, out, _ = run_cli(capsys, name, "--help")
    assert code == 0
    assert out.startswith(f"usage: lorakit {name}")
    assert "--debug" in out


def test_train_flags_come_from_the_config_dataclass(capsys):
    import dataclasses

    from lorakit.train import TrainConfig

    _, out, _ = run_cli(capsys, "train", "--help")
    for field in dataclasses.fields(TrainConfig):
        if field.init and not field.name.startswith("_"):
            assert "--" + field.name.replace("_", "-") in out


def test_no_command_prints_help_and_fails(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and "COMMAND" in out


def test_unknown_command_is_one_line(capsys):
    code, out, err = run_cli(capsys, "trian")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lorakit: error:") and "trian" in err


def test_bad_option_is_one_line(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "x", "--max-new-tokens", "many")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("lorakit generate: error:") and "many" in err


def test_missing_adapter_is_one_line(capsys, tmp_path):
    missing = tmp_path / "no-such-adapter"
    code, out, err = run_cli(capsys, "generate", "--adapter", str(missing), "--prompt", "hello")
    assert code == 2 and out == ""
    assert err == f"lorakit: error: adapter directory not found: {missing}\n"


def test_dir_without_adapter_config_is_named(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 2 and err.count("\n") == 1
    assert str(tmp_path) in err and "adapter_config.json" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        cli.main(["--debug", "inspect", str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError):  # also accepted after the command
        cli.main(["inspect", str(tmp_path / "nope"), "--debug"])


def test_warnings_print_as_one_line(capsys, monkeypatch):
    import argparse

    def noisy(args: argparse.Namespace) -> int:
        warnings.warn("first line\nsecond line", UserWarning)
        return 0

    module = cli.load_commands()["inspect"]
    monkeypatch.setattr(module, "run", noisy)
    code, _, err = run_cli(capsys, "inspect", "x")
    assert code == 0 and err == "lorakit: warning: first line second line\n"


def test_python_dash_m_lorakit_is_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for name in cli.COMMANDS:
        assert f"    {name} " in result.stdout
    script = Path(sys.executable).with_name("lorakit")
    if script.exists():  # the console script of the installed package
        same = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert same.returncode == 0 and same.stdout == result.stdout

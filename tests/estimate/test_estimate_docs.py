"""docs/estimate.md shows real output: every `$ lorakit estimate …` block is rerun and compared."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lorakit.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "estimate.md"


def _examples() -> list[tuple[str, str]]:
    """(command line, expected output) of each console block that runs `lorakit estimate`."""
    blocks = re.findall(r"```console\n\$ (lorakit estimate [^\n]*)\n(.*?)```", DOC.read_text(), flags=re.S)
    return [(command, output.rstrip("\n")) for command, output in blocks]


def test_the_doc_has_examples():
    assert len(_examples()) >= 2


@pytest.mark.parametrize("command,expected", _examples(), ids=lambda value: value[:40])
def test_doc_example_matches_the_command(command, expected, capsys):
    assert main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected

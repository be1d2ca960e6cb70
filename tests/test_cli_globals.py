"""Global options are taken from anywhere on the line; `files script -o FILE` names the script file."""

from __future__ import annotations

import pytest

from vmvault.cli.state import split_globals
from vmvault.errors import InvalidInput


def test_output_and_home_before_or_after_the_command() -> None:
    state, rest = split_globals(["--home", "/h", "vault", "list", "-o", "json"])
    assert (state.output, state.home, rest) == ("json", "/h", ["vault", "list"])


def test_files_script_dash_o_is_the_script_file_not_the_format() -> None:
    state, rest = split_globals(["-o", "json", "files", "script", "vm1", "--rp", "r1", "-o", "/tmp/vm1.sh"])
    assert state.output == "json"
    assert rest == ["files", "script", "vm1", "--rp", "r1", "--file", "/tmp/vm1.sh"]


def test_unknown_output_format_is_refused_elsewhere() -> None:
    with pytest.raises(InvalidInput, match="unknown output format"):
        split_globals(["vault", "list", "-o", "/tmp/x"])

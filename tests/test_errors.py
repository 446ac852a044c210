"""The error contract: a user's mistake is one line and a non-zero exit; a bug keeps its traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from atlasq import api, cli
from atlasq.errors import AtlasqError, DamagedError, InvalidOptionError, NotFoundError
from atlasq.home import RESERVED, atlas_folder, check_name, index_folder

runner = CliRunner()


@pytest.mark.parametrize("error, code", [(NotFoundError("no index at x"), 1), (DamagedError("x is damaged"), 1),
                                         (InvalidOptionError("-k must be at least 1"), 2)])
def test_a_users_error_is_one_line_and_its_exit_code(monkeypatch, error, code):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(api, "index_info", fails)
    human = runner.invoke(cli.app, ["info", "x"])
    assert human.exit_code == code and isinstance(human.exception, SystemExit)
    assert human.stdout == "" and human.stderr == f"error: {error}\n"
    machine = runner.invoke(cli.app, ["info", "x", "--json"])
    assert machine.exit_code == code
    assert json.loads(machine.stdout) == {"error": str(error)}  # stdout holds only the JSON


def test_a_bug_is_not_dressed_as_a_users_error(monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("an internal inconsistency")  # not an AtlasqError: a bug

    monkeypatch.setattr(api, "index_info", bug)
    result = runner.invoke(cli.app, ["info", "x"])
    assert isinstance(result.exception, ValueError) and "error:" not in result.output


def test_every_user_error_is_also_the_builtin_a_caller_expects():
    assert issubclass(InvalidOptionError, ValueError) and issubclass(NotFoundError, FileNotFoundError)
    assert all(issubclass(e, AtlasqError) for e in (InvalidOptionError, NotFoundError, DamagedError))


@pytest.mark.parametrize("name", ["", " ", "a/b", "..", ".hidden", "a\\b", "new\nline", "x" * 129])
def test_names_that_would_leave_their_namespace_are_refused(name):
    with pytest.raises(InvalidOptionError):
        check_name(name)
    with pytest.raises(InvalidOptionError):
        atlas_folder(name, "home")


def test_the_homes_own_folder_names_are_refused_for_indexes_only(tmp_path):
    for name in sorted(RESERVED) + ["Atlases"]:
        with pytest.raises(InvalidOptionError, match="reserved"):
            index_folder(name, tmp_path)
    assert atlas_folder("atlases", tmp_path) == tmp_path / "atlases" / "atlases"  # inside the atlas namespace
    assert index_folder("photos", tmp_path) == tmp_path / "photos"

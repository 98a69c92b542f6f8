"""`calibra --version`: one line, the package's one version string."""

import pytest

import calibra
from calibra import cli


def test_version_flag_prints_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"calibra {calibra.__version__}\n"

"""The CLI's contract for user errors, shared by the CLI, server and benchmark tests."""

from __future__ import annotations

import pytest

from specdec.cli import main


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run main(argv), expecting a user error: exit code 2 (returned or raised by argparse) and one stderr line."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err

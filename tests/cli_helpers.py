"""Shared helpers of the command-line tests."""
from steerflow.cli.main import main


def run_cli(capsys, *argv):
    """Run ``steerflow *argv`` in-process; return (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments):
    """Exit code 2, one line on stderr starting ``steerflow: error:``, no traceback, naming ``fragments``."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("steerflow: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])

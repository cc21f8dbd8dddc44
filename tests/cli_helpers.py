"""Shared helpers of the command-line tests (the ``steerflow`` CLI in-process, scripts in a subprocess)."""
import subprocess
import sys
from pathlib import Path

from steerflow.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def run_script(relpath, *args, cwd=ROOT, timeout=600) -> str:
    """Run ``python ROOT/relpath *args`` (a benchmark or example script); assert it exits 0, return its stdout."""
    proc = subprocess.run([sys.executable, str(ROOT / relpath), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


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

"""`import kiln` and `kiln --help` stay light: no torch until a command needs it."""

import subprocess
import sys


def test_import_kiln_does_not_import_torch():
    code = "import sys, kiln, kiln.cli, kiln.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("run", "validate", "inspect"):
        assert cmd in out.stdout

"""Run a test script in a fresh Python process under the Triton interpreter (a kernel binds
to the interpreter when its module is first imported, so it cannot be switched on inside
a process that already imported it)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(script: str, *args: str, **env: str) -> str:
    """`script` run from the repository root with TRITON_INTERPRET=1 (and `env`); its stdout.
    Fails the test with the end of stderr when the script fails."""
    environ = dict(os.environ, TRITON_INTERPRET="1", **env)
    run = subprocess.run([sys.executable, "-c", script, *args], env=environ, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout

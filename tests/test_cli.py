"""The command line: exit status 2 and one line for bad input; tables for good input."""

import subprocess
import sys

import pytest

from slimfx.compiler.cli import main


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[compile]\ncodegen = "inductr"\n')
    assert main(["config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("slimfx: config error: compile.codegen: got 'inductr'") and "did you mean 'inductor'" in err


def test_run_rejects_bad_config_before_loading_the_model(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[passes.kv_eviction]\nbudgte = 3\n")
    proc = subprocess.run([sys.executable, "-m", "slimfx", "run", "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    from slimfx.passes.kv_eviction import OPTIONS

    allowed = ", ".join(sorted(OPTIONS))  # the pass's own option table, so a new option needs no edit here
    assert proc.stderr.strip() == (
        f"slimfx: config error: passes.kv_eviction.budgte: unknown key; allowed: {allowed} (did you mean 'budget'?)"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["run", "--max-new-tokens", "0"], "--max-new-tokens 0: allowed: an integer >= 1"),
    (["run", "--model", "/no/such/model"], "--model /no/such/model: no such file or folder"),
    (["inspect", "--tiny", "gpt2"], "--tiny gpt2: unknown"),
])
def test_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimfx: error: " + message) and err.count("\n") == 1


def test_inspect_tiny_prints_the_anatomy(capsys):
    assert main(["inspect", "--tiny", "gptfast"]) == 0
    out = capsys.readouterr().out
    assert "attention sites 2" in out and "layers.1.attention.wqkv.weight" in out and "interleaved" in out


def test_config_schema_lists_every_pass(capsys):
    from slimfx.compiler.registry import registered_passes

    assert main(["config", "--schema"]) == 0
    out = capsys.readouterr().out
    for name in registered_passes():
        if registered_passes()[name].OPTIONS:
            assert f"[passes.{name}]" in out


def test_top_level_help_imports_no_torch():
    # The command modules import torch (seconds of start-up); `slimfx --help` lists
    # them from their help texts alone.
    code = (
        "import sys\n"
        "from slimfx.compiler.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'slimfx --help imported torch'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "run " in proc.stdout and "calibrate" in proc.stdout and proc.stdout.rstrip().endswith("ok")


def test_subcommand_help_shows_its_options():
    proc = subprocess.run([sys.executable, "-m", "slimfx", "run", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout

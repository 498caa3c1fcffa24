"""Every configuration in examples/ does what its comments say: `slimfx config` accepts
it, or refuses it in one line naming the calibration file it still needs; every
`slimfx calibrate ... --out PATH` in its comments (run from the repository root)
writes the file its [artifacts] table reads; every command names the file itself."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from slimfx.compiler.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def _comment_commands(text: str) -> list[list[str]]:
    """The `slimfx ...` commands in the file's comments, as argument lists."""
    commands = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            for m in re.finditer(r"slimfx ((?:calibrate|config|run|eval)\b[^`(;]*)", line):
                commands.append(shlex.split(m.group(1)))
    return commands


def _artifact_files(path: Path) -> set[Path]:
    """Every artifact path the file gives (commented-out lines included), resolved as
    slimfx resolves them: relative to the file."""
    text = path.read_text()
    return {(path.parent / p).resolve() for p in re.findall(r"\b\w+ = \"([^\"]+\.(?:json|safetensors))\"", text)}


def test_there_are_examples():
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_config_check_accepts_it_or_names_the_missing_calibration_file(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc = main(["config", str(path.relative_to(ROOT))])
    out, err = capsys.readouterr()
    if rc == 0:
        assert "valid; pipeline" in out and err == ""
        return
    assert rc == 2 and err.count("\n") == 1 and "is not found" in err, err
    outs = [cmd[cmd.index("--out") + 1] for cmd in _comment_commands(path.read_text()) if cmd[0] == "calibrate" and "--out" in cmd]
    assert outs, f"{path.name} needs a calibration file but its comments give no `slimfx calibrate ... --out`"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_commands_in_comments_fit_the_file(path):
    readable = _artifact_files(path)
    for cmd in _comment_commands(path.read_text()):
        if cmd[0] == "calibrate" and "--out" in cmd:  # not a mention like `slimfx calibrate skip`
            out = (ROOT / cmd[cmd.index("--out") + 1]).resolve()
            assert out in readable, f"{path.name}: `slimfx {' '.join(cmd)}` writes {out}, the config reads {sorted(map(str, readable))}"
        elif "--config" in cmd or cmd[0] == "config":
            named = cmd[cmd.index("--config") + 1] if "--config" in cmd else cmd[1]
            assert (ROOT / named).resolve() == path.resolve(), f"{path.name}: `slimfx {' '.join(cmd)}` names another file"


def test_a_calibration_file_made_as_the_comment_says_satisfies_the_check(tmp_path, capsys, monkeypatch):
    """vq_logits.toml with its codebook where its comment writes it: the check passes
    (the copy lives in tmp_path, so the artifact path is rebuilt there); a file there that
    is no codebook is refused in one line. Without --model the check reads the codebook
    but not which head it was made for, so a small one built from random rows stands in."""
    import torch

    from slimfx.calibrate.vq_head import build_artifact
    from slimfx.runtime.vq_head import save_artifact

    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    config = tmp_path / "examples" / "vq_logits.toml"
    config.write_text((ROOT / "examples" / "vq_logits.toml").read_text())
    [cmd] = [c for c in _comment_commands(config.read_text()) if c[0] == "calibrate" and "--out" in c]
    out = tmp_path / cmd[cmd.index("--out") + 1]
    assert main(["config", "examples/vq_logits.toml"]) == 2
    capsys.readouterr()
    out.parent.mkdir(parents=True)
    out.write_bytes(b"not a codebook")
    assert main(["config", "examples/vq_logits.toml"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    save_artifact(build_artifact(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), 4), out)
    assert main(["config", "examples/vq_logits.toml"]) == 0

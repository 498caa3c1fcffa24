"""Ahead-of-time export (export/): a package generates what the JIT path generates, in a
fresh process that never imports the model's code, and refuses, in one line, anything
that differs from what was exported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slimfx.export.build import export_package
from slimfx.export.manifest import MANIFEST, PackageError, read_manifest, write_manifest
from slimfx.export.package import load_package
from slimfx.runtime.generate import GenerateError, generate
from tests.test_runtime_generate import lively_tiny

ROOT = Path(__file__).resolve().parents[1]
EVICT = {"pipelines": {"p": ["kv_eviction", "quantize"]}, "compile": {"pipeline": "p"},
         "passes": {"kv_eviction": {"policy": "h2o", "budget": 24, "n_sink": 2, "window": 4}, "quantize": {"format": "int8"}}}
# Every pass that changes what a package holds: a KV-sharing reader, a removed block, evicted and quantized.
LOSSY = {"pipelines": {"p": ["kv_share", "layer_skip", "kv_eviction", "quantize"]}, "compile": {"pipeline": "p"},
         "passes": {**EVICT["passes"], "kv_share": {"map": "2:1"}, "layer_skip": {"blocks": [3]}}}


@pytest.fixture(scope="module")
def model():
    return lively_tiny(layers=4, seed=1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 128, (2, 21), generator=torch.Generator().manual_seed(6))


@pytest.fixture(scope="module")
def packages(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    return {name: export_package(model, root / name, config=cfg, batch=2, capacity=96, chunk=16, progress=lambda _: None)
            for name, cfg in (("plain", None), ("lossy", LOSSY))}


def _fresh_process_tokens(package: Path, ids: torch.Tensor) -> tuple[list, list]:
    """Tokens from the package in a new interpreter, and the transformers modules it imported."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(ROOT.parent)!r})
        import slimfx
        pkg = slimfx.load_package({str(package)!r})
        ids = torch.tensor({ids.tolist()!r})
        out = pkg.generate(ids, max_new_tokens=10)
        print(json.dumps([out.tokens.tolist(), sorted(m for m in sys.modules if m.startswith("transformers"))]))
    """)
    link = Path(ROOT.parent) / "slimfx"
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent) if link.exists() else os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name, config", [("plain", None), ("lossy", LOSSY)])
def test_package_in_a_fresh_process_equals_the_jit_path(packages, model, ids, name, config):
    want = generate(model, ids, max_new_tokens=10, capacity=96, prefill_chunk=16, config=config).tokens
    tokens, imported = _fresh_process_tokens(packages[name], ids)
    assert tokens == want.tolist()
    assert not [m for m in imported if m.startswith("transformers.models")], imported  # no model code


@pytest.mark.slow
def test_an_aotinductor_package_equals_the_jit_path(tmp_path):
    """AOTInductor compiles the step programs with slimfx's attention op left as a call into
    the op; one layer keeps the C++ build short on CPU."""
    model = lively_tiny(layers=1, seed=2)
    ids = torch.randint(1, 128, (1, 19), generator=torch.Generator().manual_seed(3))
    want = generate(model, ids, max_new_tokens=6, capacity=48, prefill_chunk=16, config=EVICT).tokens
    pkg = export_package(model, tmp_path / "aoti", config=EVICT, batch=1, capacity=48, chunk=16, progress=lambda _: None,
                         compile="aoti")
    manifest = read_manifest(pkg)
    assert [p.get("runner") for p in manifest["programs"]] == ["aoti", "aoti"], [p.get("aoti_failed") for p in manifest["programs"]]
    assert {"programs/step_1.aoti.pt2", "programs/step_16.aoti.pt2"} <= set(manifest["files"])
    assert torch.equal(load_package(pkg).generate(ids, max_new_tokens=6).tokens, want)


def test_manifest_names_every_file_and_the_lossy_package_is_smaller(packages):
    manifest = read_manifest(packages["lossy"])
    assert set(manifest["files"]) == {"weights.safetensors", "constants.safetensors", "programs/step_1.pt2", "programs/step_16.pt2"}
    assert manifest["passes"] == ["kv_share", "layer_skip", "kv_eviction", "quantize"]
    assert manifest["shapes"] == {"batch": 2, "capacity": 96, "chunk": 16}
    # Block 3 is gone with its site; block 2 reads block 1's evicted store.
    assert {s["index"]: s["layout"] for s in manifest["store"]["sites"]} == {
        0: "evict/h2o/2/4/0.0/0", 1: "evict/h2o/2/4/0.0/0", 2: "read/evict/h2o/2/4/0.0/0"}
    plain = read_manifest(packages["plain"])
    # int8 weights: the float weights of the quantized linears are not in the package.
    weights = lambda m: m["files"]["weights.safetensors"]["bytes"] + m["files"]["constants.safetensors"]["bytes"]
    assert weights(manifest) < 0.6 * weights(plain)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("target", ["weights.safetensors", "constants.safetensors", "programs/step_1.pt2", "programs/step_16.pt2"])
def test_a_flipped_byte_in_any_file_is_refused(packages, tmp_path, target):
    pkg = _copy(packages["lossy"], tmp_path)
    data = bytearray((pkg / target).read_bytes())
    data[len(data) // 2] ^= 0x01
    (pkg / target).write_bytes(bytes(data))
    with pytest.raises(PackageError) as err:
        load_package(pkg)
    assert str(err.value) == f"package {str(pkg)!r}: file {target} was changed after export (sha256 differs)"


def test_a_truncated_or_missing_file_is_refused(packages, tmp_path):
    pkg = _copy(packages["plain"], tmp_path)
    path = pkg / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PackageError, match=r"file weights.safetensors has \d+ bytes, the manifest says \d+ \(truncated or replaced\)$"):
        load_package(pkg)
    path.unlink()
    with pytest.raises(PackageError, match="file weights.safetensors is missing$"):
        load_package(pkg)


def test_a_changed_manifest_is_refused(packages, tmp_path):
    pkg = _copy(packages["plain"], tmp_path)
    manifest = json.loads((pkg / MANIFEST).read_text())
    manifest["shapes"]["capacity"] = 4096  # edited by hand: its checksum no longer matches
    (pkg / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="manifest.json was changed after export"):
        load_package(pkg)


@pytest.mark.parametrize("key, value, what", [("torch", "2.0.0", "torch 2.0.0"), ("device", "cuda", "device kind cuda"),
                                              ("triton", "0.1", "triton 0.1")])
def test_a_package_built_elsewhere_is_refused(packages, tmp_path, key, value, what):
    pkg = _copy(packages["plain"], tmp_path)
    manifest = json.loads((pkg / MANIFEST).read_text())
    manifest["environment"][key] = value
    write_manifest(pkg, manifest)  # a consistent manifest of another environment
    with pytest.raises(PackageError, match=f"built for {what}, this machine has .*; allowed: the environment it was exported in"):
        load_package(pkg, device="cpu")


def test_generate_refuses_what_the_package_was_not_built_for(packages, ids):
    pkg = load_package(packages["plain"])
    with pytest.raises(GenerateError, match="this package was exported for batch 2"):
        pkg.generate(ids[:1], max_new_tokens=4)
    with pytest.raises(GenerateError, match="need 132 KV slots; this package holds 96"):
        pkg.generate(ids, max_new_tokens=100)


@pytest.mark.model
def test_cli_export_inspect_and_run(tmp_path, capsys):
    from slimfx.compiler.cli import main

    out = tmp_path / "pkg"
    assert main(["export", "--out", str(out), "--capacity", "128", "--chunk", "32", "--device", "cpu"]) == 0
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "slimfx package v2 of SmolLM2" in shown and "files: all as exported" in shown
    assert main(["run", "--package", str(out), "--max-new-tokens", "8", "--no-stream"]) == 0
    assert "package" in capsys.readouterr().out

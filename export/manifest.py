"""The package manifest: what a package holds and what it was built for, verified before
anything in the package is loaded.

manifest.json (JSON, no pickle) names every other file with its size and the sha256 of
each of its 64 MiB blocks, the environment the graphs were built for (slimfx, torch and
triton versions; device kind and CUDA capability), and carries a checksum of its own
content, so a changed byte anywhere is found before a loader touches the file.

Why blocks: one sha256 over a file is sequential, about 1.5 GB/s on one core, so a 2.5 GB
bf16 package spent seconds of its load in hashing; block digests are computed on all
cores at once (hashlib releases the GIL), and a changed byte still changes one of them."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from slimfx.compiler.errors import UsageError

FORMAT = "slimfx.package"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class PackageError(UsageError):
    """A package that cannot be loaded as it is; one line saying what differs."""


BLOCK_BYTES = 64 << 20


def _block_sha256(path: Path, start: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = BLOCK_BYTES
        while left:
            piece = f.read(min(left, 1 << 20))
            if not piece:
                break
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def block_digests(paths: list[Path]) -> dict[Path, list[str]]:
    """path -> sha256 of each BLOCK_BYTES block of the file (an empty file has one, of no bytes),
    hashed on all cores."""
    jobs = [(p, start) for p in paths for start in range(0, max(p.stat().st_size, 1), BLOCK_BYTES)]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1) or 1) as pool:
        hashes = list(pool.map(lambda job: _block_sha256(*job), jobs))
    out: dict[Path, list[str]] = {p: [] for p in paths}
    for (p, _), h in zip(jobs, hashes):
        out[p].append(h)
    return out


def file_digests(folder: Path) -> dict[str, dict]:
    """{relative path: {sha256 (one per block), bytes}} of every file under `folder` but the manifest."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    digests = block_digests(paths)
    return {str(p.relative_to(folder)): {"sha256": digests[p], "bytes": p.stat().st_size} for p in paths}


def _slimfx_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slimfx")
    except PackageNotFoundError:
        return None  # a source tree, not installed


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    capability = list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    return {"slimfx": _slimfx_version(), "torch": torch.__version__, "triton": triton_version,
            "device": device.type, "capability": capability}


def _checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    manifest = dict(manifest, checksum=_checksum(manifest))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(folder: Path) -> dict:
    """The manifest of the package at `folder`, its own checksum verified (files not checked)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackageError(f"package {str(folder)!r}: no {MANIFEST}; allowed: a folder written by `slimfx export`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"package {str(folder)!r}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"package {str(folder)!r}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("checksum") != _checksum(manifest):
        raise PackageError(f"package {str(folder)!r}: {MANIFEST} was changed after export (its checksum does not match)")
    if manifest.get("version") != FORMAT_VERSION:
        raise PackageError(f"package {str(folder)!r}: format version {manifest.get('version')}; this slimfx reads version {FORMAT_VERSION}")
    return manifest


def check_environment(manifest: dict, device: torch.device, folder) -> None:
    """PackageError naming the first difference between the build environment and this one."""
    built = manifest["environment"]
    here = environment(device)
    for key in ("torch", "triton", "device", "capability"):
        if built.get(key) != here.get(key):
            what = {"capability": "CUDA capability", "device": "device kind"}.get(key, key)
            raise PackageError(f"package {str(folder)!r}: built for {what} {built.get(key)}, this machine has {here.get(key)}; "
                               "allowed: the environment it was exported in (export it again here)")


def verify_files(manifest: dict, folder) -> None:
    """PackageError for a missing, extra-short or changed file (sha256 and size against the manifest)."""
    folder = Path(folder)
    for rel, want in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise PackageError(f"package {str(folder)!r}: file {rel} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise PackageError(f"package {str(folder)!r}: file {rel} has {size} bytes, the manifest says {want['bytes']} (truncated or replaced)")
    digests = block_digests([folder / rel for rel in manifest["files"]])
    for rel, want in manifest["files"].items():
        if digests[folder / rel] != want["sha256"]:
            raise PackageError(f"package {str(folder)!r}: file {rel} was changed after export (sha256 differs)")


def verify(folder, device: torch.device) -> dict:
    """The manifest of a package whose every file is as exported, built for this environment."""
    manifest = read_manifest(folder)
    check_environment(manifest, device, folder)
    verify_files(manifest, folder)
    return manifest

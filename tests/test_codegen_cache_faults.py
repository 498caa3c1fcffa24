"""Faults in slimfx's on-disk caches: nothing read back is used unverified.

Kernel cache ($SLIMFX_CACHE_DIR/kernels/k_<sha>.py): a copy of the generated source;
each process compares it with the source it generated and runs that source, never the
file, so a bad or planted file is rewritten (one warning) and cannot execute. An
unwritable or misplaced cache folder runs uncached (one warning). Autotune cache
(autotune/<xx>/<key>.json): every entry is checked (config_problem) before a launch.

Kernels run under the Triton interpreter on CPU. A "fresh process" is emulated by
forgetting the modules this process loaded (triton_gen._MODULES).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import stat
import tempfile
import warnings

import pytest
import torch
import torch.fx

from slimfx.codegen import compile_graph, triton_gen
from slimfx.codegen.autotune import (DiskCache, GEMM_DOT, GEMM_GEMV, GEMM_LIBRARY, MAX_SPLIT_K, Tuner, config_problem,
                                     config_space, heuristic_config)


def _fn(x):
    return (x * 2.0 + 1.0,)


def _reference(x):
    return x * 2.0 + 1.0


@pytest.fixture(scope="module")
def group():
    """The one pointwise group of _fn, compiled for the interpreter (no cache access yet:
    the kernel module is loaded on the first call)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        compiled = compile_graph(torch.fx.symbolic_trace(_fn), [torch.randn(37)])
    [only] = compiled.slimfx_codegen.groups
    assert only.source is not None, only.error
    return only


@pytest.fixture
def cache(monkeypatch, tmp_path, group):
    """A fresh cache folder and a process that has loaded no kernel yet."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(root))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_gen, "_MODULES", {})
    group.kernel = None
    return root


def _fresh_process(group):
    triton_gen._MODULES.clear()
    group.kernel = None


def _kernel_file(root, group):
    [path] = (root / "kernels").glob("k_*.py")
    assert path.read_text() == group.source
    return path


@contextlib.contextmanager
def slimfx_warnings():
    """Collects slimfx's warning messages (filled in when the block exits)."""
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    seen += [str(w.message) for w in caught if str(w.message).startswith("slimfx")]


def _run_and_check(group):
    x = torch.randn(37, generator=torch.Generator().manual_seed(0))
    [out] = group(x)
    torch.testing.assert_close(out, _reference(x))


# ----------------------------------------------------------------------------- kernel cache


def test_kernel_file_is_written_once_and_reused_silently(cache, group):
    with slimfx_warnings() as seen:
        _run_and_check(group)
        path = _kernel_file(cache, group)
        mtime = path.stat().st_mtime_ns
        _fresh_process(group)
        _run_and_check(group)
    assert seen == []
    assert path.stat().st_mtime_ns == mtime  # a matching file is left alone


def _altered(source: str) -> str:
    """Valid Python computing different numbers."""
    altered = source.replace("* 2.0", "* 3.0")
    assert altered != source
    compile(altered, "altered", "exec")
    return altered


BAD_FILES = {
    "empty": (lambda src: "", "empty"),
    "garbage": (lambda src: "\x00\xff garbage ((( not python", "differs"),
    "truncated": (lambda src: src[: len(src) // 2], "truncated"),
    "altered": (_altered, "differs"),
}


@pytest.mark.parametrize("fault", sorted(BAD_FILES))
def test_bad_kernel_file_is_rewritten(cache, group, fault):
    _run_and_check(group)
    path = _kernel_file(cache, group)
    corrupt, reason = BAD_FILES[fault]
    path.write_bytes(corrupt(group.source).encode())
    _fresh_process(group)
    with slimfx_warnings() as seen:
        _run_and_check(group)  # the altered file would give x * 3 + 1
    assert len(seen) == 1 and str(path) in seen[0] and reason in seen[0], seen
    assert path.read_text() == group.source
    assert not list((cache / "kernels").glob("*.tmp"))


@pytest.mark.parametrize("keep_kernel", [True, False], ids=["kernel-plus-payload", "payload-only"])
def test_planted_code_in_the_kernel_file_never_runs(cache, group, tmp_path, keep_kernel):
    _run_and_check(group)
    path = _kernel_file(cache, group)
    marker = tmp_path / "planted_code_ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    path.write_text((group.source if keep_kernel else "") + payload)
    _fresh_process(group)
    with slimfx_warnings() as seen:
        _run_and_check(group)
    assert not marker.exists()
    assert len(seen) == 1 and str(path) in seen[0]
    assert path.read_text() == group.source


@contextlib.contextmanager
def _read_only(folder):
    """`folder` cannot be written. root ignores permission bits, so there the temp-file
    creation fails as it would (EACCES)."""
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if os.access(folder, os.W_OK):
                def refuse(*args, **kwargs):
                    raise PermissionError(13, "Permission denied", str(folder))

                mp.setattr(tempfile, "mkstemp", refuse)
            yield
    finally:
        folder.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("existing", [None, "garbage"], ids=["absent", "garbage-file"])
def test_read_only_kernel_cache_runs_uncached(cache, group, existing):
    folder = cache / "kernels"
    folder.mkdir(parents=True)
    name = f"k_{hashlib.sha256(group.source.encode()).hexdigest()[:24]}.py"
    if existing:
        (folder / name).write_text(existing)
    with _read_only(folder), slimfx_warnings() as seen:
        _run_and_check(group)
    assert len(seen) == 1 and "cannot be written" in seen[0] and "uncached" in seen[0], seen
    assert sorted(p.name for p in folder.iterdir()) == ([name] if existing else [])
    if existing:
        assert (folder / name).read_text() == existing  # untouched, and it did not run


def test_cache_dir_that_is_a_file_runs_uncached(cache, group):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("not a folder")
    with slimfx_warnings() as seen:
        _run_and_check(group)
    assert len(seen) == 1 and str(cache) in seen[0] and "uncached" in seen[0], seen
    assert cache.read_text() == "not a folder"


PAD = "# " + "x" * 60 + "\n"


def _race_loader(root: str, rounds: int, barrier, results) -> None:
    """Loads `rounds` sources that the other process loads too, all at once."""
    os.environ["SLIMFX_CACHE_DIR"] = root
    barrier.wait()
    with slimfx_warnings() as seen:
        values = [triton_gen.load_module(f"VALUE = {i}\n" + PAD * 2000).VALUE for i in range(rounds)]
    results.put((values, seen))


def test_two_processes_writing_kernel_files_at_once(tmp_path):
    """~120 KB files created by two processes at once: a partly written file would be
    seen by the other one as truncated (a warning) if writes were not atomic."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results, rounds = ctx.Barrier(2), ctx.Queue(), 40
    procs = [ctx.Process(target=_race_loader, args=(str(tmp_path), rounds, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for values, seen in outcomes:
        assert values == list(range(rounds)) and seen == []
    files = sorted((tmp_path / "kernels").iterdir())
    assert len(files) == rounds and all(f.name.startswith("k_") and f.suffix == ".py" for f in files)
    assert {f.read_text().split("\n", 1)[0] for f in files} == {f"VALUE = {i}" for i in range(rounds)}


# ----------------------------------------------------------------------------- autotune cache


class DiskTuned:
    """Routes a generated kernel's launches through Tuner.tuned, the GPU path that reads
    the disk cache, so the cache is exercised on CPU; the fake timer prefers BLOCK 128."""

    def __init__(self, root):
        self.tuner = Tuner(DiskCache(root), timer=self.fake_timer)

    @staticmethod
    def fake_timer(launch_fn, config):
        launch_fn(config)
        return abs(config["BLOCK"] - 128) + 1.0

    def launch(self, kernel_hash, template, sizes, dtype, device, launch_fn):
        launch_fn(self.tuner.tuned(kernel_hash, template, sizes, dtype, "FakeGPU", launch_fn))


def _with_tuner(group, monkeypatch, root):
    tuner = DiskTuned(root)
    monkeypatch.setitem(group._kernel_fn().__globals__, "TUNER", tuner)
    return tuner.tuner


BAD_ENTRIES = {
    "unknown-key": {"FOO": 1},
    "block-0": {"BLOCK": 0, "num_warps": 4, "num_stages": 1},
    "block-3": {"BLOCK": 3, "num_warps": 4, "num_stages": 1},
    "block-neg16": {"BLOCK": -16, "num_warps": 4, "num_stages": 1},
    "block-too-big": {"BLOCK": 1 << 20, "num_warps": 4, "num_stages": 1},
    "extra-key": {"BLOCK": 128, "num_warps": 4, "num_stages": 1, "SPLIT_K": 2},
    "warps-3": {"BLOCK": 128, "num_warps": 3, "num_stages": 1},
    "stages-0": {"BLOCK": 128, "num_warps": 4, "num_stages": 0},
}


@pytest.mark.parametrize("bad", sorted(BAD_ENTRIES))
def test_bad_autotune_entry_is_discarded_and_retuned(cache, group, monkeypatch, bad):
    root = cache / "autotune"
    first = _with_tuner(group, monkeypatch, root)
    _run_and_check(group)
    [entry_path] = root.rglob("*.json")
    entry = json.loads(entry_path.read_text())
    assert first.timed == 1 and entry["config"] == config_space("pointwise", (37,))[0]
    entry_path.write_text(json.dumps({**entry, "config": BAD_ENTRIES[bad]}))
    again = _with_tuner(group, monkeypatch, root)
    with slimfx_warnings() as seen:
        _run_and_check(group)  # launched with the bad config this would raise
    assert len(seen) == 1 and str(entry_path) in seen[0] and "re-tuning" in seen[0], seen
    assert again.timed == 1
    assert json.loads(entry_path.read_text())["config"] == entry["config"]


def test_good_autotune_entry_is_reused_silently(cache, group, monkeypatch):
    root = cache / "autotune"
    _with_tuner(group, monkeypatch, root)
    _run_and_check(group)
    again = _with_tuner(group, monkeypatch, root)
    with slimfx_warnings() as seen:
        _run_and_check(group)
    assert seen == [] and again.timed == 0


def test_unwritable_autotune_cache_keeps_the_winner(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    tuner = Tuner(DiskCache(blocker / "autotune"), timer=lambda launch, cfg: abs(cfg["BLOCK"] - 512) + 1.0)
    with slimfx_warnings() as seen:
        config = tuner.tuned("k" * 24, "pointwise", (5000,), "float32", "FakeGPU", lambda cfg: None)
    assert config["BLOCK"] == 512
    assert len(seen) == 1 and "cannot write" in seen[0], seen


SIZES = {
    "pointwise": [(1,), (37,), (4096,), (10**7,)],
    "row": [(1, 1), (3, 40), (300, 2048), (5, 16384)],
    "gemm": [(m, n, k) for m in (1, 3, 16, 17, 512) for n in (8, 576, 4096) for k in (16, 2048)],
    "multi_gemv": [(1, 64, 64), (4, 4096, 8192)],
}


def test_every_config_slimfx_writes_passes_the_check():
    for template, sizes_list in SIZES.items():
        for sizes in sizes_list:
            for interpreter in (False, True):
                configs = config_space(template, sizes) + [heuristic_config(template, sizes, interpreter=interpreter)]
                for config in configs:
                    assert config_problem(template, sizes, config) is None, (template, sizes, config)


def _dot(**over):
    return {"impl": GEMM_DOT, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 4, **over}


BAD_CONFIGS = [
    ("gemm", (8, 4096, 2048), _dot(BLOCK_M=8), "BLOCK_M=8"),
    ("gemm", (8, 4096, 2048), _dot(BLOCK_K=96), "BLOCK_K=96"),
    ("gemm", (8, 4096, 2048), _dot(SPLIT_K=0), "SPLIT_K=0"),
    ("gemm", (8, 4096, 2048), _dot(SPLIT_K=MAX_SPLIT_K + 1), f"SPLIT_K={MAX_SPLIT_K + 1}"),
    ("gemm", (8, 4096, 2048), _dot(num_warps=64), "num_warps=64"),
    ("gemm", (8, 4096, 2048), _dot(impl=7), "impl=7"),
    ("gemm", (8, 4096, 2048), {"impl": GEMM_LIBRARY, "num_warps": 1, "num_stages": 1, "BLOCK_N": 16}, "keys"),
    ("gemm", (8, 4096, 2048), {**_dot(), "impl": GEMM_GEMV}, "impl=2"),
    ("gemm", (8, 4096, 2048), _dot(BLOCK_N=True), "ints"),
    ("row", (64, 4096), {"BLOCK_R": 16, "num_warps": 4, "num_stages": 1}, "BLOCK_R=16"),
    ("multi_gemv", (1, 4096, 4096), {"BLOCK_N": 4, "BLOCK_K": 4096 * 2, "num_warps": 4, "num_stages": 1}, "BLOCK_K=8192"),
]


@pytest.mark.parametrize("template, sizes, config, reason", BAD_CONFIGS, ids=[c[3] for c in BAD_CONFIGS])
def test_config_check_rejects(template, sizes, config, reason):
    problem = config_problem(template, sizes, config)
    assert problem is not None and reason in problem, problem

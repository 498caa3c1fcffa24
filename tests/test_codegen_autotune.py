"""The autotuner's disk cache: keys, corrupt entries, concurrent writers; config spaces."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from slimfx.codegen.autotune import DiskCache, Tuner, config_space, heuristic_config, next_pow2


def fake_timer(launch_fn, config):
    """Deterministic 'timing': the config with BLOCK 512 and 4 warps wins."""
    launch_fn(config)
    return abs(config.get("BLOCK", 0) - 512) + abs(config["num_warps"] - 4) + 1.0


def _tune(tuner, launches):
    return tuner.tuned("k" * 24, "pointwise", (5000,), "float32/float32", "FakeGPU", launches.append)


def test_winner_is_cached_on_disk_and_reused(tmp_path):
    launches = []
    first = Tuner(DiskCache(tmp_path), timer=fake_timer)
    config = _tune(first, launches)
    assert config == {"BLOCK": 512, "num_warps": 4, "num_stages": 1}
    assert first.timed == len(config_space("pointwise", (5000,))) > 1
    second = Tuner(DiskCache(tmp_path), timer=fake_timer)  # a new process: same disk
    assert _tune(second, launches) == config
    assert second.timed == 0  # read from disk, nothing timed


def test_key_changes_with_each_component():
    base = DiskCache.key("h", (1024,), "float32", "H100")
    assert len({base, DiskCache.key("h2", (1024,), "float32", "H100"), DiskCache.key("h", (2048,), "float32", "H100"),
                DiskCache.key("h", (1024,), "bfloat16", "H100"), DiskCache.key("h", (1024,), "float32", "A100")}) == 5


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"", b"\x00\xff\xfe", b'{"key": "wrong", "config": {"BLOCK": 64}}', b'{"config": "nope"}', b"[1, 2]"],
    ids=["truncated", "empty", "binary", "wrong-key", "bad-config", "not-a-dict"],
)
def test_corrupt_entry_is_ignored_and_rebuilt(tmp_path, garbage):
    launches = []
    tuner = Tuner(DiskCache(tmp_path), timer=fake_timer)
    config = _tune(tuner, launches)
    [path] = list(tmp_path.rglob("*.json"))
    path.write_bytes(garbage)
    again = Tuner(DiskCache(tmp_path), timer=fake_timer)
    assert _tune(again, launches) == config
    assert again.timed > 0  # re-benchmarked
    entry = json.loads(path.read_text())  # and rewritten whole
    assert entry["config"] == config


WRITER = textwrap.dedent(
    """
    import sys
    from slimfx.codegen.autotune import DiskCache
    cache = DiskCache(sys.argv[1])
    me = int(sys.argv[2])
    keys = [DiskCache.key(f"h{i}", (64,), "float32", "dev") for i in range(4)]
    for step in range(300):
        key = keys[step % 4]
        cache.put(key, {"BLOCK": 64 * (me + 1), "num_warps": me + 1, "step": step})
        got = cache.get(key)
        # os.replace is atomic: once written, a key is always readable and whole.
        assert got is not None and set(got) == {"BLOCK", "num_warps", "step"}, got
    """
)


def test_two_processes_writing_at_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(me)], stderr=subprocess.PIPE) for me in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    cache = DiskCache(tmp_path)
    for i in range(4):
        got = cache.get(DiskCache.key(f"h{i}", (64,), "float32", "dev"))
        assert got is not None and (got["BLOCK"], got["num_warps"]) in {(64, 1), (128, 2)}
    assert not list(tmp_path.rglob("*.tmp"))  # no temp file left behind


def test_config_spaces_and_heuristics_are_consistent():
    for sizes in [(7,), (4096,), (10**6,)]:
        space = config_space("pointwise", sizes)
        assert space and all(c["BLOCK"] >= 32 * c["num_warps"] for c in space)
        assert heuristic_config("pointwise", sizes, interpreter=False)["BLOCK"] <= 1024
    for rows, n in [(1, 64), (300, 2048), (5, 16384)]:
        space = config_space("row", (rows, n))
        # A row block stays within 32K elements (registers), BLOCK_R never past the rows.
        assert space and all(c["BLOCK_R"] * next_pow2(n) <= 32768 and c["BLOCK_R"] <= next_pow2(rows) for c in space)
        h = heuristic_config("row", (rows, n), interpreter=False)
        assert h["BLOCK_R"] >= 1 and 1 <= h["num_warps"] <= 8
    with pytest.raises(ValueError, match="unknown template"):
        config_space("matmul", (1,))


def test_decode_matmuls_are_the_ones_timed_with_a_cold_l2():
    from slimfx.codegen.autotune import GEMV_MAX_M, streams_from_memory

    assert streams_from_memory("gemm", (1, 2048, 2048)) and streams_from_memory("multi_gemv", (GEMV_MAX_M, 3072, 2048))
    assert not streams_from_memory("gemm", (512, 2048, 2048))  # prefill: compute-bound, hot timing
    assert not streams_from_memory("pointwise", (1,)) and not streams_from_memory("row", (1, 2048))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="timing needs CUDA")
def test_cold_l2_timing_reads_from_memory():
    from slimfx.codegen.autotune import _time_config

    x = torch.randn(2 << 20, device="cuda")  # 8 MB: stays in L2 when read back to back
    y = torch.empty_like(x)
    hot = _time_config(lambda cfg: y.copy_(x), {})
    cold = _time_config(lambda cfg: y.copy_(x), {}, cold_l2=True)
    assert 0 < hot < 1e4 and 0 < cold < 1e4
    assert cold > hot, (hot, cold)

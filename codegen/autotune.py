"""slimfx's autotuner: explicit config spaces, on-device timing, an on-disk cache.

    TUNER.launch(kernel_hash, template, sizes, dtype, device, launch_fn)

`launch_fn(config)` launches the kernel once with `config` (a dict of meta-parameters
plus num_warps / num_stages). On a GPU every config of the template's space is timed
on the real arguments of the first call (the generated kernels write only fresh
outputs, so re-running them is harmless) and the winner is cached. On CPU (the Triton
interpreter) nothing is timed: a heuristic picks the config. Triton's own
`@triton.autotune` needs a GPU driver, hence our own (DESIGN decision 6).
SLIMFX_AUTOTUNE=0 uses the heuristic on a GPU too (fastest compile).

Disk cache: one JSON file per key under $SLIMFX_CACHE_DIR/autotune (default
~/.cache/slimfx/autotune). Key = sha256 of (kernel source hash, shape bucket, dtype,
device name, Triton version). One file per entry and tempfile + os.replace make
writes atomic, so two processes writing at once leave whole files (the last one
wins); an unreadable or malformed entry is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

import triton

ENTRY_VERSION = 1


def cache_root() -> Path:
    root = os.environ.get("SLIMFX_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "slimfx"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def shape_bucket(template: str, sizes: tuple) -> tuple:
    """Sizes rounded so nearby shapes share a tuning result.

    pointwise: (numel,) -> next power of two. row: (rows, N) -> (pow2(rows), pow2(N));
    N decides BLOCK_N, so it is kept at its power of two exactly.
    """
    return tuple(next_pow2(s) for s in sizes)


# ----------------------------------------------------------------------------- config spaces


def config_space(template: str, sizes: tuple) -> list[dict]:
    """Every config the template may run with at these sizes.

    Kept small on purpose: each config is a separate Triton compile (~0.3 s) during
    the first call, and the generated kernels are memory-bound single passes where
    block size and warps are all that matter (no loops, so no pipelining stages).
    """
    if template == "pointwise":
        (numel,) = sizes
        top = max(128, next_pow2(numel))
        out = [{"BLOCK": b, "num_warps": w, "num_stages": 1} for b, w in ((128, 1), (256, 2), (512, 4), (1024, 4), (2048, 8)) if b <= top]
        return out
    if template == "row":
        rows, n = sizes
        block_n = next_pow2(n)
        out = []
        for block_r in (1, 2, 4, 8):
            if block_r > max(1, next_pow2(rows)) or block_r * block_n > 32768:
                continue
            for w in (1, 4, 8):
                if block_r * block_n >= 32 * w:
                    out.append({"BLOCK_R": block_r, "num_warps": w, "num_stages": 1})
        return out or [{"BLOCK_R": 1, "num_warps": 1, "num_stages": 1}]
    raise ValueError(f"unknown template {template!r}; allowed: pointwise, row")


def heuristic_config(template: str, sizes: tuple, *, interpreter: bool) -> dict:
    """The config used where nothing can be timed (CPU / interpreter) or before timing."""
    if template == "pointwise":
        (numel,) = sizes
        # The interpreter runs a program as numpy ops: fewer, larger programs are faster.
        block = min(next_pow2(numel), 8192 if interpreter else 1024)
        return {"BLOCK": max(block, 16), "num_warps": 4, "num_stages": 1}
    if template == "row":
        rows, n = sizes
        block_n = next_pow2(n)
        limit = 8192 if interpreter else 4096
        block_r = max(1, min(next_pow2(rows), limit // block_n, 64 if interpreter else 16))
        warps = max(1, min(8, block_r * block_n // 512))
        return {"BLOCK_R": block_r, "num_warps": warps, "num_stages": 1}
    raise ValueError(f"unknown template {template!r}; allowed: pointwise, row")


# ----------------------------------------------------------------------------- disk cache


class DiskCache:
    """Winners on disk: one JSON file per key, atomic writes, corrupt entries ignored."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root() / "autotune"

    @staticmethod
    def key(kernel_hash: str, bucket: tuple, dtype: str, device_name: str) -> str:
        text = json.dumps([kernel_hash, list(bucket), dtype, device_name, triton.__version__, ENTRY_VERSION])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The cached config, or None when absent, unreadable or malformed."""
        try:
            entry = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("config"), dict):
            return None
        config = entry["config"]
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in config.items()):
            return None
        return config

    def put(self, key: str, config: dict, info: dict | None = None) -> None:
        """Write atomically: a temp file in the same folder, then os.replace."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "config": config, **(info or {})}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


# ----------------------------------------------------------------------------- timing


def _time_config(launch_fn, config: dict, reps: int = 20) -> float:
    """Median time in microseconds of one launch on the current CUDA stream."""
    import torch

    launch_fn(config)  # compile + warm
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch_fn(config)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2]


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter"


class Tuner:
    """Picks a config per (kernel, bucket, dtype, device); memory cache over the disk cache.

    timer(launch_fn, config) -> microseconds; the default times on the current CUDA
    stream. Tests pass a fake timer to exercise the cache without a GPU.
    """

    def __init__(self, disk: DiskCache | None = None, timer=None):
        self._disk = disk
        self._timer = timer or _time_config
        self._memory: dict = {}
        self._lock = threading.Lock()
        self.timed = 0  # configs benchmarked by this tuner (tests read it)

    @property
    def disk(self) -> DiskCache:
        if self._disk is None:
            self._disk = DiskCache()
        return self._disk

    def choose(self, kernel_hash: str, template: str, sizes: tuple, dtype: str, device, launch_fn) -> dict:
        """The config for this launch: heuristic on CPU, cached or benchmarked on CUDA."""
        bucket = shape_bucket(template, sizes)
        mem_key = (kernel_hash, bucket, dtype, str(device))
        config = self._memory.get(mem_key)
        if config is not None:
            return config
        with self._lock:
            if device.type != "cuda":
                config = heuristic_config(template, sizes, interpreter=True)
            elif os.environ.get("SLIMFX_AUTOTUNE", "1") == "0":
                config = heuristic_config(template, sizes, interpreter=False)
            else:
                config = self.tuned(kernel_hash, template, sizes, dtype, device_name(device), launch_fn)
            self._memory[mem_key] = config
        return config

    def tuned(self, kernel_hash: str, template: str, sizes: tuple, dtype: str, device_label: str, launch_fn) -> dict:
        """The disk-cached winner, or benchmark every config, cache and return the winner."""
        key = DiskCache.key(kernel_hash, shape_bucket(template, sizes), dtype, device_label)
        config = self.disk.get(key)
        if config is None:
            config, info = self._benchmark(template, sizes, launch_fn)
            self.disk.put(key, config, info)
        return config

    def _benchmark(self, template: str, sizes: tuple, launch_fn) -> tuple[dict, dict]:
        results = []
        for config in config_space(template, sizes):
            try:
                results.append((self._timer(launch_fn, config), config))
                self.timed += 1
            except Exception:  # noqa: BLE001 - a config that fails to compile (resources) is skipped
                continue
        if not results:
            return heuristic_config(template, sizes, interpreter=False), {"timed": 0}
        best_us, best = min(results, key=lambda r: r[0])
        return best, {"timed": len(results), "best_us": best_us, "triton": triton.__version__}

    def launch(self, kernel_hash: str, template: str, sizes: tuple, dtype: str, device, launch_fn) -> None:
        launch_fn(self.choose(kernel_hash, template, sizes, dtype, device, launch_fn))


TUNER = Tuner()

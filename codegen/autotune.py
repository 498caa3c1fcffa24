"""slimfx's autotuner: explicit config spaces, on-device timing, an on-disk cache.

    TUNER.launch(kernel_hash, template, sizes, dtype, device, launch_fn)

`launch_fn(config)` launches the kernel once with `config` (a dict of meta-parameters
plus num_warps / num_stages). On a GPU every config of the template's space is timed
on the real arguments of the first call (the generated kernels write only fresh
outputs, so re-running them is harmless) and the winner is cached. On CPU (the Triton
interpreter) nothing is timed: a heuristic picks the config. Triton's own
`@triton.autotune` needs a GPU driver, hence our own (DESIGN decision 6).
SLIMFX_AUTOTUNE=0 uses the heuristic on a GPU too (fastest compile). Decode-sized
matmuls (M <= GEMV_MAX_M) are timed with a cold L2 (_time_config's cold_l2), as they run. A launch that
happens while a CUDA graph is being captured is never timed (timing synchronises):
it uses the cached winner, or the heuristic for that call only.

Templates: "pointwise" and "row" (generated fusion groups), "gemm" (matmul groups,
codegen/kernels/matmul_template.py), "multi_gemv" (sibling matmuls sharing an operand,
codegen/kernels/multi_gemv.py). The gemm space holds the library call
(torch.mm + the epilogue as a separate kernel) beside the template's own configs
(a GEMV kernel for M <= GEMV_MAX_M, a tl.dot tiled kernel, each with or without
split-K), so "template or cuBLAS" is decided by the same measurement.

Disk cache: one JSON file per key under $SLIMFX_CACHE_DIR/autotune (default
~/.cache/slimfx/autotune). Key = sha256 of (kernel source hash, shape bucket, dtype,
device name, Triton version). One file per entry and tempfile + os.replace make
writes atomic, so two processes writing at once leave whole files (the last one
wins). An entry is checked before use (config_problem: the template's keys, block
sizes, warps, stages, split-K, the kernel's limits); an unreadable, malformed or
out-of-range entry is discarded with a warning and re-tuned. A cache folder that
cannot be written costs the disk copy only (a warning; the winner stays in memory).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import triton

ENTRY_VERSION = 2  # 2: decode matmuls timed with a cold L2 (earlier winners were picked from cache)

# gemm configs: "impl" says which code runs (ints, because cached configs hold ints only).
GEMM_LIBRARY, GEMM_DOT, GEMM_GEMV = 0, 1, 2
GEMV_MAX_M = 4  # above this a GEMV kernel (one program per row) re-reads the weights too often
NOMINAL_SMS = 132  # H100 SXM; only shapes the split-K candidates when no GPU is visible
MAX_SPLIT_K = 16  # the epilogue unrolls one add per split (tl.static_range)
WARPS = (1, 2, 4, 8, 16, 32)  # what Triton launches with
DOT_MIN_BLOCK = 16  # tl.dot's smallest tile edge
ROW_MAX_ELEMENTS = 32768  # a row kernel's BLOCK_R * BLOCK_N (registers; config_space's bound)


def cache_root() -> Path:
    root = os.environ.get("SLIMFX_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "slimfx"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def shape_bucket(template: str, sizes: tuple) -> tuple:
    """Sizes rounded so nearby shapes share a tuning result.

    pointwise: (numel,) -> next power of two. row: (rows, N) -> (pow2(rows), pow2(N));
    N decides BLOCK_N, so it is kept at its power of two exactly. gemm: (M, N, K) ->
    powers of two of each (decode M = 1, 2, 3-4, ... tune separately).
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
            if block_r > max(1, next_pow2(rows)) or block_r * block_n > ROW_MAX_ELEMENTS:
                continue
            for w in (1, 4, 8):
                if block_r * block_n >= 32 * w:
                    out.append({"BLOCK_R": block_r, "num_warps": w, "num_stages": 1})
        return out or [{"BLOCK_R": 1, "num_warps": 1, "num_stages": 1}]
    if template == "gemm":
        return gemm_space(*sizes)
    if template == "multi_gemv":
        m, n, k = sizes
        cap_n, cap_k = max(16, next_pow2(n)), max(16, next_pow2(k))
        tiles = dict.fromkeys((min(bn, cap_n), min(bk, cap_k), w) for bn, bk, w in _MULTI_GEMV_TILES)
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": 1} for bn, bk, w in tiles]
    raise ValueError(f"unknown template {template!r}; allowed: {', '.join(TEMPLATES)}")


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
    if template == "gemm":
        return gemm_heuristic(*sizes, interpreter=interpreter)
    if template == "multi_gemv":
        m, n, k = sizes
        if interpreter:  # few, large programs
            return {"BLOCK_N": min(64, max(16, next_pow2(n))), "BLOCK_K": min(64, max(16, next_pow2(k))), "num_warps": 4, "num_stages": 1}
        return {"BLOCK_N": 8, "BLOCK_K": min(512, max(16, next_pow2(k))), "num_warps": 4, "num_stages": 1}
    raise ValueError(f"unknown template {template!r}; allowed: {', '.join(TEMPLATES)}")


# ----------------------------------------------------------------------------- gemm configs


def _sm_count() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return NOMINAL_SMS


def split_k_for(tiles: int, k_blocks: int) -> int:
    """K splits so that about two programs run per SM; 1 when the output tiles fill the GPU.

    Decode GEMVs with small N (576 outputs / 16 per program = 36 programs on 132 SMs)
    leave most SMs idle without it; the partial sums cost one extra small pass.
    """
    want = 2 * _sm_count()
    if tiles >= want:
        return 1
    return max(1, min(-(-want // tiles), k_blocks, MAX_SPLIT_K))


def _gemv(block_n: int, block_k: int, split: int, warps: int, stages: int = 1) -> dict:
    return {"impl": GEMM_GEMV, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": warps, "num_stages": stages}


def _dot(block_m: int, block_n: int, block_k: int, split: int, warps: int, stages: int) -> dict:
    return {"impl": GEMM_DOT, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": warps, "num_stages": stages}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


TEMPLATES = ("pointwise", "row", "gemm", "multi_gemv")
# (BLOCK_N, BLOCK_K, warps) for the sibling-matmul GEMV (kernels/multi_gemv.py): no split-K
# (the siblings' columns together fill the GPU), so only tile shapes are tried.
_MULTI_GEMV_TILES = ((4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 8), (4, 2048, 8))
# (BLOCK_N, BLOCK_K, warps) for the GEMV kernel: few outputs per program, long K runs
# (memory-bound: the weight tile is read once and used once).
# (BLOCK_N, BLOCK_K, warps, stages). The pipelined and 2048-wide tiles were added with the
# cold-L2 timing (_time_config) so that it can pick them; which tile won for a shape is in
# that shape's cache entry ("timings").
_GEMV_TILES = ((8, 512, 4, 1), (16, 256, 4, 1), (32, 128, 4, 1), (4, 1024, 4, 1), (4, 1024, 4, 3), (8, 512, 4, 3), (4, 2048, 8, 1))
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for tl.dot; small M = one 16-row tile.
_DOT_TILES_SMALL_M = ((16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3))
_DOT_TILES_MID_M = ((32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 4, 4))
_DOT_TILES_LARGE_M = ((64, 64, 64, 4, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3))


def gemm_space(m: int, n: int, k: int) -> list[dict]:
    """Every config of a matmul group at [M, K] x [K, N], the library call first.

    Curated rather than a full product (each config is a compile on the first call):
    GEMV tiles for M <= GEMV_MAX_M, tl.dot tiles by M range, each at split 1 and at
    the occupancy split (split_k_for) when that differs. Blocks never exceed the
    problem's powers of two (min 16: tl.dot's smallest tile).
    """
    m, n, k = max(1, int(m)), max(1, int(n)), max(1, int(k))
    cap_n, cap_k = max(16, next_pow2(n)), max(16, next_pow2(k))
    out = [{"impl": GEMM_LIBRARY, "num_warps": 1, "num_stages": 1}]
    if m <= GEMV_MAX_M:
        for bn, bk, warps, stages in _GEMV_TILES:
            bn, bk = min(bn, cap_n), min(bk, cap_k)
            split = split_k_for(m * _cdiv(n, bn), _cdiv(k, bk))
            out += [_gemv(bn, bk, s, warps, stages) for s in sorted({1, split})]
    tiles = _DOT_TILES_SMALL_M if m <= 16 else _DOT_TILES_MID_M if m <= 64 else _DOT_TILES_LARGE_M
    for bm, bn, bk, warps, stages in tiles:
        bm, bn, bk = min(bm, max(16, next_pow2(m))), min(bn, cap_n), min(bk, cap_k)
        split = split_k_for(_cdiv(m, bm) * _cdiv(n, bn), _cdiv(k, bk))
        out += [_dot(bm, bn, bk, s, warps, stages) for s in sorted({1, split})]
    unique = []
    for config in out:
        if config not in unique:
            unique.append(config)
    return unique


def gemm_heuristic(m: int, n: int, k: int, *, interpreter: bool) -> dict:
    """The gemm config where nothing is timed.

    Interpreter (CPU): every program is a round of numpy calls, so the fewest programs
    win: one GEMV program per row and up to 64 outputs for M == 1, else tl.dot tiles up
    to 32 x 64 x 64; never split, never the library (the tests exercise the template).
    GPU with SLIMFX_AUTOTUNE=0: unmeasured defaults: the GEMV kernel with the occupancy
    split for M <= GEMV_MAX_M, a 16-row tl.dot tile up to M = 16, else 64/128 tiles.
    """
    m, n, k = max(1, int(m)), max(1, int(n)), max(1, int(k))
    cap_n, cap_k = max(16, next_pow2(n)), max(16, next_pow2(k))
    if interpreter:
        if m == 1:
            return _gemv(min(64, cap_n), min(64, cap_k), 1, 4)
        return _dot(min(32, max(16, next_pow2(m))), min(64, cap_n), min(64, cap_k), 1, 4, 1)
    if m <= GEMV_MAX_M:
        bn, bk = min(16, cap_n), min(256, cap_k)
        return _gemv(bn, bk, split_k_for(m * _cdiv(n, bn), _cdiv(k, bk)), 4)
    if m <= 16:
        bn, bk = min(64, cap_n), min(128, cap_k)
        return _dot(16, bn, bk, split_k_for(_cdiv(n, bn), _cdiv(k, bk)), 4, 4)
    bm = 128 if m >= 128 else 64
    return _dot(bm, min(128, cap_n), min(64, cap_k), 1, 8 if bm == 128 else 4, 3)


# ----------------------------------------------------------------------------- config checks


def config_problem(template: str, sizes: tuple, config: dict) -> str | None:
    """Why `config` must not be launched for `template` at `sizes`, or None when it may.

    A config read back from disk is checked against what this code could have written
    for these sizes (config_space and heuristic_config): the same keys, ints only, block
    sizes powers of two within the space's range, launch parameters Triton accepts, and
    the kernel's own limits. A config that passed is safe to launch.
    """
    if not _all_ints(config):
        return "values must be ints"
    known = _known_configs(template, sizes)
    # Same key set and, for gemm, the same implementation: the keys a launch reads.
    peers = [c for c in known if c.keys() == config.keys() and c.get("impl") == config.get("impl")]
    if not peers:
        expected = sorted({tuple(sorted(c)) for c in known})
        impl = f" with impl={config['impl']}" if "impl" in config else ""
        return f"keys {sorted(config)}{impl} are not those of a {template} config (expected one of {expected})"
    return _range_problem(config, peers) or _kernel_problem(template, sizes, config)


def _all_ints(config: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in config.items())


def _known_configs(template: str, sizes: tuple) -> list[dict]:
    heuristics = [heuristic_config(template, sizes, interpreter=i) for i in (False, True)]
    return config_space(template, sizes) + heuristics


def _range_problem(config: dict, peers: list[dict]) -> str | None:
    for key, value in config.items():
        if key.startswith("BLOCK"):
            low, high = min(c[key] for c in peers), max(c[key] for c in peers)
            if value <= 0 or value & (value - 1):
                return f"{key}={value} is not a positive power of two"
            if not low <= value <= high:
                return f"{key}={value} is outside [{low}, {high}]"
    if config["num_warps"] not in WARPS:
        return f"num_warps={config['num_warps']} is not one of {WARPS}"
    if config["num_stages"] < 1:
        return f"num_stages={config['num_stages']} is below 1"
    if "SPLIT_K" in config and not 1 <= config["SPLIT_K"] <= MAX_SPLIT_K:
        return f"SPLIT_K={config['SPLIT_K']} is outside [1, {MAX_SPLIT_K}]"
    return None


def _kernel_problem(template: str, sizes: tuple, config: dict) -> str | None:
    if template == "row" and config["BLOCK_R"] * next_pow2(sizes[1]) > ROW_MAX_ELEMENTS:
        return f"BLOCK_R={config['BLOCK_R']} x BLOCK_N={next_pow2(sizes[1])} exceeds {ROW_MAX_ELEMENTS} elements"
    if template == "gemm" and config["impl"] == GEMM_DOT:
        small = [k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if config[k] < DOT_MIN_BLOCK]
        if small:
            return f"{', '.join(small)} below tl.dot's minimum tile of {DOT_MIN_BLOCK}"
    return None


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

    def get(self, key: str, template: str | None = None, sizes: tuple | None = None) -> dict | None:
        """The cached config, or None when absent or bad (a bad entry also warns).

        With `template` and `sizes` the config must pass config_problem; without, only
        its shape (a dict of ints) is checked.
        """
        path = self.path(key)
        try:
            text = path.read_text()
        except (FileNotFoundError, NotADirectoryError):  # nothing cached; put() reports a misplaced folder
            return None
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8
            return _discard(path, f"unreadable ({exc})")
        config, problem = _parse_entry(text, key)
        if problem is None and template is not None:
            problem = config_problem(template, sizes, config)
        return config if problem is None else _discard(path, problem)

    def put(self, key: str, config: dict, info: dict | None = None) -> bool:
        """Write atomically (a temp file in the same folder, then os.replace); False, with a
        warning, when the cache folder cannot be written: the caller keeps the result in memory."""
        path = self.path(key)
        entry = {"key": key, "config": config, **(info or {})}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        except OSError as exc:
            warnings.warn(f"slimfx autotune: cannot write cache entry {path} ({exc}); the result is not cached", stacklevel=2)
            return False
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
        return True


def _parse_entry(text: str, key: str) -> tuple[dict | None, str | None]:
    """(config, None) for a well-formed entry of `key`, else (None, what is wrong)."""
    try:
        entry = json.loads(text)
    except ValueError as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        return None, "not an entry (a JSON object with a 'config' object)"
    if entry.get("key") != key:
        return None, f"holds key {entry.get('key')!r}, not {key!r}"
    config = entry["config"]
    if not _all_ints(config):
        return None, "config values must be ints"
    return config, None


def _discard(path: Path, problem: str) -> None:
    # One line per bad entry: the caller re-tunes and overwrites it.
    warnings.warn(f"slimfx autotune: discarding cache entry {path}: {problem}; re-tuning", stacklevel=3)
    return None


# ----------------------------------------------------------------------------- timing


def _time_config(launch_fn, config: dict, batches: int = 5, per_batch: int = 10, cold_l2: bool = False) -> float:
    """Median GPU time in microseconds of one launch on the current CUDA stream.

    Each batch queues `per_batch` launches behind a GPU sleep, so the GPU runs them
    back to back as in a captured decode step: timing single launches would add the
    Python launch latency (tens of us, more than a decode GEMV) to every config and
    favour whichever path has the cheaper host code.

    cold_l2: every launch follows a write of twice the L2 size, and the same batches
    without the launches are timed and subtracted. A decode GEMV reads weights that the
    previous layers have evicted from L2; timed back to back, a weight of up to ~50 MB
    stays in an H100's L2 and the timing rewards tiles that do well from cache, not the
    ones that stream HBM best.
    """
    import torch

    launch_fn(config)  # compile + warm
    torch.cuda.synchronize()
    flush = _l2_flush_buffer() if cold_l2 else None
    times = sorted(_time_batch(launch_fn, config, per_batch, flush) for _ in range(batches))
    median = times[len(times) // 2]
    if flush is None:
        return median
    flushes = sorted(_time_batch(None, config, per_batch, flush) for _ in range(batches))
    return max(median - flushes[len(flushes) // 2], 1e-3)


def _time_batch(launch_fn, config: dict, per_batch: int, flush) -> float:
    """Microseconds per iteration of `per_batch` (flush, launch) pairs; launch_fn None: flushes only."""
    import torch

    sleep = getattr(torch.cuda, "_sleep", None)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if sleep is not None:
        sleep(1_000_000)  # ~0.5-1 ms of GPU cycles: the host queues the batch meanwhile
    start.record()
    for _ in range(per_batch):
        if flush is not None:
            flush.zero_()
        if launch_fn is not None:
            launch_fn(config)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / per_batch


def _l2_flush_buffer():
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    size = 2 * int(getattr(props, "L2_cache_size", 0) or 64 << 20)
    return torch.empty(size, dtype=torch.uint8, device="cuda")


def streams_from_memory(template: str, sizes: tuple) -> bool:
    """Decode-sized matmuls (M <= GEMV_MAX_M): memory-bound reads of weights that are cold in
    L2 when the model runs, so they are timed with a cold L2."""
    return template in ("gemm", "multi_gemv") and int(sizes[0]) <= GEMV_MAX_M


def _capturing() -> bool:
    import torch

    return bool(torch.cuda.is_current_stream_capturing())


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
        if device.type == "cuda" and _capturing():
            # Timing synchronises, which a CUDA graph capture forbids: use what is cached.
            label = device_name(device)
            key = DiskCache.key(kernel_hash, bucket, dtype, label)
            return self.disk.get(key, template, sizes) or heuristic_config(template, sizes, interpreter=False)
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
        config = self.disk.get(key, template, sizes)
        if config is None:
            config, info = self._benchmark(template, sizes, launch_fn)
            self.disk.put(key, config, info)
        return config

    def _benchmark(self, template: str, sizes: tuple, launch_fn) -> tuple[dict, dict]:
        results = []
        timer = self._timer
        if timer is _time_config and streams_from_memory(template, sizes):
            timer = functools.partial(_time_config, cold_l2=True)
        for config in config_space(template, sizes):
            try:
                results.append((timer(launch_fn, config), config))
                self.timed += 1
            except Exception:  # noqa: BLE001 - a config that fails to compile (resources) is skipped
                continue
        if not results:
            return heuristic_config(template, sizes, interpreter=False), {"timed": 0}
        best_us, best = min(results, key=lambda r: r[0])
        # Every timing is kept with the winner: the cache file shows what it beat.
        timings = [{"us": round(us, 3), "config": config} for us, config in sorted(results, key=lambda r: r[0])]
        return best, {"timed": len(results), "best_us": best_us, "triton": triton.__version__, "timings": timings}

    def launch(self, kernel_hash: str, template: str, sizes: tuple, dtype: str, device, launch_fn) -> None:
        launch_fn(self.choose(kernel_hash, template, sizes, dtype, device, launch_fn))


TUNER = Tuner()

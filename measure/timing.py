"""Timing on CUDA for the benchmarks and `slimfx bench`: one place that decides how a
callable is warmed, captured and timed, so every number is measured the same way."""

from __future__ import annotations

import statistics
import time

import torch


def time_ms(fn, *, graph: bool = False, warmup: int = 3, repeats: int = 20, calls: int = 1) -> float:
    """Median milliseconds per `fn()` on the current CUDA device, from CUDA events.

    Each repeat times `calls` back-to-back calls (raise it for calls of a few
    microseconds, where one event pair's own cost would show). With `graph` the calls
    are captured once in a CUDA graph and each repeat replays it, which leaves out the
    host's launch cost (Python wrapper, allocations) as the generator's captured decode
    step does. `warmup` calls run first (on a side stream before a capture) so compiles,
    autotuning and cuBLAS workspaces happen outside the timed region."""
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(calls):
                fn()
        run = captured.replay
        run()
    else:
        for _ in range(warmup):
            fn()

        def run():
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def loop_ms(step, n: int) -> float:
    """Wall milliseconds per `step()` over `n` steps that end with the device idle: for
    steps whose host work (a decode loop's Python, cache updates) is part of the cost."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3 / n


class Timer:
    """Wall time of a region that ends with the device idle (events on CUDA, the host
    clock elsewhere): `ms`, and `wall_s` including the host's share."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = 1e3 * (time.perf_counter() - self.t0)
        self.wall_s = time.perf_counter() - self.t0


def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device (or host memcpy) bandwidth in GB/s, counting bytes read + written;
    median of `reps` copies of a `nbytes` buffer: the roofline that decode speeds are
    compared with."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 28)
        reps = min(reps, 5)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        with Timer(device) as t:
            dst.copy_(src)
        times.append(t.ms)
    return 2 * nbytes / (statistics.median(times) / 1e3) / 1e9


class TokenClock:
    """An HF `streamer` that notes when each new token arrives: HF's generate calls put()
    once with the prompt, then once per token as it is made. Per-token decode time is
    `ms_per_token()`: first to last new token over the steps between them."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass

    def ms_per_token(self) -> float:
        return 1e3 * (self.times[-1] - self.times[0]) / (len(self.times) - 1)

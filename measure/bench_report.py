"""The writing half of `slimfx bench`: JSON, a markdown table per model, a PNG bar chart."""

from __future__ import annotations

from pathlib import Path

from slimfx.measure.report import fmt, fmt_bytes, md_table, pyplot, save_figure, stamp_line, write_json


def _f(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    st, s = results["stamp"], results["settings"]
    parts = [f"# slimfx bench ({s['device']}, {s['dtype']})", stamp_line(st),
             (f"Context {s['context']} tokens, {s['warmup']} warm-up + {s['steps']} timed decode steps, "
              f"weights {s['weights']}. Measured copy bandwidth: {results['copy_bandwidth_gbps']:.0f} GB/s "
              f"(bytes read + written).")]
    headers = ["backend", "batch", "decode ms/token", "tokens/s", "prefill ms", "GB/s", "% of copy BW",
               "peak memory", "KV bytes", "cold compile s", "warm compile s"]
    for m in results["models"]:
        rows, notes = [], []
        for r in m["results"]:
            if "error" in r:
                rows.append([r["backend"], "-", "failed"] + ["-"] * 8)
                notes.append(f"{r['backend']}: {r['error']}")
                continue
            notes.append(f"{r['backend']}: {r['loop']}" + (f" (codegen {r['codegen']})" if r.get("codegen") else ""))
            for i, run in enumerate(r["runs"]):
                rows.append([r["backend"], run["batch"], _f(run["decode_ms_per_token"], 3), _f(run["tokens_per_s"], 1),
                             _f(run["prefill_ms"], 1), _f(run["achieved_gbps"], 0), _f(100 * run["fraction_of_copy_bw"], 1),
                             fmt_bytes(run["peak_memory_bytes"]), fmt_bytes(run["kv_bytes"]),
                             _f(r.get("cold_compile_s")) if i == 0 else "", _f(r.get("warm_compile_s")) if i == 0 else ""])
        parts.append(f"## {m['shape']} ({m['parameters'] / 1e6:.1f}M parameters, {m['layers']} layers, "
                     f"weights {fmt_bytes(m['weight_bytes'])})\n\n" + md_table(headers, rows)
                     + "\n\n" + "\n".join(f"- {n}" for n in notes))
    parts.append("GB/s counts the bytes a decode step must read (weights, and the KV of the tokens in context) "
                 "over the measured step time, the same for every backend. KV bytes: what the cache object or "
                 "store allocated. Compile times: first decode call (inductor) or first generate call less a "
                 "compiled one (slimfx); cold with an empty inductor cache, warm after torch._dynamo.reset() with "
                 "the on-disk caches kept.")
    return "\n\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    models = results["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.6 * len(models)), squeeze=False)
    for row, m in zip(axes, models):
        ok = [r for r in m["results"] if "error" not in r]
        batches = sorted({run["batch"] for r in ok for run in r["runs"]})
        width = 0.8 / max(1, len(ok))
        for ax, key, label in ((row[0], "decode_ms_per_token", "decode ms/token (lower is better)"),
                               (row[1], "tokens_per_s", "tokens/s (higher is better)")):
            for j, r in enumerate(ok):
                by_batch = {run["batch"]: run[key] for run in r["runs"]}
                xs = [i + j * width for i, b in enumerate(batches) if b in by_batch]
                ys = [by_batch[b] for b in batches if b in by_batch]
                bars = ax.bar(xs, ys, width, label=r["backend"])
                ax.bar_label(bars, labels=[fmt(y, 3) for y in ys], fontsize=7)
            ax.set_xticks([i + width * (len(ok) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
            ax.set(title=f"{m['shape']}: {label}")
            if key == "decode_ms_per_token":
                ax.set_yscale("log")  # eager is ~40x slower than the compiled loops
            ax.legend(fontsize=8)
    st = results["stamp"]
    save_figure(fig, path, f"slimfx bench, {st['device']}, {results['settings']['dtype']}, "
                           f"context {results['settings']['context']}, {st['date']}")


def write_bench(results: dict, paths: dict[str, Path]) -> None:
    write_json(paths["json"], results)
    render(results, paths)


def render(results: dict, paths: dict[str, Path]) -> None:
    """The markdown and PNG of a results dict (also to redraw them from a saved JSON)."""
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])


if __name__ == "__main__":  # python -m slimfx.measure.bench_report results/bench_x.json
    import json
    import sys

    for name in sys.argv[1:]:
        # Stems such as "bench_llama-3.2-1b" hold dots: strip ".json" only, append extensions.
        stem = str(Path(name))[: -len(".json")] if str(name).endswith(".json") else str(name)
        render(json.loads(Path(name).read_text()), {ext: Path(f"{stem}.{ext}") for ext in ("md", "png")})

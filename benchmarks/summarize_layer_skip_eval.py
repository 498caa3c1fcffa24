"""One table and one plot from the layer-skipping quality evals (results/eval_layer_skip_*.json):
per method (Block Influence, SLEB, unified = evenly spread) and target (whole blocks or MLPs
only), the blocks removed, weight and KV bytes kept against the unmodified model, fidelity
(top-1 agreement, mean KL) and passkey.

    python benchmarks/summarize_layer_skip_eval.py results/eval_layer_skip_bi_mlps.json ... \
        --output results/eval_layer_skip

Writes STEM.md and STEM.png; every figure is read from the eval JSONs (the blocks removed
from the layer_skip pass's report of each configuration's compile)."""

from __future__ import annotations

import json
from pathlib import Path

from slimfx.measure.eval_report import summary_main

METHODS = {"block_influence": "Block Influence", "sleb": "SLEB"}


def skip_report(config: dict) -> dict:
    """The layer_skip pass's report of the configuration's first graph."""
    for graph in config["compile_reports"]:
        for p in graph["passes"]:
            if p["name"] == "layer_skip" and p["applied"]:
                return p
    raise ValueError(f"{config['label']}: layer_skip did not apply; nothing was removed")


def method_of(note: str) -> str:
    """'lossy: removed MLPs of blocks [..] (plan bi_mlp_6: block_influence)' -> 'Block Influence'."""
    for key, name in METHODS.items():
        if f": {key})" in note:
            return name
    return "unified (evenly spread)" if "(unified:" in note else "listed"


def rows(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        base = data["base"]["footprint"]
        layers = data["model"]["layers"]
        for c in data["configurations"]:
            report = skip_report(c)
            note = report["notes"][0]
            removed = note.split("blocks ", 1)[1].split("]", 1)[0] + "]"
            fid = c.get("fidelity") or {}
            pk = (c.get("passkey") or {}).get("summary", {})
            out.append({"method": method_of(note), "target": "MLPs" if note.startswith("lossy: removed MLPs") else "blocks",
                        "count": report["sites"], "layers": layers, "removed": removed, "source": Path(path).name,
                        "weights_vs_unmodified": c["footprint"]["weight_bytes"] / base["weight_bytes"],
                        "kv_vs_unmodified": c["footprint"]["kv_bytes_per_token"] / base["kv_bytes_per_token"],
                        "top1": fid.get("top1_agreement"), "kl": fid.get("mean_kl"), "fidelity_tokens": fid.get("tokens"),
                        "passkey": pk.get("accuracy"), "passkey_n": pk.get("n")})
    return sorted(out, key=lambda r: (r["target"], r["method"], r["count"]))


def table(items: list[dict]) -> str:
    lines = ["| removes | method | how many | which (blocks of 0-29) | weights kept | KV kept | top-1 agreement | mean KL | passkey | run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in items:
        top1 = "-" if r["top1"] is None else f"{r['top1']:.3f} ({r['fidelity_tokens']} tokens)"
        kl = "-" if r["kl"] is None else f"{r['kl']:.3g}"
        pk = "-" if r["passkey"] is None else f"{r['passkey']:.2f} (n={r['passkey_n']})"
        lines.append(f"| {r['target']} | {r['method']} | {r['count'] / r['layers']:.0%} ({r['count']}) | {r['removed']} | "
                     f"{r['weights_vs_unmodified']:.3f} | {r['kv_vs_unmodified']:.3f} | {top1} | {kl} | {pk} | {r['source']} |")
    return "\n".join(lines)


def plot(items: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for target, style in (("MLPs", "-"), ("blocks", "--")):
        for method in sorted({r["method"] for r in items}):
            pts = [(r["count"] / r["layers"], r["top1"]) for r in items
                   if r["method"] == method and r["target"] == target and r["top1"] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{method}, {target}")
    ax.axhline(0.9, color="grey", linestyle=":", label="target top-1 0.90 (20% of MLPs)")
    ax.axvline(0.2, color="grey", linestyle=":")
    ax.set_xlabel("share of the 30 blocks removed (or whose MLPs are removed)")
    ax.set_ylabel("top-1 agreement with the unmodified model")
    ax.set_ylim(0, 1)
    ax.set_title("Layer skipping, SmolLM2-135M (CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    note = ("Weights kept: weight bytes against the unmodified model's (tied embedding and head included); KV kept: the "
            "runtime store's KV bytes per token. Passkey and fidelity sizes: as each run's .md states (its command).")
    summary_main(__doc__, "Layer skipping on the default model", rows, table, plot, note)

if __name__ == "__main__":
    main()

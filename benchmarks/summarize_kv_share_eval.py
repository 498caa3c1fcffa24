"""One table and one plot from the cross-layer KV-sharing evals (results/eval_kv_share_*.json):
KV bytes per token against the unmodified model, fidelity (top-1 agreement, mean KL) and
passkey, per method and share of layers.

    python benchmarks/summarize_kv_share_eval.py results/eval_kv_share_pairs_10_20.json \
        results/eval_kv_share_pairs_30.json results/eval_kv_share_kvsharer.json --output results/eval_kv_share

Writes STEM.md and STEM.png; every figure is read from the eval JSONs."""

from __future__ import annotations

import json
from pathlib import Path

from slimfx.measure.eval_report import summary_main


def method_of(config: dict) -> str:
    share = config["passes"]["kv_share"]
    if share.get("plan", "none") != "none":
        return "KVSharer"
    if share.get("merge", "none") == "minicache":
        return "MiniCache (merged pairs)"
    return f"adjacent pairs ({share.get('pattern')})"


def rows(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        base = data["base"]["footprint"]["kv_bytes_per_token"]
        layers = data["model"]["layers"]
        for c in data["configurations"]:
            readers = max((p["nodes_rewritten"] for g in c["compile_reports"] for p in g["passes"]
                           if p["name"] == "kv_share" and p["applied"]), default=0)
            shared = readers / layers
            fid = c.get("fidelity") or {}
            out.append({"method": method_of(c["config"]), "label": c["label"], "source": Path(path).name,
                        "layers_sharing": shared, "layers": layers,
                        "kv_vs_unmodified": c["footprint"]["kv_bytes_per_token"] / base,
                        "top1": fid.get("top1_agreement"), "kl": fid.get("mean_kl"), "fidelity_tokens": fid.get("tokens"),
                        "passkey": (c["passkey"] or {}).get("summary", {}).get("accuracy"),
                        "passkey_n": (c["passkey"] or {}).get("summary", {}).get("n")})
    return sorted(out, key=lambda r: (r["method"], r["layers_sharing"] or 0))


def table(items: list[dict]) -> str:
    lines = ["| method | layers sharing | KV vs unmodified | top-1 agreement | mean KL | passkey | run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in items:
        share = "-" if r["layers_sharing"] is None else f"{r['layers_sharing']:.0%} ({round(r['layers_sharing'] * r['layers'])})"
        top1 = "-" if r["top1"] is None else f"{r['top1']:.3f} ({r['fidelity_tokens']} tokens)"
        kl = "-" if r["kl"] is None else f"{r['kl']:.3g}"
        pk = "-" if r["passkey"] is None else f"{r['passkey']:.2f} (n={r['passkey_n']})"
        lines.append(f"| {r['method']} | {share} | {r['kv_vs_unmodified']:.3f} | {top1} | {kl} | {pk} | {r['source']} |")
    return "\n".join(lines)


def plot(items: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in items}):
        pts = [(1 - r["kv_vs_unmodified"], r["top1"]) for r in items if r["method"] == method and r["top1"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(0.9, color="grey", linestyle=":", label="target top-1 0.90")
    ax.axvline(0.3, color="grey", linestyle="--", label="target 30% less KV")
    ax.set_xlabel("KV bytes saved (fraction of the unmodified model's)")
    ax.set_ylabel("top-1 agreement with the unmodified model")
    ax.set_title("Cross-layer KV sharing, SmolLM2-135M (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    summary_main(__doc__, "Cross-layer KV sharing on the default model", rows, table, plot)

if __name__ == "__main__":
    main()

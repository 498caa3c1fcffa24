"""The writing half of `slimfx eval`: JSON, a markdown table and PNG plots."""

from __future__ import annotations

from pathlib import Path

from slimfx.measure.footprint import kv_bytes_at
from slimfx.measure.report import fmt, fmt_bytes, md_table, pyplot, save_figure, stamp_line, write_json


def _rows(results: dict) -> list[tuple[str, dict]]:
    """(label, entry) for the unmodified model and then every configuration."""
    return [("unmodified", results["base"])] + [(c["label"], c) for c in results["configurations"]]


def _acc_by_length(entry: dict) -> dict[int, float]:
    summary = (entry.get("passkey") or {}).get("summary")
    if not summary:
        return {}
    return {int(k): v["accuracy"] for k, v in summary["by_length"].items()}


def markdown(results: dict) -> str:
    lengths = results["settings"]["lengths"]
    longest = max(lengths)
    headers = (["configuration"] + [f"passkey @{n}" for n in lengths] + ["passkey all", "top-1 agree", "mean KL", "ppl",
               f"KV @{longest}", "weights", "head"])
    rows = []
    for label, entry in _rows(results):
        acc = _acc_by_length(entry)
        summary = (entry.get("passkey") or {}).get("summary") or {}
        fid = entry.get("fidelity") or {}
        fp = entry["footprint"]
        ppl = fid.get("ppl_compiled") if label != "unmodified" else None
        if label == "unmodified":
            base_ppl = [c.get("fidelity", {}).get("ppl_base") for c in results["configurations"]]
            ppl = base_ppl[0] if base_ppl else None
        rows.append([label] + [fmt(acc.get(n), 2) for n in lengths] + [fmt(summary.get("accuracy"), 2),
                    fmt(fid.get("top1_agreement"), 4), fmt(fid.get("mean_kl"), 4), fmt(ppl, 3),
                    fmt_bytes(kv_bytes_at(fp, longest)),
                    fmt_bytes(fp["weight_bytes"]), fmt_bytes(fp["head_bytes"])])
    model = results["model"]
    fid_note = results["settings"]["fidelity"]
    tokens = next((c["fidelity"]["tokens"] for c in results["configurations"] if c.get("fidelity")), None)
    parts = [
        f"# slimfx eval: {model['name']} ({model['dtype']}, {model['device']})",
        stamp_line(results["stamp"]),
        md_table(headers, rows),
        (f"Passkey: accuracy of greedy retrieval of a 5-digit key, prompt lengths in chat-template tokens "
         f"(depths {', '.join(str(d) for d in results['settings']['depths'])}, {results['settings']['trials']} trial(s) each). "
         f"Fidelity: {tokens} teacher-forced tokens of {fid_note['text']}; agreement and KL(unmodified || compiled) "
         f"against the unmodified model; ppl of the unmodified model on the unmodified row. "
         f"KV = bytes one sequence of {longest} tokens keeps, from the model config and the passes' reported footprints; "
         f"weights and head likewise (each configuration's `footprint.source` in the JSON says where its figures come from)."),
    ]
    grid_rows = []
    for label, entry in _rows(results):
        summary = (entry.get("passkey") or {}).get("summary")
        if summary:
            for n, by_depth in summary["grid"].items():
                grid_rows.append([label, n] + [fmt(v, 2) for v in by_depth.values()])
    if grid_rows:
        parts.append("Passkey accuracy by length and depth:\n\n" + md_table(
            ["configuration", "length"] + [f"depth {d}" for d in results["settings"]["depths"]], grid_rows))
    ruler = results["settings"].get("ruler")
    if ruler:
        rows = [[label, fmt(_ruler_avg(e), 2)] + [fmt(_ruler_task(e, t), 2) for t in ruler["tasks"]] for label, e in _rows(results)]
        parts.append(f"RULER-style suite (measure/ruler.py): string_match_all per task, prompts of {', '.join(map(str, ruler['lengths']))} "
                     f"tokens, {ruler['samples']} per task and length, haystack {ruler['text']}:\n\n"
                     + md_table(["configuration", "average"] + ruler["tasks"], rows))
    return "\n\n".join(parts) + "\n"


def _ruler_avg(entry):
    summary = (entry.get("ruler") or {}).get("summary")
    return summary["average"] if summary else None


def _ruler_task(entry, task):
    summary = (entry.get("ruler") or {}).get("summary")
    return summary["by_task"].get(task) if summary else None


def _numeric_axis(results: dict) -> str | None:
    """The swept key to put on an x axis: the first one whose values are all numbers."""
    for axis in results["sweep"]:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in axis["values"]):
            return axis["key"]
    return None


def _curves(results: dict, metric) -> dict[str, list[tuple[float, float]]]:
    """One line per combination of the non-x swept values: [(x, metric)]."""
    xkey = _numeric_axis(results)
    lines: dict[str, list] = {}
    for c in results["configurations"]:
        rest = ", ".join(f"{k}={v}" for k, v in c["values"].items() if k != xkey) or "slimfx"
        y = metric(c)
        if y is not None:
            lines.setdefault(rest, []).append((c["values"][xkey], y))
    return {k: sorted(v) for k, v in lines.items()}


def _passkey_acc(entry):
    summary = (entry.get("passkey") or {}).get("summary")
    return summary["accuracy"] if summary else None


def _agreement(entry):
    return (entry.get("fidelity") or {}).get("top1_agreement")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    ruler = results["settings"].get("ruler")
    fig, grid = plt.subplots(2 if ruler else 1, 3, figsize=(16, 9.6 if ruler else 4.6), squeeze=False)
    axes = grid[0]
    if ruler:
        _plot_ruler(results, grid[1], ruler["tasks"])
    ax = axes[0]
    for label, entry in _rows(results):
        acc = _acc_by_length(entry)
        if acc:
            ax.plot(list(acc), list(acc.values()), marker="o", label=label,
                    linestyle="--" if label == "unmodified" else "-")
    ax.set(title="passkey accuracy by prompt length", xlabel="prompt tokens", ylabel="accuracy", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)
    xkey = _numeric_axis(results)
    for ax, metric, name in ((axes[1], _passkey_acc, "passkey accuracy (all lengths)"), (axes[2], _agreement, "top-1 agreement")):
        if xkey:
            for label, pts in _curves(results, metric).items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            base = metric(results["base"]) if metric is _passkey_acc else 1.0
            if base is not None:
                ax.axhline(base, color="gray", linestyle="--", label="unmodified")
            ax.set(xlabel=xkey, title=f"{name} vs {xkey}")
            ax.legend(fontsize=7)
        else:
            labels = [lbl for lbl, e in _rows(results) if metric(e) is not None]
            values = [metric(e) for _, e in _rows(results) if metric(e) is not None]
            ax.bar(range(len(values)), values, color="tab:blue")
            ax.set_xticks(range(len(values)), labels, rotation=20, fontsize=7)
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
            ax.set(title=name)
        ax.set(ylabel=name, ylim=(-0.05, 1.1))
    st = results["stamp"]
    save_figure(fig, path, f"slimfx eval: {results['model']['name']} ({results['model']['dtype']}), {st['device']}, {st['date']}")


def _plot_ruler(results: dict, axes, tasks: list[str]) -> None:
    """Suite average against the swept value, and accuracy per task and configuration."""
    ax = axes[0]
    xkey = _numeric_axis(results)
    if xkey:
        for label, pts in _curves(results, _ruler_avg).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(xlabel=xkey)
    base = _ruler_avg(results["base"])
    if base is not None:
        ax.axhline(base, color="gray", linestyle="--", label="unmodified")
    ax.set(title="RULER-style suite average", ylabel="string_match_all", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)
    rows = [(label, [_ruler_task(e, t) or 0.0 for t in tasks]) for label, e in _rows(results) if _ruler_avg(e) is not None]
    heat = axes[1]
    heat.imshow([r[1] for r in rows], vmin=0, vmax=1, cmap="viridis", aspect="auto")
    heat.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize=7)
    heat.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=6)
    for i, (_, vals) in enumerate(rows):
        for j, v in enumerate(vals):
            heat.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="white" if v < 0.5 else "black")
    heat.set(title="RULER-style accuracy per task")
    axes[1].figure.delaxes(axes[2])


def write_eval(results: dict, paths: dict[str, Path]) -> None:
    write_json(paths["json"], results)
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])


def summary_main(doc: str, title: str, rows, table, plot, note: str = "") -> None:
    """The command line of a script that merges eval JSONs into one table and plot
    (benchmarks/summarize_*_eval.py): `SCRIPT EVAL.json ... --output STEM` writes STEM.md
    (titled `title`, a string or a function of the rows, naming its sources, `note` under the table) and STEM.png."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("evals", nargs="+", help="eval JSON files")
    p.add_argument("--output", required=True, help="file stem: writes STEM.md and STEM.png")
    args = p.parse_args()
    items = rows(args.evals)
    stem = Path(args.output)
    heading = title(items) if callable(title) else title
    text = f"# {heading}\n\nFrom {', '.join(args.evals)}.\n\n{table(items)}\n" + (f"\n{note}\n" if note else "")
    stem.with_suffix(".md").write_text(text)
    plot(items, stem.with_suffix(".png"))
    print(table(items))

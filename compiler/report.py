"""What a compilation did: one CompileReport per graph the backend compiled.

    import slimfx
    model = torch.compile(model, backend="slimfx", options=...)
    model(...)
    print(slimfx.last_report().format())
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimfx.compiler.passmanager import PassResult, format_bytes
from slimfx.compiler.tables import format_table

_REPORTS: list["CompileReport"] = []


@dataclass
class CompileReport:
    graph_id: int
    config_source: str
    pipeline_name: str
    anatomy_summary: str
    passes: list[PassResult] = field(default_factory=list)
    codegen: str = "eager"
    compile_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        rows = [[r.name, "yes" if r.applied else "no", r.sites_matched, r.nodes_rewritten,
                 format_bytes(r.bytes_saved) if r.bytes_saved else "-", f"{r.seconds * 1e3:.1f}", r.summary()]
                for r in self.passes]
        head = (f"graph {self.graph_id}: config {self.config_source}, pipeline '{self.pipeline_name}', "
                f"codegen {self.codegen}, compiled in {self.compile_seconds:.2f} s\n  anatomy: {self.anatomy_summary}")
        if not rows:
            return head + "\n  (no passes in this pipeline)"
        table = format_table(["pass", "applied", "sites", "nodes", "saved", "ms", "what it did"], rows)
        return head + "\n" + table + "".join(f"\n  note: {n}" for n in self.notes)


def record(report: CompileReport) -> None:
    _REPORTS.append(report)


def reports() -> list[CompileReport]:
    """Every report of this process, oldest first."""
    return list(_REPORTS)


def last_report() -> CompileReport | None:
    return _REPORTS[-1] if _REPORTS else None


def clear_reports() -> None:
    _REPORTS.clear()


def next_graph_id() -> int:
    return len(_REPORTS)


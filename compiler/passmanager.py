"""The pass manager: runs a named pipeline of passes over one FX graph.

For every pass it records what the pass did (a PassResult), times it, checks the
graph afterwards (lint + recompile) when asked, and dumps each stage's code to
$SLIMFX_DEBUG_DIR. When a pass raises, the error names the pass and the passes
that ran before it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.fx

from slimfx.compiler.config import Config, ConfigError, PassConfig, parse_layer_selector
from slimfx.compiler.errors import is_user_error


@dataclass
class PassResult:
    """What one pass did to one graph.

    applied is False when the pass found nothing to do or could not apply; `notes`
    then says why. bytes_saved counts device bytes no longer held or read per step
    (weights, KV cache); 0 when the pass does not change memory.
    """

    name: str
    applied: bool = False
    sites_matched: int = 0
    nodes_rewritten: int = 0
    bytes_saved: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def skipped(cls, name: str, why: str) -> "PassResult":
        return cls(name, applied=False, notes=[why])

    def summary(self) -> str:
        notes = "; ".join(collapse_repeats(self.notes))
        if not self.applied:
            return "skipped: " + (notes or "nothing to do")
        text = f"{self.sites_matched} sites, {self.nodes_rewritten} nodes rewritten"
        if self.bytes_saved:
            text += f", {format_bytes(self.bytes_saved)} saved"
        if notes:
            text += "; " + notes
        return text


def collapse_repeats(notes: list[str]) -> list[str]:
    """Each distinct note once, in first-seen order, with its count when it repeats (a
    pass that notes the same thing for every layer says it once: "... (x30)")."""
    counts: dict[str, int] = {}
    for note in notes:
        counts[note] = counts.get(note, 0) + 1
    return [note if n == 1 else f"{note} (x{n})" for note, n in counts.items()]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


class PassFailure(RuntimeError):
    """A pass raised or left a broken graph. The message names it and the passes before it."""


@dataclass
class PassContext:
    """What passes share while one graph is compiled.

    anatomy: the model anatomy of the graph (recomputed with refresh_anatomy() after
    structural rewrites). state: objects that outlive the compilation (KV stores,
    loaded artifacts), shared by passes and the runtime.
    """

    config: Config
    example_inputs: list
    anatomy: Any = None
    state: dict = field(default_factory=dict)
    graph_id: int = 0

    def refresh_anatomy(self, gm: torch.fx.GraphModule):
        from slimfx.compiler.anatomy import analyze

        self.anatomy = analyze(gm)
        return self.anatomy


def ordered(pipeline: list[str], passes: dict) -> list[str]:
    """`pipeline` in an order every pass accepts: after the passes its RUNS_AFTER names and
    before those its RUNS_BEFORE names (where they are in the pipeline). Each pass keeps
    its place unless one listed before it must run after it: then it moves up to just
    before the first such pass. So a pipeline that already satisfies every declaration
    is returned unchanged, and a pass appended to a pipeline lands where it is needed."""
    needs: dict[str, set] = {name: set() for name in pipeline}  # pass -> passes that must run first
    for name in pipeline:
        needs[name] |= {p for p in getattr(passes[name], "RUNS_AFTER", ()) if p in needs}
        for later in getattr(passes[name], "RUNS_BEFORE", ()):
            if later in needs:
                needs[later].add(name)
    done: list[str] = []
    left = list(pipeline)

    def place(name: str, waiting: tuple[str, ...]) -> None:
        """Place `name` after the passes it needs; `waiting` are those placing it."""
        if needs[name] & {name, *waiting}:
            raise PassFailure(f"pipeline {pipeline}: RUNS_AFTER / RUNS_BEFORE of {', '.join(sorted({name, *waiting}))} contradict each other")
        for first in [p for p in left if p in needs[name]]:
            if first in left:  # not placed meanwhile as what an earlier one needed
                left.remove(first)
                place(first, waiting + (name,))
        done.append(name)

    while left:
        place(left.pop(0), ())
    return done


class PassManager:
    """Runs `pipeline` (pass names) over a graph with the options in `config`."""

    def __init__(self, config: Config, pipeline: list[str] | None = None):
        from slimfx.compiler.registry import registered_passes

        self.config = config
        self.passes = registered_passes()
        steps = list(config.pipeline if pipeline is None else pipeline)
        unknown = [p for p in steps if p not in self.passes]
        if unknown:
            raise PassFailure(f"unknown passes in pipeline: {', '.join(unknown)}; allowed: {', '.join(self.passes)}")
        self.pipeline = ordered(steps, self.passes)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> list[PassResult]:
        results: list[PassResult] = []
        dump_dir = _debug_dir(ctx.graph_id)
        _dump(dump_dir, 0, "input", gm)
        for step, name in enumerate(self.pipeline, start=1):
            result = self._run_one(name, gm, ctx, [r.name for r in results])
            results.append(result)
            _dump(dump_dir, step, name, gm)
        return results

    def _run_one(self, name: str, gm: torch.fx.GraphModule, ctx: PassContext, before: list[str]) -> PassResult:
        module = self.passes[name]
        pass_cfg: PassConfig = self.config.pass_config(name)
        ran = ", ".join(before) or "none"
        check_layer_overrides(name, pass_cfg, ctx.anatomy)
        start = time.perf_counter()
        try:
            result = module.run(gm, pass_cfg, ctx)
        except Exception as exc:
            if is_user_error(exc):
                raise  # the configuration or the model is at fault, and the message names what
            raise PassFailure(f"pass {name!r} failed (passes that ran before it: {ran}): {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise PassFailure(f"pass {name!r} returned {type(result).__name__}, not a PassResult")
        if self.config.compile["check_graph"]:
            try:
                gm.graph.lint()
                gm.recompile()
            except Exception as exc:
                raise PassFailure(f"pass {name!r} left an invalid graph (passes before it: {ran}): {exc}") from exc
        if self.config.compile["time_passes"]:
            result.seconds = time.perf_counter() - start
        return result


def check_layer_overrides(name: str, pass_cfg: PassConfig, anatomy) -> None:
    """Per-layer overrides must name blocks the model has: an override for a layer that
    does not exist would otherwise be dropped without a word."""
    # Blocks a pass removed (layer_skip) keep their numbers, so overrides count the unmodified model's blocks.
    blocks = anatomy.model_blocks if anatomy is not None else 0
    if not blocks or anatomy.lm_head is None:
        return  # not a whole-model graph (graph breaks, or a graph slimfx does not understand)
    for selector in pass_cfg.layer_overrides:
        beyond = sorted(i for i in parse_layer_selector("layers", selector) if i >= blocks)
        if beyond:
            raise ConfigError(f"passes.{name}.layers.{selector!r}: layer {beyond[0]} does not exist; "
                              f"allowed: layers 0-{blocks - 1} (the model has {blocks} blocks)")


def _debug_dir(graph_id: int) -> Path | None:
    root = os.environ.get("SLIMFX_DEBUG_DIR")
    if not root:
        return None
    path = Path(root) / f"graph_{graph_id:03d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dump(dump_dir: Path | None, step: int, name: str, gm: torch.fx.GraphModule) -> None:
    if dump_dir is None:
        return
    (dump_dir / f"{step:02d}_{name}.py").write_text(gm.code)
    (dump_dir / f"{step:02d}_{name}.graph.txt").write_text(str(gm.graph))

"""The measuring half of `slimfx eval`: load, build inputs, run every configuration."""

from __future__ import annotations

import contextlib
import sys
import time

import torch

from slimfx.measure import fidelity, footprint, passkey, ruler

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bar(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def _strict_dynamo():
    """Hitting dynamo's recompile limit silently falls back to the *unmodified* eager
    model, which would report a configuration's quality as the base model's: make it
    an error instead, and raise the limit so many prompt lengths fit."""
    cfg = torch._dynamo.config
    saved = {k: getattr(cfg, k) for k in ("recompile_limit", "fail_on_recompile_limit_hit") if hasattr(cfg, k)}
    if "recompile_limit" in saved:
        cfg.recompile_limit = 64
    if "fail_on_recompile_limit_hit" in saved:
        cfg.fail_on_recompile_limit_hit = True
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(cfg, k, v)


def _report_rows(reports) -> list[dict]:
    return [{"graph": r.graph_id, "pipeline": r.pipeline_name, "codegen": r.codegen,
             "anatomy": r.anatomy_summary, "compile_seconds": round(r.compile_seconds, 3),
             "passes": [{"name": p.name, "applied": p.applied, "sites": p.sites_matched,
                         "nodes_rewritten": p.nodes_rewritten, "bytes_saved": p.bytes_saved,
                         "notes": list(p.notes)} for p in r.passes]} for r in reports]


def _idle_passes(reports, raw: dict) -> dict[str, str]:
    """Passes of the configuration's pipeline that applied in no graph, with their notes."""
    wanted = raw["pipelines"][raw["compile"]["pipeline"]]
    results = [p for r in reports for p in r.passes if p.name in wanted]
    idle = {}
    for name in wanted:
        mine = [p for p in results if p.name == name]
        if mine and not any(p.applied for p in mine):
            idle[name] = "; ".join(sorted({n for p in mine for n in p.notes})) or "nothing to do"
    return idle


def _measure(label, runner, tokenizer, cases, args, quiet) -> dict:
    if not cases:
        return {}
    bar = _bar(len(cases), f"passkey {label}", quiet)
    records = passkey.run_cases(runner, tokenizer, cases, args.max_new_tokens, args.device, on_case=lambda: bar.update(1))
    bar.close()
    return {"summary": passkey.summarize(records), "cases": records}


def _measure_ruler(label, runner, tokenizer, cases, args, quiet) -> dict:
    if not cases:
        return {}
    bar = _bar(len(cases), f"ruler {label}", quiet)
    records = ruler.run_cases(runner, tokenizer, cases, args.device, on_case=lambda: bar.update(1))
    bar.close()
    return {"summary": ruler.summarize(records), "cases": records}


def _ruler_cases(tokenizer, settings: dict, seed: int) -> list:
    spec = settings.get("ruler")
    if not spec:
        return []
    text = None
    if spec["text"]:
        with open(spec["text"], encoding="utf-8") as f:
            text = f.read()
    return ruler.build_cases(tokenizer, spec["tasks"], spec["lengths"], spec["samples"], seed, text)


def run_eval(args, settings: dict) -> dict:
    """Every figure of one `slimfx eval` command, as a JSON-ready dict."""
    from slimfx.compiler.report import clear_reports, reports
    from slimfx.runtime.models import load_model, resolve_model_source

    from slimfx.measure.report import stamp
    from slimfx.measure.runner import Runner, runtime_available

    mode = "runtime" if runtime_available() else "compile"

    quiet = args.no_progress
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=_DTYPES[args.dtype], device=args.device)
    timing = {"load_s": time.perf_counter() - t0}

    cases = [] if args.no_passkey else passkey.build_cases(tokenizer, settings["lengths"], settings["depths"], args.trials, args.seed)
    ruler_cases = _ruler_cases(tokenizer, settings, args.seed)
    segments = []
    if not args.no_fidelity:
        t = time.perf_counter()
        if args.text:
            segments = fidelity.file_segments(args.text, tokenizer, args.fidelity_tokens, args.window, device=args.device)
        else:
            segments = fidelity.default_segments(model, tokenizer, args.fidelity_tokens, device=args.device)
        timing["fidelity_text_s"] = time.perf_counter() - t

    t = time.perf_counter()
    base_fp = footprint.model_footprint(model)
    base_runner = Runner(model)
    base = {"runner": base_runner.label, "passkey": _measure("unmodified", base_runner, tokenizer, cases, args, quiet),
            "ruler": _measure_ruler("unmodified", base_runner, tokenizer, ruler_cases, args, quiet), "footprint": base_fp}
    timing["base_s"] = time.perf_counter() - t

    configurations = []
    with _strict_dynamo():
        for point in settings["points"]:
            t = time.perf_counter()
            torch._dynamo.reset()
            clear_reports()
            runner = Runner(model, point.raw, mode)
            entry = {"label": point.label, "values": point.values, "config": point.raw, "runner": runner.label,
                     "passkey": _measure(point.label, runner, tokenizer, cases, args, quiet),
                     "ruler": _measure_ruler(point.label, runner, tokenizer, ruler_cases, args, quiet)}
            if segments:
                bar = _bar(sum(s.n_scored for s in segments), f"fidelity {point.label}", quiet)
                entry["fidelity"] = fidelity.compare(base_runner, runner, segments, on_position=bar.update)
                bar.close()
            graphs = reports()
            if not graphs:
                raise RuntimeError(f"{point.label}: the slimfx backend compiled no graph; the figures would be the unmodified model's")
            entry["footprint"] = footprint.apply_pass_reports(base_fp, graphs, _resident_passes(point.raw))
            kv = [c["kv_bytes"] for c in (entry["passkey"] or {}).get("cases", [])]
            if kv:  # what the store really allocated, beside what the passes report
                entry["footprint"]["kv_bytes_allocated_max"] = max(kv)
            entry["compile_reports"] = _report_rows(graphs)
            idle = _idle_passes(graphs, point.raw)
            if idle:  # a sweep over a pass that never applied measures nothing: say so loudly
                entry["passes_not_applied"] = idle
                print(f"slimfx eval: warning: {point.label}: passes in the pipeline never applied: "
                      + "; ".join(f"{k} ({v})" for k, v in idle.items()), file=sys.stderr)
            entry["seconds"] = time.perf_counter() - t
            configurations.append(entry)
            del runner

    timing["total_s"] = time.perf_counter() - t0
    source = resolve_model_source(args.model)
    return {
        "kind": "slimfx-eval",
        "stamp": stamp(args.device),
        "model": {"name": source.name, "path": str(source.folder / (source.gguf_file or "")), "dtype": args.dtype,
                  "device": args.device, "parameters": sum(p.numel() for p in model.parameters()),
                  "layers": model.config.num_hidden_layers, "vocab": model.config.vocab_size},
        "config": {"file": args.config, "pipeline_override": args.pipeline, "base": settings["base_config"]},
        "settings": {"lengths": settings["lengths"], "depths": settings["depths"], "trials": args.trials,
                     "ruler": settings.get("ruler") and {**settings["ruler"], "text": settings["ruler"]["text"] or "built in (measure/ruler.py)",
                                                         "new_tokens": dict(ruler.NEW_TOKENS), "metric": "string_match_all"},
                     "seed": args.seed, "max_new_tokens": args.max_new_tokens,
                     "fidelity": {"text": args.text or "default: the unmodified model's greedy answers to fixed prompts",
                                  "prompts": None if args.text else list(fidelity.DEFAULT_PROMPTS),
                                  "tokens_requested": args.fidelity_tokens,
                                  "mode": "prefill the prompt (or first 32 tokens), then one teacher-forced token per call through the KV cache or store"}},
        "sweep": [{"key": a.key, "path": a.path, "values": a.values} for a in settings["axes"]],
        "base": base,
        "configurations": configurations,
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
    }


def _resident_passes(raw_config: dict) -> tuple[str, ...]:
    """layer_skip when it runs as extra graphs beside the whole model (schedule, speculative):
    their removed blocks stay in memory for the whole model's graph."""
    from slimfx.runtime.skip_variants import skip_mode

    return ("layer_skip",) if skip_mode(raw_config) is not None else ()

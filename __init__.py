"""slimfx: a torch.compile backend that makes LLM inference cheaper.

    model = torch.compile(model, backend="slimfx", options={"config": "passes.toml"})
    slimfx.last_report()   # what every pass did

The repository root is this package; see pyproject.toml for the folder mapping.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy re-exports keep `import slimfx` cheap (the CLI and the dynamo entry
    # point import only what they need).
    if name in {"reports", "last_report", "clear_reports"}:
        from slimfx.compiler import report

        return getattr(report, name)
    if name in {"load_config", "ConfigError"}:
        from slimfx.compiler import config

        return getattr(config, name)
    if name == "last_generate_stats":
        from slimfx.compiler.hf_generate import last_generate_stats

        return last_generate_stats
    if name in {"slimfx_backend", "compile"}:
        from slimfx.compiler import backend

        return getattr(backend, name)
    if name in {"load_package", "export_package"}:
        from slimfx.export import build, package

        return package.load_package if name == "load_package" else build.export_package
    if name == "analyze":
        from slimfx.compiler.anatomy import analyze

        return analyze
    raise AttributeError(f"module 'slimfx' has no attribute {name!r}")

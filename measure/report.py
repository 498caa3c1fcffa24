"""Writing results: a stamp (versions, device, date, command), JSON, markdown tables and
PNG plots. Every results file carries the stamp, so no figure travels without the
device and date it was measured on."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import platform
import sys
from pathlib import Path

from slimfx.measure.errors import UsageError

_PACKAGES = ("slimfx", "torch", "transformers", "triton", "numpy", "tokenizers")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:  # the running torch, which on a device machine may not be the pip-installed one
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover
        pass
    return out


def device_name(device: str = "cpu") -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu} ({torch.get_num_threads()} threads)"


def _command() -> str:
    """The command line as the user typed it: `slimfx eval ...` through the CLI, or the
    module form when run with `python -m slimfx.measure.<x>_cmd`."""
    argv = list(sys.argv) or [""]
    name = Path(argv[0]).name
    if name.endswith("_cmd.py"):
        return " ".join(["python -m slimfx.measure." + name[:-3]] + argv[1:])
    return " ".join(["slimfx"] + argv[1:])


def stamp(device: str = "cpu") -> dict:
    """Who/what/where/when of a results file."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "versions": versions(),
        "command": _command(),
    }


def output_paths(prefix: str | Path) -> dict[str, Path]:
    """PREFIX -> PREFIX.json, PREFIX.md, PREFIX.png; the folder is created, and a prefix
    that names an existing folder is refused (it is a file name stem, not a folder)."""
    prefix = Path(prefix)
    if prefix.is_dir():
        raise UsageError(f"--output {prefix}: is a folder; give a file name stem such as {prefix / 'eval'}")
    if prefix.suffix in (".json", ".md", ".png"):
        prefix = prefix.with_suffix("")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {prefix}: cannot create its folder ({exc.strerror})") from None
    return {ext: prefix.with_name(prefix.name + "." + ext) for ext in ("json", "md", "png")}


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(_clean(data), indent=2) + "\n")


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-2 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def stamp_line(st: dict) -> str:
    v = st["versions"]
    return (f"Measured {st['date']} on {st['device']}; torch {v.get('torch')}, transformers {v.get('transformers')}, "
            f"slimfx {v.get('slimfx') or '(source tree, not installed)'}.\n\nCommand: `{st['command']}`")


def pyplot():
    """matplotlib with a file-only backend (no display on CI or device machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str) -> None:
    """Write `fig` as a PNG under `title` and close it (pyplot keeps open figures alive)."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)

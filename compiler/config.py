"""The pass configuration: one strict schema, read from TOML or a dict.

A configuration looks like this (every section is optional):

    [compile]
    pipeline = "default"          # which named pipeline runs
    codegen = "auto"              # auto | eager | inductor
    check_graph = true            # lint + recompile the graph after every pass

    [pipelines]
    default = ["fold_noop_casts"]

    [passes.kv_eviction]          # options of one pass (its own schema)
    budget = 256
    [passes.kv_eviction.layers."0-3"]   # per-layer overrides of that pass
    budget = 1024

    [artifacts]                   # calibration artifacts, referenced by path
    head_codebook = "calib/head.safetensors"

Every error is a ConfigError whose message is one line naming the key path, the
value and what is allowed, e.g.

    passes.kv_eviction.budgte: unknown key; allowed: budget, policy (did you mean 'budget'?)
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tomllib

from slimfx.compiler.errors import echo


class ConfigError(ValueError):
    """A configuration is malformed. The message is one line: key path, value, what is allowed."""


_MISSING = object()


@dataclass(frozen=True)
class Option:
    """One typed option of a schema.

    type_: bool, int, float, str, list (of `item`), or "path" (a str naming a file).
    choices: allowed values (for str/int). lo/hi: inclusive numeric bounds.
    """

    type_: Any
    default: Any = _MISSING
    doc: str = ""
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    item: Any = None  # element type for lists
    per_layer: bool = True  # may be overridden per layer

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        name = _type_name(self.type_, self.item)
        if self.lo is not None and self.hi is not None:
            return f"{name} in [{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"{name} >= {self.lo}"
        if self.hi is not None:
            return f"{name} <= {self.hi}"
        return name

    def validate(self, path: str, value: Any) -> Any:
        """Return the normalised value or raise ConfigError naming `path`."""
        if self.type_ is list:
            if not isinstance(value, list):
                raise _bad(path, value, self.allowed())
            return [Option(self.item, choices=self.choices, lo=self.lo, hi=self.hi).validate(f"{path}[{i}]", v) for i, v in enumerate(value)]
        value = _coerce_scalar(path, value, self.type_, self.allowed())
        if self.choices is not None and value not in self.choices:
            raise _bad(path, value, self.allowed(), _nearest(value, self.choices))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
                raise _bad(path, value, self.allowed())
        return value


def _type_name(t, item=None) -> str:
    if t is list:
        return f"a list of {_type_name(item)}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", "path": "a file path (string)"}.get(t, str(t))


def _coerce_scalar(path: str, value: Any, type_: Any, allowed: str) -> Any:
    if type_ is bool:
        if isinstance(value, bool):
            return value
    elif type_ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif type_ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif type_ in (str, "path"):
        if isinstance(value, str) and value:
            return value
    raise _bad(path, value, allowed)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:  # a value nested thousands deep
        text = f"<{type(value).__name__} nested too deep to show>"
    return echo(text, 60)


def _bad(path: str, value: Any, allowed: str, suggestion: str | None = None) -> ConfigError:
    hint = f" (did you mean {suggestion!r}?)" if suggestion is not None else ""
    return ConfigError(f"{path}: got {_short(value)}; allowed: {allowed}{hint}")


def _nearest(word: Any, candidates) -> Any:
    if not isinstance(word, str) or len(word) > 2 * MAX_KEY:  # nothing that long is a typo of a key
        return None
    hits = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.6)
    return hits[0] if hits else None


def _unknown_key(path: str, key: Any, allowed) -> ConfigError:
    allowed = sorted(allowed)
    near = _nearest(key, allowed)
    hint = f" (did you mean {near!r}?)" if near else ""
    where = f"{path}.{echo(key)}" if path else echo(key)
    return ConfigError(f"{where}: unknown key; allowed: {', '.join(allowed) or '(none)'}{hint}")


def _require_table(path: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise _bad(path or "<config>", value, "a table")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{path or '<config>'}: key {_short(key)} is not a string; keys must be strings")
    return value


def validate_options(path: str, raw: Mapping, schema: Mapping[str, Option], *, fill_defaults: bool = True, layer: bool = False) -> dict:
    """Check `raw` against `schema` (unknown keys, types, ranges) and return normalised options."""
    raw = _require_table(path, raw)
    out = {}
    for key, value in raw.items():
        if key not in schema or (layer and not schema[key].per_layer):
            allowed = [k for k, o in schema.items() if o.per_layer or not layer]
            raise _unknown_key(path, key, allowed)
        out[key] = schema[key].validate(f"{path}.{key}", value)
    if fill_defaults:
        for key, opt in schema.items():
            if key in out:
                continue
            if opt.required:
                raise ConfigError(f"{path}.{key}: missing; required, {opt.allowed()}")
            out[key] = opt.default
    return out


# ----------------------------------------------------------------------------- schema

COMPILE_SCHEMA: dict[str, Option] = {
    "pipeline": Option(str, "default", "name of the pipeline in [pipelines] to run"),
    "codegen": Option(str, "auto", "how the rewritten graph runs", choices=("auto", "eager", "inductor", "slimfx")),
    "check_graph": Option(bool, True, "lint and recompile the graph after every pass"),
    "time_passes": Option(bool, True, "time every pass"),
    "verbose": Option(bool, False, "print the report after each compilation"),
}

# The pipeline used when a configuration names none: only lossless passes.
DEFAULT_PIPELINES: dict[str, list[str]] = {"default": ["fold_noop_casts"], "off": []}

_LAYER_KEY = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
# Layer indices a selector may name, before the model is known (the pass that applies
# an override checks it against the model's blocks); no decoder has near this many, and
# the bound keeps "0-300000000" from becoming a 300M-element tuple.
MAX_LAYER = 4095
# Keys longer than this are echoed cut (errors stay one readable line).
MAX_KEY = 64


def parse_layer_selector(path: str, key: str) -> tuple[int, ...]:
    """'3' -> (3,), '0-3' -> (0, 1, 2, 3), '1,5,7-8' -> (1, 5, 7, 8)."""
    layers: list[int] = []
    for part in (key.split(",") if len(key) <= 16 * MAX_KEY else [key]):
        m = _LAYER_KEY.match(part) if len(part) <= MAX_KEY else None
        if not m:
            raise ConfigError(f"{path}.{echo(key)}: not a layer selector; allowed: an index '3', a range '0-3' or a list '1,5,7-8'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"{path}.{echo(key)}: range {lo}-{hi} is empty; allowed: 'a-b' with a <= b")
        if hi > MAX_LAYER:
            raise ConfigError(f"{path}.{echo(key)}: layer {hi} is out of range; allowed: layer indices 0-{MAX_LAYER} "
                              "(and only the model's own blocks)")
        layers.extend(range(lo, hi + 1))
    return tuple(layers)


@dataclass
class PassConfig:
    """The validated options of one pass, plus its per-layer overrides."""

    name: str
    options: dict
    layer_overrides: dict[str, dict] = field(default_factory=dict)  # selector text -> options

    def for_layer(self, layer: int) -> dict:
        """Options for decoder block `layer`: later selectors win over earlier ones."""
        merged = dict(self.options)
        for selector, overrides in self.layer_overrides.items():
            if layer in parse_layer_selector("layers", selector):
                merged.update(overrides)
        return merged

    def overridden_layers(self) -> set[int]:
        return {i for sel in self.layer_overrides for i in parse_layer_selector("layers", sel)}


@dataclass
class Config:
    """A validated configuration. `raw` is the normalised dict form (round-trips through TOML)."""

    compile: dict
    pipelines: dict[str, list[str]]
    passes: dict[str, PassConfig]
    artifacts: dict[str, str]
    source: str = "<defaults>"

    @property
    def pipeline(self) -> list[str]:
        return self.pipelines[self.compile["pipeline"]]

    def pass_config(self, name: str) -> PassConfig:
        """Options of pass `name`; defaults when the file does not mention it."""
        if name in self.passes:
            return self.passes[name]
        return PassConfig(name, validate_options(f"passes.{name}", {}, pass_schemas()[name]))

    def artifact_path(self, key: str) -> Path:
        if key not in self.artifacts:
            raise ConfigError(f"artifacts.{key}: missing; a pass needs it (allowed keys: any name, value a file path)")
        return Path(self.artifacts[key])

    def check_artifact_files(self) -> None:
        """ConfigError unless every [artifacts] file an option of a pass in the pipeline
        names (by its key) is an existing file: `slimfx config` and `slimfx run` find a
        missing calibration file before any model loads. Whether its contents fit the
        model is checked when the pass runs."""
        for name in self.pipeline:
            pc = self.pass_config(name)
            for table, where in [(pc.options, f"passes.{name}")] + [(o, f"passes.{name}.layers.{echo(sel)}")
                                                                     for sel, o in pc.layer_overrides.items()]:
                for key, value in table.items():
                    if isinstance(value, str) and value in self.artifacts and not Path(self.artifacts[value]).is_file():
                        what = "a folder" if Path(self.artifacts[value]).exists() else "not found"
                        raise ConfigError(f"artifacts.{echo(value)}: {echo(repr(self.artifacts[value]), 200)} is {what} "
                                          f"({where}.{key} names it); allowed: an existing file (the configuration's "
                                          "comments say which `slimfx calibrate` command writes it)")

    def check_artifacts(self, model=None, anatomy=None) -> None:
        """ConfigError (one line) for the first artifact of the pipeline `slimfx run` could
        not use: a missing file, one its pass cannot read or validate and, given the model
        and its anatomy, one made for another model or naming blocks, linears or sites it
        lacks. Each pass checks with the loader its run() uses (its optional
        `check_artifacts` hook, compiler/registry.py)."""
        from slimfx.compiler.registry import registered_passes

        self.check_artifact_files()
        modules = registered_passes()
        for name in self.pipeline:
            hook = getattr(modules[name], "check_artifacts", None)
            if hook is not None:
                hook(self.pass_config(name), self, model, anatomy)

    def to_dict(self) -> dict:
        passes = {}
        for name, pc in self.passes.items():
            entry = dict(pc.options)
            if pc.layer_overrides:
                entry["layers"] = {k: dict(v) for k, v in pc.layer_overrides.items()}
            passes[name] = entry
        return {
            "compile": dict(self.compile),
            "pipelines": {k: list(v) for k, v in self.pipelines.items()},
            "passes": passes,
            "artifacts": dict(self.artifacts),
        }


def pass_schemas() -> dict[str, dict[str, Option]]:
    """Option schemas of every registered pass (compiler/registry.py)."""
    from slimfx.compiler.registry import registered_passes

    return {name: mod.OPTIONS for name, mod in registered_passes().items()}


_TOP_LEVEL = ("compile", "pipelines", "passes", "artifacts")


def _validate_pipelines(raw: Any, known_passes) -> dict[str, list[str]]:
    raw = _require_table("pipelines", raw)
    pipelines = {k: list(v) for k, v in DEFAULT_PIPELINES.items()}
    for name, steps in raw.items():
        path = f"pipelines.{echo(name)}"
        if not isinstance(steps, list):
            raise _bad(path, steps, "a list of pass names")
        for i, step in enumerate(steps):
            if not isinstance(step, str) or step not in known_passes:
                raise _bad(f"{path}[{i}]", step, "one of " + ", ".join(sorted(known_passes)), _nearest(step, known_passes))
        pipelines[name] = list(steps)
    return pipelines


def _validate_pass(name: str, raw: Any, schema: Mapping[str, Option]) -> PassConfig:
    path = f"passes.{name}"
    raw = dict(_require_table(path, raw))
    layers_raw = raw.pop("layers", {})
    options = validate_options(path, raw, schema)
    overrides = {}
    for selector, table in _require_table(f"{path}.layers", layers_raw).items():
        parse_layer_selector(f"{path}.layers", selector)
        overrides[selector] = validate_options(f"{path}.layers.{echo(selector)}", table, schema, fill_defaults=False, layer=True)
    return PassConfig(name, options, overrides)


def validate_config(raw: Mapping, source: str = "<dict>") -> Config:
    """Validate a config dict (as parsed from TOML). Raises ConfigError."""
    raw = _require_table("", raw)
    for key in raw:
        if key not in _TOP_LEVEL:
            raise _unknown_key("", key, _TOP_LEVEL)
    schemas = pass_schemas()
    compile_opts = validate_options("compile", raw.get("compile", {}), COMPILE_SCHEMA)
    pipelines = _validate_pipelines(raw.get("pipelines", {}), schemas)
    if compile_opts["pipeline"] not in pipelines:
        raise _bad("compile.pipeline", compile_opts["pipeline"], "one of " + ", ".join(sorted(pipelines)), _nearest(compile_opts["pipeline"], pipelines))
    passes = {}
    for name, table in _require_table("passes", raw.get("passes", {})).items():
        if name not in schemas:
            raise _unknown_key("passes", name, schemas)
        passes[name] = _validate_pass(name, table, schemas[name])
    artifacts = {}
    for key, value in _require_table("artifacts", raw.get("artifacts", {})).items():
        artifacts[key] = Option("path").validate(f"artifacts.{echo(key)}", value)
    return Config(compile_opts, pipelines, passes, artifacts, source)


def load_config(spec: Any = None) -> Config:
    """A Config from None (defaults: lossless passes only), a dict, a Config, or a TOML file path."""
    if spec is None:
        return validate_config({}, "<defaults>")
    if isinstance(spec, Config):
        return spec
    if isinstance(spec, Mapping):
        return validate_config(spec, "<dict>")
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        where = f"config file {echo(repr(str(path)))}"
        if not path.is_file():
            what = "not a file" if path.exists() else "not found"
            raise ConfigError(f"{where}: {what}; allowed: a path to a .toml file or a dict")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML ({exc})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not UTF-8 text; allowed: a TOML file") from None
        except RecursionError:
            raise ConfigError(f"{where}: nested too deep to read; allowed: a configuration (a few tables deep)") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot be read ({exc.strerror or type(exc).__name__}); allowed: a readable TOML file") from None
        base = path.parent
        config = validate_config(raw, str(path))
        # Artifact paths in a file are relative to the file, so configs can travel with their artifacts.
        config.artifacts = {k: str(v if Path(v).is_absolute() else base / v) for k, v in config.artifacts.items()}
        return config
    raise ConfigError(f"config: got {type(spec).__name__}; allowed: None, a dict, or a path to a .toml file")


def set_path(raw: dict, dotted: str, value: Any) -> dict:
    """Set `raw["a"]["b"]["c"] = value` for dotted 'a.b.c', creating tables; returns raw."""
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a table; allowed: a path of tables ending in an option")
    node[keys[-1]] = value
    return raw


# ----------------------------------------------------------------------------- TOML writing

def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_str(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: Mapping, _prefix: tuple[str, ...] = ()) -> str:
    """Write a nested dict of scalars/lists/tables as TOML (enough for configs)."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    lines = []
    if _prefix and (scalars or not tables):
        lines.append("[" + ".".join(_toml_key(p) for p in _prefix) + "]")
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars]
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, table in tables:
        text += ("\n" if text else "") + to_toml(table, _prefix + (key,))
    return text


def example_value(opt: Option) -> Any:
    """The default of `opt`, or a valid placeholder for a required option (used by docs and tests)."""
    if not opt.required:
        return opt.default
    if opt.choices:
        return opt.choices[0]
    return {bool: False, int: int(opt.lo or 1), float: float(opt.lo or 1.0), str: "x", "path": "artifact.bin"}.get(opt.type_, None)


def describe_schema() -> str:
    """A plain-text listing of every section and option, for `slimfx config --schema`."""
    lines = ["[compile]"]
    lines += [f"  {k} = {_toml_value(o.default)}   # {o.allowed()}; {o.doc}" for k, o in COMPILE_SCHEMA.items()]
    for name, schema in pass_schemas().items():
        lines.append(f"[passes.{name}]")
        for k, o in schema.items():
            default = "(required)" if o.required else _toml_value(o.default)
            lines.append(f"  {k} = {default}   # {o.allowed()}; {o.doc}")
    return "\n".join(lines)


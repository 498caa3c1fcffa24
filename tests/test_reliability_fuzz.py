"""Fuzzing what users hand slimfx: configurations (as dicts and as TOML files), command
lines and artifact files. Whatever is drawn, the answer is success or one line: a slimfx
user error (a ValueError of slimfx) for Python callers, exit 2 and one stderr line from
the CLI; never a traceback, a hang or a giant line.

Hypothesis runs the profile conftest loads (derandomized in CI: the same examples each
run); the example counts keep the whole file near ten seconds on one CPU core."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimfx.compiler.cli import main
from slimfx.compiler.config import COMPILE_SCHEMA, pass_schemas, to_toml, validate_config
from slimfx.compiler.errors import MAX_LINE, is_user_error

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))

# Keys slimfx knows (so the draws reach deep into the schema) mixed with odd ones.
KNOWN_KEYS = sorted({"compile", "pipelines", "passes", "artifacts", "layers", "default", "0-3", "99", "0-300000000", "1,5,7-8"}
                    | set(COMPILE_SCHEMA) | set(pass_schemas()) | {k for s in pass_schemas().values() for k in s})
ODD_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), ODD_TEXT, st.text(alphabet="k", min_size=200, max_size=2000))
SCALARS = st.one_of(
    st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 3, 16, 2**31, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(KNOWN_KEYS), ODD_TEXT,
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
                      max_leaves=12)
CONFIGS = st.dictionaries(st.sampled_from(["compile", "pipelines", "passes", "artifacts"]) | KEYS, VALUES, max_size=4)


def _is_one_line(message: str) -> bool:
    return "\n" not in message and "\r" not in message and 0 < len(message) <= MAX_LINE + 100


def _user_error_or_none(fn, *args, allowed=is_user_error):
    """The error `fn(*args)` raises (None if none): one line, of a kind `allowed` accepts."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the point: which exceptions come out
        assert allowed(exc), f"{type(exc).__name__}: {exc}"
        assert _is_one_line(str(exc)), repr(str(exc))[:300]
        return exc
    return None


def _cli_is_zero_or_one_line(argv, capsys) -> int:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    err = capsys.readouterr().err
    if rc == 0:
        return rc
    assert rc == 2, (argv, rc, err)
    assert err.count("\n") == 1 and err.startswith("slimfx: ") and _is_one_line(err.rstrip("\n")), repr(err)[:300]
    return rc


@FUZZ
@given(CONFIGS)
def test_config_dicts(raw):
    _user_error_or_none(validate_config, raw)


def _toml_or_none(raw):
    try:
        return to_toml(raw)
    except (TypeError, ValueError, RecursionError):
        return None  # not representable as TOML (None, floats TOML lacks...): the text fuzz covers files


@settings(FUZZ, max_examples=60)
@given(CONFIGS)
def test_config_files(tmp_path_factory, capsys, raw):
    text = _toml_or_none(raw)
    if text is None:
        return
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(text)
    _cli_is_zero_or_one_line(["config", str(path)], capsys)


TOML_PIECES = st.sampled_from(['[compile]\n', '[passes.kv_eviction]\n', '[passes.kv_eviction.layers."0-3"]\n', 'budget = 32\n',
                               'codegen = "fast"\n', '[pipelines]\n', 'x = ["kv_eviction"]\n', '[artifacts]\n', 'a = "f.json"\n',
                               '"\\u001b" = 1\n', 'a = [[[[[[[[]]]]]]]]\n', '= = =\n', '\x00', '\xff', 'pipeline = "x"\n'])


@settings(FUZZ, max_examples=60)
@given(st.lists(st.one_of(TOML_PIECES, st.text(max_size=20)), max_size=8), st.binary(max_size=20))
def test_config_file_text(tmp_path_factory, capsys, pieces, tail):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_bytes("".join(pieces).encode("utf-8", "surrogatepass") + tail)
    _cli_is_zero_or_one_line(["config", str(path)], capsys)


NUMBERS = st.one_of(st.sampled_from(["0", "-1", "-3", "1", "nan", "inf", "-inf", "1e400", "0.5", "abc", "", "1" * 30, "0x10"]),
                    st.floats(allow_nan=True).map(repr), st.integers(-2**64, 2**64).map(str))
RUN_FLAGS = ["--temperature", "--top-k", "--top-p", "--max-new-tokens", "--seed", "--dtype", "--device"]


@settings(FUZZ, max_examples=80)
@given(st.lists(st.tuples(st.sampled_from(RUN_FLAGS), NUMBERS | ODD_TEXT), min_size=1, max_size=4))
def test_run_arguments(capsys, flags):
    # The model does not exist: every draw ends in one line (a bad argument, else the model).
    argv = ["run", "--model", "/no/such/model"] + [f"{flag}={value}" for flag, value in flags]
    assert _cli_is_zero_or_one_line(argv, capsys) == 2


@settings(FUZZ, max_examples=40)
@given(st.sampled_from(["bits", "skip", "share", "vq-head", "duo-heads"]),
       st.lists(st.sampled_from(["--bits", "--budget", "--tokens", "--fraction", "--count", "--k", "--out", "--model"]), max_size=3),
       NUMBERS)
def test_calibrate_arguments(capsys, command, flags, value):
    argv = ["calibrate", command, "--model", "/no/such/model"] + [f"{flag}={value}" for flag in flags]
    _cli_is_zero_or_one_line(argv, capsys)


PLAN_KINDS = ["slimfx.bit_allocation", "slimfx.layer_skip", "slimfx.kv_share", "other", 1, None]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=False, allow_infinity=False),
              st.sampled_from(KNOWN_KEYS + ["int8", "int4_g32", "model.layers.0.mlp.up_proj.weight"]), ODD_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=16)
PLANS = st.fixed_dictionaries({"kind": st.sampled_from(PLAN_KINDS), "version": st.sampled_from([1, 2, "1"])},
                              optional={k: JSON_VALUES for k in ("formats", "linears", "totals", "budget", "model", "blocks",
                                                                 "map", "pairs", "method")})


def _plan_readers():
    from slimfx.passes import layer_skip
    from slimfx.passes.kv_share import plan as share_plan
    from slimfx.passes.quantize import plan as bit_plan

    return [bit_plan.read_plan, layer_skip.read_plan, share_plan.read_plan]


@settings(FUZZ, max_examples=80)
@given(st.one_of(PLANS.map(lambda p: json.dumps(p).encode()), st.binary(max_size=64),
                 st.sampled_from([b"NaN", b"[" * 3000 + b"]" * 3000, b'{"kind": "slimfx.bit_allocation", "version": 1, "formats": {"a": NaN}}'])))
def test_plan_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_bytes(data)
    for read in _plan_readers():  # their contract: ValueError, one line (callers make it a UsageError)
        error = _user_error_or_none(read, path, allowed=lambda exc: isinstance(exc, ValueError))
        if error is None and read.__module__.endswith("quantize.plan"):
            from slimfx.passes.quantize.plan import format_plan

            format_plan(read(path))  # what read_plan accepts, inspect can print


@settings(FUZZ, max_examples=30)
@given(st.one_of(st.binary(max_size=256), st.sampled_from([b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])))
def test_duo_heads_files(tmp_path_factory, data):
    from slimfx.passes.kv_eviction import retrieval_heads

    path = tmp_path_factory.mktemp("duo") / "duo.safetensors"
    path.write_bytes(data)
    assert _user_error_or_none(retrieval_heads.load, path, "duo", 2, 2) is not None


SAFETENSORS_HEADS = st.sampled_from([b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", b"\xff" * 8,
                                     b'\x40\x00\x00\x00\x00\x00\x00\x00{"__metadata__": {"format": "slimfx.vq_head"}}   '])


@settings(FUZZ, max_examples=30)
@given(st.one_of(SAFETENSORS_HEADS, st.binary(max_size=256), st.tuples(SAFETENSORS_HEADS, st.binary(max_size=64)).map(b"".join)))
def test_vq_codebook_files(tmp_path_factory, data):
    from slimfx.runtime.vq_head import load_artifact

    path = tmp_path_factory.mktemp("vq") / "head.safetensors"
    path.write_bytes(data)
    assert _user_error_or_none(load_artifact, path, "vq_head") is not None

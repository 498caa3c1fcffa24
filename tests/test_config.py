"""The configuration schema: clear one-line errors, per-layer overrides, TOML round trips."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimfx.compiler import config as C
from slimfx.compiler.config import ConfigError, load_config, to_toml, tomllib
from slimfx.compiler.registry import registered_passes


def test_defaults_run_only_lossless_passes():
    cfg = load_config(None)
    assert cfg.pipeline, "the default pipeline names at least one pass"
    assert all(not registered_passes()[p].LOSSY for p in cfg.pipeline)


def test_unknown_top_level_key_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        load_config({"pases": {}})
    msg = str(err.value)
    assert "pases: unknown key" in msg and "did you mean 'passes'" in msg and "\n" not in msg


def test_wrong_type_names_path_value_and_allowed():
    with pytest.raises(ConfigError, match=r"^compile\.check_graph: got 'yes'; allowed: a boolean$"):
        load_config({"compile": {"check_graph": "yes"}})


def test_out_of_choice_value_suggests_nearest():
    with pytest.raises(ConfigError, match=r"compile\.codegen: got 'inductr'.*did you mean 'inductor'"):
        load_config({"compile": {"codegen": "inductr"}})


def test_unknown_pass_in_pipeline():
    with pytest.raises(ConfigError, match=r"pipelines\.mine\[0\]: got 'fold_noop_cast'.*did you mean 'fold_noop_casts'"):
        load_config({"pipelines": {"mine": ["fold_noop_cast"]}})


def test_pipeline_must_exist():
    with pytest.raises(ConfigError, match=r"compile\.pipeline: got 'fast'"):
        load_config({"compile": {"pipeline": "fast"}})


def test_layer_selector_errors():
    with pytest.raises(ConfigError, match="not a layer selector"):
        C.parse_layer_selector("passes.x.layers", "a-b")
    with pytest.raises(ConfigError, match="is empty"):
        C.parse_layer_selector("passes.x.layers", "5-2")
    assert C.parse_layer_selector("p", "1,5,7-8") == (1, 5, 7, 8)


def test_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[compile\npipeline=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_artifact_paths_are_relative_to_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[artifacts]\nhead = "calib/head.safetensors"\n')
    cfg = load_config(f)
    assert cfg.artifact_path("head") == tmp_path / "calib" / "head.safetensors"
    with pytest.raises(ConfigError, match="artifacts.other: missing"):
        cfg.artifact_path("other")


# A synthetic option schema to test per-pass options and per-layer overrides without
# depending on which passes exist.
SCHEMA = {
    "budget": C.Option(int, 256, lo=16, hi=1 << 20),
    "policy": C.Option(str, "h2o", choices=("h2o", "tova", "streaming")),
    "alpha": C.Option(float, 0.95, lo=0.0, hi=1.0),
    "keep": C.Option(list, [], item=int),
    "global_only": C.Option(bool, False, per_layer=False),
}


def test_pass_options_and_layer_overrides():
    pc = C._validate_pass("x", {"budget": 512, "layers": {"0-1": {"budget": 1024}, "1": {"policy": "tova"}}}, SCHEMA)
    assert pc.options["budget"] == 512 and pc.options["policy"] == "h2o"
    assert pc.for_layer(0)["budget"] == 1024 and pc.for_layer(0)["policy"] == "h2o"
    assert pc.for_layer(1) == {**pc.options, "budget": 1024, "policy": "tova"}
    assert pc.for_layer(5) == pc.options
    assert pc.overridden_layers() == {0, 1}
    with pytest.raises(ConfigError, match=r"passes\.x\.budget: got 8; allowed: an integer in \[16, 1048576\]"):
        C._validate_pass("x", {"budget": 8}, SCHEMA)
    with pytest.raises(ConfigError, match=r"passes\.x\.layers\.3\.global_only: unknown key"):
        C._validate_pass("x", {"layers": {"3": {"global_only": True}}}, SCHEMA)
    with pytest.raises(ConfigError, match=r"passes\.x\.keep\[1\]: got 'a'"):
        C._validate_pass("x", {"keep": [1, "a"]}, SCHEMA)


# ---------------------------------------------------------------- hypothesis

keys = st.text(alphabet=string.ascii_letters + string.digits + "_-. ", min_size=0, max_size=12)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=10))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)), max_leaves=10)
known = st.sampled_from(["compile", "pipelines", "passes", "artifacts", "pipeline", "codegen", "fold_noop_casts", "layers", "0-2"])
raw_configs = st.recursive(
    st.dictionaries(st.one_of(keys, known), values, max_size=4),
    lambda inner: st.dictionaries(st.one_of(keys, known), st.one_of(values, inner), max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_configs)
def test_malformed_configs_raise_only_config_error(raw):
    try:
        load_config(raw)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(SCHEMA)), values, max_size=5))
def test_malformed_pass_options_raise_only_config_error(raw):
    try:
        C._validate_pass("x", raw, SCHEMA)
    except ConfigError as exc:
        assert "\n" not in str(exc)


names = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8)
valid_options = st.fixed_dictionaries({}, optional={
    "budget": st.integers(16, 1 << 20),
    "policy": st.sampled_from(SCHEMA["policy"].choices),
    "alpha": st.floats(0.0, 1.0),
    "keep": st.lists(st.integers(-5, 5), max_size=3),
})
selectors = st.lists(st.integers(0, 40), min_size=1, max_size=3).map(lambda xs: ",".join(map(str, xs)))


@settings(max_examples=200, deadline=None)
@given(
    compile_opts=st.fixed_dictionaries({}, optional={
        "codegen": st.sampled_from(C.COMPILE_SCHEMA["codegen"].choices),
        "check_graph": st.booleans(), "time_passes": st.booleans(), "verbose": st.booleans(),
    }),
    pipelines=st.dictionaries(names, st.lists(st.sampled_from(sorted(registered_passes())), max_size=3), max_size=3),
    artifacts=st.dictionaries(names, st.text(alphabet=string.printable, min_size=1, max_size=20), max_size=3),
)
def test_valid_configs_round_trip_through_toml(compile_opts, pipelines, artifacts):
    raw = {"compile": compile_opts, "pipelines": pipelines, "artifacts": artifacts}
    first = load_config(raw).to_dict()
    again = load_config(tomllib.loads(to_toml(first))).to_dict()
    assert again == first


@settings(max_examples=200, deadline=None)
@given(options=valid_options, overrides=st.dictionaries(selectors, valid_options, max_size=3))
def test_pass_options_round_trip_through_toml(options, overrides):
    raw = dict(options)
    if overrides:
        raw["layers"] = overrides
    pc = C._validate_pass("x", raw, SCHEMA)
    text = to_toml({"x": {**pc.options, "layers": pc.layer_overrides}})
    back = C._validate_pass("x", tomllib.loads(text)["x"], SCHEMA)
    assert back.options == pc.options and back.layer_overrides == pc.layer_overrides


def test_example_configs_are_valid():
    import pathlib

    files = sorted(pathlib.Path(__file__).resolve().parent.parent.joinpath("examples").glob("*.toml"))
    assert files, "examples/ ships at least one config"
    for f in files:
        load_config(f)

"""Balanced spherical k-means, the VQ head artifact (round trip, validation) and
`slimfx calibrate` argument handling."""

from __future__ import annotations

import math

import pytest
import torch

from slimfx.calibrate.kmeans import KMeansError, balanced_spherical_kmeans, cluster_capacity
from slimfx.calibrate.vq_head import build_artifact
from slimfx.compiler.config import ConfigError
from slimfx.compiler.errors import UsageError
from slimfx.runtime.vq_head import load_artifact, save_artifact


def _rows(v=300, h=16, seed=0):
    """Rows around 12 directions, so clusters exist to be found."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, h, generator=gen)
    return centers[torch.randint(0, 12, (v,), generator=gen)] + 0.3 * torch.randn(v, h, generator=gen)


@pytest.mark.parametrize("v,k,balance", [(300, 12, 1.0), (301, 7, 1.0), (300, 10, 1.5)])
def test_kmeans_sizes_respect_the_cap(v, k, balance):
    assign, centroids = balanced_spherical_kmeans(_rows(v), k, seed=3, balance=balance)
    sizes = torch.bincount(assign, minlength=k)
    assert sizes.sum() == v and sizes.max() <= cluster_capacity(v, k, balance)
    if balance == 1.0:
        assert sizes.max() == math.ceil(v / k)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(k))


def test_kmeans_is_seeded_and_finds_structure():
    rows = _rows()
    a1, c1 = balanced_spherical_kmeans(rows, 12, seed=5)
    a2, c2 = balanced_spherical_kmeans(rows, 12, seed=5)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    # Members are closer (cosine) to their own centroid than to the average centroid.
    x = torch.nn.functional.normalize(rows, dim=1)
    own = (x * c1[a1]).sum(1).mean()
    assert own > (x @ c1.T).mean() + 0.3


def test_kmeans_rejects_bad_arguments():
    with pytest.raises(KMeansError, match="k: got 0"):
        balanced_spherical_kmeans(_rows(), 0)
    with pytest.raises(KMeansError, match="balance"):
        balanced_spherical_kmeans(_rows(), 4, balance=0.5)
    with pytest.raises(KMeansError, match="rows"):
        balanced_spherical_kmeans(torch.randn(10), 2)


def test_artifact_round_trip_and_statistics(tmp_path):
    w = _rows(200, 16)
    art = build_artifact(w, 8, seed=1)
    path = save_artifact(art, tmp_path / "head.safetensors")
    back = load_artifact(path, "vq_head", vocab=200, hidden=16)
    for name, t in art.tensors().items():
        assert torch.equal(getattr(back, name), t), name
    assert back.metadata["k"] == "8" and back.metadata["seed"] == "1"
    # Radii bound every member's distance to its code; members list each token once.
    codes = art.token_to_code.long()
    dist = (w - art.codebook[codes]).norm(dim=1)
    assert (dist <= art.radii[codes] + 1e-5).all()
    assert sorted(art.members[art.members >= 0].tolist()) == list(range(200))
    proj = art.scale[:, None] * art.codebook[codes]  # scale = length along the code
    assert ((w - proj) * art.codebook[codes]).sum(1).abs().max() < 1e-3


def test_artifact_validation_errors_name_key_and_expectation(tmp_path):
    art = build_artifact(_rows(100, 8), 4)
    path = save_artifact(art, tmp_path / "a.safetensors")
    with pytest.raises(ConfigError, match=r"artifacts\.head .*hidden size 8; expected 16"):
        load_artifact(path, "head", hidden=16)
    with pytest.raises(ConfigError, match=r"artifacts\.head .*covers 100 tokens; expected 128"):
        load_artifact(path, "head", vocab=128)
    with pytest.raises(ConfigError, match=r"artifacts\.head .*no such file"):
        load_artifact(tmp_path / "missing.safetensors", "head")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        load_artifact(tmp_path / "junk.safetensors", "head")
    bad = build_artifact(_rows(100, 8), 4)
    bad.radii = bad.radii[:3]
    save_artifact(bad, tmp_path / "b.safetensors")
    with pytest.raises(ConfigError, match=r"radii is \(3,\) torch.float32; expected \[4\]") as err:
        load_artifact(tmp_path / "b.safetensors", "head")
    assert "\n" not in str(err.value)
    bad = build_artifact(_rows(100, 8), 4)
    bad.token_to_code = torch.roll(bad.token_to_code, 1)
    save_artifact(bad, tmp_path / "c.safetensors")
    with pytest.raises(ConfigError, match="do not match"):
        load_artifact(tmp_path / "c.safetensors", "head")


def test_calibrate_cli_rejects_bad_input(tmp_path, capsys):
    from slimfx.compiler import cli

    assert cli.main(["calibrate", "vq-head", "--k", "16", "--out", str(tmp_path / "x.bin")]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["calibrate", "vq-head", "--k", "1", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert cli.main(["calibrate", "vq-head", "--k", "16", "--out", str(tmp_path / "x.safetensors"), "--model", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["calibrate"]) == 2
    assert "vq-head" in capsys.readouterr().err


def test_head_weight_of_tied_and_untied_models():
    from slimfx.compiler.cmd_calibrate import head_weight
    from slimfx.runtime.models import tiny_model

    tied, untied = tiny_model("llama_gqa"), tiny_model("llama_untied")
    assert head_weight(tied) is tied.model.embed_tokens.weight
    assert head_weight(untied) is untied.lm_head.weight
    with pytest.raises(UsageError, match="no LM head"):
        head_weight(torch.nn.Linear(3, 3))

"""DuoAttention calibration: the recorded per-head needle mass is the attention the
model really puts on the key while emitting it, and artifacts round-trip with checks."""

import pytest
import torch

from slimfx.calibrate import duo_heads
from slimfx.calibrate.common import attention_weights
from slimfx.compiler.config import ConfigError
from slimfx.measure.passkey import PasskeyCase
from slimfx.passes.kv_eviction import retrieval_heads
from slimfx.runtime.models import tiny_model

KEY = "31415"


class DigitTokenizer:
    """Ids 0-9 are the digits, every other id is filler; the answer is 4 filler ids + the key."""

    def decode(self, ids):
        return "".join(str(i) if i < 10 else " x" for i in ids)

    def __call__(self, text, add_special_tokens=False):
        class Encoded:
            input_ids = [20, 21, 22, 23] + [int(c) for c in KEY] + [24]
        return Encoded()


def _case():
    ids = torch.randint(10, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    ids[0, 12:17] = torch.tensor([int(c) for c in KEY])
    return PasskeyCase(30, 0.4, 0, KEY, ids)


def test_recorded_mass_equals_the_attention_on_the_needle():
    model = tiny_model("llama_gqa", layers=2, seed=1)
    case, tok = _case(), DigitTokenizer()
    where = {}
    with attention_weights(model, "duo-heads", lambda weights: duo_heads._needle_mass(weights, where)) as recorded:
        mass = duo_heads._case_mass(model, tok, recorded, where, case)
    full = torch.cat([case.input_ids, torch.tensor([tok("").input_ids])], 1)
    with torch.no_grad():
        attentions = model(full, output_attentions=True).attentions
    emit = torch.arange(30 + 4 - 1, 30 + 4 + 5 - 1)  # rows whose next token is a key digit
    needle = torch.arange(12, 17)
    for layer, att in enumerate(attentions):
        expected = att[0][:, emit][:, :, needle].sum(-1).mean(-1)
        torch.testing.assert_close(mass[layer], expected)
    assert (mass > 0).all() and (mass <= 1).all()


def test_artifact_round_trip_and_shape_check(tmp_path):
    scores = torch.rand(3, 2)
    path = retrieval_heads.save(scores, tmp_path / "duo.safetensors", {"method": "test"})
    torch.testing.assert_close(retrieval_heads.load(path, "duo_heads", 3, 2), scores)
    with pytest.raises(ConfigError, match=r"^artifacts.duo_heads: .* scores 3 x 2 heads; this model has 4 layers x 2 kv heads"):
        retrieval_heads.load(path, "duo_heads", 4, 2)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"^artifacts.duo_heads: .* is not a duo-heads artifact"):
        retrieval_heads.load(tmp_path / "junk.safetensors", "duo_heads", 3, 2)
    with pytest.raises(ConfigError, match=r"does not exist"):
        retrieval_heads.load(tmp_path / "missing.safetensors", "duo_heads", 3, 2)

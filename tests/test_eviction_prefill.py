"""Eviction through generate(): left padding never takes kept slots, and the prefill
compression semantics (after the whole prompt, or after every chunk) is the config's."""

import pytest
import torch

from slimfx.compiler.config import ConfigError
from slimfx.compiler.pipeline import prefill_chunk
from slimfx.runtime import generate


def _config(**options):
    return {"pipelines": {"evict": ["kv_eviction"]}, "compile": {"pipeline": "evict"}, "passes": {"kv_eviction": options}}


@pytest.mark.parametrize("policy", ["h2o", "tova", "snapkv"])
def test_left_padded_batch_keeps_what_each_prompt_keeps_alone(sharp_model, policy):
    """A 40- and a 24-token prompt in one left-padded batch: each row's tokens equal
    the prompt's own run, so the 16 pads of the short row took none of its 20 slots."""
    g = torch.Generator().manual_seed(7)
    long, short = torch.randint(1, 128, (1, 40), generator=g), torch.randint(1, 128, (1, 24), generator=g)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 16, dtype=torch.long), short], dim=1)])
    mask = torch.cat([torch.ones(1, 40), torch.cat([torch.zeros(1, 16), torch.ones(1, 24)], dim=1)]).long()
    cfg = _config(policy=policy, budget=20, obs_window=4)
    both, _ = generate(sharp_model, batch, attention_mask=mask, max_new_tokens=8, capacity=64, config=cfg)
    alone = [generate(sharp_model, p, max_new_tokens=8, capacity=64, config=cfg)[0] for p in (long, short)]
    assert torch.equal(both[0], alone[0][0]) and torch.equal(both[1], alone[1][0])


def test_whole_prompt_compression_ignores_the_runtime_chunk(sharp_model):
    prompt = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(3))
    cfg = _config(policy="h2o", budget=24)
    whole = generate(sharp_model, prompt, max_new_tokens=8, capacity=96, config=cfg, prefill_chunk=64)[0]
    assert torch.equal(generate(sharp_model, prompt, max_new_tokens=8, capacity=96, config=cfg, prefill_chunk=16)[0], whole)
    chunked = _config(policy="h2o", budget=24, prefill_chunk=16)
    by_16 = generate(sharp_model, prompt, max_new_tokens=8, capacity=96, config=chunked, prefill_chunk=64)[0]
    assert torch.equal(generate(sharp_model, prompt, max_new_tokens=8, capacity=96, config=chunked, prefill_chunk=16)[0], by_16)


def test_prefill_chunk_hook():
    assert prefill_chunk(_config(policy="h2o", budget=64), 1000, 512) == 1024  # one chunk covers the prompt
    assert prefill_chunk(_config(policy="h2o", budget=64), 100, 512) == 512
    assert prefill_chunk(_config(policy="h2o", budget=64), 16384, 512) == 4096  # bounded: one chunk's scores at 16K ran an H100 out of memory
    assert prefill_chunk(_config(policy="h2o", budget=64, prefill_chunk=32), 1000, 512) == 32
    assert prefill_chunk({}, 1000, 512) == 512  # no eviction: the caller's chunk
    with pytest.raises(ConfigError, match=r"prefill_chunk: got 24; allowed: 0 .* or a power of two >= 16"):
        prefill_chunk(_config(policy="h2o", budget=64, prefill_chunk=24), 1000, 512)

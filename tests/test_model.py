import json

import pytest
import torch

from omnimini.config import ConfigError, ModelConfig, MoEConfig, VisionConfig, param_counts, preset
from omnimini.engine.generate import GenRequest, generate
from omnimini.engine.sampling import SamplingParams
from omnimini.model import OmniModel
from omnimini.weights.checkpoint import CheckpointError


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96,
                max_seq_len=128, qk_norm="head",
                moe=MoEConfig(num_experts=8, top_k=2, expert_intermediate=32, first_k_dense=1,
                              num_shared_experts=1),
                vision=VisionConfig(image_size=32, patch_size=8, hidden_size=24, num_layers=1, num_heads=2,
                                    intermediate_size=48, pixel_shuffle=2),
                image_token_id=96)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OmniModel(tiny_cfg()).eval()


def test_param_accounting_matches_the_module(model):
    assert param_counts(model.config)["total_params"] == model.num_params()
    m = OmniModel(tiny_cfg(tie_embeddings=True, qk_norm="full", attention_bias=True, moe=None))
    assert param_counts(m.config)["total_params"] == m.num_params()


def test_incremental_decoding_equals_full_forward(model):
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 32)
        pos = torch.arange(8).expand(2, 8)
        step = [model(ids[:, :8], positions=pos, cache=cache).logits]
        for t in range(8, 20):
            step.append(model(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache).logits)
    inc = torch.cat(step, dim=1)
    assert (inc - full).abs().max() < 1e-4


def test_cache_grows_as_it_fills_and_keeps_what_it_holds(model, monkeypatch):
    """A cache that starts small (the engine's) grows on the write that needs it, in GROW steps or doubling, never
    past max_len, and computes exactly what a fully allocated cache computes."""
    from omnimini.model.layers import KVCache
    monkeypatch.setattr(KVCache, "GROW", 4)
    ids = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 30, reserve=2)
        assert cache.capacity == 2 and cache.nbytes() < model.new_cache(2, 30).nbytes() / 10
        step = [model(ids[:, :5], positions=torch.arange(5).expand(2, 5), cache=cache).logits]
        assert cache.capacity == 8  # 5 rounded up to GROW
        seen = []
        for t in range(5, 30):
            step.append(model(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache).logits)
            seen.append(cache.capacity)
    assert sorted(set(seen)) == [8, 16, 30]  # doubling, capped at max_len
    assert all(k.shape[2] == 30 for k in cache.k + cache.v)
    assert (torch.cat(step, dim=1) - full).abs().max() < 1e-4


def test_cache_slots_are_independent(model):
    """Rows of the cache hold different sequences at different lengths (continuous batching's need)."""
    a, b = torch.randint(0, 96, (1, 9)), torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        want_a, want_b = model(a).logits[0, -1], model(b).logits[0, -1]
        cache = model.new_cache(4, 32)
        model(a[:, :8], positions=torch.arange(8)[None], cache=cache, slots=torch.tensor([3]))
        model(b[:, :4], positions=torch.arange(4)[None], cache=cache, slots=torch.tensor([1]))
        out = model(torch.cat([b[:, 4:], a[:, 8:]]), positions=torch.tensor([[4], [8]]), cache=cache,
                    slots=torch.tensor([1, 3])).logits
    assert (out[0, -1] - want_b).abs().max() < 1e-4
    assert (out[1, -1] - want_a).abs().max() < 1e-4


def test_padding_mask_keeps_real_positions_exact(model):
    a = torch.randint(0, 96, (1, 12))
    b = torch.randint(0, 96, (1, 7))
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, :7] = a[0], b[0]
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0], mask[1, :7] = 1, 1
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        assert (out[0] - model(a).logits[0]).abs().max() < 1e-4
        assert (out[1, :7] - model(b).logits[0]).abs().max() < 1e-4


def test_batched_generation_equals_each_prompt_alone(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [10, 11, 12, 13]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = generate(model, [GenRequest(p, greedy) for p in prompts], eos_ids=[0])
    alone = [generate(model, [GenRequest(p, greedy)], eos_ids=[0])[0] for p in prompts]
    assert together == alone
    assert all(len(o) == 12 for o in together)


def test_sampling_is_deterministic_with_a_seed(model):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=123, max_tokens=10, ignore_eos=True)
    a = generate(model, [GenRequest([1, 2, 3], p)], eos_ids=[0])
    b = generate(model, [GenRequest([1, 2, 3], p)], eos_ids=[0])
    c = generate(model, [GenRequest([1, 2, 3], SamplingParams(**{**p.__dict__, "seed": 7}))], eos_ids=[0])
    assert a == b and a != c


def test_image_changes_logits_and_token_count_matches_config(model):
    v = model.config.vision
    n = v.tokens_per_image
    assert n == (32 // 8 // 2) ** 2
    ids = torch.tensor([[1, 2] + [96] * n + [3, 4]])
    torch.manual_seed(1)
    img1, img2 = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        emb = model.encode_images(img1)
        assert emb.shape == (1, n, model.config.hidden_size)
        l1 = model(ids, pixels=img1).logits
        l2 = model(ids, pixels=img2).logits
    assert (l1[0, -1] - l2[0, -1]).abs().max() > 1e-4
    assert torch.allclose(l1[0, :2], l2[0, :2], atol=1e-5)  # causal: tokens before the image are unaffected
    with pytest.raises(ValueError, match="placeholder"):
        model(torch.tensor([[1, 96, 2]]), pixels=img1)


def test_checkpoint_round_trip_gives_identical_logits(model, tmp_path):
    model.save_pretrained(tmp_path / "ck")
    loaded = OmniModel.from_pretrained(tmp_path / "ck")
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # sharded
    model.save_pretrained(tmp_path / "sh", max_shard_bytes=20_000)
    assert len(list((tmp_path / "sh").glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        assert torch.equal(model(ids).logits, OmniModel.from_pretrained(tmp_path / "sh")(ids).logits)


def test_bad_checkpoints_name_the_problem(model, tmp_path):
    d = tmp_path / "ck"
    model.save_pretrained(d)
    with pytest.raises(CheckpointError, match="not found"):
        OmniModel.from_pretrained(tmp_path / "nope")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        OmniModel.from_pretrained(d)
    model.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        OmniModel.from_pretrained(d)
    cfg["hidden_size"], cfg["num_layers"] = 48, 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensor blocks.3"):
        OmniModel.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        OmniModel.from_pretrained(d)


def test_presets_and_config_errors():
    mini = param_counts(preset("mini"))
    assert abs(mini["total_params"] - 8e9) / 8e9 < 0.05
    assert mini["active_params"] < mini["total_params"] / 3
    nano = preset("nano")
    assert nano.moe.num_experts >= 8 and nano.vision is not None
    assert 1e6 < param_counts(nano)["total_params"] < 2e7
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ConfigError, match="top_k"):
        ModelConfig(moe=MoEConfig(num_experts=4, top_k=5))


def test_padded_positions_past_the_cache_end_are_harmless(model):
    """A chunked prefill pads short rows; their tail positions may run past the cache: real rows are exact."""
    a = torch.randint(0, 96, (1, 30))
    with torch.no_grad():
        want = model(a).logits[0, -1]
        cache = model.new_cache(2, 32)
        ids = torch.zeros(2, 30, dtype=torch.long)
        ids[0] = a[0]
        ids[1, :4] = a[0, :4]
        pos = torch.stack([torch.arange(30), torch.arange(20, 50)])  # row 1: a 4-token chunk at 20, padded
        got = model(ids, positions=pos, cache=cache).logits[0, -1]
    assert (got - want).abs().max() < 1e-4

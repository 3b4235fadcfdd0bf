"""Hugging Face loader parity: tiny random transformers models of each family, loaded into OmniModel."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from omnimini.engine.generate import GenRequest, generate  # noqa: E402
from omnimini.engine.sampling import SamplingParams  # noqa: E402
from omnimini.weights.checkpoint import CheckpointError  # noqa: E402
from omnimini.weights.hf import SUPPORTED_MODEL_TYPES, config_from_hf, load_hf  # noqa: E402

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.15, rms_norm_eps=1e-6)
MOE = dict(num_experts_per_tok=2, norm_topk_prob=True)


def _configs():
    T = transformers
    return {
        "llama": T.LlamaConfig(**COMMON, intermediate_size=96, tie_word_embeddings=True,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}),
        "qwen2": T.Qwen2Config(**COMMON, intermediate_size=96),
        "qwen3": T.Qwen3Config(**COMMON, intermediate_size=96, head_dim=24, tie_word_embeddings=True),
        "mixtral": T.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": T.Qwen2MoeConfig(**COMMON, **MOE, intermediate_size=96, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=80, num_experts=6, mlp_only_layers=[0]),
        "qwen3_moe": T.Qwen3MoeConfig(**COMMON, **MOE, intermediate_size=96, moe_intermediate_size=32,
                                      num_experts=6, head_dim=16),
        "olmoe": T.OlmoeConfig(**{**COMMON, **MOE, "norm_topk_prob": False}, intermediate_size=32, num_experts=6),
        # sliding windows shorter than the 20-token prompts (and the 32 generated tokens)
        "mistral": T.MistralConfig(**COMMON, intermediate_size=96, head_dim=16, sliding_window=6),
        "phi3": T.Phi3Config(**COMMON, intermediate_size=96, sliding_window=8, pad_token_id=0, eos_token_id=1),
        "gemma3_text": T.Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 4}, intermediate_size=96, head_dim=16, query_pre_attn_scalar=24,
            sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                           "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
    }


def byte_tokenizer(specials):
    """A byte-level BPE without merges: ids 0..255 the bytes, then `specials` in order. Small, valid, offline."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from omnimini.tokenizer import BYTE_TO_CHAR

    tok = tokenizers.Tokenizer(models.BPE(vocab={BYTE_TO_CHAR[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return tok


def write_tokenizer(d, vocab_limit=None):
    """256 byte tokens + ChatML markers (+ fillers up to vocab_limit), no chat template."""
    tok = byte_tokenizer(["<|im_start|>", "<|im_end|>"] + [f"<|x{i}|>" for i in range((vocab_limit or 258) - 258)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": None}))


def _save(tmp_path, family):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_configs()[family]).eval()
    with torch.no_grad():  # norms start at one (Gemma: zero): make each one's weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    return model


@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_logits_and_greedy_match_transformers(tmp_path, family):
    ref = _save(tmp_path, family)
    model, tok = load_hf(tmp_path)
    assert model.config.arch == family and tok.eos_token_ids == [257]

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 20), generator=g)
    lengths = [20, 13, 7]
    mask = torch.zeros(3, 20, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # right padding with id 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    for i, n in enumerate(lengths):
        torch.testing.assert_close(got[i, :n], want[i, :n], atol=1e-4, rtol=0)

    assert_greedy_matches(model, ref, [ids[i, :n].tolist() for i, n in enumerate(lengths) if i != 1])


def assert_greedy_matches(model, ref, prompts, n=32):
    """omnimini's batched greedy decode (prompts of different lengths) gives transformers' n greedy tokens."""
    params = SamplingParams(temperature=0, max_tokens=n)
    ours = generate(model, [GenRequest(p, params) for p in prompts], eos_ids=[])
    for p, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
        assert out == theirs[0, len(p):].tolist()


def test_sharded_checkpoint(tmp_path):
    ref = transformers.AutoModelForCausalLM.from_config(_configs()["qwen2"]).eval()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    write_tokenizer(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_hf(tmp_path)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_unsupported_model_type_names_supported():
    with pytest.raises(CheckpointError, match=r"'gpt_neox'.*llama, qwen2, qwen3, mixtral"):
        config_from_hf({"model_type": "gpt_neox"})


def test_unsupported_rope_scaling():
    cfg = _configs()["llama"].to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(CheckpointError, match="yarn"):
        config_from_hf(cfg)


def _tamper(tmp_path, fn):
    from safetensors.torch import load_file, save_file

    f = tmp_path / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f), metadata={"format": "pt"})


def test_missing_and_unexpected_tensors(tmp_path):
    _save(tmp_path, "mixtral")
    _tamper(tmp_path, lambda s: s.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match="layer 1 expert 2 \\(up projection\\)"):
        load_hf(tmp_path)
    _save(tmp_path, "qwen2")
    _tamper(tmp_path, lambda s: s.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match="missing tensor blocks.0.attn.k_proj.bias"):
        load_hf(tmp_path)
    _save(tmp_path, "qwen2")
    _tamper(tmp_path, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_hf(tmp_path)


def test_truncated_safetensors(tmp_path):
    _save(tmp_path, "llama")
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf(tmp_path)


def test_tokenizer_vocab_mismatch(tmp_path):
    _save(tmp_path, "llama")
    write_tokenizer(tmp_path, vocab_limit=VOCAB + 5)
    with pytest.raises(CheckpointError, match=f"tokenizer has {VOCAB + 5} tokens.*vocabulary.*{VOCAB}"):
        load_hf(tmp_path)

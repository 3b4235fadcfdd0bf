"""GGUF loader: synthetic files written with gguf.GGUFWriter (exact parity, bad input) and the real SmolLM2."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_from_hf import byte_level_tokenizer  # noqa: E402
from smollm2_prompts import PROMPTS  # noqa: E402

from omnimini.engine.generate import GenRequest, generate  # noqa: E402
from omnimini.engine.sampling import SamplingParams  # noqa: E402
from omnimini.weights.checkpoint import CheckpointError  # noqa: E402
from omnimini.weights.gguf_loader import GGUFError, load_gguf, permute_qk, unpermute_qk  # noqa: E402

HEADS, KV = 4, 2


def tiny_llama(tie=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, initializer_range=0.15,
                                   rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=tie,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.LlamaForCausalLM(cfg).eval()


def write_gguf(path, model, arch="llama", qtype=None, vocab=None, extra_tokens=0):
    """Write an HF Llama as llama.cpp would: renamed tensors, Q/K rows permuted, byte-level BPE vocabulary."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(vocab or c.vocab_size)
    byte_level_tokenizer(w, extra_tokens, pad=False)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    sub = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        base = name.rsplit(".", 1)[0]
        if base.startswith("model.layers."):
            _, _, i, rest = base.split(".", 3)
            out = f"blk.{i}.{sub[rest]}"
        elif base in names:
            if base == "lm_head" and c.tie_word_embeddings:
                continue
            out = names[base]
        else:
            continue
        a = t.numpy().astype(np.float32)
        if out.endswith("attn_q"):
            a = permute_qk(a, HEADS)
        elif out.endswith("attn_k"):
            a = permute_qk(a, KV)
        if qtype is not None and a.ndim == 2:
            w.add_tensor(out + ".weight", gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out + ".weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_permutation_roundtrip():
    a = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    assert not np.array_equal(permute_qk(a, 2), a)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(a, 2), 2), a)


@pytest.mark.parametrize("tie", [True, False])
def test_float_gguf_matches_hf_model(tmp_path, tie):
    ref = tiny_llama(tie)
    model, tok = load_gguf(write_gguf(tmp_path / "m.gguf", ref), progress=False)
    assert model.config.tie_embeddings == tie and tok.eos_token_ids == [2]
    ids = torch.randint(3, 259, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode("<|im_end|>ab") == [2, 3 + ord("a"), 3 + ord("b")]


def test_q8_0_gguf_close_to_float(tmp_path):
    ref = tiny_llama()
    model, _ = load_gguf(write_gguf(tmp_path / "q.gguf", ref, qtype=gguf.GGMLQuantizationType.Q8_0),
                         progress=False)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert not torch.equal(got, want)  # really quantized


def test_unsupported_tensor_type(tmp_path):
    path = write_gguf(tmp_path / "q5.gguf", tiny_llama(), qtype=gguf.GGMLQuantizationType.Q5_1)
    with pytest.raises(GGUFError, match=r"unsupported type Q5_1 \(supported: F32, F16, BF16, Q8_0"):
        load_gguf(path, progress=False)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", tiny_llama(), arch="falcon")
    with pytest.raises(GGUFError, match=r"architecture 'falcon' \(supported: llama, qwen2, qwen3, qwen3moe, phi3, "
                                        r"gemma3, qwen2vl\)"):
        load_gguf(path, progress=False)


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", tiny_llama())
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(path, progress=False)


def test_tokenizer_vocab_mismatch(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", tiny_llama(), extra_tokens=10)
    with pytest.raises(CheckpointError, match="tokenizer has 269 tokens.*259"):
        load_gguf(path, progress=False)


# ---- the real SmolLM2-135M-Instruct GGUF, against transformers' own GGUF loader ----------------------------



@pytest.fixture(scope="module")
def smollm2_path():
    from omnimini.weights.default import default_gguf

    try:
        return default_gguf()
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return smollm2_path, *load_gguf(smollm2_path, progress=False)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path):
    path = smollm2_path
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    pytest.importorskip("accelerate")
    path = smollm2[0]
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _chats():
    return [[{"role": "user", "content": p}] for p in PROMPTS] + [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye 2024"}]]


def test_smollm2_chat_template_and_tokens_match_transformers(smollm2_path, hf_tokenizer):
    from omnimini.weights.gguf_loader import metadata, open_gguf, tokenizer_from_gguf

    tok = tokenizer_from_gguf(metadata(open_gguf(smollm2_path)))  # metadata only: no weights to dequantize
    for chat in _chats():
        for gen in (True, False):
            want = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            got = tok.render_chat(chat, add_generation_prompt=gen)
            assert got == want
            assert tok.encode(got) == hf_tokenizer(got, add_special_tokens=False).input_ids
    text = "Numbers 1234567 and  spaces\n\ttabs, émojis 🙂 <|im_end|>"
    assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    _, model, tok = smollm2
    ids = torch.tensor([tok.encode(tok.render_chat([{"role": "user", "content": PROMPTS[0]}]))])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_smollm2(ids).logits, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_answers_match_transformers(smollm2, hf_smollm2):
    _, model, tok = smollm2
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": p}])) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=24)
    ours = generate(model, [GenRequest(p, params) for p in prompts], tok.eos_token_ids)
    for p, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            theirs = hf_smollm2.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                         eos_token_id=tok.eos_token_ids, pad_token_id=2)
        want = theirs[0, len(p):].tolist()
        want = want[:-1] if want and want[-1] in tok.eos_token_ids else want
        assert out == want, (tok.decode(out), tok.decode(want))

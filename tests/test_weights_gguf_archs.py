"""GGUF architectures beyond llama: tiny random transformers models of each family, written as GGUF the way
llama.cpp's converter lays them out, loaded by omnimini: the same logits as omnimini's HF load of the same model,
as transformers itself (≤1e-4, padded batch) and as transformers' own GGUF loader where it reads the arch."""

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_from_hf import write_gguf_from_hf  # noqa: E402
from test_weights_hf import COMMON, MOE, assert_greedy_matches, write_tokenizer  # noqa: E402

from omnimini.weights.gguf_loader import GGUFError, load_gguf  # noqa: E402
from omnimini.weights.hf import load_hf  # noqa: E402

LENGTHS = [20, 13, 7]


def _configs():
    T = transformers
    return {
        # a Mistral-style llama file: sliding window shorter than the prompt
        "mistral": T.MistralConfig(**COMMON, intermediate_size=96, head_dim=16, sliding_window=6),
        # a Mixtral-style llama file: experts under the llama architecture
        "mixtral": T.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "qwen2": T.Qwen2Config(**COMMON, intermediate_size=96),
        # transformers' GGUF loader does not read qwen3's key_length: keep its default head_dim (128)
        "qwen3": T.Qwen3Config(**COMMON, intermediate_size=96, head_dim=128, tie_word_embeddings=True),
        # ... nor qwen3moe's expert_feed_forward_length: keep its default expert width (768)
        "qwen3_moe": T.Qwen3MoeConfig(**COMMON, **MOE, intermediate_size=96, moe_intermediate_size=768,
                                      num_experts=4, head_dim=16),
        "phi3": T.Phi3Config(**COMMON, intermediate_size=96, sliding_window=8, pad_token_id=0, eos_token_id=1),
        # llama.cpp's gemma3: every sixth layer global, queries scaled by 1/sqrt(head_dim) (transformers' GGUF
        # loader assumes query_pre_attn_scalar 256, so the head is 256 wide here)
        "gemma3_text": T.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 6, "num_attention_heads": 2,
                                             "num_key_value_heads": 1}, intermediate_size=96, head_dim=256,
                                          query_pre_attn_scalar=256, sliding_window=5,
                                          rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                                 "rope_theta": 10000.0},
                                                           "full_attention": {"rope_type": "default",
                                                                              "rope_theta": 1e6}}),
    }


# transformers' GGUF loader leaves these files' sliding window out: compare it within the window only
NO_WINDOW_IN_TRANSFORMERS_GGUF = {"mistral": 6, "phi3": 8}
NOT_IN_TRANSFORMERS_GGUF = {"mixtral"}  # it reads a llama file as a dense Llama


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 20), generator=g)
    mask = torch.zeros(3, 20, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    return ids * mask, mask


@pytest.fixture(scope="module", params=list(_configs()))
def family(request, tmp_path_factory):
    name = request.param
    d = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(_configs()[name]).eval()
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.2)
    ref.generation_config.eos_token_id = None
    ref.save_pretrained(d)
    write_tokenizer(d)
    return name, ref, d, write_gguf_from_hf(d / "model.gguf", ref)


def test_gguf_matches_hf_load_and_transformers(family):
    name, ref, d, path = family
    model, tok = load_gguf(path, progress=False)
    from_hf, _ = load_hf(d)
    assert model.config.arch == f"gguf:{gguf_arch(name)}" and tok.eos_token_ids == [2]
    ids, mask = _batch()
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        hf_load = from_hf(ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(got[i, :n], hf_load[i, :n], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[i, :n], want[i, :n], atol=1e-4, rtol=0)

    if name != "gemma3_text":
        return  # greedy decoding of the other families is checked on their HF load, which these logits equal
    # gemma3 as llama.cpp lays it out (a global layer after five sliding ones) has no HF-load twin elsewhere
    assert_greedy_matches(model, ref, [ids[i, :n].tolist() for i, n in enumerate(LENGTHS) if i != 1])


def gguf_arch(name):
    from gguf_from_hf import ARCH

    return ARCH[name]


def test_gguf_matches_transformers_gguf_loader(family):
    pytest.importorskip("accelerate")
    name, _, d, path = family
    if name in NOT_IN_TRANSFORMERS_GGUF:
        pytest.skip(f"transformers' GGUF loader does not read {name}-style files")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32).eval()
    model, _ = load_gguf(path, progress=False)
    ids, mask = _batch()
    n = NO_WINDOW_IN_TRANSFORMERS_GGUF.get(name, ids.shape[1])
    ids, mask = ids[:, :n], mask[:, :n]
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
    for i, length in enumerate(LENGTHS):
        torch.testing.assert_close(got[i, :length], want[i, :length], atol=1e-4, rtol=0)


def test_quantized_gguf_close_to_float(family):
    name, ref, d, _ = family
    model, _ = load_gguf(write_gguf_from_hf(d / "q8.gguf", ref, qtype=gguf.GGMLQuantizationType.Q8_0),
                         progress=False)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    if model.config.moe is None:
        assert (got - want).abs().max() < 0.05 * want.abs().max()
    else:  # rounding may send a token to another expert of a tiny random MoE: bound the typical error
        assert (got - want).abs().mean() < 0.05 * want.abs().mean()
    assert not torch.equal(got, want)


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    from omnimini.cli import main

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"architecture 'mamba' \(supported: llama, qwen2, qwen3, qwen3moe, phi3, "
                                        r"gemma3, qwen2vl\)"):
        load_gguf(tmp_path / "m.gguf", progress=False)
    for argv in (["generate", "--model", str(tmp_path / "m.gguf"), "hi"],
                 ["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()[-1:]  # convert first says what it reads
        assert err and "'mamba'" in err[0] and "supported: llama, qwen2" in err[0] and "Traceback" not in err[0]


def test_raw_blocks_are_the_loaded_weights(family):
    """The raw Q8_0 blocks handed to omnimini's kernels (block_tensors) hold the weights the model loaded: Q/K rows
    un-permuted only for llama files, Phi-3's fused tensors left out (split at load, no one weight holds them)."""
    from omnimini.weights.gguf_loader import block_tensors, open_gguf

    name, ref, d, _ = family
    path = write_gguf_from_hf(d / "blocks.gguf", ref, qtype=gguf.GGMLQuantizationType.Q8_0)
    model, _ = load_gguf(path, progress=False)
    raw = block_tensors(open_gguf(path), model.config, ("Q8_0",))
    params = dict(model.named_parameters())
    assert "blocks.0.attn.q_proj.weight" in raw or name == "phi3"
    for key, (kind, blocks, _) in raw.items():
        assert kind == "q8_0"
        w = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q8_0)
        torch.testing.assert_close(torch.from_numpy(w), params[key].detach(), atol=0, rtol=0)


def test_converted_checkpoint_keeps_the_options(family, tmp_path):
    """`omnimini convert file.gguf DIR`: the new config options and the tokenizer's BOS policy survive the round
    trip through omnimini's own checkpoint format."""
    from omnimini.weights.convert import convert, load_any

    _, _, _, path = family
    model, tok = load_gguf(path, progress=False)
    again, tok2 = load_any(convert(path, tmp_path / "ck"))
    assert again.config == model.config and tok2.add_bos_token == tok.add_bos_token
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)

"""Models on GGUF block formats (--quantize q8_0|q4_0|q4_1, or a GGUF's own blocks) through the model's forward."""

import copy

import numpy as np
import pytest
import torch

from omnimini import kernels
from omnimini.config import ModelConfig
from omnimini.engine.quant import quantize_model
from omnimini.kernels import blocks as B
from omnimini.model import OmniModel
from omnimini.model.blocklinear import BlockLinear


def _model(tie=True, **extra):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=224, max_seq_len=64, tie_embeddings=tie, **extra)
    return OmniModel(cfg).eval()


@pytest.mark.parametrize("mode", ["q8_0", "q4_0", "q4_1", "q8_0-window"])
def test_quantized_model_decodes_like_its_full_forward(mode):
    # q8_0-window: layer 0 attends to a sliding window of 4 positions and queries have their own scale
    extra = dict(sliding_window=4, layer_types=["sliding", "full"], attn_scale=0.2) if "window" in mode else {}
    mode = mode.split("-")[0]
    ref = _model(tie=mode != "q4_0", **extra)
    m = quantize_model(copy.deepcopy(ref), mode)
    assert isinstance(m.blocks[0].attn.qkv, BlockLinear) and m.blocks[0].attn.qkv.format.name == mode
    assert m.lm_head.format.name == "q8_0"  # the output head keeps 8 bits
    ids = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = m(ids).logits
        want = ref(ids).logits
        # ragged: the sequences sit in cache slots 2, 0, 1 and are at different lengths
        cache, slots = m.new_cache(3, 20), torch.tensor([2, 0, 1])
        m(ids[:, :5], cache=cache, slots=slots, positions=torch.arange(5).expand(3, 5))
        got = [m(ids[:, t:t + 1], cache=cache, slots=slots, positions=torch.full((3, 1), t)).logits[:, 0]
               for t in range(5, 12)]
    assert kernels.available()
    # Not 1e-4: the decode kernel's attention and SDPA differ in the last float bits, which can move one activation
    # across an int8 rounding step in the next quantized matmul (measured: 0.4 % of the largest logit on one row of
    # this seed from that token on). A real decode defect (wrong slot, position or mask) is of the logits' own size.
    torch.testing.assert_close(torch.stack(got, 1), full[:, 5:], atol=0.02 * float(full.abs().max()), rtol=0)
    bound = {"q8_0": 0.03, "q4_0": 0.25, "q4_1": 0.25}[mode]  # of the float model's largest logit
    assert (full - want).abs().max() < bound * want.abs().max()
    assert not torch.equal(full, want)


@pytest.mark.parametrize("window", [False, True])
def test_fused_decode_layer_equals_the_layer_module_by_module(window, monkeypatch):
    """decode_layer (one op per layer: norms, q/k/v, attention over the cache, o, gate/up, SiLU, down, residuals)
    and decode_layers (every layer in one op) compute exactly what the layers' modules compute one by one with the
    same kernels: ragged slots, a float16 cache, a sliding window; and each is really taken."""
    from omnimini.model.model import Block, OmniModel

    extra = dict(sliding_window=4, layer_types=["sliding", "full"], attn_scale=0.2) if window else {}
    m = quantize_model(_model(**extra), "q4_1")
    ids = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(5))
    slots = torch.tensor([2, 0, 1])
    calls = {"layer": 0, "stack": 0}

    def counting(name, real):
        def wrapped(*a):
            calls[name] += 1
            return real(*a)
        return wrapped

    def decode(mode: str):
        monkeypatch.setattr(Block, "_decode_layer", counting("layer", Block._decode_layer))
        monkeypatch.setattr(OmniModel, "_decode_layers", counting("stack", OmniModel._decode_layers))
        if mode != "stack":
            monkeypatch.setattr(OmniModel, "_decode_stack", lambda self, x, cache: None)
        if mode == "plain":
            monkeypatch.setattr(Block, "_fused_decode", lambda self, x, cache: False)
        with torch.inference_mode():
            cache = m.new_cache(3, 20, dtype=torch.float16)
            m(ids[:, :5], cache=cache, slots=slots, positions=torch.arange(5).expand(3, 5))
            out = [m(ids[:, t:t + 1], cache=cache, slots=slots, positions=torch.full((3, 1), t)).logits
                   for t in range(5, 12)]
        monkeypatch.undo()
        return torch.cat(out, 1), cache

    runs = {}
    for mode in ("stack", "layer", "plain"):
        before = dict(calls)
        runs[mode] = decode(mode)
        made = {k: calls[k] - before[k] for k in calls}
        assert made == {"stack": {"stack": 7, "layer": 0}, "layer": {"stack": 0, "layer": 14},
                        "plain": {"stack": 0, "layer": 0}}[mode], mode
    for mode in ("stack", "layer"):
        torch.testing.assert_close(runs[mode][0], runs["plain"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(runs[mode][1].k[1], runs["plain"][1].k[1], atol=0, rtol=0)  # same keys, slots
    torch.testing.assert_close(runs["stack"][0], runs["layer"][0], atol=0, rtol=0)


@pytest.mark.parametrize("window", [False, True])
def test_fp16_kv_cache_logits_near_fp32_cache(window):
    """attn_decode on a float16 cache vs a float32 cache, and prefill (SDPA) reading the float16 cache back: the
    prompt in two chunks, the second attending to the first's float16 keys/values through PyTorch. Bound: 2 % of
    the largest logit (keys/values rounded to float16, relative 2^-11, plus the int8 rounding flips it causes;
    measured 0.59 % with and without a window)."""
    extra = dict(sliding_window=4, layer_types=["sliding", "full"]) if window else {}
    m = quantize_model(_model(**extra), "q4_1")
    assert m.kv_cache_dtype("auto") == torch.float16 and m.kv_cache_dtype("fp32") == torch.float32
    ids = torch.randint(0, 320, (3, 14), generator=torch.Generator().manual_seed(4))
    slots = torch.tensor([1, 2, 0])
    runs = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float16):
            cache = m.new_cache(3, 20, dtype=dtype)
            assert cache.k[0].dtype == dtype
            pos = torch.arange(14).expand(3, 14)
            first = m(ids[:, :3], cache=cache, slots=slots, positions=pos[:, :3]).logits
            second = m(ids[:, 3:6], cache=cache, slots=slots, positions=pos[:, 3:6]).logits  # reads chunk 1
            steps = [m(ids[:, t:t + 1], cache=cache, slots=slots, positions=pos[:, t:t + 1]).logits
                     for t in range(6, 14)]
            runs[dtype] = torch.cat([first, second, *steps], 1)
        full = m(ids).logits
    a, b = runs[torch.float32], runs[torch.float16]
    # not 1e-5: a float difference that moves one activation across an int8 rounding step (the next qlinear's
    # per-32-block quantization) shifts the logits by d_x * |w|, far above float noise
    assert (a - full).abs().max() <= 0.02 * full.abs().max()
    assert (a - b).abs().max() <= 0.02 * a.abs().max()
    assert not torch.equal(a[:, 6:], b[:, 6:])  # the float16 cache was really read


def test_kv_cache_dtype_choice():
    ref = _model()
    assert ref.kv_cache_dtype("auto") == torch.float32  # float model: PyTorch attention, no kernel to read fp16
    assert ref.kv_cache_dtype("fp16") == torch.float16
    with pytest.raises(ValueError, match="unknown KV cache kind 'int8'"):
        ref.kv_cache_dtype("int8")
    from omnimini.engine.scheduler import Engine

    class Tok:  # the engine reads these attributes only
        eos_token_ids, pad_token_id, vocab_size = [0], 0, 320

        def all_token_bytes(self):
            return [b"x"] * 320

    m = quantize_model(_model(), "q8_0")
    assert Engine(m, Tok(), max_batch=2, max_context=16).cache.k[0].dtype == torch.float16
    assert Engine(m, Tok(), max_batch=2, max_context=16, kv_cache="fp32").cache.k[0].dtype == torch.float32


def test_float_matmul_kept_when_in_features_do_not_fit_blocks():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=48, num_layers=1, num_heads=2, num_kv_heads=2,
                      intermediate_size=80, max_seq_len=16)
    m = quantize_model(OmniModel(cfg).eval(), "q4_1")
    assert isinstance(m.blocks[0].mlp.down_proj, torch.nn.Linear)  # in_features 80 is not a multiple of 32
    assert isinstance(m.blocks[0].mlp.gate_up, torch.nn.Linear)  # nor is 48
    with torch.inference_mode():
        assert torch.isfinite(m(torch.arange(8)[None]).logits).all()


# ---- GGUF files keep their blocks ------------------------------------------------------------------------------

gguf = pytest.importorskip("gguf")


def _gguf(tmp_path, qtype):
    pytest.importorskip("transformers")
    from test_weights_gguf import tiny_llama, write_gguf

    ref = tiny_llama()
    return ref, write_gguf(tmp_path / "m.gguf", ref, qtype=qtype)


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0", "Q8_0"])
def test_gguf_blocks_used_as_stored(tmp_path, kind):
    from omnimini.runtime import load_for_inference
    from omnimini.weights.gguf_loader import load_gguf

    ref, path = _gguf(tmp_path, getattr(gguf.GGMLQuantizationType, kind))
    model, _ = load_for_inference(str(path), quantize="q4_1")
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    down = model.blocks[1].mlp.down_proj
    assert down.format.name == kind.lower()  # the file's own format, whatever --quantize asked for
    raw = np.asarray(stored["blk.1.ffn_down.weight"].data).reshape(down.out_features, -1)
    assert torch.equal(down.gguf_blocks(), torch.from_numpy(raw.copy()))  # byte for byte: nothing re-quantized
    floats, _ = load_gguf(path, progress=False)  # the same file dequantized to float32
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        got, want = model(ids).logits, floats(ids).logits
    # only the activations' int8 rounding separates the two (measured 3.6% of the largest logit for Q4_1 on
    # this random 2-layer model; the PyTorch fallback, float activations, matches to 1e-5)
    assert (got - want).abs().max() < 0.06 * want.abs().max()


def test_gguf_corrupt_scale_names_the_tensor(tmp_path):
    from omnimini.runtime import load_for_inference

    _, path = _gguf(tmp_path, gguf.GGMLQuantizationType.Q8_0)
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    data = bytearray(path.read_bytes())
    data[t.data_offset:t.data_offset + 2] = np.array([np.inf], dtype=np.float16).tobytes()  # row 0, block 0
    path.write_bytes(bytes(data))
    with pytest.raises(B.BlockFormatError, match=r"blk\.0\.attn_v\.weight: corrupt q8_0 block \(scale inf"):
        load_for_inference(str(path), quantize="q8_0")


# ---- the default model ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_q4_1_logits_near_float_reference():
    """SmolLM2-135M from its own Q4_1 GGUF through the kernels vs the same file dequantized to float32."""
    from omnimini.runtime import load_for_inference
    from omnimini.weights.checkpoint import CheckpointError
    from omnimini.weights.default import default_gguf
    from omnimini.weights.gguf_loader import load_gguf

    try:
        floats, tok = load_gguf(default_gguf(), progress=False)
    except CheckpointError as e:
        pytest.skip(str(e))
    model, _ = load_for_inference(None, quantize="q4_1")
    assert model.blocks[0].attn.qkv.format.name == "q4_1" and model.lm_head.format.name == "q8_0"
    ids = torch.tensor([tok.encode(tok.render_chat([{"role": "user", "content": "What is the capital of France?"}]))])
    with torch.inference_mode():
        got, want = model(ids).logits[0], floats(ids).logits[0]
    err = (got - want).abs().max() / want.abs().max()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    print(f"\nSmolLM2 Q4_1 kernels vs float32 dequantized: max |dlogit| / max |logit| = {err:.4f}, "
          f"top-1 agreement {agree:.3f} over {ids.shape[1]} positions")
    # measured 0.085 and 36/37: the activations' int8 rounding (as llama.cpp's q8_1 does) is all that differs
    assert err < 0.12 and agree >= 0.9


def _random_q6_k(a: np.ndarray) -> np.ndarray:
    """Valid Q6_K bytes for an [rows, K] array (K a multiple of 256): random 6-bit values, scales, small d."""
    rows, k = a.shape
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (rows, k // 256, 210), dtype=np.uint8)
    blocks[..., 192:208] = rng.integers(1, 20, (rows, k // 256, 16), dtype=np.uint8)  # int8 sub-block scales
    blocks[..., 208:210] = np.full((rows, k // 256, 1), 0.002, dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _random_q5_k(a: np.ndarray) -> np.ndarray:
    """Valid Q5_K bytes (176 per 256 weights: fp16 d, fp16 dmin, 12 scale bytes, qh[32], qs[128]), small d."""
    rows, k = a.shape
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (rows, k // 256, 176), dtype=np.uint8)
    blocks[..., 0:2] = np.full((rows, k // 256, 1), 0.002, dtype=np.float16).view(np.uint8)
    blocks[..., 2:4] = np.full((rows, k // 256, 1), 0.001, dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _tiny_256(tmp_path, monkeypatch, qtype, name):
    transformers = pytest.importorskip("transformers")
    from test_weights_gguf import HEADS, KV, write_gguf

    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=HEADS,
        num_key_value_heads=KV, max_position_embeddings=64, tie_word_embeddings=True)).eval()
    random_k = {gguf.GGMLQuantizationType.Q6_K: _random_q6_k, gguf.GGMLQuantizationType.Q5_K: _random_q5_k}
    if qtype in random_k:  # gguf-py cannot quantize to the k-quants: valid random blocks instead
        monkeypatch.setattr(gguf.quants, "quantize", lambda a, _qtype: random_k[qtype](a))
    path = write_gguf(tmp_path / name, ref, qtype=qtype)
    monkeypatch.undo()
    return path


def test_gguf_type_without_kernel_is_requantized_with_a_warning(tmp_path, monkeypatch):
    from omnimini.runtime import load_for_inference

    path = _tiny_256(tmp_path, monkeypatch, gguf.GGMLQuantizationType.Q5_K, "k.gguf")
    with pytest.warns(RuntimeWarning, match=r"k\.gguf: tensor type\(s\) Q5_K have no omnimini kernel; those weights "
                                            r"are re-quantized to q8_0"):
        model, _ = load_for_inference(str(path), quantize="auto")
    assert model.blocks[0].attn.qkv.format.name == "q8_0"
    with torch.inference_mode():
        assert torch.isfinite(model(torch.arange(3, 20)[None]).logits).all()


def test_gguf_q5_0_kept_as_blocks(tmp_path, monkeypatch):
    """Q5_0 (on some tensors of llama.cpp's Q4_K_M / Q5 files) runs on its own kernel: no re-quantizing, and the
    logits stay close to the same file dequantized to float32 (int8 activations: the kernels' only rounding)."""
    import warnings

    from omnimini.runtime import load_for_inference

    path = _tiny_256(tmp_path, monkeypatch, gguf.GGMLQuantizationType.Q5_0, "q5.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, _ = load_for_inference(str(path), quantize="auto")
    assert model.blocks[0].attn.qkv.format.name == "q5_0" and model.blocks[0].mlp.down_proj.format.name == "q5_0"
    ref, _ = load_for_inference(str(path), quantize="none")
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        got, want = model(ids).logits, ref(ids).logits
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_gguf_k_quant_kept_as_blocks(tmp_path, monkeypatch):
    from omnimini.model.blocklinear import BlockEmbedding
    from omnimini.runtime import load_for_inference
    from omnimini.weights.gguf_loader import load_gguf

    path = _tiny_256(tmp_path, monkeypatch, gguf.GGMLQuantizationType.Q6_K, "q6.gguf")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor has a kernel: no warning
        model, _ = load_for_inference(str(path), quantize="auto")
    assert model.blocks[0].attn.qkv.format.name == "q6_k" and model.lm_head.format.name == "q6_k"
    assert isinstance(model.embed, BlockEmbedding) and model.embed.format.name == "q6_k"
    floats, _ = load_gguf(path, progress=False)
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        got, want = model(ids).logits, floats(ids).logits
    # the activations' int8 rounding only (measured 7.5 % of the largest logit on these uniformly random 6-bit
    # weights; the PyTorch fallback, float activations, matches to 7e-6)
    assert (got - want).abs().max() < 0.12 * want.abs().max()


def test_auto_mode_and_block_embedding(tmp_path):
    from omnimini.model.blocklinear import BlockEmbedding
    from omnimini.runtime import load_for_inference, resolve_quantize

    assert resolve_quantize("auto", from_gguf=True) == "q8_0"  # the file's blocks; other tensors 8-bit
    assert resolve_quantize("auto", from_gguf=False) == "fp16"
    assert resolve_quantize("q4_0", from_gguf=True) == "q4_0"
    _, path = _gguf(tmp_path, gguf.GGMLQuantizationType.Q4_1)
    model, _ = load_for_inference(str(path), quantize="auto")
    assert model.blocks[0].mlp.gate_up.format.name == "q4_1"
    emb = model.embed  # tied: lookups read the head's own blocks
    assert isinstance(emb, BlockEmbedding) and emb.head[0] is model.lm_head and not hasattr(emb, "blocks")
    ids = torch.tensor([[5, 3, 258], [0, 7, 7]])
    want = B.dequantize(model.lm_head.gguf_blocks(), model.lm_head.format)[ids]
    torch.testing.assert_close(emb(ids), want, rtol=0, atol=0)
    with torch.inference_mode():
        model(ids)  # the head's blocks are interleaved for the kernels now; lookups still read the same rows
    assert model.lm_head.interleaved == kernels.available()
    torch.testing.assert_close(emb(ids), want, rtol=0, atol=0)


@pytest.mark.slow
def test_default_model_greedy_answers_vs_llama_cpp():
    """The 5 fixed prompts, 24 greedy tokens: omnimini's kernels on the Q4_1 file vs llama.cpp on the same file.

    Measured 2/5 identical (the others part at tokens 0, 5 and 18, where llama.cpp's own top-2 gap is 0.07-0.09).
    Why not more: with int8 activations this model amplifies float rounding into whole logits. Our interleaved
    and row-major kernels compute the same integer dot products and differ only in the order float partial sums
    are added, yet their prompt logits differ by 0.37-1.16 (of a largest logit of 38); the same file dequantized to
    float32 differs from llama.cpp by 0.5-1.8. Agreement on near-ties would need ggml's arithmetic bit for bit in
    every op (its summation orders, exp approximations, norms). Tried, still 2/5: activation scales rounded to
    float16 as ggml's q8 blocks store them, plus the query and attention weights rounded to float16 as its
    non-flash attention does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from smollm2_prompts import PROMPTS

    from omnimini.engine.generate import GenRequest, generate
    from omnimini.engine.sampling import SamplingParams
    from omnimini.runtime import load_for_inference
    from omnimini.weights.default import default_gguf

    model, tok = load_for_inference(None, quantize="auto")
    llm = llama_cpp.Llama(model_path=str(default_gguf()), n_threads=2, n_ctx=512, verbose=False)
    matches = 0
    for p in PROMPTS:
        ids = tok.encode(tok.render_chat([{"role": "user", "content": p}]))
        ours = generate(model, [GenRequest(ids, SamplingParams(temperature=0, max_tokens=24))], tok.eos_token_ids)[0]
        theirs = []
        for t in llm.generate(ids, temp=0.0, reset=True):  # as generate(): stop before EOS, at most 24 tokens
            if int(t) in tok.eos_token_ids:
                break
            theirs.append(int(t))
            if len(theirs) == 24:
                break
        matches += ours == theirs
        print(f"\n{p!r}: {'same' if ours == theirs else 'differs'}\n  omnimini:  {tok.decode(ours)!r}\n"
              f"  llama.cpp: {tok.decode(theirs)!r}")
    print(f"\ngreedy 24-token answers identical to llama.cpp's: {matches}/5")
    assert matches >= 2

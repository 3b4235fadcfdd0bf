"""Test support: write a (tiny) transformers causal LM as a GGUF file, the way llama.cpp's converter lays it out.

Names follow gguf's tensor tables; llama/mistral Q/K rows are permuted for interleaved RoPE, Gemma's norm weights
are stored as 1 + w, Phi-3's fused qkv / gate_up stay fused, MoE experts are stacked [E, rows, cols]. The
vocabulary is the byte-level one of test_weights_gguf (3 ChatML specials + 256 bytes) unless another is written.
"""

from __future__ import annotations

import re

import gguf
import numpy as np

from omnimini.tokenizer import BYTE_TO_CHAR
from omnimini.weights.gguf_loader import permute_qk

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# HF model_type -> GGUF architecture name
ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen3_moe": "qwen3moe", "phi3": "phi3", "gemma3_text": "gemma3"}

_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up",
    "mlp.gate": "ffn_gate_inp",
}
_GEMMA_LAYER = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}


def _metadata(w: gguf.GGUFWriter, c, arch: str, vocab_size: int) -> None:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(vocab_size)
    rope = c.rope_parameters or {}
    w.add_rope_freq_base(float(rope.get("full_attention", rope).get("rope_theta", 10000.0)))
    if getattr(c, "sliding_window", None) and (arch != "qwen2" or c.use_sliding_window):
        w.add_sliding_window(c.sliding_window)
    if arch == "qwen3moe":
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    elif c.model_type == "mixtral":  # a llama file with experts; feed_forward_length is the expert width
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)


def byte_level_tokenizer(w: gguf.GGUFWriter, extra_tokens: int = 0, pad: bool = True) -> None:
    """SmolLM2-style byte-level BPE without merges: 3 ChatML specials, 256 bytes, `extra_tokens` fillers."""
    tokens = SPECIALS + [BYTE_TO_CHAR[b] for b in range(256)] + [f"<x{i}>" for i in range(extra_tokens)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges([])
    w.add_eos_token_id(2)
    w.add_bos_token_id(1)
    if pad:  # else transformers' GGUF loader takes Phi-3's default pad id, past this vocabulary
        w.add_pad_token_id(0)
    w.add_chat_template(TEMPLATE)


def vocab_of(tokenizer_json, template: str, bos: str | None, eos: str, extra=None):
    """A tokenizer_fn writing the vocabulary of a test's byte-level tokenizer.json (256 bytes, then its added
    tokens by id) as a gpt2 GGUF vocabulary with that chat template; extra(w) writes more keys beside it."""
    import json

    hf_tok = json.loads(tokenizer_json.read_text())
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + [t["content"] for t in sorted(hf_tok["added_tokens"],
                                                                                   key=lambda t: t["id"])]

    def write(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
        w.add_token_merges([])
        if bos is not None:
            w.add_bos_token_id(tokens.index(bos))
        w.add_eos_token_id(tokens.index(eos))
        w.add_pad_token_id(0)
        w.add_chat_template(template)
        if extra is not None:
            extra(w)

    return write


def assert_same_inputs_and_logits(model, ref_model, ours, want, atol=1e-5):
    """Encoded rows (prompt ids, pixels) from two loads of one VLM: the same ids and pixels exactly, then the same
    logits on a right-padded batch of all rows with their images (up to atol)."""
    import torch

    for (ids, px), (ids_ref, px_ref) in zip(ours, want, strict=True):
        assert ids == ids_ref
        torch.testing.assert_close(px, px_ref, atol=0, rtol=0)
    T = max(len(i) for i, _ in ours)
    ids = torch.tensor([i + [0] * (T - len(i)) for i, _ in ours])
    mask = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i, _ in ours])
    pixels = torch.cat([p for _, p in ours])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, pixels=pixels).logits
        exp = ref_model(ids, attention_mask=mask, pixels=pixels).logits
    for i, (row, _) in enumerate(ours):
        torch.testing.assert_close(got[i, : len(row)], exp[i, : len(row)], atol=atol, rtol=0)


def _tensors(model, arch: str):
    c = model.config
    layer_names = {**_LAYER, **_GEMMA_LAYER} if arch == "gemma3" else _LAYER
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if rest.startswith("mlp.experts."):  # transformers 5 in memory: gate_up [E, 2I, H], down [E, H, I]
                if rest.endswith("gate_up_proj"):
                    gate, up = np.split(a, 2, axis=1)
                    yield f"blk.{i}.ffn_gate_exps.weight", gate
                    yield f"blk.{i}.ffn_up_exps.weight", up
                else:
                    yield f"blk.{i}.ffn_down_exps.weight", a
                continue
            base, kind = rest.rsplit(".", 1)
            out = f"blk.{i}.{layer_names[base]}"
            if arch == "llama" and base == "self_attn.q_proj":
                a = permute_qk(a, c.num_attention_heads)
            elif arch == "llama" and base == "self_attn.k_proj":
                a = permute_qk(a, c.num_key_value_heads)
            if arch == "gemma3" and base.endswith("norm"):
                a = a + 1.0
            yield f"{out}.{kind}", a
        elif name == "model.embed_tokens.weight":
            yield "token_embd.weight", a
        elif name == "model.norm.weight":
            yield "output_norm.weight", a + 1.0 if arch == "gemma3" else a
        elif name == "lm_head.weight" and not c.tie_word_embeddings:
            yield "output.weight", a


def write_gguf_from_hf(path, model, qtype=None, tokenizer_fn=byte_level_tokenizer):
    """Write `model` (a transformers causal LM) to `path`; qtype quantizes the 2D weights (e.g. Q8_0).
    tokenizer_fn(writer) writes the tokenizer metadata instead of the default byte-level vocabulary."""
    c = model.config
    arch = ARCH[c.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    # transformers reads a llama file whose name says "mistral" as Mistral, which its GGUF code then fails on
    # (gguf 0.19 has no such arch): name it plainly
    w.add_name(f"tiny-{arch}")
    _metadata(w, c, arch, c.vocab_size)
    tokenizer_fn(w)
    for name, a in _tensors(model, arch):
        a = np.ascontiguousarray(a, dtype=np.float32)
        # as llama.cpp does, the router stays float: a rounded router would pick other experts
        if qtype is not None and a.ndim >= 2 and a.shape[-1] % 32 == 0 and "ffn_gate_inp" not in name:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    return _finish(w, path)


# CLIP tower tensors (below vision_model.) -> llama.cpp mmproj names; fc1 / fc2 as the legacy converter
# (convert_image_encoder_to_gguf.py, which wrote the LLaVA mmproj files in circulation) or gguf-py's table names them
_CLIP = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2"}


def _clip_writer(path, v, projector: str, mean, std, patch_size=None) -> gguf.GGUFWriter:
    """An mmproj GGUF's header keys for the tower config `v` (a transformers vision config)."""
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", projector)
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", patch_size or v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    w.add_uint32("clip.vision.attention.head_count", v.num_attention_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps)
    w.add_uint32("clip.vision.block_count", v.num_hidden_layers)
    w.add_array("clip.vision.image_mean", list(mean))
    w.add_array("clip.vision.image_std", list(std))
    return w


def _finish(w: gguf.GGUFWriter, path):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_TOWER_NAME = re.compile(r"(?:model\.)?(?:vision_tower\.(?:vision_model\.)?|vision_model\.)(.+)$")


def _tower_tensor(name: str, fc: dict, top: dict) -> str | None:
    """gguf-py's name of a transformers tower tensor (None: skip it); fc names the MLP's two layers."""
    if name.startswith("encoder.layers."):
        _, _, i, rest = name.split(".", 3)
        base, kind = rest.rsplit(".", 1)
        return f"v.blk.{i}.{_CLIP.get(base) or fc[base]}.{kind}"
    return top.get(name)


_SIGLIP_TOP = {"embeddings.patch_embedding.weight": "v.patch_embd.weight",
               "embeddings.patch_embedding.bias": "v.patch_embd.bias",
               "embeddings.position_embedding.weight": "v.position_embd.weight",
               "post_layernorm.weight": "v.post_ln.weight", "post_layernorm.bias": "v.post_ln.bias"}
_SIGLIP_FC = {"mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def write_mmproj_from_llava(path, llava, legacy=True, feature_layer_key=True, patch_size=None, drop_out_rows=0):
    """A transformers LLaVA's CLIP tower + projector as a llama.cpp mmproj GGUF (architecture "clip").
    patch_size / drop_out_rows: a deliberately mismatched file (metadata patch size, projector output width)."""
    c = llava.config
    v = c.vision_config
    w = _clip_writer(path, v, "mlp", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                     patch_size)
    w.add_bool("clip.has_llava_projector", True)
    w.add_uint32("clip.vision.projection_dim", 0)
    if feature_layer_key:  # hidden-state index, as the converter writes LLaVA's -2
        w.add_array("clip.vision.feature_layer", [v.num_hidden_layers + 1 + c.vision_feature_layer])
    w.add_bool("clip.use_gelu", v.hidden_act == "gelu")
    fc = {"mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"} if legacy else _SIGLIP_FC
    # LLaVA reads a layer before the final norm: the converter drops it
    top = {"embeddings.class_embedding": "v.class_embd", "embeddings.patch_embedding.weight": "v.patch_embd.weight",
           "embeddings.position_embedding.weight": "v.position_embd.weight", "pre_layrnorm.weight": "v.pre_ln.weight",
           "pre_layrnorm.bias": "v.pre_ln.bias"}
    for name, t in llava.state_dict().items():
        a = t.detach().float().numpy()
        if "multi_modal_projector." in name:
            layer, kind = name.rsplit(".", 2)[-2:]
            if layer == "linear_2" and drop_out_rows:
                a = a[:-drop_out_rows]
            w.add_tensor(f"mm.{0 if layer == 'linear_1' else 2}.{kind}", np.ascontiguousarray(a))
        elif (m := _TOWER_NAME.match(name)) and (out := _tower_tensor(m[1], fc, top)):
            w.add_tensor(out, np.ascontiguousarray(a))
    return _finish(w, path)


def write_mmproj_from_gemma3(path, gemma3, scale_factor_key=True, scale_factor=None):
    """A transformers Gemma 3's SigLIP tower + projector as a llama.cpp mmproj GGUF (projector type "gemma3"):
    gguf-py's names (fc1 -> ffn_up), the soft-embedding norm stored as 1 + w and the input projection in its
    Hugging Face [vision, text] layout, as llama.cpp's converter writes them."""
    c = gemma3.config
    v = c.vision_config
    w = _clip_writer(path, v, "gemma3", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    w.add_bool("clip.use_gelu", True)
    if scale_factor_key:  # scale_factor: a deliberately wrong one
        side = v.image_size // v.patch_size
        w.add_uint32("clip.vision.projector.scale_factor",
                     scale_factor or side // int(c.mm_tokens_per_image ** 0.5))
    for name, t in gemma3.state_dict().items():
        a = t.detach().float().numpy()
        if name.endswith("multi_modal_projector.mm_input_projection_weight"):
            w.add_tensor("mm.input_projection.weight", np.ascontiguousarray(a))
        elif name.endswith("multi_modal_projector.mm_soft_emb_norm.weight"):
            w.add_tensor("mm.soft_emb_norm.weight", np.ascontiguousarray(a + 1.0))
        elif (m := _TOWER_NAME.match(name)) and (out := _tower_tensor(m[1], _SIGLIP_FC, _SIGLIP_TOP)):
            w.add_tensor(out, np.ascontiguousarray(a))  # (SigLIP's unused pooling head has no name: skipped)
    return _finish(w, path)


def write_mmproj_from_idefics3(path, idefics3, preproc_size=None, scale_factor_key=True, scale_factor=None):
    """A transformers Idefics3 / SmolVLM tower + connector as a llama.cpp mmproj GGUF (projector type "idefics3"):
    the connector's Linear as mm.model.fc, the processor's longest edge as clip.vision.preproc_image_size
    (preproc_size; None: left out, an older converter's file)."""
    c = idefics3.config
    v = c.vision_config
    w = _clip_writer(path, v, "idefics3", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    w.add_bool("clip.use_gelu", True)
    if scale_factor_key:
        w.add_uint32("clip.vision.projector.scale_factor", scale_factor or c.scale_factor)
    if preproc_size is not None:
        w.add_uint32("clip.vision.preproc_image_size", preproc_size)
    for name, t in idefics3.state_dict().items():
        a = t.detach().float().numpy()
        if name.endswith("connector.modality_projection.proj.weight"):
            w.add_tensor("mm.model.fc.weight", np.ascontiguousarray(a))
        elif (m := _TOWER_NAME.match(name)) and (out := _tower_tensor(m[1], _SIGLIP_FC, _SIGLIP_TOP)):
            w.add_tensor(out, np.ascontiguousarray(a))
    return _finish(w, path)


def write_qwen2vl_gguf(path, qwen, tokenizer_fn):
    """A transformers Qwen2-VL / Qwen2.5-VL's language model as llama.cpp's converter writes it: architecture
    qwen2vl (Qwen2's tensors) with the M-RoPE sections as rope.dimension_sections, padded to four."""
    from types import SimpleNamespace

    c = qwen.config.text_config
    head = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), "qwen2vl")
    w.add_name("tiny-qwen2vl")
    _metadata(w, c, "qwen2vl", c.vocab_size)
    w.add_rope_dimension_sections(list(c.rope_parameters["mrope_section"]) + [0])
    assert sum(c.rope_parameters["mrope_section"]) == head // 2
    tokenizer_fn(w)
    state = {"model." + k: v for k, v in qwen.model.language_model.state_dict().items()}
    state["lm_head.weight"] = qwen.lm_head.weight
    lm = SimpleNamespace(config=SimpleNamespace(tie_word_embeddings=False), state_dict=lambda: state)
    for name, a in _tensors(lm, "qwen2vl"):
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    return _finish(w, path)


def write_mmproj_from_qwen2vl(path, qwen, drop_out_rows=0, window_key=True, pixels=None):
    """A transformers Qwen2-VL / Qwen2.5-VL tower + merger as a llama.cpp mmproj GGUF, as convert_hf_to_gguf.py's
    Qwen2VLVisionModel writes it: projector type qwen2vl_merger / qwen2.5vl_merger, the Conv3d patch embedding cut
    into its two frames (v.patch_embd.weight, .weight.1), qkv split into attn_q / attn_k / attn_v, merger.ln_q as
    v.post_ln, merger.mlp.0 / .2 as mm.0 / mm.2, feed_forward_length from Qwen2-VL's vision hidden_size (the LM
    width, as the converter does), n_wa_pattern from fullatt_block_indexes. Not the converter's: the window size
    (window_key; clip.cpp fixes 112 px, too large for this tiny model's images) and pixels=(min, max) as
    clip.vision.image_{min,max}_pixels (the processor's, which real files leave to clip.cpp's defaults).
    drop_out_rows: a deliberately mismatched file (mm.2 narrower than the LM)."""
    c = qwen.config
    v = c.vision_config
    v25 = c.model_type == "qwen2_5_vl"
    width = v.hidden_size if v25 else v.embed_dim
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "qwen2.5vl_merger" if v25 else "qwen2vl_merger")
    w.add_uint32("clip.vision.projection_dim", c.text_config.hidden_size)
    w.add_uint32("clip.vision.image_size", 560)  # the converter's default (no such key in the config)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", width)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size if v25 else v.hidden_size)
    w.add_uint32("clip.vision.block_count", v.depth)
    w.add_uint32("clip.vision.attention.head_count", v.num_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    if v25:
        w.add_bool("clip.use_silu", True)
        w.add_uint32("clip.vision.n_wa_pattern", v.fullatt_block_indexes[0] + 1)
        if window_key:
            w.add_uint32("clip.vision.window_size", v.window_size)
    if pixels is not None:
        w.add_uint32("clip.vision.image_min_pixels", pixels[0])
        w.add_uint32("clip.vision.image_max_pixels", pixels[1])
    names = {"norm1": "ln1", "norm2": "ln2", "attn.proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in qwen.state_dict().items():
        a = t.detach().float().numpy()
        m = re.match(r"(?:model\.)?visual\.(.+)$", name)
        if m is None:
            continue
        rest = m[1]
        if rest == "patch_embed.proj.weight":  # [D, 3, 2, p, p] -> one [D, 3, p, p] kernel per frame
            w.add_tensor("v.patch_embd.weight", np.ascontiguousarray(a[:, :, 0]))
            w.add_tensor("v.patch_embd.weight.1", np.ascontiguousarray(a[:, :, 1]))
        elif rest.startswith("merger."):
            base, kind = rest.removeprefix("merger.").rsplit(".", 1)
            if base == "mlp.2" and drop_out_rows:
                a = a[:-drop_out_rows]
            out = {"ln_q": "v.post_ln", "mlp.0": "mm.0", "mlp.2": "mm.2"}[base]
            w.add_tensor(f"{out}.{kind}", np.ascontiguousarray(a))
        else:
            _, i, base, kind = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", rest).group(0, 1, 2, 3)
            if base == "attn.qkv":
                for part, rows in zip("qkv", np.split(a, 3), strict=True):
                    w.add_tensor(f"v.blk.{i}.attn_{part}.{kind}", np.ascontiguousarray(rows))
            else:
                w.add_tensor(f"v.blk.{i}.{names[base]}.{kind}", np.ascontiguousarray(a))
    return _finish(w, path)

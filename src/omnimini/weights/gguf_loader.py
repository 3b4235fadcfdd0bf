"""GGUF files (llama.cpp) -> OmniModel + Tokenizer, read with the `gguf` package.

Weights are dequantized to float32 with `gguf.quants.dequantize`; the tokenizer and the chat template come from
the file's metadata. llama.cpp stores the Q and K projections of Llama models with their rows permuted for its
interleaved RoPE; we undo that so OmniModel's rotate-half RoPE sees the HF layout (the other architectures use
NeoX-style RoPE, which is rotate-half already).

Architectures: llama (also Mistral-style files with a sliding window, and Mixtral-style experts), qwen2, qwen3,
qwen3moe, phi3 (fused qkv and gate+up tensors, split here) and gemma3 (embedding scale, sandwich norms whose
weights llama.cpp's converter already stored as 1 + w, GeGLU, sliding-window layers with their own rope base and
every sixth layer global, as llama.cpp reads these files), qwen2vl (Qwen2-VL / Qwen2.5-VL's language model: Qwen2
with M-RoPE, `rope.dimension_sections` -> ModelConfig.mrope_section; its vision tower is an mmproj file,
gguf_mmproj.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from omnimini.config import ConfigError, ModelConfig, MoEConfig
from omnimini.weights.checkpoint import CheckpointError, build_model

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "phi3", "gemma3", "qwen2vl")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K")
PERMUTED_QK = ("llama",)  # architectures whose Q/K rows llama.cpp's converter permuted (interleaved RoPE)
GEMMA3_SWA_PATTERN = 6  # llama.cpp: in a gemma3 file every sixth layer is global unless the file says otherwise
GEMMA3_LOCAL_THETA = 10000.0  # llama.cpp's rope base of gemma3's sliding layers when the file has none
SUPPORTED_TOKENIZERS = ("gpt2", "llama")  # byte-level BPE; SentencePiece-style (gguf_tokenizer.py)
# end-of-turn markers a chat model stops at besides the file's eos token (llama.cpp treats these as end of
# generation too); only control tokens of the file count
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")

# llama.cpp pre-tokenizer names -> how the text is split before byte-level BPE (see llama-vocab.cpp)
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": ("gpt2", False), "gpt-2": ("gpt2", False), "smollm": ("gpt2", True),
                  "llama-bpe": ("llama3", False), "qwen2": ("qwen2", False)}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be loaded: truncated, unsupported architecture, tensor type or tokenizer."""


# ---- reading -------------------------------------------------------------------------------------------------

def open_gguf(path):
    """The file's metadata and tensor table (gguf_reader.GGUFFile: much faster than gguf's GGUFReader on large
    vocabularies; tensors have GGUFReader's attributes)."""
    import struct

    from omnimini.weights.gguf_reader import GGUFFile

    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"GGUF file not found: {p}")
    try:
        return GGUFFile(p)
    except (ValueError, IndexError, OSError, KeyError, struct.error) as e:
        raise GGUFError(f"{p}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader) -> dict:
    from omnimini.weights.gguf_reader import GGUFFile

    if isinstance(reader, GGUFFile):
        return dict(reader.fields)  # values already decoded
    out = {}  # a gguf.GGUFReader
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # noqa: BLE001 - a field we do not understand is not needed
            continue
    return out


def dequantize(t) -> np.ndarray:
    """One GGUF tensor as float32 in PyTorch layout ([out, in] for matrices)."""
    from gguf import quants

    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {t.name} has unsupported type {kind} (supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(n) for n in reversed(t.shape))
    try:
        arr = quants.dequantize(t.data, t.tensor_type)
    except (ValueError, IndexError) as e:
        raise GGUFError(f"tensor {t.name}: cannot decode its {kind} data ({e}); is the file truncated?") from None
    return np.array(arr, dtype=np.float32).reshape(shape)  # a writable copy, not a view of the mmap


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's convert_hf_to_gguf `permute` (interleaved -> rotate-half RoPE row order)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's own permutation (rotate-half -> interleaved), used to write test files."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- config --------------------------------------------------------------------------------------------------

def config_from_gguf(meta: dict, tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    if "rope_freqs.weight" in tensor_names:
        raise GGUFError("GGUF has a rope_freqs tensor (Llama-3.1-style RoPE scaling), which is not supported")
    if {"rope_factors_long.weight", "rope_factors_short.weight"} & tensor_names:
        raise GGUFError("GGUF has rope_factors tensors (Phi-3 LongRoPE), which is not supported")

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise GGUFError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden, heads, layers = int(get("embedding_length")), int(get("attention.head_count")), int(get("block_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count",
                                                                    hidden // heads)))
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"GGUF rotates {meta[f'{arch}.rope.dimension_count']} of {head_dim} head dimensions "
                        "(partial RoPE), which is not supported")
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none",):
        kind = meta[f"{arch}.rope.scaling.type"]
        if kind != "linear":
            raise GGUFError(f"unsupported rope scaling {kind!r} in GGUF (supported: none, linear)")
        scaling = {"type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    moe = None
    if int(meta.get(f"{arch}.expert_count", 0) or 0) > 0:  # Mixtral-style llama files, qwen3moe
        width = meta.get(f"{arch}.expert_feed_forward_length") or get("feed_forward_length")
        # llama.cpp renormalises the chosen experts' weights for both unless the file says otherwise
        moe = MoEConfig(num_experts=int(get("expert_count")), top_k=int(get("expert_used_count")),
                        expert_intermediate=int(width),
                        norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", True)))
    window = meta.get(f"{arch}.attention.sliding_window")
    extra = _gemma3_options(meta, hidden, head_dim, layers, window) if arch == "gemma3" else {}
    if arch == "qwen2vl":
        extra["mrope_section"] = _mrope_sections(meta)
    try:
        return ModelConfig(
            vocab_size=int(vocab), hidden_size=hidden, num_layers=layers, num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=head_dim if head_dim != hidden // heads else None,
            intermediate_size=int(get("feed_forward_length")), max_seq_len=int(get("context_length")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            qk_norm="head" if "blk.0.attn_q_norm.weight" in tensor_names else "none",
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            tie_embeddings="output.weight" not in tensor_names, moe=moe, arch=f"gguf:{arch}",
            sliding_window=int(window) if window else None, **extra,
        )
    except ConfigError as e:
        raise GGUFError(f"GGUF metadata: {e}") from None


def _mrope_sections(meta: dict) -> list[int]:
    """qwen2vl.rope.dimension_sections: llama.cpp's converter pads Qwen2-VL's three (temporal, height, width)
    counts of rotary frequencies with a fourth, 0 (a section only Qwen3-VL-style files use)."""
    sections = [int(x) for x in meta.get("qwen2vl.rope.dimension_sections", [])]
    if len(sections) < 3 or any(sections[3:]):
        raise GGUFError(f"GGUF qwen2vl.rope.dimension_sections {sections or None} must be the three M-RoPE sections "
                        "(temporal, height, width), padded with zeros")
    return sections[:3]


def _gemma3_options(meta: dict, hidden: int, head_dim: int, layers: int, window) -> dict:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta.get(f"gemma3.{key}"):
            raise GGUFError(f"GGUF gemma3.{key} is set, which is not supported")
    pattern = meta.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer: True = sliding
        slides = [bool(x) for x in pattern]
    else:
        n = int(pattern or GEMMA3_SWA_PATTERN)
        slides = [(i + 1) % n != 0 for i in range(layers)]
    # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(hidden / heads)
    heads = int(meta["gemma3.attention.head_count"])
    scale_dim = hidden // heads if layers == 62 else head_dim
    return {"embed_scale": hidden ** 0.5, "sandwich_norm": True, "hidden_act": "gelu_tanh",
            "attn_scale": scale_dim ** -0.5,
            "layer_types": ["sliding" if s else "full" for s in slides] if window else None,
            "rope_local_theta": float(meta.get("gemma3.rope.freq_base_swa", GEMMA3_LOCAL_THETA))}


# ---- tensors -------------------------------------------------------------------------------------------------

_RENAMES = {
    "token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_norm", "ffn_norm": "post_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.router", "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm", "post_attention_norm": "attn_out_norm", "post_ffw_norm": "mlp_out_norm",
}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_EXPS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


def _rename(name: str) -> str:
    if name in _RENAMES:
        return _RENAMES[name]
    m = _BLK.match(name)
    if m and m[2] in _BLOCK:
        return f"blocks.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"
    raise GGUFError(f"unexpected GGUF tensor {name!r} (no omnimini equivalent)")


def _split_fused(name: str, w: np.ndarray, cfg: ModelConfig) -> dict[str, np.ndarray] | None:
    """Phi-3's fused tensors: attn_qkv -> q, k, v rows; ffn_up with twice the MLP width -> gate rows, then up."""
    m = _BLK.match(name)
    if m and m[2] == "attn_qkv":
        q, kv = cfg.num_heads * cfg.dim_head, cfg.num_kv_heads * cfg.dim_head
        parts = np.split(w, [q, q + kv])
        return {f"blocks.{m[1]}.attn.{p}_proj.{m[3]}": a for p, a in zip("qkv", parts, strict=True)}
    if m and m[2] == "ffn_up" and w.shape[0] == 2 * cfg.intermediate_size:
        gate, up = np.split(w, 2)
        return {f"blocks.{m[1]}.mlp.gate_proj.weight": gate, f"blocks.{m[1]}.mlp.up_proj.weight": up}
    return None


def convert_tensors(reader, cfg: ModelConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    state, experts = {}, {}
    permuted = cfg.arch.removeprefix("gguf:") in PERMUTED_QK
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress, leave=False):
        w = dequantize(t)
        if m := _EXPS.match(t.name):
            experts.setdefault(int(m[1]), {})[m[2]] = w
            continue
        if (parts := _split_fused(t.name, w, cfg)) is not None:
            state.update({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in parts.items()})
            continue
        name = _rename(t.name)
        if permuted and name.endswith("attn.q_proj.weight"):
            w = unpermute_qk(w, cfg.num_heads)
        elif permuted and name.endswith("attn.k_proj.weight"):
            w = unpermute_qk(w, cfg.num_kv_heads)
        state[name] = torch.from_numpy(w)
    for layer, parts in experts.items():
        if set(parts) != {"gate", "up", "down"}:
            raise GGUFError(f"layer {layer}: incomplete expert tensors (have {sorted(parts)})")
        state[f"blocks.{layer}.mlp.gate_up"] = torch.from_numpy(np.concatenate([parts["gate"], parts["up"]], 1))
        state[f"blocks.{layer}.mlp.down"] = torch.from_numpy(parts["down"])
    for name, t in list(state.items()):
        if name.endswith("mlp.router.weight"):
            state[name.replace("router.weight", "router.selection_bias")] = torch.zeros(t.shape[0])
    return state


def block_tensors(reader, cfg: ModelConfig, types: tuple[str, ...]) -> dict[str, tuple[str, torch.Tensor]]:
    """The 2-D tensors stored in one of `types` (GGUF type names, e.g. "Q4_1"), as their raw blocks: omnimini
    name -> (type name lower-cased, uint8 [rows, bytes per row], GGUF name), Q/K rows in rotate-half order.
    For kernels that use GGUF's blocks as they are (engine/quant.py); experts are not included."""
    out = {}
    permuted = cfg.arch.removeprefix("gguf:") in PERMUTED_QK
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in types or len(t.shape) != 2 or _EXPS.match(t.name):
            continue
        m = _BLK.match(t.name)
        if m and (m[2] == "attn_qkv" or m[2] == "ffn_up" and int(t.shape[1]) == 2 * cfg.intermediate_size):
            continue  # Phi-3's fused tensors are split at load: no single omnimini weight holds their blocks
        name = _rename(t.name)
        raw = np.asarray(t.data).reshape(int(t.shape[1]), -1)
        if permuted and name.endswith("attn.q_proj.weight"):
            raw = unpermute_qk(raw, cfg.num_heads)
        elif permuted and name.endswith("attn.k_proj.weight"):
            raw = unpermute_qk(raw, cfg.num_kv_heads)
        out[name] = (kind.lower(), torch.from_numpy(np.array(raw, dtype=np.uint8)), t.name)  # a copy, not the mmap
    return out


# ---- tokenizer -----------------------------------------------------------------------------------------------

def tokenizer_from_gguf(meta: dict):
    """omnimini's Tokenizer from the file's vocabulary (byte-level BPE or SentencePiece-style), special tokens,
    BOS policy and chat template."""
    from omnimini.tokenizer import Tokenizer
    from omnimini.weights.gguf_tokenizer import GEMMA_ARCHS, GEMMA_CHAT_TEMPLATE, sentencepiece_from_gguf

    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise GGUFError(f"unsupported GGUF tokenizer model {kind!r} (supported: {', '.join(SUPPORTED_TOKENIZERS)})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    hf = byte_level_from_gguf(meta, tokens, types) if kind == "gpt2" else sentencepiece_from_gguf(meta)
    for i, t in enumerate(tokens):
        # control tokens must keep their ids; a user-defined one may be gone (Gemma's respelled whitespace pieces)
        if (types[i] == 3 or types[i] == 4 and hf.token_to_id(t) is not None) and hf.token_to_id(t) != i:
            raise GGUFError(f"GGUF token {i} ({t!r}) does not keep its id in the rebuilt tokenizer")

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    eos = tok("eos")
    control = {t for t, k in zip(tokens, types, strict=True) if k == 3}
    eos_tokens = ([eos] if eos else []) + [t for t in END_OF_TURN if t in control and t != eos]
    template = meta.get("tokenizer.chat_template")
    if template is None and meta.get("general.architecture") in GEMMA_ARCHS and "<start_of_turn>" in control:
        template = GEMMA_CHAT_TEMPLATE  # base Gemma files carry none, but their vocabulary has the turn markers
    # transformers and llama.cpp add BOS to a SentencePiece vocabulary that does not say otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    return Tokenizer(hf, chat_template=template, eos_tokens=eos_tokens, bos_token=tok("bos"),
                     pad_token=tok("padding"), image_token=None, image_start=None, image_end=None,
                     add_bos_token=add_bos)


def byte_level_from_gguf(meta: dict, tokens: list[str], types: list[int]):
    """Byte-level BPE from tokenizer.ggml.{tokens,merges,token_type,pre}."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZERS)})")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    # every token sits in the BPE vocabulary at its GGUF id; control tokens are then marked special in place
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    regex, digits = PRE_TOKENIZERS[pre]
    if regex == "gpt2":
        parts = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        pattern = _LLAMA3_REGEX if regex == "llama3" else _QWEN2_REGEX
        parts = [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if digits:
        parts.insert(0, pre_tokenizers.Digits(individual_digits=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(parts)
    hf.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens match whole in raw text, as in llama.cpp
    added = [tokenizers.AddedToken(tokens[i], special=types[i] == 3, normalized=False)
             for i in range(len(tokens)) if types[i] in (3, 4)]
    hf.add_special_tokens([a for a in added if a.special])
    hf.add_tokens([a for a in added if not a.special])
    return hf


# ---- entry point ---------------------------------------------------------------------------------------------

def load_gguf(path, device="cpu", dtype=torch.float32, progress: bool = True, reader=None):
    """Load a GGUF file -> (OmniModel, Tokenizer). `reader`: the file already opened (parsing its metadata
    takes seconds), e.g. by a caller that also reads its raw blocks."""
    from omnimini.weights.hf import check_vocab

    reader = reader or open_gguf(path)
    meta = metadata(reader)
    cfg = config_from_gguf(meta, {t.name for t in reader.tensors})
    tok = tokenizer_from_gguf(meta)
    check_vocab(tok, cfg, str(path))
    state = convert_tensors(reader, cfg, progress)
    return build_model(cfg, state, f"{path} (GGUF)", device, dtype), tok

"""OmniModel: the one model class behind training, the engine, evaluation and the open-weight loaders."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from omnimini import kernels
from omnimini.config import ModelConfig
from omnimini.model.blocklinear import BlockLinear
from omnimini.model.layers import Attention, KVCache, RMSNorm, Rotary, SwiGLU
from omnimini.model.moe import MoE
from omnimini.model.vision import vision_tower

NO_IMAGE = 2 ** 62  # image_from of a row without an image: past every position


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None with logits_for="none"
    loss: torch.Tensor | None = None  # LM loss (+ weighted router losses when training an MoE)
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean Switch balance loss over MoE layers
    z_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None  # [moe_layers, E] tokens routed to each expert
    hidden: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, i)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # the norm before the MLP
        self.is_moe = cfg.layer_is_moe(i)
        self.sliding = cfg.layer_slides(i)  # sliding-window attention: the model hands this layer the window mask
        if self.is_moe:
            self.mlp = MoE(cfg.hidden_size, cfg.moe)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        # sandwich norms (Gemma 2/3): the attention and MLP outputs are normalised before each residual add
        self.attn_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sandwich_norm else None
        self.mlp_out_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sandwich_norm else None
        self.image_adapter = ImageAdapter(cfg.hidden_size, cfg.image_adapter_dim, cfg.rms_norm_eps) \
            if cfg.image_adapter_dim else None

    def forward(self, x, rope, positions, cache, slots, mask, image_mask=None):
        if self.image_adapter is not None and image_mask is not None:
            x = self.image_adapter(x, image_mask)
        if x.shape[1] == 1 and cache is not None and self._fused_decode(x, cache):
            return self._decode_layer(x, rope, positions, cache, slots), None
        a = self.attn(self.input_norm(x), rope, positions, cache, slots, mask)
        x = x + (a if self.attn_out_norm is None else self.attn_out_norm(a))
        stats = None
        if self.is_moe:
            y, stats = self.mlp(self.post_norm(x))
        else:
            y = self.mlp(self.post_norm(x))
        return x + (y if self.mlp_out_norm is None else self.mlp_out_norm(y)), stats


    def fusable(self) -> bool:
        """Whether this layer's single-token steps can run as one kernel (kernels/csrc/decode_layer.cpp): every
        weight in blocks without biases, plain pre-norm SwiGLU, fused q/k/v. Anything else runs the modules one by
        one (same kernels, same result). The input and the cache are checked per step (_fused_decode)."""
        attn, mlp = self.attn, self.mlp
        linears = (attn.qkv, attn.o_proj, getattr(mlp, "gate_up", None), getattr(mlp, "down_proj", None))
        return (not self.is_moe and self.attn_out_norm is None and getattr(mlp, "act_name", "silu") == "silu"
                and all(isinstance(m, BlockLinear) and m.bias is None for m in linears)
                and self.input_norm.weight.dtype == torch.float32 and attn.native_decode_possible())

    def _fused_decode(self, x, cache) -> bool:
        return self.fusable() and self.attn._native_decode(x, cache)

    def decode_weights(self) -> tuple:
        """decode_layer's weight arguments: the norms, then each linear's kernel weight and format code."""
        attn, mlp = self.attn, self.mlp
        return (self.input_norm.weight, self.post_norm.weight, *attn.qkv.kernel_weight(),
                *attn.o_proj.kernel_weight(), *mlp.gate_up.kernel_weight(), *mlp.down_proj.kernel_weight())

    def _decode_layer(self, x, rope, positions, cache, slots):
        attn = self.attn
        B = x.shape[0]
        cos, sin = (t.reshape(B, attn.d) for t in rope)
        rows = slots if slots is not None else torch.arange(B)
        n_in, n_post, qkv, qkv_f, o, o_f, gu, gu_f, down, down_f = self.decode_weights()
        y = torch.ops.omnimini_cpu.decode_layer(
            x.reshape(B, -1), n_in, n_post, self.input_norm.eps, qkv, qkv_f, attn.qkv.out_features, o, o_f, gu,
            gu_f, self.mlp.gate_up.out_features, down, down_f, cache.k[attn.layer], cache.v[attn.layer], rows,
            positions.reshape(B), cos, sin, attn.h, attn.kvh, attn.scale or 0.0, attn.window or 0)
        return y.view(B, 1, -1)


class ImageAdapter(nn.Module):
    """x + mask * up(gelu(down(norm(x)))) where the mask is set (positions from a row's first image token on);
    `up` starts at zero, so a new adapter changes nothing until trained."""

    def __init__(self, hidden: int, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.down = nn.Linear(hidden, dim)
        self.up = nn.Linear(dim, hidden)

    def forward(self, x, image_mask):
        y = self.up(F.gelu(self.down(self.norm(x))))
        return x + y * image_mask[..., None].to(y.dtype)


class OmniModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        # sliding layers with their own rope base (Gemma 3) get their own angles; otherwise they share these
        self.rotary_local = Rotary(cfg, local=True) if cfg.rope_local_theta is not None else None
        self.vision = vision_tower(cfg.vision, cfg.hidden_size) if cfg.vision else None
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, ImageAdapter):
            nn.init.normal_(m.down.weight, std=0.02)
            nn.init.zeros_(m.down.bias)
            nn.init.zeros_(m.up.weight)
            nn.init.zeros_(m.up.bias)
            return
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ---- inputs --------------------------------------------------------------------------------------------

    def encode_images(self, pixels) -> torch.Tensor:
        """[N, 3, S, S] -> [N, tokens_per_image, hidden]; computed once per request by the engine. Towers that take
        each image at its own size (Qwen2-VL) take a list of [3, H, W] and give [their tokens, hidden]."""
        if self.vision is None:
            raise ValueError("this model has no vision encoder; it cannot take images")
        dtype = self.norm.weight.dtype  # (the embedding may hold quantized blocks)
        if isinstance(pixels, (list, tuple)):
            return self.vision([p.to(dtype) for p in pixels])
        return self.vision(pixels.to(dtype))

    def image_token_count(self, pixels) -> int:
        """How many image placeholders these images fill in a prompt."""
        if isinstance(pixels, (list, tuple)):
            return self.vision.token_count(pixels)
        return pixels.shape[0] * self.config.vision.tokens_per_image

    def mrope_positions(self, input_ids: torch.Tensor, pixels) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE coordinates of right-padded rows input_ids [B, T] whose image tokens the images `pixels` (a list
        of [3, H, W], in prompt order across the rows) fill: ([B, T, 3], delta [B]: each row's next rotary
        position minus T, what later tokens add to their cache position)."""
        from omnimini.model.mrope import mrope_positions
        from omnimini.model.qwen_vision import image_grid

        grids = iter([image_grid(p, self.config.vision) for p in pixels])
        rows = [mrope_positions(r, self.config.image_token_id, grids) for r in input_ids.tolist()]
        T = input_ids.shape[1]
        return (torch.stack([r for r, _ in rows]).to(input_ids.device),
                torch.tensor([nxt - T for _, nxt in rows], device=input_ids.device))

    def embed_inputs(self, input_ids, pixels=None, image_embeds=None) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if pixels is not None:
            image_embeds = self.encode_images(pixels)
        if image_embeds is None:
            return x
        where = input_ids == self.config.image_token_id
        feats = image_embeds.reshape(-1, x.shape[-1]).to(x.dtype)
        if int(where.sum()) != feats.shape[0]:
            raise ValueError(f"prompt has {int(where.sum())} image placeholder tokens but the images give "
                             f"{feats.shape[0]} embeddings")
        return x.masked_scatter(where[..., None], feats)

    def output_head(self, h: torch.Tensor) -> torch.Tensor:
        # a module call (not lm_head.weight) so the engine can swap in a quantized head, even for tied weights
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)

    # ---- forward -------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, *, labels=None, positions=None, attention_mask=None,
                cache: KVCache | None = None, slots=None, pixels=None, image_embeds=None,
                image_from: torch.Tensor | None = None, logits_for: str | torch.Tensor = "all",
                rope_positions: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T]. Without a cache: causal attention (plus key padding from attention_mask [B, T]).
        With a cache: tokens are written at `positions` [B, T] (rows `slots` of the cache) and attend to every
        cached key at a position <= their own. logits_for="last" computes logits only for the last position;
        "none" skips the LM head (embeddings read `hidden`, the final normed hidden states); a [B, T] bool mask
        computes them only where it is set ([N, vocab], labels taken at the same places): the vocabulary
        projection is a quarter of a small model's compute, wasted where no loss or score is read.
        image_from [B]: the position of each row's first image token (NO_IMAGE for rows without one), which turns
        the image adapters on from there; needed when the image is not in input_ids (decode, later prefill
        chunks), otherwise read off input_ids.
        rope_positions: the rotary positions when they are not `positions` (which stay the cache positions): [B, T]
        or M-RoPE's [B, T, 3] (mrope_section). With pixels and mrope_section they are computed here from the
        prompt (rows starting at position 0); the engine passes them for its chunks and decode steps.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cache_len = None
        if cache is not None:
            cache_len = cache.max_len
            cache.reserve(int(positions.max()) + 1)
        blocks = self._image_blocks(input_ids)
        mask = self._mask(positions, attention_mask, cache_len, image_blocks=blocks)
        window = self.config.sliding_window
        if window is not None and int(positions.max()) >= window:  # shorter: the window hides nothing
            window_mask = self._mask(positions, attention_mask, cache_len, window, blocks)
        else:
            window_mask = mask
        x = self.embed_inputs(input_ids, pixels, image_embeds)
        if rope_positions is None and self.config.mrope_section is not None and pixels is not None:
            rope_positions = self.mrope_positions(input_ids, pixels)[0]
        rp = positions if rope_positions is None else rope_positions.to(positions.device)
        rope = self.rotary(rp)
        rope_local = rope if self.rotary_local is None else self.rotary_local(rp)
        stats = []
        image_mask = self._adapter_mask(input_ids, positions, image_from)
        stack = self._decode_stack(x, cache) if T == 1 and image_mask is None else None
        if stack is not None:  # every layer as one op (the same kernels each layer's own fused step calls)
            x = self._decode_layers(stack, x, rope, rope_local, positions, cache, slots)
        layers = self.blocks if stack is None else ()
        for blk in layers:
            if blk.sliding:
                x, s = blk(x, rope_local, positions, cache, slots, window_mask, image_mask)
            else:
                x, s = blk(x, rope, positions, cache, slots, mask, image_mask)
            if s is not None:
                stats.append(s)
        h = self.norm(x)
        if isinstance(logits_for, torch.Tensor):  # a [B, T] bool mask: logits [N, vocab] at those positions only
            logits = self.output_head(h[logits_for])
            labels = labels[logits_for] if labels is not None else None
        elif logits_for == "none":
            if labels is not None:
                raise ValueError('logits_for="none" cannot compute a loss')
            logits = None
        else:
            logits = self.output_head(h[:, -1:] if logits_for == "last" else h)
        out = ModelOutput(logits=logits, hidden=h)
        if stats:
            out.expert_load = torch.stack([s["load"] for s in stats])
            if self.training:
                out.aux_loss = torch.stack([s["aux_loss"] for s in stats]).mean()
                out.z_loss = torch.stack([s["z_loss"] for s in stats]).mean()
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.flatten(),
                                          ignore_index=-100)
            out.loss = out.lm_loss
            if out.aux_loss is not None:
                m = self.config.moe
                out.loss = out.loss + m.aux_loss_coef * out.aux_loss + m.z_loss_coef * out.z_loss
        return out

    def _decode_stack(self, x, cache) -> dict | None:
        """decode_layers' per-layer arguments when every layer can take the fused single-token step now, else
        None. The layers' structure is read once per BlockLinear.generation (any block weight made, repacked or
        loaded since starts a new one); the input and the cache are checked per step."""
        if cache is None or not kernels.usable(x):
            return None
        kc = cache.k[0]
        if kc.dtype not in (torch.float32, torch.float16) or not kc.is_contiguous():
            return None
        cached = self.__dict__.get("_stack_cache")
        if cached is None or cached[0] != BlockLinear.generation:
            cached = (BlockLinear.generation, self._build_decode_stack())
            self.__dict__["_stack_cache"] = cached
        return cached[1]

    def _build_decode_stack(self) -> dict | None:
        blocks = list(self.blocks)
        if not blocks or not all(b.fusable() for b in blocks):
            return None
        a0 = blocks[0].attn
        shape = (a0.h, a0.kvh, a0.scale, blocks[0].input_norm.eps, a0.qkv.out_features,
                 blocks[0].mlp.gate_up.out_features)
        if any((b.attn.h, b.attn.kvh, b.attn.scale, b.input_norm.eps, b.attn.qkv.out_features,
                b.mlp.gate_up.out_features) != shape for b in blocks):
            return None
        cols = list(zip(*(b.decode_weights() for b in blocks), strict=True))
        return {"weights": [list(c) for c in cols], "windows": [b.attn.window or 0 for b in blocks],
                "layers": [b.attn.layer for b in blocks], "shape": shape}

    def _decode_layers(self, stack, x, rope, rope_local, positions, cache, slots):
        h, kvh, scale, eps, qkv_n, gu_n = stack["shape"]
        n_in, n_post, qkv, qkv_f, o, o_f, gu, gu_f, down, down_f = stack["weights"]
        B, D = x.shape[0], rope[0].shape[-1]
        cos, sin = (t.reshape(B, D) for t in rope)
        cos_l, sin_l = (t.reshape(B, D) for t in rope_local)
        rows = slots if slots is not None else torch.arange(B)
        y = torch.ops.omnimini_cpu.decode_layers(
            x.reshape(B, -1), n_in, n_post, eps, qkv, qkv_f, qkv_n, o, o_f, gu, gu_f, gu_n, down, down_f,
            [cache.k[i] for i in stack["layers"]], [cache.v[i] for i in stack["layers"]], rows, positions.reshape(B),
            cos, sin, cos_l, sin_l, stack["windows"], h, kvh, scale or 0.0)
        return y.view(B, 1, -1)

    def _adapter_mask(self, input_ids, positions, image_from) -> torch.Tensor | None:
        """[B, T] bool: where the image adapters run (positions at or after the row's first image token), or None
        when they run nowhere (text only: not one operation differs from the text model)."""
        if not self.config.image_adapter_dim or self.config.image_token_id is None:
            return None
        if image_from is None:
            is_img = input_ids == self.config.image_token_id
            if not bool(is_img.any()):
                return None
            first = torch.where(is_img, positions, NO_IMAGE).amin(1)
        else:
            first = image_from.to(positions.device)
        m = positions >= first[:, None]
        return m if bool(m.any()) else None

    @staticmethod
    def _mask(positions, attention_mask, cache_len: int | None, window: int | None = None, image_blocks=None):
        """Boolean [B, 1, T, keys] mask (True = attend), or None for plain causal attention.
        window: also hide keys `window` or more positions behind the query (sliding-window layers).
        image_blocks [B, T]: which image each token belongs to (-1: text); tokens of one image also see each
        other's later positions (image_attention="bidirectional"; the window still applies, as in Gemma 3)."""
        if cache_len is not None:
            # key j (a cache position) is visible to a query at position p when j <= p; padded tail tokens of
            # a chunked prefill may carry positions past the cache end: they are never read, so cap the keys
            kv_len = min(int(positions.max()) + 1, cache_len)
            keys = torch.arange(kv_len, device=positions.device)[None, None, :]
            m = keys <= positions[:, :, None]
            if image_blocks is not None:
                # each key position's image (the chunk's own tokens; earlier keys are visible causally anyway)
                where = torch.where(image_blocks >= 0, positions.clamp(max=kv_len - 1), kv_len)
                kblk = torch.full((positions.shape[0], kv_len + 1), -1, dtype=torch.long, device=positions.device)
                kblk = kblk.scatter(1, where, image_blocks)[:, :kv_len]
                m = m | ((image_blocks[:, :, None] >= 0) & (image_blocks[:, :, None] == kblk[:, None, :]))
            if window is not None:
                m = m & (keys > positions[:, :, None] - window)
            return m[:, None]
        T = positions.shape[1]
        if attention_mask is None and image_blocks is None and (window is None or T <= window):
            return None  # plain causal: the fast SDPA path
        m = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()[None]
        if image_blocks is not None:
            m = m | ((image_blocks[:, :, None] >= 0) & (image_blocks[:, :, None] == image_blocks[:, None, :]))
        if window is not None:
            m = m & ~torch.ones(T, T, dtype=torch.bool, device=positions.device).tril(-window)[None]
        if attention_mask is not None:
            m = m & attention_mask.bool()[:, None, :]
        m = m | torch.eye(T, dtype=torch.bool, device=positions.device)[None]  # padded queries see themselves
        return m[:, None]

    def _image_blocks(self, input_ids) -> torch.Tensor | None:
        """[B, T] index of the image each placeholder belongs to (a contiguous run is one image), -1 elsewhere;
        None unless this model attends bidirectionally within images and the chunk holds image tokens."""
        if self.config.image_attention != "bidirectional" or self.config.image_token_id is None:
            return None
        is_img = input_ids == self.config.image_token_id
        if not bool(is_img.any()):
            return None
        starts = is_img & ~F.pad(is_img, (1, 0))[:, :-1]
        return torch.where(is_img, starts.long().cumsum(1) - 1, -1)

    # ---- utilities -----------------------------------------------------------------------------------------

    def new_cache(self, slots: int, max_len: int | None = None, dtype=None, reserve: int | None = None) -> KVCache:
        """reserve: positions allocated now (None: all of max_len); the forward grows the cache as it fills."""
        p = next(self.parameters())
        return KVCache(self.config, slots, max_len or self.config.max_seq_len, p.device, dtype or p.dtype, reserve)

    def kv_cache_dtype(self, kind: str = "auto") -> torch.dtype:
        """The KV cache's dtype for `kind` (config.KV_CACHE_KINDS): fp32 | fp16 | auto. auto is float16 when every
        layer's decode step runs omnimini's attention kernel (CPU, float32 activations, fused q/k/v, kernels
        available), which reads and writes float16 keys/values directly: half the cache memory for logits within
        ~1e-3 of the float32 cache (tests/test_block_quant.py); otherwise the parameters' dtype (the PyTorch path
        would convert the cache back on every step)."""
        p = next(self.parameters())
        if kind == "fp32":
            return torch.float32
        if kind == "fp16":
            return torch.float16
        if kind != "auto":
            raise ValueError(f"unknown KV cache kind {kind!r} (choose one of: auto, fp32, fp16)")
        from omnimini import kernels

        native = all(blk.attn.native_decode_possible() for blk in self.blocks)
        if native and p.device.type == "cpu" and p.dtype == torch.float32 and kernels.available():
            return torch.float16
        return p.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> OmniModel:
        from omnimini.weights.checkpoint import load_model

        return load_model(path, device=device, dtype=dtype)

    def save_pretrained(self, path, tokenizer=None, max_shard_bytes: int = 2 * 1024 ** 3) -> None:
        from omnimini.weights.checkpoint import save_model

        save_model(self, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)

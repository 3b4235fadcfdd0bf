"""Vision encoder (a small ViT with learned 2D positions) and the pixel-shuffle projector into the LM width.

Qwen2-VL's tower (native-resolution images, rotary patch positions, window attention) is QwenVisionEncoder in
qwen_vision.py, built from the same ViTBlock; vision_tower picks the one a VisionConfig describes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnimini.config import VisionConfig
from omnimini.model.layers import RMSNorm, apply_rope

# ImageNet-style normalisation; images arrive as float [3, S, S] in 0..1
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # CLIP's approximation


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # SigLIP's gelu_pytorch_tanh


ACTS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh, "silu": F.silu}


def vision_norm(cfg: VisionConfig, d: int) -> nn.Module:
    return RMSNorm(d, eps=cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(d, eps=cfg.norm_eps)


class ViTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, inter = cfg.hidden_size, cfg.intermediate_size
        self.heads = cfg.num_heads
        self.norm1, self.norm2 = vision_norm(cfg, d), vision_norm(cfg, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.gated = cfg.mlp == "gated"
        if self.gated:  # Qwen2.5-VL: a SwiGLU MLP with biases
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, inter), nn.Linear(d, inter), nn.Linear(inter, d)
        else:
            self.fc1, self.fc2 = nn.Linear(d, inter), nn.Linear(inter, d)
        self.act = ACTS[cfg.act]

    def forward(self, x, rope=None, mask=None):
        """x [B, N, D]; rope: (cos, sin) [N, head_dim] rotary angles of each patch (towers without learned
        positions); mask [N, N] bool: which patches see which (window attention), None: all see all."""
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # bidirectional
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        h = self.norm2(x)
        if self.gated:
            return x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))
        return x + self.fc2(self.act(self.fc1(h)))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, lm_hidden: int):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nn.Linear(3 * p * p, d)
        if cfg.positions == "2d":
            # factorised learned positions: row + column tables, so grids up to max_grid work
            self.pos_row = nn.Parameter(torch.randn(cfg.max_grid, d) * 0.02)
            self.pos_col = nn.Parameter(torch.randn(cfg.max_grid, d) * 0.02)
        else:  # CLIP: one learned position per patch of the fixed grid, the class token's first
            self.pos = nn.Parameter(torch.randn(cfg.grid ** 2 + cfg.class_token, d) * 0.02)
        self.class_token = nn.Parameter(torch.zeros(d)) if cfg.class_token else None
        self.pre_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.final_norm else None
        s = cfg.pixel_shuffle
        # "linear" (Idefics3's modality projection) is one bias-free map of the shuffled patches; the others are
        # Linear-GELU-Linear
        linear = cfg.projector in ("linear", "gemma3")
        # gemma3 pools each s x s block (one patch's width in), the others concatenate it (s*s patches' width)
        self.proj_fc1 = nn.Linear(d if cfg.projector == "gemma3" else d * s * s, lm_hidden, bias=not linear)
        self.proj_fc2 = None if linear else nn.Linear(lm_hidden, lm_hidden)
        self.proj_norm = None
        self.pool_norm = RMSNorm(d, eps=cfg.norm_eps) if cfg.projector == "gemma3" else None
        if cfg.projector == "omnimini":
            # image tokens start at the scale of text embeddings (std 0.02): unnormalised they grow ~100x larger,
            # become an attention sink, and the encoder stops receiving gradient
            self.proj_norm = RMSNorm(lm_hidden)
            nn.init.constant_(self.proj_norm.weight, cfg.token_scale)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] normalised -> image tokens [N, (H/p/s)*(W/p/s), lm_hidden]."""
        p, s = self.cfg.patch_size, self.cfg.pixel_shuffle
        N, C, H, W = pixels.shape
        gh, gw = H // p, W // p
        if gh > self.cfg.max_grid or gw > self.cfg.max_grid or gh % s or gw % s:
            raise ValueError(f"image of {H}x{W} px gives a {gh}x{gw} patch grid; need <= {self.cfg.max_grid} "
                             f"and divisible by pixel_shuffle {s}")
        if self.cfg.positions == "1d" and gh * gw != self.cfg.grid ** 2:
            raise ValueError(f"image of {H}x{W} px gives a {gh}x{gw} patch grid; this tower's positions are for "
                             f"{self.cfg.grid}x{self.cfg.grid}")
        patches = pixels.unfold(2, p, p).unfold(3, p, p)  # N, C, gh, gw, p, p
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(N, gh * gw, C * p * p)
        x = self.patch_embed(patches)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(N, 1, -1).to(x.dtype), x], dim=1)
        if self.cfg.positions == "1d":
            x = x + self.pos
        else:
            x = x + (self.pos_row[:gh, None, :] + self.pos_col[None, :gw, :]).reshape(gh * gw, -1)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for blk in self.blocks:
            x = blk(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.class_token is not None:
            x = x[:, 1:]  # LLaVA's "default" feature selection: the patches only
        return self.project(x, gh, gw)

    def project(self, x, gh, gw):
        # pixel shuffle: merge each s x s neighbourhood of patches into one token (fewer, wider tokens); the
        # features of a token are its patches in row-major order, as Idefics3's connector lays them out
        s = self.cfg.pixel_shuffle
        if self.pool_norm is not None:  # Gemma 3: the mean of each s x s block, normed, mapped
            N, _, D = x.shape
            x = F.avg_pool2d(x.transpose(1, 2).reshape(N, D, gh, gw), s).flatten(2).transpose(1, 2)
            return self.proj_fc1(self.pool_norm(x))
        if s > 1:
            N, _, D = x.shape
            x = x.view(N, gh // s, s, gw // s, s, D).permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(N, (gh // s) * (gw // s), s * s * D)
        y = self.proj_fc1(x)
        if self.proj_fc2 is not None:
            y = self.proj_fc2(F.gelu(y))
        if self.proj_norm is None:  # LLaVA's MLP, Idefics3's linear map: the tokens as projected
            return y
        # Remove the component every token of the image shares. Trained from scratch, the LM first sees image
        # tokens as noise and the quickest way to lower its loss is to make them constant: a shared vector grows
        # until, after the norm, every image looks the same (measured: the nano model's image tokens varied
        # 1e-4 of their size across images after 120 steps, and answers were identical with a blank image).
        # Centred tokens cannot collapse that way; what is left is what differs between places in the image.
        return self.proj_norm(y - y.mean(dim=1, keepdim=True) if self.cfg.center_tokens else y)


def vision_tower(cfg: VisionConfig, lm_hidden: int) -> nn.Module:
    """The vision encoder + projector a VisionConfig describes (OmniModel.vision)."""
    if cfg.tower == "qwen2vl":
        from omnimini.model.qwen_vision import QwenVisionEncoder

        return QwenVisionEncoder(cfg, lm_hidden)
    return VisionEncoder(cfg, lm_hidden)

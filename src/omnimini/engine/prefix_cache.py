"""Automatic prefix (prompt) caching: KV blocks of prompts seen before, keyed by a chain hash, evicted LRU.

A prompt is cut into blocks of `block_size` tokens. Block i's key hashes block i-1's key with block i's tokens
(and the content digests of the images whose placeholders fall in it), so one key names a whole prefix, as in
vLLM's automatic prefix caching. The engine keeps its slot-based KV cache; this pool holds copies of whole
blocks ([blocks, kv_heads, block_size, head_dim] per layer) and copies a matched prefix into a request's slot at
admission instead of prefilling it. Copies (not shared pages) keep the attention and the compiled decode step
unchanged, and make eviction safe at any time: no running sequence ever reads the pool.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch


def image_digest(pixels: torch.Tensor) -> bytes:
    """Content hash of one image as the model sees it (the pixel tensor), so equal token ids of different
    images never share cache entries."""
    t = pixels.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.digest()


def block_keys(prompt: list[int], block_size: int, image_token_id: int | None = None,
               image_digests: list[bytes] | None = None, tokens_per_image: int = 0) -> list[bytes]:
    """Chain-hash key of every full block of `prompt` (a trailing partial block has none)."""
    keys, parent = [], b""
    seen_ph = 0  # image placeholders before the current block: says which image a placeholder belongs to
    for start in range(0, len(prompt) - block_size + 1, block_size):
        toks = prompt[start: start + block_size]
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", toks).tobytes())
        if image_digests and image_token_id is not None:
            n_ph = sum(1 for t in toks if t == image_token_id)
            if n_ph:
                first, last = seen_ph // tokens_per_image, (seen_ph + n_ph - 1) // tokens_per_image
                for d in image_digests[first: last + 1]:
                    h.update(d)
                seen_ph += n_ph
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class PrefixCacheStats:
    hit_tokens: int = 0  # prompt tokens copied from the pool instead of prefilled
    queried_tokens: int = 0  # prompt tokens of requests that looked the pool up
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, kv_cache, capacity_tokens: int, block_size: int = 32):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.capacity = max(0, capacity_tokens // block_size)  # blocks
        # the pool grows as it fills (doubling, up to capacity): a quarter of the slots' budget is ~190 MB of
        # SmolLM2's float16 keys/values, which a server that has seen a few prompts does not need
        k0 = kv_cache.k[0]
        self._block_shape, self._dtype, self._device = (k0.shape[1], block_size, k0.shape[3]), k0.dtype, k0.device
        n = min(self.capacity, 8)
        self.k = [self._zeros(n) for _ in kv_cache.k]
        self.v = [self._zeros(n) for _ in kv_cache.v]
        self._where: OrderedDict[bytes, int] = OrderedDict()  # key -> pool block, oldest first
        self._free = list(range(n - 1, -1, -1))
        self.stats = PrefixCacheStats()

    def _zeros(self, blocks: int) -> torch.Tensor:
        return torch.zeros((blocks, *self._block_shape), dtype=self._dtype, device=self._device)

    @property
    def allocated_blocks(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def _grow(self) -> bool:
        old = self.allocated_blocks
        new = min(self.capacity, max(8, 2 * old))
        if new <= old:
            return False
        for pool in (self.k, self.v):
            for i, t in enumerate(pool):
                pool[i] = torch.cat([t, self._zeros(new - old)])
        self._free = list(range(new - 1, old - 1, -1)) + self._free
        return True

    @property
    def used_blocks(self) -> int:
        return len(self._where)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def load(self, kv_cache, slot: int, keys: list[bytes], start_block: int, max_blocks: int) -> int:
        """Copy the pooled blocks that continue the prefix at `start_block` into `slot`; return blocks copied."""
        end = start_block
        while end < min(max_blocks, len(keys)) and keys[end] in self._where:
            end += 1
        if end == start_block:
            return 0
        idx = torch.tensor([self._where[k] for k in keys[start_block:end]])
        bs, a, b = self.block_size, start_block * self.block_size, end * self.block_size
        kv_cache.reserve(b)
        for dst, src in ((kv_cache.k, self.k), (kv_cache.v, self.v)):
            for layer in range(len(dst)):
                blocks = src[layer][idx]  # [n, kvh, bs, d]
                dst[layer][slot, :, a:b] = blocks.transpose(0, 1).reshape(blocks.shape[1], (end - start_block) * bs,
                                                                           -1)
        self._touch(keys[:end])
        return end - start_block

    def store(self, kv_cache, slot: int, keys: list[bytes]) -> None:
        """Pool the blocks `keys` (a prefix already computed in `slot`) that are not pooled yet."""
        if not self.capacity or not keys:
            return
        self._touch(keys)  # this chain becomes the newest: eviction below takes other chains first
        chain = set(keys)
        new_blocks, dst = [], []
        for i, key in enumerate(keys):
            if key in self._where:
                continue
            b = self._allocate(chain)
            if b is None:
                break  # the pool holds nothing but this chain
            self._where[key] = b
            new_blocks.append(i)
            dst.append(b)
        if not dst:
            return
        self._touch(keys)
        bs, idx = self.block_size, torch.tensor(dst)
        for src, pool in ((kv_cache.k, self.k), (kv_cache.v, self.v)):
            for layer in range(len(src)):
                rows = src[layer][slot]  # [kvh, len, d]
                parts = torch.stack([rows[:, i * bs:(i + 1) * bs] for i in new_blocks])
                pool[layer][idx] = parts
        self.stats.stored_blocks += len(dst)

    def _allocate(self, protected: set[bytes]) -> int | None:
        if self._free or self._grow():
            return self._free.pop()
        oldest = next(iter(self._where), None)
        if oldest is None or oldest in protected:
            return None
        self.stats.evicted_blocks += 1
        return self._where.pop(oldest)

    def _touch(self, keys: list[bytes]) -> None:
        # deepest block first, root last: the root is the newest, so eviction trims chains from their tails and
        # never orphans a still-pooled descendant before its ancestors are gone
        for key in reversed(keys):
            if key in self._where:
                self._where.move_to_end(key)

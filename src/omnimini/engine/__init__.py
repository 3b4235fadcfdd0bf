"""Inference engine: sampling, generation with a KV cache, continuous batching."""

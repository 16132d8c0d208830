"""The shared decoding engine: paged KV cache, attention hook, prefill and decode loop."""

from retrobench.engine.cache import PagedKVCache
from retrobench.engine.engine import BACKENDS, Engine, Generation, Request
from retrobench.engine.sampling import Sampling, sample_next

__all__ = ["BACKENDS", "Engine", "Generation", "PagedKVCache", "Request", "Sampling", "sample_next"]

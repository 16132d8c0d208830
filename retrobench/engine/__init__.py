"""The shared decoding engine: paged KV cache, attention hook, prefill, decode loop, continuous batching."""

from retrobench.engine.batch import Job
from retrobench.engine.cache import PagedKVCache
from retrobench.engine.engine import BACKENDS, Engine, Generation, Request
from retrobench.engine.sampling import Sampling, sample_next

__all__ = ["BACKENDS", "Engine", "Generation", "Job", "PagedKVCache", "Request", "Sampling", "sample_next"]

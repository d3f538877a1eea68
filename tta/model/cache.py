"""A key/value cache that writes each step into memory reserved up front.

transformers' `DynamicCache` grows by concatenation: every decode step copies the whole cache of
every layer to append one position, so a step's cost grows with the context it has already read.
For the batched decoder (12 views x ~1,000 positions) the copies were 2 ms of a 6 ms step on this
CPU; writing into a reserved buffer made `benchmarks/decoding.py` 1.34 -> 1.10 s at one thread,
with the same answers (tests/test_attention_cache.py compares the two caches).

The layer is transformers' own `DynamicLayer` with `update` replaced, so everything else a cache
does (repeat rows for sampling, select rows, crop) keeps working: when something replaces the
layer's tensors, the next `update` copies them into a fresh reservation.
"""
from __future__ import annotations

import functools

import torch


def _reserved_layer_class():
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:   # transformers before per-layer caches: keep the plain growing cache
        return None

    class ReservedLayer(DynamicLayer):
        def __init__(self, capacity: int, **kwargs):
            super().__init__(**kwargs)
            self.capacity = capacity
            self._key_view = None   # self.keys as this layer last left it
            self._length = 0

        def _allocate(self, like: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
            shape = (like.shape[0], like.shape[1], positions, like.shape[3])
            keys = torch.empty(shape, dtype=like.dtype, device=like.device)
            values = torch.empty(shape, dtype=like.dtype, device=like.device)
            if self._length:
                keys[..., :self._length, :] = self.keys[..., :self._length, :]
                values[..., :self._length, :] = self.values[..., :self._length, :]
            return keys, values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            if self.keys is not self._key_view:   # first update, or rows repeated / selected / cropped since
                self._length = self.keys.shape[-2] if self.keys.numel() else 0
                self._key_buffer, self._value_buffer = self._allocate(key_states, max(self.capacity, self._length + new))
            elif self._length + new > self._key_buffer.shape[-2]:   # more than reserved: double
                self._key_buffer, self._value_buffer = self._allocate(key_states, 2 * (self._length + new))
            end = self._length + new
            self._key_buffer[..., self._length:end, :] = key_states
            self._value_buffer[..., self._length:end, :] = value_states
            self._length = end
            self.keys = self._key_view = self._key_buffer[..., :end, :]
            self.values = self._value_buffer[..., :end, :]
            return self.keys, self.values

    return ReservedLayer


def reserved_cache(capacity: int):
    """A `DynamicCache` whose layers reserve `capacity` positions (prompt plus answer) at their
    first update.  On transformers versions without per-layer caches it is a plain `DynamicCache`."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layer_class = _reserved_layer_class()
    if layer_class is not None and getattr(cache, "layer_class_to_replicate", None) is not None:
        cache.layer_class_to_replicate = functools.partial(layer_class, capacity)
    return cache

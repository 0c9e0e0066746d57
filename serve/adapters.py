"""Subject weights in a replica's host memory, for full and LoRA subjects side by side.

A replica keeps one base pipeline. Its subjects' weights wait in host memory in two LRUs:
a few full subjects (each a whole UNet and text encoder, ~2 GB at SD 1.5 in fp16) and many
LoRA subjects (each a few MB of adapter tensors, `comfusion.lora.LoraWeights`). `SubjectSlot`
(comfusion.lora) puts one of them at a time into the pipeline: a full subject by an in-place
copy, a LoRA subject by a copy into one PEFT adapter padded to `lora_max_rank` on the union of the
modules adapted so far (any rank up to it, any subset of those modules); a subject above that rank
is loaded as an adapter of its own shape (unload + diffusers' loader, about 100x slower).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from comfusion.checkpoint import SubjectMeta


@dataclass
class FullWeights:
    """A full subject in host memory: the UNet and text-encoder state dicts."""

    unet: dict
    text_encoder: dict
    meta: SubjectMeta

    @property
    def state(self) -> tuple[dict, dict]:
        return self.unet, self.text_encoder

    @property
    def nbytes(self) -> int:
        return _nbytes(self.unet) + _nbytes(self.text_encoder)


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class HostLRU:
    """Least-recently-used values by key, bounded by a count and (optionally) by bytes.

    `put` evicts the oldest entries until both bounds hold again (the new entry always stays);
    `on_evict(key)` is called for each. Thread-safe: the replica's event loop and its worker
    threads both use it.
    """

    def __init__(self, capacity: int, max_bytes: int | None = None,
                 on_evict: Callable[[str], None] | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.max_bytes, self.on_evict = capacity, max_bytes, on_evict
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key: str, value: Any, nbytes: int) -> None:
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            evicted = self._trim(keep=key)
        for k in evicted:  # outside the lock: the callback may take other locks
            if self.on_evict is not None:
                self.on_evict(k)

    def _trim(self, keep: str) -> list[str]:
        evicted = []
        while len(self._items) > 1 and (len(self._items) > self.capacity or
                                        (self.max_bytes is not None and self._bytes > self.max_bytes)):
            key = next(iter(self._items))
            if key == keep:
                break
            self._bytes -= self._items.pop(key)[1]
            evicted.append(key)
        self.evictions += len(evicted)
        return evicted

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items


@dataclass(frozen=True)
class SubjectHandle:
    """The multiplexed "model" of a subject version: small; its weights live in an LRU."""

    mid: str  # `<subject>@v<version>`
    kind: str  # "full" or "lora"
    meta: SubjectMeta


class SubjectWeightsCache:
    """The two LRUs of a replica: `full` (few, large) and `lora` (many, small), by model id."""

    def __init__(self, max_full: int, max_adapters: int, adapter_max_bytes: int,
                 on_full_evict: Callable[[str], None] | None = None):
        self.full = HostLRU(max_full, on_evict=on_full_evict)
        self.lora = HostLRU(max_adapters, max_bytes=adapter_max_bytes)

    def get(self, handle: SubjectHandle) -> Any | None:
        return (self.lora if handle.kind == "lora" else self.full).get(handle.mid)

    def put(self, mid: str, weights: Any) -> SubjectHandle:
        """Cache `weights` (FullWeights or comfusion.lora.LoraWeights); returns its handle."""
        kind = weights.meta.kind
        (self.lora if kind == "lora" else self.full).put(mid, weights, weights.nbytes)
        return SubjectHandle(mid, kind, weights.meta)

    def stats(self) -> dict:
        return dict(adapters=len(self.lora), adapter_bytes=self.lora.nbytes, adapter_evictions=self.lora.evictions,
                    full_bytes=self.full.nbytes)

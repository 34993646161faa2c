"""Gradient checkpointing whose saved layer inputs wait in CPU memory (`offload_checkpoints`).

With checkpointing, each decoder layer keeps only its input for backward: 2·h bytes per
token per layer in bf16. For Llama-3-8B (h 4096, 32 layers) at 8,192 tokens a
micro-batch that is 32 × 8192 × 4096 × 2 B = 2.1 GB, a quarter of a QLoRA run's peak.
Here each input is copied to pinned host memory on a side stream as soon as its layer
starts, and back to the GPU on the same stream one layer ahead of backward. A copy is
64 MB there, ~1.3 ms at ~50 GB/s, beside ~12 ms of the layer's forward and ~36 ms of its
recompute and backward, so the copies can hide behind the compute. The GPU then holds
two layer inputs (the one in backward and the prefetched one) instead of all of them.

The hooks wrap torch's non-reentrant checkpoint, which saves a layer's tensor arguments
(here the hidden states; the rotary tables and masks travel as keyword arguments)
before it installs its own hooks for the layer's inside: only those arguments pass
through `pack`. Everything else, RNG replay for dropout included, is torch's checkpoint.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

SMALL = 1 << 16  # bytes: a tensor below this (checkpoint's empty marker) stays where it is


class _Saved:
    """One offloaded tensor: its host copy, and its way back."""

    __slots__ = ("__weakref__", "host", "gpu", "fetched", "used", "before")

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host
        self.gpu: torch.Tensor | None = None  # prefetched copy back, not yet handed out
        self.fetched: torch.cuda.Event | None = None
        self.used = False
        # the input saved just before this one: the one backward asks for next
        self.before: _Saved | None = None


class Offloader:
    """Saved-tensor hooks that keep checkpointed layer inputs in (pinned) host memory."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.last: weakref.ref[_Saved] | None = None  # weak: a finished step's chain goes
        self.offloaded = 0  # inputs moved to the host so far (the test's and the log's count)

    def checkpoint(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Drop-in for transformers' `_gradient_checkpointing_func`."""
        kwargs.setdefault("use_reentrant", False)
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint(function, *args, **kwargs)

    def pack(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type != self.device.type or tensor.numel() * tensor.element_size() < SMALL:
            return tensor  # already in host memory, or too small to be worth a copy
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.cuda)
        saved = _Saved(host)
        if self.cuda:
            assert self.stream is not None
            # the copy starts once the layer's input is written, and the allocator must
            # not hand the input's memory to anyone before the copy has read it
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)
        else:
            host.copy_(tensor)
        last = self.last() if self.last is not None else None
        saved.before = last if last is not None and not last.used else None
        self.last = weakref.ref(saved)
        self.offloaded += 1
        return saved

    def unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        saved.used = True
        if not self.cuda:
            return saved.host
        if saved.gpu is None:
            self._fetch(saved)
        assert saved.gpu is not None and saved.fetched is not None
        current = torch.cuda.current_stream(self.device)
        current.wait_event(saved.fetched)
        tensor, saved.gpu = saved.gpu, None
        tensor.record_stream(current)  # allocated on the side stream, used on this one
        before, saved.before = saved.before, None
        if before is not None and not before.used and before.gpu is None:
            self._fetch(before)  # backward's next layer: its input comes back meanwhile
        return tensor

    def _fetch(self, saved: _Saved) -> None:
        assert self.stream is not None
        with torch.cuda.stream(self.stream):  # after the copy out: the same stream
            saved.gpu = saved.host.to(self.device, non_blocking=True)
            saved.fetched = self.stream.record_event()


def install(model: Any, device: torch.device | str) -> Offloader | None:
    """Route every checkpointed layer of `model` through one Offloader; None when no
    layer has checkpointing on (turn it on first)."""
    offloader = Offloader(device)
    layers = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(
            module, "_gradient_checkpointing_func"
        ):
            module._gradient_checkpointing_func = offloader.checkpoint
            layers += 1
    return offloader if layers else None

"""Serving many adapters from Python: the C++ adapter pool (``torchlora._C.serve.AdapterPool``:
slots, LRU host and device tiers, reference counts, per-request scale) under a torchlora model
whose LoRA layers read the pool's slots, so one forward serves rows of different adapters.

    server = peft_model.serve_adapters(max_loras=8, max_lora_rank=16)
    server.load("support", "adapters/support")
    outputs = server.forward(input_ids, ["support", None, "support"])   # one output per row
    future = server.submit(input_ids[0], "support", scale=0.5)          # batched in the background
    server.close()

Requests without an adapter (``None``, ``""`` or ``"__base__"``) get the base model.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ._native import _C
from .nn import LoraConv2d, LoraEmbedding, LoraLayer
from .nn.adapter_stack import AdapterStack
from .nn.linear import linear_features
from .nn.layer import BASE_ADAPTER_NAME

__all__ = ["AdapterServer", "Inputs"]

# one batch's inputs: a tensor or a mapping of keyword tensors, batch first
Inputs = Union[Tensor, Mapping[str, Tensor]]


def _serve_module():
    serve = getattr(_C, "serve", None)
    if serve is None:
        raise RuntimeError("this build of torchlora has no adapter pool (torchlora._C.serve)")
    return serve


class AdapterServer:
    """Adapters held in an adapter pool and served through ``model``'s torchlora LoRA layers.

    ``model``: a torchlora PeftModel / LoraModel or any module with torchlora LoRA layers (they
    define the target layers; its own adapters are not used while serving). ``max_loras`` slots
    of rank up to ``max_lora_rank``, a host tier of ``max_cpu_loras`` (0: ``max_loras``),
    ``lora_bias`` stacks, ``dtype`` / ``device`` of the slots (default: the base weights').
    :meth:`submit` batches requests in a background thread, up to ``max_batch_size`` requests or
    ``max_wait_ms`` after the first one. ``output`` picks the tensor of the model's output that
    is split into rows (default: the output itself when it is a tensor, else its first tensor,
    e.g. ``logits``). Thread-safe; forwards run one at a time.
    """

    def __init__(self, model: nn.Module, max_loras: int = 8, max_lora_rank: int = 16, max_cpu_loras: int = 0, *,
                 lora_bias: bool = False, max_batch_size: int = 32, max_wait_ms: float = 2.0,
                 dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None,
                 output: Optional[Callable[[Any], Tensor]] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value, least in (("max_batch_size", max_batch_size, 1), ("max_loras", max_loras, 1),
                                   ("max_lora_rank", max_lora_rank, 1), ("max_cpu_loras", max_cpu_loras, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        self.model = model
        self.layers = _lora_layers(model)
        weight = self.layers[0][1].get_base_layer().weight
        serve = _serve_module()
        targets = [serve.TargetLayer(name, *_target_of(layer)) for name, layer in self.layers]
        self.pool = serve.AdapterPool(targets, max_loras, max_lora_rank, max_cpu_loras, lora_bias,
                                      dtype or weight.dtype, device if device is not None else weight.device)
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self._output = output or _first_tensor
        self._forward_lock = threading.Lock()
        self._queue: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._worker: Optional[threading.Thread] = None

    # ---- adapters ---------------------------------------------------------------------------
    def load(self, name: str, folder: str) -> None:
        """Read the PEFT folder and register it as ``name`` (replacing one of that name; batches
        running keep the old one). AdapterRejectedError (a ValueError) says what does not fit."""
        self.pool.load(name, str(folder))

    def unload(self, name: str) -> bool:
        """Forget ``name`` (running batches finish with it); whether it was there."""
        return self.pool.unload(name)

    def adapters(self) -> list[str]:
        """The registered adapters' names."""
        return list(self.pool.adapter_names())

    def status(self) -> list[dict]:
        return self.pool.status()

    def stats(self) -> dict:
        return self.pool.stats()

    # ---- one forward ------------------------------------------------------------------------
    def forward(self, inputs: Inputs, adapters: Sequence[Optional[str]],
                scales: Optional[Sequence[float]] = None) -> list[Tensor]:
        """Row i of ``inputs`` through ``adapters[i]`` with its scale ``scales[i]`` (default 1):
        one output per row. One forward serves every adapter of the batch; a batch with more
        distinct adapters than the pool's slots (or one adapter at two scales) is split into as
        few forwards as the pool allows. KeyError for an unknown adapter."""
        batch = _batch_size(inputs)
        requests = _requests(adapters, scales, batch)
        for name, _ in requests:
            if name and not self.pool.has_adapter(name):
                raise _serve_module().AdapterNotFoundError(f"unknown adapter {name!r}")
        outputs: list[Optional[Tensor]] = [None] * batch
        for rows in self._split(requests):
            part = inputs if len(rows) == batch else _select(inputs, rows)
            for row, out in zip(rows, self._run(part, [requests[i] for i in rows])):
                outputs[row] = out
        return outputs  # type: ignore[return-value]

    def _split(self, requests: list[tuple[str, float]]) -> list[list[int]]:
        """Groups of rows that each fit one lease (and max_batch_size), in row order."""
        groups: list[list[int]] = []
        for row, request in enumerate(requests):
            for group in groups:
                if len(group) < self.max_batch_size and self.pool.fits([requests[i] for i in group], request):
                    group.append(row)
                    break
            else:
                groups.append([row])
        return groups

    def _run(self, inputs: Inputs, requests: list[tuple[str, float]]) -> list[Tensor]:
        with self._forward_lock, self.pool.acquire(requests) as lease, self._bound(lease), torch.no_grad():
            out = self.model(**inputs) if isinstance(inputs, Mapping) else self.model(inputs)
            out = self._output(out)
            if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != len(requests):
                raise ValueError(f"the model's output must be a tensor with one row per request ({len(requests)}), "
                                 f"got {type(out).__name__}{tuple(out.shape) if isinstance(out, Tensor) else ''}")
            return list(out.unbind(0))

    @contextlib.contextmanager
    def _bound(self, lease) -> Iterator[None]:
        """The model's LoRA layers read the pool's slots (scale = slot scale * request scale)."""
        slots = lease.sample_slots
        no_dropout = (0.0,) * self.pool.max_loras
        try:
            for name, layer in self.layers:
                lora_A, lora_B, lora_bias, scale = self.pool.stacks(name)
                stack = AdapterStack((), {}, lora_A, lora_B, lora_bias, scale * lease.slot_scale, no_dropout)
                layer.bind_slots(stack, slots)
            yield
        finally:
            for _, layer in self.layers:
                layer.unbind_slots()

    # ---- batching queue ---------------------------------------------------------------------
    def submit(self, input: Inputs, adapter: Optional[str] = None, scale: float = 1.0) -> "Future[Tensor]":
        """Queue one request (``input`` without a batch dim: a tensor or a mapping of keyword
        tensors); its future gets that row's output. Requests with equal input shapes are batched
        into one forward in a background thread. KeyError at once for an unknown adapter."""
        request = _requests([adapter], [scale], 1)[0]
        if request[0] and not self.pool.has_adapter(request[0]):
            raise _serve_module().AdapterNotFoundError(f"unknown adapter {request[0]!r}")
        if not isinstance(input, (Tensor, Mapping)):
            raise TypeError(f"input must be a tensor or a mapping of tensors, got {type(input).__name__}")
        item = _Request(input, request, Future())
        with self._wake:
            if self._closed:
                raise RuntimeError("the server is closed")
            self._queue.append(item)
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve_queue, name="torchlora-batcher", daemon=True)
                self._worker.start()
            self._wake.notify()
        return item.future

    def _serve_queue(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                inputs = _stack_inputs([item.input for item in batch])
                outputs = self._run(inputs, [item.request for item in batch])
            except BaseException as error:  # every request of the batch learns why
                for item in batch:
                    item.future.set_exception(error)
                continue
            for item, out in zip(batch, outputs):
                item.future.set_result(out)

    def _next_batch(self) -> Optional[list["_Request"]]:
        """Wait for requests, then up to max_wait for more; take those that fit one forward."""
        with self._wake:
            while not self._queue:
                if self._closed:
                    return None
                self._wake.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self._queue) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            first = self._queue.popleft()
            batch, rest = [first], deque()
            shape = _shape_key(first.input)
            while self._queue:
                item = self._queue.popleft()
                if (len(batch) < self.max_batch_size and _shape_key(item.input) == shape
                        and self.pool.fits([b.request for b in batch], item.request)):
                    batch.append(item)
                else:
                    rest.append(item)
            self._queue.extendleft(reversed(rest))
        batch = [item for item in batch if item.future.set_running_or_notify_cancel()]
        return batch or self._next_batch()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop taking requests; queued ones are served before the worker stops."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def __enter__(self) -> "AdapterServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Request:
    __slots__ = ("input", "request", "future")

    def __init__(self, input: Inputs, request: tuple[str, float], future: Future) -> None:
        self.input, self.request, self.future = input, request, future


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(module path in the base model, layer) of every torchlora LoRA layer."""
    root = model
    for _ in range(3):  # PeftModel -> LoraModel -> the base model: PEFT's key paths
        get_base_model = getattr(root, "get_base_model", None)
        from .peft_model import PeftModel
        from .tuners import LoraModel

        if not isinstance(root, (PeftModel, LoraModel)):
            break
        root = get_base_model() if callable(get_base_model) else root.model
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("the model has no torchlora LoRA layers to serve adapters through; make it with "
                         "torchlora.get_peft_model (the config's target_modules are the served layers)")
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"LoRA layer {name!r} has merged adapters; unmerge them before serving")
    return layers


def _target_of(layer: LoraLayer) -> tuple[str, list[int], int]:
    """(kind, base weight shape as the pool stacks it, groups) of a LoRA layer."""
    base = layer.get_base_layer()
    if isinstance(layer, LoraEmbedding):
        return "embedding", list(base.weight.shape), 1
    if isinstance(layer, LoraConv2d):
        return "conv2d", list(base.weight.shape), int(base.groups)
    in_features, out_features, _ = linear_features(base)
    return "linear", [out_features, in_features], 1


def _requests(adapters: Any, scales: Any, batch: int) -> list[tuple[str, float]]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be a list with one adapter name (or None) per row, got {adapters!r}")
    if len(adapters) != batch:
        raise ValueError(f"adapters has {len(adapters)} entries for a batch of {batch}")
    if scales is None:
        scales = [1.0] * batch
    elif isinstance(scales, (str, Tensor)) or not isinstance(scales, Sequence) or len(scales) != batch:
        raise ValueError(f"scales must be a list with one number per row ({batch}), got {scales!r}")
    requests = []
    for name, scale in zip(adapters, scales):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"adapter names must be strings or None, got {name!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scales must be numbers, got {scale!r}")
        requests.append(("" if name in (None, BASE_ADAPTER_NAME) else name, float(scale)))
    return requests


def _batch_size(inputs: Any) -> int:
    tensors = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    if not tensors or not all(isinstance(t, Tensor) and t.dim() > 0 for t in tensors):
        raise TypeError("inputs must be a batch-first tensor or a mapping of batch-first tensors")
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"inputs have different batch sizes {sorted(sizes)}")
    return sizes.pop()


def _select(inputs: Inputs, rows: list[int]) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v[rows] for k, v in inputs.items()}
    return inputs[rows]


def _shape_key(input: Inputs) -> tuple:
    if isinstance(input, Mapping):
        return tuple((k, tuple(v.shape), v.dtype) for k, v in input.items())
    return (tuple(input.shape), input.dtype)


def _stack_inputs(inputs: list[Inputs]) -> Inputs:
    if isinstance(inputs[0], Mapping):
        return {k: torch.stack([i[k] for i in inputs]) for k in inputs[0]}
    return torch.stack(inputs)


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"the model returns a {type(out).__name__} without a tensor; pass output= to pick one")

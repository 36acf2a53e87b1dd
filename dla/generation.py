"""``dla.generate``: greedy decoding whose one-token step can run as a captured CUDA graph.

The prompt runs through the model's forward (the chunked path), then every new token is one
call of the whole model on ``[B, 1]`` tokens. On CUDA that call is captured once as a CUDA graph,
as ``mamba_ssm``'s generation does, and replayed per token: the inputs and the next tokens live
in static buffers, and the cache's tensors are updated in place (a tensor the step replaces is
copied back into the buffer it replaced, inside the graph). The step reads no value on the host:
the prompt's call checks its inputs as every call of the model does, the steps skip the checks
that read values (``validate=False``), and the one check a step could fail on its own -- a
sequence running past the level labels or fenwick capacity that ``max_position_embeddings``
fixes -- is made once, for the longest sequence, before the prompt. A step that cannot be
captured -- one that reads a device value on the host, or whose cache tensors change shape or
dtype -- decodes eagerly instead, with a one-line warning naming why. Either way the tokens are
those of ``model.generate(input_ids, max_new_tokens=..., do_sample=False)``.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import torch

from dla.layers import KVCache
from dla.models import DLACache, DLAForCausalLM

# with an end-of-sequence token, check whether every sequence has finished this often: each check
# makes the host wait for the device
EOS_CHECK_EVERY = 16
_PACKAGE = Path(__file__).resolve().parent
# largest difference between a replay's logits and the eager step's, relative to their largest
# value: bf16 rounding of differently ordered sums stays far below it, a frozen position does not
CHECK_TOLERANCE = 2e-2


class NotCapturable(RuntimeError):
    """The one-token step cannot be replayed as a CUDA graph; the message says why."""


@torch.no_grad()
def generate(model: DLAForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, use_cuda_graph: bool | None = None) -> torch.Tensor:
    """Greedy decoding: ``[B, T]`` prompt ids -> ``[B, T + n]`` (prompt and new tokens, ``n <=
    max_new_tokens``), the tokens ``model.generate(..., do_sample=False)`` returns.

    ``attention_mask [B, T]`` marks padding (left or right); without it, the padding is inferred
    from the model's ``pad_token_id`` as ``generate()`` does. The model's ``eos_token_id`` ends a
    sequence (it is then filled with ``pad_token_id``) and decoding stops once all have ended. The
    generation config's sampling and logits-processor settings are not read: this is greedy search.
    ``use_cuda_graph`` (default: whether the model is on CUDA) captures the one-token step once
    and replays it per token.
    """
    decoding = start_decoding(model, input_ids, max_new_tokens, attention_mask=attention_mask,
                              use_cuda_graph=use_cuda_graph)
    token, step = decoding.token, decoding.step
    eos, pad = _special_tokens(model, token.device)
    tokens, alive, unfinished = [], [], torch.ones_like(token, dtype=torch.bool)
    for i in range(max_new_tokens):
        if eos is not None:
            token = torch.where(unfinished, token, pad)
            unfinished = unfinished & ~torch.isin(token, eos)
            alive.append(unfinished.any())
        tokens.append(token)
        if i + 1 == max_new_tokens or (eos is not None and (i + 1) % EOS_CHECK_EVERY == 0 and not bool(alive[-1])):
            break
        token = step(token)
    new = torch.stack(tokens, 1)
    if eos is not None:
        # generate() stops right after the token at which the last sequence finished
        ended = (~torch.stack(alive)).nonzero()
        if ended.numel():
            new = new[:, : int(ended[0, 0]) + 1]
    return torch.cat([input_ids.long(), new], 1)


@dataclass
class Decoding:
    """Where :func:`generate` stands after the prompt: each sequence's first new token ``[B]``, the
    one-token step (``step(token) -> next token``, :class:`GraphStep` or :class:`EagerStep`) and
    the cache it advances. ``graph``: whether the step replays a CUDA graph."""

    token: torch.Tensor
    step: EagerStep | GraphStep
    cache: DLACache
    graph: bool


@torch.no_grad()
def start_decoding(model: DLAForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, *,
                   attention_mask: torch.Tensor | None = None, use_cuda_graph: bool | None = None) -> Decoding:
    """The arguments of :func:`generate`, checked, and everything it does before its loop: the
    prompt through the model into a new cache, and the one-token step (captured where it can
    be). Benchmarks time ``step`` to time what :func:`generate` runs per token."""
    if not isinstance(model, DLAForCausalLM):
        raise TypeError(f"model must be a dla.DLAForCausalLM, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32,
                                                                                                    torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {getattr(input_ids, 'shape', input_ids)!r}")
    B, T = input_ids.shape
    if B < 1 or T < 1:
        raise ValueError(f"input_ids must hold at least one token per sequence, got shape {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    device = model.lm_head.weight.device
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}], got {getattr(attention_mask, 'shape', None)}")
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    elif not isinstance(use_cuda_graph, bool):
        raise TypeError(f"use_cuda_graph must be None or a bool, got {use_cuda_graph!r}")
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph needs a model on a CUDA device, this one is on {device}")
    if model.config.mixer != "attention":
        # the longest a sequence gets through the model: the prompt and every new token but the last
        model.config.policy_config().check_length(T + max_new_tokens - 1)
    input_ids = input_ids.long()
    if attention_mask is None:
        attention_mask = _infer_mask(input_ids, *_special_tokens(model, device))

    # the longest the sequences get: the prompt, then every new token but the last is fed back
    cache = DLACache(model.config, max_length=T + max_new_tokens)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1)
    if use_cuda_graph and max_new_tokens > 1:
        try:
            step = GraphStep(model, cache, B)
            step.capture()
            return Decoding(token, step, cache, graph=True)
        except NotCapturable as why:
            warnings.warn(f"dla.generate: decoding eagerly, the one-token step cannot be a CUDA graph: {why}",
                          stacklevel=3)
    return Decoding(token, EagerStep(model, cache), cache, graph=False)


def _special_tokens(model, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(eos ids, pad id)`` as ``generate()`` resolves them: no pad id -> the first eos id."""
    config = model.generation_config
    eos = config.eos_token_id
    if eos is None:
        return None, None if config.pad_token_id is None else torch.tensor(config.pad_token_id, device=device)
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device)
    pad = eos[0] if config.pad_token_id is None else torch.tensor(config.pad_token_id, device=device)
    return eos, pad


def _infer_mask(input_ids, eos, pad) -> torch.Tensor | None:
    """The padding mask ``generate()`` infers: pad tokens, unless the pad id is also an eos id."""
    if pad is None or (eos is not None and bool(torch.isin(pad, eos))):
        return None
    is_pad = input_ids == pad
    return (~is_pad).long() if bool(is_pad.any()) else None


class EagerStep:
    """One token per sequence through the model: ``[B]`` ids -> the ``[B]`` greedy next ids."""

    def __init__(self, model, cache: DLACache):
        self.model, self.cache = model, cache

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token[:, None], cache=self.cache, use_cache=True, logits_to_keep=1, validate=False)
        return out.logits[:, -1].argmax(-1)


class GraphStep:
    """The one-token step with static input and output buffers and the cache updated in place.

    :meth:`capture` runs it eagerly on a side stream (warm-up: kernels compile, and a second run
    under ``torch.cuda.set_sync_debug_mode("error")`` proves it never waits for the device),
    captures it, checks that two replays give the logits of two eager steps, and restores the
    cache after every trial so that no token is decoded twice. ``capture(graph=False)`` does
    all of that but the capture and runs the static step eagerly: the same buffers and copies on
    any device (how the tests run it on a CPU).
    """

    def __init__(self, model, cache: DLACache, batch: int):
        self.model, self.cache = model, cache
        device = model.lm_head.weight.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph = self.entries = self.slots = self.buffers = None
        self.logits = self.next = None

    def capture(self, graph: bool = True) -> None:
        if graph:
            # the prompt's pass leaves its freed blocks cached for the default stream; the trial steps
            # run on a side stream and the graph allocates from a pool of its own, which cannot use them
            torch.cuda.empty_cache()
        for layer in self.cache.layers:
            layer.make_static()
        # the objects that hold the cache's tensors, as they are now: a step replaces some of them,
        # and a replay runs no Python, so after every trial the cache points at these again
        self.entries = cache_entries(self.cache)
        self.slots = [(holder, key) for holder, key, value in self.entries if isinstance(value, torch.Tensor)]
        self.buffers = [_get(*slot) for slot in self.slots]
        saved = self._save()
        try:
            if graph:
                self._capture_graph(saved)
            self._check(saved)
        except NotCapturable:
            self._restore(saved)
            for layer in self.cache.layers:
                if isinstance(layer, KVCache):
                    layer.static, layer.cursor = False, None
            raise

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(token[:, None])
        if self.graph is None:
            return self._step()[1].clone()
        self.graph.replay()
        self.cache.advance(1)
        return self.next.clone()

    def _step(self):
        """The step the graph holds: the model, the greedy choice, the cache written back in place."""
        logits = self.model(input_ids=self.ids, cache=self.cache, use_cache=True, logits_to_keep=1,
                            validate=False).logits[:, -1]
        slots = [(holder, key) for holder, key, value in cache_entries(self.cache) if isinstance(value, torch.Tensor)]
        if len(slots) != len(self.slots):
            raise NotCapturable("the step changes which tensors the cache holds")
        for slot, buffer in zip(slots, self.buffers):
            value = _get(*slot)
            if value is buffer:
                continue
            if value.shape != buffer.shape or value.dtype != buffer.dtype:
                raise NotCapturable(f"the step turns a cache tensor {tuple(buffer.shape)} {buffer.dtype} into "
                                    f"{tuple(value.shape)} {value.dtype}")
            buffer.copy_(value)
            _set(*slot, buffer)
        return logits, logits.argmax(-1)

    def _capture_graph(self, saved) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                self._step()  # compiles and autotunes the kernels
                self._restore(saved)
                try:
                    with _sync_debug("error"):
                        self._step()
                except RuntimeError as error:
                    if isinstance(error, NotCapturable):
                        raise
                    raise NotCapturable(f"it synchronises with the host at {_where(error)}") from error
                self._restore(saved)
        finally:  # the side stream's work is done before anything else touches the cache
            torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits, self.next = self._step()
        except RuntimeError as error:
            if isinstance(error, NotCapturable):
                raise
            raise NotCapturable(f"capture failed at {_where(error)}: {str(error).splitlines()[0]}") from error
        self._restore(saved)

    def _check(self, saved) -> None:
        """Two eager steps and two replays from the same cache must agree: a value the step takes
        from Python is frozen in the graph, and the second replay would then differ. They agree to
        rounding (a captured matrix product may pick another algorithm), not bit for bit."""
        self._step()
        eager = self._step()[0].float()
        self._restore(saved)
        for _ in range(2):
            if self.graph is None:
                replayed = self._step()[0]
            else:
                self.graph.replay()
                self.cache.advance(1)
                replayed = self.logits
        error = (eager - replayed.float()).abs().max() / eager.abs().max().clamp(min=1e-6)
        if not error <= CHECK_TOLERANCE:  # NaN fails too
            raise NotCapturable(f"a replay's logits differ from the eager step's by {float(error):.2g} of their "
                                "largest value (the step reads a value from Python)")
        self._restore(saved)

    def _save(self):
        """What a trial step changes: the cache's tensors (not the attention keys and values: a step
        only writes the slot at the cursor, which the real step rewrites) and its host counters. The
        copies stay on the device where it has room for them (:func:`trial_copy_device`)."""
        kept = [not (isinstance(holder, KVCache) and key in ("keys", "values")) for holder, key in self.slots]
        device = self.buffers[0].device if self.buffers else torch.device("cpu")
        nbytes = sum(b.numel() * b.element_size() for b, keep in zip(self.buffers, kept) if keep)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        where = trial_copy_device(device, nbytes, free)
        keep = [buffer.to(where, copy=True) if keep else None for buffer, keep in zip(self.buffers, kept)]
        return keep, self.cache.seen_tokens, [getattr(layer, "size", 0) for layer in self.cache.layers]

    def _restore(self, saved) -> None:
        tensors, seen, sizes = saved
        for holder, key, value in self.entries:
            _set(holder, key, value)
        for buffer, value in zip(self.buffers, tensors):
            if value is not None:
                buffer.copy_(value)
        self.cache.seen_tokens = seen
        for layer, size in zip(self.cache.layers, sizes):
            if isinstance(layer, KVCache):
                layer.size = size


def trial_copy_device(device: torch.device, nbytes: int, free_bytes: int | None) -> torch.device:
    """Where :class:`GraphStep` keeps the copy of the cache it restores after each trial step: on
    the device when ``free_bytes`` (None: unlimited, as on a CPU) holds it twice over (the copy, and
    room for a step that writes new states), else in host memory, slower to restore but never the
    reason a large batch runs out of device memory (at batch 64, a 12-layer DLA-Mamba-2 cache of
    30 slots is 18 GB)."""
    return device if free_bytes is None or 2 * nbytes <= free_bytes else torch.device("cpu")


def cache_entries(cache: DLACache) -> list[tuple[object, object, object]]:
    """``(holder, key, value)`` for every tensor the cache holds and every object on the way to
    one (dataclasses, dicts), in a fixed order, walked from ``cache.layers``."""
    entries = []

    def walk(holder, items):
        for key, value in items:
            if isinstance(value, torch.Tensor):
                entries.append((holder, key, value))
            elif is_dataclass(value):
                entries.append((holder, key, value))
                walk(value, [(f.name, getattr(value, f.name)) for f in fields(value)])
            elif isinstance(value, dict):
                entries.append((holder, key, value))
                walk(value, list(value.items()))

    walk(cache.layers, list(enumerate(cache.layers)))
    return entries


def _get(holder, key):
    return holder[key] if isinstance(holder, (list, dict)) else getattr(holder, key)


def _set(holder, key, value) -> None:
    if isinstance(holder, (list, dict)):
        holder[key] = value
    else:
        setattr(holder, key, value)


@contextlib.contextmanager
def _sync_debug(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    _set_sync_debug_mode(mode)
    try:
        yield
    finally:
        _set_sync_debug_mode(previous)


def _set_sync_debug_mode(mode) -> None:
    # torch warns once that the mode is a prototype; the check is internal to generate(), so the
    # warning would only tell its callers about a torch feature they did not ask for
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype feature")
        torch.cuda.set_sync_debug_mode(mode)


def _where(error: BaseException) -> str:
    """``file:line`` of the innermost frame of this package in the error's traceback."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if Path(f.filename).resolve().is_relative_to(_PACKAGE)]
    if not frames:
        return "an unknown place"
    frame = frames[-1]
    return f"{Path(frame.filename).resolve().relative_to(_PACKAGE.parent)}:{frame.lineno} ({frame.line})"

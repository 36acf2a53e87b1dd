"""``DLAModel`` and ``DLAForCausalLM``: pre-norm decoder blocks around a DLA (or attention) token mixer.

Padding never reaches a mixer: a batch whose ``attention_mask`` has zeros among the current
tokens is packed into one varlen sequence per row (``cu_seqlens``), run, and scattered back, so a
padded batch, the same sequences packed, and each sequence alone give the same outputs. Positions
(rotary, schedules) count each sequence's own tokens; ``position_ids`` are not taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from dla.layers import (
    Attention,
    DLAGatedDeltaNet,
    DLAMamba2,
    GatedRMSNorm,
    LambdaProjection,
    RouterScore,
    ShortConvolution,
)
from dla.schedule.replay import with_walk_replay

from .cache_dla import DLACache
from .configuration_dla import DLAConfig

# transformers 5.x renamed the cache argument and output field `past_key_values` to `cache`; use
# whichever this version has, and accept both as arguments (named in the signatures: generate()
# refuses a keyword the forward does not name)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class Unpadded:
    """The real tokens of a padded ``[B, T]`` batch, packed as one varlen sequence per row."""

    indices: torch.Tensor  # [n] positions of the real tokens in the flattened [B * T] batch
    cu_seqlens: torch.Tensor  # [B + 1]
    batch: int
    length: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Unpadded:
        mask = mask.bool()
        cu_seqlens = F.pad(mask.sum(1).cumsum(0), (1, 0))
        return cls(mask.flatten().nonzero().squeeze(1), cu_seqlens, *mask.shape)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[1, n, ...]``."""
        return x.flatten(0, 1)[self.indices].unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, n, ...]`` -> ``[B, T, ...]``, zeros at the padding."""
        out = x.new_zeros((self.batch * self.length,) + x.shape[2:]).index_copy(0, self.indices, x[0])
        return out.unflatten(0, (self.batch, self.length))


def check_input_ids(input_ids, vocab_size: int, values: bool = True) -> None:
    """``ValueError``/``TypeError`` naming ``input_ids`` unless it is a ``[B, T]`` integer tensor, T >= 1,
    of token ids in ``[0, vocab_size)`` (an id outside would index past the embeddings: an
    ``IndexError`` on the CPU, a device-side assert on a GPU). ``values=False`` checks the type and
    shape only: the values are read on the host, which waits for the device."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T] (a batch of sequences; one sequence is input_ids[None]), got "
                         f"shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has no tokens (T = 0), shape {tuple(input_ids.shape)}")
    if values and input_ids.numel():
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one read of the device
        if low < 0 or high >= vocab_size:
            raise ValueError(f"input_ids must be token ids in [0, vocab_size = {vocab_size}), got values in "
                             f"[{low}, {high}]")


def build_mixer(config: DLAConfig) -> nn.Module:
    if config.mixer == "attention":
        return Attention(config.hidden_size, config.num_heads, config.head_dim, config.rope_theta)
    common = dict(conv_size=config.conv_size, policy=config.policy_config(), chunk_size=config.chunk_size,
                  norm_eps=config.norm_eps)
    if config.mixer == "mamba2":
        return DLAMamba2(config.hidden_size, config.head_dim, config.state_size, config.expand, config.n_groups,
                         **common)
    return DLAGatedDeltaNet(config.hidden_size, config.num_heads, config.head_dim, config.expand_v, **common)


class DLAMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DLABlock(GradientCheckpointingLayer):
    """``x + mixer(RMSNorm(x))``, then ``x + MLP(RMSNorm(x))``.

    With activation checkpointing on (HF's ``model.activation_checkpointing_enable()``, formerly
    ``gradient_checkpointing_enable()``, or ``DLAConfig(gradient_checkpointing=True)``), a block in
    training keeps only its input and recomputes the rest in the backward pass
    (``torch.utils.checkpoint``, non-reentrant). The ``dynamic`` policy's schedule is planned once per
    step: the forward keeps what its walk decided (per token and per slot, not the open states) and
    the recomputation replays it instead of walking again (:mod:`dla.schedule.replay`), so the
    schedule, the soft gates and the gradients are bit for bit those of the first pass. Reentrant
    checkpointing (``use_reentrant=True``) takes no ``context_fn`` and plans again, with the same
    result."""

    def __init__(self, config: DLAConfig):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = build_mixer(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = DLAMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cu_seqlens=None, cache=None, scores=None, validate=True):
        extra = {} if scores is None else {"scores": scores}
        if not validate and not isinstance(self.mixer, Attention):  # attention checks no values
            extra["validate"] = False
        x = x + self.mixer(self.mixer_norm(x), cu_seqlens=cu_seqlens, cache=cache, **extra)
        return x + self.mlp(self.mlp_norm(x))


class DLAPreTrainedModel(PreTrainedModel):
    config: DLAConfig
    config_class = DLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["DLABlock"]
    supports_gradient_checkpointing = True
    # checkpoints from before the learned threshold τ keep the configured one
    _keys_to_ignore_on_load_missing = [r"mixer\.threshold$"]

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **kwargs):
        # every Hugging Face switch (activation_checkpointing_enable, gradient_checkpointing_enable, the
        # config flag) hands the blocks their checkpoint function here: give it the walk replay
        super()._set_gradient_checkpointing(enable, with_walk_replay(gradient_checkpointing_func), **kwargs)

    def _init_weights(self, module):
        """Linear and embedding weights N(0, initializer_range²); everything the layers initialise
        themselves (convolutions, norms, λ, the SSM/gate parameters) as the layers do. Children are
        initialised before their parents, so a layer's own rule wins."""
        if isinstance(module, ShortConvolution):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, (nn.RMSNorm, GatedRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, (LambdaProjection, RouterScore, DLAMamba2, DLAGatedDeltaNet)):
            module.reset_parameters()


class DLAModel(DLAPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` :class:`DLABlock` and a final RMSNorm."""

    def __init__(self, config: DLAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DLABlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None, use_cache=None,
                output_hidden_states=None, return_dict=None, cu_seqlens=None, scores=None, past_key_values=None,
                validate=True, **kwargs):
        """``input_ids [B, T]`` (or ``inputs_embeds``) -> ``last_hidden_state [B, T, hidden]``.

        - ``attention_mask [B, T_past + T]`` (1 = token, 0 = padding, any pattern): the last ``T``
          columns mark the current tokens; rows are packed around their padding.
        - ``cu_seqlens``: ``B = 1`` and the sequences are packed (instead of ``attention_mask``).
        - ``cache`` (or ``past_key_values``, its older name): a :class:`DLACache` to continue, one row
          per sequence; with ``use_cache`` and no cache a new one is made (``use_cache`` defaults to
          ``config.use_cache`` outside training).
        - ``scores``: information scores for ``score="external"``, ``[B, T, heads]`` for every layer
          or a sequence with one per layer.
        - ``validate=False``: skip the checks that read tensor values on the host (the ids' range, the
          layers' NaN/Inf and schedule checks): each one waits for a GPU and none can be in a CUDA
          graph. :func:`dla.generate` and ``generate()`` pass it for their decoding steps, after the
          prompt's call has checked everything.
        """
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = cfg.use_cache and not self.training
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            # a call that continues a cache is a decoding step, fed the ids the model chose: reading
            # them on the host would make every token wait for the device (and break a CUDA graph)
            check_input_ids(input_ids, cfg.vocab_size, values=validate and (cache is None or not cache.is_initialized))
        elif not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be a [B, T, hidden_size = {cfg.hidden_size}] tensor, got "
                             f"{tuple(getattr(inputs_embeds, 'shape', ())) or type(inputs_embeds).__name__}")
        elif inputs_embeds.shape[1] == 0:
            raise ValueError("inputs_embeds has no tokens (T = 0)")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        unpadded = None
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("pass either attention_mask (padded batch) or cu_seqlens (packed batch), not both")
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be [B, T_past + T] with B = {B}, T = {T}, "
                                 f"got {tuple(attention_mask.shape)}")
            current = attention_mask[:, -T:].bool()
            if not current.all():
                unpadded = Unpadded.from_mask(current)
                cu_seqlens = unpadded.cu_seqlens
        layer_scores = self._layer_scores(scores, unpadded)
        if unpadded is not None:
            x = unpadded.pack(x)
        if use_cache and cache is None:
            cache = DLACache(cfg)
        hidden_states = []
        for i, block in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(x if unpadded is None else unpadded.unpack(x))
            layer_cache = None if cache is None else cache.layers[i]
            x = block(x, cu_seqlens=cu_seqlens, cache=layer_cache, scores=layer_scores[i], validate=validate)
        x = self.norm(x)
        if unpadded is not None:
            x = unpadded.unpack(x)
        if cache is not None:
            cache.seen_tokens += T
        output = BaseModelOutputWithPast(last_hidden_state=x, hidden_states=(*hidden_states, x)
                                         if output_hidden_states else None, **{CACHE_FIELD: cache})
        return output if return_dict is not False else output.to_tuple()

    def _layer_scores(self, scores, unpadded: Unpadded | None) -> list:
        """One ``scores`` tensor (or None) per layer, packed like the tokens."""
        cfg = self.config
        n = cfg.num_hidden_layers
        if scores is None:
            return [None] * n
        if cfg.mixer == "attention" or cfg.policy != "dynamic" or cfg.score != "external":
            raise ValueError("scores are only used by DLA mixers with policy='dynamic' and score='external'")
        per_layer = list(scores) if isinstance(scores, (list, tuple)) else [scores] * n
        if len(per_layer) != n:
            raise ValueError(f"scores must be one tensor or one per layer ({n}), got {len(per_layer)}")
        return per_layer if unpadded is None else [unpadded.pack(s) for s in per_layer]


class DLAForCausalLM(DLAPreTrainedModel, GenerationMixin):
    """:class:`DLAModel` with a language-modelling head (tied to the embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DLAConfig):
        super().__init__(config)
        self.model = DLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache: the first forward makes a DLACache
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() knows how long its sequences can get: an attention cache preallocates that
        # many slots instead of growing while it decodes
        if model_kwargs.get(CACHE_FIELD) is None and generation_config.use_cache is not False:
            max_length = kwargs.get("max_cache_length", args[-1] if args else None)
            model_kwargs[CACHE_FIELD] = DLACache(self.config, max_length=max_length if isinstance(max_length, int)
                                                 and max_length > 0 else None)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache = inputs.get(CACHE_FIELD)
        if isinstance(cache, DLACache) and cache.is_initialized:
            # after the prompt, generate() marks every new token as real, so the layers need no mask;
            # reading it would make the host wait for the device at every token
            inputs.pop("attention_mask", None)
            # a decoding step feeds a token the model chose, to states the prompt's checked call made:
            # it skips the checks that read values and so runs the layers' one-token step, as
            # dla.generate's steps do; the one check a step can fail on its own (a sequence past the
            # fenwick capacity or level labels) is made here, and a step that fails it takes the
            # checked path, which raises its error
            if self.config.policy_config().fits_length(cache.seen_tokens + 1):
                inputs["validate"] = False
        return inputs

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep: int = 0, output_hidden_states=None, return_dict=None, cu_seqlens=None,
                scores=None, logits_mask=None, past_key_values=None, **kwargs):
        """As :meth:`DLAModel.forward`, plus ``labels [B, T]`` (next-token cross-entropy, -100 ignored;
        with ``cu_seqlens`` no sequence predicts the next one's first token) and ``logits_to_keep``
        (logits of the last ``logits_to_keep`` positions only; 0 = all). ``logits_mask [B, T]``
        (bool) computes the logits only where it is true, returned flat as ``[N, vocab]``: on
        tasks scored at a few positions (recall) the output layer is then a small part of a step."""
        if logits_mask is not None and (labels is not None or logits_to_keep):
            raise ValueError("logits_mask cannot be combined with labels or logits_to_keep")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states, cu_seqlens=cu_seqlens,
                         scores=scores, past_key_values=past_key_values, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[logits_mask] if logits_mask is not None else hidden[:, -logits_to_keep:])
        loss = None
        if labels is not None:
            shape = tuple(hidden.shape[:2])
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != shape:
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels must be a [B, T] = {list(shape)} tensor like input_ids, got {got}")
            bad = labels[(labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))]
            if bad.numel():
                raise ValueError(f"labels must be token ids in [0, vocab_size = {self.config.vocab_size}) or -100 "
                                 f"(ignored), got {int(bad[0])}")
            targets = labels[:, 1:].clone()
            if cu_seqlens is not None:
                ends = cu_seqlens[1:-1].long() - 1
                targets[0, ends[(ends >= 0) & (ends < targets.shape[1])]] = -100
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten().to(logits.device),
                                   ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        return output if return_dict is not False else output.to_tuple()

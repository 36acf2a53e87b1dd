"""``DLAConfig``: a decoder-only language model whose token mixer is DLA-Mamba-2, DLA-Gated DeltaNet
or (the baseline) rotary softmax attention."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

from dla.layers import PolicyConfig

MIXERS = ("mamba2", "gated_deltanet", "attention")
CHUNK_SIZES = (16, 32, 64, 128)
CONFIG_VERSION = 2  # 2: the paper's dynamic policy (state score, density merging, capacity 30, soft gates)
LEGACY_CAPACITY = 16


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


# keys Hugging Face itself passes to a config (saved in config.json, or by from_pretrained / generate)
HF_KEYS = frozenset((
    "transformers_version", "architectures", "auto_map", "model_type", "dtype", "torch_dtype", "name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "id2label", "label2id", "num_labels", "problem_type", "gradient_checkpointing",
    "attn_implementation", "experts_implementation", "per_layer_config", "rope_scaling", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task", "custom_pipelines",
    "add_cross_attention", "tie_encoder_decoder", "torchscript", "use_bfloat16", "pruned_heads", "tf_legacy_loss",
    "cross_attention_hidden_size", "base_model_tp_plan", "base_model_pp_plan"))


def _check_known_keys(cls, kwargs: dict) -> None:
    """``ValueError`` for a keyword neither ``cls`` nor Hugging Face knows (a misspelt field would
    otherwise be stored and ignored), naming the closest field."""
    import difflib
    import inspect

    from transformers import GenerationConfig

    own = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    known = set(own) | HF_KEYS | set(getattr(PreTrainedConfig, "__dataclass_fields__", ()))
    known |= set(GenerationConfig._get_default_generation_params())
    for key in kwargs:
        if key not in known and not key.startswith("_"):
            close = difflib.get_close_matches(key, own, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown {cls.__name__} argument {key!r}; {hint}the arguments are: {', '.join(own)}")


class DLAConfig(PreTrainedConfig):
    """Configuration of :class:`dla.DLAModel` / :class:`dla.DLAForCausalLM`.

    Blocks are pre-norm: ``x + mixer(RMSNorm(x))``, then ``x + SwiGLU-MLP(RMSNorm(x))``.

    - ``mixer``: ``mamba2``, ``gated_deltanet`` or ``attention``.
    - heads: ``head_dim`` (default 64) is Mamba-2's per-head value width P, Gated DeltaNet's key
      width and attention's head width. ``num_heads`` defaults to ``expand * hidden_size / head_dim``
      for ``mamba2`` (which fixes it) and ``hidden_size / head_dim`` otherwise. ``state_size`` and
      ``n_groups`` are Mamba-2's (B/C width, B/C groups); ``expand_v`` is Gated DeltaNet's value
      expansion; ``conv_size`` the short convolution's kernel.
    - the DLA policy (ignored by ``attention``; see :class:`dla.layers.PolicyConfig`): ``policy``
      (``single``, ``fixed``, ``fenwick``, ``dynamic``), ``capacity`` (``dynamic``: 30),
      ``threshold`` (the initial τ), ``period``, ``max_segment_len``, ``merge`` (``density``,
      ``least_info``, ``oldest``), ``score`` (``state``, ``state_drift``, ``novelty``, ``router``,
      ``external``), ``open_state`` (``decayed``, ``plain``), ``soft_gate`` and ``gate_temperature``
      (training-time soft gates through which τ is learned), ``label_rule``. The defaults are the
      paper's method; the earlier variant is ``score="novelty", merge="least_info", capacity=16``.
      A saved configuration from before the state score (no ``dla_config_version``) loads with the
      settings it was trained with.
      ``max_position_embeddings`` fixes the fenwick capacity and the number of level labels.
    - ``intermediate_size``: the MLP width (default: 8/3 of ``hidden_size`` rounded up to 64).
    - ``chunk_size``: the chunked op's chunk (16, 32, 64 or 128).

    Invalid values raise ``ValueError`` naming the field at construction.
    """

    model_type = "dla"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, mixer: str = "mamba2", vocab_size: int = 32000, hidden_size: int = 768,
                 num_hidden_layers: int = 12, num_heads: int | None = None, head_dim: int = 64, expand: int = 2,
                 state_size: int = 128, n_groups: int = 1, expand_v: float = 2.0, conv_size: int = 4,
                 intermediate_size: int | None = None, norm_eps: float = 1e-5, initializer_range: float = 0.02,
                 rope_theta: float = 10000.0, max_position_embeddings: int = 2048, chunk_size: int = 64,
                 policy: str = "dynamic", capacity: int | None = None, threshold: float | None = None,
                 period: int | None = None, max_segment_len: int | None = None, merge: str = "density",
                 score: str = "state", open_state: str = "decayed", soft_gate: bool = True,
                 gate_temperature: float = 0.1,
                 label_rule: str | None = None, tie_word_embeddings: bool = True, use_cache: bool = True,
                 pad_token_id: int | None = None, bos_token_id: int | None = 1, eos_token_id: int | None = 2,
                 **kwargs):
        _check_known_keys(type(self), kwargs)
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not 0 < norm_eps < math.inf:
            raise ValueError(f"norm_eps must be a finite number > 0, got {norm_eps!r}")
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("head_dim", head_dim), ("expand", expand),
                            ("state_size", state_size), ("n_groups", n_groups), ("conv_size", conv_size),
                            ("max_position_embeddings", max_position_embeddings)):
            _check_positive_int(name, value)
        if num_heads is not None:
            _check_positive_int("num_heads", num_heads)
        if intermediate_size is not None:
            _check_positive_int("intermediate_size", intermediate_size)
        if chunk_size not in CHUNK_SIZES:
            raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")
        if mixer == "mamba2":
            if (expand * hidden_size) % head_dim:
                raise ValueError(f"head_dim ({head_dim}) must divide expand * hidden_size ({expand * hidden_size})")
            derived = expand * hidden_size // head_dim
            if num_heads is not None and num_heads != derived:
                raise ValueError(f"num_heads must be expand * hidden_size / head_dim = {derived} for mixer='mamba2', "
                                 f"got {num_heads}")
            num_heads = derived
            if num_heads % n_groups:
                raise ValueError(f"n_groups ({n_groups}) must divide num_heads ({num_heads})")
        elif num_heads is None:
            if hidden_size % head_dim:
                raise ValueError(f"head_dim ({head_dim}) must divide hidden_size ({hidden_size}) "
                                 "when num_heads is not given")
            num_heads = hidden_size // head_dim
        if mixer == "gated_deltanet" and (head_dim * expand_v != int(head_dim * expand_v) or expand_v <= 0):
            raise ValueError(f"expand_v must make head_dim * expand_v a positive integer, got {expand_v!r}")
        if mixer == "attention" and head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")

        self.mixer = mixer
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_heads, self.head_dim, self.expand = num_heads, head_dim, expand
        self.state_size, self.n_groups, self.expand_v, self.conv_size = state_size, n_groups, expand_v, conv_size
        self.intermediate_size = intermediate_size or 64 * math.ceil(8 * hidden_size / 3 / 64)
        self.norm_eps, self.initializer_range, self.rope_theta = norm_eps, initializer_range, rope_theta
        self.max_position_embeddings, self.chunk_size = max_position_embeddings, chunk_size
        self.policy, self.capacity, self.threshold, self.period = policy, capacity, threshold, period
        self.max_segment_len, self.merge, self.score, self.label_rule = max_segment_len, merge, score, label_rule
        self.open_state, self.soft_gate, self.gate_temperature = open_state, soft_gate, gate_temperature
        self.dla_config_version = CONFIG_VERSION
        self.use_cache = use_cache
        self.policy_config()  # validates the policy fields
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    def policy_config(self) -> PolicyConfig:
        """The resolved schedule options every DLA layer of the model uses."""
        return PolicyConfig(policy=self.policy, capacity=self.capacity, threshold=self.threshold, period=self.period,
                            max_segment_len=self.max_segment_len, merge=self.merge, score=self.score,
                            open_state=self.open_state, soft_gate=self.soft_gate,
                            gate_temperature=self.gate_temperature, label_rule=self.label_rule,
                            max_position_embeddings=self.max_position_embeddings)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved configuration; one written before the paper's state score (no ``dla_config_version``)
        named its score, merge rule and threshold but left the capacity (then 16 for ``dynamic`` and
        ``fixed``) and soft gating (then absent) to defaults that have changed: restore those."""
        if "dla_config_version" not in config_dict and config_dict.get("model_type", "dla") == "dla":
            config_dict = dict(config_dict)
            if config_dict.get("policy", "dynamic") in ("dynamic", "fixed") and config_dict.get("capacity") is None:
                config_dict["capacity"] = LEGACY_CAPACITY
            config_dict.setdefault("soft_gate", False)
        config_dict = {k: v for k, v in config_dict.items() if k != "dla_config_version"}
        return super().from_dict(config_dict, **kwargs)

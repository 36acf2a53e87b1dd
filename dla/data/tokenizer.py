"""Tokenizers: a byte-level one that needs nothing (the default) or any Hugging Face tokenizer.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_token_id`` (appended after every document), ``special_tokens`` (the bos / eos / pad ids a
model config records, so that ``generate()`` stops where the tokenizer ends a document) and
``save(directory)``, which writes files
that ``transformers.AutoTokenizer.from_pretrained(directory)`` loads -- that is what lets a
checkpoint run under lm-evaluation-harness.
"""

from __future__ import annotations

from pathlib import Path

from dla.errors import ConfigError, UserError


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; token 256 ends a document."""

    name = "byte"
    vocab_size = 257
    eos_token_id = 256

    special_tokens = {"bos_token_id": None, "eos_token_id": 256, "pad_token_id": 256}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Write it as a ``PreTrainedTokenizerFast``: byte-level BPE without merges, whose token
        ids are exactly the byte values (needs ``transformers``)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        byte_to_char = _gpt2_bytes_to_unicode()
        vocab = {byte_to_char[b]: b for b in range(256)}
        vocab["<|eos|>"] = self.eos_token_id
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>")
        fast.save_pretrained(str(directory))


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class HFTokenizer:
    """A Hugging Face tokenizer loaded with ``AutoTokenizer.from_pretrained(path)`` (a local
    directory works offline)."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ConfigError(f"tokenizer {path!r} needs the transformers package (pip install transformers)") from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the tokenizer {path!r}: {e}") from e
        self.name = path

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def special_tokens(self) -> dict:
        t = self.tokenizer
        return {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
                "pad_token_id": t.eos_token_id if t.pad_token_id is None else t.pad_token_id}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


def load_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` for the byte-level tokenizer, else a Hugging Face tokenizer name or directory."""
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def text_tokenizer(tokenizer, model):
    """The checkpoint's tokenizer, else the byte tokenizer when the vocabulary can hold it."""
    if tokenizer is not None:
        return tokenizer
    if model.config.vocab_size >= ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise UserError(f"the checkpoint has no tokenizer and its vocabulary ({model.config.vocab_size} tokens) is too "
                    "small for bytes: it was trained on a synthetic task (use --mqar / --needle or --synthetic)")

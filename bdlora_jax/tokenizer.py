"""A byte-level tokenizer (ids 0..255 are the bytes, then <s>, </s>, <pad>) built with `tokenizers`, for the demo."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BOS, EOS, PAD = 256, 257, 258
SPECIAL_TOKENS = {"<s>": BOS, "</s>": EOS, "<pad>": PAD}


def _byte_alphabet() -> dict[int, str]:
    """Byte -> printable character table of the ByteLevel pre-tokenizer (GPT-2's)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def byte_level_tokenizer() -> Tokenizer:
    """A tokenizer whose token ids are the UTF-8 bytes of the text (no merges), plus three special tokens."""
    vocab = {ch: b for b, ch in _byte_alphabet().items()} | SPECIAL_TOKENS
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer

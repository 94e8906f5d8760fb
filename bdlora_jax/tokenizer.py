"""Tokenizers built with `tokenizers`: a byte-level one (ids 0..255 are the bytes, then <s>, </s>, <pad>) for the
demo, with the tokenizer_config.json (special tokens, chat template) written beside it, and a numbered one for
random benchmark models of any vocabulary size."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BOS, EOS, PAD = 256, 257, 258
SPECIAL_TOKENS = {"<s>": BOS, "</s>": EOS, "<pad>": PAD}
# Each message as "<|role|>\ncontent</s>\n" after one <s>; the generation prompt opens an assistant message.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ bos_token if loop.first else '' }}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


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


def demo_tokenizer_config() -> dict:
    """tokenizer_config.json of the demo model: its special tokens and its chat template."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
            "model_max_length": 2048, "chat_template": DEMO_CHAT_TEMPLATE}


def numbered_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer whose token i is the word "t{i}" (decoded space-separated): every id of a random
    benchmark model's vocabulary has text, so a server streams one text chunk per token."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer

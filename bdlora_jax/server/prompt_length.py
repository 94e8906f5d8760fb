"""A text prompt refused by its length in characters, before it is tokenized, when it cannot fit the context.

No token of a BPE tokenizer covers more characters of its input than its longest vocabulary entry (byte-level
entries spell one character per byte, so they overstate it), provided the normalizer never shortens the text. So a
prompt of n characters is at least ceil(n / longest) tokens. Tokenizers where that does not hold (other models,
normalizers that drop or compose characters, fused unknown tokens) get no bound and are only checked after
tokenizing.
"""

import json
import math
from functools import lru_cache

from ..errors import ContextLengthError

# normalizers that never shorten text; a Replace also never does when its replacement is as long as its pattern
LENGTH_KEEPING_NORMALIZERS = frozenset({"Prepend", "NFD", "NFKD", "Lowercase"})


def keeps_length(normalizer: dict | None) -> bool:
    """Whether a tokenizer.json normalizer never makes its input shorter."""
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(keeps_length(n) for n in normalizer.get("normalizers", []))
    if kind == "Replace":
        pattern = normalizer.get("pattern", {})
        return "String" in pattern and len(normalizer.get("content", "")) >= len(pattern["String"])
    return kind in LENGTH_KEEPING_NORMALIZERS


@lru_cache(maxsize=8)
def max_chars_per_token(tokenizer) -> int | None:
    """The most characters of a prompt one token can cover, or None where the tokenizer admits no such bound."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None
    if not keeps_length(spec.get("normalizer")):
        return None
    return max((len(entry) for entry in tokenizer.get_vocab(with_added_tokens=True)), default=1) or 1


def refuse_overlong_text(tokenizer, prompt, max_seq_len: int) -> None:
    """ContextLengthError for a text prompt (or a batch of one) too long in characters to fit max_seq_len tokens
    with at least one token generated; nothing for other prompts or tokenizers without a bound."""
    text = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str) else prompt
    if tokenizer is None or not isinstance(text, str):
        return
    longest = max_chars_per_token(tokenizer)
    if longest is None:
        return
    at_least = math.ceil(len(text) / longest)
    if at_least + 1 > max_seq_len:
        raise ContextLengthError(at_least, 1, max_seq_len,
                                 f"prompt of {len(text)} characters is at least {at_least} tokens (at most {longest} "
                                 f"characters per token), more than the maximum context length "
                                 f"max_seq_len={max_seq_len} leaves for max_tokens >= 1")

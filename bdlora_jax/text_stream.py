"""Incremental detokenization for streamed completions, cut at stop strings.

Each new token costs work bounded by the tokens since the last complete character and by the longest stop string,
not by the length of the text so far: only the new tokens are decoded (against a window of the ones before, so
tokenizers that strip or merge at the start of a decode agree with a decode of the whole), and only the new text,
plus as many characters before it as a stop string could reach back, is searched for stop strings. As vLLM does,
stop strings are looked for only once min_tokens tokens are out, in the text from then on (and as far back as a stop
string could reach).
"""


class TextStream:
    """Incremental detokenization that never emits text a stop string could still take back.

    Positions (sent, searched, stop_at) count characters of the whole text; only its tail from `base` on is kept,
    which holds what is not sent yet and what a stop string ending in the next text could still start in.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], min_tokens: int = 0):
        self.tokenizer, self.stop, self.min_tokens, self.sent = tokenizer, stop, min_tokens, 0
        self.holdback = max(max((len(s) for s in stop), default=0) - 1, 0)
        self.base, self.tail = 0, ""  # the decoded text from character `base` on; it ends on a complete character
        self.prefix = self.read = 0  # the decode window: tokens[prefix:read] were the new tokens last time
        self.searched = 0  # characters of the text searched for stop strings without a match
        self.stop_at: int | None = None  # where the first stop string starts, once found

    def text(self, tokens: list[int]) -> tuple[str, bool]:
        """(text of all of `tokens` cut at the first stop string, whether a stop string was found), decoded whole."""
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(tokens)
        if len(tokens) < self.min_tokens:
            return text, False
        start = max(len(self.tokenizer.decode(tokens[:self.min_tokens - 1])) - self.holdback, 0) \
            if self.min_tokens > 1 else 0
        cuts = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def _new_text(self, tokens: list[int]) -> str:
        """The text `tokens` add after the tail, committed to it when it ends on a complete character (then "")."""
        if self.tokenizer is None or len(tokens) <= self.read:
            return ""
        before = self.tokenizer.decode(tokens[self.prefix:self.read])
        new = self.tokenizer.decode(tokens[self.prefix:])[len(before):]
        if new and not new.endswith("\ufffd"):
            self.tail += new
            self.prefix, self.read = self.read, len(tokens)
            return ""
        return new

    def _find_stop(self, text: str, searching: bool) -> None:
        """Search `text` (the tail, or more once final) where a stop string could end past what was searched
        (unless not `searching` yet: before min_tokens, the text counts as searched without a look)."""
        if self.stop_at is None and self.stop and searching:
            start = max(self.searched - self.holdback, self.base) - self.base
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stop_at = self.base + min(hits)
        self.searched = self.base + len(self.tail)

    def _trim(self) -> None:
        """Drop the text that is sent and that no stop string ending in later text could start in."""
        keep_from = min(self.sent, max(self.searched - self.holdback, 0))
        if keep_from > self.base:
            self.tail = self.tail[keep_from - self.base:]
            self.base = keep_from

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been found."""
        return self.stop_at is not None

    def delta(self, tokens: list[int], final: bool) -> str:
        """The text not sent yet that no stop string can take back (all of it once final or stopped)."""
        pending = self._new_text(tokens)
        text = self.tail + pending if final else self.tail
        self._find_stop(text, len(tokens) >= self.min_tokens)
        if self.stop_at is not None:
            ready = self.stop_at
        else:
            ready = self.base + len(text) - (0 if final else self.holdback)
        while ready > self.sent and text[ready - 1 - self.base] == "\ufffd" and not final:
            ready -= 1
        piece = text[self.sent - self.base:max(ready, self.sent) - self.base]
        self.sent += len(piece)
        self._trim()
        return piece

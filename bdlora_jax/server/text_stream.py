"""Incremental detokenization for streamed completions, cut at stop strings."""


class TextStream:
    """Incremental detokenization that never emits text a stop string could still take back."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.sent = tokenizer, stop, 0
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def text(self, tokens: list[int]) -> tuple[str, bool]:
        """(text so far cut at the first stop string, whether a stop string was found)."""
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        cuts = [text.find(s) for s in self.stop if s in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def delta(self, tokens: list[int], final: bool) -> str:
        """The text not sent yet that no stop string can take back (all of it once final or stopped)."""
        text, stopped = self.text(tokens)
        ready = len(text) if (final or stopped) else len(text) - self.holdback
        while ready > self.sent and text[ready - 1] == "\ufffd" and not final:
            ready -= 1
        piece = text[self.sent:max(ready, self.sent)]
        self.sent += len(piece)
        return piece

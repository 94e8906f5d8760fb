"""The pages of a paged KV cache, host side: which pages are free, and taking and returning a request's pages."""

from __future__ import annotations


class PagePool:
    """num_pages pages of page_size tokens; a request's pages are a list in token order that grow and return here."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: the lowest page first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, tokens: int) -> int:
        """Pages that hold `tokens` tokens."""
        return -(-tokens // self.page_size)

    def grow(self, pages: list[int], tokens: int) -> bool:
        """Extend a request's `pages` to hold `tokens` tokens; False, taking nothing, when too few pages are free."""
        more = self.pages_for(tokens) - len(pages)
        if more > len(self._free):
            return False
        pages.extend(self._free.pop() for _ in range(max(more, 0)))
        return True

    def release(self, pages: list[int]) -> None:
        """Return a request's pages to the pool (the list is emptied)."""
        self._free.extend(reversed(pages))
        pages.clear()

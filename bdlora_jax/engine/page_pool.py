"""The pages of a paged KV cache, host side: free pages, requests' pages, and full pages kept for reuse by prefix.

A full page can be registered under a key that names everything before and in it (`page_keys`: the adapter and the
tokens so far), so a later request for the same adapter whose prompt starts the same way reuses the page instead of
computing it. Registered pages count the requests holding them; one that no request holds stays cached, and is
evicted (least recently released first) only when a request needs a page and none is free.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def page_keys(identity: str, tokens: list[int], page_size: int, pages: int, start: int = 0,
              previous: bytes | None = None) -> list[bytes]:
    """Keys of full pages start..start + pages - 1 of a request whose adapter is `identity`: each a SHA-256 of the
    previous page's key (of the identity for the first page) and the page's tokens, so a key names its whole prefix."""
    key = previous if previous is not None else hashlib.sha256(identity.encode()).digest()
    keys = []
    for page in range(start, start + pages):
        chunk = np.asarray(tokens[page * page_size:(page + 1) * page_size], np.int64).tobytes()
        key = hashlib.sha256(key + chunk).digest()
        keys.append(key)
    return keys


class PagePool:
    """num_pages pages of page_size tokens; a request's pages are a list in token order that grow and return here."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: the lowest page first
        self._page_of: dict[bytes, int] = {}  # key -> registered page
        self._key_of: dict[int, bytes] = {}  # registered page -> key
        self._holders: dict[int, int] = {}  # registered page -> requests holding it
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered pages nobody holds, least recent first
        self.hit_pages = 0  # pages reused through their keys
        self.queried_pages = 0  # full pages looked up

    @property
    def free(self) -> int:
        """Pages a request can take: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        """Pages held by requests."""
        return self.num_pages - self.free

    def pages_for(self, tokens: int) -> int:
        """Pages that hold `tokens` tokens."""
        return -(-tokens // self.page_size)

    def _take(self) -> int:
        """A free page, else the least recently released cached page (forgetting its key)."""
        if self._free:
            return self._free.pop()
        page, _ = self._idle.popitem(last=False)
        del self._page_of[self._key_of.pop(page)], self._holders[page]
        return page

    def grow(self, pages: list[int], tokens: int) -> bool:
        """Extend a request's `pages` to hold `tokens` tokens; False, taking nothing, when too few pages are free."""
        more = self.pages_for(tokens) - len(pages)
        if more > self.free:
            return False
        pages.extend(self._take() for _ in range(max(more, 0)))
        return True

    def release(self, pages: list[int]) -> None:
        """Return a request's pages (the list is emptied): registered ones stay cached once nobody holds them."""
        for page in reversed(pages):
            if page in self._key_of:
                self._holders[page] -= 1
                if not self._holders[page]:
                    self._idle[page] = None
            else:
                self._free.append(page)
        pages.clear()

    def match(self, keys: list[bytes]) -> list[int]:
        """The registered pages of the longest run of `keys` from the first, each now held once more by the caller."""
        self.queried_pages += len(keys)
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            self._idle.pop(page, None)
            self._holders[page] += 1
            pages.append(page)
        self.hit_pages += len(pages)
        return pages

    def register(self, page: int, key: bytes) -> None:
        """Make a full page that its request holds reusable under `key`, unless another page already has the key."""
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key], self._key_of[page], self._holders[page] = page, key, 1

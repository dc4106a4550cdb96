"""The pages of the paged KV cache (docs/architecture.md §4): reference counts and the prefix cache.

A page is referenced by every running sequence whose block table holds it. A full page whose tokens are all
computed can be registered under its hash (`page_hashes`): the hash of its tokens chained with the hash of the
page before it, so one hash names the whole prefix up to the page's end (vLLM V1's scheme; a request's
`cache_salt` joins the first page's hash). A page whose last reference is dropped goes back to the free queue
but stays findable by its hash until it is handed out again: the queue evicts least recently freed pages
first, pages holding no cached content before any that do, and a sequence's pages are freed tail first, so a
shared prefix outlives the suffixes behind it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def page_hashes(token_ids: Sequence[int], page_size: int, salt: str | None, known: list[int]) -> list[int]:
    """`known` (the hashes of the first pages) extended with those of the further full pages of `token_ids`."""
    hashes = list(known)
    for start in range(len(hashes) * page_size, len(token_ids) - page_size + 1, page_size):
        parent = hashes[-1] if hashes else hash(("jaxserve-prefix", salt))
        hashes.append(hash((parent, tuple(token_ids[start : start + page_size]))))
    return hashes


class PagePool:
    """Page ids with reference counts, a free queue in eviction order, and the hash → page map of cached
    pages (vLLM's BlockPool). With `enable_caching` off, no page is ever registered and this is a free list."""

    def __init__(self, num_pages: int, page_size: int, enable_caching: bool = True):
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))  # front: evicted first
        self._hash_of: list[int | None] = [None] * num_pages
        self._cached: dict[int, int] = {}  # page hash -> page

    @property
    def num_free(self) -> int:
        """Pages with no reference, cached or not."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, count: int) -> list[int]:
        """`count` pages with one reference each, evicting the cached content of those that had some."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV pages with {len(self._free)} free")
        pages = []
        for _ in range(count):
            page, _ = self._free.popitem(last=False)
            old = self._hash_of[page]
            if old is not None:
                del self._cached[old]
                self._hash_of[page] = None
            self.ref_counts[page] = 1
            pages.append(page)
        return pages

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """The cached pages of the longest prefix of `hashes` (not yet referenced: see `touch`)."""
        pages = []
        for h in hashes:
            page = self._cached.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def num_unreferenced(self, pages: Sequence[int]) -> int:
        """How many of `pages` sit in the free queue (taking them lowers `num_free`)."""
        return sum(1 for page in pages if self.ref_counts[page] == 0)

    def touch(self, pages: Sequence[int]) -> None:
        """One more reference to each of `pages` (found by `lookup`), taking them off the free queue."""
        for page in pages:
            if self.ref_counts[page] == 0:
                del self._free[page]
            self.ref_counts[page] += 1

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each of `pages`, tail first; unreferenced pages return to the free queue."""
        for page in reversed(pages):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self._free[page] = None
                if self._hash_of[page] is None:
                    self._free.move_to_end(page, last=False)

    def cache(self, page: int, page_hash: int) -> None:
        """Register a full, computed page under its hash, unless the hash names a page already."""
        if self.enable_caching and page_hash not in self._cached and self._hash_of[page] is None:
            self._cached[page_hash] = page
            self._hash_of[page] = page_hash

    def reset_cache(self) -> None:
        """Forget every cached page (vLLM's `reset_prefix_cache`); pages in use keep their content."""
        self._cached.clear()
        self._hash_of = [None] * self.num_pages

"""Iteration order of a libstdc++ ``std::unordered_set<int>`` built by ``insert``.

``llama_batch_ext::token::seq_ids`` is such a set, so the order of a token's sequence
ids after ``llama_batch_compat`` (and hence its *primary* sequence ``seq_id[i][0]``) is
this order. Modelled naively on libstdc++ (``hashtable.h``, ``hashtable_c++0x.cc``):
the nodes form one singly linked list, a bucket points at the node *before* its first
node, ``std::hash<int>`` is the identity (as ``size_t``), ``_Prime_rehash_policy`` with
max load factor 1.0 starts at 13 buckets on the first insert and grows by at least 2x.
"""

from __future__ import annotations

_FAST_BKT = [2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13]
_PRIME_LIST = [
    2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79,
    83, 89, 97, 103, 109, 113, 127, 137, 139, 149, 157, 167, 179, 193, 199, 211, 227,
    241, 257, 277, 293, 313, 337, 359, 383, 409, 439, 467, 503, 541, 577, 619, 661, 709,
    761, 823, 887, 953, 1031, 1109, 1193, 1289, 1381, 1493, 1613, 1741, 1879, 2029,
]  # fmt: skip


class StdUnorderedSet:
    """A literal model of the node list and bucket array."""

    def __init__(self) -> None:
        self.n_bkt = 1
        self.next_resize = 0
        self.nodes: list[int] = []  # the linked list, in iteration order

    def _next_bkt(self, n: int) -> int:
        if n < len(_FAST_BKT):
            if n == 0:
                return 1
            self.next_resize = _FAST_BKT[n]  # floor(bkt * 1.0)
            return _FAST_BKT[n]
        for p in _PRIME_LIST[6:]:
            if p >= n:
                self.next_resize = p
                return p
        raise AssertionError("set too large for the modelled prime list")

    def _need_rehash(self, n_elt: int, n_ins: int) -> int | None:
        if n_elt + n_ins > self.next_resize:
            min_bkts = max(n_elt + n_ins, 0 if self.next_resize else 11) / 1.0
            if min_bkts >= self.n_bkt:
                return self._next_bkt(max(int(min_bkts) + 1, self.n_bkt * 2))
            self.next_resize = self.n_bkt
        return None

    def _bucket(self, x: int, n_bkt: int) -> int:
        return (x % (1 << 64)) % n_bkt

    def _rehash(self, n_bkt: int) -> None:
        # each node goes to the front of its bucket's run; a node whose bucket is still
        # empty goes to the front of the whole list
        new: list[int] = []
        for x in self.nodes:
            b = self._bucket(x, n_bkt)
            for k, y in enumerate(new):
                if self._bucket(y, n_bkt) == b:
                    new.insert(k, x)
                    break
            else:
                new.insert(0, x)
        self.nodes = new
        self.n_bkt = n_bkt

    def insert(self, x: int) -> None:
        if x in self.nodes:
            return
        n_bkt = self._need_rehash(len(self.nodes), 1)
        if n_bkt is not None:
            self._rehash(n_bkt)
        b = self._bucket(x, self.n_bkt)
        for k, y in enumerate(self.nodes):
            if self._bucket(y, self.n_bkt) == b:
                self.nodes.insert(k, x)
                return
        self.nodes.insert(0, x)

    def __iter__(self):
        return iter(self.nodes)


def unordered_set_order(values: list[int]) -> list[int]:
    """The iteration order after inserting ``values`` in order (duplicates collapse)."""
    s = StdUnorderedSet()
    for v in values:
        s.insert(v)
    return list(s)

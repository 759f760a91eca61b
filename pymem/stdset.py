"""Why this module exists: llama.cpp lists a token's sequence ids in libstdc++'s order.

``llama_batch_allocr`` collects each token's sequence ids in a
``std::unordered_set<llama_seq_id>`` and then reads them back in the set's iteration
order. That order (not the caller's) decides ``seq_id[i][0]``, the token's *primary*
sequence: the recurrent cell a coupled token writes to and the KQ-mask row it reads. To
give the same ubatches as the reference on Linux, pymem reproduces GCC's libstdc++
hashtable exactly: identity hash for ints, ``_Prime_rehash_policy`` bucket counts, a
first insert that sizes the table for 11 elements, max load factor 1.0, and a new node
placed first in its bucket (or at the front of the list when its bucket is empty).

Checked against a compiled g++ 12 program on 3,000 random id lists
(tests/data/unordered_set_order.*). Builds of the reference against libc++ (macOS)
order differently; pymem follows Linux/GCC.
"""

from __future__ import annotations

import bisect
from functools import lru_cache

# _Prime_rehash_policy: small counts use a fast table, larger ones the prime list
# (only the part reachable with at most LLAMA_MAX_SEQ elements is needed).
_FAST_BKT = (2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13)
_PRIMES = (
    2,
    3,
    5,
    7,
    11,
    13,
    17,
    19,
    23,
    29,
    31,
    37,
    41,
    43,
    47,
    53,
    59,
    61,
    67,
    71,
    73,
    79,
    83,
    89,
    97,
    103,
    109,
    113,
    127,
    137,
    139,
    149,
    157,
    167,
    179,
    193,
    199,
    211,
    227,
    241,
    257,
    277,
    293,
    313,
    337,
    359,
    383,
    409,
    439,
    467,
    503,
    541,
    577,
    619,
    661,
    709,
    761,
    823,
    887,
    953,
    1031,
)


def _next_bkt(n: int) -> int:
    if n < len(_FAST_BKT):
        return _FAST_BKT[n]
    return _PRIMES[bisect.bisect_left(_PRIMES, n, 6)]


def _bucket_insert(order: list[int], x: int, n_bkt: int) -> None:
    # a node goes first in its bucket when the bucket has nodes (nodes of one bucket are
    # contiguous in the list), else at the very front of the list
    b = x % n_bkt
    for k, y in enumerate(order):
        if y % n_bkt == b:
            order.insert(k, x)
            return
    order.insert(0, x)


@lru_cache(maxsize=4096)
def unordered_set_order(ids: tuple[int, ...]) -> tuple[int, ...]:
    """Iteration order of a libstdc++ ``std::unordered_set<int>`` filled by ``insert`` in order.

    This is the order in which the reference lists a token's sequence ids, so it decides
    ``seq_id[i][0]``. Duplicates collapse. Non-negative ids only (hash = identity).
    E.g. (2, 3) -> (3, 2); (0, 1, 13) -> (1, 13, 0); (5, 5, 1) -> (1, 5).
    """
    order: list[int] = []
    n_bkt, next_resize = 1, 0
    for x in ids:
        if x in order:
            continue
        n_elt = len(order)
        if n_elt + 1 > next_resize:
            # the first insert sizes the table for 11 elements (13 buckets)
            min_bkts = max(n_elt + 1, 0 if next_resize else 11)
            if min_bkts >= n_bkt:
                n_bkt = _next_bkt(max(min_bkts + 1, n_bkt * 2))
                rehashed: list[int] = []
                for y in order:
                    _bucket_insert(rehashed, y, n_bkt)
                order = rehashed
            next_resize = n_bkt  # max_load_factor 1.0
        _bucket_insert(order, x, n_bkt)
    return tuple(order)

"""A radix tree over token ids: which cached prefixes a request shares, in O(len(tokens)).

Why a tree and not a list of entries: a runtime asks "what is the longest cached prefix of
these 32k tokens" before every request, with a thousand cached entries. A scan compares
the request with every entry; the tree compares it once, edge by edge, and every edge is
compared as one ``bytes`` slice (``memcmp``). Nodes exist only where sequences branch or
end; the checkpoints along an edge are a sorted int32 array on it, searched with numpy,
so the walk costs one step per branch point on the path, whatever the number of entries::

    root
     '-- [sys 0..999]                 depth 1000   live {0, 1, 2}
          |                                        payloads at depths [256, 512, 768, 1000]
          |-- [u0 1000..1180]         depth 1181   live {0}   (sequence 0 ends here)
          |-- [u1 1000..1250]         depth 1251   live {1}   payloads at [1024, 1250]
          '-- [u2 1000..1093]         depth 1094   live {2}

A node's ``key`` is the edge from its parent (int32 token ids, stored as bytes); its
``depth`` is the number of tokens from the root to its end. A payload at depth ``d`` on
an edge (``parent.depth < d <= depth``) stands for the first ``d`` tokens (a checkpoint at
position ``d - 1``). ``live`` is a bitmask of the sequences whose held tokens run through
the whole edge (bit ``s``: sequence ``s``), ``ends`` of those that end exactly at the node.

The tree knows nothing about memories: :mod:`pymem.reuse.prefix_cache` stores checkpoints
as payloads and keeps ``live`` in step with what each sequence's cells hold. A payload has
``node`` and ``depth`` attributes; the tree keeps ``node`` current when edges split/merge.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

TOKEN = np.dtype("<i4")  # token ids as stored in keys (4 bytes each)


class Payload(Protocol):
    """What the tree stores on edges: it keeps ``node`` pointing at the holding node."""

    node: RadixNode
    depth: int


def as_tokens(tokens: Any) -> np.ndarray:
    """``tokens`` as a contiguous little-endian int32 array (no copy when it already is).

    A Python list costs ~50 ns per token to convert (1.7 ms for 32k): runtimes that keep
    histories as int32 arrays skip it.
    """
    return np.ascontiguousarray(tokens, dtype=TOKEN).reshape(-1)


class RadixNode:
    """One edge of the tree and the prefix it ends (see the module docstring)."""

    __slots__ = ("_depths", "children", "depth", "ends", "key", "live", "parent", "payloads")

    def __init__(self, parent: RadixNode | None, key: bytes, depth: int) -> None:
        self.parent = parent
        self.key = key  # int32 little-endian token ids of the edge from the parent
        self.depth = depth
        self.children: dict[int, RadixNode] = {}  # first token of the child's key -> child
        self.live = 0  # bitmask: sequences whose held tokens run through this edge
        self.ends = 0  # bitmask: sequences whose held tokens end exactly here
        self.payloads: dict[int, Payload] = {}  # depth on this edge -> payload
        self._depths: np.ndarray | None = None  # sorted payload depths (built on demand)

    @property
    def n_key(self) -> int:
        return len(self.key) // TOKEN.itemsize

    @property
    def start(self) -> int:
        """Depth where this edge begins (its parent's depth)."""
        return self.depth - self.n_key

    def first_token(self) -> int:
        return int.from_bytes(self.key[:4], "little", signed=True)

    def depths(self) -> np.ndarray:
        """Sorted int32 depths of the payloads on this edge."""
        if self._depths is None:
            self._depths = np.fromiter(
                sorted(self.payloads), dtype=np.int32, count=len(self.payloads)
            )
        return self._depths

    def deepest_payload(self, limit: int) -> Payload | None:
        """The payload with the largest depth ``<= limit`` on this edge, or None.

        E.g. depths [256, 512, 768], limit 700 -> the one at 512.
        """
        if not self.payloads:
            return None
        d = self.depths()
        i = int(np.searchsorted(d, limit, side="right")) - 1
        return self.payloads[int(d[i])] if i >= 0 else None

    def add_payload(self, p: Payload) -> None:
        assert self.start < p.depth <= self.depth and p.depth not in self.payloads
        self.payloads[p.depth] = p
        p.node = self
        d = self._depths
        if d is not None and (not d.size or p.depth > d[-1]):
            self._depths = np.append(d, np.int32(p.depth))  # the usual case: a new deepest
        else:
            self._depths = None

    def remove_payload(self, p: Payload) -> None:
        del self.payloads[p.depth]
        self._depths = None

    def path(self) -> list[RadixNode]:
        """Nodes from the root's first child down to this one."""
        out = []
        node: RadixNode | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    def tokens(self, n: int | None = None) -> np.ndarray:
        """The first ``n`` (default ``depth``) tokens from the root along this node's path."""
        toks = np.frombuffer(b"".join(x.key for x in self.path()), dtype=TOKEN)
        return toks if n is None else toks[:n]

    def __repr__(self) -> str:
        return (
            f"RadixNode(depth={self.depth}, n_key={self.n_key}, live={self.live:#x}, "
            f"ends={self.ends:#x}, payloads={sorted(self.payloads)})"
        )


@dataclass(frozen=True)
class Walk:
    """Where a request's tokens leave the tree.

    ``nodes``: the nodes whose whole edge matches, root side first (their depths grow).
    ``n_common``: tokens matched in all (within ``partial``'s edge when it is set).
    ``partial``: the node whose edge matches only in part, or None. The sequences that
    share all ``n_common`` tokens are ``partial.live`` (or the last node's ``live``).
    """

    nodes: tuple[RadixNode, ...]
    n_common: int
    partial: RadixNode | None

    @property
    def path(self) -> tuple[RadixNode, ...]:
        """Every node the request runs into: ``nodes`` then ``partial``."""
        return (*self.nodes, self.partial) if self.partial is not None else self.nodes

    @property
    def live_at_common(self) -> int:
        """Bitmask of the sequences holding all ``n_common`` matched tokens."""
        if self.partial is not None:
            return self.partial.live
        return self.nodes[-1].live if self.nodes else 0

    def node_at(self, depth: int) -> RadixNode | None:
        """The node on the path whose edge holds ``depth`` (``start < depth <= end``),
        up to ``n_common``; None for 0 or past the match."""
        if depth <= 0 or depth > self.n_common:
            return None
        for node in self.path:
            if node.depth >= depth:
                return node
        return None


class RadixTree:
    """Token-id prefixes, compressed on edges (see the module docstring)."""

    def __init__(self) -> None:
        self.root = RadixNode(None, b"", 0)
        self.n_nodes = 0  # not counting the root

    # --- reading ----------------------------------------------------------------------
    def walk(self, tokens: np.ndarray) -> Walk:
        """Match ``tokens`` (int32, see :func:`as_tokens`) from the root. Changes nothing.

        One dict lookup and one ``bytes`` compare per node on the path; numpy only where
        the request leaves an edge, to find the first differing token.
        """
        buf = tokens.tobytes()
        ids = memoryview(tokens)  # type: ignore[arg-type]  # Python ints, no numpy scalars
        n = len(tokens)
        node = self.root
        i = 0
        nodes: list[RadixNode] = []
        partial = None
        while i < n:
            child = node.children.get(ids[i])
            if child is None:
                break
            key = child.key
            m = child.n_key
            if m <= n - i and buf[4 * i : 4 * (i + m)] == key:
                nodes.append(child)
                node = child
                i += m
                continue
            # the request ends inside this edge or leaves it: find where
            # E.g. key [7, 8, 9, 4], tokens[i:] [7, 8, 5] -> m = 3, first difference at 2
            m = min(m, n - i)
            edge = np.frombuffer(key, dtype=TOKEN, count=m)
            diff = np.flatnonzero(edge != tokens[i : i + m])
            i += int(diff[0]) if diff.size else m
            partial = child
            break
        return Walk(tuple(nodes), i, partial)

    def iter_nodes(self) -> Iterator[RadixNode]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # --- changing ---------------------------------------------------------------------
    def insert(self, tokens: np.ndarray, n: int | None = None) -> RadixNode:
        """The node ending exactly after the first ``n`` tokens (default all), created
        (and an edge split) as needed. ``n == 0`` is the root."""
        n = len(tokens) if n is None else int(n)
        assert 0 <= n <= len(tokens)
        w = self.walk(tokens[:n])
        node = w.nodes[-1] if w.nodes else self.root
        if w.partial is not None:
            low = w.partial
            node = self.split(low, w.n_common)
            if not (low.children or low.live or low.payloads):
                # the edge was kept for a payload now above the cut: its rest holds nothing
                del node.children[low.first_token()]
                low.parent = None
                self.n_nodes -= 1
        if w.n_common < n:
            leaf = RadixNode(node, tokens[w.n_common : n].tobytes(), n)
            node.children[int(tokens[w.n_common])] = leaf
            self.n_nodes += 1
            node = leaf
        assert node.depth == n
        return node

    def split(self, child: RadixNode, depth: int) -> RadixNode:
        """Cut ``child``'s edge so that a node ends at ``depth``; returns that (upper) node.

        E.g. parent depth 10, child key [a b c d e] (depth 15), depth 12 -> mid [a b] at
        depth 12 over child [c d e]. The mid node carries the sequences that run through
        the child (they run through mid too; none ends there) and the payloads at depths
        ``<= 12``.
        """
        parent = child.parent
        k = depth - child.start
        assert parent is not None and 0 < k < child.n_key
        mid = RadixNode(parent, child.key[: 4 * k], depth)
        mid.live = child.live
        parent.children[child.first_token()] = mid
        child.key = child.key[4 * k :]
        child.parent = mid
        mid.children[child.first_token()] = child
        if child.payloads:
            # E.g. payloads at [11, 12, 14], depth 12 -> mid [11, 12], child [14]
            d = child.depths()
            k = int(np.searchsorted(d, depth, side="right"))
            mid.payloads = {int(x): child.payloads.pop(int(x)) for x in d[:k]}
            mid._depths, child._depths = d[:k], d[k:]
            for p in mid.payloads.values():
                p.node = mid
        self.n_nodes += 1
        return mid

    def set_live(self, node: RadixNode, bit: int, on: bool) -> None:
        """Mark (or clear) sequence bit ``bit`` as running from the root to ``node``."""
        mask = 1 << bit
        if on:
            node.ends |= mask
        else:
            node.ends &= ~mask
        cur: RadixNode | None = node
        while cur is not None and cur.parent is not None:
            if on:
                cur.live |= mask
            else:
                cur.live &= ~mask
            cur = cur.parent

    def prune(self, node: RadixNode) -> None:
        """From ``node`` up: remove nodes that hold nothing (no child, sequence or
        payload), cut a leaf no sequence runs through back to its deepest payload (the
        tokens after it are no longer cached: a walk must not match them), then merge a
        node no sequence ends at into its only child (payloads move down with it). Keeps
        every node that something needs."""
        cur: RadixNode | None = node
        while cur is not None and cur.parent is not None:
            parent = cur.parent
            if not cur.children and not cur.live and not cur.payloads:
                del parent.children[cur.first_token()]
                cur.parent = None
                self.n_nodes -= 1
                cur = parent
                continue
            if not cur.children and not cur.live:
                # E.g. a leaf [a b c d e] (depth 15) with a payload at 12 -> [a b], depth 12
                deepest = max(cur.payloads)
                cur.key = cur.key[: TOKEN.itemsize * (deepest - cur.start)]
                cur.depth = deepest
            if len(cur.children) == 1 and not cur.ends:
                (only,) = cur.children.values()
                # E.g. [a b] (depth 12) over [c d e] (depth 15) -> [a b c d e] at depth 15
                only.key = cur.key + only.key
                only.parent = parent
                parent.children[cur.first_token()] = only
                if cur.payloads:
                    # cur's payloads are all above only's: the sorted arrays concatenate
                    up, down = cur.depths(), only.depths()
                    only.payloads = {**cur.payloads, **only.payloads}
                    only._depths = np.concatenate([up, down])
                    for p in cur.payloads.values():
                        p.node = only
                cur.parent = None
                self.n_nodes -= 1
            break

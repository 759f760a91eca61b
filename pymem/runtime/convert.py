"""Move memory states between files: ``python -m pymem convert IN OUT --model GGUF ...``.

Every conversion goes through the model's memory: the inputs are restored into the
memory the factory builds for ``--model`` (which validates them the way a real load
does), then the output is written from it. So:

* extract one sequence of a whole state (session file, context blob, container) into a
  sequence file or container: ``convert s.session q.seq --model m.gguf --seq 1``;
* merge sequence states into one whole state, each into its own sequence id:
  ``convert a.seq all.session --model m.gguf --merge b.seq --as-seq 1``
  (``--as-seq M`` after a file puts that file's sequence into ``M``; by default a
  sequence goes where its file says it came from (containers, sequence blobs), else
  the first input's to 0 and the k-th ``--merge``'s to ``k``);
* move between llama.cpp's files and pymem's container, either way
  (``--to session | sequence | container | blob``).

A whole-state output holds every sequence (``--seq`` picks one). The token list written
is the first input's (llama.cpp's files carry one list). Context options
(``--n-ctx --n-seq-max --kv-unified --flash-attn``) default as in ``inspect``: from the
inputs' bytes where they show, else llama.cpp's defaults.

Nothing here prints; :func:`run_convert` is the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pymem.container import model_fingerprint, write_container
from pymem.errors import PymemError, StateError
from pymem.runtime.inspect import (
    MemoryFacts,
    StateFile,
    add_context_options,
    build_memory,
    context_options,
    describe_live,
    parse_state_file,
    read_state_file,
    restore_state,
    scope_of,
)
from pymem.sessions import context_state, save_sequence, save_session, seq_state

TARGETS = ("session", "sequence", "container", "blob")


@dataclass(frozen=True)
class ConvertInput:
    """One input file and the sequence id its per-sequence state goes to (None: default)."""

    path: str
    as_seq: int | None = None


@dataclass(frozen=True)
class ConvertResult:
    path: str
    to: str
    bytes: int
    seq_id: int  # -1: the whole memory
    seqs: dict[int, tuple[int, int]]  # what the output holds: seq -> (pos_min, pos_max)
    restored: tuple[tuple[str, int], ...]  # (input, seq id it went to; -1 whole)


def convert(
    inputs: Sequence[ConvertInput],
    out: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    to: str | None = None,
    seq_id: int | None = None,
    **options: Any,
) -> ConvertResult:
    """Restore ``inputs`` into ``model``'s memory, in order, and write ``out``.

    Each input's sequence state goes to its ``as_seq``, else the sequence the file names
    (containers), else its position (0, 1, ...); a whole state (first input only)
    restores whole. ``seq_id``: write that sequence only (default: the sequence of a
    single per-sequence input, else the whole memory). ``to``: ``"session"`` (default for
    a whole state), ``"sequence"`` (default for one sequence), ``"container"`` or
    ``"blob"`` (a context blob, or for one sequence a sequence blob). Raises
    :class:`StateError` for an input the memory refuses, a whole state among several
    inputs after the first, or a ``seq_id`` the memory does not hold.
    """
    if not inputs:
        raise StateError("inputs: at least one state file")
    if to is not None and to not in TARGETS:
        raise StateError(f"to: {to!r} is not one of {', '.join(TARGETS)}")
    files: list[StateFile] = [read_state_file(i.path) for i in inputs]
    facts: list[MemoryFacts | None] = []
    for sf in files:
        try:
            facts.append(parse_state_file(sf))
        except StateError:
            facts.append(None)  # the model's memory decides below
    # where each input's sequence goes: --as-seq, else the id the file names, else its position
    dests = [
        inp.as_seq if inp.as_seq is not None else sf.seq_id if sf.seq_id is not None else k
        for k, (inp, sf) in enumerate(zip(inputs, files))
    ]
    for k, (sf, f) in enumerate(zip(files, facts)):
        if k and scope_of(sf, f) == "whole":
            raise StateError(
                f"{sf.path}: holds a whole memory; only the first input may (merge sequence states)"
            )
        if k and dests[k] in dests[:k]:
            raise StateError(
                f"{sf.path}: restores into seq {dests[k]} like an earlier input; give --as-seq"
            )
    need = max([*dests, seq_id if seq_id is not None else 0])
    spec, mem, _, _ = build_memory(model, facts[0], min_seq=need, **options)
    try:
        restored = []
        for sf, f, dest in zip(files, facts, dests):
            if sf.arch is not None and sf.arch != spec.arch:
                raise StateError(
                    f"{sf.path}: wrong model arch {sf.arch!r}, the model is {spec.arch!r}"
                )
            restored.append((sf.path, restore_state(mem, sf, dest, f)))
        if seq_id is None and len(restored) == 1 and restored[0][1] != -1:
            seq_id = restored[0][1]  # one sequence in, that sequence out
        to = to or ("session" if seq_id is None else "sequence")
        if to == "sequence" and seq_id is None:
            raise StateError("seq_id: a sequence file holds one sequence; name it (--seq N)")
        dest = -1 if seq_id is None else seq_id
        if dest != -1 and mem.seq_pos_max(dest) < 0:
            raise StateError(f"seq_id: sequence {dest} holds no cells after restoring the inputs")
        tokens = files[0].tokens or ()
        if to == "session":
            n = save_session(out, mem, spec.arch, tokens)
        elif to == "sequence":
            n = save_sequence(out, mem, dest, tokens)
        elif to == "container":
            n = write_container(out, mem, dest, fingerprint=model_fingerprint(model), tokens=tokens)
        else:
            blob = context_state(mem, spec.arch) if dest == -1 else seq_state(mem, dest)
            with open(out, "wb") as fo:
                n = fo.write(blob)
        seqs = describe_live(mem, dest).seqs
    finally:
        mem.close()
    return ConvertResult(os.fspath(out), to, n, dest, seqs, tuple(restored))


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


class _Merge(argparse.Action):
    """``--merge IN2``: one more input (its sequence goes to the next id by default)."""

    def __call__(self, parser: Any, ns: argparse.Namespace, value: Any, option: Any = None) -> None:
        ns.inputs = [*(getattr(ns, "inputs", None) or []), [value, None]]


class _AsSeq(argparse.Action):
    """``--as-seq M``: the sequence id of the input named just before it."""

    def __call__(self, parser: Any, ns: argparse.Namespace, value: Any, option: Any = None) -> None:
        inputs = getattr(ns, "inputs", None) or []
        if not inputs:
            ns.in_as_seq = value  # after IN, before any --merge
        else:
            inputs[-1][1] = value


def run_convert(args: argparse.Namespace) -> int:
    """``python -m pymem convert``: exit 0, 2 for a refused state, 1 for other errors."""
    inputs = [ConvertInput(args.input, getattr(args, "in_as_seq", None))]
    inputs += [ConvertInput(p, s) for p, s in getattr(args, "inputs", None) or []]
    try:
        res = convert(
            inputs, args.output, args.model, to=args.to, seq_id=args.seq, **context_options(args)
        )
    except StateError as exc:
        print(f"pymem convert: {exc}", file=sys.stderr)
        return 2
    except (PymemError, OSError) as exc:
        print(f"pymem convert: {exc}", file=sys.stderr)
        return 1
    held = ", ".join(f"seq {q} pos {lo}..{hi}" for q, (lo, hi) in res.seqs.items()) or "no cells"
    what = "the whole memory" if res.seq_id == -1 else f"seq {res.seq_id}"
    print(f"{res.path}: {res.to}, {res.bytes} bytes, {what} ({held})")
    return 0


def add_convert_parser(subparsers: Any) -> None:
    """Register ``convert`` on the ``python -m pymem`` command line."""
    p = subparsers.add_parser(
        "convert",
        help="extract, merge and convert state files through a model's memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="a session / sequence file, context or memory blob, or container")
    p.add_argument("output", help="the file to write")
    p.add_argument("--model", required=True, help="the GGUF model whose memory the states fit")
    p.add_argument(
        "--to",
        choices=TARGETS,
        default=None,
        help="output kind (default: session, or sequence with --seq)",
    )
    p.add_argument("--seq", type=int, default=None, help="write this sequence only")
    p.add_argument(
        "--merge", action=_Merge, metavar="IN2", help="another sequence state to restore"
    )
    p.add_argument(
        "--as-seq",
        action=_AsSeq,
        type=int,
        metavar="M",
        help="the sequence id of the input named just before (default: its position)",
    )
    add_context_options(p)
    p.set_defaults(func=run_convert)

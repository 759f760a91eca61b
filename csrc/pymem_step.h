// Batch-oriented kernels for the decode step's bookkeeping: one call per ubatch does what
// a few dozen numpy calls did (each costs microseconds once a model's compute has evicted
// the caches). Every kernel has a numpy twin in pymem that stays the tested reference; a
// kernel either does its whole job or reports *placed = 0 / *ok = 0 having changed
// nothing, and the caller then takes the general numpy path.
#pragma once

#include "pymem_native.h"
#include "pymem_stateio.h"

#ifdef __cplusplus
extern "C" {
#endif

// PYMEM_CDEF_BEGIN: plain declarations only (csrc/gen_cffi.py hands them to cffi)

// The cell metadata of a KV cache's stacked streams (pymem.kv.cells.StackedCells), by
// pointer: flat over global cell ids g = stream * size + cell, bounds over keys
// stream * 256 + seq_id. Built once per StackedCells; its one widening (StackedCells.fit)
// rebinds seq and n_words in place, so every holder of the pointer sees the wider bitsets.
typedef struct pm_step_cells {
    int64_t   n_stream;
    int64_t   size;
    int64_t   n_words;      // words of a cell's bitset (1-4): it holds ids below 64 * n_words
                            // (a count outside [1, 4]: every kernel declines or refuses)
    int32_t * pos;          // [n_stream * size], -1 = empty
    int32_t * shift;        // [n_stream * size], pending K-shift
    uint64_t * seq;         // [n_stream * size * n_words] sequence bitsets
    int32_t * owner;        // [n_stream * size]: the only sequence, -1 none, -2 several
    int64_t * used;         // [n_stream]
    int64_t * used_max_p1;  // [n_stream]
    uint8_t * used_max_dirty;  // [n_stream] bool: used_max_p1 may be stale (too large)
    int64_t * n_multi;      // [n_stream]: cells with owner -2
    int64_t * pmin;         // [n_stream * 256]
    int64_t * pmax;         // [n_stream * 256]
    uint8_t * pdirty;       // [n_stream * 256]: bit 2 = pmax may be stale
    uint8_t * has_shift;        // [n_stream] bool: a shift may be pending; when 0, every
                                // shift of the stream is 0 (NULL: any may be nonzero)
    int64_t * rows_hi;          // [n_stream]: every K/V row from max(rows_hi, used_max_p1)
                                // on is zero, raised to used_max_p1 before a kernel lowers
                                // it (NULL: not kept, a whole restore zeroes every row)
} pm_step_cells;

// The slot of a ubatch of n_blocks token blocks of n_per tokens, block r in stream
// strm[r] (distinct): cells h, h + 1, ... h + n_per - 1 (wrapped at size) from
// h = heads[strm[r]] (0 when h > used + 2 * n_per), the batched slot search's first
// window. *placed = 1 and idx[r * n_per + j] = those cells when every one is usable:
// empty, or (swa_type 1 STANDARD, 2 CHUNKED, 3 SYMMETRIC with n_swa) held by one
// sequence and outside its window seen from that sequence's next position (pmax + 1).
// *placed = 0 (idx undefined) when one is not, when such a sequence's pmax is stale, or
// n_per > size: the numpy search decides then. PM_ERR_RANGE for a stream outside
// [0, n_stream).
pm_status pm_step_kv_find(const pm_step_cells * c, const int64_t * strm, int64_t n_blocks, int64_t n_per,
                          const int64_t * heads, int32_t swa_type, int64_t n_swa, int32_t * idx,
                          int32_t * placed);

// StackedCells.set_new of such a ubatch, one sequence id per token (seq: n_blocks * n_per
// ids), plus the heads' move unless heads is NULL: token t = r * n_per + j (position
// pos[t], sequence seq[t] alone) fills empty cell idx[t] of stream strm[r]; used /
// used_max_p1 / pmin / pmax follow and heads[strm[r]] = idx[r * n_per + n_per - 1] + 1.
// *top = the largest used_max_p1 of the blocks' streams afterwards (what n_kv is padded
// from), -1 when one of them is dirty. Nothing is written and *placed = 0 when a cell is
// not empty or an id is outside [0, 64 * n_words) (the bitsets are widened first, in
// numpy). Cells shared by several sequences (a forked prompt's) are not touched: the new
// cells are empty ones, each of one sequence.
// PM_ERR_RANGE for a stream or cell outside the stack.
pm_status pm_step_kv_place(pm_step_cells * c, const int64_t * strm, int64_t n_blocks, int64_t n_per,
                           const int32_t * idx, const int32_t * pos, const int32_t * seq, int64_t * heads,
                           int64_t * top, int32_t * placed);

// A whole-cache restore's clear and placement, every stream in one pass: stream s gets
// the counts[s] meta records at words[s] (int32 words at any alignment; NULL when
// counts[s] is 0) in cells [0, counts[s]), and every other cell is emptied, as
// StackedCells.reset then set_new leave them: no shift, used = used_max_p1 = counts[s],
// nothing dirty, has_shift 0, bounds from the records alone (ext is the caller's). With
// spans NULL every record is a fixed one of rec words (position word 0 >= 0, n_seq_id
// word 1 == 1, its one sequence word rec - 1 in [0, n_seq_max)). With spans, spans[s]
// words are readable at words[s] and records may be variable ones (pm_kv_records_var,
// fixed = rec - 1): a cell of several ids gets all their bits, owner -2, and counts in
// n_multi. *placed = 0 with nothing changed when a record is neither: every record of
// every stream is checked before the first write, except into a stack whose every stream
// is empty (below). PM_ERR_RANGE for a count outside [0, size] or a negative span;
// PM_ERR_ARG for a null pointer, rec < 3 or n_seq_max outside [1, 64 * n_words].
// Only cells below max(counts[s], used_max_p1) are written: the rest are empty already.
// Into a stack whose every stream is empty (a clear's, a fresh cache's) each record is
// checked as it is written, in one pass; a refusal then empties those cells again and
// puts the bounds back (PM_ERR_ALLOC, nothing changed, when their copy cannot be made).
pm_status pm_step_kv_refill(pm_step_cells * c, const int32_t * const * words, const int64_t * counts,
                            const int64_t * spans, int64_t rec, int32_t n_seq_max, int32_t * placed);

// KVCache.clear's cells in one call: every stream emptied as StackedCells.reset leaves it
// (positions -1, owners -1, bitsets and shifts 0, bounds clean and empty, used,
// used_max_p1, n_multi 0, has_shift 0; only cells below used_max_p1 are written: the rest
// are empty already) and, unless heads is NULL, heads[s] = 0. A clear costs one call, not
// a refill with no records plus the numpy writes around it (each several microseconds once
// a decode step has evicted the caches). PM_ERR_ARG for a null pointer.
pm_status pm_step_kv_clear(pm_step_cells * c, int64_t * heads);

// A whole blob's n variable meta records at words (int32 words at any alignment, span of
// them readable): each is fixed words (position, n_seq_id, fixed - 2 ext words), then its
// n_seq_id sequence ids. *end = the words they take when each has a position >= 0 and 1 to
// n_seq_max distinct ids in [0, n_seq_max) and the last ends within span; else -1 (the
// general parse names the fault). *multi = the records of several ids. PM_ERR_ARG for a
// null pointer, a negative span or n, fixed < 2 or n_seq_max outside [1, 256].
pm_status pm_kv_records_var(const int32_t * words, int64_t span, int64_t n, int64_t fixed, int32_t n_seq_max,
                            int64_t * end, int64_t * multi);

// Whether stream s's cells already are the n variable whole-cache records at words (span
// int32 words readable, any alignment; no ext: position, n_seq_id, then the ids), so that
// a whole restore's clear + refill of them would change no cell: the stream uses n cells,
// and cell i has record i's position (>= 0) and exactly its ids, each below n_seq_max
// (one id: the cell's owner; several, distinct: owner -2 and a bitset of those ids alone).
// *end = the words the records take when they are; -1 when not (a record it stops at is
// not said to be invalid: the parse checks it). Pending shifts are the caller's to rule
// out. Reads only. PM_ERR_ARG for a null pointer, n or span negative, s outside
// [0, n_stream) or n_seq_max outside [1, the bitsets' ids].
pm_status pm_step_kv_cells_equal_var(const pm_step_cells * c, int64_t s, const int32_t * words, int64_t span,
                                     int64_t n, int32_t n_seq_max, int64_t * end);

// A per-sequence restore's placement, after the sequence's seq_rm: the reference's
// find_slot for n tokens of sequence seq_id in stream s (the first n usable cells in scan
// order from h = heads[s], 0 when h > used + 2 n, wrapping once at the end; usable: empty,
// or with a window (swa_type 1 STANDARD, 2 CHUNKED, 3 SYMMETRIC; 0 none) held by one
// sequence whose next position (its largest + 1) no longer sees it), then apply_ubatch's
// placement (token i at position pos[i] into idx[i]; window-masked cells are overwritten
// as pm_step_kv_overwrite does, in stream s) and the head's move past the last
// one. idx (int32[n]) gets the cells in scan order, run_starts / run_ends (int64[n]
// capacity) their maximal runs of consecutive cells in that order (ends exclusive),
// *n_runs their count. Without a window idx may be NULL: the runs alone are written. With a window, the stream's stale cached bounds are recomputed
// from its cells first (the search reads other sequences' largest positions; a cache
// refresh, as a position query makes, not a change of state). *placed = 0, nothing
// written, when fewer than n cells are usable (a cell shared by several sequences never
// is; the purge takes the losers' bits out of shared cells), an overwrite finds no shift
// array to clear, seq_id is outside [0, 64 n_words), a
// position is negative or the window is not one (swa_type outside [0, 3], n_swa < 1 with
// a window): the numpy search decides then. PM_ERR_RANGE for s outside
// [0, n_stream); PM_ERR_ARG for a null pointer (idx with a window) or n < 1.
pm_status pm_step_kv_restore_seq(pm_step_cells * c, int64_t s, int32_t seq_id, const int32_t * pos, int64_t n,
                                 int32_t swa_type, int64_t n_swa, int64_t * heads, int32_t * idx,
                                 int64_t * run_starts, int64_t * run_ends, int64_t * n_runs, int32_t * placed);

// The whole-array checks of BatchAllocator.init for a batch of one token per sequence
// (distinct ids in [0, n_seq_max), checked by the caller): token ids in [0, n_vocab)
// (n_vocab < 0: only >= 0), positions >= 0 and continuing memory (mem_max[i] >= 0 ->
// pos[order[i]] == mem_max[i] + 1; order NULL = identity; mem_max NULL: no memory). On
// success *ok = 1, out_output[t] = output[t] != 0 (output NULL: only the last token),
// seq_pos[seq[t]] = pos[t] (seq_pos: 256 entries, -1 elsewhere) and *n_outputs = the
// outputs counted. *ok = 0 when a check fails (the outputs are then undefined).
pm_status pm_step_batch_check(const int32_t * token, const int32_t * pos, const int64_t * seq, int64_t n,
                              const int64_t * order, const int64_t * mem_max, int64_t n_vocab,
                              const uint8_t * output, int8_t * out_output, int32_t * seq_pos, int64_t * n_outputs,
                              int32_t * ok);

// pm_step_batch_check for a batch whose every sequence is one run of consecutive tokens
// (a draft or speculative step: k tokens a sequence), n_runs runs in ascending sequence
// order: run r is tokens [first[r], first[r] + len[r]) of sequence run_seq[r]
// (distinct ids below 256, checked by the caller; the runs cover the n tokens once).
// Checks: token ids in [0, n_vocab) (n_vocab < 0: only >= 0), positions >= 0, each run's
// positions consecutive (pos[t + 1] == pos[t] + 1) and its first continuing memory
// (mem_max[r] >= 0 -> pos[first[r]] == mem_max[r] + 1; mem_max NULL: no memory). On
// success *ok = 1, out_output as pm_step_batch_check's, seq_pmin / seq_pmax (256 entries,
// -1 elsewhere) each run's first and last position and *n_outputs. *ok = 0 when a check
// fails; PM_ERR_RANGE for a run outside the tokens or a sequence id outside [0, 256).
pm_status pm_step_batch_check_runs(const int32_t * token, const int32_t * pos, int64_t n, const int64_t * first,
                                   const int64_t * len, const int64_t * run_seq, int64_t n_runs,
                                   const int64_t * mem_max, int64_t n_vocab, const uint8_t * output,
                                   int8_t * out_output, int32_t * seq_pmin, int32_t * seq_pmax, int64_t * n_outputs,
                                   int32_t * ok);

// KVCache.apply_ubatch of a one-stream cache (n_stream 1) whose slot overwrites
// window-masked cells: the n tokens (position pos[t], sequence seq[t] alone) go to cells
// idx[t]. In the numpy path's order: every taken slot cell is emptied (its owner's cached
// bounds marked dirty where the position reached them), the tokens are placed as
// pm_step_kv_place places them, then every sequence that lost one is removed from its
// cells at or below the largest position it lost (the SWA purge: a cell of its own is
// emptied, a cell it shares with others loses its bit and is emptied only when no
// sequence is left; those sequences' bounds marked dirty as seq_rm_upto marks them), and
// heads[0] = idx[n - 1] + 1. *top as pm_step_kv_place. Nothing is written and *placed = 0
// when a taken cell is not held by exactly one sequence, the stack has several streams,
// or an id is outside [0, 64 * n_words). PM_ERR_RANGE for a cell outside the stack.
pm_status pm_step_kv_overwrite(pm_step_cells * c, int64_t n, const int32_t * idx, const int32_t * pos,
                               const int32_t * seq, int64_t * heads, int64_t * top, int32_t * placed);

// The cached largest position of (stream, sequence) keys (stream * 256 + seq_id): out[i]
// = pmax[keys[i]] (-1 for none). *ok = 0 when one of them is stale (pdirty bit 2): the
// numpy query refreshes it then. PM_ERR_RANGE for a key outside the table.
pm_status pm_step_kv_pos_max(const pm_step_cells * c, const int64_t * keys, int64_t n, int64_t * out,
                             int32_t * ok);

// The KQ mask of a ubatch of n_blocks blocks of n_per tokens, block r in stream strm[r]:
// out[t][j] (t = r * n_per + i, j < n_kv; f16 for elem_size 2, f32 for 4) is 0 when cell
// j of that stream holds sequence seq[t] alone (owner) at a position in the token's
// window, -inf elsewhere. The window of a token at p = pos[t]: causal: <= p; swa_type 1
// (STANDARD): >= p - (n_swa - 1); 2 (CHUNKED): >= (p / n_swa) * n_swa; 3 (SYMMETRIC):
// |cell - p| <= n_swa / 2; bounds taken into int32 as kv/inputs._window takes them.
// *done = 0, nothing written, when a stream holds a shared cell (the numpy evaluation
// decides) or swa_type is unknown. PM_ERR_RANGE for a stream outside the stack or
// n_kv > size.
pm_status pm_step_kq_mask(const pm_step_cells * c, const int64_t * strm, int64_t n_blocks, int64_t n_per,
                          const int32_t * seq, const int32_t * pos, int32_t swa_type, int64_t n_swa,
                          int32_t causal, int64_t n_kv, int32_t elem_size, void * out, int32_t * done);

// The steady decode step of a recurrent memory's find_slot (pymem.recurrent.cells), on
// the cells a placement works on: when tail (size entries) is byte-equal to tail_snap,
// ids (n ids) to ids_snap, every set goes on where it stopped (last_pos[s] == pos[lo + s]
// + n_seq_tokens) and every cell of [lo, lo + n) is its own source (src[lo + s] == lo +
// s), then pos[lo + s] = last_pos[s], src0[lo + s] = lo + s, n_last[ids[s]] =
// n_seq_tokens and *done = 1 (the caller sets rs_z = -1, head = lo, n and used). Else
// *done = 0 and nothing is written (also for a window or id outside the cells / n_last):
// the numpy path decides, logs any jump and raises what it raises. With dry != 0 only
// *done is written (whether the step holds): a plan asks it of the live cells, and the
// apply that follows, the memory unchanged, places the step in them.
pm_status pm_step_rs_steady(int64_t size, const int32_t * tail, const int32_t * tail_snap, const int32_t * ids,
                            const int32_t * ids_snap, int64_t n, int64_t lo, int32_t * pos, const int32_t * src,
                            int32_t * src0, uint32_t * n_last, int64_t n_last_size, const int32_t * last_pos,
                            int32_t n_seq_tokens, int32_t dry, int32_t * done);

// RecurrentCells.drop_seq: seq_id (in [0, n_tail)) leaves its tail cell (tail[seq_id] =
// -1); when no other sequence's tail names that cell, it is emptied (pos and src -1) and
// *emptied is it, else -1 (also for a sequence without a cell). The caller keeps used and
// head. PM_ERR_RANGE, nothing written, for seq_id outside or a tail cell past size.
pm_status pm_rs_drop_seq(int32_t * tail, int32_t * pos, int32_t * src, int64_t n_tail, int64_t size,
                         int32_t seq_id, int32_t * emptied);

// RecurrentMemory.seq_pos_min_of of ids all in [0, size): out[i] = pos[tail[ids[i]]], -1
// when the sequence holds no cell (tail -1). PM_ERR_RANGE for an id or tail outside.
pm_status pm_step_rs_pos(const int32_t * tail, const int32_t * pos, int64_t size, const int64_t * ids, int64_t n,
                         int64_t * out);

// HybridMemory.seq_pos_max_of in one call, for an attention part that is one KV cache:
// out[i] = min(pmax[keys[i]], max(pos[tail[ids[i]]], -1)), the lesser of what the cache
// and the recurrent cells hold (-1 where either holds nothing). keys as
// pm_step_kv_pos_max's (*ok = 0, out undefined, when one is stale); ids, tail and pos as
// pm_step_rs_pos's (PM_ERR_RANGE for an id or tail outside, or a key outside the table).
pm_status pm_step_hybrid_pos_max(const pm_step_cells * c, const int64_t * keys, const int32_t * tail,
                                 const int32_t * pos, int64_t size, const int64_t * ids, int64_t n, int64_t * out,
                                 int32_t * ok);

// The cells of one stream (pos, owner: int32[n]; bits: its bitsets, n_words a cell) that
// sequence seq_id holds with p0 <= pos < p1, ascending: those it holds alone (owner ==
// seq_id) and, unless bits is NULL, the shared ones (owner -2) with its bit; *count of
// them, and the first cap of their indices into out. PM_ERR_RANGE (with *count the whole
// count) when there are more than cap; PM_ERR_ARG for a null pointer, n < 0, p0 < 0,
// seq_id < 0 or, with bits, n_words outside [1, 4].
pm_status pm_kv_seq_cells_range(const int32_t * pos, const int32_t * owner, const uint64_t * bits, int64_t n_words,
                                int64_t n, int32_t seq_id, int32_t p0, int32_t p1, int64_t * out, int64_t cap,
                                int64_t * count);

// KVCells.seq_rm_bit of the cells of stream strm below n_scan that sequence seq_id holds
// with p0 <= pos < p1 (p0 >= 0), found in the same pass: each is emptied (pos -1, no shift,
// no sequence, owner -1), used drops by their count and used_max_p1 turns dirty when the
// last one reaches it; the sequence's bounds are reset to those of a sequence without
// cells when `whole` (the caller knows no cell of it is left), else marked stale on the
// side a removed position reaches (pos <= pmin: bit 1, pos >= pmax: bit 2). *n_freed and
// *first_freed (-1 when none) say what was emptied. A cell seq_id shares with other
// sequences (owner -2) loses its bit and keeps its position: its owner is recounted (the
// one sequence left, n_multi down) and its position counts for the bounds as an emptied
// cell's does (KVCells.seq_rm_bit). *done = 1 unless an argument is refused. PM_ERR_RANGE for a
// stream, an id (0..255) or n_scan outside the stack; PM_ERR_ARG for a null pointer or
// p0 < 0 or an n_words outside [1, 4]. The cache must keep no ext and no undo journal (the
// caller checks).
pm_status pm_step_kv_rm_seq(pm_step_cells * c, int64_t strm, int32_t seq_id, int64_t p0, int64_t p1, int32_t whole,
                            int64_t n_scan, int64_t * n_freed, int64_t * first_freed, int32_t * done);

// KVCache.seq_rm of one sequence (seq_id in [0, 256), p0 >= 0) in one call: what the
// sequence's cached bounds say decides first, as KVCells.range_cover does (p1 <= p0, or
// clean bounds outside [p0, p1): nothing to remove; clean bounds inside it: the whole
// sequence), then pm_step_kv_rm_seq of the stream's cells below used_max_p1, and, unless
// heads is NULL, heads[strm] moves back to the first emptied cell when that is before it.
// *n_freed, *first_freed (-1: none) and *done as pm_step_kv_rm_seq's (*done = 1 when
// nothing was to be removed). The Python it replaces read five numpy scalars (several
// microseconds once a decode step has evicted the caches). Errors and the caller's duties
// (no ext, no undo journal) as pm_step_kv_rm_seq's.
pm_status pm_step_kv_seq_rm(pm_step_cells * c, int64_t * heads, int64_t strm, int32_t seq_id, int64_t p0,
                            int64_t p1, int64_t * n_freed, int64_t * first_freed, int32_t * done);

// Whether sequence q holds a cell of stream s together with another sequence (a shared
// cell: owner -2 with q's bit set), which a restore into the cells q holds cannot keep. 0
// at once when s holds no shared cell (n_multi 0), q is outside the bitsets or holds no
// cell (its current bounds say so); else the stream's owners are scanned, blocks of 32
// without a shared cell passed by their count, up to the last shared cell. Reads only; 0
// for a stream outside the stack.
int32_t pm_step_seq_shared(const pm_step_cells * c, int64_t s, int32_t q);

// Whether pm_step_kv_restore_seq places n cells of seq_id into stream s for sure (never
// declines) once seq_id's cells are removed: `fit` (pm_kv_read_seq_place's found[3], the
// cells it may take without a window's help) >= n, an id inside the
// bitsets, a window type in [0, 3] (n_swa > 0 with one) and, with a window (whose search
// may take masked cells and then overwrites them, apply_ubatch's purge included), a
// shift array. Reads only; c must not be NULL.
int32_t pm_step_kv_place_sure(const pm_step_cells * c, int64_t s, int32_t seq_id, int64_t n, int64_t fit,
                              int32_t swa_type, int64_t n_swa);

// The two restores below place cells and store bytes: they take a blob view and the
// cells both, so they are declared here, after both types, and defined in
// pymem_stateio.c, beside the parse and data walk they use.

// A per-sequence restore that places seq_id anew, in one call: pm_kv_read_seq_place's
// parse (pos: pos_cap >= the part's cells, its scratch), then, when `held` (the sequence
// may hold cells of its stream: a restore over them, or any restore of a sliding-window
// cache), its seq_rm (pm_step_kv_rm_seq of every position, the head back to the first
// cell freed), pm_step_kv_restore_seq's placement with the window swa_type / n_swa (0, 0:
// none; idx: idx_cap, its scratch; the runs in b's run scratch of the stream) and
// pm_kv_read_seq_place's store: the order the two-phase restore runs them in. Without
// `held` the caller vouches that seq_id holds no cell of its stream (a swap-in). Nothing
// changes before pm_step_kv_place_sure proves the placement. On success *done = 1 and
// *consumed = the blob's bytes; *done = 0 with nothing changed wherever the parse or that
// proof declines (b with ext, too few cells the window need not free, a stale bound: the
// caller's two-phase restore then places the sequence, or names what is wrong). b and c
// must view the same cells. PM_ERR_ARG for a null pointer.
pm_status pm_kv_read_seq_placed(const pm_kv_seq_blob * b, pm_step_cells * c, int32_t seq_id, int32_t held,
                                int32_t swa_type, int64_t n_swa, const void * blob, int64_t avail, int32_t * pos,
                                int64_t pos_cap, int32_t * idx, int64_t idx_cap, int64_t * consumed,
                                int32_t * done);

// A whole restore's commit after pm_kv_read_whole_blob's parse (mode 0) of the same blob
// found counts, offsets and same: the cells placed (same: the heads alone move to 0; else
// pm_step_kv_refill of every stream's records, fixed or variable, then the heads to 0), every stream's bytes
// stored (mode 1) and every row past each stream's cells zeroed (every channel of a
// transposed V, as the reference's clear(true) leaves them; on pm_set_copy_threads'
// threads), what WholeBlobPlan.commit does in several calls; has_shift then 0 in c.
// No ext (b->n_ext 0). *done = 0 with nothing changed where the refill declines a record
// (the blob changed since the parse) or a tensor fails the checks of the bytes' store or
// the zeroing (not in host memory; checked before the refill); *done = 1 when all of it
// ran. `records` (pm_records) says who checked the records: PM_RECORDS_PARSED the
// caller's parse, in an earlier call (the refill checks them all again before its first
// write, or as it writes into a stack whose every stream is empty);
// PM_RECORDS_PARSED_HERE a parse in the same native call (pm_whole_read's): no check
// before the first write, each record checked as it is written, and one that fails after
// all (the blob changed during the call) leaves the cells emptied with PM_ERR_RANGE.
// PM_ERR_ARG for a null pointer, views of other cells, an offset past the blob or another
// `records`;
// PM_ERR_RANGE when the store's checks fail after the placement (the blob changed while
// it was restored).
typedef enum {
    PM_RECORDS_PARSED = 0,       // by the caller's parse, in an earlier call
    PM_RECORDS_PARSED_HERE = 1,  // by a parse in the same native call
} pm_records;

pm_status pm_kv_read_whole_commit(const pm_kv_seq_blob * b, pm_step_cells * c, const void * blob, int64_t avail,
                                  const int64_t * counts, const int64_t * offsets, int32_t same, int32_t records,
                                  int32_t * done);

// PYMEM_CDEF_END

// C only: pm_step_kv_refill that also says, where used is not NULL and it places them,
// the words each stream's records took (used[s]: where its data starts, so the store's
// parse need not walk variable records again).
pm_status pm_step_kv_refill_used(pm_step_cells * c, const int32_t * const * words, const int64_t * counts,
                                 const int64_t * spans, int64_t rec, int32_t n_seq_max, int32_t * placed,
                                 int64_t * used);

// C only (not bound to Python): pm_step_kv_refill for records a parse in the same native
// call has just checked (pm_kv_read_whole_commit's PM_RECORDS_PARSED_HERE; spans as pm_step_kv_refill's,
// required). No check before the first write: each record is checked as it is written,
// and one that fails after all (the blob changed during the call) leaves every stream
// emptied, as a clear leaves it, with PM_ERR_RANGE. PM_ERR_ARG as pm_step_kv_refill. On
// PM_OK, spans[s] = the words stream s's records took (where its data starts: the
// store's parse need not walk variable records again).
pm_status pm_step_kv_refill_trusted(pm_step_cells * c, const int32_t * const * words, const int64_t * counts,
                                    int64_t * spans, int64_t rec, int32_t n_seq_max);

// C only: stream s of a stack, empty (no cell below its used_max_p1 of 0), gets its n
// records at words (span words readable; 0: fixed ones only), fixed or variable, each
// checked as it is written (one pass over them): positions, owners, bits, n_multi and the
// bounds, as a refill leaves them, but not the counters (used, used_max_p1: 0 still, for
// pm_step_kv_filled to set once the rest of the blob is checked). 1 and *used = the words
// the records took; 0 at the first record that is neither, the stream then empty again
// (pm_step_unfill).
int pm_step_fill_empty(pm_step_cells * c, int64_t s, const int32_t * words, int64_t n, int64_t span, int64_t rec,
                       int32_t n_seq_max, int64_t * used);

// C only: pm_kv_read_whole_blob's parse (mode 0) of a whole blob into cells c, every
// stream of which is empty (a cleared memory's), placing each stream's records as it
// checks them (pm_step_fill_empty: one pass over them where the parse and the refill took
// two), then checking its data section's headers and ranges. found [3 * n_stream]: the
// counts, the records' byte offsets and their spans in words. *done = 1 and *consumed =
// the blob's bytes with the records placed but the counters not set (the cells are not
// the memory's yet: pm_kv_read_whole_commit_placed stores the rest, pm_step_unfill of
// each stream's count undoes them); *done = 0 with every stream empty again where
// anything is refused (the general parse names it). No ext. PM_ERR_ARG for a null
// pointer, views of other cells or a stream that holds a cell.
pm_status pm_kv_place_whole_empty(const pm_kv_seq_blob * b, pm_step_cells * c, const void * blob, int64_t avail,
                                  int64_t * found, int64_t * consumed, int32_t * done);

// C only: pm_kv_read_whole_commit of the blob pm_kv_place_whole_empty placed (found, as it
// left it): the counters set (the cells are the memory's from then on: used_max_p1 > 0 in
// every stream with cells), the heads to 0, the bytes stored and the rows past the cells
// zeroed. *done = 0 with the counters not set (the caller undoes the placement) where a
// tensor fails the checks of the store or the zeroing, PM_ERR_ALLOC likewise;
// PM_ERR_RANGE when the store's checks fail after the counters were set (the blob
// changed since the placement).
pm_status pm_kv_read_whole_commit_placed(const pm_kv_seq_blob * b, pm_step_cells * c, const void * blob,
                                         int64_t avail, const int64_t * found, int32_t * done);

// C only: pm_step_fill_empty undone: stream s's cells [0, n) emptied, its bounds reset
// (as for no cell) and no shared cell counted.
void pm_step_unfill(pm_step_cells * c, int64_t s, int64_t n);

// C only: the counters of stream s after pm_step_fill_empty of n records (a refill's).
void pm_step_kv_filled(pm_step_cells * c, int64_t s, int64_t n);

#ifdef __cplusplus
}
#endif

// State restore kernels: decide in one pass over a stream's cells whether a per-sequence
// restore puts the sequence back in the very cells it holds (so the reference's seq_rm +
// find_slot + apply_ubatch would leave every cell as it is), and move the restored K/V
// bytes of every layer into host tensors in one call.
#pragma once

#include "pymem_native.h"

#ifdef __cplusplus
extern "C" {
#endif

// PYMEM_CDEF_BEGIN: plain declarations only (csrc/gen_cffi.py hands them to cffi)

// Whether restoring the n meta records `words` (rec int32 words each: pos, n_seq_id, then
// n_ext ext words, then one seq id) as sequence seq_id into one stream of `size` cells
// (pos, owner: int32[size]; shift: int32[size], or NULL when the stream has no pending
// shift; ext: int32[size][3] or NULL when n_ext == 0) leaves
// every cell as it is: the cells whose owner is seq_id are exactly n, in ascending order
// they carry the records' positions (and ext), no shift is pending on them, every record
// has n_seq_id 1, and the reference's slot search after removing the sequence takes
// exactly them in that order: it starts at h = min(head, first cell) (0 when
// h > used + n, i.e. more than used - n + 2n), scans up and takes the first n empty
// cells, so no empty cell may lie in [h, last cell]. The caller makes sure no cell is
// shared by several sequences (owner OWNER_MULTI) and that the cache has no sliding window.
// *same = 1 and run_starts / run_ends (int64[n] capacity: the maximal runs of consecutive
// cells, ends exclusive), *n_runs and, unless NULL, idx (int64[n], the cells ascending)
// filled; else *same = 0. PM_ERR_ARG for a null pointer (idx aside), n < 1, size < 1,
// rec != 3 + n_ext or n_ext not 0 or 3.
pm_status pm_kv_seq_same_cells(const int32_t * pos, const int32_t * shift, const int32_t * owner,
                               const int32_t * ext, int64_t size, int32_t seq_id, int64_t head, int64_t used,
                               const int32_t * words, int64_t n, int64_t rec, int64_t n_ext, int64_t * idx,
                               int64_t * run_starts, int64_t * run_ends, int64_t * n_runs, int32_t * same);

// Write n_sec contiguous source sections into host tensors, the cells of one run set:
// section k (params[k] = {byte offset of the stream's cell 0, cell_stride, cell_bytes,
// n_rep, rep_stride}) takes, for r in [0, n_rep), for each run [run_starts[i],
// run_ends[i]), for each cell c of it, cell_bytes bytes from src[k] (in that order) to
// tensor bytes [offset + r * rep_stride + c * cell_stride, + cell_bytes). A K/V row
// section: cell_stride = row size, n_rep 1; a transposed-V section: cell_stride =
// element size, n_rep = channels, rep_stride = kv_size * element size. Runs come in the
// order of the source (a wrapped slot lists later cells first). A NULL src[k] writes zeros
// there instead (a restore clearing the cells it does not fill). Every section is checked
// before any byte moves: PM_ERR_ARG for a null pointer (src[k] aside), a non-host tensor, a
// negative count, an empty or negative run, repetitions that overlap; PM_ERR_RANGE for a
// byte outside a tensor. The bytes move on pm_set_copy_threads' threads (a list of pieces
// that cannot be allocated: on the calling thread; nothing here fails for memory), so two
// sections must not write the same bytes: their order is not kept (not checked: every
// caller writes each layer's K and V tensors once).
pm_status pm_stateio_put_cells(struct ggml_tensor * const * tensors, const void * const * src,
                               const int64_t * params, int64_t n_sec, const int64_t * run_starts,
                               const int64_t * run_ends, int64_t n_runs);

// Whether cells [0, n) of a stream already hold the n whole-cache meta records `words` (rec
// int32 words each: pos, n_seq_id, then n_ext ext words, then one seq id), so that a whole
// restore's clear + placing them changes no cell: every record has n_seq_id 1, a
// position >= 0 (an empty cell never matches) and an id below n_seq_max (a cell held by a
// sequence past it matches no record: the parse refuses such a record), and cell c has
// record c's position, ext and owner (its one sequence; owners of shared cells are
// negative, so they never match). Blocks of 64 cells; the first that differs ends the
// scan. *same = 1 or 0. PM_ERR_ARG for a null pointer, n < 0, rec != 3 + n_ext, n_ext not
// 0 or 3, or n_seq_max < 1.
pm_status pm_kv_cells_equal(const int32_t * pos, const int32_t * owner, const int32_t * ext, const int32_t * words,
                            int64_t n, int64_t rec, int64_t n_ext, int32_t n_seq_max, int32_t * same);

// Where the n variable-length records of a whole-cache blob's stream start, in one
// sequential pass (the numpy reference doubles pointers over every word): record k at
// word offs[k] holds `fixed` words (pos, n_seq_id, ext) and then its n_seq_id ids, among
// the `size` words at `words` (any alignment: a blob's). A count read as unsigned; past n_seq_max it moves the next
// record by n_seq_max + 1 (as the reference's jump table does) and is reported below.
// *end = the word after the last record's ids. *bad = -1 when every record fits; else
// the record the first fault names, *why: 1 a record starts past size - fixed (the
// earliest such), else 2 a count above n_seq_max (the earliest), else 3 the last
// record's ids pass the end. PM_ERR_ARG for a null pointer, n < 1, fixed < 2 or
// size < fixed.
pm_status pm_kv_chase_records(const int32_t * words, int64_t size, int64_t n, int64_t fixed, int64_t n_seq_max,
                              int64_t * offs, int64_t * end, int64_t * bad, int32_t * why);

// The state blob's meta records of the cells of n_runs runs, in order, into out (cap_words
// int32 words): pos, n_seq_id (1 with_id, else 0), the n_ext (0 or 3) ext words
// (ext: int32[size][3]), then with_id the id: seq_id, or for seq_id -1 the cell's owner.
// PM_ERR_RANGE when out is too small; PM_ERR_ARG for a null pointer or a bad run.
pm_status pm_kv_meta_words(const int32_t * pos, const int32_t * owner, const int32_t * ext, int64_t n_ext,
                           const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs, int32_t seq_id,
                           int32_t with_id, int32_t * out, int64_t cap_words);

// The cells a state blob of one stream holds, in one pass: seq_id >= 0 those whose owner
// is seq_id (the caller makes sure no cell is shared), seq_id -1 every non-empty cell
// (pos >= 0). Their maximal runs into run_starts / run_ends (exclusive; cap of them,
// size / 2 + 1 always suffice), *n cells, *n_runs runs, *shared = 1 when a selected cell's
// owner is not one sequence id in [0, n_seq_max) (whole-cache records then need the cells'
// bitsets). PM_ERR_RANGE when there are more than cap runs; PM_ERR_ARG for a null pointer
// or size < 0.
pm_status pm_kv_select(const int32_t * pos, const int32_t * owner, int64_t size, int32_t seq_id, int32_t n_seq_max,
                       int64_t * run_starts, int64_t * run_ends, int64_t cap, int64_t * n, int64_t * n_runs,
                       int32_t * shared);

// A stream's whole part of a state blob in one call, straight into out (cap bytes): u32
// cell count n, the n meta records (pm_kv_meta_words), u32 v_trans, u32 n_layer, then per
// layer i32 type_k, u64 K row size and the K rows of the selected cells, then per layer
// with V i32 type_v and either u64 V row size and the V rows, or (v_trans) u32 element
// size, u32 channels and each channel's elements of the selected cells. The cells are
// those pm_kv_select found (n of them in the n_runs runs run_starts / run_ends, ascending,
// ends exclusive). With `bits` (the stream's cell bitsets, n_words a cell; a whole stream
// only: seq_id -1 with with_id) each record lists the ids of its cell below n_seq_max, in
// ascending order, after n_seq_id = their count (a cell shared by several sequences lists
// them all, as llama.cpp's state_write_meta does); without, one id (its owner). `spec` (int64):
// [n_layer, v_trans, type_k, type_v, kv_size, v_el, stream] then per layer 3 words: K row
// size, V row size (0: the layer has no V; v_trans: any non-zero value), V channels;
// tensors: n_layer K tensors then n_layer V tensors (NULL where no V), host tensors whose
// rows are exactly those sizes. *written = the section's bytes (4 when n is 0). Every check
// comes before any byte of out is written: PM_ERR_ARG for a null pointer, a non-host
// tensor, a bad spec, runs that are empty, overlap, descend, leave the stream or do not add
// up to n; PM_ERR_RANGE when out is smaller than the section (*written then says how
// large) or a selected cell lies outside a tensor.
pm_status pm_kv_write_section(const int32_t * pos, const int32_t * owner, const int32_t * ext, int64_t n_ext,
                              int64_t size, int32_t seq_id, int32_t with_id, const int64_t * spec,
                              struct ggml_tensor * const * tensors, int64_t n, int64_t n_runs,
                              const int64_t * run_starts, const int64_t * run_ends, const uint64_t * bits,
                              int64_t n_words, int32_t n_seq_max, void * out, int64_t cap, int64_t * written);

// The ids the whole-cache records of the cells of n_runs runs list (pm_kv_write_section
// with bits): one per cell of one sequence below n_seq_max, none for an id at or past it,
// a shared cell's (owner -2) from its bitset (bits: the stream's, n_words in [1, 4] a
// cell), into *ids. PM_ERR_ARG for a null pointer, a bad count or runs that are empty,
// overlap, descend or pass the stream's `size` cells.
pm_status pm_kv_record_ids(const int32_t * owner, int64_t size, const uint64_t * bits, int64_t n_words,
                           int32_t n_seq_max, const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs,
                           int64_t * ids);

// A cache's per-sequence blob paths in one call each (pymem.kv.state_io.SeqBlob builds
// this once per cache: every pointer below stays valid for the cache's life). Per stream s:
// pos[s], owner[s] (int32[size]), shift[s] (int32[size]), ext[s] (int32[size][3], or NULL
// when n_ext == 0), spec[s] (pm_kv_write_section's words), run scratch run_starts[s] /
// run_ends[s] (int64[runs_cap], runs_cap >= size / 2 + 1) and selected[2 s], [2 s + 1]
// (the cell and run counts the last search of stream s left there; selected has
// 4 n_stream words: selected[2 n_stream + s] says whether the last whole selection of
// stream s found a cell not of one id below n_seq_max, selected[3 n_stream + s] how many
// ids its records list); the stream counters
// n_multi, used, heads (int64[n_stream]) and has_shift (uint8[n_stream]); seq_to_stream
// (int32[n_seq]); tensors as for pm_kv_write_section; cells: the cache's
// pm_step_cells over the same arrays (its bitsets say which sequences a shared cell
// holds: a write selects the sequence's shared cells, a restore into the cells a
// sequence holds declines one that shares any, the placed restores remove its bits), or
// NULL: then a stream with any shared cell is declined.
struct pm_step_cells;
typedef struct pm_kv_seq_blob {
    int32_t n_stream;
    int32_t n_seq;
    int32_t n_seq_max;  // records carry the seq id word when seq_id < n_seq_max
    int32_t n_ext;
    int64_t size;
    int64_t runs_cap;
    const int32_t * seq_to_stream;
    const int32_t * const * pos;
    const int32_t * const * owner;
    const int32_t * const * shift;
    const int32_t * const * ext;
    const int64_t * const * spec;
    int64_t * const * run_starts;
    int64_t * const * run_ends;
    int64_t * selected;
    const int64_t * n_multi;
    const int64_t * used;
    int64_t * heads;
    const uint8_t * has_shift;
    struct ggml_tensor * const * tensors;
    const struct pm_step_cells * cells;
} pm_kv_seq_blob;

// The whole blob of sequence seq_id (u32 n_stream; its stream's part as
// pm_kv_write_section writes it; a zero u32 for every other stream) into out (cap
// bytes; out NULL with cap 0: the size only, PM_ERR_RANGE). *written = the blob's bytes.
// The sequence's cells are searched, unless `reuse`: then the runs the last search of its
// stream left in the scratch are written (a new blob sized by a query just before: one
// search, not two; runs that no longer add up are refused, PM_ERR_ARG, nothing written).
// Cells seq_id shares with other sequences are selected by its bit, as its own are (the
// records of a sequence's blob do not depend on who else holds a cell). *declined = 1,
// nothing written, when the stream holds a shared cell and the view has no `cells` to
// tell (the caller's general writer handles those). PM_ERR_RANGE, nothing written, when
// cap is too small; PM_ERR_ARG for a null pointer or a seq_id outside [0, n_seq).
//
// A sliding-window cache writes only the sequence's cells its last token still sees: those
// with a position in [p_lo, p_hi] (the caller derives the bounds from the window type,
// n_swa and the sequence's largest position); any other cache passes INT32_MIN, INT32_MAX.
pm_status pm_kv_write_seq_blob(const pm_kv_seq_blob * b, int32_t seq_id, int32_t reuse, int64_t p_lo, int64_t p_hi,
                               void * out, int64_t cap, int64_t * written, int32_t * declined);

// The whole cache's blob (u32 n_stream, then every stream's part as pm_kv_write_section
// writes it for all its non-empty cells, records with their ids: by the view's cells'
// bitsets when it has them) into out (cap bytes; out NULL with cap 0: the size only,
// PM_ERR_RANGE). *written = the blob's bytes. Every stream's cells are selected into its
// run scratch (b->selected), unless `reuse`: then the runs the last call of this kind left
// there are written (a size query just before, with no change since: the caller's
// promise). *declined = 1, nothing written, when a stream holds a cell not of one id below
// n_seq_max and the view has no `cells` (the caller's general writer).
// PM_ERR_RANGE, nothing written, when cap is too small; PM_ERR_ARG for a null pointer or a
// bad view.
pm_status pm_kv_write_whole_blob(const pm_kv_seq_blob * b, int32_t reuse, void * out, int64_t cap,
                                 int64_t * written, int32_t * declined);

// A per-sequence restore of a whole blob (as pm_kv_write_seq_blob writes it) that changes no
// cell, in one call: the first stream with cells is read into seq_id's stream (as the
// reference reads a sequence's blob) and every stream after it must be empty; that part
// must put seq_id back into exactly the cells it holds
// (pm_kv_seq_same_cells; never when it shares one with another sequence:
// pm_step_seq_shared), with the cache's headers and every byte in range. On success
// *done = 1, *consumed = the blob's bytes, and heads[stream] moved as a placement would.
// *done = 0 with nothing changed otherwise (the caller takes the general restore, which
// names what differs). `store` 0: every check runs and nothing is stored (*done and
// *consumed say whether and how much a call with it would take: a two-phase parse); 1:
// every check, then the store; 2: the store into the runs the last call for this stream
// found (its scratch, and selected[2 s + 1] their count), without the owner scan and the
// records' comparison (the caller vouches that neither the cache nor the blob changed
// since: a commit right after its parse); the headers, ranges and the runs' cell count are
// checked still. A call that finds the sequence's cells leaves selected[2 s], [2 s + 1] =
// their cell and run counts, any other -1. PM_ERR_ARG for a null pointer, a seq_id outside
// [0, n_seq) or a store outside [0, 2].
pm_status pm_kv_read_seq_blob(const pm_kv_seq_blob * b, int32_t seq_id, const void * blob, int64_t avail,
                              int32_t store, int64_t * consumed, int32_t * done);

// A per-sequence restore that places the sequence (a swap-in after its seq_rm, or a
// sliding-window cache, whose restore may take cells its window masks) in few calls: the
// parse here, the placement by the caller (pm_step_kv_restore_seq), the store here. The
// blob is read as pm_kv_read_seq_blob reads it (its first stream with cells goes to
// seq_id's stream s; every stream after it must be empty).
//  n_runs 0, the parse: the headers against b->spec[s], every byte range and every record
//     (n_seq_id 1, position >= 0) are checked; found[0] = n (the part's cells), found[1] =
//     the byte offset of its records, found[2] = the blob's bytes, found[3] = the cells of
//     s a seq_id restore may take without any window's help (empty, or held by seq_id:
//     its seq_rm frees them), counted only as far as needed: the empty ones alone when
//     they are n or more (found[3] >= n proves the fit); with pos (pos_cap >= n) the n
//     positions are copied there (written even when the call declines).
//  n_runs > 0, the store: the same checks, then the bytes go into the cells of the runs
//     (run_starts / run_ends: n_runs runs inside [0, size) holding n cells in all, in slot
//     order, as the placement found them; any order). No cell, head or counter changes.
// *done = 1 when it applies; *done = 0 with nothing changed otherwise: shared cells in s
// and no `cells` in the view, no cell in the blob, a record or header that differs, bytes out of range, a second stream
// with cells, runs that do not hold n cells (the caller's general restore then names what
// is wrong). PM_ERR_ARG for a null pointer or a seq_id outside [0, n_seq).
pm_status pm_kv_read_seq_place(const pm_kv_seq_blob * b, int32_t seq_id, const void * blob, int64_t avail,
                               int32_t * pos, int64_t pos_cap, const int64_t * run_starts,
                               const int64_t * run_ends, int64_t n_runs, int64_t * found, int32_t * done);

// The meta records of one stream of a whole-cache state blob (rec int32 words each, at
// any alignment: pos, n_seq_id, n_ext ext words, then the ids), read as fixed records of
// one id: *first_bad = the first record whose n_seq_id is not 1, whose position is below 0
// or whose id (word rec - 1) is outside [0, n_seq_max); -1 when every one of the n is
// such a record (the restore then places them with pm_step_kv_place_records; otherwise the
// general parse reads variable records or names the fault). PM_ERR_ARG for a null pointer,
// n < 0, rec < 3 or n_seq_max outside [1, 256].
pm_status pm_kv_records_fixed(const int32_t * words, int64_t n, int64_t rec, int32_t n_seq_max,
                              int64_t * first_bad);

// A whole-cache restore of a whole blob (u32 n_stream, then per stream s: u32 cell count
// n_s <= size, n_s meta records, the data section as pm_kv_write_section writes it for
// cells [0, n_s); nothing after a zero count) in few calls, for blobs whose every record
// is a fixed one (pm_kv_records_fixed with b->n_seq_max) or, without ext, a valid variable
// one (pm_kv_records_var: cells shared by several sequences, as a forked cache writes). `mode`:
//  0: the parse. Every header against b->spec[s], every byte range and every record are
//     checked; counts[s] = n_s and offsets[s] = the byte offset of stream s's records
//     (int64[n_stream] each); *same = 1 when every stream's cells already are its records
//     (pm_kv_cells_equal over [0, n_s), no other cell used, no shared cell, no pending
//     shift: the restore then changes no cell).
//  1: the commit, after the records' placement. The headers and ranges are checked again
//     (not the records: the parse or mode 2 did, and the placement checks them once
//     more), then every stream's bytes are stored into its cells [0, n_s). A stream whose
//     cells hold no shared cell (b->n_multi) placed fixed records only; one that does is
//     walked as variable records.
//  2: mode 0's checks again, nothing stored (a composite's last look before any part
//     commits: the caller compares counts, offsets and *same with the parse's).
// *done = 1 with *consumed = the blob's bytes when all of it applies; *done = 0 with
// nothing stored otherwise (the general parse then names what differs). The cells and
// heads are the caller's (pm_step_kv_refill). PM_ERR_ARG for a null pointer, a bad view or
// a mode outside [0, 2]; PM_ERR_ALLOC.
pm_status pm_kv_read_whole_blob(const pm_kv_seq_blob * b, const void * blob, int64_t avail, int32_t mode,
                                int64_t * counts, int64_t * offsets, int32_t * same, int64_t * consumed,
                                int32_t * done);

// One row of each of n host tensors, each after its header, as a recurrent state section
// holds a sequence's cell: per tensor i32 spec[2 i] (type), u64 spec[2 i + 1] (row size,
// the tensor's nb[1]; 0 for a zero-wide tensor, whose header stands alone), then that many
// bytes of row `row` (none when row < 0). *written = the bytes it takes; PM_ERR_RANGE,
// nothing written, when cap is smaller; PM_ERR_ARG for a null pointer, a tensor not in
// host memory, another row size or a row past its end.
pm_status pm_rows_section(struct ggml_tensor * const * tensors, const int64_t * spec, int64_t n, int64_t row,
                          void * out, int64_t cap, int64_t * written);

// The tensor sections of a recurrent state holding several cells: per tensor the header
// as pm_rows_section writes it, then the rows of every run [run_starts[k], run_ends[k]),
// runs in the order given (any order; each run's rows ascending). *written = their bytes;
// PM_ERR_RANGE, nothing written, when cap is smaller; PM_ERR_ARG as pm_rows_section, or for
// a run that is empty or starts below 0. The rows move on pm_set_copy_threads' threads.
pm_status pm_rows_sections(struct ggml_tensor * const * tensors, const int64_t * spec, int64_t n,
                           const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs, void * out,
                           int64_t cap, int64_t * written);

// The tensor sections of a recurrent state part (per tensor: i32 type, u64 row size, then
// n_rows rows). Without `store`: checked against spec (pm_rows_section's). With it: the
// rows stored into rows [dst_row, dst_row + n_rows) of each host tensor, the headers not
// compared again (a parse checked them: a restore's commit cannot fail halfway through a
// composite; it writes the bytes that are there, as a payload write does). *consumed =
// the sections' bytes; -1 (nothing stored) when a header differs from spec or the data
// runs out first (the caller's own parse then names what). PM_ERR_ARG for a null pointer,
// a tensor not in host memory or destination rows past its end.
pm_status pm_rows_store(struct ggml_tensor * const * tensors, const int64_t * spec, int64_t n, int64_t n_rows,
                        int64_t dst_row, const void * data, int64_t avail, int32_t store, int64_t * consumed);

// A recurrent memory's whole state section in one call, as the reference writes it: u32
// cell count k, then per cell holding a sequence (ascending) META i32 pos, u32 n_seq_id and
// its sequence ids ascending, then u32 s_trans (0), u32 n_layer and the tensor sections of
// pm_rows_sections over those cells' rows. tail[q] (q in [0, size)) is sequence q's cell
// (-1: none; any other value outside [0, size) is refused, PM_ERR_ARG), pos and src are per
// cell; cell c's row is src[c] when >= 0, else c, plus (n_rs_seq > 0) plane * size, plane
// = rs_idx[q] of its sequences, which must agree: *disagree = the first cell where they do
// not (nothing written), else -1. out NULL with cap 0 asks the size: PM_ERR_RANGE with
// *written the section's bytes (also when cap is too small, nothing written). PM_ERR_ARG as
// pm_rows_sections (out may then hold the META already: the caller raises), for a null
// pointer or size < 1.
pm_status pm_rs_write_whole(const int32_t * tail, const int32_t * pos, const int32_t * src, const uint32_t * rs_idx,
                            int64_t size, int64_t n_rs_seq, int64_t n_layer, struct ggml_tensor * const * tensors,
                            const int64_t * spec, int64_t n_tensors, void * out, int64_t cap, int64_t * written,
                            int64_t * disagree);

// A recurrent memory's whole state section at blob (avail bytes, as pm_rs_write_whole
// writes it; a META record may list any number of ids) checked in one call: u32 cell count
// k <= size, k records (i32 pos, u32 n_seq_id <= 256, the ids), every id in [0, limit) and
// in one record at most, u32 s_trans 0, u32 n_layer, then the tensor sections of rows
// [0, k) (headers as spec: pm_rows_store's). pos_out[k] gets the records' positions and
// tail_out[size] per sequence its cell (-1: none). With `store` the rows [0, k) of every
// tensor are stored from the blob and every row after them zeroed (the bytes the
// reference's clear(true) then read leave): a tensor of several planes of `size` rows
// (rollback snapshots) has cell c's row at p * size + c in plane p. rows_hi (NULL: not
// kept, every such row zeroed): int64[2], in: the cells from which on plane 0's rows,
// and the other planes' rows, are zero already (those are not zeroed again); out after a
// store: k and 0 (a store writes plane 0 alone). *consumed = the section's
// bytes; -1, nothing stored, when anything differs from that (the general parse then
// names what). PM_ERR_ARG for a null pointer, size < 1, limit outside [0, size] or a
// tensor pm_rows_store refuses.
pm_status pm_rs_read_whole(const void * blob, int64_t avail, int64_t size, int64_t limit, int64_t n_layer,
                           struct ggml_tensor * const * tensors, const int64_t * spec, int64_t n_tensors,
                           int32_t store, int64_t * rows_hi, int32_t * pos_out, int32_t * tail_out,
                           int64_t * cell_count, int64_t * consumed);

// A recurrent memory's per-sequence restore of sequence dest (0 <= dest < size; the
// caller checks dest < n_seq_max too) in one call, on the caller's copy of the cells
// (pos, src, src0 per cell; tail, rs_idx, n_last per sequence; scalars = {head, used, n,
// rs_z}): the reference's seq_rm(dest, 0, POS_MAX), then the blob's section at blob (avail
// bytes: u32 cell count 0 or 1, then i32 pos, u32 n_seq_id 0, u32 s_trans 0, u32 n_layer
// and the tensor sections of that many rows, pm_rows_store's spec) placed as find_slot
// places a one-token ubatch of a sequence that holds no cell: the first empty cell from
// head (0 when head > used + 2; wrapping), which takes the position, copies from itself
// and starts from its own source or else the zero-state cell rs_z (the cell itself unless
// another cell copies from it); head moves to it, n = 1, n_last[dest] = 1, used counts
// the non-empty cells. *cell = that cell (-1 for a blob without one) and *consumed = the
// section's bytes; *consumed = -1 when the case is another (dest still in a cell after
// the seq_rm, a count or n_seq_id other than the above, no empty cell, no zero state,
// a header or size that differs): the caller's general parse, on a fresh copy, decides
// and names what. PM_ERR_ARG for a null pointer, size < 1 or dest outside [0, size).
pm_status pm_rs_restore_seq(int32_t * pos, int32_t * src, int32_t * src0, int32_t * tail, uint32_t * rs_idx,
                            uint32_t * n_last, int64_t * scalars, int64_t size, int32_t dest, const void * blob,
                            int64_t avail, int64_t n_layer, struct ggml_tensor * const * tensors,
                            const int64_t * spec, int64_t n_tensors, int64_t * consumed, int64_t * cell);

// The threads that move a large state section's tensor bytes (pm_kv_write_section,
// pm_kv_write_seq_blob, pm_kv_read_seq_blob, pm_stateio_put_cells, pm_rows_sections,
// pm_rows_section and pm_rows_store: every native state write and restore):
// n for a call that moves at least min_bytes in all (1: the calling thread alone; 0: the
// default, the environment's PYMEM_STATE_THREADS when it is a count in [1, 64], else
// min(4, online CPUs), found once, with the default's min_bytes). min_bytes -1 is the
// default's: the environment's PYMEM_STATE_MIN_BYTES when it is a byte count in
// [0, 2^62], else PM_COPY_MIN_BYTES_DEFAULT. The threads are the
// calling thread and n - 1 copy workers, started at the first such call and kept (a fork's
// child starts its own); they claim the call's shares (4 a thread, of about equal bytes) in
// order, so the caller waits only for shares a worker is copying, and copies alone where
// no worker could be started or another thread's call holds them. The bytes are the same
// either way.
// PM_ERR_ARG, nothing changed, for n outside [0, 64] or min_bytes < -1. Set it while no
// state write runs.
pm_status pm_set_copy_threads(int32_t n, int64_t min_bytes);

// the default's min_bytes (1 MiB): a section below it moves on the calling thread (a
// second thread's wake costs what it saves below about 0.8 MB; docs/performance.md)
enum { PM_COPY_MIN_BYTES_DEFAULT = 1048576 };

// The thread count in effect and its *min_bytes (unless NULL), the defaults resolved.
int32_t pm_get_copy_threads(int64_t * min_bytes);

// How many threads the last native section's data phase split its bytes over (1: the
// calling thread alone; 0: none yet), process-wide. A test hook: the bytes are the same
// whatever the split, so only this shows the split and pm_set_copy_threads' min_bytes.
int32_t pm_copy_last_shares(void);

// The copy workers started in this process (a test hook): at most the largest n - 1 a
// threaded call asked for; 0 in a fork's child until its first threaded call.
int32_t pm_copy_workers(void);

// The copy workers that took part in the last call the workers were asked to help with
// (a test hook): never more than that call's threads - 1, however many workers exist.
int32_t pm_copy_last_helpers(void);

// PYMEM_CDEF_END

#ifdef __cplusplus
}
#endif

// One native call for a whole-memory state read of a composite (hybrid, iSWA, hybrid
// iSWA): every part's check over one blob, then every part's store, where each part alone
// would take a check and a commit call plus their Python. A memory's Python glue costs a
// microsecond a call once a multi-megabyte copy has evicted the caches, so a composite's
// whole read spent as long in it as in its bytes.
#pragma once

#include "pymem_native.h"
#include "pymem_stateio.h"
#include "pymem_step.h"

#ifdef __cplusplus
extern "C" {
#endif

// PYMEM_CDEF_BEGIN: plain declarations only (csrc/gen_cffi.py hands them to cffi)

// One part of a whole read, in blob order: a KV cache (kv and cells set, rs NULL) or a
// recurrent memory (kv NULL; pm_rs_read_whole's arguments). The scratch and outputs are
// the caller's, read after the call.
typedef struct pm_whole_part {
    const pm_kv_seq_blob * kv;        // a KV part: its blob view (no ext)
    pm_step_cells * cells;            //   and its cells (the same cells)
    int64_t * kv_found;               //   scratch [3 * n_stream]: counts, offsets, spans
    int64_t rs_size;                  // a recurrent part: mem_size
    int64_t rs_limit;                 //   ids below min(n_seq_max, mem_size)
    int64_t rs_n_layer;
    struct ggml_tensor * const * rs_tensors;
    const int64_t * rs_spec;
    int64_t rs_n_tensors;
    int64_t * rs_rows_hi;             //   pm_rs_read_whole's rows_hi [2] (NULL: not kept)
    int32_t * rs_pos;                 //   out [rs_size]: the cells' positions
    int32_t * rs_tail;                //   out [rs_size]: per sequence its cell
    int32_t * rs_cell_tail;           //   the memory's live cells: read by a write
    int32_t * rs_cell_pos;            //   (pm_rs_write_whole), written by a read's commit
    int32_t * rs_cell_src;
    uint32_t * rs_cell_rs_idx;
    int64_t rs_n_rs_seq;
    int64_t kv_p_lo;                  // a KV part's one-sequence write: the positions its
    int64_t kv_p_hi;                  //   blob holds (a window's; else INT32_MIN, INT32_MAX)
    int32_t kv_held;                  // a KV part's one-sequence read: the sequence holds a
                                      //   cell (back into them) or none (placed anew)
    int32_t kv_mode;                  //   out: 1 into its cells, 2 placed anew
    int32_t kv_swa_type;              //   its window (pm_step_kv_restore_seq's; 0: none):
    int64_t kv_n_swa;                 //   with one, a sequence is always placed anew
    int32_t * kv_pos;                 //   scratch [kv_cap] each (a placement's)
    int32_t * kv_idx;
    int64_t kv_cap;
    int32_t * rs_cell_src0;           // the live cells' other arrays (a one-sequence read
    uint32_t * rs_cell_n_last;        //   copies them into the scratch below, and back)
    int64_t rs_n_seq_arrays;          //   rs_idx / n_last entries
    int32_t * rs_scr_pos;             //   scratch [rs_size] (the cells after the restore)
    int32_t * rs_scr_src;
    int32_t * rs_scr_src0;
    int32_t * rs_scr_tail;
    uint32_t * rs_scr_rs_idx;         //   scratch [rs_n_seq_arrays]
    uint32_t * rs_scr_n_last;
    int64_t rs_scalars[4];            //   in: head, used, n, rs_z of the live cells; out: after
    int64_t rs_cell;                  //   out: the cell placed, -1 none
    int64_t taken;                    // out: the part's bytes
    int64_t n_cells;                  // out: a recurrent part's cell count
    int32_t same;                     // out: a KV part's cells already were the blob's
    int32_t deferred;                 // in/out (pm_whole_read sets it before the checks): a
                                      //   KV part whose cells were all empty; kept when its
                                      //   check placed the records (pm_kv_place_whole_empty),
                                      //   which its store then makes the memory's
} pm_whole_part;

// A whole restore of n_parts parts from blob (avail bytes; each part's section follows
// the one before): every part checked (pm_kv_read_whole_blob mode 0; pm_rs_read_whole
// without store), then, when all apply, every part stored (pm_kv_read_whole_commit;
// pm_rs_read_whole with store, then the cells it found written into the live ones: the
// positions rs_pos of cells [0, n_cells) and -1 after, each of those cells its own source
// and -1 after, the sequences' cells rs_tail, rs_idx and n_last (rs_n_seq_arrays) 0, src0
// kept). *done = 1 and *consumed = the parts' bytes after the stores; *done = 0 with
// nothing changed when any check declines (the caller's per-part road then reads it, or
// names what is wrong). PM_ERR_RANGE when a store fails after an earlier one ran (the blob
// changed while it was restored); PM_ERR_ARG for a null pointer or a part that is neither
// kind. The caller completes what Python keeps: a KV part's version (its has_shift is 0
// here), a recurrent part's head 0, used n_cells and version.
pm_status pm_whole_read(pm_whole_part * parts, int64_t n_parts, const void * blob, int64_t avail,
                        int64_t * consumed, int32_t * done);

// A whole blob of n_parts parts (each part's section after the one before: a KV part's as
// pm_kv_write_whole_blob writes it, a recurrent part's as pm_rs_write_whole) into out (cap
// bytes), in one call: every part sized (a KV part's cells selected once), then, when they
// fit, written. *written = the blob's bytes; PM_ERR_RANGE, nothing written, when cap is too
// small (out NULL with cap 0: the size only). *done = 1 once written; *done = 0, nothing
// written, when a part declines (a KV stream's shared cell, a recurrent cell whose
// sequences disagree on their rollback: the caller's per-part writers name those).
// PM_ERR_ARG for a null pointer or a part that is neither kind. Each part's taken = its
// bytes. `sized` (with out): the caller's size query (out NULL) on these parts ran just
// before, with nothing changed since, so each part's taken and selected cells are used
// as that query left them (no second selection; the parts' sizes must add up to cap,
// PM_ERR_ARG otherwise, nothing written).
pm_status pm_whole_write(pm_whole_part * parts, int64_t n_parts, void * out, int64_t cap, int32_t sized,
                         int64_t * written, int32_t * done);

// One sequence's blob of n_parts parts (each part's section after the one before: a KV
// part's as pm_kv_write_seq_blob writes it with the part's kv_p_lo / kv_p_hi, a recurrent
// part's as its one-sequence writer does: the sequence's cell, read from its pending
// copy's source in its rollback plane) into out (cap bytes), in one call: every part
// sized (a KV part's cells searched once), then written. seq_id must be below every KV
// part's n_seq (PM_ERR_ARG otherwise). *written, *done, PM_ERR_RANGE and `sized` as
// pm_whole_write; a KV part declines when the sequence holds a cell shared with another.
pm_status pm_seq_write(pm_whole_part * parts, int64_t n_parts, int32_t seq_id, void * out, int64_t cap,
                       int32_t sized, int64_t * written, int32_t * done);

// One sequence's restore of n_parts parts from blob (each part's section after the one
// before), in one call: every part checked (a KV part without a window and with kv_held,
// back into exactly the cells it holds, pm_kv_read_seq_blob's check; else, or where that
// check declines (another state, cells the sequence shares), the placed parse of
// pm_kv_read_seq_place whose cells prove the fit, pm_step_kv_place_sure; a recurrent part: pm_rs_restore_seq on a copy of the
// live cells in the rs_scr arrays), then, when all apply, every part stored
// (pm_kv_read_seq_blob's store into the runs found; the one-call placed read,
// pm_kv_read_seq_placed, after the seq_rm of a held sequence; the recurrent rows at the
// copy's head, then the copy's six arrays written into the live ones). No KV part may have
// ext (the caller's Python writes those). *done, *consumed, PM_ERR_RANGE and PM_ERR_ARG as
// pm_whole_read; the caller then bumps the KV parts' versions and takes each recurrent
// part's scalars after the restore (rs_scalars, rs_cell).
pm_status pm_seq_read(pm_whole_part * parts, int64_t n_parts, int32_t seq_id, const void * blob, int64_t avail,
                      int64_t * consumed, int32_t * done);

// PYMEM_CDEF_END

#ifdef __cplusplus
}
#endif

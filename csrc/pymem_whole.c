#include "pymem_whole.h"

#include <string.h>

// what a call needs of its parts (pm_part_ok)
enum {
    PM_PART_KV_READ = 1,   // a KV part's cells, no ext (a read places or compares them)
    PM_PART_KV_FOUND = 2,  // a KV part's parse scratch (a whole read)
    PM_PART_RS_LIVE = 4,   // a recurrent part's live cells (a write; a one-sequence read)
    PM_PART_RS_OUT = 8,    // a recurrent part's out arrays (a whole read)
    PM_PART_RS_COMMIT = 16,  // with RS_LIVE: the rest of what a read's commit writes
};

// whether part p is a KV or a recurrent part with every pointer `needs` names
static int pm_part_ok(const pm_whole_part * p, int needs) {
    if (p->kv != NULL) {
        return (!(needs & PM_PART_KV_READ) || (p->cells != NULL && p->kv->n_ext == 0)) &&
               (!(needs & PM_PART_KV_FOUND) || p->kv_found != NULL);
    }
    return p->rs_tensors != NULL && p->rs_spec != NULL && p->rs_size > 0 &&
           (!(needs & PM_PART_RS_LIVE) || (p->rs_cell_tail != NULL && p->rs_cell_pos != NULL &&
                                           p->rs_cell_src != NULL && p->rs_cell_rs_idx != NULL)) &&
           (!(needs & PM_PART_RS_OUT) || (p->rs_pos != NULL && p->rs_tail != NULL)) &&
           (!(needs & PM_PART_RS_COMMIT) || (p->rs_cell_n_last != NULL && p->rs_n_seq_arrays >= 0));
}

// a part's check at d (avail bytes) for sequence seq_id (-1: the whole part): its bytes
// (p->taken too), or -1 when it declines
typedef int64_t (*pm_part_check)(pm_whole_part * p, int32_t seq_id, const char * d, int64_t avail);

// a part's store after its check: 1 done, 0 declined with nothing changed, -1 failed after
// changing something (the blob changed since the check)
typedef int (*pm_part_store)(pm_whole_part * p, int32_t seq_id, const char * d, int64_t avail);

// a part's check undone where the read stops before its store ran (a KV part whose check
// placed its records into empty cells); nothing for any other part
typedef void (*pm_part_undo)(pm_whole_part * p);

// every part's check undone from part `from` on
static void pm_parts_undo(pm_whole_part * parts, int64_t n_parts, int64_t from, pm_part_undo undo) {
    for (int64_t i = from; undo != NULL && i < n_parts; ++i) {
        undo(&parts[i]);
    }
}

// pm_whole_read and pm_seq_read: every part checked before the first store, then every
// part stored (each part's section follows the one before); where it stops, the checks
// of the parts not stored are undone (`undo`, NULL: checks change nothing)
static pm_status pm_parts_read(pm_whole_part * parts, int64_t n_parts, int32_t seq_id, int needs,
                               pm_part_check check, pm_part_store store, pm_part_undo undo, const void * blob,
                               int64_t avail, int64_t * consumed, int32_t * done) {
    if (parts == NULL || blob == NULL || consumed == NULL || done == NULL || n_parts < 1 || avail < 0) {
        return PM_ERR_ARG;
    }
    *done = 0;
    for (int64_t i = 0; i < n_parts; ++i) {
        if (!pm_part_ok(&parts[i], needs)) {
            return PM_ERR_ARG;
        }
    }
    const char * d = (const char *) blob;
    int64_t at = 0;
    for (int64_t i = 0; i < n_parts; ++i) {
        const int64_t taken = check(&parts[i], seq_id, d + at, avail - at);
        if (taken < 0) {
            pm_parts_undo(parts, i, 0, undo);  // (a check that declines undid itself)
            return PM_OK;
        }
        at += taken;
    }
    at = 0;
    for (int64_t i = 0; i < n_parts; ++i) {
        const int stored = store(&parts[i], seq_id, d + at, avail - at);
        if (stored != 1) {
            pm_parts_undo(parts, n_parts, i, undo);  // (a store that ran took its part over)
            return stored == 0 && i == 0 ? PM_OK : PM_ERR_RANGE;
        }
        at += parts[i].taken;
    }
    *consumed = at;
    *done = 1;
    return PM_OK;
}

// pm_part_check of a whole read
static int64_t pm_whole_check(pm_whole_part * p, int32_t seq_id, const char * d, int64_t avail) {
    (void) seq_id;
    int64_t taken = 0;
    int32_t ok = 0;
    if (p->kv != NULL) {
        const int64_t n_stream = p->kv->n_stream;
        if (p->deferred) {  // (cells all empty: see pm_whole_read)
            if (pm_kv_place_whole_empty(p->kv, p->cells, d, avail, p->kv_found, &taken, &ok) != PM_OK) {
                return -1;
            }
            // (placed: its store sets the counters; not ok: nothing placed, the full parse
            // below declines or finds what it does not)
            p->deferred = ok;
            p->same = 0;
        }
        if (!ok && (pm_kv_read_whole_blob(p->kv, d, avail, 0, p->kv_found, p->kv_found + n_stream, &p->same,
                                          &taken, &ok) != PM_OK ||
                    !ok)) {
            return -1;
        }
    } else {
        int64_t out[2] = { -1, -1 };  // cell count, consumed
        if (pm_rs_read_whole(d, avail, p->rs_size, p->rs_limit, p->rs_n_layer, p->rs_tensors, p->rs_spec,
                             p->rs_n_tensors, 0, NULL, p->rs_pos, p->rs_tail, out, out + 1) != PM_OK ||
            out[1] < 0) {
            return -1;
        }
        p->n_cells = out[0];
        taken = out[1];
    }
    p->taken = taken;
    return taken;
}

// pm_part_store of a whole read
static int pm_whole_store(pm_whole_part * p, int32_t seq_id, const char * d, int64_t avail) {
    (void) seq_id;
    if (p->kv != NULL) {
        const int64_t n_stream = p->kv->n_stream;
        int32_t done = 0;
        // the records: placed by the check (deferred), or checked by this call's parse
        const pm_status st =
            p->deferred ? pm_kv_read_whole_commit_placed(p->kv, p->cells, d, avail, p->kv_found, &done)
                        : pm_kv_read_whole_commit(p->kv, p->cells, d, avail, p->kv_found, p->kv_found + n_stream,
                                                  p->same, PM_RECORDS_PARSED_HERE, &done);
        if (st == PM_ERR_ALLOC) {
            return 0;  // (its scratch is allocated before anything changes)
        }
        return st != PM_OK ? -1 : done;
    }
    int64_t out[2] = { -1, -1 };
    const pm_status st = pm_rs_read_whole(d, avail, p->rs_size, p->rs_limit, p->rs_n_layer, p->rs_tensors,
                                          p->rs_spec, p->rs_n_tensors, 1, p->rs_rows_hi, p->rs_pos, p->rs_tail, out,
                                          out + 1);
    if (st != PM_OK || out[1] < 0) {
        return 0;  // (checked before storing: nothing stored)
    }
    if (out[1] != p->taken || out[0] != p->n_cells || out[0] < 0 || out[0] > p->rs_size) {
        return -1;
    }
    // the cells found become the live ones (what whole_cells builds in Python)
    const int64_t size = p->rs_size, k = out[0];
    memcpy(p->rs_cell_pos, p->rs_pos, (size_t) k * sizeof(int32_t));
    memset(p->rs_cell_pos + k, 0xff, (size_t) (size - k) * sizeof(int32_t));
    for (int64_t c = 0; c < k; ++c) {
        p->rs_cell_src[c] = (int32_t) c;
    }
    memset(p->rs_cell_src + k, 0xff, (size_t) (size - k) * sizeof(int32_t));
    memcpy(p->rs_cell_tail, p->rs_tail, (size_t) size * sizeof(int32_t));
    memset(p->rs_cell_rs_idx, 0, (size_t) p->rs_n_seq_arrays * sizeof(uint32_t));
    memset(p->rs_cell_n_last, 0, (size_t) p->rs_n_seq_arrays * sizeof(uint32_t));
    return 1;
}

// pm_part_undo of a whole read: a KV part's records its check placed (deferred), emptied
// again in each stream whose counters its store did not set (used_max_p1 still 0)
static void pm_whole_undo(pm_whole_part * p) {
    if (p->kv == NULL || !p->deferred) {
        return;
    }
    for (int64_t s = 0; s < p->cells->n_stream; ++s) {
        if (p->cells->used_max_p1[s] == 0) {
            pm_step_unfill(p->cells, s, p->kv_found[s]);
        }
    }
}

// whether every stream of KV part p holds no cell (a cleared memory's)
static int pm_part_empty(const pm_whole_part * p) {
    for (int64_t s = 0; s < p->cells->n_stream; ++s) {
        if (p->cells->used_max_p1[s] != 0 || p->kv->used[s] != 0) {
            return 0;
        }
    }
    return 1;
}

pm_status pm_whole_read(pm_whole_part * parts, int64_t n_parts, const void * blob, int64_t avail,
                        int64_t * consumed, int32_t * done) {
    // a KV part without cells places its records as its check checks them (one pass over
    // them, not two); a later refusal empties them again, so it still changes nothing
    for (int64_t i = 0; parts != NULL && i < n_parts; ++i) {
        parts[i].deferred = pm_part_ok(&parts[i], PM_PART_KV_READ) && parts[i].kv != NULL && pm_part_empty(&parts[i]);
    }
    return pm_parts_read(parts, n_parts, -1,
                         PM_PART_KV_READ | PM_PART_KV_FOUND | PM_PART_RS_OUT | PM_PART_RS_LIVE | PM_PART_RS_COMMIT,
                         pm_whole_check, pm_whole_store, pm_whole_undo, blob, avail, consumed, done);
}

// the part's bytes (a size query; reuse: the write right after it), or -1: it declines;
// -2 for another failure (*st)
static int64_t pm_whole_write_part(pm_whole_part * p, int32_t seq_id, int32_t reuse, void * out, int64_t cap,
                                   pm_status * st) {
    (void) seq_id;
    int64_t written = 0;
    if (p->kv != NULL) {
        int32_t declined = 0;
        *st = pm_kv_write_whole_blob(p->kv, reuse, out, cap, &written, &declined);
        if (declined) {
            return -1;
        }
    } else {
        int64_t disagree = -1;
        *st = pm_rs_write_whole(p->rs_cell_tail, p->rs_cell_pos, p->rs_cell_src, p->rs_cell_rs_idx, p->rs_size,
                                p->rs_n_rs_seq, p->rs_n_layer, p->rs_tensors, p->rs_spec, p->rs_n_tensors, out, cap,
                                &written, &disagree);
        if (disagree >= 0) {
            return -1;
        }
    }
    if (*st == PM_ERR_RANGE && out == NULL) {
        *st = PM_OK;  // (the size asked)
    }
    return *st == PM_OK ? written : -2;
}

// a part's section (a size query when out is NULL; reuse: the write right after it): its
// bytes, -1 when the part declines, -2 for another failure (*st)
typedef int64_t (*pm_part_writer)(pm_whole_part * p, int32_t seq_id, int32_t reuse, void * out, int64_t cap,
                                  pm_status * st);

// pm_whole_write and pm_seq_write: every part sized by `part_write` (or, `sized`, as the
// size query just before left it), then written
static pm_status pm_parts_write(pm_whole_part * parts, int64_t n_parts, int32_t seq_id, pm_part_writer part_write,
                                void * out, int64_t cap, int32_t sized, int64_t * written, int32_t * done) {
    if (parts == NULL || written == NULL || done == NULL || n_parts < 1 || cap < 0 || (out == NULL && cap != 0) ||
        (sized && out == NULL)) {
        return PM_ERR_ARG;
    }
    *done = 0;
    *written = 0;
    for (int64_t i = 0; i < n_parts; ++i) {
        if (!pm_part_ok(&parts[i], PM_PART_RS_LIVE)) {
            return PM_ERR_ARG;
        }
    }
    int64_t total = 0;
    if (sized) {  // (the query's selections stand: the writes below reuse them)
        for (int64_t i = 0; i < n_parts; ++i) {
            if (parts[i].taken < 0 || parts[i].taken > cap - total) {
                return PM_ERR_ARG;
            }
            total += parts[i].taken;
        }
        if (total != cap) {
            return PM_ERR_ARG;
        }
    }
    for (int64_t i = 0; !sized && i < n_parts; ++i) {  // every part sized before the first byte
        pm_status st = PM_OK;
        const int64_t taken = part_write(&parts[i], seq_id, 0, NULL, 0, &st);
        if (taken == -1) {
            return PM_OK;
        }
        if (taken < 0) {
            return st;
        }
        parts[i].taken = taken;
        total += taken;
    }
    *written = total;
    if (out == NULL || total > cap) {
        return PM_ERR_RANGE;
    }
    char * w = (char *) out;
    for (int64_t i = 0; i < n_parts; ++i) {
        pm_status st = PM_OK;
        const int64_t taken = part_write(&parts[i], seq_id, 1, w, parts[i].taken, &st);
        if (taken != parts[i].taken) {
            return st != PM_OK ? st : PM_ERR_ARG;  // (sized just before: cannot differ)
        }
        w += taken;
    }
    *done = 1;
    return PM_OK;
}

pm_status pm_whole_write(pm_whole_part * parts, int64_t n_parts, void * out, int64_t cap, int32_t sized,
                         int64_t * written, int32_t * done) {
    return pm_parts_write(parts, n_parts, 0, pm_whole_write_part, out, cap, sized, written, done);
}

// a recurrent part's one-sequence section (the size alone when out is NULL; *st
// PM_ERR_RANGE when cap is smaller): u32 cell count, the cell's META (pos, no ids),
// s_trans, n_layer, then per tensor its header and the cell's row
static int64_t pm_rs_seq_section(const pm_whole_part * p, int32_t seq_id, char * out, int64_t cap, pm_status * st) {
    const int64_t size = p->rs_size;
    const int64_t cell = seq_id < size ? p->rs_cell_tail[seq_id] : -1;
    if (cell >= size) {
        *st = PM_ERR_ARG;
        return -2;
    }
    const int has = cell >= 0;
    int64_t row_bytes = 0;
    for (int64_t k = 0; k < p->rs_n_tensors; ++k) {
        row_bytes += p->rs_spec[2 * k + 1];
    }
    const int64_t head = has ? 20 : 12;
    const int64_t total = head + 12 * p->rs_n_tensors + (has ? row_bytes : 0);
    if (out == NULL || cap < total) {
        *st = out == NULL ? PM_OK : PM_ERR_RANGE;
        return out == NULL ? total : -2;
    }
    int64_t row = -1;
    if (has) {
        const int32_t src = p->rs_cell_src[cell];
        row = src >= 0 ? src : cell;
        if (p->rs_n_rs_seq > 0) {
            row += (int64_t) p->rs_cell_rs_idx[seq_id] * size;
        }
    }
    const uint32_t words[5] = { (uint32_t) has, has ? (uint32_t) p->rs_cell_pos[cell] : 0u, 0u, 0u,
                                (uint32_t) p->rs_n_layer };
    if (has) {
        memcpy(out, words, 20);
    } else {
        const uint32_t empty[3] = { 0u, 0u, (uint32_t) p->rs_n_layer };
        memcpy(out, empty, 12);
    }
    int64_t rows = 0;
    *st = pm_rows_section(p->rs_tensors, p->rs_spec, p->rs_n_tensors, row, out + head, cap - head, &rows);
    return *st == PM_OK ? head + rows : -2;
}

static int64_t pm_seq_write_part(pm_whole_part * p, int32_t seq_id, int32_t reuse, void * out, int64_t cap,
                                 pm_status * st) {
    if (p->kv == NULL) {
        return pm_rs_seq_section(p, seq_id, (char *) out, cap, st);
    }
    int64_t written = 0;
    int32_t declined = 0;
    *st = pm_kv_write_seq_blob(p->kv, seq_id, reuse, p->kv_p_lo, p->kv_p_hi, out, cap, &written, &declined);
    if (declined) {
        return -1;
    }
    if (*st == PM_ERR_RANGE && out == NULL) {
        *st = PM_OK;  // (the size asked)
    }
    return *st == PM_OK ? written : -2;
}

pm_status pm_seq_write(pm_whole_part * parts, int64_t n_parts, int32_t seq_id, void * out, int64_t cap,
                       int32_t sized, int64_t * written, int32_t * done) {
    if (seq_id < 0) {
        return PM_ERR_ARG;
    }
    return pm_parts_write(parts, n_parts, seq_id, pm_seq_write_part, out, cap, sized, written, done);
}

// The six cell arrays of recurrent part p (rs_size and rs_n_seq_arrays entries) copied
// between its live cells and its scratch: live -> scratch for a one-sequence check (the
// restore runs on the copy), scratch -> live (to_live) for its commit
static void pm_rs_cells_copy(pm_whole_part * p, int to_live) {
    const size_t n = (size_t) p->rs_size * sizeof(int32_t), m = (size_t) p->rs_n_seq_arrays * sizeof(uint32_t);
    int32_t * const live[4] = { p->rs_cell_pos, p->rs_cell_src, p->rs_cell_src0, p->rs_cell_tail };
    int32_t * const scratch[4] = { p->rs_scr_pos, p->rs_scr_src, p->rs_scr_src0, p->rs_scr_tail };
    for (int i = 0; i < 4; ++i) {
        memcpy(to_live ? live[i] : scratch[i], to_live ? scratch[i] : live[i], n);
    }
    uint32_t * const live_seq[2] = { p->rs_cell_rs_idx, p->rs_cell_n_last };
    uint32_t * const scratch_seq[2] = { p->rs_scr_rs_idx, p->rs_scr_n_last };
    for (int i = 0; i < 2; ++i) {
        memcpy(to_live ? live_seq[i] : scratch_seq[i], to_live ? scratch_seq[i] : live_seq[i], m);
    }
}

// a part's one-sequence check at d: its bytes, or -1 when it declines
static int64_t pm_seq_check(pm_whole_part * p, int32_t seq_id, const char * d, int64_t avail) {
    if (p->kv != NULL) {
        int64_t taken = 0;
        int32_t ok = 0;
        // back into the cells the sequence holds where the blob puts it there; else (held
        // or not: another state, cells it shares, a window) placed anew, its seq_rm first
        if (p->kv_held && p->kv_swa_type == 0 &&
            pm_kv_read_seq_blob(p->kv, seq_id, d, avail, 0, &taken, &ok) == PM_OK && ok) {
            p->kv_mode = 1;
        } else {
            int64_t found[4] = { 0, 0, 0, 0 };
            if (p->kv_pos == NULL || p->kv_idx == NULL ||
                pm_kv_read_seq_place(p->kv, seq_id, d, avail, p->kv_pos, p->kv_cap, NULL, NULL, 0, found, &ok) !=
                    PM_OK ||
                !ok || found[0] > p->kv_cap ||
                !pm_step_kv_place_sure(p->cells, p->kv->seq_to_stream[seq_id], seq_id, found[0], found[3],
                                       p->kv_swa_type, p->kv_n_swa)) {
                return -1;
            }
            p->kv_mode = 2;
            taken = found[2];
        }
        p->taken = taken;
        return taken;
    }
    const int64_t size = p->rs_size, m = p->rs_n_seq_arrays;
    if (p->rs_cell_src0 == NULL || p->rs_cell_n_last == NULL || p->rs_scr_pos == NULL || p->rs_scr_src == NULL ||
        p->rs_scr_src0 == NULL || p->rs_scr_tail == NULL || p->rs_scr_rs_idx == NULL || p->rs_scr_n_last == NULL ||
        seq_id >= size || m < 0) {
        return -1;
    }
    pm_rs_cells_copy(p, 0);
    int64_t taken = -1, cell = -1;
    if (pm_rs_restore_seq(p->rs_scr_pos, p->rs_scr_src, p->rs_scr_src0, p->rs_scr_tail, p->rs_scr_rs_idx,
                          p->rs_scr_n_last, p->rs_scalars, size, seq_id, d, avail, p->rs_n_layer, p->rs_tensors,
                          p->rs_spec, p->rs_n_tensors, &taken, &cell) != PM_OK ||
        taken < 0) {
        return -1;
    }
    p->rs_cell = cell;
    p->taken = taken;
    return taken;
}

// a part's one-sequence store after its check: 1 done, 0 declined with nothing changed,
// -1 failed after changing something
static int pm_seq_store(pm_whole_part * p, int32_t seq_id, const char * d, int64_t avail) {
    if (p->kv != NULL) {
        int64_t taken = 0;
        int32_t ok = 0;
        pm_status st;
        if (p->kv_mode == 1) {
            st = pm_kv_read_seq_blob(p->kv, seq_id, d, avail, 2, &taken, &ok);
            if (st == PM_OK && !ok) {  // (the scratch no longer held the check's runs)
                st = pm_kv_read_seq_blob(p->kv, seq_id, d, avail, 1, &taken, &ok);
            }
        } else {
            st = pm_kv_read_seq_placed(p->kv, p->cells, seq_id, p->kv_held, p->kv_swa_type, p->kv_n_swa, d, avail,
                                       p->kv_pos, p->kv_cap, p->kv_idx, p->kv_cap, &taken, &ok);
        }
        if (st != PM_OK) {
            return -1;
        }
        // declined: nothing changed; stored, but not the bytes the check found: changed
        return !ok ? 0 : taken == p->taken ? 1 : -1;
    }
    const int64_t rows_at = p->rs_cell >= 0 ? 20 : 12;
    int64_t stored = -1;
    const pm_status st = pm_rows_store(p->rs_tensors, p->rs_spec, p->rs_n_tensors, p->rs_cell >= 0 ? 1 : 0,
                                       p->rs_scalars[0], d + rows_at, p->taken - rows_at, 1, &stored);
    if (st != PM_OK || stored != p->taken - rows_at) {
        return -1;
    }
    pm_rs_cells_copy(p, 1);  // the restored copy becomes the live cells
    return 1;
}

pm_status pm_seq_read(pm_whole_part * parts, int64_t n_parts, int32_t seq_id, const void * blob, int64_t avail,
                      int64_t * consumed, int32_t * done) {
    if (seq_id < 0) {
        return PM_ERR_ARG;
    }
    return pm_parts_read(parts, n_parts, seq_id, PM_PART_KV_READ | PM_PART_RS_LIVE | PM_PART_RS_COMMIT, pm_seq_check,
                         pm_seq_store, NULL, blob, avail, consumed, done);
}

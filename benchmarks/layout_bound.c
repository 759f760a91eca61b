// The least work a state call of a given cache layout must do, as plain C loops with no
// checks, no Python and no pymem code but its copy: bench_layout_bound.py compiles it
// (cffi) and times it against a copy of the same blob. Where even this is slower than 0.8
// of the copy, the layout and the format bound the call, not its implementation. Every
// copy here is pm_copy_bytes (csrc/pm_copy.h): glibc's memcpy runs several times slower
// at some offsets between its buffers, and a least that met one called a layout bound
// (0.28 of a copy) where pymem itself ran at 0.68.
//
// A layout is a list of pieces (a K tensor's rows, a V tensor's rows, or one channel of a
// transposed V: every piece holds `row` bytes per cell, cells contiguous) and the runs of
// cells [start, end) the blob holds. The blob is the cells' meta records (12 bytes each:
// position, 1, sequence id), then every piece's bytes run after run, then `extra` bytes
// copied whole (a recurrent part's rows).
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "pm_copy.h"

static double lb_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double) t.tv_sec * 1e9 + (double) t.tv_nsec;
}

// the write: records from the cells' positions, then each piece's runs, then the extra
static void lb_write(char * out, const int32_t * pos, int32_t seq, const int64_t * starts, const int64_t * ends,
                     int64_t n_runs, char * const * bases, const int64_t * rows, int64_t n_pieces,
                     const char * extra, int64_t n_extra) {
    int32_t * w = (int32_t *) (void *) out;
    for (int64_t r = 0; r < n_runs; ++r) {
        for (int64_t c = starts[r]; c < ends[r]; ++c) {
            w[0] = pos[c];
            w[1] = 1;
            w[2] = seq;
            w += 3;
        }
    }
    char * d = (char *) w;
    for (int64_t k = 0; k < n_pieces; ++k) {
        for (int64_t r = 0; r < n_runs; ++r) {
            const int64_t n = (ends[r] - starts[r]) * rows[k];
            pm_copy_bytes(d, bases[k] + starts[r] * rows[k], (size_t) n);
            d += n;
        }
    }
    pm_copy_bytes(d, extra, (size_t) n_extra);
}

// the read: each record's position compared with its cell's (a blob that puts the
// sequence back into its own cells, the check a restore needs), with `place` the
// positions and an owner word written into the cells instead (a placement's least), then
// each piece's runs stored, then the extra. Before a placement, `vacate` 1 empties the
// runs' cells (a position and an owner word each: the least of the seq_rm a swap-in
// times with its read), 2 every one of the `size` cells (the least of a clear)
static int64_t lb_read(const char * blob, int32_t * pos, int32_t * owner, int32_t seq, const int64_t * starts,
                       const int64_t * ends, int64_t n_runs, char * const * bases, const int64_t * rows,
                       int64_t n_pieces, char * extra, int64_t n_extra, int place, int vacate, int64_t size) {
    const int32_t * w = (const int32_t *) (const void *) blob;
    int64_t bad = 0;
    if (vacate == 2) {
        memset(pos, 0xff, (size_t) size * sizeof(int32_t));
        memset(owner, 0xff, (size_t) size * sizeof(int32_t));
    }
    for (int64_t r = 0; vacate == 1 && r < n_runs; ++r) {
        for (int64_t c = starts[r]; c < ends[r]; ++c) {
            pos[c] = -1;
            owner[c] = -1;
        }
    }
    for (int64_t r = 0; r < n_runs; ++r) {
        for (int64_t c = starts[r]; c < ends[r]; ++c) {
            if (place) {
                pos[c] = w[0];
                owner[c] = w[2];
            } else {
                bad += (w[0] != pos[c]) | (w[1] != 1) | (w[2] != seq);
            }
            w += 3;
        }
    }
    const char * d = (const char *) w;
    for (int64_t k = 0; k < n_pieces; ++k) {
        for (int64_t r = 0; r < n_runs; ++r) {
            const int64_t n = (ends[r] - starts[r]) * rows[k];
            pm_copy_bytes(bases[k] + starts[r] * rows[k], d, (size_t) n);
            d += n;
        }
    }
    pm_copy_bytes(extra, d, (size_t) n_extra);
    return bad;
}

// `reps` timings (ns) of one kind of call: 0 the copy of the blob (pm_copy_bytes); 1 the write into
// out; 2 the read of blob in place; 3 the read placing the cells anew after emptying the
// sequence's cells (a swap-in); 4 the same after emptying all `size` cells (a clear); 5
// the read placing the cells anew over what they hold (another state's restore: nothing
// emptied first). Each call follows the one before at once (what a loop of state calls
// with nothing between them sees).
int64_t lb_time(int32_t kind, int32_t reps, double * times, char * out, const char * blob, int64_t bytes,
                int32_t * pos, int32_t * owner, int32_t seq, const int64_t * starts, const int64_t * ends,
                int64_t n_runs, char * const * bases, const int64_t * rows, int64_t n_pieces, char * extra,
                int64_t n_extra, int64_t size) {
    int64_t sink = 0;
    for (int32_t i = 0; i < reps; ++i) {
        const double t0 = lb_now();
        if (kind == 0) {
            pm_copy_bytes(out, blob, (size_t) bytes);
        } else if (kind == 1) {
            lb_write(out, pos, seq, starts, ends, n_runs, bases, rows, n_pieces, extra, n_extra);
        } else {
            sink += lb_read(blob, pos, owner, seq, starts, ends, n_runs, bases, rows, n_pieces, extra, n_extra,
                            kind >= 3, kind == 5 ? 0 : kind - 2, size);
        }
        times[i] = lb_now() - t0;
    }
    return sink;
}

#include "pymem_step.h"

#include <stdlib.h>
#include <string.h>

#define PM_STEP_MAX_SEQ 256
#define PM_STEP_F16_NEG_INF 0xFC00u
#define PM_STEP_F32_NEG_INF 0xFF800000u

// whether a cell at p0 is outside the window of a token at p1 (pymem.spec.masked_swa)
static int pm_step_masked_swa(int32_t swa_type, int64_t n_swa, int64_t p0, int64_t p1) {
    switch (swa_type) {
        case 1:
            return p1 - p0 >= n_swa;
        case 2:
            return p0 < (p1 / n_swa) * n_swa;  // positions >= 0: truncation is floor
        case 3:
            return (p1 > p0 ? p1 - p0 : p0 - p1) > n_swa / 2;
        default:
            return 0;
    }
}

pm_status pm_step_kv_find(const pm_step_cells * c, const int64_t * strm, int64_t n_blocks, int64_t n_per,
                          const int64_t * heads, int32_t swa_type, int64_t n_swa, int32_t * idx,
                          int32_t * placed) {
    if (c == NULL || strm == NULL || heads == NULL || idx == NULL || placed == NULL || n_blocks < 0 ||
        n_per < 1 || c->size <= 0) {
        return PM_ERR_ARG;
    }
    *placed = 0;
    if (n_per > c->size || swa_type < 0 || swa_type > 3 || (swa_type != 0 && n_swa <= 0)) {
        return PM_OK;
    }
    for (int64_t r = 0; r < n_blocks; r++) {
        const int64_t s = strm[r];
        if (s < 0 || s >= c->n_stream) {
            return PM_ERR_RANGE;
        }
        int64_t h = heads[s];
        // restart at 0 when enough cells are unused before the head (the reference's rule)
        if (h > c->used[s] + 2 * n_per) {
            h = 0;
        }
        if (h < 0) {
            return PM_OK;
        }
        const int32_t * pos = c->pos + s * c->size;
        const int32_t * own = c->owner + s * c->size;
        for (int64_t j = 0; j < n_per; j++) {
            const int64_t cell = (h + j) % c->size;
            if (pos[cell] >= 0) {
                // taken: usable only as a window-masked cell of one sequence
                if (swa_type == 0 || own[cell] < 0) {
                    return PM_OK;
                }
                const int64_t key = s * PM_STEP_MAX_SEQ + own[cell];
                if (c->pdirty[key] & 2) {
                    return PM_OK;  // a stale bound: numpy refreshes it
                }
                if (!pm_step_masked_swa(swa_type, n_swa, pos[cell], c->pmax[key] + 1)) {
                    return PM_OK;
                }
            }
            idx[r * n_per + j] = (int32_t) cell;
        }
    }
    *placed = 1;
    return PM_OK;
}

// sequence q of stream s reaches positions [lo, hi] too
static inline void pm_step_bounds(pm_step_cells * c, int64_t s, int32_t q, int64_t lo, int64_t hi) {
    const int64_t key = s * PM_STEP_MAX_SEQ + q;
    if (lo < c->pmin[key]) {
        c->pmin[key] = lo;
    }
    if (hi > c->pmax[key]) {
        c->pmax[key] = hi;
    }
}

// the sequence ids the cells' bitsets hold: 64 per word, at most 256 (the bounds' keys);
// none for a word count outside [1, 4] (every kernel then declines or refuses)
static inline int64_t pm_step_ids(const pm_step_cells * c) {
    return c->n_words >= 1 && c->n_words <= PM_STEP_MAX_SEQ / 64 ? 64 * c->n_words : 0;
}

// token of sequence q at position p into cell i of stream s (StackedCells.set_new for one
// cell): its position, a seq bitset of q alone, the owner, the stream's used bound and q's
// position range
static inline void pm_step_take(pm_step_cells * c, int64_t s, int64_t i, int32_t q, int64_t p) {
    const int64_t g = s * c->size + i;
    c->pos[g] = (int32_t) p;
    uint64_t * bits = c->seq + g * c->n_words;
    for (int64_t w = 0; w < c->n_words; w++) {
        bits[w] = 0;
    }
    bits[q >> 6] = (uint64_t) 1 << (q & 63);
    c->owner[g] = q;
    if (c->used_max_p1[s] < i + 1) {
        c->used_max_p1[s] = i + 1;
    }
    pm_step_bounds(c, s, q, p, p);
}

pm_status pm_step_kv_place(pm_step_cells * c, const int64_t * strm, int64_t n_blocks, int64_t n_per,
                           const int32_t * idx, const int32_t * pos, const int32_t * seq, int64_t * heads,
                           int64_t * top, int32_t * placed) {
    if (c == NULL || strm == NULL || idx == NULL || pos == NULL || seq == NULL || top == NULL ||
        placed == NULL || n_blocks < 0 || n_per < 1) {
        return PM_ERR_ARG;
    }
    *placed = 0;
    // every check before the first write: a refusal changes nothing
    for (int64_t r = 0; r < n_blocks; r++) {
        const int64_t s = strm[r];
        if (s < 0 || s >= c->n_stream) {
            return PM_ERR_RANGE;
        }
        for (int64_t j = 0; j < n_per; j++) {
            const int64_t t = r * n_per + j;
            if (idx[t] < 0 || idx[t] >= c->size) {
                return PM_ERR_RANGE;
            }
            if (c->pos[s * c->size + idx[t]] >= 0 || seq[t] < 0 || seq[t] >= pm_step_ids(c)) {
                return PM_OK;
            }
        }
    }
    for (int64_t r = 0; r < n_blocks; r++) {
        const int64_t s = strm[r];
        for (int64_t j = 0; j < n_per; j++) {
            const int64_t t = r * n_per + j;
            pm_step_take(c, s, idx[t], seq[t], pos[t]);
        }
        c->used[s] += n_per;
        if (heads != NULL) {
            heads[s] = (int64_t) idx[r * n_per + n_per - 1] + 1;
        }
    }
    int64_t hi = 0;
    for (int64_t r = 0; r < n_blocks; r++) {
        const int64_t s = strm[r];
        if (c->used_max_dirty[s]) {
            hi = -1;
            break;
        }
        if (c->used_max_p1[s] > hi) {
            hi = c->used_max_p1[s];
        }
    }
    *top = hi;
    *placed = 1;
    return PM_OK;
}

// one int32 word of a blob at any alignment
static inline int32_t pm_step_ld32(const int32_t * p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

// q's run of positions [*run_min, *run_max] extends by [lo, hi] (a new run, its
// predecessor's bounds flushed, when q is another sequence)
static inline void pm_step_run_span(pm_step_cells * c, int64_t s, int32_t q, int64_t lo, int64_t hi, int32_t * run_id,
                                    int64_t * run_min, int64_t * run_max) {
    if (q != *run_id) {
        if (*run_id >= 0) {
            pm_step_bounds(c, s, *run_id, *run_min, *run_max);
        }
        *run_id = q;
        *run_min = lo;
        *run_max = hi;
    } else {
        *run_min = lo < *run_min ? lo : *run_min;
        *run_max = hi > *run_max ? hi : *run_max;
    }
}

// (one position)
static inline void pm_step_run_add(pm_step_cells * c, int64_t s, int32_t q, int32_t p, int32_t * run_id,
                                   int64_t * run_min, int64_t * run_max) {
    pm_step_run_span(c, s, q, p, p, run_id, run_min, run_max);
}

// The words of 16 fixed records (position, 1, id) of one sequence at consecutive
// positions, per word: the count's 1, a mask for the id, a mask for the position and the
// position's step from the first
#define PM_REC3(a, b, c)  a, b, c, a, b, c, a, b, c, a, b, c
#define PM_REC16(a, b, c) PM_REC3(a, b, c), PM_REC3(a, b, c), PM_REC3(a, b, c), PM_REC3(a, b, c)
static const int32_t pm_run_one[48]  = { PM_REC16(0, 1, 0) };
static const int32_t pm_run_id[48]   = { PM_REC16(0, 0, -1) };
static const int32_t pm_run_pos[48]  = { PM_REC16(-1, 0, 0) };
static const int32_t pm_run_step[48] = { 0, 0, 0, 1, 0, 0, 2,  0, 0, 3,  0, 0, 4,  0, 0, 5,  0, 0, 6,  0, 0, 7,  0, 0,
                                         8, 0, 0, 9, 0, 0, 10, 0, 0, 11, 0, 0, 12, 0, 0, 13, 0, 0, 14, 0, 0, 15, 0, 0 };

// Whether the 16 fixed records at r (48 int32 words, any alignment) are one run of one
// sequence: positions p0, p0 + 1, ... p0 + 15 with 0 <= p0 <= INT32_MAX - 15, each
// record's count 1 and id the first one's (*p0, *q: the first record's position and id;
// the id's range is the caller's). Every word against the run's pattern in one loop the
// compiler vectorizes (unsigned: a run that would wrap past INT32_MAX fails)
static inline int pm_records_run16(const int32_t * r, int32_t * p0, int32_t * q) {
    int32_t first, id;
    memcpy(&first, r, 4);
    memcpy(&id, r + 2, 4);
    *p0 = first;
    *q = id;
    PM_PREFETCH(r + 256);  // 1 KiB ahead: a cold blob's scan is latency-bound
    uint32_t e = (uint32_t) (first < 0) | (uint32_t) (first > INT32_MAX - 15);
    for (int k = 0; k < 48; k++) {
        int32_t w;
        memcpy(&w, r + k, 4);
        e |= (uint32_t) w ^ (uint32_t) (pm_run_one[k] | (pm_run_id[k] & id) |
                                        (pm_run_pos[k] & (int32_t) ((uint32_t) first + (uint32_t) pm_run_step[k])));
    }
    return e == 0;
}

// The words of 16 records of two ids (position, 2, a, b) at consecutive positions, per
// word: the count's 2, masks for the ids and for the position, the position's step
#define PM_PAIR4(a, b, c, d)  a, b, c, d, a, b, c, d, a, b, c, d, a, b, c, d
#define PM_PAIR16(a, b, c, d) PM_PAIR4(a, b, c, d), PM_PAIR4(a, b, c, d), PM_PAIR4(a, b, c, d), PM_PAIR4(a, b, c, d)
static const int32_t pm_pair_two[64] = { PM_PAIR16(0, 2, 0, 0) };
static const int32_t pm_pair_a[64]   = { PM_PAIR16(0, 0, -1, 0) };
static const int32_t pm_pair_b[64]   = { PM_PAIR16(0, 0, 0, -1) };
static const int32_t pm_pair_pos[64] = { PM_PAIR16(-1, 0, 0, 0) };
static const int32_t pm_pair_step[64] = { 0, 0, 0, 0, 1,  0, 0, 0, 2,  0, 0, 0, 3,  0, 0, 0, 4,  0, 0, 0, 5,  0,
                                          0, 0, 6, 0, 0,  0, 7, 0, 0,  0, 8, 0, 0,  0, 9, 0, 0,  0, 10, 0, 0, 0,
                                          11, 0, 0, 0, 12, 0, 0, 0, 13, 0, 0, 0, 14, 0, 0, 0, 15, 0, 0, 0 };

// Whether the 16 records of two ids at r (64 int32 words, any alignment) are one run of
// one pair of sequences: positions p0, p0 + 1, ... p0 + 15 with 0 <= p0 <= INT32_MAX - 15,
// each record's count 2 and ids the first one's a, b (in that order), a != b, both below
// n_seq_max (*p0, *a, *b: the first record's). A forked blob's shared cells are runs of
// these (a sequence and its fork): pm_records_run16's check for them
static inline int pm_pairs_run16(const int32_t * r, int32_t n_seq_max, int32_t * p0, int32_t * a, int32_t * b) {
    int32_t first, qa, qb;
    memcpy(&first, r, 4);
    memcpy(&qa, r + 2, 4);
    memcpy(&qb, r + 3, 4);
    *p0 = first;
    *a = qa;
    *b = qb;
    PM_PREFETCH(r + 256);  // 1 KiB ahead: a cold blob's scan is latency-bound
    uint32_t e = (uint32_t) (first < 0) | (uint32_t) (first > INT32_MAX - 15) | (uint32_t) (qa == qb) |
                 (uint32_t) ((uint32_t) qa >= (uint32_t) n_seq_max) | (uint32_t) ((uint32_t) qb >= (uint32_t) n_seq_max);
    for (int k = 0; k < 64; k++) {
        int32_t w;
        memcpy(&w, r + k, 4);
        e |= (uint32_t) w ^ (uint32_t) (pm_pair_two[k] | (pm_pair_a[k] & qa) | (pm_pair_b[k] & qb) |
                                        (pm_pair_pos[k] & (int32_t) ((uint32_t) first + (uint32_t) pm_pair_step[k])));
    }
    return e == 0;
}

// The run of 16 variable records at words + o (span words readable, fixed words 2: no
// ext) that pm_records_run16 (one id, below n_seq_max) or pm_pairs_run16 takes: its id
// count (1 or 2) and *p0, *a, *b (b: -1 for one id); 0 where neither does
static inline int32_t pm_var_run16(const int32_t * words, int64_t o, int64_t span, int32_t n_seq_max, int32_t * p0,
                                   int32_t * a, int32_t * b) {
    if (span - o < 48) {
        return 0;
    }
    const int32_t k = pm_step_ld32(words + o + 1);
    if (k == 1) {
        *b = -1;
        return pm_records_run16(words + o, p0, a) && (uint32_t) *a < (uint32_t) n_seq_max;
    }
    return k == 2 && span - o >= 64 && pm_pairs_run16(words + o, n_seq_max, p0, a, b) ? 2 : 0;
}

// The pattern of 16 fixed records (pos, 1, id) in any order of positions: per word, a
// mask of the words checked for equality (the count's 1 in pm_run_one, the id by
// pm_run_id) and the position's sign bit
static const int32_t pm_rec_chk[48]  = { PM_REC16(0, -1, -1) };
static const int32_t pm_rec_sign[48] = { PM_REC16(INT32_MIN, 0, 0) };

// Stream s's records into its cells [0, n), each checked as it is read, for a stream
// whose cells are all empty (no bit, no shift: nothing else to clear), and their bounds
// (which the caller reset). 1 when every record is a fixed one; 0 at the first that is not, having
// written the records before it (*written of them: the caller empties those cells again).
static int pm_step_fill_checked(pm_step_cells * c, int64_t s, const int32_t * words, int64_t n, int64_t rec,
                                int32_t n_seq_max, int64_t * written) {
    const int64_t n_words = c->n_words, g0 = s * c->size;
    int32_t * restrict pos = c->pos + g0;
    int32_t * restrict own = c->owner + g0;
    uint64_t * restrict bits = c->seq + g0 * n_words;
    int32_t run_id = -1;
    int64_t run_min = 0, run_max = 0, i = 0;
    if (rec == 3 && n_words == 1) {
        // the usual records and bitsets: sixteen records of one sequence (a blob's runs are
        // a sequence's cells: most blocks are) checked together without a branch, then
        // stored with the one id and bit; else four records a step, checked before any is
        // written (a bad group goes to the loop below, which finds the bad one); four
        // records of the running sequence extend its run at once
        while (i + 4 <= n) {
            const int32_t * r = words + 3 * i;
            if (i + 16 <= n) {
                // the usual block: consecutive positions p0, p0 + 1, ... of one sequence
                // (a run of its tokens), every word against that pattern at once; the
                // positions are then stored without being read one by one
                int32_t p0, q;
                if (pm_records_run16(r, &p0, &q) && (uint32_t) q < (uint32_t) n_seq_max) {
                    const uint64_t bit = (uint64_t) 1 << (q & 63);
                    for (int j = 0; j < 16; j++) {
                        pos[i + j] = p0 + j;
                    }
                    for (int j = 0; j < 16; j++) {
                        own[i + j] = q;
                    }
                    for (int j = 0; j < 16; j++) {
                        bits[i + j] = bit;
                    }
                    pm_step_run_span(c, s, q, p0, p0 + 15, &run_id, &run_min, &run_max);
                    i += 16;
                    continue;
                }
                int32_t w[48];
                memcpy(w, r, sizeof w);
                // every word against its record's pattern at once (a loop the compiler
                // vectorizes): the count word 1, the id word q, a position's sign bit 0
                uint32_t bad = pm_record_bad(0, 1, q, n_seq_max);
                int32_t d = 0;
                for (int k = 0; k < 48; k++) {
                    d |= ((w[k] ^ (pm_run_one[k] | (pm_run_id[k] & q))) & pm_rec_chk[k]) | (w[k] & pm_rec_sign[k]);
                }
                bad |= d != 0;
                if (!bad) {
                    const uint64_t bit = (uint64_t) 1 << (q & 63);
                    int32_t lo = INT32_MAX, hi = INT32_MIN;
                    for (int j = 0; j < 16; j++) {
                        const int32_t p = w[3 * j];
                        pos[i + j] = p;
                        lo = p < lo ? p : lo;
                        hi = p > hi ? p : hi;
                    }
                    for (int j = 0; j < 16; j++) {
                        own[i + j] = q;
                        bits[i + j] = bit;
                    }
                    pm_step_run_span(c, s, q, lo, hi, &run_id, &run_min, &run_max);
                    i += 16;
                    continue;
                }
            }
            int32_t p[4], one[4], id[4];
            uint32_t bad = 0;
            for (int j = 0; j < 4; j++) {
                p[j] = pm_step_ld32(r + 3 * j);
                one[j] = pm_step_ld32(r + 3 * j + 1);
                id[j] = pm_step_ld32(r + 3 * j + 2);
                bad |= pm_record_bad(p[j], one[j], id[j], n_seq_max);
            }
            if (bad) {
                break;
            }
            for (int j = 0; j < 4; j++) {
                pos[i + j] = p[j];
                bits[i + j] = (uint64_t) 1 << (id[j] & 63);
                own[i + j] = id[j];
            }
            if (id[0] == run_id && id[1] == run_id && id[2] == run_id && id[3] == run_id) {
                const int32_t lo01 = p[0] < p[1] ? p[0] : p[1], lo23 = p[2] < p[3] ? p[2] : p[3];
                const int32_t hi01 = p[0] > p[1] ? p[0] : p[1], hi23 = p[2] > p[3] ? p[2] : p[3];
                const int32_t lo = lo01 < lo23 ? lo01 : lo23, hi = hi01 > hi23 ? hi01 : hi23;
                run_min = lo < run_min ? lo : run_min;
                run_max = hi > run_max ? hi : run_max;
            } else {
                for (int j = 0; j < 4; j++) {
                    pm_step_run_add(c, s, id[j], p[j], &run_id, &run_min, &run_max);
                }
            }
            i += 4;
        }
    }
    for (; i < n; i++) {
        const int32_t * r = words + i * rec;
        const int32_t p = pm_step_ld32(r), one = pm_step_ld32(r + 1), id = pm_step_ld32(r + rec - 1);
        if (pm_record_bad(p, one, id, n_seq_max)) {
            *written = i;
            return 0;
        }
        pos[i] = p;
        bits[i * n_words + (id >> 6)] = (uint64_t) 1 << (id & 63);
        own[i] = id;
        pm_step_run_add(c, s, id, p, &run_id, &run_min, &run_max);
    }
    if (run_id >= 0) {
        pm_step_bounds(c, s, run_id, run_min, run_max);
    }
    *written = n;
    return 1;
}

// The id count of the variable record at r (avail words readable) when it is a valid one
// (pm_kv_records_var's rule); 0 when not. seen: a zeroed scratch bitset, left zeroed
static inline int32_t pm_var_record_ids(const int32_t * r, int64_t avail, int64_t fixed, int32_t n_seq_max,
                                        uint64_t * seen) {
    if (avail < fixed + 1) {  // (a valid record has one id at least)
        return 0;
    }
    const int32_t p = pm_step_ld32(r), k = pm_step_ld32(r + 1);
    if (p < 0 || k < 1 || k > n_seq_max || avail - fixed < k) {
        return 0;
    }
    const int32_t * ids = r + fixed;
    if (k == 1) {
        return (uint32_t) pm_step_ld32(ids) < (uint32_t) n_seq_max;
    }
    // distinct ids: each one's bit set once, then the bits cleared again
    int32_t bad = 0;
    for (int32_t j = 0; j < k && !bad; j++) {
        const int32_t q = pm_step_ld32(ids + j);
        if ((uint32_t) q >= (uint32_t) n_seq_max || (seen[q >> 6] >> (q & 63)) & 1) {
            bad = 1;
        } else {
            seen[q >> 6] |= (uint64_t) 1 << (q & 63);
        }
    }
    for (int32_t j = 0; j < k; j++) {
        const int32_t q = pm_step_ld32(ids + j);
        if ((uint32_t) q < (uint32_t) n_seq_max) {
            seen[q >> 6] = 0;
        }
    }
    return bad ? 0 : k;
}

// Whether the PM_VAR_GROUP records at r (avail words readable) are all valid ones of k
// ids each (k 1 or 2: records of fixed + k words; two ids must differ), checked together
// without a branch: a forked blob's records are runs of these (a cell of one sequence, a
// cell shared by a sequence and its fork)
#define PM_VAR_GROUP 8
static inline int pm_var_group(const int32_t * r, int64_t avail, int64_t fixed, int32_t k, int32_t n_seq_max) {
    const int64_t rec = fixed + k;
    if (avail < PM_VAR_GROUP * rec) {
        return 0;
    }
    uint32_t bad = 0;
    if (k == 1) {
        for (int j = 0; j < PM_VAR_GROUP; j++) {
            const int32_t * q = r + j * rec;
            bad |= pm_record_bad(pm_step_ld32(q), pm_step_ld32(q + 1), pm_step_ld32(q + fixed), n_seq_max);
        }
    } else {
        for (int j = 0; j < PM_VAR_GROUP; j++) {
            const int32_t * q = r + j * rec;
            const int32_t a = pm_step_ld32(q + fixed), b = pm_step_ld32(q + fixed + 1);
            bad |= (uint32_t) (pm_step_ld32(q) < 0) | (uint32_t) (pm_step_ld32(q + 1) != 2) |
                   (uint32_t) ((uint32_t) a >= (uint32_t) n_seq_max) |
                   (uint32_t) ((uint32_t) b >= (uint32_t) n_seq_max) | (uint32_t) (a == b);
        }
    }
    return bad == 0;
}

// The id count of the record at r where it starts a group pm_var_group takes (1 or 2),
// else 0
static inline int32_t pm_var_group_at(const int32_t * r, int64_t avail, int64_t fixed, int32_t n_seq_max) {
    if (avail < 2) {
        return 0;
    }
    const int32_t k = pm_step_ld32(r + 1);
    return (k == 1 || k == 2) && pm_var_group(r, avail, fixed, k, n_seq_max) ? k : 0;
}

PM_CLONES_AVX2
pm_status pm_kv_records_var(const int32_t * words, int64_t span, int64_t n, int64_t fixed, int32_t n_seq_max,
                            int64_t * end, int64_t * multi) {
    if (words == NULL || end == NULL || multi == NULL || span < 0 || n < 0 || fixed < 2 || n_seq_max < 1 ||
        n_seq_max > PM_STEP_MAX_SEQ) {
        return PM_ERR_ARG;
    }
    *end = -1;
    *multi = 0;
    uint64_t seen[PM_STEP_MAX_SEQ / 64] = { 0 };
    int64_t o = 0, n_multi = 0, i = 0;
    while (i < n) {
        int32_t p0, a, b;
        const int32_t kr = fixed == 2 && i + 16 <= n ? pm_var_run16(words, o, span, n_seq_max, &p0, &a, &b) : 0;
        if (kr > 0) {  // the usual block: a run of one sequence's, or one pair's, positions
            n_multi += kr > 1 ? 16 : 0;
            i += 16;
            o += 16 * (2 + kr);
            continue;
        }
        const int32_t kg = i + PM_VAR_GROUP <= n ? pm_var_group_at(words + o, span - o, fixed, n_seq_max) : 0;
        if (kg > 0) {
            n_multi += kg > 1 ? PM_VAR_GROUP : 0;
            i += PM_VAR_GROUP;
            o += PM_VAR_GROUP * (fixed + kg);
            continue;
        }
        const int32_t k = pm_var_record_ids(words + o, span - o, fixed, n_seq_max, seen);
        if (k == 0) {
            return PM_OK;
        }
        n_multi += k > 1;
        o += fixed + k;
        i++;
    }
    *end = o;
    *multi = n_multi;
    return PM_OK;
}

PM_CLONES_AVX2
pm_status pm_step_kv_cells_equal_var(const pm_step_cells * c, int64_t s, const int32_t * words, int64_t span,
                                     int64_t n, int32_t n_seq_max, int64_t * end) {
    if (c == NULL || words == NULL || end == NULL || n < 0 || span < 0 || s < 0 || s >= c->n_stream ||
        n_seq_max < 1 || n_seq_max > pm_step_ids(c)) {
        return PM_ERR_ARG;
    }
    *end = -1;
    if (n > c->size || c->used[s] != n) {
        return PM_OK;
    }
    const int64_t n_words = c->n_words, g0 = s * c->size;
    const int32_t * pos = c->pos + g0;
    const int32_t * own = c->owner + g0;
    const uint64_t * bits = c->seq + g0 * n_words;
    int64_t o = 0;
    for (int64_t i = 0; i < n; i++) {
        // the usual block: sixteen records of one sequence or one pair at consecutive
        // positions, compared with the cells without reading the records one by one (one
        // word of bits a cell: the pair's two bits exactly; a sequence's one cell has it)
        int32_t p0, a, b;
        const int32_t kr =
            n_words == 1 && i + 16 <= n ? pm_var_run16(words, o, span, n_seq_max, &p0, &a, &b) : 0;
        if (kr > 0) {
            const int32_t want_own = kr == 1 ? a : -2;
            const uint64_t want_bits = kr == 1 ? 0 : ((uint64_t) 1 << a) | ((uint64_t) 1 << b);
            uint64_t d = 0;
            for (int j = 0; j < 16; j++) {
                d |= (uint32_t) (pos[i + j] ^ (p0 + j)) | (uint32_t) (own[i + j] ^ want_own);
            }
            if (kr == 2) {
                for (int j = 0; j < 16; j++) {
                    d |= bits[i + j] ^ want_bits;
                }
            }
            if (d != 0) {
                return PM_OK;
            }
            o += 16 * (2 + kr);
            i += 15;  // (and the loop's step)
            continue;
        }
        if (span - o < 3) {
            return PM_OK;
        }
        const int32_t p = pm_step_ld32(words + o), k = pm_step_ld32(words + o + 1);
        if (p < 0 || p != pos[i]) {
            return PM_OK;
        }
        if (k == 1) {  // (an owner >= 0 has its one bit)
            const int32_t q = pm_step_ld32(words + o + 2);
            if ((uint32_t) q >= (uint32_t) n_seq_max || own[i] != q) {
                return PM_OK;
            }
            o += 3;
            continue;
        }
        if (k < 2 || k > n_seq_max || own[i] != -2 || span - o - 2 < k) {
            return PM_OK;
        }
        uint64_t mask[PM_STEP_MAX_SEQ / 64] = { 0 };
        for (int32_t j = 0; j < k; j++) {
            const int32_t q = pm_step_ld32(words + o + 2 + j);
            if ((uint32_t) q >= (uint32_t) n_seq_max) {
                return PM_OK;
            }
            const uint64_t bit = (uint64_t) 1 << (q & 63);
            if (mask[q >> 6] & bit) {  // (a repeated id)
                return PM_OK;
            }
            mask[q >> 6] |= bit;
        }
        for (int64_t w = 0; w < n_words; w++) {
            if (mask[w] != bits[i * n_words + w]) {
                return PM_OK;
            }
        }
        o += 2 + k;
    }
    *end = o;
    return PM_OK;
}

// Stream s's n variable records (fixed words, then the ids; span words readable) into
// its cells [0, n), whose bitsets and shifts are clear, each checked before it is
// written (pm_kv_records_var's rule): each cell's position, its ids' bits, its owner
// (the id, or -2 for several: n_multi counted) and the bounds. 1 when all are valid; 0 at
// the first that is not, having written the cells before it (*written of them: the
// caller empties those cells again; n_multi then counts theirs). *used (unless NULL):
// the words the records took (when all are valid)
PM_CLONES_AVX2
static int pm_step_fill_var(pm_step_cells * c, int64_t s, const int32_t * words, int64_t n, int64_t span,
                            int64_t fixed, int32_t n_seq_max, int64_t * written, int64_t * used) {
    const int64_t n_words = c->n_words, g0 = s * c->size, rec = fixed + 1;
    int32_t * restrict pos = c->pos + g0;
    int32_t * restrict own = c->owner + g0;
    uint64_t * restrict bits = c->seq + g0 * n_words;
    uint64_t seen[PM_STEP_MAX_SEQ / 64] = { 0 };
    int32_t run_id = -1;
    int64_t run_min = 0, run_max = 0, o = 0, i = 0, n_multi = 0;
    int ok = 1;
    while (i < n) {
        // the usual block: sixteen records of one sequence, or of one pair (a sequence and
        // its fork), at consecutive positions, checked at once and stored without reading
        // their words one by one
        int32_t p0, a, b;
        const int32_t kr = fixed == 2 && i + 16 <= n ? pm_var_run16(words, o, span, n_seq_max, &p0, &a, &b) : 0;
        if (kr > 0) {
            for (int j = 0; j < 16; j++) {
                pos[i + j] = p0 + j;
            }
            const uint64_t bit_a = (uint64_t) 1 << (a & 63);
            uint64_t * cell_bits = bits + i * n_words;
            if (kr == 1) {
                for (int j = 0; j < 16; j++) {
                    own[i + j] = a;
                }
                if (n_words == 1) {  // (the usual bitsets: one store a cell, vectorized)
                    for (int j = 0; j < 16; j++) {
                        cell_bits[j] = bit_a;
                    }
                } else {
                    for (int j = 0; j < 16; j++) {
                        cell_bits[j * n_words + (a >> 6)] = bit_a;
                    }
                }
                pm_step_run_span(c, s, a, p0, p0 + 15, &run_id, &run_min, &run_max);
            } else {
                const uint64_t bit_b = (uint64_t) 1 << (b & 63);
                for (int j = 0; j < 16; j++) {
                    own[i + j] = -2;
                }
                if (n_words == 1) {  // (clear before: both bits in one store)
                    for (int j = 0; j < 16; j++) {
                        cell_bits[j] = bit_a | bit_b;
                    }
                } else {
                    for (int j = 0; j < 16; j++) {
                        cell_bits[j * n_words + (a >> 6)] |= bit_a;
                        cell_bits[j * n_words + (b >> 6)] |= bit_b;
                    }
                }
                pm_step_bounds(c, s, a, p0, p0 + 15);
                pm_step_bounds(c, s, b, p0, p0 + 15);
                n_multi += 16;
            }
            i += 16;
            o += 16 * (2 + kr);
            continue;
        }
        const int32_t kg = i + PM_VAR_GROUP <= n ? pm_var_group_at(words + o, span - o, fixed, n_seq_max) : 0;
        if (kg == 1) {
            for (int j = 0; j < PM_VAR_GROUP; j++) {
                const int32_t * r = words + o + j * rec;
                const int32_t p = pm_step_ld32(r), q = pm_step_ld32(r + fixed);
                pos[i + j] = p;
                own[i + j] = q;
                bits[(i + j) * n_words + (q >> 6)] = (uint64_t) 1 << (q & 63);
                pm_step_run_add(c, s, q, p, &run_id, &run_min, &run_max);
            }
        } else if (kg == 2) {
            // the group's pair of ids is mostly one pair (a sequence and its fork): its
            // bounds then move once
            const int32_t a0 = pm_step_ld32(words + o + fixed), b0 = pm_step_ld32(words + o + fixed + 1);
            int32_t lo = INT32_MAX, hi = INT32_MIN, one_pair = 1;
            for (int j = 0; j < PM_VAR_GROUP; j++) {
                const int32_t * r = words + o + j * (rec + 1);
                const int32_t p = pm_step_ld32(r), a = pm_step_ld32(r + fixed), b = pm_step_ld32(r + fixed + 1);
                pos[i + j] = p;
                own[i + j] = -2;
                bits[(i + j) * n_words + (a >> 6)] |= (uint64_t) 1 << (a & 63);
                bits[(i + j) * n_words + (b >> 6)] |= (uint64_t) 1 << (b & 63);
                one_pair &= (a == a0) & (b == b0);
                lo = p < lo ? p : lo;
                hi = p > hi ? p : hi;
            }
            if (one_pair) {
                pm_step_bounds(c, s, a0, lo, hi);
                pm_step_bounds(c, s, b0, lo, hi);
            } else {
                for (int j = 0; j < PM_VAR_GROUP; j++) {
                    const int32_t * r = words + o + j * (rec + 1);
                    const int32_t p = pm_step_ld32(r);
                    pm_step_bounds(c, s, pm_step_ld32(r + fixed), p, p);
                    pm_step_bounds(c, s, pm_step_ld32(r + fixed + 1), p, p);
                }
            }
            n_multi += PM_VAR_GROUP;
        }
        if (kg > 0) {
            i += PM_VAR_GROUP;
            o += PM_VAR_GROUP * (fixed + kg);
            continue;
        }
        const int32_t k = pm_var_record_ids(words + o, span - o, fixed, n_seq_max, seen);
        if (k == 0) {
            ok = 0;
            break;
        }
        const int32_t p = pm_step_ld32(words + o);
        const int32_t * ids = words + o + fixed;
        if (k == 1) {
            const int32_t q = pm_step_ld32(ids);
            bits[i * n_words + (q >> 6)] = (uint64_t) 1 << (q & 63);
            own[i] = q;
            pm_step_run_add(c, s, q, p, &run_id, &run_min, &run_max);
        } else {
            for (int32_t j = 0; j < k; j++) {
                const int32_t q = pm_step_ld32(ids + j);
                bits[i * n_words + (q >> 6)] |= (uint64_t) 1 << (q & 63);
                pm_step_bounds(c, s, q, p, p);
            }
            own[i] = -2;
            n_multi++;
        }
        pos[i] = p;
        o += fixed + k;
        i++;
    }
    if (run_id >= 0) {
        pm_step_bounds(c, s, run_id, run_min, run_max);
    }
    c->n_multi[s] = n_multi;
    *written = i;
    if (used != NULL) {
        *used = o;
    }
    return ok;
}

// whether a cell of stream s may have a nonzero shift (else they all are 0 already)
static inline int pm_step_may_shift(const pm_step_cells * c, int64_t s) {
    return c->has_shift == NULL || c->has_shift[s];
}

// cells [c0, c1) of stream s emptied: no position, owner, shift or bit
static void pm_step_empty_range(pm_step_cells * c, int64_t s, int64_t c0, int64_t c1) {
    if (c1 <= c0) {
        return;
    }
    const int64_t n_words = c->n_words, g0 = s * c->size, n = c1 - c0;
    memset(c->pos + g0 + c0, 0xff, (size_t) n * sizeof(int32_t));  // -1: empty
    memset(c->owner + g0 + c0, 0xff, (size_t) n * sizeof(int32_t));  // -1: none
    if (pm_step_may_shift(c, s)) {
        memset(c->shift + g0 + c0, 0, (size_t) n * sizeof(int32_t));
    }
    memset(c->seq + (g0 + c0) * n_words, 0, (size_t) n * n_words * sizeof(uint64_t));
}

// cells from used_max_p1 on are empty, and an empty cell's shift and bitset are 0
// (StackedCells' invariant): a refill of n records writes only cells
// [0, max(n, used_max_p1)). [0, n): the shifts of the cells below used_max_p1 cleared in
// bulk here (none when the stream has no shift pending), their bitsets too unless the
// fill assigns every one (`assigns_bits`: fixed records into one-word bitsets); the
// records then go in as into empty cells; the caller empties [n, the bound returned) after
static int64_t pm_step_fill_prepare(pm_step_cells * c, int64_t s, int64_t n, int assigns_bits) {
    const int64_t g0 = s * c->size, bound = c->used_max_p1[s] < c->size ? c->used_max_p1[s] : c->size;
    const int64_t dirty = n < bound ? n : bound;
    if (!assigns_bits) {
        memset(c->seq + g0 * c->n_words, 0, (size_t) dirty * c->n_words * sizeof(uint64_t));
    }
    if (pm_step_may_shift(c, s)) {
        memset(c->shift + g0, 0, (size_t) dirty * sizeof(int32_t));
    }
    return bound;
}

// Stream s's records into cells [0, n) (checked already: pm_step_fill_checked's check
// passes, or pm_kv_records_var's for variable ones), the cells [n, bound) emptied, and
// the bounds from the records
static void pm_step_fill(pm_step_cells * c, int64_t s, const int32_t * words, int64_t n, int64_t rec,
                         int32_t n_seq_max, int var, int64_t span) {
    const int64_t bound = pm_step_fill_prepare(c, s, n, !var && c->n_words == 1);
    int64_t written = 0;
    if (var) {
        pm_step_fill_var(c, s, words, n, span, rec - 1, n_seq_max, &written, NULL);
    } else {
        pm_step_fill_checked(c, s, words, n, rec, n_seq_max, &written);
    }
    pm_step_empty_range(c, s, n, bound);
}


// pm_step_fill for records a parse in the same native call checked already: no check
// before the first write, each record checked as it is written (fixed ones; from the
// first that is not, with span > 0, every record again as variable ones). 0 when one
// fails after all (the blob changed during the call): the stream is then left part
// written, for the caller to empty. *used: the words the records took.
static int pm_step_fill_trusted(pm_step_cells * c, int64_t s, const int32_t * words, int64_t n, int64_t rec,
                                int32_t n_seq_max, int64_t span, int64_t * used) {
    const int64_t bound = pm_step_fill_prepare(c, s, n, c->n_words == 1);
    int64_t k = 0;
    *used = n * rec;
    if (!pm_step_fill_checked(c, s, words, n, rec, n_seq_max, &k)) {
        if (span <= 0) {
            return 0;
        }
        // variable records (the parse found them): the bits of the cells the fixed pass
        // wrote and of those below used_max_p1 cleared (with one-word bitsets the
        // prologue left them), then every record as a variable one (it sets bits, never
        // clears them)
        const int64_t dirty = n < bound ? n : bound, stale = k > dirty ? k : dirty;
        memset(c->seq + s * c->size * c->n_words, 0, (size_t) stale * c->n_words * sizeof(uint64_t));
        int64_t k_var = 0;
        if (!pm_step_fill_var(c, s, words, n, span, rec - 1, n_seq_max, &k_var, used)) {
            return 0;
        }
    }
    pm_step_empty_range(c, s, n, bound);
    return 1;
}

// stream s's cached bounds as for no cell (clean), and no shared cell counted
static void pm_step_reset_bounds(pm_step_cells * c, int64_t s) {
    for (int64_t q = 0; q < PM_STEP_MAX_SEQ; q++) {
        c->pmin[s * PM_STEP_MAX_SEQ + q] = INT64_MAX;
        c->pmax[s * PM_STEP_MAX_SEQ + q] = -1;
        c->pdirty[s * PM_STEP_MAX_SEQ + q] = 0;
    }
    c->n_multi[s] = 0;
}

// stream s's cells n and counters as a refill of n records leaves them: used and
// used_max_p1 n, nothing dirty, no shift pending (a refill's cells have none)
static void pm_step_stream_counts(pm_step_cells * c, int64_t s, int64_t n) {
    c->used[s] = n;
    if (c->rows_hi != NULL && c->rows_hi[s] < c->used_max_p1[s]) {
        c->rows_hi[s] = c->used_max_p1[s];  // (the rows of the cells emptied keep their bytes)
    }
    c->used_max_p1[s] = n;
    c->used_max_dirty[s] = 0;
    if (c->has_shift != NULL) {
        c->has_shift[s] = 0;
    }
}

// stream s emptied as a clear leaves it, its cells below `bound` written (the rest must be
// empty already): no position, owner, bit or shift, bounds reset, counters 0
static void pm_step_empty_stream(pm_step_cells * c, int64_t s, int64_t bound) {
    pm_step_empty_range(c, s, 0, bound);  // (shifts only where one may be pending)
    pm_step_reset_bounds(c, s);
    pm_step_stream_counts(c, s, 0);
}

// every stream emptied, as a clear leaves it (a trusted refill that failed part way: any
// cell may have been written)
static void pm_step_empty_all(pm_step_cells * c) {
    for (int64_t s = 0; s < c->n_stream; s++) {
        pm_step_empty_stream(c, s, c->size);
    }
}

void pm_step_unfill(pm_step_cells * c, int64_t s, int64_t n) {
    pm_step_empty_range(c, s, 0, n);
    pm_step_reset_bounds(c, s);
}

int pm_step_fill_empty(pm_step_cells * c, int64_t s, const int32_t * words, int64_t n, int64_t span, int64_t rec,
                       int32_t n_seq_max, int64_t * used) {
    pm_step_reset_bounds(c, s);
    int64_t k = 0;
    if (pm_step_fill_checked(c, s, words, n, rec, n_seq_max, &k)) {
        *used = n * rec;
        return 1;
    }
    // not every record is a fixed one: variable ones go in over the k cells written (their
    // bits cleared: the variable fill sets bits, never clears them), each checked as it
    // is written too
    int64_t k_var = 0;
    if (span > 0) {
        memset(c->seq + s * c->size * c->n_words, 0, (size_t) k * c->n_words * sizeof(uint64_t));
        if (pm_step_fill_var(c, s, words, n, span, rec - 1, n_seq_max, &k_var, used)) {
            return 1;
        }
    }
    pm_step_unfill(c, s, k > k_var ? k : k_var);
    return 0;
}

void pm_step_kv_filled(pm_step_cells * c, int64_t s, int64_t n) {
    pm_step_stream_counts(c, s, n);
}

pm_status pm_step_kv_clear(pm_step_cells * c, int64_t * heads) {
    if (c == NULL || c->pos == NULL || c->owner == NULL || c->seq == NULL || c->used == NULL ||
        c->used_max_p1 == NULL || c->used_max_dirty == NULL || c->n_multi == NULL || c->pmin == NULL ||
        c->pmax == NULL || c->pdirty == NULL || c->shift == NULL || c->n_words < 1 || c->n_words > 4 ||
        c->n_stream < 0 || c->size < 0) {
        return PM_ERR_ARG;
    }
    for (int64_t s = 0; s < c->n_stream; s++) {
        pm_step_empty_stream(c, s, c->used_max_p1[s] < c->size ? c->used_max_p1[s] : c->size);
        if (heads != NULL) {
            heads[s] = 0;
        }
    }
    return PM_OK;
}

pm_status pm_step_kv_refill_trusted(pm_step_cells * c, const int32_t * const * words, const int64_t * counts,
                                    int64_t * spans, int64_t rec, int32_t n_seq_max) {
    if (c == NULL || words == NULL || counts == NULL || spans == NULL || rec < 3 || n_seq_max < 1 ||
        n_seq_max > pm_step_ids(c)) {
        return PM_ERR_ARG;
    }
    for (int64_t s = 0; s < c->n_stream; s++) {
        if (counts[s] < 0 || counts[s] > c->size || spans[s] < 0 || (counts[s] > 0 && words[s] == NULL)) {
            return PM_ERR_RANGE;
        }
    }
    for (int64_t s = 0; s < c->n_stream; s++) {
        pm_step_reset_bounds(c, s);
        int64_t used = 0;
        if (!pm_step_fill_trusted(c, s, words[s], counts[s], rec, n_seq_max, spans[s], &used)) {
            pm_step_empty_all(c);
            return PM_ERR_RANGE;
        }
        spans[s] = used;
    }
    for (int64_t s = 0; s < c->n_stream; s++) {
        pm_step_stream_counts(c, s, counts[s]);
    }
    return PM_OK;
}

pm_status pm_step_kv_refill(pm_step_cells * c, const int32_t * const * words, const int64_t * counts,
                            const int64_t * spans, int64_t rec, int32_t n_seq_max, int32_t * placed) {
    return pm_step_kv_refill_used(c, words, counts, spans, rec, n_seq_max, placed, NULL);
}

pm_status pm_step_kv_refill_used(pm_step_cells * c, const int32_t * const * words, const int64_t * counts,
                                 const int64_t * spans, int64_t rec, int32_t n_seq_max, int32_t * placed,
                                 int64_t * used) {
    if (c == NULL || words == NULL || counts == NULL || placed == NULL || rec < 3 || n_seq_max < 1 ||
        n_seq_max > pm_step_ids(c)) {
        return PM_ERR_ARG;
    }
    *placed = 0;
    int all_empty = 1;
    for (int64_t s = 0; s < c->n_stream; s++) {
        const int64_t n = counts[s];
        if (n < 0 || n > c->size || (spans != NULL && spans[s] < 0)) {
            return PM_ERR_RANGE;
        }
        if (n > 0 && words[s] == NULL) {
            return PM_ERR_ARG;
        }
        // a valid record takes rec words at least
        if (spans != NULL && n > 0 && spans[s] / rec < n) {
            return PM_OK;
        }
        all_empty &= c->used_max_p1[s] == 0;
    }
    const int64_t n_keys = c->n_stream * PM_STEP_MAX_SEQ;
    // per stream: whether its records are variable ones (spans given, not all fixed)
    uint8_t * var = (uint8_t *) calloc((size_t) c->n_stream + 1, 1);
    char * saved = NULL;  // every stream empty: the bounds, to put back on a refusal
    if (var == NULL) {
        return PM_ERR_ALLOC;
    }
    if (all_empty) {
        // each record checked as it is written (one pass), the cells written so far emptied
        // again on a refusal and the bounds put back: a refusal still changes nothing
        saved = (char *) malloc((size_t) n_keys * (2 * sizeof(int64_t) + 1));
        if (saved == NULL) {
            free(var);
            return PM_ERR_ALLOC;
        }
        memcpy(saved, c->pmin, (size_t) n_keys * sizeof(int64_t));
        memcpy(saved + n_keys * sizeof(int64_t), c->pmax, (size_t) n_keys * sizeof(int64_t));
        memcpy(saved + 2 * n_keys * sizeof(int64_t), c->pdirty, (size_t) n_keys);
    } else {
        // every check before the first write: a refusal changes nothing
        for (int64_t s = 0; s < c->n_stream; s++) {
            if (!pm_records_not_fixed(words[s], counts[s], rec, n_seq_max)) {
                if (used != NULL) {
                    used[s] = counts[s] * rec;
                }
                continue;
            }
            int64_t end = -1, multi = 0;
            if (spans != NULL) {
                pm_kv_records_var(words[s], spans[s], counts[s], rec - 1, n_seq_max, &end, &multi);
            }
            if (end < 0) {
                free(var);
                return PM_OK;
            }
            var[s] = 1;
            if (used != NULL) {
                used[s] = end;
            }
        }
    }
    for (int64_t s = 0; s < c->n_stream; s++) {
        if (!all_empty) {
            pm_step_reset_bounds(c, s);
            pm_step_fill(c, s, words[s], counts[s], rec, n_seq_max, var[s], var[s] ? spans[s] : 0);
            continue;
        }
        int64_t took = 0;  // (pm_step_fill_empty resets the stream's bounds itself)
        if (pm_step_fill_empty(c, s, words[s], counts[s], spans != NULL ? spans[s] : 0, rec, n_seq_max, &took)) {
            if (used != NULL) {
                used[s] = took;
            }
            continue;
        }
        for (int64_t t = 0; t < s; t++) {  // (stream s emptied itself)
            pm_step_unfill(c, t, counts[t]);
        }
        memcpy(c->pmin, saved, (size_t) n_keys * sizeof(int64_t));
        memcpy(c->pmax, saved + n_keys * sizeof(int64_t), (size_t) n_keys * sizeof(int64_t));
        memcpy(c->pdirty, saved + 2 * n_keys * sizeof(int64_t), (size_t) n_keys);
        free(saved);
        free(var);
        return PM_OK;
    }
    free(saved);
    free(var);
    for (int64_t s = 0; s < c->n_stream; s++) {
        pm_step_stream_counts(c, s, counts[s]);
    }
    *placed = 1;
    return PM_OK;
}

// pm_step_take of cells idx[0..n) (distinct) of stream s for one sequence q at positions
// pos, given as their runs of consecutive cells (run_starts / run_ends, n_runs: token i in
// order): each run's positions copied, its owners and bitsets filled, the stream's and
// q's bounds kept in registers (runs of a restore are long: whole-run stores)
static void pm_step_take_runs(pm_step_cells * c, int64_t s, const int64_t * run_starts, const int64_t * run_ends,
                              int64_t n_runs, const int32_t * pos, int32_t q) {
    const int64_t n_words = c->n_words, g0 = s * c->size;
    int32_t * restrict cpos = c->pos + g0;
    int32_t * restrict own = c->owner + g0;
    uint64_t * restrict bits = c->seq + g0 * n_words;
    const uint64_t bit = (uint64_t) 1 << (q & 63);
    const int64_t word = q >> 6;
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    int64_t top = -1, i = 0;
    for (int64_t r = 0; r < n_runs; r++) {
        const int64_t a = run_starts[r], len = run_ends[r] - a;
        memcpy(cpos + a, pos + i, (size_t) len * sizeof(int32_t));
        for (int64_t j = 0; j < len; j++) {
            own[a + j] = q;
            lo = pos[i + j] < lo ? pos[i + j] : lo;
            hi = pos[i + j] > hi ? pos[i + j] : hi;
        }
        if (n_words == 1) {
            for (int64_t j = 0; j < len; j++) {
                bits[a + j] = bit;
            }
        } else {
            memset(bits + a * n_words, 0, (size_t) len * n_words * sizeof(uint64_t));
            for (int64_t j = 0; j < len; j++) {
                bits[(a + j) * n_words + word] = bit;
            }
        }
        top = run_ends[r] - 1 > top ? run_ends[r] - 1 : top;
        i += len;
    }
    if (i > 0) {
        if (c->used_max_p1[s] < top + 1) {
            c->used_max_p1[s] = top + 1;
        }
        pm_step_bounds(c, s, q, lo, hi);
    }
}

#define PM_STEP_BLOCK 32

// [cell, cell + len) appended to the runs [run_starts[r], run_ends[r]) of *runs, extending
// the last one when it ends at cell
static inline void pm_run_append(int64_t * run_starts, int64_t * run_ends, int64_t * runs, int64_t cell,
                                 int64_t len) {
    if (*runs > 0 && run_ends[*runs - 1] == cell) {
        run_ends[*runs - 1] = cell + len;
    } else {
        run_starts[*runs] = cell;
        run_ends[*runs] = cell + len;
        ++*runs;
    }
}

// One empty cell a search takes, the *found-th: into idx and / or the runs (NULL: not kept)
static inline void pm_take_empty(int64_t cell, int32_t * idx, int64_t * run_starts, int64_t * run_ends,
                                 int64_t * runs, int64_t * found) {
    if (idx != NULL) {
        idx[*found] = (int32_t) cell;
    }
    if (run_starts != NULL) {
        pm_run_append(run_starts, run_ends, runs, cell, 1);
    }
    ++*found;
}

// The first n empty cells (pos < 0) of a stream's pos[0..size) from h, wrapping once, in
// that order: into idx unless it is NULL, and unless run_starts is NULL as their maximal
// runs [run_starts[r], run_ends[r]) (n capacity each), *n_runs of them; their count (below
// n when the stream lacks room). A block of 32 cells is one mask first (pm_neg_mask32): a
// block with none is skipped, a full one taken whole (in the runs, extending the run it
// continues: a stream's empty stretches cost no per-cell write), else its set bits walked.
static int64_t pm_step_find_empty(const int32_t * pos, int64_t size, int64_t h, int64_t n, int32_t * idx,
                                  int64_t * run_starts, int64_t * run_ends, int64_t * n_runs) {
    int64_t found = 0, runs = 0;
    for (int pass = 0; pass < 2 && found < n; pass++) {
        int64_t cell = pass == 0 ? h : 0;
        const int64_t end = pass == 0 ? size : h;
        while (cell < end && found < n) {
            if (end - cell >= PM_STEP_BLOCK) {
                const uint32_t empty = pm_neg_mask32(pos + cell);
                if (empty == 0) {
                    cell += PM_STEP_BLOCK;
                    continue;
                }
                if (empty == UINT32_MAX && n - found >= PM_STEP_BLOCK) {
                    for (int j = 0; idx != NULL && j < PM_STEP_BLOCK; j++) {
                        idx[found + j] = (int32_t) (cell + j);
                    }
                    if (run_starts != NULL) {
                        pm_run_append(run_starts, run_ends, &runs, cell, PM_STEP_BLOCK);
                    }
                    found += PM_STEP_BLOCK;
                    cell += PM_STEP_BLOCK;
                    continue;
                }
                // some empty cells: taken by their bits, in order, up to n
                for (uint32_t x = empty; x != 0 && found < n; x &= x - 1) {
                    pm_take_empty(cell + pm_ctz64(x), idx, run_starts, run_ends, &runs, &found);
                }
                cell += PM_STEP_BLOCK;
                continue;
            }
            const int64_t stop = end - cell > PM_STEP_BLOCK ? cell + PM_STEP_BLOCK : end;
            for (; cell < stop && found < n; cell++) {  // (the stream's last, partial block)
                if (pos[cell] < 0) {
                    pm_take_empty(cell, idx, run_starts, run_ends, &runs, &found);
                }
            }
        }
    }
    if (run_starts != NULL) {
        *n_runs = runs;
    }
    return found;
}

// empty cell g (global: s * size + i; StackedCells._empty); the caller keeps used / used_max_dirty
static void pm_step_empty(pm_step_cells * c, int64_t g) {
    c->owner[g] = -1;
    c->pos[g] = -1;
    uint64_t * bits = c->seq + g * c->n_words;
    for (int64_t w = 0; w < c->n_words; w++) {
        bits[w] = 0;
    }
}

// The owner of cell g (of stream s) that was shared (owner -2) after some of its bits were
// cleared: still -2 with two or more left; the one sequence left (n_multi down); none left:
// the cell emptied, shift cleared (n_multi down; returns 1, the caller counts it freed)
static int pm_step_reown(pm_step_cells * c, int64_t s, int64_t g) {
    const uint64_t * bits = c->seq + g * c->n_words;
    int32_t left = -1, n_left = 0;
    for (int64_t w = 0; w < c->n_words && n_left < 2; w++) {
        for (uint64_t b = bits[w]; b != 0 && n_left < 2; b &= b - 1) {
            left = (int32_t) (64 * w + pm_ctz64(b));
            n_left++;
        }
    }
    if (n_left >= 2) {
        return 0;
    }
    c->n_multi[s]--;
    if (n_left == 1) {
        c->owner[g] = left;
        return 0;
    }
    pm_step_empty(c, g);
    c->shift[g] = 0;
    return 1;
}

// The purge's part in a cell g held by several sequences: each of them whose bound
// max_rm reaches the cell's position loses its bit, then pm_step_reown (1: emptied). How
// many (cell, sequence) pairs it removed goes to *n_pairs.
static int pm_step_unshare(pm_step_cells * c, int64_t s, int64_t g, const int64_t * max_rm, int64_t * n_pairs) {
    uint64_t * bits = c->seq + g * c->n_words;
    const int64_t p = c->pos[g];
    for (int64_t w = 0; w < c->n_words; w++) {
        for (uint64_t b = bits[w]; b != 0; b &= b - 1) {
            const int32_t q = (int32_t) (64 * w + pm_ctz64(b));
            if (max_rm[q] >= p) {
                bits[w] &= ~((uint64_t) 1 << (q & 63));
                (*n_pairs)++;
            }
        }
    }
    return pm_step_reown(c, s, g);
}

// apply_ubatch's overwrite in stream s (pm_step_kv_overwrite, whose checks the caller made:
// idx inside the stream, ids inside the bitsets, every taken cell empty or held by one
// sequence): every sequence of a purge lives in s (a sequence's cells are in its one
// stream), shared cells lose the purged sequences' bits (pm_step_unshare). Token t's
// sequence is seq[t], or one_seq for every token when seq is NULL (a restore: no array to
// allocate)
static void pm_step_overwrite_in(pm_step_cells * c, int64_t s, int64_t n, const int32_t * idx, const int32_t * pos,
                                 const int32_t * seq, int32_t one_seq, int64_t * heads, int64_t * top) {
    const int64_t g0 = s * c->size, k0 = s * PM_STEP_MAX_SEQ;
    // 1. the taken cells: bounds dirty (before any change), the largest position lost per
    // sequence, then emptied (StackedCells.rm_owned)
    int64_t max_rm[PM_STEP_MAX_SEQ];
    for (int q = 0; q < PM_STEP_MAX_SEQ; q++) {
        max_rm[q] = -1;
    }
    int64_t n_rm = 0, i_max = -1, hi = -1;
    for (int64_t t = 0; t < n; t++) {
        const int64_t g = g0 + idx[t];
        if (c->pos[g] < 0) {
            continue;
        }
        const int32_t q = c->owner[g];
        const int64_t p = c->pos[g];
        if (p <= c->pmin[k0 + q]) {
            c->pdirty[k0 + q] |= 1;
        }
        if (p >= c->pmax[k0 + q]) {
            c->pdirty[k0 + q] |= 2;
        }
        if (p > max_rm[q]) {
            max_rm[q] = p;
        }
        if (p > hi) {
            hi = p;
        }
    }
    for (int64_t t = 0; t < n; t++) {
        const int64_t g = g0 + idx[t];
        if (c->pos[g] >= 0) {
            pm_step_empty(c, g);
            c->shift[g] = 0;
            n_rm++;
            if (idx[t] > i_max) {
                i_max = idx[t];
            }
        }
    }
    if (n_rm) {
        c->used[s] -= n_rm;
        if (i_max + 1 >= c->used_max_p1[s]) {
            c->used_max_dirty[s] = 1;
        }
    }
    // 2. the tokens (StackedCells.set_new)
    for (int64_t t = 0; t < n; t++) {
        pm_step_take(c, s, idx[t], seq != NULL ? seq[t] : one_seq, pos[t]);
    }
    c->used[s] += n;
    // 3. the purge (StackedCells.purge_owned_upto): cells of a sequence that lost one, at
    // or below the largest position it lost
    if (hi >= 0) {
        int64_t n_purged = 0, p_max = -1, n_pairs = 0;
        const int shared = c->n_multi[s] != 0;
        for (int64_t i = 0; i < c->size; i++) {
            const int64_t g = g0 + i;
            const int32_t q = c->owner[g];
            if (q >= 0 && c->pos[g] >= 0 && c->pos[g] <= max_rm[q]) {
                pm_step_empty(c, g);
                c->shift[g] = 0;
                n_purged++;
                p_max = i;
            } else if (shared && q == -2 && c->pos[g] <= hi && pm_step_unshare(c, s, g, max_rm, &n_pairs)) {
                n_purged++;
                p_max = i;
            }
        }
        if (n_purged || n_pairs) {
            for (int q = 0; q < PM_STEP_MAX_SEQ; q++) {
                if (max_rm[q] >= 0) {
                    c->pdirty[k0 + q] |= 1;
                    if (max_rm[q] >= c->pmax[k0 + q]) {
                        c->pdirty[k0 + q] |= 2;
                    }
                }
            }
            c->used[s] -= n_purged;
            if (n_purged && p_max + 1 >= c->used_max_p1[s]) {
                c->used_max_dirty[s] = 1;
            }
        }
    }
    heads[s] = (int64_t) idx[n - 1] + 1;
    *top = c->used_max_dirty[s] ? -1 : c->used_max_p1[s];
}

// the cached bounds of stream s's sequences marked stale, recomputed from its cells and
// made current (StackedCells.refresh; a shared cell counts for each sequence of its bitset)
static void pm_step_refresh_stale(pm_step_cells * c, int64_t s) {
    const int64_t ids = pm_step_ids(c), base = s * PM_STEP_MAX_SEQ;
    int64_t lo[PM_STEP_MAX_SEQ], hi[PM_STEP_MAX_SEQ];
    int stale = 0;
    for (int64_t q = 0; q < ids; q++) {
        lo[q] = INT64_MAX;
        hi[q] = -1;
        stale |= c->pdirty[base + q];
    }
    if (!stale) {
        return;
    }
    const int32_t * pos = c->pos + s * c->size;
    const int32_t * own = c->owner + s * c->size;
    const int64_t n = c->used_max_p1[s] < c->size ? c->used_max_p1[s] : c->size;  // (an upper bound)
    const uint64_t * bits = c->seq + s * c->size * c->n_words;
    for (int64_t i = 0; i < n; i++) {
        const int32_t q = own[i];
        if (q >= 0 && q < ids && pos[i] >= 0) {
            lo[q] = pos[i] < lo[q] ? pos[i] : lo[q];
            hi[q] = pos[i] > hi[q] ? pos[i] : hi[q];
        } else if (q == -2 && pos[i] >= 0) {
            for (int64_t w = 0; w < c->n_words; w++) {
                for (uint64_t b = bits[i * c->n_words + w]; b != 0; b &= b - 1) {
                    const int64_t r = 64 * w + pm_ctz64(b);
                    lo[r] = pos[i] < lo[r] ? pos[i] : lo[r];
                    hi[r] = pos[i] > hi[r] ? pos[i] : hi[r];
                }
            }
        }
    }
    for (int64_t q = 0; q < ids; q++) {
        if (c->pdirty[base + q]) {
            c->pmin[base + q] = hi[q] >= 0 ? lo[q] : INT64_MAX;
            c->pmax[base + q] = hi[q];
            c->pdirty[base + q] = 0;
        }
    }
}

pm_status pm_step_kv_restore_seq(pm_step_cells * c, int64_t s, int32_t seq_id, const int32_t * pos, int64_t n,
                                 int32_t swa_type, int64_t n_swa, int64_t * heads, int32_t * idx,
                                 int64_t * run_starts, int64_t * run_ends, int64_t * n_runs, int32_t * placed) {
    if (c == NULL || pos == NULL || heads == NULL || (idx == NULL && swa_type != 0) || run_starts == NULL ||
        run_ends == NULL || n_runs == NULL || placed == NULL || n < 1) {
        return PM_ERR_ARG;
    }
    *placed = 0;
    if (s < 0 || s >= c->n_stream) {
        return PM_ERR_RANGE;
    }
    // (a shared cell is never taken: only empty cells, or with a window masked cells of
    // one sequence; the window's purge takes the losers' bits out of shared cells)
    if (seq_id < 0 || seq_id >= pm_step_ids(c) || n > c->size || swa_type < 0 || swa_type > 3 ||
        (swa_type != 0 && n_swa <= 0)) {
        return PM_OK;
    }
    int32_t any_neg = 0;  // (one branch-free pass)
    for (int64_t i = 0; i < n; i++) {
        any_neg |= pos[i];
    }
    if (any_neg < 0) {
        return PM_OK;
    }
    // the search (nothing written yet): the first n usable cells from h, wrapping once;
    // usable: empty, or (a window) held by one sequence that no longer sees it from its
    // next position (its largest position + 1: stale cached ones recomputed first)
    if (swa_type != 0) {
        pm_step_refresh_stale(c, s);
    }
    const int64_t g0 = s * c->size;
    int64_t h = heads[s];
    if (h > c->used[s] + 2 * n || h < 0 || h > c->size) {
        h = 0;  // (a head past the end is not left by any placement; start at 0 then)
    }
    // without a window the search writes the runs itself (and idx where given); the
    // window's search walks cells one by one into idx, whose runs are found after
    int64_t found = 0, taken = 0, runs = 0;
    if (swa_type == 0) {
        found = pm_step_find_empty(c->pos + g0, c->size, h, n, idx, run_starts, run_ends, &runs);
    }
    for (int64_t k = 0; swa_type != 0 && k < c->size && found < n; k++) {
        int64_t cell = h + k;
        if (cell >= c->size) {
            cell -= c->size;
        }
        const int32_t p = c->pos[g0 + cell];
        int usable = p < 0;
        if (!usable) {
            const int32_t q = c->owner[g0 + cell];
            if (q < 0) {
                continue;  // several sequences (never taken) or none
            }
            const int64_t key = s * PM_STEP_MAX_SEQ + q;
            usable = pm_step_masked_swa(swa_type, n_swa, p, c->pmax[key] + 1);
            taken += usable;
        }
        if (usable) {
            idx[found++] = (int32_t) cell;
        }
    }
    if (found < n) {
        return PM_OK;
    }
    if (taken > 0) {
        // window-masked cells among them: apply_ubatch's overwrite (emptied, placed, the
        // losers' older positions purged, the head moved), in stream s
        if (c->shift == NULL) {
            return PM_OK;
        }
        int64_t top = 0;
        pm_step_overwrite_in(c, s, n, idx, pos, NULL, seq_id, heads, &top);
        *placed = 1;
    }
    if (swa_type != 0) {
        // the cells' runs, in scan order (the caller's store moves the bytes by them; the
        // current run kept in registers, not read back from the arrays)
        int64_t start = idx[0], end = (int64_t) idx[0] + 1;
        for (int64_t i = 1; i < n; i++) {
            if (idx[i] != end) {
                run_starts[runs] = start;
                run_ends[runs] = end;
                runs++;
                start = idx[i];
            }
            end = (int64_t) idx[i] + 1;
        }
        run_starts[runs] = start;
        run_ends[runs] = end;
        runs++;
    }
    if (taken == 0) {
        pm_step_take_runs(c, s, run_starts, run_ends, runs, pos, seq_id);
        c->used[s] += n;
        heads[s] = run_ends[runs - 1];  // (past the last cell in scan order)
        *placed = 1;
    }
    *n_runs = runs;
    return PM_OK;
}

// How many of the PM_STEP_BLOCK cells from c0 are shared (owner -2): a count the
// compiler vectorises, so scans for shared cells pass most blocks without a branch per
// cell, and stop once they have seen every one (the block 2 KiB ahead asked for: a cold
// scan is latency-bound)
static inline int32_t pm_block_shared(const int32_t * owner, int64_t c0) {
    PM_PREFETCH(owner + c0 + 512);
    PM_PREFETCH(owner + c0 + 528);
    int32_t multi = 0;
    for (int j = 0; j < PM_STEP_BLOCK; j++) {
        multi += owner[c0 + j] == -2;
    }
    return multi;
}

// The start of the next block from c0 (a multiple of PM_STEP_BLOCK) below end that a
// scan for shared cells looks into, or -1 when none is left: a whole block holding a
// shared cell (its count taken off *left, the shared cells not seen yet) or the last,
// partial block (its cells tested one by one). Whole blocks without one are passed, and
// the walk stops once *left is 0 (past the stream's last shared cell).
static inline int64_t pm_next_shared_block(const int32_t * owner, int64_t c0, int64_t end, int64_t * left) {
    for (; c0 < end && *left > 0; c0 += PM_STEP_BLOCK) {
        if (end - c0 < PM_STEP_BLOCK) {
            return c0;
        }
        const int32_t k = pm_block_shared(owner, c0);
        if (k != 0) {
            *left -= k;
            return c0;
        }
    }
    return -1;
}

int32_t pm_step_seq_shared(const pm_step_cells * c, int64_t s, int32_t q) {
    if (s < 0 || s >= c->n_stream || c->n_multi[s] == 0 || q < 0 || q >= pm_step_ids(c)) {
        return 0;
    }
    const int64_t key = s * PM_STEP_MAX_SEQ + q;
    if (c->pmax[key] < 0 && !(c->pdirty[key] & 2)) {
        return 0;  // q holds no cell at all (a current largest position of none)
    }
    const int32_t * own = c->owner + s * c->size;
    const uint64_t * bits = c->seq + s * c->size * c->n_words + (q >> 6);
    const uint64_t bit = (uint64_t) 1 << (q & 63);
    int64_t left = c->n_multi[s];  // shared cells not seen yet
    // blocks of cells without a shared one, most of a stream, are passed by their count
    const int64_t end = c->used_max_p1[s] < c->size ? c->used_max_p1[s] : c->size;  // (an upper bound)
    for (int64_t c0 = pm_next_shared_block(own, 0, end, &left); c0 >= 0;
         c0 = pm_next_shared_block(own, c0 + PM_STEP_BLOCK, end, &left)) {
        const int64_t c1 = c0 + PM_STEP_BLOCK < end ? c0 + PM_STEP_BLOCK : end;
        if (c1 - c0 == PM_STEP_BLOCK && c->n_words == 1) {  // the shared cells and the bits as masks
            if (pm_eq_mask32(own + c0, -2) & pm_bit_mask32(bits + c0, bit)) {
                return 1;
            }
            continue;
        }
        for (int64_t i = c0; i < c1; i++) {  // (a block of wider bitsets, or the last part one)
            if (own[i] == -2 && (bits[i * c->n_words] & bit)) {
                return 1;
            }
        }
    }
    return 0;
}

int32_t pm_step_kv_place_sure(const pm_step_cells * c, int64_t s, int32_t seq_id, int64_t n, int64_t fit,
                              int32_t swa_type, int64_t n_swa) {
    if (n < 1 || fit < n || n > c->size || s < 0 || s >= c->n_stream || seq_id < 0 || seq_id >= pm_step_ids(c) ||
        swa_type < 0 || swa_type > 3 || (swa_type != 0 && n_swa <= 0)) {
        return 0;
    }
    // n empty cells after the seq_rm: the search finds them (a window's overwrite clears
    // the shifts of the cells it takes)
    return swa_type == 0 || c->shift != NULL;
}

// a batch's output flags as 0 / 1 (output NULL: only the last token), and their count
static int64_t pm_step_outputs(const uint8_t * output, int8_t * out_output, int64_t n) {
    int64_t n_out = 0;
    for (int64_t t = 0; t < n; t++) {
        const int8_t o = output != NULL ? (int8_t) (output[t] != 0) : (int8_t) (t == n - 1);
        out_output[t] = o;
        n_out += o;
    }
    return n_out;
}

pm_status pm_step_batch_check(const int32_t * token, const int32_t * pos, const int64_t * seq, int64_t n,
                              const int64_t * order, const int64_t * mem_max, int64_t n_vocab,
                              const uint8_t * output, int8_t * out_output, int32_t * seq_pos, int64_t * n_outputs,
                              int32_t * ok) {
    if (token == NULL || pos == NULL || seq == NULL || out_output == NULL ||
        seq_pos == NULL || n_outputs == NULL || ok == NULL || n < 1) {
        return PM_ERR_ARG;
    }
    *ok = 0;
    for (int64_t t = 0; t < n; t++) {
        if (token[t] < 0 || (n_vocab >= 0 && token[t] >= n_vocab) || pos[t] < 0) {
            return PM_OK;
        }
        if (seq[t] < 0 || seq[t] >= PM_STEP_MAX_SEQ) {
            return PM_ERR_RANGE;
        }
    }
    for (int64_t i = 0; mem_max != NULL && i < n; i++) {
        const int64_t t = order != NULL ? order[i] : i;
        if (t < 0 || t >= n) {
            return PM_ERR_RANGE;
        }
        if (mem_max[i] >= 0 && (int64_t) pos[t] != mem_max[i] + 1) {
            return PM_OK;
        }
    }
    for (int q = 0; q < PM_STEP_MAX_SEQ; q++) {
        seq_pos[q] = -1;
    }
    for (int64_t t = 0; t < n; t++) {
        seq_pos[seq[t]] = pos[t];
    }
    *n_outputs = pm_step_outputs(output, out_output, n);
    *ok = 1;
    return PM_OK;
}

pm_status pm_step_batch_check_runs(const int32_t * token, const int32_t * pos, int64_t n, const int64_t * first,
                                   const int64_t * len, const int64_t * run_seq, int64_t n_runs,
                                   const int64_t * mem_max, int64_t n_vocab, const uint8_t * output,
                                   int8_t * out_output, int32_t * seq_pmin, int32_t * seq_pmax, int64_t * n_outputs,
                                   int32_t * ok) {
    if (token == NULL || pos == NULL || first == NULL || len == NULL || run_seq == NULL || out_output == NULL ||
        seq_pmin == NULL || seq_pmax == NULL || n_outputs == NULL || ok == NULL || n < 1 || n_runs < 1) {
        return PM_ERR_ARG;
    }
    *ok = 0;
    int64_t covered = 0;
    for (int64_t r = 0; r < n_runs; r++) {
        if (first[r] < 0 || len[r] < 1 || first[r] > n - len[r] || run_seq[r] < 0 ||
            run_seq[r] >= PM_STEP_MAX_SEQ) {
            return PM_ERR_RANGE;
        }
        covered += len[r];
    }
    if (covered != n) {
        return PM_ERR_RANGE;
    }
    for (int64_t t = 0; t < n; t++) {
        if (token[t] < 0 || (n_vocab >= 0 && token[t] >= n_vocab) || pos[t] < 0) {
            return PM_OK;
        }
    }
    for (int64_t r = 0; r < n_runs; r++) {
        const int32_t * p = pos + first[r];
        if (mem_max != NULL && mem_max[r] >= 0 && (int64_t) p[0] != mem_max[r] + 1) {
            return PM_OK;
        }
        for (int64_t j = 1; j < len[r]; j++) {
            if ((int64_t) p[j] != (int64_t) p[j - 1] + 1) {
                return PM_OK;
            }
        }
    }
    for (int q = 0; q < PM_STEP_MAX_SEQ; q++) {
        seq_pmin[q] = -1;
        seq_pmax[q] = -1;
    }
    for (int64_t r = 0; r < n_runs; r++) {
        seq_pmin[run_seq[r]] = pos[first[r]];
        seq_pmax[run_seq[r]] = pos[first[r] + len[r] - 1];
    }
    *n_outputs = pm_step_outputs(output, out_output, n);
    *ok = 1;
    return PM_OK;
}

pm_status pm_step_rs_steady(int64_t size, const int32_t * tail, const int32_t * tail_snap, const int32_t * ids,
                            const int32_t * ids_snap, int64_t n, int64_t lo, int32_t * pos, const int32_t * src,
                            int32_t * src0, uint32_t * n_last, int64_t n_last_size, const int32_t * last_pos,
                            int32_t n_seq_tokens, int32_t dry, int32_t * done) {
    if (tail == NULL || tail_snap == NULL || ids == NULL || ids_snap == NULL || pos == NULL || src == NULL ||
        src0 == NULL || n_last == NULL || last_pos == NULL || done == NULL || size < 0 || n < 0) {
        return PM_ERR_ARG;
    }
    *done = 0;
    if (lo < 0 || lo > size - n) {
        return PM_OK;  // not a window of these cells: the numpy path decides (and refuses)
    }
    for (int64_t s = 0; s < n; s++) {
        if (ids[s] < 0 || ids[s] >= n_last_size) {
            return PM_OK;
        }
    }
    if (memcmp(tail, tail_snap, (size_t) size * sizeof(int32_t)) != 0 ||
        memcmp(ids, ids_snap, (size_t) n * sizeof(int32_t)) != 0) {
        return PM_OK;
    }
    for (int64_t s = 0; s < n; s++) {
        if ((int64_t) last_pos[s] - pos[lo + s] != n_seq_tokens || src[lo + s] != lo + s) {
            return PM_OK;
        }
    }
    if (dry) {
        *done = 1;
        return PM_OK;
    }
    for (int64_t s = 0; s < n; s++) {
        pos[lo + s] = last_pos[s];
        src0[lo + s] = src[lo + s];
        n_last[ids[s]] = (uint32_t) n_seq_tokens;
    }
    *done = 1;
    return PM_OK;
}

pm_status pm_rs_drop_seq(int32_t * tail, int32_t * pos, int32_t * src, int64_t n_tail, int64_t size,
                         int32_t seq_id, int32_t * emptied) {
    if (tail == NULL || pos == NULL || src == NULL || emptied == NULL || n_tail < 0 || size < 0) {
        return PM_ERR_ARG;
    }
    if (seq_id < 0 || seq_id >= n_tail || tail[seq_id] >= size) {
        return PM_ERR_RANGE;
    }
    const int32_t t = tail[seq_id];
    tail[seq_id] = -1;
    *emptied = -1;
    if (t < 0) {
        return PM_OK;
    }
    int32_t held = 0;  // (one branch-free pass: the tails are few)
    for (int64_t i = 0; i < n_tail; i++) {
        held |= tail[i] == t;
    }
    if (!held) {
        pos[t] = -1;
        src[t] = -1;
        *emptied = t;
    }
    return PM_OK;
}

pm_status pm_step_kv_overwrite(pm_step_cells * c, int64_t n, const int32_t * idx, const int32_t * pos,
                               const int32_t * seq, int64_t * heads, int64_t * top, int32_t * placed) {
    if (c == NULL || idx == NULL || pos == NULL || seq == NULL || heads == NULL || top == NULL ||
        placed == NULL || n < 1) {
        return PM_ERR_ARG;
    }
    *placed = 0;
    if (c->n_stream != 1 || c->shift == NULL) {
        return PM_OK;
    }
    for (int64_t t = 0; t < n; t++) {
        if (idx[t] < 0 || idx[t] >= c->size) {
            return PM_ERR_RANGE;
        }
        if (seq[t] < 0 || seq[t] >= pm_step_ids(c) || (c->pos[idx[t]] >= 0 && c->owner[idx[t]] < 0)) {
            return PM_OK;
        }
    }
    pm_step_overwrite_in(c, 0, n, idx, pos, seq, 0, heads, top);
    *placed = 1;
    return PM_OK;
}

// int64 -> int32 as numpy's astype does (two's complement wrap)
static int32_t pm_step_i32(int64_t v) {
    return (int32_t) (uint32_t) (uint64_t) v;
}

// the attended cell positions lo <= p0 <= hi of a token at p (kv/inputs._window)
static void pm_step_window(int32_t p, int32_t swa_type, int64_t n_swa, int32_t causal, int32_t * lo, int32_t * hi) {
    const int64_t p64 = p;
    *lo = INT32_MIN;
    *hi = causal ? p : INT32_MAX;
    if (swa_type == 1) {
        const int64_t l = p64 - (n_swa - 1);
        *lo = l < INT32_MIN ? INT32_MIN : pm_step_i32(l);
    } else if (swa_type == 2) {
        *lo = n_swa > INT32_MAX ? 0 : pm_step_i32((p64 / n_swa) * n_swa);
    } else if (swa_type == 3) {
        *lo = pm_step_i32(p64 - n_swa / 2);
        int64_t h = p64 + n_swa / 2;
        if (h > INT32_MAX) {
            h = INT32_MAX;
        }
        if (causal && h > p64) {
            h = p64;
        }
        *hi = pm_step_i32(h);
    }
}

pm_status pm_step_kq_mask(const pm_step_cells * c, const int64_t * strm, int64_t n_blocks, int64_t n_per,
                          const int32_t * seq, const int32_t * pos, int32_t swa_type, int64_t n_swa,
                          int32_t causal, int64_t n_kv, int32_t elem_size, void * out, int32_t * done) {
    if (c == NULL || strm == NULL || seq == NULL || pos == NULL || out == NULL || done == NULL || n_blocks < 0 ||
        n_per < 1 || n_kv < 0 || (elem_size != 2 && elem_size != 4) || n_swa < 0) {
        return PM_ERR_ARG;
    }
    *done = 0;
    if (n_kv > c->size) {
        return PM_ERR_RANGE;
    }
    if (swa_type < 0 || swa_type > 3 || (swa_type != 0 && n_swa == 0)) {
        return PM_OK;
    }
    for (int64_t r = 0; r < n_blocks; r++) {
        if (strm[r] < 0 || strm[r] >= c->n_stream) {
            return PM_ERR_RANGE;
        }
        if (c->n_multi[strm[r]] != 0) {
            return PM_OK;
        }
    }
    for (int64_t r = 0; r < n_blocks; r++) {
        const int32_t * own = c->owner + strm[r] * c->size;
        const int32_t * p0 = c->pos + strm[r] * c->size;
        for (int64_t i = 0; i < n_per; i++) {
            const int64_t t = r * n_per + i;
            const int32_t q = seq[t];
            int32_t lo, hi;
            pm_step_window(pos[t], swa_type, n_swa, causal, &lo, &hi);
            if (elem_size == 2) {
                uint16_t * o = (uint16_t *) out + t * n_kv;
                for (int64_t j = 0; j < n_kv; j++) {
                    const int keep = (own[j] == q) & (p0[j] >= lo) & (p0[j] <= hi);
                    o[j] = keep ? 0 : (uint16_t) PM_STEP_F16_NEG_INF;
                }
            } else {
                uint32_t * o = (uint32_t *) out + t * n_kv;
                for (int64_t j = 0; j < n_kv; j++) {
                    const int keep = (own[j] == q) & (p0[j] >= lo) & (p0[j] <= hi);
                    o[j] = keep ? 0 : PM_STEP_F32_NEG_INF;
                }
            }
        }
    }
    *done = 1;
    return PM_OK;
}

pm_status pm_step_kv_pos_max(const pm_step_cells * c, const int64_t * keys, int64_t n, int64_t * out,
                             int32_t * ok) {
    if (c == NULL || keys == NULL || out == NULL || ok == NULL || n < 0) {
        return PM_ERR_ARG;
    }
    *ok = 0;
    const int64_t n_keys = c->n_stream * PM_STEP_MAX_SEQ;
    for (int64_t i = 0; i < n; i++) {
        if (keys[i] < 0 || keys[i] >= n_keys) {
            return PM_ERR_RANGE;
        }
        if (c->pdirty[keys[i]] & 2) {
            return PM_OK;
        }
        out[i] = c->pmax[keys[i]];
    }
    *ok = 1;
    return PM_OK;
}

// whether every one of the n ids names a recurrent cell's tail inside the cells (or none)
static int pm_rs_ids_inside(const int32_t * tail, int64_t size, const int64_t * ids, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= size || tail[ids[i]] >= size) {
            return 0;
        }
    }
    return 1;
}

pm_status pm_step_rs_pos(const int32_t * tail, const int32_t * pos, int64_t size, const int64_t * ids, int64_t n,
                         int64_t * out) {
    if (tail == NULL || pos == NULL || ids == NULL || out == NULL || n < 0 || size < 0) {
        return PM_ERR_ARG;
    }
    if (!pm_rs_ids_inside(tail, size, ids, n)) {
        return PM_ERR_RANGE;
    }
    for (int64_t i = 0; i < n; i++) {
        const int32_t t = tail[ids[i]];
        out[i] = t >= 0 ? pos[t] : -1;
    }
    return PM_OK;
}

pm_status pm_step_hybrid_pos_max(const pm_step_cells * c, const int64_t * keys, const int32_t * tail,
                                 const int32_t * pos, int64_t size, const int64_t * ids, int64_t n, int64_t * out,
                                 int32_t * ok) {
    if (ok == NULL) {
        return PM_ERR_ARG;
    }
    *ok = 0;
    // the cache's answers first (out holds them, or *ok stays 0), then the recurrent
    // part's checks, then the lesser of the two
    int32_t kv_ok = 0;
    const pm_status st = pm_step_kv_pos_max(c, keys, n, out, &kv_ok);
    if (st != PM_OK || !kv_ok) {
        return st;
    }
    if (tail == NULL || pos == NULL || ids == NULL || size < 0) {
        return PM_ERR_ARG;
    }
    if (!pm_rs_ids_inside(tail, size, ids, n)) {
        return PM_ERR_RANGE;
    }
    for (int64_t i = 0; i < n; i++) {
        const int32_t t = tail[ids[i]];
        const int64_t r = t >= 0 && pos[t] > -1 ? pos[t] : -1;
        out[i] = r < out[i] ? r : out[i];
    }
    *ok = 1;
    return PM_OK;
}

// Whether any of the 32 positions from pos[c0] lies in [p0, p0 + width) (as unsigned
// pos - p0 < width: a position below p0 wraps past the width; p0 >= 0): a fixed-trip test
// the compiler vectorises, so that blocks with no such position (most of them, for a tail
// or middle range) are skipped without reading their owners (a count measured a little
// faster here than pm_range_mask32's packs or an or-ed compare). Both cache lines of the
// block 2 KiB ahead are asked for: a scan of cold cells is latency-bound.
static inline int pm_block_has_pos(const int32_t * pos, int64_t c0, uint32_t p0, uint32_t width) {
    PM_PREFETCH(pos + c0 + 512);
    PM_PREFETCH(pos + c0 + 528);
    int32_t hits = 0;
    for (int j = 0; j < 32; ++j) {
        hits += (uint32_t) pos[c0 + j] - p0 < width;
    }
    return hits != 0;
}

pm_status pm_kv_seq_cells_range(const int32_t * pos, const int32_t * owner, const uint64_t * bits, int64_t n_words,
                                int64_t n, int32_t seq_id, int32_t p0, int32_t p1, int64_t * out, int64_t cap,
                                int64_t * count) {
    if (pos == NULL || owner == NULL || count == NULL || n < 0 || cap < 0 || (cap > 0 && out == NULL) || p0 < 0 ||
        seq_id < 0 || (bits != NULL && (n_words < 1 || n_words > 4))) {
        return PM_ERR_ARG;  // (a negative id would match the owners' -1 and -2 markers)
    }
    // owners are read only in blocks with a position in range (pm_block_has_pos)
    const uint32_t width = p1 > p0 ? (uint32_t) ((int64_t) p1 - p0) : 0;
    // a shared cell (owner -2) is taken by its bit; an id past the bitsets is in none
    const int shared = bits != NULL && seq_id < 64 * n_words;
    const uint64_t * word = shared ? bits + (seq_id >> 6) : NULL;
    const uint64_t bit = (uint64_t) 1 << (seq_id & 63);
    int64_t k = 0;
    for (int64_t c0 = 0; c0 < n; c0 += 32) {
        const int64_t c1 = c0 + 32 < n ? c0 + 32 : n;
        if (c1 - c0 == 32 && !pm_block_has_pos(pos, c0, (uint32_t) p0, width)) {
            continue;
        }
        for (int64_t c = c0; c < c1; ++c) {
            if ((uint32_t) pos[c] - (uint32_t) p0 < width &&
                (owner[c] == seq_id || (shared && owner[c] == -2 && (word[c * n_words] & bit)))) {
                if (k < cap) {
                    out[k] = c;
                }
                ++k;
            }
        }
    }
    *count = k;
    return k <= cap ? PM_OK : PM_ERR_RANGE;
}

// Shared cell i (global index gi) of a removal loses seq_id's bit (in *b, its bitset's word
// of that bit): its position joins [*lo_pos, *hi_pos], its owner is recounted
static inline void pm_unshare_one(pm_step_cells * c, int64_t strm, int64_t gi, uint64_t * b, uint64_t bit,
                                  int32_t p, int32_t * lo_pos, int32_t * hi_pos) {
    *b &= ~bit;
    *lo_pos = p < *lo_pos ? p : *lo_pos;
    *hi_pos = p > *hi_pos ? p : *hi_pos;
    pm_step_reown(c, strm, gi);
}

// pm_step_kv_rm_seq's part in the cells of stream strm below n_scan that seq_id shares
// with other sequences, at positions p with p - base < width (unsigned): its bit cleared,
// the owner recounted (pm_step_reown: a shared cell holds two or more, so none is
// emptied), [*lo_pos, *hi_pos] widened to their positions. Blocks of 32 cells without a
// shared one are passed by their count, and the scan stops past the stream's last shared
// cell (n_multi of them seen: a forked prompt's lie at the start); in a whole block with
// one word a cell, the cells to take are masks (shared, bit set, position in range)
// walked by their bits. Returns whether any cell lost the bit (the caller's bounds then
// may be stale).
static int pm_step_rm_shared(pm_step_cells * c, int64_t strm, int32_t seq_id, uint32_t base, uint32_t width,
                             int64_t n_scan, int32_t * lo_pos, int32_t * hi_pos) {
    if (c->n_multi[strm] == 0 || seq_id >= pm_step_ids(c)) {
        return 0;
    }
    const int64_t n_words = c->n_words, word = seq_id >> 6, g0 = strm * c->size;
    const uint64_t bit = (uint64_t) 1 << (seq_id & 63);
    const int32_t * pos = c->pos + g0;
    const int32_t * owner = c->owner + g0;
    uint64_t * bits = c->seq + g0 * n_words;
    int any = 0;
    int64_t left = c->n_multi[strm];  // shared cells not seen yet (counted before any loses a bit)
    for (int64_t c0 = pm_next_shared_block(owner, 0, n_scan, &left); c0 >= 0;
         c0 = pm_next_shared_block(owner, c0 + PM_STEP_BLOCK, n_scan, &left)) {
        const int64_t c1 = c0 + PM_STEP_BLOCK < n_scan ? c0 + PM_STEP_BLOCK : n_scan;
        if (c1 - c0 == PM_STEP_BLOCK && n_words == 1) {
            // the bit's mask first: in most blocks with shared cells seq_id holds none
            uint32_t take = pm_bit_mask32(bits + c0, bit);
            if (take != 0) {
                take &= pm_eq_mask32(owner + c0, -2) & pm_range_mask32(pos + c0, base, width);
            }
            any |= take != 0;
            for (; take != 0; take &= take - 1) {
                const int64_t i = c0 + pm_ctz64(take);
                pm_unshare_one(c, strm, g0 + i, bits + i, bit, pos[i], lo_pos, hi_pos);
            }
            continue;
        }
        for (int64_t i = c0; i < c1; i++) {
            uint64_t * b = bits + i * n_words + word;
            if (owner[i] == -2 && (uint32_t) pos[i] - base < width && (*b & bit)) {
                pm_unshare_one(c, strm, g0 + i, b, bit, pos[i], lo_pos, hi_pos);
                any = 1;
            }
        }
    }
    return any;
}

// Empty cell i of a removal (pm_step_kv_rm_seq): its position joins [*lo_pos, *hi_pos], it
// is the first (if none was) and last cell freed, one more of *k
static inline void pm_rm_one(int32_t * pos, int32_t * shift, int32_t * owner, uint64_t * seq, int64_t n_words,
                             int64_t i, int32_t * lo_pos, int32_t * hi_pos, int64_t * first, int64_t * last,
                             int64_t * k) {
    *lo_pos = pos[i] < *lo_pos ? pos[i] : *lo_pos;
    *hi_pos = pos[i] > *hi_pos ? pos[i] : *hi_pos;
    pos[i]   = -1;
    shift[i] = 0;
    owner[i] = -1;
    seq[n_words * i] = 0;
    *first = *first < 0 ? i : *first;
    *last  = i;
    ++*k;
}

pm_status pm_step_kv_rm_seq(pm_step_cells * c, int64_t strm, int32_t seq_id, int64_t p0, int64_t p1, int32_t whole,
                            int64_t n_scan, int64_t * n_freed, int64_t * first_freed, int32_t * done) {
    if (c == NULL || n_freed == NULL || first_freed == NULL || done == NULL || p0 < 0) {
        return PM_ERR_ARG;
    }
    if (strm < 0 || strm >= c->n_stream || seq_id < 0 || seq_id >= 256 || n_scan < 0 || n_scan > c->size) {
        return PM_ERR_RANGE;
    }
    if (pm_step_ids(c) == 0) {
        return PM_ERR_ARG;  // (no bitset words to clear)
    }
    *done = 0;
    *n_freed = 0;
    *first_freed = -1;
    // positions are int32, so a range past INT32_MAX is cut there
    const int64_t hi = p1 < INT32_MAX ? p1 : INT32_MAX;
    if (p0 >= hi) {
        *done = 1;  // an empty range: nothing to remove
        return PM_OK;
    }
    const uint32_t width = (uint32_t) (hi - p0);
    const uint32_t base = (uint32_t) p0;
    int32_t * pos = c->pos + strm * c->size;
    int32_t * shift = c->shift + strm * c->size;
    int32_t * owner = c->owner + strm * c->size;
    // a cell seq_id holds alone has that one bit set: only its word is cleared (an id past
    // the bitsets is in no cell: word 0, never written, keeps the pointer inside them)
    const int64_t n_words = c->n_words;
    const int64_t word = (seq_id >> 6) < n_words ? (seq_id >> 6) : 0;
    uint64_t * seq = c->seq + strm * c->size * n_words + word;
    // every position in range (a whole sequence's removal): the positions alone select no
    // block, so no block is tested for one
    const int any_pos = p0 == 0 && hi == INT32_MAX;
    int64_t k = 0, first = -1, last = -1;
    int32_t lo_pos = INT32_MAX, hi_pos = INT32_MIN;
    const int may_shift = pm_step_may_shift(c, strm);
    for (int64_t c0 = 0; c0 < n_scan; c0 += 32) {
        const int64_t c1 = c0 + 32 < n_scan ? c0 + 32 : n_scan;
        if (c1 - c0 == 32) {
            if (!any_pos && !pm_block_has_pos(pos, c0, base, width)) {
                continue;
            }
            // the block's cells to remove as a mask (pm_eq_mask32): none (skipped) or all
            // (a run of the sequence's cells: emptied with whole-block stores) are usual.
            // Every position in range: the owners alone tell them (a cell of seq_id is not
            // empty, so its position is >= 0; the one position past the range, INT32_MAX,
            // is ruled out below for a block taken whole)
            uint32_t m = pm_eq_mask32(owner + c0, seq_id);
            if (m != 0 && !any_pos) {
                m &= pm_range_mask32(pos + c0, base, width);
            }
            if (m == 0) {
                continue;
            }
            int32_t at_max = 0;
            for (int j = 0; any_pos && m == UINT32_MAX && j < 32; ++j) {
                at_max |= pos[c0 + j] == INT32_MAX;
            }
            if (m == UINT32_MAX && !at_max) {
                for (int j = 0; !whole && j < 32; ++j) {  // (a whole removal resets the bounds)
                    lo_pos = pos[c0 + j] < lo_pos ? pos[c0 + j] : lo_pos;
                    hi_pos = pos[c0 + j] > hi_pos ? pos[c0 + j] : hi_pos;
                }
                for (int j = 0; j < 32; ++j) {  // (plain loops: the compiler's vector stores)
                    pos[c0 + j] = -1;
                    owner[c0 + j] = -1;
                }
                if (may_shift) {
                    pm_zero16(shift + c0, 32 * sizeof(int32_t));
                }
                if (n_words == 1) {
                    pm_zero16(seq + c0, 32 * sizeof(uint64_t));
                } else {
                    for (int j = 0; j < 32; ++j) {
                        seq[n_words * (c0 + j)] = 0;
                    }
                }
                first = first < 0 ? c0 : first;
                last = c0 + 31;
                k += 32;
                continue;
            }
            for (uint32_t x = m; x != 0; x &= x - 1) {  // the block's cells to remove, one by one
                const int64_t i = c0 + pm_ctz64(x);
                if ((uint32_t) pos[i] - base < width) {  // (rules out INT32_MAX where any_pos)
                    pm_rm_one(pos, shift, owner, seq, n_words, i, &lo_pos, &hi_pos, &first, &last, &k);
                }
            }
            continue;
        }
        for (int64_t i = c0; i < c1; ++i) {  // the last, partial block
            if ((uint32_t) pos[i] - base < width && owner[i] == seq_id) {
                pm_rm_one(pos, shift, owner, seq, n_words, i, &lo_pos, &hi_pos, &first, &last, &k);
            }
        }
    }
    // the cells seq_id shares with others lose its bit, keep their position (seq_rm_bit)
    const int unshared = pm_step_rm_shared(c, strm, seq_id, base, width, n_scan, &lo_pos, &hi_pos);
    const int64_t key = strm * 256 + seq_id;
    if (whole) {
        c->pmin[key] = INT64_MAX;
        c->pmax[key] = -1;
        c->pdirty[key] = 0;
    } else if (k > 0 || unshared) {
        if (lo_pos <= c->pmin[key]) {
            c->pdirty[key] |= 1;
        }
        if (hi_pos >= c->pmax[key]) {
            c->pdirty[key] |= 2;
        }
    }
    if (k > 0) {
        c->used[strm] -= k;
        if (last + 1 >= c->used_max_p1[strm]) {
            c->used_max_dirty[strm] = 1;
        }
    }
    *n_freed = k;
    *first_freed = first;
    *done = 1;
    return PM_OK;
}

pm_status pm_step_kv_seq_rm(pm_step_cells * c, int64_t * heads, int64_t strm, int32_t seq_id, int64_t p0,
                            int64_t p1, int64_t * n_freed, int64_t * first_freed, int32_t * done) {
    if (c == NULL || n_freed == NULL || first_freed == NULL || done == NULL || p0 < 0) {
        return PM_ERR_ARG;
    }
    if (strm < 0 || strm >= c->n_stream || seq_id < 0 || seq_id >= PM_STEP_MAX_SEQ) {
        return PM_ERR_RANGE;
    }
    const int64_t key = strm * PM_STEP_MAX_SEQ + seq_id;
    int32_t whole = 0;
    if (p1 > p0 && c->pdirty[key] == 0) {
        const int64_t lo = c->pmin[key], hi = c->pmax[key];
        if (hi < p0 || lo >= p1) {
            p1 = p0;  // clean bounds outside the range (a sequence without cells too)
        } else {
            whole = p0 <= lo && hi < p1;
        }
    }
    if (p1 <= p0) {
        if (pm_step_ids(c) == 0) {
            return PM_ERR_ARG;  // (as pm_step_kv_rm_seq refuses such a view)
        }
        *n_freed = 0;
        *first_freed = -1;
        *done = 1;
        return PM_OK;
    }
    const int64_t n_scan = c->used_max_p1[strm] < c->size ? c->used_max_p1[strm] : c->size;
    const pm_status st = pm_step_kv_rm_seq(c, strm, seq_id, p0, p1, whole, n_scan, n_freed, first_freed, done);
    if (st == PM_OK && *done && heads != NULL && *first_freed >= 0 && *first_freed < heads[strm]) {
        heads[strm] = *first_freed;
    }
    return st;
}

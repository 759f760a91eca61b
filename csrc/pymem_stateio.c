#include "pymem_stateio.h"
#include "pymem_step.h"

#include <stdlib.h>
#include <string.h>

#ifndef _WIN32
#    include <pthread.h>
#    include <unistd.h>
#    define PM_HAVE_THREADS 1
#else
#    define PM_HAVE_THREADS 0
#endif

// blob words may sit at any byte offset: load and store them through memcpy (an
// unaligned int32_t access is undefined behaviour; compilers emit one plain move)
static inline int32_t pm_ld32(const int32_t * p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void pm_st32(int32_t * p, int32_t v) { memcpy(p, &v, sizeof v); }

// the rows of every run, packed into w; with `prefetch`, the next run's head is fetched
// first (long row runs; a transposed V channel's runs are short and follow at the run
// stride: the hardware prefetcher keeps up, a software one only costs)
static void pm_gather_runs(char * w, const char * base, int64_t row, const int64_t * run_starts,
                           const int64_t * run_ends, int64_t n_runs, int prefetch) {
    for (int64_t i = 0; i < n_runs; ++i) {
        if (prefetch && i + 1 < n_runs) {
            const char * next = base + run_starts[i + 1] * row;
            PM_PREFETCH(next);
            PM_PREFETCH(next + 64);
            PM_PREFETCH(next + 128);
            PM_PREFETCH(next + 192);
        }
        const int64_t len = (run_ends[i] - run_starts[i]) * row;
        pm_copy_bytes(w, base + run_starts[i] * row, (size_t) len);
        w += len;
    }
}

// --- the data phase of a section write, on one or several threads ----------------------
// settings read by every state write, possibly on other threads than set them: relaxed
// atomic loads and stores (each value valid alone; a pair read during a change is either)
#if defined(__GNUC__) || defined(__clang__)
#    define PM_LOAD(x)     __atomic_load_n(&(x), __ATOMIC_RELAXED)
#    define PM_STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#else
#    define PM_LOAD(x)     (x)
#    define PM_STORE(x, v) ((x) = (v))
#endif
static int32_t pm_copy_threads   = 0;   // 0: the default (pm_default_copy_threads)
static int64_t pm_copy_min_bytes = -1;  // -1: the default (pm_min_bytes)
static int32_t pm_copy_last      = 0;   // shares of the last section's data phase (a test hook)

// the defaults, found once (sysconf reads a file: not once per state write): the thread
// count from PYMEM_STATE_THREADS when it holds a count in [1, 64], else min(4, online
// CPUs); min_bytes from PYMEM_STATE_MIN_BYTES when it holds a byte count in [0, 2^62],
// else PM_COPY_MIN_BYTES_DEFAULT
#if PM_HAVE_THREADS
static int32_t        pm_default_threads = 1;
static int64_t        pm_default_min     = PM_COPY_MIN_BYTES_DEFAULT;
static pthread_once_t pm_default_once    = PTHREAD_ONCE_INIT;

// the decimal digits env holds, as an integer in [lo, hi], into *out; 0, *out unchanged,
// for anything else (unset, empty, a sign or space, other characters, out of range)
static int pm_env_int(const char * name, long long lo, long long hi, long long * out) {
    const char * env = getenv(name);
    if (env == NULL || *env < '0' || *env > '9') {
        return 0;
    }
    char *          end = NULL;
    const long long v   = strtoll(env, &end, 10);
    if (*end != '\0' || v < lo || v > hi) {
        return 0;  // (strtoll's overflow clamps to LLONG_MAX: past hi)
    }
    *out = v;
    return 1;
}

static void pm_find_defaults(void) {
    long long v = 0;
    if (pm_env_int("PYMEM_STATE_MIN_BYTES", 0, (long long) 1 << 62, &v)) {
        pm_default_min = (int64_t) v;
    }
    if (pm_env_int("PYMEM_STATE_THREADS", 1, 64, &v)) {
        pm_default_threads = (int32_t) v;
        return;
    }
    const long cpus    = sysconf(_SC_NPROCESSORS_ONLN);
    pm_default_threads = cpus < 1 ? 1 : (cpus > 4 ? 4 : (int32_t) cpus);
}
#endif

static int32_t pm_default_copy_threads(void) {
#if PM_HAVE_THREADS
    pthread_once(&pm_default_once, pm_find_defaults);
    return pm_default_threads;
#else
    return 1;
#endif
}

// the min_bytes in effect: the one set, else the default's
static int64_t pm_min_bytes(void) {
    const int64_t set = PM_LOAD(pm_copy_min_bytes);
    if (set >= 0) {
        return set;
    }
#if PM_HAVE_THREADS
    pthread_once(&pm_default_once, pm_find_defaults);
    return pm_default_min;
#else
    return PM_COPY_MIN_BYTES_DEFAULT;
#endif
}

pm_status pm_set_copy_threads(int32_t n, int64_t min_bytes) {
    if (n < 0 || n > 64 || min_bytes < -1) {
        return PM_ERR_ARG;
    }
    PM_STORE(pm_copy_threads, n);
    PM_STORE(pm_copy_min_bytes, n == 0 ? (int64_t) -1 : min_bytes);
    return PM_OK;
}

int32_t pm_copy_last_shares(void) {
    return PM_LOAD(pm_copy_last);
}

#if PM_HAVE_THREADS
static int32_t pm_pool_size      = 0;  // copy workers started (under pm_pool_mu)
static int32_t pm_copy_last_joined = 0;  // the workers that entered the last pooled job
#endif

int32_t pm_copy_workers(void) {
#if PM_HAVE_THREADS
    return PM_LOAD(pm_pool_size);
#else
    return 0;
#endif
}

int32_t pm_copy_last_helpers(void) {
#if PM_HAVE_THREADS
    return PM_LOAD(pm_copy_last_joined);
#else
    return 0;
#endif
}

int32_t pm_get_copy_threads(int64_t * min_bytes) {
    if (min_bytes != NULL) {
        *min_bytes = pm_min_bytes();
    }
    if (!PM_HAVE_THREADS) {
        return 1;  // whatever was set: copies run on the calling thread
    }
    const int32_t n = PM_LOAD(pm_copy_threads);
    return n > 0 ? n : pm_default_copy_threads();
}

// one piece of a section's tensor bytes, moved between the cells of a tensor (the runs'
// cells: a K/V row tensor's rows, one channel of a transposed V, one repetition) and a packed
// buffer: gathered (tensor -> packed, a write) or scattered (packed -> tensor, a restore)
typedef struct {
    char *       dst;       // gather: the packed bytes; scatter: the tensor side's cell 0
    const char * src;       // gather: the tensor side's cell 0; scatter: the packed bytes
    int64_t      bytes;     // per cell
    int64_t      stride;    // between cells on the tensor side (a gather: == bytes, whole rows)
    int32_t      scatter;   // 0: gather, 1: scatter (src NULL: zeros)
    int32_t      prefetch;  // the next run's head first: row pieces, not a transposed V's channels
} pm_piece;

typedef struct {
    const pm_piece * pieces;
    int64_t          first, end;  // this share: pieces [first, end)
    const int64_t *  run_starts;
    const int64_t *  run_ends;
    int64_t          n_runs;
} pm_share;

// a scatter piece without a source (src NULL) writes zeros
static void pm_scatter_runs(const pm_piece * pc, const int64_t * run_starts, const int64_t * run_ends,
                            int64_t n_runs) {
    const char *  from  = pc->src;
    const int64_t bytes = pc->bytes, stride = pc->stride;
    // whole rows: a run is one block; part of each cell's row: cell by cell
    const int64_t block = stride == bytes ? 0 : bytes;
    for (int64_t i = 0; i < n_runs; ++i) {
        const int64_t a = run_starts[i], len = run_ends[i] - a;
        if (pc->prefetch && block == 0 && i + 1 < n_runs) {  // the next run's head, to be written
            char * next = pc->dst + run_starts[i + 1] * stride;
            PM_PREFETCH_W(next);
            PM_PREFETCH_W(next + 64);
            PM_PREFETCH_W(next + 128);
            PM_PREFETCH_W(next + 192);
        }
        const int64_t n_blocks = block == 0 ? 1 : len, size = block == 0 ? len * bytes : bytes;
        for (int64_t c = 0; c < n_blocks; ++c) {
            char * to = pc->dst + (a + c) * stride;
            if (from == NULL) {
                memset(to, 0, (size_t) size);
            } else {
                pm_copy_bytes(to, from, (size_t) size);
                from += size;
            }
        }
    }
}

static void pm_copy_pieces(const pm_share * sh) {
    for (int64_t p = sh->first; p < sh->end; ++p) {
        const pm_piece * pc = sh->pieces + p;
        if (pc->scatter) {
            pm_scatter_runs(pc, sh->run_starts, sh->run_ends, sh->n_runs);
        } else {
            pm_gather_runs(pc->dst, pc->src, pc->bytes, sh->run_starts, sh->run_ends, sh->n_runs, pc->prefetch);
        }
    }
}

#if PM_HAVE_THREADS
// --- the copy workers: started once, woken per section --------------------------------
// A section's shares go on the one job slot; the calling thread and the workers claim
// them in order (next), so a worker late to wake costs nothing: the caller copies what no
// one claimed and waits only for shares a worker is copying. A second caller while the
// slot is taken (another thread's section) copies all of its shares itself. A fork's
// child starts with no workers (pthread_atfork resets the pool).
typedef struct {
    const pm_share * shares;
    int64_t          n, next, done;  // shares; the next to claim; those copied
    int32_t          entered;        // workers inside this job (it lives on the caller's stack)
    int32_t          helpers;        // the most workers that may join (the call's threads - 1)
    int32_t          joined;         // the workers that entered it
} pm_copy_job;

static pthread_mutex_t pm_pool_mu   = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t  pm_pool_wake = PTHREAD_COND_INITIALIZER;  // workers: a new job
static pthread_cond_t  pm_pool_idle = PTHREAD_COND_INITIALIZER;  // the caller: shares done
static pm_copy_job *   pm_pool_job  = NULL;
static uint64_t        pm_pool_gen  = 0;  // jobs posted
static pthread_once_t  pm_pool_once = PTHREAD_ONCE_INIT;
static int32_t         pm_pool_cap  = 64;  // workers this process can start (lowered by a failure)

// claim and copy shares of j until none is left (the pool's mutex held on entry and exit)
static void pm_pool_drain(pm_copy_job * j) {
    while (j->next < j->n) {
        const int64_t i = j->next++;
        pthread_mutex_unlock(&pm_pool_mu);
        pm_copy_pieces(&j->shares[i]);
        pthread_mutex_lock(&pm_pool_mu);
        j->done++;
    }
}

static void * pm_pool_main(void * arg) {
    (void) arg;
    // (no job was ever seen: a worker started for a call takes part in it; jobs are
    // numbered from 1, and a job on the slot is always the current one)
    uint64_t seen = 0;
    pthread_mutex_lock(&pm_pool_mu);
    for (;;) {
        while (pm_pool_job == NULL || pm_pool_gen == seen) {
            pthread_cond_wait(&pm_pool_wake, &pm_pool_mu);
        }
        seen              = pm_pool_gen;
        pm_copy_job * job = pm_pool_job;
        if (job->joined >= job->helpers) {
            continue;  // the call asked for fewer threads than the pool has
        }
        job->entered++;
        job->joined++;
        pm_pool_drain(job);
        job->entered--;
        pthread_cond_signal(&pm_pool_idle);
    }
    return NULL;
}

static void pm_pool_lock_for_fork(void) { pthread_mutex_lock(&pm_pool_mu); }

static void pm_pool_unlock_after_fork(void) { pthread_mutex_unlock(&pm_pool_mu); }

static void pm_pool_reset_in_child(void) {  // only the forking thread lives on
    pthread_mutex_init(&pm_pool_mu, NULL);
    pthread_cond_init(&pm_pool_wake, NULL);
    pthread_cond_init(&pm_pool_idle, NULL);
    pm_pool_job = NULL;
    pm_pool_gen = 0;
    pm_pool_cap = 64;
    PM_STORE(pm_pool_size, 0);
}

static void pm_pool_register_fork(void) {
    pthread_atfork(pm_pool_lock_for_fork, pm_pool_unlock_after_fork, pm_pool_reset_in_child);
}

// copy n shares with the pool's help (workers started up to want - 1 as needed); false when
// the job slot is taken (the caller copies them alone)
static int pm_pool_run(const pm_share * shares, int64_t n, int32_t want) {
    pthread_once(&pm_pool_once, pm_pool_register_fork);
    pthread_mutex_lock(&pm_pool_mu);
    if (pm_pool_job != NULL) {
        pthread_mutex_unlock(&pm_pool_mu);
        return 0;
    }
    while (pm_pool_size < want - 1 && pm_pool_size < pm_pool_cap) {
        pthread_t      tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int bad = pthread_create(&tid, &attr, pm_pool_main, NULL);
        pthread_attr_destroy(&attr);
        if (bad) {
            pm_pool_cap = pm_pool_size;  // no more tries: the caller claims more shares itself
            break;
        }
        PM_STORE(pm_pool_size, pm_pool_size + 1);
    }
    pm_copy_job job = { shares, n, 0, 0, 0, want - 1, 0 };
    pm_pool_job     = &job;
    pm_pool_gen++;
    pthread_cond_broadcast(&pm_pool_wake);
    pm_pool_drain(&job);
    while (job.done < job.n || job.entered > 0) {
        pthread_cond_wait(&pm_pool_idle, &pm_pool_mu);
    }
    pm_pool_job = NULL;
    PM_STORE(pm_copy_last_joined, job.joined);
    pthread_mutex_unlock(&pm_pool_mu);
    return 1;
}
#endif

// split n_pieces pieces (n cells each, `bytes` in all) into `parts` shares of about equal
// bytes, contiguous in piece order (a piece joins a share while its middle lies below the
// share's goal: the nearest split); the shares that got pieces
static int32_t pm_split_shares(const pm_piece * pieces, int64_t n_pieces, int64_t n, int64_t bytes, int64_t parts,
                               const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs,
                               pm_share * shares) {
    int64_t p = 0, acc = 0;
    int32_t used = 0;
    for (int64_t t = 0; t < parts; ++t) {
        shares[t]          = (pm_share) { pieces, p, p, run_starts, run_ends, n_runs };
        const int64_t goal = bytes / parts * (t + 1);  // cumulative bytes this share ends at
        while (p < n_pieces && (t == parts - 1 || acc + pieces[p].bytes * n / 2 < goal)) {
            acc += pieces[p].bytes * n;
            ++p;
        }
        shares[t].end = p;
        used += shares[t].first < shares[t].end;
    }
    return used;
}

// move every piece (n cells each), on pm_copy_threads threads when they hold enough bytes.
// The threads take part in shares of about equal bytes; the pool is handed PM_SHARES_PER
// times as many (a worker late to wake then leaves the caller less to wait for).
#define PM_SHARES_PER 4
static void pm_copy_all(const pm_piece * pieces, int64_t n_pieces, int64_t n, const int64_t * run_starts,
                        const int64_t * run_ends, int64_t n_runs) {
    if (n_pieces < 1) {
        return;  // a cache without layers: headers only
    }
    int64_t bytes = 0;
    for (int64_t p = 0; p < n_pieces; ++p) {
        bytes += pieces[p].bytes * n;
    }
    int64_t n_thr = 1;
    if (PM_HAVE_THREADS && bytes >= pm_min_bytes() && n_pieces > 1) {
        n_thr = pm_get_copy_threads(NULL);
    }
    if (n_thr > n_pieces) {
        n_thr = n_pieces;
    }
    pm_share shares[64 * PM_SHARES_PER];
    PM_STORE(pm_copy_last, pm_split_shares(pieces, n_pieces, n, bytes, n_thr, run_starts, run_ends, n_runs, shares));
#if PM_HAVE_THREADS
    if (n_thr > 1) {
        const int64_t parts = n_thr * PM_SHARES_PER < n_pieces ? n_thr * PM_SHARES_PER : n_pieces;
        pm_split_shares(pieces, n_pieces, n, bytes, parts, run_starts, run_ends, n_runs, shares);
        if (pm_pool_run(shares, parts, (int32_t) n_thr)) {
            return;
        }
        for (int64_t t = 0; t < parts; ++t) {  // the pool's slot taken: in turn
            pm_copy_pieces(&shares[t]);
        }
        return;
    }
#endif
    pm_copy_pieces(&shares[0]);  // n_thr is 1 here
}

// The pieces of one call: moved by pm_batch_run, on the state threads, when their list
// could be allocated; else each one on the calling thread as it is added (so a restore's
// commit never fails for want of memory). `cap`: the most pieces the call adds.
#define PM_BATCH_MAX_PIECES (1 << 20)

typedef struct {
    pm_piece *      pieces;  // NULL: no list
    int64_t         n_pieces, cap;
    int64_t         n;  // cells per piece
    const int64_t * run_starts;
    const int64_t * run_ends;
    int64_t         n_runs;
} pm_batch;

static pm_batch pm_batch_new(int64_t cap, int64_t n, const int64_t * run_starts, const int64_t * run_ends,
                             int64_t n_runs) {
    pm_batch b = { NULL, 0, cap, n, run_starts, run_ends, n_runs };
    // a list only where it can be split: more than one piece and more than one thread set
    // (else each piece moves as it is added, no malloc); and not for a count no real
    // section reaches (1 << 20 pieces, 40 MiB of list: 80 layers x 13,000 V channels),
    // which only odd parameters give (one byte a repetition over a whole tensor)
    if (cap > 1 && cap <= PM_BATCH_MAX_PIECES && pm_get_copy_threads(NULL) > 1) {
        b.pieces = (pm_piece *) malloc((size_t) cap * sizeof(pm_piece));
    }
    if (b.pieces == NULL) {
        PM_STORE(pm_copy_last, 1);  // every piece on the calling thread
    }
    return b;
}

static void pm_batch_add(pm_batch * b, pm_piece pc) {
    if (b->pieces != NULL && b->n_pieces < b->cap) {
        b->pieces[b->n_pieces++] = pc;
        return;
    }
    const pm_share one = { &pc, 0, 1, b->run_starts, b->run_ends, b->n_runs };
    pm_copy_pieces(&one);
}

static void pm_batch_run(pm_batch * b) {
    if (b->pieces != NULL) {
        pm_copy_all(b->pieces, b->n_pieces, b->n, b->run_starts, b->run_ends, b->n_runs);
        free(b->pieces);
        b->pieces = NULL;
    }
}


pm_status pm_kv_seq_same_cells(const int32_t * pos, const int32_t * shift, const int32_t * owner,
                               const int32_t * ext, int64_t size, int32_t seq_id, int64_t head, int64_t used,
                               const int32_t * words, int64_t n, int64_t rec, int64_t n_ext, int64_t * idx,
                               int64_t * run_starts, int64_t * run_ends, int64_t * n_runs, int32_t * same) {
    if (pos == NULL || owner == NULL || words == NULL || run_starts == NULL ||
        run_ends == NULL || n_runs == NULL || same == NULL || n < 1 || size < 1 || (n_ext != 0 && n_ext != 3) ||
        rec != 3 + n_ext || (n_ext != 0 && ext == NULL)) {
        return PM_ERR_ARG;
    }
    *same = 0;
    *n_runs = 0;
    int64_t m = 0;     // cells of seq_id seen
    int64_t runs = 0;  // runs found
    int64_t c = 0;
    while (c < size) {
        // skip blocks of 32 cells held by others without a branch per cell
        if (c + 32 <= size) {
            int32_t hits = 0;
            for (int j = 0; j < 32; ++j) {
                hits += owner[c + j] == seq_id;
            }
            if (hits == 0) {
                c += 32;
                continue;
            }
            while (owner[c] != seq_id) {
                ++c;  // to the block's first cell of seq_id (there is one)
            }
        } else if (owner[c] != seq_id) {
            ++c;
            continue;
        }
        // a run of cells of seq_id: [c, e), whole blocks of 32 first
        int64_t e = c + 1;
        while (e + 32 <= size) {
            int32_t hits = 0;
            for (int j = 0; j < 32; ++j) {
                hits += owner[e + j] == seq_id;
            }
            if (hits != 32) {
                break;
            }
            e += 32;
        }
        while (e < size && owner[e] == seq_id) {
            ++e;
        }
        if (e - c > n - m) {
            return PM_OK;  // more cells than records
        }
        // compare the whole run without a branch per cell
        const int32_t * w = words + m * rec;
        int32_t bad = 0;
        for (int64_t k = 0; k < e - c; ++k) {
            const int32_t * r = w + k * rec;
            bad |= (pm_ld32(r + 1) ^ 1) | (pos[c + k] ^ pm_ld32(r));
        }
        if (shift != NULL) {
            for (int64_t k = c; k < e; ++k) {
                bad |= shift[k];
            }
        }
        if (n_ext != 0) {
            for (int64_t k = 0; k < e - c; ++k) {
                const int32_t * r = w + k * rec;
                const int32_t * x = ext + 3 * (c + k);
                bad |= (x[0] ^ pm_ld32(r + 2)) | (x[1] ^ pm_ld32(r + 3)) | (x[2] ^ pm_ld32(r + 4));
            }
        }
        if (bad != 0) {
            return PM_OK;
        }
        run_starts[runs] = c;
        run_ends[runs] = e;
        ++runs;
        if (idx != NULL) {
            for (int64_t k = c; k < e; ++k) {
                idx[k - c + m] = k;
            }
        }
        m += e - c;
        c = e;
    }
    if (m != n) {
        return PM_OK;
    }
    // the slot search after seq_rm: head moved back to the first freed cell, restarted at 0
    // when more than 2n cells of the stream's used - n are free before it
    int64_t h = head < run_starts[0] ? head : run_starts[0];
    if (h > used + n) {
        h = 0;
    }
    if (used < size) {
        for (int64_t c = h; c < run_ends[runs - 1]; ++c) {
            if (pos[c] < 0) {
                return PM_OK;  // an empty cell the search would take first
            }
        }
    }
    *n_runs = runs;
    *same = 1;
    return PM_OK;
}

// The runs [run_starts[i], run_ends[i]) of a call, checked: each non-empty and from 0 on,
// their cells counted without overflow (runs may come in any order). *n_cells = that count,
// *end_max = one past the highest cell. PM_ERR_ARG for a bad run or a count past INT64_MAX.
static pm_status pm_runs_measure(const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs,
                                 int64_t * n_cells, int64_t * end_max) {
    int64_t cells = 0, hi = 0;
    for (int64_t i = 0; i < n_runs; ++i) {
        const int64_t a = run_starts[i], b = run_ends[i];
        if (a < 0 || b <= a || b - a > INT64_MAX - cells) {
            return PM_ERR_ARG;
        }
        cells += b - a;
        hi = b > hi ? b : hi;
    }
    *n_cells = cells;
    *end_max = hi;
    return PM_OK;
}

// the cells of n_runs runs that are non-empty, ascending and inside [0, size) (a selection
// of one stream, as pm_kv_select finds it); -1 when they are not
static int64_t pm_runs_ascending(const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs,
                                 int64_t size) {
    int64_t cells = 0, prev_end = 0;
    for (int64_t i = 0; i < n_runs; ++i) {
        if (run_starts[i] < prev_end || run_ends[i] <= run_starts[i] || run_ends[i] > size) {
            return -1;
        }
        cells += run_ends[i] - run_starts[i];
        prev_end = run_ends[i];
    }
    return cells;
}

// the checks of pm_stateio_put_cells' sections (host tensors, non-negative parameters,
// every byte inside its tensor, repetitions that do not overlap) for cells below end_max
// (>= 1)
static pm_status pm_cells_params_check(struct ggml_tensor * const * tensors, const int64_t * params, int64_t n_sec,
                                       int64_t end_max) {
    const uint64_t last_cell = (uint64_t) end_max - 1;
    for (int64_t k = 0; k < n_sec; ++k) {
        const struct ggml_tensor * t = tensors[k];
        const int64_t * p = params + 5 * k;
        if (t == NULL || t->data == NULL || t->buffer == NULL || !ggml_backend_buffer_is_host(t->buffer)) {
            return PM_ERR_ARG;
        }
        for (int j = 0; j < 5; ++j) {
            if (p[j] < 0) {
                return PM_ERR_ARG;
            }
        }
        if (p[3] == 0 || p[2] == 0) {
            continue;
        }
        // the highest byte written: last repetition, last cell (all values are < 2^62 in
        // any tensor that exists; each product is bounded by the check before it)
        const uint64_t nbytes = ggml_nbytes(t);
        const uint64_t off = (uint64_t) p[0], stride = (uint64_t) p[1], bytes = (uint64_t) p[2];
        const uint64_t reps = (uint64_t) p[3] - 1, rep_stride = (uint64_t) p[4];
        if (off > nbytes || bytes > nbytes || (rep_stride != 0 && reps > nbytes / rep_stride) ||
            (stride != 0 && last_cell > nbytes / stride)) {
            return PM_ERR_RANGE;
        }
        const uint64_t end = off + reps * rep_stride + last_cell * stride + bytes;
        if (end > nbytes || end < off) {
            return PM_ERR_RANGE;
        }
        // repetitions must not overlap (each is a piece that may move on its own thread);
        // with that, reps <= nbytes / rep_stride bounds the pieces' count below
        if (reps > 0 && rep_stride < last_cell * stride + bytes) {
            return PM_ERR_ARG;
        }
    }
    return PM_OK;
}

pm_status pm_stateio_put_cells(struct ggml_tensor * const * tensors, const void * const * src,
                               const int64_t * params, int64_t n_sec, const int64_t * run_starts,
                               const int64_t * run_ends, int64_t n_runs) {
    if (tensors == NULL || src == NULL || params == NULL || n_sec < 0 || n_runs < 0 ||
        (n_runs > 0 && (run_starts == NULL || run_ends == NULL))) {
        return PM_ERR_ARG;
    }
    // runs in any order (a slot search that wrapped around lists its later cells first)
    int64_t n_cells = 0, end_max = 0;
    if (pm_runs_measure(run_starts, run_ends, n_runs, &n_cells, &end_max) != PM_OK) {
        return PM_ERR_ARG;
    }
    if (n_runs == 0) {
        return PM_OK;
    }
    const pm_status st = pm_cells_params_check(tensors, params, n_sec, end_max);
    if (st != PM_OK) {
        return st;
    }
    // every check done: one piece per section and repetition
    int64_t n_pieces = 0;
    for (int64_t k = 0; k < n_sec; ++k) {
        const int64_t * p = params + 5 * k;
        n_pieces += p[2] == 0 ? 0 : p[3];
    }
    pm_batch batch = pm_batch_new(n_pieces, n_cells, run_starts, run_ends, n_runs);
    for (int64_t k = 0; k < n_sec; ++k) {
        const int64_t * p = params + 5 * k;
        if (p[2] == 0) {
            continue;
        }
        char *       base = (char *) tensors[k]->data + p[0];
        const char * from = (const char *) src[k];
        for (int64_t r = 0; r < p[3]; ++r) {  // rows (one repetition) prefetch; channels do not
            pm_batch_add(&batch, (pm_piece) { base + r * p[4], from, p[2], p[1], 1, p[3] == 1 });
            from = from == NULL ? NULL : from + n_cells * p[2];
        }
    }
    pm_batch_run(&batch);
    return PM_OK;
}

pm_status pm_kv_chase_records(const int32_t * words, int64_t size, int64_t n, int64_t fixed, int64_t n_seq_max,
                              int64_t * offs, int64_t * end, int64_t * bad, int32_t * why) {
    if (words == NULL || offs == NULL || end == NULL || bad == NULL || why == NULL || n < 1 || fixed < 2 ||
        size < fixed || n_seq_max < 0) {
        return PM_ERR_ARG;
    }
    *bad = -1;
    *why = 0;
    *end = 0;
    int64_t o = 0;
    for (int64_t k = 0; k < n; k++) {
        offs[k] = o;
        if (o > size - fixed) {
            *bad = k;
            *why = 1;
            return PM_OK;
        }
        const int64_t c = (int64_t) (uint32_t) pm_ld32(words + o + 1);
        o += fixed + (c < n_seq_max + 1 ? c : n_seq_max + 1);
    }
    for (int64_t k = 0; k < n; k++) {
        if ((int64_t) (uint32_t) pm_ld32(words + offs[k] + 1) > n_seq_max) {
            *bad = k;
            *why = 2;
            return PM_OK;
        }
    }
    *end = offs[n - 1] + fixed + (int64_t) (uint32_t) pm_ld32(words + offs[n - 1] + 1);
    if (*end > size) {
        *bad = n - 1;
        *why = 3;
    }
    return PM_OK;
}

pm_status pm_kv_cells_equal(const int32_t * pos, const int32_t * owner, const int32_t * ext, const int32_t * words,
                            int64_t n, int64_t rec, int64_t n_ext, int32_t n_seq_max, int32_t * same) {
    if (pos == NULL || owner == NULL || words == NULL || same == NULL || n < 0 || (n_ext != 0 && n_ext != 3) ||
        rec != 3 + n_ext || (n_ext != 0 && ext == NULL) || n_seq_max < 1) {
        return PM_ERR_ARG;
    }
    // (an id at or past n_seq_max is never a record's, even where a cell holds it: a
    // sequence the reference's prefix quirk hid; the parse refuses such a record)
    const uint32_t id_end = (uint32_t) n_seq_max;
    int32_t bad = 0;
    int64_t c = 0;
    // blocks of 64 cells in one branch-free pass each; the first block that differs ends
    // the scan (a restore of another state differs early)
    for (; c + 64 <= n && !bad; c += 64) {
        for (int j = 0; j < 64; ++j) {
            const int32_t * r = words + (c + j) * rec;
            bad |= (pm_ld32(r + 1) ^ 1) | (pos[c + j] ^ pm_ld32(r)) | (owner[c + j] ^ pm_ld32(r + rec - 1)) |
                   (pm_ld32(r) < 0) | ((uint32_t) pm_ld32(r + rec - 1) >= id_end);
        }
    }
    for (; c < n && !bad; ++c) {
        const int32_t * r = words + c * rec;
        bad |= (pm_ld32(r + 1) ^ 1) | (pos[c] ^ pm_ld32(r)) | (owner[c] ^ pm_ld32(r + rec - 1)) | (pm_ld32(r) < 0) |
               ((uint32_t) pm_ld32(r + rec - 1) >= id_end);
    }
    if (n_ext != 0) {
        for (int64_t c = 0; c < n; ++c) {
            const int32_t * r = words + c * rec;
            bad |= (ext[3 * c] ^ pm_ld32(r + 2)) | (ext[3 * c + 1] ^ pm_ld32(r + 3)) | (ext[3 * c + 2] ^ pm_ld32(r + 4));
        }
    }
    *same = bad == 0;
    return PM_OK;
}

#if defined(__SSE2__) || defined(_M_X64)
// four cells' records (twelve words) from w on, any alignment
static inline void pm_store_records4(int32_t * w, __m128i v0, __m128i v1, __m128i v2) {
    _mm_storeu_si128((__m128i *) (void *) w, v0);
    _mm_storeu_si128((__m128i *) (void *) (w + 4), v1);
    _mm_storeu_si128((__m128i *) (void *) (w + 8), v2);
}
#endif

// The records (position, 1, id) of cells [c, c1) one word at a time: the id owner[c], or
// seq_id where owner is NULL (the vector loops' tails)
static inline void pm_meta_tail(const int32_t * pos, const int32_t * owner, int32_t seq_id, int64_t c, int64_t c1,
                                int32_t * w) {
    for (; c < c1; ++c, w += 3) {
        pm_st32(w, pos[c]);
        pm_st32(w + 1, 1);
        pm_st32(w + 2, owner != NULL ? owner[c] : seq_id);
    }
}

// The records (position, 1, seq_id) of cells [c0, c1) from w on (any alignment): one
// sequence's usual records. With SSE2 (every x86-64), four cells' positions make three
// vectors of records ([p0 1 s p1] [1 s p2 1] [s p3 1 s]); the scalar loop stored a word at a
// time and reloaded its invariants (the compiler must assume w may alias them)
static void pm_meta_seq_run(const int32_t * pos, int64_t c0, int64_t c1, int32_t seq_id, int32_t * w) {
    int64_t c = c0;
#if defined(__SSE2__) || defined(_M_X64)
    const __m128i keep0 = _mm_setr_epi32(-1, 0, 0, -1), add0 = _mm_setr_epi32(0, 1, seq_id, 0);
    const __m128i keep1 = _mm_setr_epi32(0, 0, -1, 0), add1 = _mm_setr_epi32(1, seq_id, 0, 1);
    const __m128i keep2 = _mm_setr_epi32(0, -1, 0, 0), add2 = _mm_setr_epi32(seq_id, 0, 1, seq_id);
    for (; c + 4 <= c1; c += 4, w += 12) {
        const __m128i p = _mm_loadu_si128((const __m128i *) (const void *) (pos + c));
        const __m128i v0 = _mm_or_si128(_mm_and_si128(_mm_shuffle_epi32(p, _MM_SHUFFLE(1, 0, 0, 0)), keep0), add0);
        const __m128i v1 = _mm_or_si128(_mm_and_si128(_mm_shuffle_epi32(p, _MM_SHUFFLE(2, 2, 2, 2)), keep1), add1);
        const __m128i v2 = _mm_or_si128(_mm_and_si128(_mm_shuffle_epi32(p, _MM_SHUFFLE(3, 3, 3, 3)), keep2), add2);
        pm_store_records4(w, v0, v1, v2);
    }
#endif
    pm_meta_tail(pos, NULL, seq_id, c, c1, w);
}

// The records (position, 1, owner) of cells [c0, c1) from w on (any alignment): a whole
// stream's usual records, each cell's id its owner. With SSE2, four cells' positions P and
// owners O make the three vectors [p0 1 o0 p1] [1 o1 p2 1] [o2 p3 1 o3] from their two
// interleavings; the scalar loop stored a word at a time
static void pm_meta_owner_run(const int32_t * pos, const int32_t * owner, int64_t c0, int64_t c1, int32_t * w) {
    int64_t c = c0;
#if defined(__SSE2__) || defined(_M_X64)
    const __m128i keep0 = _mm_setr_epi32(-1, 0, -1, -1), one0 = _mm_setr_epi32(0, 1, 0, 0);
    const __m128i lane1 = _mm_setr_epi32(0, -1, 0, 0), lane2 = _mm_setr_epi32(0, 0, -1, 0);
    const __m128i one1 = _mm_setr_epi32(1, 0, 0, 1);
    const __m128i keep2 = _mm_setr_epi32(-1, -1, 0, -1), one2 = _mm_setr_epi32(0, 0, 1, 0);
    for (; c + 4 <= c1; c += 4, w += 12) {
        const __m128i p = _mm_loadu_si128((const __m128i *) (const void *) (pos + c));
        const __m128i o = _mm_loadu_si128((const __m128i *) (const void *) (owner + c));
        const __m128i lo = _mm_unpacklo_epi32(p, o);  // p0 o0 p1 o1
        const __m128i hi = _mm_unpackhi_epi32(p, o);  // p2 o2 p3 o3
        const __m128i v0 = _mm_or_si128(_mm_and_si128(_mm_shuffle_epi32(lo, _MM_SHUFFLE(2, 1, 0, 0)), keep0), one0);
        const __m128i v1 = _mm_or_si128(_mm_or_si128(_mm_and_si128(_mm_shuffle_epi32(lo, _MM_SHUFFLE(3, 3, 3, 3)), lane1),
                                                     _mm_and_si128(_mm_shuffle_epi32(hi, _MM_SHUFFLE(0, 0, 0, 0)), lane2)),
                                        one1);
        const __m128i v2 = _mm_or_si128(_mm_and_si128(_mm_shuffle_epi32(hi, _MM_SHUFFLE(3, 2, 2, 1)), keep2), one2);
        pm_store_records4(w, v0, v1, v2);
    }
#endif
    pm_meta_tail(pos, owner, 0, c, c1, w);
}

pm_status pm_kv_meta_words(const int32_t * pos, const int32_t * owner, const int32_t * ext, int64_t n_ext,
                           const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs, int32_t seq_id,
                           int32_t with_id, int32_t * out, int64_t cap_words) {
    if (pos == NULL || owner == NULL || out == NULL || (n_runs > 0 && (run_starts == NULL || run_ends == NULL)) ||
        n_runs < 0 || (n_ext != 0 && n_ext != 3) || (n_ext != 0 && ext == NULL) || cap_words < 0) {
        return PM_ERR_ARG;
    }
    const int64_t rec = 2 + n_ext + (with_id ? 1 : 0);
    int64_t total = 0;
    for (int64_t i = 0; i < n_runs; ++i) {
        if (run_starts[i] < 0 || run_ends[i] < run_starts[i]) {
            return PM_ERR_ARG;
        }
        total += run_ends[i] - run_starts[i];
    }
    if (total > cap_words / rec) {
        return PM_ERR_RANGE;
    }
    int32_t * w = out;
    if (n_ext == 0 && with_id) {
        for (int64_t i = 0; i < n_runs; ++i) {
            if (seq_id >= 0) {
                pm_meta_seq_run(pos, run_starts[i], run_ends[i], seq_id, w);
            } else {
                pm_meta_owner_run(pos, owner, run_starts[i], run_ends[i], w);
            }
            w += 3 * (run_ends[i] - run_starts[i]);
        }
        return PM_OK;
    }
    for (int64_t i = 0; i < n_runs; ++i) {
        for (int64_t c = run_starts[i]; c < run_ends[i]; ++c) {
            pm_st32(w, pos[c]);
            pm_st32(w + 1, with_id ? 1 : 0);
            if (n_ext != 0) {
                pm_st32(w + 2, ext[3 * c]);
                pm_st32(w + 3, ext[3 * c + 1]);
                pm_st32(w + 4, ext[3 * c + 2]);
            }
            if (with_id) {
                pm_st32(w + rec - 1, seq_id < 0 ? owner[c] : seq_id);
            }
            w += rec;
        }
    }
    return PM_OK;
}

// bytes of a stream section of n cells (see pm_kv_write_section); -1 for a bad spec
static int64_t pm_kv_section_bytes(const int64_t * spec, int64_t n, int64_t rec) {
    const int64_t n_layer = spec[0], v_trans = spec[1], el = spec[5];
    if (n == 0) {
        return 4;
    }
    int64_t total = 4 + 4 * rec * n + 8;
    for (int64_t il = 0; il < n_layer; ++il) {
        const int64_t * l = spec + 7 + 3 * il;
        if (l[0] <= 0 || l[1] < 0 || l[2] < 0) {
            return -1;
        }
        total += 12 + n * l[0];
        if (l[1] != 0) {
            total += 12 + n * (v_trans ? el * l[2] : l[1]);
        }
    }
    return total;
}

static inline char * pm_put_u32(char * w, uint32_t v) {
    memcpy(w, &v, 4);
    return w + 4;
}

static inline char * pm_put_u64(char * w, uint64_t v) {
    memcpy(w, &v, 8);
    return w + 8;
}

// whether [off, off + reps * rep_stride + cells * stride) lies inside t (host, allocated)
static int pm_section_inside(const struct ggml_tensor * t, uint64_t off, uint64_t reps, uint64_t rep_stride,
                             uint64_t cells, uint64_t stride) {
    if (t == NULL || t->data == NULL || t->buffer == NULL || !ggml_backend_buffer_is_host(t->buffer)) {
        return 0;
    }
    const uint64_t nbytes = ggml_nbytes(t);
    if (off > nbytes || (rep_stride != 0 && reps > nbytes / rep_stride) || (stride != 0 && cells > nbytes / stride)) {
        return 0;
    }
    const uint64_t end = off + reps * rep_stride + cells * stride;
    return end >= off && end <= nbytes;
}

// the pieces of a KV section (pm_kv_write_section's spec words): a K row tensor per layer,
// and its V as one row tensor or, transposed, one piece per channel
static int64_t pm_kv_n_pieces(const int64_t * spec) {
    int64_t n = spec[0];
    for (int64_t il = 0; il < spec[0]; ++il) {
        const int64_t * l = spec + 7 + 3 * il;
        n += l[1] == 0 ? 0 : (spec[1] ? l[2] : 1);
    }
    return n;
}

// Whether any of the PM_ID_BLOCK cells from c has an owner outside [0, n_seq_max) (shared,
// -2, or a sequence past n_seq_max; n_seq_max >= 1): without one, each of their records
// lists one id, its owner. An owner q is outside exactly when q or n_seq_max - 1 - q has
// its sign bit set: one OR a word, four words a step with SSE2 (every x86-64). GCC left
// the two compares it replaced as a scalar min / max chain once inlined into the forked
// whole writer's loops (38% of that write).
#define PM_ID_BLOCK 16
static inline int pm_block_odd(const int32_t * owner, int64_t c, int32_t n_seq_max) {
#if defined(__SSE2__) || defined(_M_X64)
    const __m128i last = _mm_set1_epi32(n_seq_max - 1);
    __m128i acc = _mm_setzero_si128();
    for (int j = 0; j < PM_ID_BLOCK; j += 4) {
        const __m128i q = _mm_loadu_si128((const __m128i *) (owner + c + j));
        acc = _mm_or_si128(acc, _mm_or_si128(q, _mm_sub_epi32(last, q)));
    }
    return _mm_movemask_ps(_mm_castsi128_ps(acc)) != 0;
#else
    uint32_t odd = 0;
    const uint32_t last = (uint32_t) n_seq_max - 1u;
    for (int j = 0; j < PM_ID_BLOCK; ++j) {
        const uint32_t q = (uint32_t) owner[c + j];
        odd |= q | (last - q);
    }
    return (odd >> 31) != 0;
#endif
}

// the ids a whole-cache record of cell c lists (those below n_seq_max): its owner's, or a
// shared cell's (owner -2) from its bitset (bits: the stream's, n_words a cell)
static inline int64_t pm_record_n_ids(const int32_t * owner, int64_t c, const uint64_t * bits, int64_t n_words,
                                      int32_t n_seq_max) {
    const int32_t q = owner[c];
    if (q != -2) {
        return q >= 0 && q < n_seq_max;
    }
    int64_t k = 0;  // the bits of ids below n_seq_max
    for (int64_t w = 0; w < n_words && 64 * w < n_seq_max; w++) {
        const int64_t below = n_seq_max - 64 * w;  // ids of word w below n_seq_max: bits [0, below)
        const uint64_t mask = below >= 64 ? ~(uint64_t) 0 : ((uint64_t) 1 << below) - 1;
        k += pm_bits_set(bits[c * n_words + w] & mask);
    }
    return k;
}

// The ids of a cell's bitset (n_words words) below n_seq_max, ascending, stored at out
// (any alignment); their count
static inline int32_t pm_set_ids(const uint64_t * b, int64_t n_words, int32_t n_seq_max, int32_t * out) {
    int32_t k = 0;
    for (int64_t x = 0; x < n_words; x++) {
        for (uint64_t r = b[x]; r != 0; r &= r - 1) {
            const int64_t q = 64 * x + pm_ctz64(r);
            if (q < n_seq_max) {
                pm_st32(out + k++, (int32_t) q);
            }
        }
    }
    return k;
}

// Whether the PM_ID_BLOCK cells from c are all shared (owner -2) with the bitset of cell
// c (one-word bitsets): a fork's cells, whose records list the same ids. With SSE2, four
// owners and two bitsets a step (64-bit equality as both 32-bit halves equal: SSE2 has no
// 64-bit compare); GCC left the scalar loop unvectorised in the writer's loops
static inline int pm_block_one_set(const int32_t * owner, const uint64_t * bits, int64_t c) {
#if defined(__SSE2__) || defined(_M_X64)
    const __m128i shared = _mm_set1_epi32(-2);
    const __m128i first = _mm_set1_epi64x((long long) bits[c]);
    __m128i same = _mm_set1_epi32(-1);
    for (int j = 0; j < PM_ID_BLOCK; j += 4) {
        const __m128i o = _mm_loadu_si128((const __m128i *) (const void *) (owner + c + j));
        const __m128i b0 = _mm_loadu_si128((const __m128i *) (const void *) (bits + c + j));
        const __m128i b1 = _mm_loadu_si128((const __m128i *) (const void *) (bits + c + j + 2));
        same = _mm_and_si128(same, _mm_cmpeq_epi32(o, shared));
        same = _mm_and_si128(same, _mm_and_si128(_mm_cmpeq_epi32(b0, first), _mm_cmpeq_epi32(b1, first)));
    }
    return _mm_movemask_epi8(same) == 0xFFFF;
#else
    int32_t other = 0;
    for (int j = 0; j < PM_ID_BLOCK; ++j) {
        other |= (owner[c + j] != -2) | (bits[c + j] != bits[c]);
    }
    return other == 0;
#endif
}

// The ids the whole records of the used cells in [c0, c1) list (pos >= 0; pos NULL: every
// cell is a used one): blocks of sixteen shared by one set (one-word bitsets) at once,
// else each cell's (pm_record_n_ids)
static int64_t pm_block_ids(const int32_t * pos, const int32_t * owner, int64_t c0, int64_t c1,
                            const uint64_t * bits, int64_t n_words, int32_t n_seq_max) {
    int64_t k = 0, c = c0;
    for (; n_words == 1 && c + PM_ID_BLOCK <= c1; c += PM_ID_BLOCK) {
        if (!pm_block_one_set(owner, bits, c)) {  // (shared cells are used ones)
            break;
        }
        k += PM_ID_BLOCK * pm_record_n_ids(owner, c, bits, n_words, n_seq_max);
    }
    for (; c < c1; ++c) {
        k += pos == NULL || pos[c] >= 0 ? pm_record_n_ids(owner, c, bits, n_words, n_seq_max) : 0;
    }
    return k;
}

pm_status pm_kv_record_ids(const int32_t * owner, int64_t size, const uint64_t * bits, int64_t n_words,
                           int32_t n_seq_max, const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs,
                           int64_t * ids) {
    if (owner == NULL || bits == NULL || ids == NULL || n_words < 1 || n_words > 4 || n_runs < 0 ||
        (n_runs > 0 && (run_starts == NULL || run_ends == NULL)) ||
        pm_runs_ascending(run_starts, run_ends, n_runs, size) < 0) {
        return PM_ERR_ARG;
    }
    int64_t k = 0;
    for (int64_t i = 0; i < n_runs; ++i) {
        int64_t c = run_starts[i];
        const int64_t e = run_ends[i];
        for (; c + PM_ID_BLOCK <= e; c += PM_ID_BLOCK) {  // (a block of one-id cells: one each)
            k += pm_block_odd(owner, c, n_seq_max)
                     ? pm_block_ids(NULL, owner, c, c + PM_ID_BLOCK, bits, n_words, n_seq_max)
                     : PM_ID_BLOCK;
        }
        k += pm_block_ids(NULL, owner, c, e, bits, n_words, n_seq_max);
    }
    *ids = k;
    return PM_OK;
}

// pm_kv_meta_words of a whole stream (seq_id -1) whose records may list several ids or
// none (see pm_record_n_ids): pos, n_seq_id, ext, then the ids ascending, as
// llama.cpp's state_write_meta writes them; `words` of them in all (the caller sized out)
static void pm_kv_meta_words_var(const int32_t * pos, const int32_t * owner, const int32_t * ext, int64_t n_ext,
                                 const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs,
                                 const uint64_t * bits, int64_t n_words, int32_t n_seq_max, int32_t * out) {
    int32_t * w = out;
    for (int64_t i = 0; i < n_runs; ++i) {
        for (int64_t c = run_starts[i]; c < run_ends[i]; ++c) {
            if (n_ext == 0 && c % PM_ID_BLOCK == 0 && c + PM_ID_BLOCK <= run_ends[i] &&
                !pm_block_odd(owner, c, n_seq_max)) {
                // a block of one-id cells: fixed records [pos, 1, owner]
                pm_meta_owner_run(pos, owner, c, c + PM_ID_BLOCK, w);
                w += 3 * PM_ID_BLOCK;
                c += PM_ID_BLOCK - 1;
                continue;
            }
            if (n_ext == 0 && n_words == 1 && c % PM_ID_BLOCK == 0 && c + PM_ID_BLOCK <= run_ends[i] &&
                pm_block_one_set(owner, bits, c)) {
                // a block of cells shared by one set of sequences: the first record's ids
                // found from its bits, the others' copied from it
                const int32_t * first = w;
                pm_st32(w, pos[c]);
                const int32_t k = pm_set_ids(bits + c, 1, n_seq_max, w + 2);
                pm_st32(w + 1, k);
                w += 2 + k;
                if (k == 2) {  // (a sequence and its fork: two stores, not a memcpy call)
                    int32_t ab[2];
                    memcpy(ab, first + 2, sizeof ab);
                    for (int64_t j = c + 1; j < c + PM_ID_BLOCK; ++j, w += 4) {
                        pm_st32(w, pos[j]);
                        pm_st32(w + 1, 2);
                        pm_st32(w + 2, ab[0]);
                        pm_st32(w + 3, ab[1]);
                    }
                }
                for (int64_t j = c + 1; k != 2 && j < c + PM_ID_BLOCK; ++j, w += 2 + k) {
                    pm_st32(w, pos[j]);
                    pm_st32(w + 1, k);
                    memcpy(w + 2, first + 2, (size_t) k * sizeof(int32_t));
                }
                c += PM_ID_BLOCK - 1;
                continue;
            }
            const int64_t k = pm_record_n_ids(owner, c, bits, n_words, n_seq_max);
            pm_st32(w, pos[c]);
            pm_st32(w + 1, (int32_t) k);
            w += 2;
            for (int64_t e = 0; e < n_ext; ++e) {
                pm_st32(w++, ext[3 * c + e]);
            }
            if (owner[c] != -2) {
                if (k) {
                    pm_st32(w++, owner[c]);
                }
                continue;
            }
            w += pm_set_ids(bits + c * n_words, n_words, n_seq_max, w);
        }
    }
}

// pm_kv_write_section with, for bits, the ids the records list when the caller counted
// them already (its selection: pm_kv_select_in's ids); known_ids < 0: counted here
static pm_status pm_kv_write_section_in(const int32_t * pos, const int32_t * owner, const int32_t * ext,
                                        int64_t n_ext, int64_t size, int32_t seq_id, int32_t with_id,
                                        const int64_t * spec, struct ggml_tensor * const * tensors, int64_t n,
                                        int64_t n_runs, const int64_t * run_starts, const int64_t * run_ends,
                                        const uint64_t * bits, int64_t n_words, int32_t n_seq_max, int64_t known_ids,
                                        void * out, int64_t cap, int64_t * written);

pm_status pm_kv_write_section(const int32_t * pos, const int32_t * owner, const int32_t * ext, int64_t n_ext,
                              int64_t size, int32_t seq_id, int32_t with_id, const int64_t * spec,
                              struct ggml_tensor * const * tensors, int64_t n, int64_t n_runs,
                              const int64_t * run_starts, const int64_t * run_ends, const uint64_t * bits,
                              int64_t n_words, int32_t n_seq_max, void * out, int64_t cap, int64_t * written) {
    return pm_kv_write_section_in(pos, owner, ext, n_ext, size, seq_id, with_id, spec, tensors, n, n_runs, run_starts,
                                  run_ends, bits, n_words, n_seq_max, -1, out, cap, written);
}

static pm_status pm_kv_write_section_in(const int32_t * pos, const int32_t * owner, const int32_t * ext,
                                        int64_t n_ext, int64_t size, int32_t seq_id, int32_t with_id,
                                        const int64_t * spec, struct ggml_tensor * const * tensors, int64_t n,
                                        int64_t n_runs, const int64_t * run_starts, const int64_t * run_ends,
                                        const uint64_t * bits, int64_t n_words, int32_t n_seq_max, int64_t known_ids,
                                        void * out, int64_t cap, int64_t * written) {
    if (pos == NULL || owner == NULL || spec == NULL || tensors == NULL || out == NULL || written == NULL ||
        (n_runs > 0 && (run_starts == NULL || run_ends == NULL)) || n < 0 || n_runs < 0 || n_runs > n ||
        (n > 0) != (n_runs > 0) || size < 0 || cap < 0 || (n_ext != 0 && n_ext != 3) ||
        (n_ext != 0 && ext == NULL) || spec[0] < 0 || spec[4] < size || spec[5] <= 0 || spec[6] < 0 ||
        (bits != NULL && (seq_id >= 0 || !with_id || n_words < 1 || n_words > 4))) {
        return PM_ERR_ARG;
    }
    const int64_t rec = 2 + n_ext + (with_id ? 1 : 0);
    // with the bitsets a record lists its cell's ids (none, one or several): the words
    // past one id each
    int64_t extra = 0;
    if (bits != NULL && n > 0) {
        if (pm_runs_ascending(run_starts, run_ends, n_runs, size) != n) {
            return PM_ERR_ARG;
        }
        int64_t ids = known_ids;
        if (ids < 0) {
            pm_kv_record_ids(owner, size, bits, n_words, n_seq_max, run_starts, run_ends, n_runs, &ids);
        }
        extra = ids - n;
    }
    const int64_t bytes = pm_kv_section_bytes(spec, n, rec);
    if (bytes < 0) {
        return PM_ERR_ARG;
    }
    const int64_t total = bytes + 4 * extra;
    *written = total;
    if (total > cap) {
        return PM_ERR_RANGE;
    }
    char * w = (char *) out;
    if (n == 0) {
        pm_put_u32(w, 0);
        return PM_OK;
    }
    if (pm_runs_ascending(run_starts, run_ends, n_runs, size) != n) {
        return PM_ERR_ARG;
    }
    const int64_t n_layer = spec[0], v_trans = spec[1], kv_size = spec[4], el = spec[5], strm = spec[6];
    const uint64_t last = (uint64_t) run_ends[n_runs - 1];  // cells below it (runs ascend)
    for (int64_t il = 0; il < n_layer; ++il) {
        const int64_t * l = spec + 7 + 3 * il;
        const uint64_t k_row = (uint64_t) l[0];
        const struct ggml_tensor * k = tensors[il];
        if (k == NULL || k->buffer == NULL || !ggml_backend_buffer_is_host(k->buffer) || k->nb[1] != k_row) {
            return PM_ERR_ARG;
        }
        if (!pm_section_inside(k, (uint64_t) (strm * kv_size) * k_row, 0, 0, last, k_row)) {
            return PM_ERR_RANGE;
        }
        const struct ggml_tensor * v = tensors[n_layer + il];
        if (l[1] == 0) {
            continue;
        }
        if (v == NULL || v->buffer == NULL || !ggml_backend_buffer_is_host(v->buffer) ||
            (!v_trans && v->nb[1] != (size_t) l[1])) {
            return PM_ERR_ARG;
        }
        const int ok = v_trans ? pm_section_inside(v, (uint64_t) strm * v->nb[2], (uint64_t) l[2] - (l[2] > 0),
                                                   (uint64_t) (kv_size * el), last, (uint64_t) el)
                               : pm_section_inside(v, (uint64_t) (strm * kv_size * l[1]), 0, 0, last,
                                                   (uint64_t) l[1]);
        if (!ok) {
            return PM_ERR_RANGE;
        }
    }
    // every check done: write
    w = pm_put_u32(w, (uint32_t) n);
    if (bits != NULL) {
        pm_kv_meta_words_var(pos, owner, ext, n_ext, run_starts, run_ends, n_runs, bits, n_words, n_seq_max,
                             (int32_t *) w);
    } else {
        const pm_status st = pm_kv_meta_words(pos, owner, ext, n_ext, run_starts, run_ends, n_runs, seq_id, with_id,
                                              (int32_t *) w, n * rec);
        if (st != PM_OK) {
            return st;
        }
    }
    w += 4 * (rec * n + extra);
    w = pm_put_u32(w, (uint32_t) (v_trans ? 1 : 0));
    w = pm_put_u32(w, (uint32_t) n_layer);
    // the headers now, each piece's place after its header; the bytes by pm_batch_run
    pm_batch batch = pm_batch_new(pm_kv_n_pieces(spec), n, run_starts, run_ends, n_runs);
    for (int64_t il = 0; il < n_layer; ++il) {
        const int64_t k_row = spec[7 + 3 * il];
        w = pm_put_u32(w, (uint32_t) spec[2]);
        w = pm_put_u64(w, (uint64_t) k_row);
        pm_batch_add(&batch, (pm_piece) { w, (const char *) tensors[il]->data + strm * kv_size * k_row, k_row, k_row, 0, 1 });
        w += n * k_row;
    }
    for (int64_t il = 0; il < n_layer; ++il) {
        const int64_t * l = spec + 7 + 3 * il;
        if (l[1] == 0) {
            continue;
        }
        const struct ggml_tensor * v = tensors[n_layer + il];
        w = pm_put_u32(w, (uint32_t) spec[3]);
        if (!v_trans) {
            w = pm_put_u64(w, (uint64_t) l[1]);
            pm_batch_add(&batch, (pm_piece) { w, (const char *) v->data + strm * kv_size * l[1], l[1], l[1], 0, 1 });
            w += n * l[1];
            continue;
        }
        w = pm_put_u32(w, (uint32_t) el);
        w = pm_put_u32(w, (uint32_t) l[2]);
        const char * base = (const char *) v->data + strm * v->nb[2];
        for (int64_t j = 0; j < l[2]; ++j) {
            pm_batch_add(&batch, (pm_piece) { w, base + j * kv_size * el, el, el, 0, 0 });
            w += n * el;
        }
    }
    pm_batch_run(&batch);
    return PM_OK;
}

// cell c, selected or not after a cell that was (*prev): opens or closes a run of selected
// cells in run_starts / run_ends (*runs closed so far); PM_ERR_RANGE when cap runs are open
static inline pm_status pm_run_edge(int64_t c, int sel, int * prev, int64_t * run_starts, int64_t * run_ends,
                                    int64_t * runs, int64_t cap) {
    if (sel == *prev) {
        return PM_OK;
    }
    if (sel) {
        if (*runs == cap) {
            return PM_ERR_RANGE;
        }
        run_starts[*runs] = c;
    } else {
        run_ends[(*runs)++] = c;
    }
    *prev = sel;
    return PM_OK;
}

// The run edges of the 32 cells from c0 whose selected ones are the set bits of m, after
// a cell that was selected or not (*prev): pm_run_edge at each cell that differs from the
// one before it, found by its bit (cell j differs where bit j of m ^ (m << 1 | prev) is set)
static inline pm_status pm_mask_edges(uint32_t m, int64_t c0, int * prev, int64_t * run_starts, int64_t * run_ends,
                                      int64_t * runs, int64_t cap) {
    for (uint32_t x = m ^ ((m << 1) | (uint32_t) *prev); x != 0; x &= x - 1) {
        const int64_t c = c0 + pm_ctz64(x);
        if (pm_run_edge(c, (int) ((m >> (c - c0)) & 1u), prev, run_starts, run_ends, runs, cap) != PM_OK) {
            return PM_ERR_RANGE;
        }
    }
    return PM_OK;
}

#define PM_SELECT_BLOCK 32  // (the masks' width: pm_eq_mask32)

// Whether cell c holds seq_id (>= 0): its owner, or a shared cell (owner -2) with seq_id's
// bit (`bits`: the word of seq_id's bit of cell 0, `stride` words a cell; `bit`: its mask;
// NULL: owners alone)
static inline int pm_cell_holds(const int32_t * owner, int64_t c, int32_t seq_id, const uint64_t * bits,
                                int64_t stride, uint64_t bit) {
    return owner[c] == seq_id || (bits != NULL && owner[c] == -2 && (bits[c * stride] & bit) != 0);
}

// The cells of the 32 from c0 that seq_id holds (pm_cell_holds) as a mask: its owner's,
// and with `bits` the shared cells (owner -2) whose bit names it: with one word a cell the
// block's bit mask (pm_bit_mask32), else walked by the shared cells' mask
static inline uint32_t pm_holds_mask32(const int32_t * owner, int64_t c0, int32_t seq_id, const uint64_t * bits,
                                       int64_t stride, uint64_t bit) {
    uint32_t m = pm_eq_mask32(owner + c0, seq_id);
    const uint32_t shared = bits != NULL ? pm_eq_mask32(owner + c0, -2) : 0;
    if (shared != 0 && stride == 1) {
        return m | (shared & pm_bit_mask32(bits + c0, bit));
    }
    for (uint32_t x = shared; x != 0; x &= x - 1) {
        const int j = pm_ctz64(x);
        if (bits[(c0 + j) * stride] & bit) {
            m |= (uint32_t) 1 << j;
        }
    }
    return m;
}

// The cells of n_runs runs [run_starts[r], run_ends[r]) (a selection's count)
static int64_t pm_runs_cells(const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs) {
    int64_t n = 0;
    for (int64_t r = 0; r < n_runs; ++r) {
        n += run_ends[r] - run_starts[r];
    }
    return n;
}

// pm_kv_select, and for seq_id >= 0 with `bits` (see pm_cell_holds) the cells seq_id shares
// with other sequences selected too, found in the same pass (*shared stays 0 for seq_id >=
// 0: a blob of seq_id holds such cells as any of its own). For seq_id < 0 with ids: *ids =
// the ids the selected cells' whole records list (pm_kv_record_ids' count, all_bits the
// stream's bitsets of n_words words a cell), found in the same pass over the owners
static pm_status pm_kv_select_in(const int32_t * pos, const int32_t * owner, int64_t size, int32_t seq_id,
                                 int32_t n_seq_max, const uint64_t * bits, int64_t stride, uint64_t bit,
                                 int64_t * run_starts, int64_t * run_ends, int64_t cap, int64_t * n, int64_t * n_runs,
                                 int32_t * shared, const uint64_t * all_bits, int64_t n_words, int64_t * ids);

pm_status pm_kv_select(const int32_t * pos, const int32_t * owner, int64_t size, int32_t seq_id, int32_t n_seq_max,
                       int64_t * run_starts, int64_t * run_ends, int64_t cap, int64_t * n, int64_t * n_runs,
                       int32_t * shared) {
    return pm_kv_select_in(pos, owner, size, seq_id, n_seq_max, NULL, 0, 0, run_starts, run_ends, cap, n, n_runs,
                           shared, NULL, 0, NULL);
}

static pm_status pm_kv_select_in(const int32_t * pos, const int32_t * owner, int64_t size, int32_t seq_id,
                                 int32_t n_seq_max, const uint64_t * bits, int64_t stride, uint64_t bit,
                                 int64_t * run_starts, int64_t * run_ends, int64_t cap, int64_t * n, int64_t * n_runs,
                                 int32_t * shared, const uint64_t * all_bits, int64_t n_words, int64_t * ids) {
    if (pos == NULL || owner == NULL || n == NULL || n_runs == NULL || shared == NULL || size < 0 || cap < 0 ||
        (cap > 0 && (run_starts == NULL || run_ends == NULL))) {
        return PM_ERR_ARG;
    }
    *shared = 0;
    if (seq_id < 0) {
        bits = NULL;
    } else {
        ids = NULL;
    }
    if (ids != NULL && (all_bits == NULL || n_words < 1 || n_words > 4)) {
        return PM_ERR_ARG;
    }
    int64_t runs = 0, id_count = 0;  // (the cells are counted from the runs at the end)
    int prev = 0;  // whether the cell before is selected
    const int32_t * sel_of = seq_id < 0 ? pos : owner;  // the word that selects a cell
    // (seq_id < 0) a used cell whose owner is outside [0, n_seq_max) sets the sign bit:
    // ~pos has it for pos >= 0, owner | (n_seq_max - 1 - owner) for an owner outside
    uint32_t odd_bits = 0;
    const uint32_t last = (uint32_t) n_seq_max - 1u;
    for (int64_t c0 = 0; c0 < size; c0 += PM_SELECT_BLOCK) {
        const int64_t c1 = c0 + PM_SELECT_BLOCK < size ? c0 + PM_SELECT_BLOCK : size;
        if (c1 - c0 == PM_SELECT_BLOCK) {
            // the block's cells as one mask (its count and edges by bit tricks); both lines of
            // the block 2 KiB ahead are asked for now (a cold stream's scan is latency-bound)
            PM_PREFETCH(sel_of + c0 + 512);
            PM_PREFETCH(sel_of + c0 + 528);
            uint32_t m;
            if (seq_id < 0) {
                m = ~pm_neg_mask32(pos + c0);
                uint32_t block_odd = 0;  // (a loop the compiler vectorises)
                for (int j = 0; j < PM_SELECT_BLOCK; ++j) {
                    const uint32_t q = (uint32_t) owner[c0 + j];
                    block_odd |= ~(uint32_t) pos[c0 + j] & (q | (last - q));
                }
                odd_bits |= block_odd;
                if (ids != NULL) {  // one id a cell, unless a cell is odd (its bits count)
                    id_count += (block_odd >> 31) ? pm_block_ids(pos, owner, c0, c1, all_bits, n_words, n_seq_max)
                                                  : pm_bits_set(m);
                }
            } else {
                m = pm_holds_mask32(owner, c0, seq_id, bits, stride, bit);
            }
            // a block of cells all like the one before it (runs are long) holds no run edge
            if (m != (prev ? UINT32_MAX : 0u) &&
                pm_mask_edges(m, c0, &prev, run_starts, run_ends, &runs, cap) != PM_OK) {
                return PM_ERR_RANGE;
            }
            continue;
        }
        // the last, partial block: cell by cell
        for (int64_t c = c0; seq_id < 0 && c < c1; ++c) {
            const uint32_t q = (uint32_t) owner[c];
            odd_bits |= ~(uint32_t) pos[c] & (q | (last - q));
        }
        if (ids != NULL) {
            id_count += pm_block_ids(pos, owner, c0, c1, all_bits, n_words, n_seq_max);
        }
        for (int64_t c = c0; c < c1; ++c) {
            const int sel = seq_id < 0 ? pos[c] >= 0 : pm_cell_holds(owner, c, seq_id, bits, stride, bit);
            if (pm_run_edge(c, sel, &prev, run_starts, run_ends, &runs, cap) != PM_OK) {
                return PM_ERR_RANGE;
            }
        }
    }
    if (prev) {
        run_ends[runs++] = size;
    }
    *n = pm_runs_cells(run_starts, run_ends, runs);
    *n_runs = runs;
    *shared |= seq_id < 0 && (odd_bits >> 31) != 0;
    if (ids != NULL) {
        *ids = id_count;
    }
    return PM_OK;
}

static inline uint32_t pm_get_u32(const char * p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t pm_get_u64(const char * p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

// walk a stream part's data section (v_trans, n_layer, layer headers and bytes) of n cells
// at d (avail bytes); with copy 0 check it against spec and return its bytes (-1: it does
// not match), with copy 1 store every layer's bytes into the runs' cells
static int64_t pm_kv_data_walk(const char * d, int64_t avail, const int64_t * spec,
                               struct ggml_tensor * const * tensors, int64_t n, const int64_t * run_starts,
                               const int64_t * run_ends, int64_t n_runs, int copy) {
    const int64_t n_layer = spec[0], v_trans = spec[1], kv_size = spec[4], el = spec[5], strm = spec[6];
    const char * p = d;
    const char * end = d + avail;
    if (end - p < 8 || pm_get_u32(p) != (uint32_t) v_trans || pm_get_u32(p + 4) != (uint32_t) n_layer) {
        return -1;
    }
    p += 8;
    // with copy: one piece per tensor and repetition, moved at the end (the check pass ran
    // before, on the same bytes: this one cannot fail)
    pm_batch batch = pm_batch_new(copy ? pm_kv_n_pieces(spec) : 0, n, run_starts, run_ends, n_runs);
    for (int pass = 0; pass < 2; ++pass) {  // K layers, then V layers
        for (int64_t il = 0; il < n_layer; ++il) {
            const int64_t * l = spec + 7 + 3 * il;
            if (pass == 1 && l[1] == 0) {
                continue;
            }
            const struct ggml_tensor * t = tensors[pass * n_layer + il];
            const int trans = pass == 1 && v_trans;
            const int64_t row = pass == 0 ? l[0] : (trans ? el : l[1]);
            const int64_t reps = trans ? l[2] : 1;
            if (end - p < 12 || pm_get_u32(p) != (uint32_t) spec[2 + pass] ||
                (trans ? (pm_get_u32(p + 4) != (uint32_t) el || pm_get_u32(p + 8) != (uint32_t) l[2])
                       : pm_get_u64(p + 4) != (uint64_t) row)) {
                free(batch.pieces);
                return -1;
            }
            p += 12;
            const int64_t bytes = reps * n * row;
            if (end - p < bytes) {
                free(batch.pieces);
                return -1;
            }
            if (copy) {
                char * base = (char *) t->data + (trans ? strm * (int64_t) t->nb[2] : strm * kv_size * row);
                for (int64_t r = 0; r < reps; ++r) {
                    pm_batch_add(&batch, (pm_piece) { base + r * kv_size * el, p + r * n * row, row, row, 1, !trans });
                }
            } else {
                const uint64_t last = (uint64_t) run_ends[n_runs - 1];
                const int ok = trans ? pm_section_inside(t, (uint64_t) strm * t->nb[2], (uint64_t) reps - (reps > 0),
                                                         (uint64_t) (kv_size * el), last, (uint64_t) el)
                                     : pm_section_inside(t, (uint64_t) (strm * kv_size * row), 0, 0, last,
                                                         (uint64_t) row) && t->nb[1] == (size_t) row;
                if (!ok) {
                    return -1;
                }
            }
            p += bytes;
        }
    }
    pm_batch_run(&batch);
    return p - d;
}

// A per-sequence restore of one stream's part of a blob, for the case that changes no cell
// (pm_kv_seq_same_cells: seq_id goes back into exactly the cells it holds): parses the part
// at `blob` (`avail` bytes: u32 cell count, the records, u32 v_trans, u32 n_layer, the layer
// headers and bytes as pm_kv_write_section writes them), checks the cells, the headers
// against `spec` and every byte range, and that `after` zero u32 words follow the part (the
// empty streams after it in a whole blob); then, with `store`, stores every layer's bytes.
// *done = 1 with *consumed (the part's bytes) and *new_head (one past the last cell: the
// head a placement leaves) when it applies; *done = 0 with nothing changed when anything
// differs (the caller's general restore then names what).
static pm_status pm_kv_read_same_then(const void * blob, int64_t avail, const int32_t * pos, const int32_t * shift,
                                      const int32_t * owner, const int32_t * ext, int64_t n_ext, int64_t size,
                                      int32_t seq_id, int64_t head, int64_t used, const int64_t * spec,
                                      struct ggml_tensor * const * tensors, int64_t * run_starts,
                                      int64_t * run_ends, int64_t after, int32_t store, int64_t known_runs,
                                      int64_t * consumed, int64_t * new_head, int32_t * done, int64_t * n_found) {
    if (blob == NULL || pos == NULL || owner == NULL || spec == NULL || tensors == NULL || run_starts == NULL ||
        run_ends == NULL || consumed == NULL || new_head == NULL || done == NULL || avail < 0 || size < 1 ||
        (n_ext != 0 && n_ext != 3) || (n_ext != 0 && ext == NULL) || spec[0] < 0 || spec[4] < size ||
        spec[5] <= 0 || spec[6] < 0 || seq_id < 0) {
        return PM_ERR_ARG;
    }
    *done = 0;
    const char * b = (const char *) blob;
    if (avail < 4) {
        return PM_OK;
    }
    const int64_t n = pm_get_u32(b);
    const int64_t rec = 3 + n_ext;
    if (n == 0 || n > size || (avail - 4) / (4 * rec) < n) {
        return PM_OK;
    }
    int64_t n_runs = 0;
    if (known_runs > 0) {
        // the runs the last check of this sequence left (the caller vouches that nothing
        // changed since): their cells must add up to the blob's count, inside the stream
        if (pm_runs_ascending(run_starts, run_ends, known_runs, size) != n) {
            return PM_OK;
        }
        n_runs = known_runs;
    } else {
        int32_t same = 0;
        const pm_status st = pm_kv_seq_same_cells(pos, shift, owner, ext, size, seq_id, head, used,
                                                  (const int32_t *) (const void *) (b + 4), n, rec, n_ext, NULL,
                                                  run_starts, run_ends, &n_runs, &same);
        if (st != PM_OK || !same || n_runs < 1) {
            return PM_OK;
        }
    }
    const int64_t meta = 4 + 4 * rec * n;
    const int64_t data = pm_kv_data_walk(b + meta, avail - meta, spec, tensors, n, run_starts, run_ends, n_runs, 0);
    if (data < 0 || avail - meta - data < 4 * after) {
        return PM_OK;
    }
    for (int64_t i = 0; i < after; ++i) {
        if (pm_get_u32(b + meta + data + 4 * i) != 0) {
            return PM_OK;
        }
    }
    if (store) {
        pm_kv_data_walk(b + meta, avail - meta, spec, tensors, n, run_starts, run_ends, n_runs, 1);
    }
    *consumed = meta + data;
    *new_head = run_ends[n_runs - 1];
    n_found[0] = n;
    n_found[1] = n_runs;
    *done = 1;
    return PM_OK;
}

// the blob view's stream of seq_id, or -1 for a bad view (a null array, run scratch
// smaller than a stream's most runs) or seq id
static int32_t pm_seq_blob_stream(const pm_kv_seq_blob * b, int32_t seq_id) {
    if (b == NULL || b->seq_to_stream == NULL || seq_id < 0 || seq_id >= b->n_seq || b->n_stream < 1 ||
        b->pos == NULL || b->owner == NULL || b->spec == NULL || b->run_starts == NULL || b->run_ends == NULL ||
        b->n_multi == NULL || b->used == NULL || b->heads == NULL || b->has_shift == NULL ||
        b->tensors == NULL || (b->n_ext != 0 && b->ext == NULL) || b->runs_cap < b->size / 2 + 1) {
        return -1;
    }
    const int32_t s = b->seq_to_stream[seq_id];
    if (s < 0 || s >= b->n_stream || (b->has_shift[s] && (b->shift == NULL || b->shift[s] == NULL))) {
        return -1;  // (the shifts are read only for a stream that has some)
    }
    return s;
}

// pm_kv_select for one sequence whose cells must also have a position in [p_lo, p_hi] (a
// sliding window): blocks of 32 as the held cells' mask (pm_holds_mask32: with bits,
// shared cells as pm_kv_select_in) and the range's
static pm_status pm_kv_select_window(const int32_t * pos, const int32_t * owner, int64_t size, int32_t seq_id,
                                     int64_t p_lo, int64_t p_hi, const uint64_t * bits, int64_t stride, uint64_t bit,
                                     int64_t * run_starts, int64_t * run_ends, int64_t cap, int64_t * n,
                                     int64_t * n_runs) {
    int64_t runs = 0;
    int prev = 0;
    // [p_lo, p_hi] within int32 as an unsigned offset from its start (pm_range_mask32);
    // a span of every int32 (2^32) only cell by cell
    const int64_t lo64 = p_lo < INT32_MIN ? INT32_MIN : p_lo, hi64 = p_hi > INT32_MAX ? INT32_MAX : p_hi;
    const int64_t span = hi64 >= lo64 ? hi64 - lo64 + 1 : 0;
    const uint32_t lo = (uint32_t) lo64, width = (uint32_t) span;
    int64_t c = 0;
    for (; span < ((int64_t) 1 << 32) && c + 32 <= size; c += 32) {  // blocks as masks
        const uint32_t m = pm_holds_mask32(owner, c, seq_id, bits, stride, bit) & pm_range_mask32(pos + c, lo, width);
        if (m != (prev ? UINT32_MAX : 0u) &&
            pm_mask_edges(m, c, &prev, run_starts, run_ends, &runs, cap) != PM_OK) {
            return PM_ERR_RANGE;
        }
    }
    for (; c < size; ++c) {  // the last, partial block
        const int sel = pm_cell_holds(owner, c, seq_id, bits, stride, bit) && pos[c] >= p_lo && pos[c] <= p_hi;
        if (pm_run_edge(c, sel, &prev, run_starts, run_ends, &runs, cap) != PM_OK) {
            return PM_ERR_RANGE;
        }
    }
    if (prev) {
        run_ends[runs++] = size;
    }
    *n = pm_runs_cells(run_starts, run_ends, runs);
    *n_runs = runs;
    return PM_OK;
}

// Whether seq_id may hold a cell of stream s together with another sequence (the
// same-cells read leaves that to the placement): without the cells' bitsets, any shared
// cell in s
static int pm_seq_blob_shared(const pm_kv_seq_blob * b, int32_t s, int32_t seq_id) {
    return b->n_multi[s] != 0 && (b->cells == NULL || pm_step_seq_shared(b->cells, s, seq_id));
}

// The zero counts before the one stream part of a per-sequence blob at d (u32 n_stream,
// then a u32 count per stream): the part goes to stream s whichever stream wrote it (as the
// reference reads a sequence's blob). -1 where the one-call paths do not apply: shared
// cells in s without the cells' bitsets to tell them, the view is too short for the
// counts, n_stream differs, or no stream has cells (the general restore's business).
static int64_t pm_seq_blob_before(const pm_kv_seq_blob * b, int32_t s, const char * d, int64_t avail) {
    const int64_t n_stream = b->n_stream;
    if ((b->n_multi[s] != 0 && b->cells == NULL) || avail < 4 + 4 * n_stream ||
        pm_get_u32(d) != (uint32_t) n_stream) {
        return -1;
    }
    int64_t before = 0;
    while (before < n_stream && pm_get_u32(d + 4 + 4 * before) == 0) {
        ++before;
    }
    return before == n_stream ? -1 : before;
}

pm_status pm_kv_write_seq_blob(const pm_kv_seq_blob * b, int32_t seq_id, int32_t reuse, int64_t p_lo, int64_t p_hi,
                               void * out, int64_t cap, int64_t * written, int32_t * declined) {
    const int32_t s = pm_seq_blob_stream(b, seq_id);
    if (s < 0 || written == NULL || declined == NULL || cap < 0 || (out == NULL && cap != 0) ||
        b->selected == NULL) {
        return PM_ERR_ARG;
    }
    *written = 0;
    // the cells seq_id shares with others are selected by their bits (seq_id's word,
    // n_words a cell) in the same pass; without the bitsets any shared cell declines
    *declined = b->n_multi[s] != 0 && b->cells == NULL;
    if (*declined) {
        return PM_OK;
    }
    const struct pm_step_cells * c = b->cells;
    const int check = b->n_multi[s] != 0 && seq_id < 64 * c->n_words;
    const uint64_t * bits = check ? c->seq + s * c->size * c->n_words + (seq_id >> 6) : NULL;
    const uint64_t bit = (uint64_t) 1 << (seq_id & 63);
    const int64_t stride = check ? c->n_words : 0;
    int64_t * sel = b->selected + 2 * s;  // n, n_runs
    if (!reuse) {
        int32_t shared = 0;  // (set by a whole selection only; a sequence's leaves it 0)
        const pm_status st =
            p_lo <= INT32_MIN && p_hi >= INT32_MAX
                ? pm_kv_select_in(b->pos[s], b->owner[s], b->size, seq_id, 0, bits, stride, bit, b->run_starts[s],
                                  b->run_ends[s], b->runs_cap, sel, sel + 1, &shared, NULL, 0, NULL)
                : pm_kv_select_window(b->pos[s], b->owner[s], b->size, seq_id, p_lo, p_hi, bits, stride, bit,
                                      b->run_starts[s], b->run_ends[s], b->runs_cap, sel, sel + 1);
        if (st != PM_OK) {
            return st;
        }
    } else if (sel[1] < 0 || sel[1] > b->runs_cap) {
        return PM_ERR_ARG;
    }
    // u32 n_stream, a zero count per stream before s, s's part, a zero count per stream after
    const int64_t head = 4 + 4 * (int64_t) s, tail = 4 * (int64_t) (b->n_stream - 1 - s);
    const int64_t room = cap - head - tail;
    static char size_only[1];  // a destination no byte is written to (room 0)
    char * w = (char *) out;
    int64_t part = 0;
    const pm_status st = pm_kv_write_section(
        b->pos[s], b->owner[s], b->n_ext ? b->ext[s] : NULL, b->n_ext, b->size, seq_id, seq_id < b->n_seq_max,
        b->spec[s], b->tensors, sel[0], sel[1], b->run_starts[s], b->run_ends[s], NULL, 0, 0,
        room > 0 ? w + head : size_only, room > 0 ? room : 0, &part);
    *written = head + part + tail;
    if (st != PM_OK) {
        return st;  // PM_ERR_RANGE with *written the size when out is too small
    }
    pm_put_u32(w, (uint32_t) b->n_stream);
    memset(w + 4, 0, (size_t) (head - 4));
    memset(w + head + part, 0, (size_t) tail);
    return PM_OK;
}

// Stream s's bitsets where its whole records may list other than one id (its last whole
// selection found a cell shared by several sequences, or one of a sequence at or past
// n_seq_max: b->selected[2 n_stream + s]), else NULL: a stream whose every cell has one
// id below n_seq_max takes the fixed records' faster writer
static const uint64_t * pm_whole_bits(const pm_kv_seq_blob * b, int64_t s) {
    const struct pm_step_cells * c = b->cells;
    return c != NULL && b->selected[2 * b->n_stream + s] != 0 ? c->seq + s * c->size * c->n_words : NULL;
}

pm_status pm_kv_write_whole_blob(const pm_kv_seq_blob * b, int32_t reuse, void * out, int64_t cap,
                                 int64_t * written, int32_t * declined) {
    if (pm_seq_blob_stream(b, 0) < 0 || written == NULL || declined == NULL || cap < 0 ||
        (out == NULL && cap != 0) || b->selected == NULL) {
        return PM_ERR_ARG;
    }
    *written = 0;
    *declined = 0;
    const int64_t n_stream = b->n_stream, rec = 3 + b->n_ext;  // (every record has its id)
    const struct pm_step_cells * c = b->cells;
    int64_t total = 4;
    for (int64_t s = 0; s < n_stream; ++s) {
        int64_t * sel = b->selected + 2 * s;  // n, n_runs
        int64_t * odd = b->selected + 2 * n_stream + s;  // records not of one id (pm_whole_bits)
        int64_t * n_ids = b->selected + 3 * n_stream + s;  // the ids the records list
        if (!reuse) {
            int32_t shared = 0;
            // with shared cells (and the bitsets), the records' ids counted in the same pass
            // over the owners; else each record lists one id unless a cell's owner is past
            // n_seq_max (rare: counted after, if the pass finds one)
            const int count = c != NULL && b->n_multi[s] != 0;
            *n_ids = -1;
            const pm_status st = pm_kv_select_in(b->pos[s], b->owner[s], b->size, -1, b->n_seq_max, NULL, 0, 0,
                                                 b->run_starts[s], b->run_ends[s], b->runs_cap, sel, sel + 1, &shared,
                                                 count ? c->seq + s * c->size * c->n_words : NULL,
                                                 count ? c->n_words : 0, count ? n_ids : NULL);
            if (st != PM_OK) {
                return st;
            }
            if (shared && c != NULL && !count) {
                const pm_status st_ids =
                    pm_kv_record_ids(b->owner[s], b->size, c->seq + s * c->size * c->n_words, c->n_words,
                                     b->n_seq_max, b->run_starts[s], b->run_ends[s], sel[1], n_ids);
                if (st_ids != PM_OK) {
                    return st_ids;
                }
            }
            *odd = shared != 0;
            if (shared && c == NULL) {  // (records of several ids, or none: the bitsets tell)
                sel[0] = sel[1] = *odd = -1;
                *declined = 1;
                return PM_OK;
            }
        } else if (sel[0] < 0 || sel[1] < 0 || sel[1] > b->runs_cap || *odd < 0 || *odd > 1 ||
                   (*odd && *n_ids < 0)) {
            return PM_ERR_ARG;
        }
        const int64_t part = pm_kv_section_bytes(b->spec[s], sel[0], rec);
        if (part < 0) {
            return PM_ERR_ARG;
        }
        // each record's ids, where one is not one id (the selection counted them)
        const int64_t ids = pm_whole_bits(b, s) != NULL ? *n_ids : sel[0];
        total += part + 4 * (ids - sel[0]);
    }
    *written = total;
    if (total > cap) {
        return PM_ERR_RANGE;
    }
    char * w = (char *) out;
    w = pm_put_u32(w, (uint32_t) n_stream);
    for (int64_t s = 0; s < n_stream; ++s) {
        const int64_t * sel = b->selected + 2 * s;
        int64_t part = 0;
        const uint64_t * bits = pm_whole_bits(b, s);
        const pm_status st = pm_kv_write_section_in(
            b->pos[s], b->owner[s], b->n_ext ? b->ext[s] : NULL, b->n_ext, b->size, -1, 1, b->spec[s], b->tensors,
            sel[0], sel[1], b->run_starts[s], b->run_ends[s], bits, c != NULL ? c->n_words : 0, b->n_seq_max,
            bits != NULL ? b->selected[3 * n_stream + s] : -1, w, cap - (w - (char *) out), &part);
        if (st != PM_OK) {
            return st;
        }
        w += part;
    }
    return PM_OK;
}

pm_status pm_kv_read_seq_blob(const pm_kv_seq_blob * b, int32_t seq_id, const void * blob, int64_t avail,
                              int32_t store, int64_t * consumed, int32_t * done) {
    const int32_t s = pm_seq_blob_stream(b, seq_id);
    if (s < 0 || blob == NULL || consumed == NULL || done == NULL || avail < 0) {
        return PM_ERR_ARG;
    }
    *done = 0;
    const char * d = (const char *) blob;
    const int64_t n_stream = b->n_stream;
    if (b->selected == NULL || store < 0 || store > 2) {
        return PM_ERR_ARG;
    }
    int64_t * sel = b->selected + 2 * s;  // what a check finds: cells, runs (-1: nothing)
    const int64_t known = store == 2 ? sel[1] : 0;
    sel[0] = sel[1] = -1;
    if ((store == 2 && (known < 1 || known > b->runs_cap)) || pm_seq_blob_shared(b, s, seq_id)) {
        return PM_OK;  // (a sequence in a shared cell is never put back into its cells alone)
    }
    const int64_t before = pm_seq_blob_before(b, s, d, avail);
    if (before < 0) {
        return PM_OK;
    }
    const int64_t at = 4 + 4 * before;
    int64_t part = 0, new_head = 0;
    const pm_status st = pm_kv_read_same_then(
        d + at, avail - at, b->pos[s], b->has_shift[s] ? b->shift[s] : NULL, b->owner[s],
        b->n_ext ? b->ext[s] : NULL, b->n_ext, b->size, seq_id, b->heads[s], b->used[s], b->spec[s], b->tensors,
        b->run_starts[s], b->run_ends[s], n_stream - before - 1, store != 0, known, &part, &new_head, done, sel);
    if (st != PM_OK || !*done) {
        return st;
    }
    if (store) {
        b->heads[s] = new_head;
    }
    *consumed = at + part + 4 * (n_stream - before - 1);
    return PM_OK;
}

pm_status pm_kv_read_seq_place(const pm_kv_seq_blob * b, int32_t seq_id, const void * blob, int64_t avail,
                               int32_t * pos, int64_t pos_cap, const int64_t * run_starts,
                               const int64_t * run_ends, int64_t n_runs, int64_t * found, int32_t * done) {
    const int32_t s = pm_seq_blob_stream(b, seq_id);
    if (s < 0 || blob == NULL || found == NULL || done == NULL || avail < 0 || n_runs < 0 ||
        (n_runs > 0 && (run_starts == NULL || run_ends == NULL))) {
        return PM_ERR_ARG;
    }
    *done = 0;
    const char * d = (const char *) blob;
    const int64_t n_stream = b->n_stream, rec = 3 + b->n_ext, size = b->size;
    const int64_t before = pm_seq_blob_before(b, s, d, avail);
    if (before < 0) {
        return PM_OK;
    }
    const int64_t at = 4 + 4 * before;  // the part: u32 count, records, data section
    const int64_t n = pm_get_u32(d + at);
    if (n > size || (avail - at - 4) / (4 * rec) < n || (n_runs == 0 && pos != NULL && pos_cap < n)) {
        return PM_OK;
    }
    const int32_t * w = (const int32_t *) (const void *) (d + at + 4);
    int32_t bad = 0;
    int32_t * into = n_runs == 0 && pos != NULL ? pos : NULL;
    for (int64_t i = 0; i < n; i++) {  // (branch-free: the rare fault is the general parse's to name)
        const int32_t p = pm_ld32(w + i * rec);
        bad |= (pm_ld32(w + i * rec + 1) != 1) | (p < 0);
        if (into != NULL) {
            into[i] = p;  // (the caller's scratch: written even when declined)
        }
    }
    if (bad) {
        return PM_OK;
    }
    int64_t end_max = size;  // the check pass: every cell of the stream inside the tensors
    if (n_runs > 0) {
        int64_t cells = 0;
        if (pm_runs_measure(run_starts, run_ends, n_runs, &cells, &end_max) != PM_OK || cells != n ||
            end_max > size) {
            return PM_OK;
        }
    }
    const int64_t zero = 0;
    const int64_t meta = at + 4 + 4 * rec * n;
    const int64_t data = pm_kv_data_walk(d + meta, avail - meta, b->spec[s], b->tensors, n, &zero, &end_max, 1, 0);
    const int64_t after = n_stream - before - 1;
    if (data < 0 || avail - meta - data < 4 * after) {
        return PM_OK;
    }
    for (int64_t i = 0; i < after; ++i) {
        if (pm_get_u32(d + meta + data + 4 * i) != 0) {
            return PM_OK;
        }
    }
    if (n_runs > 0) {
        pm_kv_data_walk(d + meta, avail - meta, b->spec[s], b->tensors, n, run_starts, run_ends, n_runs, 1);
    } else {
        int64_t free_cells = size - b->used[s];
        if (free_cells < n) {  // the empty cells do not prove the fit: seq_id's own too
            const int32_t * owner = b->owner[s];
            for (int64_t c = 0; c < size; ++c) {
                free_cells += owner[c] == seq_id;
            }
        }
        found[3] = free_cells;
    }
    found[0] = n;
    found[1] = at + 4;
    found[2] = meta + data + 4 * after;
    *done = 1;
    return PM_OK;
}

pm_status pm_kv_read_seq_placed(const pm_kv_seq_blob * b, pm_step_cells * c, int32_t seq_id, int32_t held,
                                int32_t swa_type, int64_t n_swa, const void * blob, int64_t avail, int32_t * pos,
                                int64_t pos_cap, int32_t * idx, int64_t idx_cap, int64_t * consumed,
                                int32_t * done) {
    if (c == NULL || pos == NULL || idx == NULL || consumed == NULL || done == NULL) {
        return PM_ERR_ARG;
    }
    *done = 0;
    int64_t found[4] = { 0, 0, 0, 0 };
    int32_t parsed = 0;
    pm_status st = pm_kv_read_seq_place(b, seq_id, blob, avail, pos, pos_cap, NULL, NULL, 0, found, &parsed);
    if (st != PM_OK || !parsed) {
        return st;
    }
    const int32_t s = pm_seq_blob_stream(b, seq_id);  // (valid: the parse took it)
    const int64_t n = found[0];
    // without held, found[3] counts the empty cells alone (seq_id holds none)
    if (b->n_ext != 0 || n > pos_cap || n > idx_cap || c->size != b->size ||
        !pm_step_kv_place_sure(c, s, seq_id, n, found[3], swa_type, n_swa)) {
        return PM_OK;
    }
    if (held) {  // the reference's seq_rm before its placement (nothing to free: no change)
        int64_t n_freed = 0, first = -1;
        int32_t removed = 0;
        st = pm_step_kv_rm_seq(c, s, seq_id, 0, INT32_MAX, 1, c->used_max_p1[s], &n_freed, &first, &removed);
        if (st != PM_OK || !removed) {
            return st != PM_OK ? st : PM_ERR_RANGE;  // (place_sure ruled both out)
        }
        if (first >= 0 && first < b->heads[s]) {
            b->heads[s] = first;
        }
    }
    int64_t n_runs = 0;
    int32_t placed = 0;
    // (without a window only the runs are needed: no cell list)
    st = pm_step_kv_restore_seq(c, s, seq_id, pos, n, swa_type, n_swa, b->heads, swa_type != 0 ? idx : NULL,
                                b->run_starts[s], b->run_ends[s], &n_runs, &placed);
    if (st != PM_OK || !placed) {
        // (place_sure ruled a decline out; after a seq_rm it would not be "nothing changed")
        return st != PM_OK ? st : held ? PM_ERR_RANGE : PM_OK;
    }
    // the parse checked every header and range against the whole stream: the store cannot
    // fail (its walk copies alone)
    const char * d = (const char *) blob;
    const int64_t meta = found[1] + 4 * (3 + b->n_ext) * n;
    pm_kv_data_walk(d + meta, avail - meta, b->spec[s], b->tensors, n, b->run_starts[s], b->run_ends[s], n_runs, 1);
    *consumed = found[2];
    *done = 1;
    return PM_OK;
}

// The scratch of pm_kv_zero_past (allocated before anything changes: a commit must not
// fail for memory halfway through)
typedef struct pm_zero_scratch {
    struct ggml_tensor ** tensors;
    const void ** src;
    int64_t * params;
} pm_zero_scratch;

static int pm_zero_scratch_new(pm_zero_scratch * z, int64_t n_layer) {
    const size_t n = (size_t) (2 * n_layer + 1);
    z->tensors = (struct ggml_tensor **) malloc(n * sizeof *z->tensors);
    z->src = (const void **) calloc(n, sizeof *z->src);
    z->params = (int64_t *) malloc(n * 5 * sizeof *z->params);
    return z->tensors != NULL && z->src != NULL && z->params != NULL;
}

static void pm_zero_scratch_free(pm_zero_scratch * z) {
    free(z->tensors);
    free((void *) z->src);
    free(z->params);
}

// zero cells [counts[s], ends[s]) of every stream's rows, every layer (zero_range_native;
// ends NULL: kv_size); check_only: the checks alone, over all cells of every stream (every
// tensor in host memory, every byte inside it), before a commit changes anything
static pm_status pm_kv_zero_past(const pm_kv_seq_blob * b, const int64_t * counts, const int64_t * ends,
                                 const pm_zero_scratch * z, int check_only) {
    const int64_t n_layer = b->spec[0][0];
    pm_status st = PM_OK;
    for (int64_t s = 0; st == PM_OK && s < b->n_stream; ++s) {
        const int64_t * spec = b->spec[s];
        const int64_t v_trans = spec[1], kv_size = spec[4], el = spec[5];
        int64_t n = 0;
        for (int64_t k = 0; k < 2 * n_layer; ++k) {
            struct ggml_tensor * t = b->tensors[k];
            if (t == NULL) {
                continue;  // (no V: an MLA cache)
            }
            int64_t * p = z->params + 5 * n;
            if (k >= n_layer && v_trans) {  // every channel, its padding too
                p[0] = s * (int64_t) t->nb[2], p[1] = el, p[2] = el, p[3] = t->ne[0], p[4] = kv_size * el;
            } else {
                p[0] = s * kv_size * (int64_t) t->nb[1], p[1] = (int64_t) t->nb[1], p[2] = (int64_t) t->nb[1];
                p[3] = 1, p[4] = 0;
            }
            z->tensors[n++] = t;
        }
        const int64_t a = counts[s], e = ends != NULL && ends[s] < kv_size ? ends[s] : kv_size;
        if (check_only && n > 0 && kv_size > 0) {  // (every tensor, the cells' bytes stored too)
            st = pm_cells_params_check(z->tensors, z->params, n, kv_size);
        } else if (!check_only && a < e && n > 0) {
            st = pm_stateio_put_cells(z->tensors, z->src, z->params, n, &a, &e, 1);
        }
    }
    return st;
}

// pm_kv_read_whole_blob, where mode 1 may be given each stream's records span in words
// (known_spans[s]; NULL: walked again): the refill that placed them found where they end
static pm_status pm_kv_read_whole_in(const pm_kv_seq_blob * b, const void * blob, int64_t avail, int32_t mode,
                                     const int64_t * known_spans, int64_t * counts, int64_t * offsets,
                                     int32_t * same, int64_t * consumed, int32_t * done);

// pm_kv_read_whole_commit, or (placed_spans not NULL) the commit of the records
// pm_kv_place_whole_empty placed: no refill, the counters set instead, the data stored
// from the spans it found
static pm_status pm_kv_whole_commit(const pm_kv_seq_blob * b, pm_step_cells * c, const void * blob, int64_t avail,
                                    const int64_t * counts, const int64_t * offsets, const int64_t * placed_spans,
                                    int32_t same, int32_t records, int32_t * done);

pm_status pm_kv_read_whole_commit(const pm_kv_seq_blob * b, pm_step_cells * c, const void * blob, int64_t avail,
                                  const int64_t * counts, const int64_t * offsets, int32_t same, int32_t records,
                                  int32_t * done) {
    return pm_kv_whole_commit(b, c, blob, avail, counts, offsets, NULL, same, records, done);
}

pm_status pm_kv_read_whole_commit_placed(const pm_kv_seq_blob * b, pm_step_cells * c, const void * blob,
                                         int64_t avail, const int64_t * found, int32_t * done) {
    if (b == NULL || found == NULL) {
        return PM_ERR_ARG;
    }
    const int64_t n = b->n_stream;
    return pm_kv_whole_commit(b, c, blob, avail, found, found + n, found + 2 * n, 0, PM_RECORDS_PARSED, done);
}

static pm_status pm_kv_whole_commit(const pm_kv_seq_blob * b, pm_step_cells * c, const void * blob, int64_t avail,
                                    const int64_t * counts, const int64_t * offsets, const int64_t * placed_spans,
                                    int32_t same, int32_t records, int32_t * done) {
    if (pm_seq_blob_stream(b, 0) < 0 || c == NULL || blob == NULL || counts == NULL || offsets == NULL ||
        done == NULL || avail < 0 || b->n_ext != 0 || c->n_stream != b->n_stream || c->size != b->size ||
        records < PM_RECORDS_PARSED || records > PM_RECORDS_PARSED_HERE) {
        return PM_ERR_ARG;
    }
    for (int64_t s = 0; placed_spans != NULL && s < c->n_stream; ++s) {
        if (c->used_max_p1[s] != 0) {
            return PM_ERR_ARG;  // (records placed early only into empty cells)
        }
    }
    *done = 0;
    const int64_t n_stream = b->n_stream;
    const char * d = (const char *) blob;
    const int32_t ** words = (const int32_t **) malloc((size_t) n_stream * sizeof *words);
    // scratch: the parse's counts and offsets, each stream's readable words, their spans,
    // the cells past which its rows are zero already
    int64_t * scratch = (int64_t *) malloc((size_t) n_stream * 5 * sizeof *scratch);
    pm_zero_scratch zero;
    const int zero_ok = pm_zero_scratch_new(&zero, b->spec[0][0]);
    if (words == NULL || scratch == NULL || !zero_ok) {  // (before anything changes)
        free((void *) words);
        free(scratch);
        pm_zero_scratch_free(&zero);
        return PM_ERR_ALLOC;
    }
    pm_status st = PM_OK;
    for (int64_t s = 0; s < n_stream; ++s) {
        if (counts[s] < 0 || counts[s] > b->size || offsets[s] < 0 || offsets[s] > avail ||
            (avail - offsets[s]) / 12 < counts[s]) {
            st = PM_ERR_ARG;
        }
        words[s] = counts[s] > 0 ? (const int32_t *) (const void *) (d + offsets[s]) : NULL;
        scratch[2 * n_stream + s] = st == PM_OK ? (avail - offsets[s]) / 4 : 0;  // the words readable
    }
    // rows past the cells any cell held since they were last zeroed are zero: only those
    // below are zeroed (rows_hi, taken before the refill lowers used_max_p1)
    int64_t * zero_to = scratch + 4 * n_stream;
    for (int64_t s = 0; s < n_stream; ++s) {
        zero_to[s] = c->rows_hi == NULL ? b->size : c->used_max_p1[s];
        if (c->rows_hi != NULL && c->rows_hi[s] > zero_to[s]) {
            zero_to[s] = c->rows_hi[s];
        }
    }
    // the zeroing's parameters checked before anything changes: a refusal declines
    if (st == PM_OK && pm_kv_zero_past(b, counts, NULL, &zero, 1) != PM_OK) {
        free((void *) words);
        free(scratch);
        pm_zero_scratch_free(&zero);
        return PM_OK;
    }
    int32_t filled = 1;
    const int64_t * spans = NULL;  // each stream's records span, where the refill found it
    if (st == PM_OK && placed_spans != NULL) {
        for (int64_t s = 0; s < n_stream; ++s) {
            pm_step_kv_filled(c, s, counts[s]);  // (the cells are the memory's from here on)
        }
        spans = placed_spans;
    } else if (st == PM_OK && !same && records == PM_RECORDS_PARSED_HERE) {
        st = pm_step_kv_refill_trusted(c, words, counts, scratch + 2 * n_stream, 3, b->n_seq_max);
        spans = scratch + 2 * n_stream;
    } else if (st == PM_OK && !same) {
        st = pm_step_kv_refill_used(c, words, counts, scratch + 2 * n_stream, 3, b->n_seq_max, &filled,
                                    scratch + 3 * n_stream);
        spans = scratch + 3 * n_stream;
    }
    if (st == PM_OK && filled) {
        for (int64_t s = 0; s < n_stream; ++s) {
            b->heads[s] = 0;  // (has_shift is 0: the refill cleared it, or same cells had none)
        }
        int64_t consumed = 0;
        int32_t same_again = 0, stored = 0;
        st = pm_kv_read_whole_in(b, blob, avail, 1, spans, scratch, scratch + n_stream, &same_again, &consumed,
                                 &stored);
        if (st == PM_OK && !stored) {
            st = PM_ERR_RANGE;
        }
        if (st == PM_OK) {
            st = pm_kv_zero_past(b, counts, zero_to, &zero, 0);
        }
        for (int64_t s = 0; st == PM_OK && c->rows_hi != NULL && s < n_stream; ++s) {
            c->rows_hi[s] = counts[s];  // (every row past the cells is zero now)
        }
        *done = st == PM_OK;
    }
    free((void *) words);
    free(scratch);
    pm_zero_scratch_free(&zero);
    return st;
}

// records pm_kv_records_fixed checks in one branch-free pass (3 KiB of the usual ones)
#define PM_FIXED_CHUNK 256

pm_status pm_kv_records_fixed(const int32_t * words, int64_t n, int64_t rec, int32_t n_seq_max,
                              int64_t * first_bad) {
    if (words == NULL || first_bad == NULL || n < 0 || rec < 3 || n_seq_max < 1 || n_seq_max > 256) {
        return PM_ERR_ARG;
    }
    *first_bad = -1;
    // branch-free passes over chunks of records; a chunk with a fault is searched for it
    // (a forked blob's first variable record stops the scan there, not after every record)
    for (int64_t i0 = 0; i0 < n; i0 += PM_FIXED_CHUNK) {
        const int64_t m = n - i0 < PM_FIXED_CHUNK ? n - i0 : PM_FIXED_CHUNK;
        if (!pm_records_not_fixed(words + i0 * rec, m, rec, n_seq_max)) {
            continue;
        }
        for (int64_t i = i0; i < i0 + m; i++) {
            const int32_t * r = words + i * rec;
            if (pm_record_bad(pm_ld32(r), pm_ld32(r + 1), pm_ld32(r + rec - 1), n_seq_max)) {
                *first_bad = i;
                return PM_OK;
            }
        }
    }
    return PM_OK;
}

// Nonzero unless each of the 16 records at r (2 fixed words, then k ids: k 1 or 2) lists
// k ids: their count words, at a constant stride the compiler unrolls
static inline uint32_t pm_counts16(const int32_t * r, int64_t k) {
    uint32_t e = 0;
    if (k == 1) {
        for (int j = 0; j < 16; j++) {
            e |= (uint32_t) pm_ld32(r + 3 * j + 1) ^ 1u;
        }
    } else {
        for (int j = 0; j < 16; j++) {
            e |= (uint32_t) pm_ld32(r + 4 * j + 1) ^ 2u;
        }
    }
    return e;
}

// The words n variable records at words take (fixed words then n_seq_id ids each), from
// their lengths alone (records a placement already checked); -1 where one does not end
// within span. Sixteen (without ext) or eight records of one length (one or two ids) are
// passed at once
static int64_t pm_records_end(const int32_t * words, int64_t span, int64_t n, int64_t fixed) {
    int64_t o = 0, i = 0;
    while (i < n) {
        if (span - o < fixed) {
            return -1;
        }
        const int64_t k = (int64_t) (uint32_t) pm_ld32(words + o + 1);
        if (fixed == 2 && (k == 1 || k == 2) && i + 16 <= n && span - o >= 16 * (2 + k) &&
            pm_counts16(words + o, k) == 0) {
            o += 16 * (2 + k);
            i += 16;
            continue;
        }
        if ((k == 1 || k == 2) && i + 8 <= n && span - o >= 8 * (fixed + k)) {
            int32_t same = 1;
            for (int j = 1; j < 8; j++) {
                same &= pm_ld32(words + o + j * (fixed + k) + 1) == (int32_t) k;
            }
            if (same) {
                o += 8 * (fixed + k);
                i += 8;
                continue;
            }
        }
        if (span - o - fixed < k) {
            return -1;
        }
        o += fixed + k;
        i++;
    }
    return o;
}

// The words of stream s's n meta records at words (span readable), checked as mode
// (pm_kv_read_whole_blob) asks: n * rec for fixed ones; a variable span (cells shared by
// several sequences; no ext) when mode 1 finds the stream's cells shared, the records
// placed already, or a check finds them not fixed. -1 where they are neither.
static int64_t pm_whole_records_span(const pm_kv_seq_blob * b, int64_t s, const int32_t * words, int64_t n,
                                     int64_t span, int64_t rec, int32_t mode, int32_t checked_same) {
    int var = mode == 1 && b->n_multi[s] > 0;
    int64_t first = 0;  // the records before it are fixed ones
    if (mode != 1 && !checked_same && n > 0) {
        int64_t first_bad = 0;
        if (pm_kv_records_fixed(words, n, rec, b->n_seq_max, &first_bad) != PM_OK) {
            return -1;
        }
        var = first_bad >= 0;
        first = var ? first_bad : 0;
    }
    if (!var) {
        return n * rec;
    }
    if (b->n_ext != 0) {
        return -1;
    }
    if (mode == 1) {  // placed already: the records' lengths alone
        return pm_records_end(words, span, n, rec - 1);
    }
    int64_t end = -1, multi = 0;
    if (pm_kv_records_var(words + first * rec, span - first * rec, n - first, rec - 1, (int32_t) b->n_seq_max,
                          &end, &multi) != PM_OK) {
        return -1;
    }
    return end < 0 ? -1 : first * rec + end;
}

pm_status pm_kv_place_whole_empty(const pm_kv_seq_blob * b, pm_step_cells * c, const void * blob, int64_t avail,
                                  int64_t * found, int64_t * consumed, int32_t * done) {
    if (pm_seq_blob_stream(b, 0) < 0 || c == NULL || blob == NULL || found == NULL || consumed == NULL ||
        done == NULL || avail < 0 || b->n_ext != 0 || c->n_stream != b->n_stream || c->size != b->size) {
        return PM_ERR_ARG;
    }
    const int64_t n_stream = b->n_stream;
    for (int64_t s = 0; s < n_stream; ++s) {
        if (c->used_max_p1[s] != 0 || b->used[s] != 0) {
            return PM_ERR_ARG;  // (placed as checked only into empty cells)
        }
    }
    *done = 0;
    const char * d = (const char *) blob;
    if (avail < 4 || pm_get_u32(d) != (uint32_t) n_stream) {
        return PM_OK;
    }
    int64_t * counts = found;
    int64_t * offsets = found + n_stream;
    int64_t * spans = found + 2 * n_stream;
    const int64_t zero = 0;
    int64_t at = 4, s = 0;
    for (; s < n_stream; ++s) {
        counts[s] = 0;  // (what a refusal empties again: the streams placed so far)
        if (avail - at < 4) {
            break;
        }
        const int64_t n = pm_get_u32(d + at);
        at += 4;
        if (n > b->size || (avail - at) / 12 < n) {  // (a record takes three words at least)
            break;
        }
        offsets[s] = at;
        spans[s] = 0;
        if (n == 0) {
            continue;  // (no data section after a zero count)
        }
        int64_t span = 0;
        if (!pm_step_fill_empty(c, s, (const int32_t *) (const void *) (d + at), n, (avail - at) / 4, 3,
                                (int32_t) b->n_seq_max, &span)) {
            break;  // (the stream emptied itself)
        }
        counts[s] = n;
        spans[s] = span;
        const int64_t data =
            pm_kv_data_walk(d + at + 4 * span, avail - at - 4 * span, b->spec[s], b->tensors, n, &zero, &n, 1, 0);
        if (data < 0) {
            break;
        }
        at += 4 * span + data;
    }
    if (s < n_stream) {
        for (int64_t t = 0; t <= s; ++t) {
            pm_step_unfill(c, t, counts[t]);
        }
        return PM_OK;
    }
    *consumed = at;
    *done = 1;
    return PM_OK;
}

pm_status pm_kv_read_whole_blob(const pm_kv_seq_blob * b, const void * blob, int64_t avail, int32_t mode,
                                int64_t * counts, int64_t * offsets, int32_t * same, int64_t * consumed,
                                int32_t * done) {
    return pm_kv_read_whole_in(b, blob, avail, mode, NULL, counts, offsets, same, consumed, done);
}

static pm_status pm_kv_read_whole_in(const pm_kv_seq_blob * b, const void * blob, int64_t avail, int32_t mode,
                                     const int64_t * known_spans, int64_t * counts, int64_t * offsets,
                                     int32_t * same, int64_t * consumed, int32_t * done) {
    if (pm_seq_blob_stream(b, 0) < 0 || blob == NULL || counts == NULL || offsets == NULL || same == NULL ||
        consumed == NULL || done == NULL || avail < 0 || mode < 0 || mode > 2) {
        return PM_ERR_ARG;
    }
    *done = 0;
    const char * d = (const char *) blob;
    const int64_t n_stream = b->n_stream, rec = 3 + b->n_ext;
    if (avail < 4 || pm_get_u32(d) != (uint32_t) n_stream) {
        return PM_OK;
    }
    // per stream: where its data starts (its records' span after offsets[s])
    int64_t * data_at = (int64_t *) malloc((size_t) n_stream * sizeof *data_at);
    if (data_at == NULL) {
        return PM_ERR_ALLOC;
    }
    int64_t at = 4;
    int32_t all_same = 1;
    const int64_t zero = 0;
    for (int64_t s = 0; s < n_stream; ++s) {
        if (avail - at < 4) {
            goto out;
        }
        const int64_t n = pm_get_u32(d + at);
        at += 4;
        if (n > b->size || (avail - at) / (4 * rec) < n) {
            goto out;
        }
        counts[s] = n;
        offsets[s] = at;
        const int32_t * words = (const int32_t *) (const void *) (d + at);
        int64_t span = -1;  // the records' words, when the cells already are them
        if (mode != 1 && all_same) {
            // records equal to used cells are valid ones: no second pass over them
            int32_t eq = b->used[s] == n && !b->has_shift[s];
            if (eq && b->n_multi[s] > 0) {
                // shared cells (a forked cache): its records are variable ones
                eq = b->n_ext == 0 && b->cells != NULL &&
                     pm_step_kv_cells_equal_var(b->cells, s, words, (avail - at) / 4, n, b->n_seq_max, &span) ==
                         PM_OK &&
                     span >= 0;
            } else if (eq && n > 0 &&
                       pm_kv_cells_equal(b->pos[s], b->owner[s], b->n_ext ? b->ext[s] : NULL, words, n, rec,
                                         b->n_ext, b->n_seq_max, &eq) != PM_OK) {
                eq = 0;
            }
            all_same = eq;
        }
        if (span < 0 && mode == 1 && known_spans != NULL && known_spans[s] >= 0 &&
            known_spans[s] <= (avail - at) / 4) {
            span = known_spans[s];
        }
        if (span < 0) {
            span = pm_whole_records_span(b, s, words, n, (avail - at) / 4, rec, mode, all_same);
        }
        if (span < 0) {
            goto out;
        }
        if (n == 0) {
            at += 4 * span;
            data_at[s] = at;
            continue;
        }
        const int64_t data = pm_kv_data_walk(d + at + 4 * span, avail - at - 4 * span, b->spec[s], b->tensors, n,
                                             &zero, &n, 1, 0);
        if (data < 0) {
            goto out;
        }
        at += 4 * span;
        data_at[s] = at;
        at += data;
    }
    if (mode == 1) {
        for (int64_t s = 0; s < n_stream; ++s) {
            const int64_t n = counts[s], p = data_at[s];
            if (n > 0) {
                pm_kv_data_walk(d + p, avail - p, b->spec[s], b->tensors, n, &zero, &n, 1, 1);
            }
        }
    }
    *same = mode != 1 ? all_same : 0;
    *consumed = at;
    *done = 1;
out:
    free(data_at);
    return PM_OK;
}

pm_status pm_rows_sections(struct ggml_tensor * const * tensors, const int64_t * spec, int64_t n,
                           const int64_t * run_starts, const int64_t * run_ends, int64_t n_runs, void * out,
                           int64_t cap, int64_t * written) {
    if (tensors == NULL || spec == NULL || out == NULL || written == NULL || n < 0 || cap < 0 || n_runs < 0 ||
        (n_runs > 0 && (run_starts == NULL || run_ends == NULL))) {
        return PM_ERR_ARG;
    }
    int64_t n_cells = 0, row_max = 0;  // row_max: one past the highest row read
    if (pm_runs_measure(run_starts, run_ends, n_runs, &n_cells, &row_max) != PM_OK) {
        return PM_ERR_ARG;
    }
    int64_t total = 0, n_pieces = 0;
    for (int64_t i = 0; i < n; ++i) {
        const struct ggml_tensor * t = tensors[i];
        const int64_t row_size = spec[2 * i + 1];
        if (t == NULL || row_size < 0) {
            return PM_ERR_ARG;
        }
        // a zero-wide tensor (a layer without conv state) carries its header only
        if (row_size > 0 && (t->buffer == NULL || !ggml_backend_buffer_is_host(t->buffer) ||
                             t->nb[1] != (size_t) row_size ||
                             (uint64_t) row_max > ggml_nbytes(t) / (uint64_t) row_size)) {
            return PM_ERR_ARG;
        }
        total += 12 + n_cells * row_size;
        n_pieces += row_size > 0 && n_cells > 0;
    }
    *written = total;
    if (total > cap) {
        return PM_ERR_RANGE;
    }
    pm_batch batch = pm_batch_new(n_pieces, n_cells, run_starts, run_ends, n_runs);
    char *   w     = (char *) out;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t row_size = spec[2 * i + 1];
        w = pm_put_u32(w, (uint32_t) (int32_t) spec[2 * i]);
        w = pm_put_u64(w, (uint64_t) row_size);
        if (row_size > 0 && n_cells > 0) {
            pm_batch_add(&batch, (pm_piece) { w, (const char *) tensors[i]->data, row_size, row_size, 0, 1 });
            w += n_cells * row_size;
        }
    }
    pm_batch_run(&batch);
    return PM_OK;
}

pm_status pm_rs_write_whole(const int32_t * tail, const int32_t * pos, const int32_t * src, const uint32_t * rs_idx,
                            int64_t size, int64_t n_rs_seq, int64_t n_layer, struct ggml_tensor * const * tensors,
                            const int64_t * spec, int64_t n_tensors, void * out, int64_t cap, int64_t * written,
                            int64_t * disagree) {
    if (tail == NULL || pos == NULL || src == NULL || (n_rs_seq > 0 && rs_idx == NULL) || tensors == NULL ||
        spec == NULL || written == NULL || disagree == NULL || size < 1 || n_rs_seq < 0 || n_tensors < 0 ||
        n_layer < 0 || n_layer > UINT32_MAX || cap < 0 || (out == NULL && cap != 0)) {
        return PM_ERR_ARG;
    }
    *disagree = -1;
    // per cell: its sequence count, then the first of its ids in the META order
    int64_t * first = (int64_t *) calloc((size_t) (size + 1), sizeof(int64_t));
    int64_t * plane = (int64_t *) malloc((size_t) size * sizeof(int64_t));
    int64_t * starts = (int64_t *) malloc((size_t) size * sizeof(int64_t));
    int64_t * ends = (int64_t *) malloc((size_t) size * sizeof(int64_t));
    int32_t * ids = (int32_t *) malloc((size_t) size * sizeof(int32_t));
    pm_status st = PM_OK;
    if (first == NULL || plane == NULL || starts == NULL || ends == NULL || ids == NULL) {
        st = PM_ERR_ALLOC;
        goto done;
    }
    for (int64_t c = 0; c < size; ++c) {
        plane[c] = -1;
    }
    int64_t n_ids = 0;
    for (int64_t q = 0; q < size; ++q) {
        const int32_t c = tail[q];
        if (c == -1) {
            continue;
        }
        if (c < 0 || c >= size) {
            st = PM_ERR_ARG;
            goto done;
        }
        first[c + 1] += 1;
        ++n_ids;
        const int64_t p = n_rs_seq > 0 ? (int64_t) rs_idx[q] : 0;
        if (plane[c] >= 0 && plane[c] != p && *disagree < 0) {
            *disagree = c;  // the reference's cell order: the first such cell wins below
        }
        plane[c] = p;
    }
    if (*disagree >= 0) {
        // the first cell (ascending) whose sequences disagree
        for (int64_t c = 0; c < size; ++c) {
            plane[c] = -1;
        }
        *disagree = size;
        for (int64_t q = 0; q < size; ++q) {
            const int32_t c = tail[q];
            if (c < 0) {
                continue;
            }
            const int64_t p = (int64_t) rs_idx[q];
            if (plane[c] >= 0 && plane[c] != p && c < *disagree) {
                *disagree = c;
            }
            plane[c] = p;
        }
        goto done;
    }
    // META: 2 words per selected cell plus its ids; cells in ascending order
    int64_t k = 0;
    for (int64_t c = 0; c < size; ++c) {
        k += first[c + 1] > 0;
    }
    int64_t cell_bytes = 0;
    for (int64_t i = 0; i < n_tensors; ++i) {
        cell_bytes += spec[2 * i + 1] > 0 ? spec[2 * i + 1] : 0;
    }
    const int64_t meta = 4 * (2 * k + n_ids);
    const int64_t total = 4 + meta + 8 + 12 * n_tensors + k * cell_bytes;
    *written = total;
    if (total > cap) {
        st = PM_ERR_RANGE;
        goto done;
    }
    // ids grouped by cell, ascending inside a cell: a counting sort over q
    for (int64_t c = 0; c < size; ++c) {
        first[c + 1] += first[c];
    }
    for (int64_t q = 0; q < size; ++q) {
        if (tail[q] >= 0) {
            ids[first[tail[q]]++] = (int32_t) q;  // first[c] ends at cell c + 1's start
        }
    }
    char * w = pm_put_u32((char *) out, (uint32_t) k);
    int64_t n_runs = 0;
    for (int64_t c = 0; c < size; ++c) {
        const int64_t lo = c == 0 ? 0 : first[c - 1];
        const int64_t n = first[c] - lo;
        if (n == 0) {
            continue;
        }
        w = pm_put_u32(w, (uint32_t) pos[c]);
        w = pm_put_u32(w, (uint32_t) n);
        for (int64_t j = 0; j < n; ++j) {
            w = pm_put_u32(w, (uint32_t) ids[lo + j]);
        }
        const int64_t row = (src[c] >= 0 ? src[c] : c) + (n_rs_seq > 0 ? plane[c] * size : 0);
        if (n_runs > 0 && ends[n_runs - 1] == row) {
            ends[n_runs - 1] = row + 1;
        } else {
            starts[n_runs] = row;
            ends[n_runs] = row + 1;
            ++n_runs;
        }
    }
    w = pm_put_u32(w, 0);
    w = pm_put_u32(w, (uint32_t) n_layer);
    int64_t part = 0;
    st = pm_rows_sections(tensors, spec, n_tensors, starts, ends, n_runs, w, cap - (w - (char *) out), &part);
done:
    free(first);
    free(plane);
    free(starts);
    free(ends);
    free(ids);
    return st;
}

pm_status pm_rs_read_whole(const void * blob, int64_t avail, int64_t size, int64_t limit, int64_t n_layer,
                           struct ggml_tensor * const * tensors, const int64_t * spec, int64_t n_tensors,
                           int32_t store, int64_t * rows_hi, int32_t * pos_out, int32_t * tail_out,
                           int64_t * cell_count, int64_t * consumed) {
    if (blob == NULL || tensors == NULL || spec == NULL || pos_out == NULL || tail_out == NULL ||
        cell_count == NULL || consumed == NULL || avail < 0 || size < 1 || limit < 0 || limit > size ||
        n_tensors < 0) {
        return PM_ERR_ARG;
    }
    for (int64_t i = 0; i < n_tensors; ++i) {  // host tensors of the spec's rows: zeroed below
        const struct ggml_tensor * t = tensors[i];
        const int64_t row_size = spec[2 * i + 1];
        if (t == NULL || row_size < 0 ||
            (row_size > 0 && (t->buffer == NULL || !ggml_backend_buffer_is_host(t->buffer) ||
                              t->nb[1] != (size_t) row_size))) {
            return PM_ERR_ARG;
        }
    }
    *consumed = -1;
    const char * d = (const char *) blob;
    if (avail < 4) {
        return PM_OK;
    }
    const int64_t k = pm_get_u32(d);
    if (k > size) {
        return PM_OK;
    }
    for (int64_t q = 0; q < size; ++q) {
        tail_out[q] = -1;
    }
    int64_t at = 4;
    for (int64_t c = 0; c < k; ++c) {
        if (avail - at < 8) {
            return PM_OK;
        }
        const int64_t n = pm_get_u32(d + at + 4);
        pos_out[c] = (int32_t) pm_get_u32(d + at);
        at += 8;
        if (n > 256 || (avail - at) / 4 < n) {
            return PM_OK;
        }
        for (int64_t j = 0; j < n; ++j) {
            const int32_t q = (int32_t) pm_get_u32(d + at + 4 * j);
            if (q < 0 || q >= limit || tail_out[q] >= 0) {
                return PM_OK;
            }
            tail_out[q] = (int32_t) c;
        }
        at += 4 * n;
    }
    if (avail - at < 8 || pm_get_u32(d + at) != 0 || pm_get_u32(d + at + 4) != (uint32_t) n_layer) {
        return PM_OK;
    }
    at += 8;
    int64_t rows = 0;
    const pm_status st = pm_rows_store(tensors, spec, n_tensors, k, 0, d + at, avail - at, 0, &rows);
    if (st != PM_OK || rows < 0) {
        return st;
    }
    if (store) {
        pm_rows_store(tensors, spec, n_tensors, k, 0, d + at, avail - at, 1, &rows);
        // each plane's rows of the cells below its bound (all without one), past k in plane 0
        const int64_t hi0 = rows_hi == NULL || rows_hi[0] > size ? size : rows_hi[0];
        const int64_t hi_planes = rows_hi == NULL || rows_hi[1] > size ? size : rows_hi[1];
        for (int64_t i = 0; i < n_tensors; ++i) {
            const int64_t row_size = spec[2 * i + 1];
            if (row_size <= 0) {
                continue;
            }
            char * data = (char *) tensors[i]->data;  // (pm_rows_store checked the tensor)
            const int64_t n_rows = (int64_t) (ggml_nbytes(tensors[i]) / (uint64_t) row_size);
            for (int64_t p0 = 0; p0 < n_rows; p0 += size) {
                const int64_t hi = p0 == 0 ? hi0 : hi_planes;
                const int64_t a = p0 + (p0 == 0 ? k : 0), e = p0 + hi < n_rows ? p0 + hi : n_rows;
                if (a < e) {
                    memset(data + a * row_size, 0, (size_t) ((e - a) * row_size));
                }
            }
        }
        if (rows_hi != NULL) {
            rows_hi[0] = k;
            rows_hi[1] = 0;
        }
    }
    *cell_count = k;
    *consumed = at + rows;
    return PM_OK;
}

pm_status pm_rs_restore_seq(int32_t * pos, int32_t * src, int32_t * src0, int32_t * tail, uint32_t * rs_idx,
                            uint32_t * n_last, int64_t * scalars, int64_t size, int32_t dest, const void * blob,
                            int64_t avail, int64_t n_layer, struct ggml_tensor * const * tensors,
                            const int64_t * spec, int64_t n_tensors, int64_t * consumed, int64_t * cell) {
    if (pos == NULL || src == NULL || src0 == NULL || tail == NULL || rs_idx == NULL || n_last == NULL ||
        scalars == NULL || blob == NULL || tensors == NULL || spec == NULL || consumed == NULL || cell == NULL ||
        size < 1 || dest < 0 || dest >= size || avail < 0 || n_tensors < 0) {
        return PM_ERR_ARG;
    }
    *consumed = -1;
    *cell = -1;
    const char * d = (const char *) blob;
    // the blob's shape first: the section is read only when it is one this call places
    if (avail < 4) {
        return PM_OK;
    }
    const int64_t k = pm_get_u32(d);
    if (k > 1 || avail < 4 + 8 * k + 8) {
        return PM_OK;
    }
    const int32_t p_new = k ? (int32_t) pm_get_u32(d + 4) : 0;
    if ((k && pm_get_u32(d + 8) != 0) || pm_get_u32(d + 4 + 8 * k) != 0 ||
        pm_get_u32(d + 8 + 8 * k) != (uint32_t) n_layer) {
        return PM_OK;
    }
    const int64_t head_at = 12 + 8 * k;
    int64_t rows = 0;
    // rows stored at the new head: only the headers and sizes are checked here (row 0)
    const pm_status st = pm_rows_store(tensors, spec, n_tensors, k, 0, d + head_at, avail - head_at, 0, &rows);
    if (st != PM_OK || rows < 0) {
        return st;
    }
    int64_t head = scalars[0], used = scalars[1];
    // seq_rm(dest, 0, POS_MAX): the rollback index goes; the tail cell when its position
    // is in range (a negative one stays: the reference's quirk, the general path's case)
    rs_idx[dest] = 0;
    n_last[dest] = 0;
    const int32_t t = tail[dest];
    if (t >= 0) {
        if (t >= size || pos[t] < 0 || pos[t] == INT32_MAX) {
            return PM_OK;  // out of seq_rm's range [0, POS_MAX): the general path's case
        }
        tail[dest] = -1;
        int shared = 0;
        for (int64_t q = 0; q < size; ++q) {
            shared |= tail[q] == t;
        }
        if (!shared) {
            pos[t] = -1;
            src[t] = -1;
            used -= 1;
            head = t < head ? t : head;
        }
    }
    if (k == 0) {
        scalars[0] = head;
        scalars[1] = used;
        *consumed = head_at + rows;
        return PM_OK;
    }
    // place_new_sequence: the first empty cell from head, cyclically
    if (head > used + 2) {
        head = 0;
    }
    uint8_t * held_by = (uint8_t *) calloc((size_t) size, 1);
    if (held_by == NULL) {
        return PM_ERR_ALLOC;
    }
    for (int64_t q = 0; q < size; ++q) {
        if (tail[q] >= 0 && tail[q] < size) {
            held_by[tail[q]] = 1;
        }
    }
    int64_t first = -1, after = -1, n_used = 0;
    for (int64_t c = 0; c < size; ++c) {
        const int held = held_by[c];
        n_used += held;
        if (!held && first < 0) {
            first = c;
        }
        if (!held && after < 0 && c >= head) {
            after = c;
        }
    }
    free(held_by);
    const int64_t c = after >= 0 ? after : first;
    if (c < 0) {
        return PM_OK;
    }
    int64_t rs_z = c;
    for (int64_t j = 0; j < size; ++j) {
        if (src[j] == c) {
            rs_z = -1;
        }
    }
    int64_t own = src[c];
    if (own < 0) {
        if (rs_z < 0) {
            return PM_OK;
        }
        own = rs_z;
    }
    tail[dest] = (int32_t) c;
    pos[c] = p_new;
    src0[c] = (int32_t) own;
    src[c] = (int32_t) c;
    n_last[dest] = 1;
    scalars[0] = c;
    scalars[1] = n_used + 1;
    scalars[2] = 1;
    scalars[3] = rs_z;
    *cell = c;
    *consumed = head_at + rows;
    return PM_OK;
}

pm_status pm_rows_section(struct ggml_tensor * const * tensors, const int64_t * spec, int64_t n, int64_t row,
                          void * out, int64_t cap, int64_t * written) {
    if (row == INT64_MAX) {
        return PM_ERR_ARG;  // (its end row would overflow)
    }
    const int64_t end = row + 1;
    return pm_rows_sections(tensors, spec, n, &row, &end, row >= 0 ? 1 : 0, out, cap, written);
}

pm_status pm_rows_store(struct ggml_tensor * const * tensors, const int64_t * spec, int64_t n, int64_t n_rows,
                        int64_t dst_row, const void * data, int64_t avail, int32_t store, int64_t * consumed) {
    if (tensors == NULL || spec == NULL || data == NULL || consumed == NULL || n < 0 || n_rows < 0 || dst_row < 0 ||
        avail < 0) {
        return PM_ERR_ARG;
    }
    *consumed = -1;
    const char * p = (const char *) data;
    int64_t at = 0;
    for (int64_t i = 0; i < n; ++i) {  // every check before the first byte is stored
        const struct ggml_tensor * t = tensors[i];
        const int64_t row_size = spec[2 * i + 1];
        if (t == NULL || row_size < 0) {
            return PM_ERR_ARG;
        }
        if (row_size > 0 && n_rows > 0) {
            if (t->buffer == NULL || !ggml_backend_buffer_is_host(t->buffer) || t->nb[1] != (size_t) row_size) {
                return PM_ERR_ARG;
            }
            const uint64_t rows_in = ggml_nbytes(t) / (uint64_t) row_size;
            if ((uint64_t) dst_row > rows_in || (uint64_t) n_rows > rows_in - (uint64_t) dst_row) {
                return PM_ERR_ARG;
            }
        }
        if (avail - at < 12 || (!store && (pm_get_u32(p + at) != (uint32_t) (int32_t) spec[2 * i] ||
                                           pm_get_u64(p + at + 4) != (uint64_t) row_size))) {
            return PM_OK;
        }
        at += 12;
        if (row_size > 0 && (avail - at) / row_size < n_rows) {
            return PM_OK;
        }
        at += n_rows * row_size;
    }
    if (store && n_rows > 0) {
        // one piece per tensor: its rows [dst_row, dst_row + n_rows), one run
        const int64_t run_end = dst_row + n_rows;
        pm_batch      batch   = pm_batch_new(n, n_rows, &dst_row, &run_end, 1);
        int64_t       from    = 0;
        for (int64_t i = 0; i < n; ++i) {
            const int64_t row_size = spec[2 * i + 1];
            from += 12;
            if (row_size > 0) {
                pm_batch_add(&batch, (pm_piece) { (char *) tensors[i]->data, p + from, row_size, row_size, 1, 1 });
            }
            from += n_rows * row_size;
        }
        pm_batch_run(&batch);
    }
    *consumed = at;
    return PM_OK;
}

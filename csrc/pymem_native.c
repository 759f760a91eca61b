#ifndef _GNU_SOURCE
#define _GNU_SOURCE  // RTLD_DEFAULT (pm_swiglu_clamp)
#endif
#include "pymem_native.h"

#include <string.h>
#ifdef _WIN32
#include <windows.h>
#else
#include <dlfcn.h>
#endif

#include "ggml-alloc.h"

#define PM_ABI_VERSION 1

int32_t pm_abi_version(void) { return PM_ABI_VERSION; }

static int64_t pm_n_rows(const struct ggml_tensor * t) { return t->ne[1] * t->ne[2] * t->ne[3]; }

static int pm_is_host(const struct ggml_tensor * t) {
    return t->buffer != NULL && ggml_backend_buffer_is_host(t->buffer);
}

static pm_status pm_check_region(const struct ggml_tensor * t, size_t offset, size_t size) {
    if (t == NULL || t->buffer == NULL) {
        return PM_ERR_ARG;
    }
    const size_t nbytes = ggml_nbytes(t);
    if (offset > nbytes || size > nbytes - offset) {
        return PM_ERR_RANGE;
    }
    return PM_OK;
}

pm_status pm_tensor_read(const struct ggml_tensor * t, size_t offset, size_t size, void * dst) {
    pm_status st = pm_check_region(t, offset, size);
    if (st != PM_OK || size == 0) {
        return st;
    }
    if (dst == NULL) {
        return PM_ERR_ARG;
    }
    if (pm_is_host(t)) {
        pm_copy_bytes(dst, (const char *) t->data + offset, size);
    } else {
        ggml_backend_tensor_get(t, dst, offset, size);
    }
    return PM_OK;
}

pm_status pm_tensor_write(struct ggml_tensor * t, size_t offset, size_t size, const void * src) {
    pm_status st = pm_check_region(t, offset, size);
    if (st != PM_OK || size == 0) {
        return st;
    }
    if (src == NULL) {
        return PM_ERR_ARG;
    }
    if (pm_is_host(t)) {
        pm_copy_bytes((char *) t->data + offset, src, size);
    } else {
        ggml_backend_tensor_set(t, src, offset, size);
    }
    return PM_OK;
}

static pm_status pm_check_strided(const struct ggml_tensor * t, size_t offset, size_t chunk,
                                  size_t stride, int64_t n_chunks, const void * buf) {
    if (n_chunks < 0 || (n_chunks > 0 && buf == NULL)) {
        return PM_ERR_ARG;
    }
    if (n_chunks == 0 || chunk == 0) {
        return pm_check_region(t, offset, 0);
    }
    // last byte touched: offset + (n_chunks - 1) * stride + chunk
    const size_t last = (size_t) (n_chunks - 1);
    if (stride != 0 && last > (SIZE_MAX - chunk) / stride) {
        return PM_ERR_RANGE;
    }
    return pm_check_region(t, offset, last * stride + chunk);
}

pm_status pm_tensor_read_strided(const struct ggml_tensor * t, size_t offset, size_t chunk,
                                 size_t stride, int64_t n_chunks, void * dst) {
    pm_status st = pm_check_strided(t, offset, chunk, stride, n_chunks, dst);
    if (st != PM_OK || n_chunks == 0 || chunk == 0) {
        return st;
    }
    char * out = (char *) dst;
    if (pm_is_host(t)) {
        const char * base = (const char *) t->data + offset;
        for (int64_t i = 0; i < n_chunks; ++i) {
            pm_copy_bytes(out + (size_t) i * chunk, base + (size_t) i * stride, chunk);
        }
    } else if (stride == chunk) {
        ggml_backend_tensor_get(t, out, offset, chunk * (size_t) n_chunks);
    } else {
        for (int64_t i = 0; i < n_chunks; ++i) {
            ggml_backend_tensor_get(t, out + (size_t) i * chunk, offset + (size_t) i * stride, chunk);
        }
    }
    return PM_OK;
}

pm_status pm_tensor_write_strided(struct ggml_tensor * t, size_t offset, size_t chunk, size_t stride,
                                  int64_t n_chunks, const void * src) {
    pm_status st = pm_check_strided(t, offset, chunk, stride, n_chunks, src);
    if (st != PM_OK || n_chunks == 0 || chunk == 0) {
        return st;
    }
    const char * in = (const char *) src;
    if (pm_is_host(t)) {
        char * base = (char *) t->data + offset;
        for (int64_t i = 0; i < n_chunks; ++i) {
            pm_copy_bytes(base + (size_t) i * stride, in + (size_t) i * chunk, chunk);
        }
    } else if (stride == chunk) {
        ggml_backend_tensor_set(t, in, offset, chunk * (size_t) n_chunks);
    } else {
        for (int64_t i = 0; i < n_chunks; ++i) {
            ggml_backend_tensor_set(t, in + (size_t) i * chunk, offset + (size_t) i * stride, chunk);
        }
    }
    return PM_OK;
}

static pm_status pm_check_ranges(const struct ggml_tensor * t, const uint64_t * offsets, const uint64_t * sizes,
                                 int64_t n_ranges, const void * buf) {
    if (t == NULL || t->buffer == NULL || n_ranges < 0 ||
        (n_ranges > 0 && (offsets == NULL || sizes == NULL || buf == NULL))) {
        return PM_ERR_ARG;
    }
    const uint64_t nbytes = ggml_nbytes(t);
    for (int64_t i = 0; i < n_ranges; ++i) {
        if (offsets[i] > nbytes || sizes[i] > nbytes - offsets[i]) {
            return PM_ERR_RANGE;
        }
    }
    return PM_OK;
}

pm_status pm_tensor_read_ranges(const struct ggml_tensor * t, const uint64_t * offsets,
                                const uint64_t * sizes, int64_t n_ranges, void * dst) {
    pm_status st = pm_check_ranges(t, offsets, sizes, n_ranges, dst);
    if (st != PM_OK) {
        return st;
    }
    char * out = (char *) dst;
    const int host = pm_is_host(t);
    for (int64_t i = 0; i < n_ranges; ++i) {
        if (host) {
            pm_copy_bytes(out, (const char *) t->data + offsets[i], sizes[i]);
        } else if (sizes[i] > 0) {
            ggml_backend_tensor_get(t, out, offsets[i], sizes[i]);
        }
        out += sizes[i];
    }
    return PM_OK;
}

pm_status pm_tensor_write_ranges(struct ggml_tensor * t, const uint64_t * offsets, const uint64_t * sizes,
                                 int64_t n_ranges, const void * src) {
    pm_status st = pm_check_ranges(t, offsets, sizes, n_ranges, src);
    if (st != PM_OK) {
        return st;
    }
    const char * in = (const char *) src;
    const int host = pm_is_host(t);
    for (int64_t i = 0; i < n_ranges; ++i) {
        if (host) {
            pm_copy_bytes((char *) t->data + offsets[i], in, sizes[i]);
        } else if (sizes[i] > 0) {
            ggml_backend_tensor_set(t, in, offsets[i], sizes[i]);
        }
        in += sizes[i];
    }
    return PM_OK;
}

static pm_status pm_check_rows(const struct ggml_tensor * t, const int64_t * rows, int64_t n_rows,
                               const void * buf) {
    if (t == NULL || t->buffer == NULL || n_rows < 0 || (n_rows > 0 && (rows == NULL || buf == NULL))) {
        return PM_ERR_ARG;
    }
    const int64_t n = pm_n_rows(t);
    for (int64_t i = 0; i < n_rows; ++i) {
        if (rows[i] < 0 || rows[i] >= n) {
            return PM_ERR_RANGE;
        }
    }
    return PM_OK;
}

// length of the run of consecutive indices starting at i: rows[i], rows[i]+1, ...
static int64_t pm_run_length(const int64_t * rows, int64_t i, int64_t n_rows) {
    int64_t j = i + 1;
    while (j < n_rows && rows[j] == rows[j - 1] + 1) {
        ++j;
    }
    return j - i;
}

pm_status pm_rows_read(const struct ggml_tensor * t, const int64_t * rows, int64_t n_rows, void * dst) {
    pm_status st = pm_check_rows(t, rows, n_rows, dst);
    if (st != PM_OK) {
        return st;
    }
    const size_t row = t->nb[1];
    char * out = (char *) dst;
    for (int64_t i = 0; i < n_rows;) {
        const int64_t run = pm_run_length(rows, i, n_rows);
        pm_tensor_read(t, (size_t) rows[i] * row, (size_t) run * row, out + (size_t) i * row);
        i += run;
    }
    return PM_OK;
}

pm_status pm_rows_write(struct ggml_tensor * t, const int64_t * rows, int64_t n_rows, const void * src) {
    pm_status st = pm_check_rows(t, rows, n_rows, src);
    if (st != PM_OK) {
        return st;
    }
    const size_t row = t->nb[1];
    const char * in = (const char *) src;
    for (int64_t i = 0; i < n_rows;) {
        const int64_t run = pm_run_length(rows, i, n_rows);
        pm_tensor_write(t, (size_t) rows[i] * row, (size_t) run * row, in + (size_t) i * row);
        i += run;
    }
    return PM_OK;
}

pm_status pm_rows_fill(struct ggml_tensor * t, const int64_t * rows, int64_t n_rows, uint8_t value) {
    pm_status st = pm_check_rows(t, rows, n_rows, t);
    if (st != PM_OK) {
        return st;
    }
    const size_t row = t->nb[1];
    for (int64_t i = 0; i < n_rows;) {
        const int64_t run = pm_run_length(rows, i, n_rows);
        if (pm_is_host(t)) {
            memset((char *) t->data + (size_t) rows[i] * row, value, (size_t) run * row);
        } else {
            ggml_backend_tensor_memset(t, value, (size_t) rows[i] * row, (size_t) run * row);
        }
        i += run;
    }
    return PM_OK;
}

// length of the run where both index arrays advance by one together
static int64_t pm_pair_run_length(const int64_t * a, const int64_t * b, int64_t i, int64_t n) {
    int64_t j = i + 1;
    while (j < n && a[j] == a[j - 1] + 1 && b[j] == b[j - 1] + 1) {
        ++j;
    }
    return j - i;
}

pm_status pm_rows_copy(const struct ggml_tensor * src, const int64_t * src_rows,
                       struct ggml_tensor * dst, const int64_t * dst_rows, int64_t n_rows) {
    pm_status st = pm_check_rows(src, src_rows, n_rows, src);
    if (st == PM_OK) {
        st = pm_check_rows(dst, dst_rows, n_rows, dst);
    }
    if (st != PM_OK) {
        return st;
    }
    if (src->type != dst->type || src->nb[1] != dst->nb[1]) {
        return PM_ERR_MISMATCH;
    }
    if (n_rows == 0) {
        return PM_OK;
    }
    const size_t row = src->nb[1];
    if (pm_is_host(src) && pm_is_host(dst)) {
        for (int64_t i = 0; i < n_rows;) {
            const int64_t run = pm_pair_run_length(src_rows, dst_rows, i, n_rows);
            pm_move_bytes((char *) dst->data + (size_t) dst_rows[i] * row,
                          (const char *) src->data + (size_t) src_rows[i] * row, (size_t) run * row);
            i += run;
        }
        return PM_OK;
    }
    // device buffers: one 1-D view pair per run, copied by the backend (device to device)
    int64_t n_runs = 0;
    for (int64_t i = 0; i < n_rows; i += pm_pair_run_length(src_rows, dst_rows, i, n_rows)) {
        ++n_runs;
    }
    struct ggml_init_params params = {
        /*.mem_size   =*/(size_t) (2 * n_runs + 2) * ggml_tensor_overhead(),
        /*.mem_buffer =*/NULL,
        /*.no_alloc   =*/true,
    };
    struct ggml_context * ctx = ggml_init(params);
    if (ctx == NULL) {
        return PM_ERR_ALLOC;
    }
    pm_status result = PM_OK;
    for (int64_t i = 0; i < n_rows && result == PM_OK;) {
        const int64_t run = pm_pair_run_length(src_rows, dst_rows, i, n_rows);
        // rows are contiguous (nb[1] == row size), so `run` rows are one 1-D view
        struct ggml_tensor * vs =
            ggml_view_1d(ctx, (struct ggml_tensor *) src, run * src->ne[0], (size_t) src_rows[i] * row);
        struct ggml_tensor * vd = ggml_view_1d(ctx, dst, run * dst->ne[0], (size_t) dst_rows[i] * row);
        if (ggml_backend_view_init(vs) != GGML_STATUS_SUCCESS || ggml_backend_view_init(vd) != GGML_STATUS_SUCCESS) {
            result = PM_ERR_BACKEND;
        } else {
            ggml_backend_tensor_copy(vs, vd);
        }
        i += run;
    }
    ggml_free(ctx);
    return result;
}

typedef void (*pm_set_n_threads_fn)(ggml_backend_t backend, int n_threads);

pm_status pm_backend_set_n_threads(ggml_backend_t backend, int32_t n_threads) {
    if (backend == NULL || n_threads <= 0) {
        return PM_ERR_ARG;
    }
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    if (dev == NULL) {
        return PM_ERR_BACKEND;
    }
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    pm_set_n_threads_fn fn =
        reg ? (pm_set_n_threads_fn) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : NULL;
    if (fn == NULL) {
        return PM_ERR_BACKEND;
    }
    fn(backend, n_threads);
    return PM_OK;
}

// --- repeated runs: one call per tensor for a state section -------------------------------
//
// The logical byte stream of a (offset, n_rep, rep_stride, starts, sizes) set is
//     for r in [0, n_rep): for i in [0, n_runs): bytes [offset + r * rep_stride + starts[i], + sizes[i])
// E.g. transposed V of cells [2, 5) and [9, 10), f16, kv_size 16, 2 channels: offset 0,
// n_rep 2, rep_stride 32, starts [4, 18], sizes [6, 2] -> tensor bytes [4, 10) [18, 20)
// [36, 42) [50, 52). K rows are the same with n_rep 1.

static pm_status pm_check_runs(const struct ggml_tensor * t, size_t offset, int64_t n_rep, size_t rep_stride,
                               const uint64_t * starts, const uint64_t * sizes, int64_t n_runs, size_t skip,
                               size_t size, const void * buf, uint64_t * per_rep) {
    if (t == NULL || t->buffer == NULL || n_rep < 0 || n_runs < 0 ||
        (n_runs > 0 && (starts == NULL || sizes == NULL)) || (size > 0 && buf == NULL)) {
        return PM_ERR_ARG;
    }
    const uint64_t nbytes = ggml_nbytes(t);
    if (offset > nbytes) {
        return PM_ERR_RANGE;
    }
    // the last repetition lies highest: every run must end inside the tensor there
    uint64_t last = 0;
    if (n_rep > 0) {
        const uint64_t reps = (uint64_t) (n_rep - 1);
        if (rep_stride != 0 && reps > (nbytes - offset) / rep_stride) {
            // only a problem if some run is non-empty
            for (int64_t i = 0; i < n_runs; ++i) {
                if (sizes[i] > 0) {
                    return PM_ERR_RANGE;
                }
            }
        } else {
            last = offset + reps * rep_stride;
        }
    }
    uint64_t total = 0;
    for (int64_t i = 0; i < n_runs; ++i) {
        if (sizes[i] == 0) {
            continue;
        }
        if (n_rep > 0 && (starts[i] > nbytes - last || sizes[i] > nbytes - last - starts[i])) {
            return PM_ERR_RANGE;
        }
        total += sizes[i];  // <= n_runs * nbytes: no overflow for any real tensor
    }
    *per_rep = total;
    if (n_rep > 0 && total > 0 && (uint64_t) n_rep > UINT64_MAX / total) {
        return PM_ERR_RANGE;
    }
    const uint64_t stream = total * (uint64_t) n_rep;
    if (skip > stream || size > stream - skip) {
        return PM_ERR_RANGE;
    }
    return PM_OK;
}

// small fixed sizes copied inline (an f16 / f32 element, a short run): a libc call per
// element costs several times the copy
static inline void pm_copy_small(char * dst, const char * src, size_t n) {
    switch (n) {
        case 2: memcpy(dst, src, 2); break;
        case 4: memcpy(dst, src, 4); break;
        case 8: memcpy(dst, src, 8); break;
        case 16: memcpy(dst, src, 16); break;
        case 32: memcpy(dst, src, 32); break;
        default: memcpy(dst, src, n); break;
    }
}

// walk the pieces of bytes [skip, skip + size) of the logical stream; dir 0 reads the
// tensor into buf, dir 1 writes buf into the tensor
// every run of every repetition, host memory: tight loops, typed ones for runs of one
// 2-, 4- or 8-byte element (transposed V of cells that are not neighbours)
#define PM_RUNS_TYPED(T)                                                              \
    for (int64_t r = 0; r < n_rep; ++r) {                                             \
        char * rep = data + offset + (size_t) r * rep_stride;                         \
        T * b = (T *) buf + (size_t) r * (size_t) n_runs;                             \
        if (dir == 0) {                                                               \
            for (int64_t i = 0; i < n_runs; ++i) memcpy(b + i, rep + starts[i], sizeof(T)); \
        } else {                                                                      \
            for (int64_t i = 0; i < n_runs; ++i) memcpy(rep + starts[i], b + i, sizeof(T)); \
        }                                                                             \
    }

static void pm_runs_host_all(char * data, size_t offset, int64_t n_rep, size_t rep_stride, const uint64_t * starts,
                             const uint64_t * sizes, int64_t n_runs, char * buf, int dir) {
    uint64_t lo = UINT64_MAX, hi = 0;
    for (int64_t i = 0; i < n_runs; ++i) {
        lo = sizes[i] < lo ? sizes[i] : lo;
        hi = sizes[i] > hi ? sizes[i] : hi;
    }
    if (lo == hi && lo == 2) {
        PM_RUNS_TYPED(uint16_t)
        return;
    }
    if (lo == hi && lo == 4) {
        PM_RUNS_TYPED(uint32_t)
        return;
    }
    if (lo == hi && lo == 8) {
        PM_RUNS_TYPED(uint64_t)
        return;
    }
    size_t done = 0;
    for (int64_t r = 0; r < n_rep; ++r) {
        char * rep = data + offset + (size_t) r * rep_stride;
        for (int64_t i = 0; i < n_runs; ++i) {
            if (dir == 0) {
                pm_copy_small(buf + done, rep + starts[i], sizes[i]);
            } else {
                pm_copy_small(rep + starts[i], buf + done, sizes[i]);
            }
            done += sizes[i];
        }
    }
}

static void pm_runs_walk(struct ggml_tensor * t, size_t offset, int64_t n_rep, size_t rep_stride,
                         const uint64_t * starts, const uint64_t * sizes, int64_t n_runs, uint64_t per_rep,
                         size_t skip, size_t size, char * buf, int dir) {
    if (size == 0 || per_rep == 0) {
        return;
    }
    const int host = pm_is_host(t);
    char * data = (char *) t->data;
    if (host && skip == 0 && size == per_rep * (uint64_t) n_rep) {
        pm_runs_host_all(data, offset, n_rep, rep_stride, starts, sizes, n_runs, buf, dir);
        return;
    }
    uint64_t r = skip / per_rep;
    uint64_t in_rep = skip - r * per_rep;  // bytes of this repetition before the window
    int64_t i = 0;
    while (in_rep >= sizes[i]) {
        in_rep -= sizes[i];
        ++i;
    }
    size_t done = 0;
    while (done < size) {
        const size_t avail = (size_t) (sizes[i] - in_rep);
        const size_t n = avail < size - done ? avail : size - done;
        const size_t at = offset + (size_t) r * rep_stride + (size_t) starts[i] + (size_t) in_rep;
        if (n > 0) {
            if (host) {
                if (dir == 0) {
                    pm_copy_small(buf + done, data + at, n);
                } else {
                    pm_copy_small(data + at, buf + done, n);
                }
            } else if (dir == 0) {
                ggml_backend_tensor_get(t, buf + done, at, n);
            } else {
                ggml_backend_tensor_set(t, buf + done, at, n);
            }
        }
        done += n;
        in_rep = 0;
        if (++i == n_runs) {
            i = 0;
            ++r;
        }
    }
}

pm_status pm_tensor_read_runs(const struct ggml_tensor * t, size_t offset, int64_t n_rep, size_t rep_stride,
                              const uint64_t * starts, const uint64_t * sizes, int64_t n_runs, size_t skip,
                              size_t size, void * dst) {
    uint64_t per_rep = 0;
    pm_status st = pm_check_runs(t, offset, n_rep, rep_stride, starts, sizes, n_runs, skip, size, dst, &per_rep);
    if (st != PM_OK) {
        return st;
    }
    pm_runs_walk((struct ggml_tensor *) t, offset, n_rep, rep_stride, starts, sizes, n_runs, per_rep, skip, size,
                 (char *) dst, 0);
    return PM_OK;
}

pm_status pm_tensor_write_runs(struct ggml_tensor * t, size_t offset, int64_t n_rep, size_t rep_stride,
                               const uint64_t * starts, const uint64_t * sizes, int64_t n_runs, size_t skip,
                               size_t size, const void * src) {
    uint64_t per_rep = 0;
    pm_status st = pm_check_runs(t, offset, n_rep, rep_stride, starts, sizes, n_runs, skip, size, src, &per_rep);
    if (st != PM_OK) {
        return st;
    }
    pm_runs_walk(t, offset, n_rep, rep_stride, starts, sizes, n_runs, per_rep, skip, size, (char *) src, 1);
    return PM_OK;
}

// --- graphs over several devices ---------------------------------------------------------

static ggml_backend_buffer_t pm_buffer_of(const struct ggml_tensor * t) {
    if (t == NULL) {
        return NULL;
    }
    // ggml points a view of a view at the first tensor's view_src
    return t->view_src != NULL ? t->view_src->buffer : t->buffer;
}

pm_status pm_graph_buffer_types(struct ggml_cgraph * graph, ggml_backend_buffer_type_t * out, int32_t cap,
                                int32_t * n_out) {
    if (graph == NULL || out == NULL || n_out == NULL || cap <= 0) {
        return PM_ERR_ARG;
    }
    int32_t n = 0;
    const int n_nodes = ggml_graph_n_nodes(graph);
    for (int i = 0; i < n_nodes; i++) {
        const struct ggml_tensor * node = ggml_graph_node(graph, i);
        for (int j = -1; j < GGML_MAX_SRC; j++) {
            ggml_backend_buffer_t buf = pm_buffer_of(j < 0 ? node : node->src[j]);
            if (buf == NULL) {
                continue;
            }
            ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(buf);
            int32_t k = 0;
            while (k < n && out[k] != buft) {
                k++;
            }
            if (k < n) {
                continue;
            }
            if (n == cap) {
                *n_out = n;
                return PM_ERR_RANGE;
            }
            out[n++] = buft;
        }
    }
    *n_out = n;
    return PM_OK;
}

typedef struct ggml_tensor * (*pm_swiglu_clamp_fn)(struct ggml_context *, struct ggml_tensor *,
                                                   struct ggml_tensor *, float);

struct ggml_tensor * pm_swiglu_clamp(struct ggml_context * ctx, struct ggml_tensor * a,
                                     struct ggml_tensor * b, float limit) {
#ifdef _WIN32
    // the ggml.dll the extension was bound to is already loaded: look the symbol up there
    HMODULE ggml = GetModuleHandleA("ggml.dll");
    pm_swiglu_clamp_fn fn = ggml != NULL ? (pm_swiglu_clamp_fn) (void (*)(void)) GetProcAddress(ggml, "ggml_swiglu_clamp") : NULL;
#else
    pm_swiglu_clamp_fn fn = (pm_swiglu_clamp_fn) dlsym(RTLD_DEFAULT, "ggml_swiglu_clamp");
#endif
    return fn != NULL ? fn(ctx, a, b, limit) : NULL;
}

// --- KQ masks of a decode step -------------------------------------------------------------

#define PM_F16_NEG_INF 0xFC00u
#define PM_F32_NEG_INF 0xFF800000u

pm_status pm_kq_mask_rows(const int32_t * owner, const int32_t * pos, int64_t n_cells, const int64_t * row_off,
                          const int32_t * seq, const int32_t * lo, const int32_t * hi, int64_t n_tokens,
                          int64_t n_kv, int32_t elem_size, void * out) {
    if (owner == NULL || pos == NULL || row_off == NULL || seq == NULL || lo == NULL || hi == NULL ||
        out == NULL || n_tokens < 0 || n_kv < 0 || (elem_size != 2 && elem_size != 4)) {
        return PM_ERR_ARG;
    }
    for (int64_t t = 0; t < n_tokens; t++) {
        if (row_off[t] < 0 || row_off[t] > n_cells - n_kv) {
            return PM_ERR_RANGE;
        }
    }
    for (int64_t t = 0; t < n_tokens; t++) {
        const int32_t * own = owner + row_off[t];
        const int32_t * p = pos + row_off[t];
        const int32_t s = seq[t], a = lo[t], b = hi[t];
        if (elem_size == 2) {
            uint16_t * o = (uint16_t *) out + t * n_kv;
            for (int64_t j = 0; j < n_kv; j++) {
                const int keep = (own[j] == s) & (p[j] >= a) & (p[j] <= b);
                o[j] = keep ? 0 : PM_F16_NEG_INF;
            }
        } else {
            uint32_t * o = (uint32_t *) out + t * n_kv;
            for (int64_t j = 0; j < n_kv; j++) {
                const int keep = (own[j] == s) & (p[j] >= a) & (p[j] <= b);
                o[j] = keep ? 0 : PM_F32_NEG_INF;
            }
        }
    }
    return PM_OK;
}

// cell j (held by several sequences: bitset `bits`, n_words words) attended by the token
// of each sequence it holds whose window takes its position
static void pm_kq_mask_shared_cell(int64_t j, int32_t p, const uint64_t * bits, int64_t n_words,
                                   const int64_t * tok_of, int64_t n_tok_of, const int32_t * lo, const int32_t * hi,
                                   int64_t n_kv, int32_t elem_size, void * out) {
    for (int64_t w = 0; w < n_words; w++) {
        for (uint64_t b = bits[w]; b != 0; b &= b - 1) {
            const int64_t k = 64 * w + pm_ctz64(b) + 2;
            const int64_t t = k < n_tok_of ? tok_of[k] : -1;
            if (t >= 0 && p >= lo[t] && p <= hi[t]) {
                if (elem_size == 2) {
                    ((uint16_t *) out)[t * n_kv + j] = 0;
                } else {
                    ((uint32_t *) out)[t * n_kv + j] = 0;
                }
            }
        }
    }
}

// n mask elements of elem_size bytes (2: f16, else f32) set to -inf
static void pm_fill_neg_inf(void * out, int64_t n, int32_t elem_size) {
    if (elem_size == 2) {
        uint16_t * o = (uint16_t *) out;
        for (int64_t i = 0; i < n; i++) {
            o[i] = PM_F16_NEG_INF;
        }
    } else {
        uint32_t * o = (uint32_t *) out;
        for (int64_t i = 0; i < n; i++) {
            o[i] = PM_F32_NEG_INF;
        }
    }
}

// the tokens seq_tok[seq_ptr[q] .. seq_ptr[q + 1]) of sequence q whose window takes
// position p attend cell j
static inline void pm_kq_mask_tokens(int64_t j, int32_t p, int64_t q, const int64_t * seq_ptr,
                                     const int64_t * seq_tok, const int32_t * lo, const int32_t * hi, int64_t n_kv,
                                     int32_t elem_size, void * out) {
    for (int64_t k = seq_ptr[q]; k < seq_ptr[q + 1]; k++) {
        const int64_t t = seq_tok[k];
        if (p >= lo[t] && p <= hi[t]) {
            if (elem_size == 2) {
                ((uint16_t *) out)[t * n_kv + j] = 0;
            } else {
                ((uint32_t *) out)[t * n_kv + j] = 0;
            }
        }
    }
}

pm_status pm_kq_mask_seqs(const int32_t * owner, const int32_t * pos, int64_t n_cells, const int64_t * seq_ptr,
                          const int64_t * seq_tok, int64_t n_seqs, const uint64_t * bits, int64_t n_words,
                          const int32_t * lo, const int32_t * hi, int64_t n_tokens, int64_t n_kv, int32_t elem_size,
                          void * out) {
    if (owner == NULL || pos == NULL || seq_ptr == NULL || seq_tok == NULL || lo == NULL || hi == NULL ||
        out == NULL || n_tokens < 0 || n_kv < 0 || n_seqs < 1 || (elem_size != 2 && elem_size != 4) ||
        (bits != NULL && (n_words < 1 || n_words > 4 || 64 * n_words > n_seqs))) {
        return PM_ERR_ARG;
    }
    if (n_kv > n_cells) {
        return PM_ERR_RANGE;
    }
    // the lists checked before the first write: offsets from 0, ascending, within the
    // tokens; every listed token inside the rows
    if (seq_ptr[0] != 0 || seq_ptr[n_seqs] > n_tokens) {
        return PM_ERR_RANGE;
    }
    for (int64_t q = 0; q < n_seqs; q++) {
        if (seq_ptr[q + 1] < seq_ptr[q]) {
            return PM_ERR_RANGE;
        }
    }
    for (int64_t k = 0; k < seq_ptr[n_seqs]; k++) {
        if (seq_tok[k] < 0 || seq_tok[k] >= n_tokens) {
            return PM_ERR_RANGE;
        }
    }
    pm_fill_neg_inf(out, n_tokens * n_kv, elem_size);
    for (int64_t j = 0; j < n_kv; j++) {
        const int32_t q = owner[j];
        if (q >= 0 && q < n_seqs) {
            pm_kq_mask_tokens(j, pos[j], q, seq_ptr, seq_tok, lo, hi, n_kv, elem_size, out);
        } else if (q == -2 && bits != NULL) {
            const uint64_t * b = bits + j * n_words;
            for (int64_t w = 0; w < n_words; w++) {
                for (uint64_t r = b[w]; r != 0; r &= r - 1) {
                    pm_kq_mask_tokens(j, pos[j], 64 * w + pm_ctz64(r), seq_ptr, seq_tok, lo, hi, n_kv, elem_size,
                                      out);
                }
            }
        }
    }
    return PM_OK;
}

pm_status pm_kq_mask_owner(const int32_t * owner, const int32_t * pos, int64_t n_cells, const int64_t * tok_of,
                           int64_t n_tok_of, const uint64_t * bits, int64_t n_words, const int32_t * lo,
                           const int32_t * hi, int64_t n_tokens, int64_t n_kv, int32_t elem_size, void * out) {
    if (owner == NULL || pos == NULL || tok_of == NULL || lo == NULL || hi == NULL || out == NULL ||
        n_tokens < 0 || n_kv < 0 || (elem_size != 2 && elem_size != 4) ||
        (bits != NULL && (n_words < 1 || n_words > 4))) {
        return PM_ERR_ARG;
    }
    // every token a table entry names must have a row (the shared cells' bits read any entry)
    for (int64_t k = 0; bits != NULL && k < n_tok_of; k++) {
        if (tok_of[k] >= n_tokens) {
            return PM_ERR_RANGE;
        }
    }
    if (n_kv > n_cells) {
        return PM_ERR_RANGE;
    }
    // every cell's owner and token checked before the first write: a refused call leaves
    // `out` as it was
    for (int64_t j = 0; j < n_kv; j++) {
        const int64_t k = (int64_t) owner[j] + 2;
        if (k < 0 || k >= n_tok_of || tok_of[k] >= n_tokens) {
            return PM_ERR_RANGE;
        }
    }
    pm_fill_neg_inf(out, n_tokens * n_kv, elem_size);
    for (int64_t j = 0; j < n_kv; j++) {
        const int64_t t = tok_of[(int64_t) owner[j] + 2];
        if (t < 0) {
            if (owner[j] == -2 && bits != NULL) {
                pm_kq_mask_shared_cell(j, pos[j], bits + j * n_words, n_words, tok_of, n_tok_of, lo, hi, n_kv,
                                       elem_size, out);
            }
            continue;
        }
        if (pos[j] >= lo[t] && pos[j] <= hi[t]) {
            if (elem_size == 2) {
                ((uint16_t *) out)[t * n_kv + j] = 0;
            } else {
                ((uint32_t *) out)[t * n_kv + j] = 0;
            }
        }
    }
    return PM_OK;
}

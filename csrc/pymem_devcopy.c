#include "pymem_devcopy.h"

#include <string.h>

// the buffer a tensor's bytes live in (a view's is its source's)
static ggml_backend_buffer_t pm_devcopy_buffer(const struct ggml_tensor * t) {
    return t->view_src != NULL ? t->view_src->buffer : t->buffer;
}

// check the destination run set against dst's bytes; *total = n_rep * sum(sizes)
static pm_status pm_devcopy_check_dst(const struct ggml_tensor * dst, size_t dst_offset, int64_t n_rep,
                                      size_t rep_stride, const uint64_t * starts, const uint64_t * sizes,
                                      int64_t n_runs, uint64_t * total) {
    const uint64_t nbytes = ggml_nbytes(dst);
    if (dst_offset > nbytes) {
        return PM_ERR_RANGE;
    }
    uint64_t per_rep = 0;
    for (int64_t i = 0; i < n_runs; ++i) {
        if (sizes[i] > nbytes || per_rep > UINT64_MAX - sizes[i]) {
            return PM_ERR_RANGE;
        }
        per_rep += sizes[i];
    }
    *total = 0;
    if (n_rep == 0 || per_rep == 0) {
        return PM_OK;
    }
    // the last repetition lies highest: every non-empty run must end inside dst there
    const uint64_t reps = (uint64_t) (n_rep - 1);
    if (rep_stride != 0 && reps > (nbytes - dst_offset) / rep_stride) {
        return PM_ERR_RANGE;
    }
    const uint64_t last = dst_offset + reps * rep_stride;
    for (int64_t i = 0; i < n_runs; ++i) {
        if (sizes[i] > 0 && (starts[i] > nbytes - last || sizes[i] > nbytes - last - starts[i])) {
            return PM_ERR_RANGE;
        }
    }
    if ((uint64_t) n_rep > UINT64_MAX / per_rep) {
        return PM_ERR_RANGE;
    }
    *total = per_rep * (uint64_t) n_rep;
    return PM_OK;
}

// whether [a, a + n) and [b, b + m) share a byte
static int pm_devcopy_overlap(uintptr_t a, uint64_t n, uintptr_t b, uint64_t m) {
    return n > 0 && m > 0 && a < b + m && b < a + n;
}

pm_status pm_tensor_copy_runs(const struct ggml_tensor * src, size_t src_offset, struct ggml_tensor * dst,
                              size_t dst_offset, int64_t n_rep, size_t rep_stride, const uint64_t * starts,
                              const uint64_t * sizes, int64_t n_runs) {
    if (src == NULL || dst == NULL || n_rep < 0 || n_runs < 0 || (n_runs > 0 && (starts == NULL || sizes == NULL))) {
        return PM_ERR_ARG;
    }
    ggml_backend_buffer_t src_buf = pm_devcopy_buffer(src);
    ggml_backend_buffer_t dst_buf = pm_devcopy_buffer(dst);
    if (src_buf == NULL || dst_buf == NULL || src->data == NULL || dst->data == NULL) {
        return PM_ERR_ARG;
    }
    uint64_t total = 0;
    pm_status st = pm_devcopy_check_dst(dst, dst_offset, n_rep, rep_stride, starts, sizes, n_runs, &total);
    if (st != PM_OK) {
        return st;
    }
    const uint64_t src_nbytes = ggml_nbytes(src);
    if (src_offset > src_nbytes || total > src_nbytes - src_offset) {
        return PM_ERR_RANGE;
    }
    if (total == 0) {
        return PM_OK;
    }
    const char * src_base = (const char *) src->data + src_offset;
    char * dst_base = (char *) dst->data + dst_offset;
    if (src_buf == dst_buf) {
        // one buffer: no destination piece may overlap the source bytes (a backend copy of
        // overlapping ranges is undefined)
        for (int64_t r = 0; r < n_rep; ++r) {
            for (int64_t i = 0; i < n_runs; ++i) {
                const uintptr_t at = (uintptr_t) (dst_base + (size_t) r * rep_stride + starts[i]);
                if (pm_devcopy_overlap((uintptr_t) src_base, total, at, sizes[i])) {
                    return PM_ERR_ARG;
                }
            }
        }
    }
    const int src_host = ggml_backend_buffer_is_host(src_buf);
    const int dst_host = ggml_backend_buffer_is_host(dst_buf);
    // device to device: two I8 1-D tensors placed at the piece's addresses in the two
    // buffers, re-made for every piece in one small scratch context (ggml_backend_tensor_copy
    // needs the same layout on both sides; its backend cpy_tensor does the copy)
    struct ggml_context * ctx = NULL;
    if (!src_host && !dst_host) {
        struct ggml_init_params params = {
            /*.mem_size   =*/3 * ggml_tensor_overhead(),
            /*.mem_buffer =*/NULL,
            /*.no_alloc   =*/true,
        };
        ctx = ggml_init(params);
        if (ctx == NULL) {
            return PM_ERR_ALLOC;
        }
    }
    pm_status result = PM_OK;
    size_t done = 0;
    for (int64_t r = 0; r < n_rep && result == PM_OK; ++r) {
        const size_t rep = dst_offset + (size_t) r * rep_stride;
        for (int64_t i = 0; i < n_runs; ++i) {
            const size_t n = (size_t) sizes[i];
            if (n == 0) {
                continue;
            }
            const size_t at = rep + (size_t) starts[i];
            if (src_host && dst_host) {
                pm_move_bytes((char *) dst->data + at, src_base + done, n);
            } else if (src_host) {
                ggml_backend_tensor_set(dst, src_base + done, at, n);
            } else if (dst_host) {
                ggml_backend_tensor_get(src, (char *) dst->data + at, src_offset + done, n);
            } else {
                ggml_reset(ctx);
                struct ggml_tensor * from = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, (int64_t) n);
                struct ggml_tensor * to = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, (int64_t) n);
                if (from == NULL || to == NULL ||
                    ggml_backend_tensor_alloc(src_buf, from, (void *) (src_base + done)) != GGML_STATUS_SUCCESS ||
                    ggml_backend_tensor_alloc(dst_buf, to, (char *) dst->data + at) != GGML_STATUS_SUCCESS) {
                    result = PM_ERR_BACKEND;
                    break;
                }
                ggml_backend_tensor_copy(from, to);
            }
            done += n;
        }
    }
    if (ctx != NULL) {
        ggml_free(ctx);
    }
    return result;
}

// Copies between two tensors' bytes without a host round trip: a checkpoint restore moves
// the payload of a device-resident state blob straight into the cache tensors.
#pragma once

#include "pymem_native.h"

#ifdef __cplusplus
extern "C" {
#endif

// PYMEM_CDEF_BEGIN: plain declarations only (csrc/gen_cffi.py hands them to cffi)

// The run set of pm_tensor_write_runs (for r in [0, n_rep), for i in [0, n_runs): dst bytes
// [dst_offset + r * rep_stride + starts[i], + sizes[i])) filled, in that order, from the
// contiguous src bytes [src_offset, src_offset + n_rep * sum(sizes)). Host to host is a
// memmove per piece; otherwise one backend copy per piece (device to device when both
// buffers are on one device). Every argument is checked before any byte moves:
// PM_ERR_ARG for a null tensor / buffer / array, a negative count, or a source range that
// overlaps a destination piece in the same buffer; PM_ERR_RANGE for a byte outside either
// tensor; PM_ERR_ALLOC when the scratch context cannot be made.
pm_status pm_tensor_copy_runs(const struct ggml_tensor * src, size_t src_offset, struct ggml_tensor * dst,
                              size_t dst_offset, int64_t n_rep, size_t rep_stride, const uint64_t * starts,
                              const uint64_t * sizes, int64_t n_runs);

// PYMEM_CDEF_END

#ifdef __cplusplus
}
#endif

// pymem's C layer: batch-oriented tensor I/O over ggml backend buffers.
//
// No bookkeeping lives here. Every function validates its arguments (a safety net behind
// the Python checks) and returns a pm_status; Python turns non-zero codes into exceptions
// in one place (pymem/_native.py). One call moves a whole row set or region: callers
// never loop per row or per cell.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#endif

#include "ggml-backend.h"
#include "ggml.h"
#include "pm_copy.h"

// A hint to fetch the cache line at p (for writing: PM_PREFETCH_W) before it is used: cell
// scans and run gathers start each run cold elsewhere in a large array
#if defined(__GNUC__) || defined(__clang__)
#define PM_PREFETCH(p) __builtin_prefetch(p)
#define PM_PREFETCH_W(p) __builtin_prefetch(p, 1)
#else
#define PM_PREFETCH(p) ((void) 0)
#define PM_PREFETCH_W(p) ((void) 0)
#endif

// A kernel compiled twice, for AVX2 and for the baseline, the loader picking one for the
// CPU (GNU ifunc: x86-64 Linux with glibc, GCC 6+ or Clang 14+; elsewhere one baseline
// build). Only for kernels bound by their vector work, not by memory: the record-pattern
// checks of a forked blob's parse, refill and same-cells test run about 1.3x faster.
// -DPM_NO_CLONES builds the baseline alone.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && !defined(PM_NO_CLONES) && \
    ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 6))
#define PM_CLONES_AVX2 __attribute__((target_clones("avx2", "default")))
#else
#define PM_CLONES_AVX2
#endif

// n bytes (a multiple of 16) zeroed by vector stores: for the short spans of a block of
// cells (128 or 256 bytes), where GCC turns a zeroing loop into `rep stos`, whose start-up
// costs more than the stores on this project's AMD EPYC (a quarter of a removal's time)
static inline void pm_zero16(void * p, size_t n) {
#if defined(__SSE2__) || defined(_M_X64)
    const __m128i z = _mm_setzero_si128();
    for (size_t i = 0; i < n; i += 16) {
        _mm_storeu_si128((__m128i *) (void *) ((char *) p + i), z);
    }
#else
    memset(p, 0, n);
#endif
}

// memmove of n bytes: pm_copy_bytes where the two ranges do not overlap (a row copy
// between cells a row apart, say, with rows of 16,400 bytes: 8x slower through memmove at
// their 16-byte offset), memmove where they do
static inline void pm_move_bytes(void * dst, const void * src, size_t n) {
    const uintptr_t d = (uintptr_t) dst, s = (uintptr_t) src;
    if (d + n <= s || s + n <= d) {
        pm_copy_bytes(dst, src, n);
    } else {
        memmove(dst, src, n);
    }
}

// The number of set bits of b (a bitset's sequences, a mask's cells)
static inline int64_t pm_bits_set(uint64_t b) {
    b = b - ((b >> 1) & 0x5555555555555555ULL);
    b = (b & 0x3333333333333333ULL) + ((b >> 2) & 0x3333333333333333ULL);
    b = (b + (b >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (int64_t) ((b * 0x0101010101010101ULL) >> 56);
}

// The index of the lowest set bit of b (b != 0): a shared cell's bitset is walked by its
// set bits, one per sequence that holds it
static inline int pm_ctz64(uint64_t b) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(b);
#else
    int n = 0;
    for (; (b & 1) == 0; b >>= 1) {
        n++;
    }
    return n;
#endif
}

// The block scans (32 cells a block): a block's test as one 32-bit mask, bit j for cell j,
// whose count and run edges bit tricks find (the per-cell loop over a block with an edge
// and the horizontal sum of a vector count took most of a selection's time).
#if defined(__SSE2__) || defined(_M_X64)
// The sign bits of 16 words (four vectors, in order) as a 16-bit mask: the saturating
// packs keep each word's sign in its byte
static inline uint32_t pm_signs16(__m128i a, __m128i b, __m128i c, __m128i d) {
    return (uint32_t) _mm_movemask_epi8(_mm_packs_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d)));
}

// words [4 i, 4 i + 4) from p on as one vector (any alignment)
#define PM_LOAD4(p, i) _mm_loadu_si128((const __m128i *) (const void *) ((p) + 4 * (i)))
#endif

// Bit j: a[j] == v, for the 32 words from a on (any alignment)
static inline uint32_t pm_eq_mask32(const int32_t * a, int32_t v) {
#if defined(__SSE2__) || defined(_M_X64)
    const __m128i k = _mm_set1_epi32(v);
    uint32_t      m = 0;
    for (int h = 0; h < 2; ++h) {
        const int32_t * p = a + 16 * h;
        m |= pm_signs16(_mm_cmpeq_epi32(PM_LOAD4(p, 0), k), _mm_cmpeq_epi32(PM_LOAD4(p, 1), k),
                        _mm_cmpeq_epi32(PM_LOAD4(p, 2), k), _mm_cmpeq_epi32(PM_LOAD4(p, 3), k))
             << (16 * h);
    }
    return m;
#else
    uint32_t m = 0;
    for (int j = 0; j < 32; ++j) {
        m |= (uint32_t) (a[j] == v) << j;
    }
    return m;
#endif
}

// Bit j: a[j] < 0, for the 32 words from a on (the saturating packs keep each sign)
static inline uint32_t pm_neg_mask32(const int32_t * a) {
#if defined(__SSE2__) || defined(_M_X64)
    uint32_t m = 0;
    for (int h = 0; h < 2; ++h) {
        const int32_t * p = a + 16 * h;
        m |= pm_signs16(PM_LOAD4(p, 0), PM_LOAD4(p, 1), PM_LOAD4(p, 2), PM_LOAD4(p, 3)) << (16 * h);
    }
    return m;
#else
    uint32_t m = 0;
    for (int j = 0; j < 32; ++j) {
        m |= (uint32_t) (a[j] < 0) << j;
    }
    return m;
#endif
}

// Bit j: (uint32_t) (a[j] - lo) < width, for the 32 words from a on (a position in
// [lo, lo + width): the unsigned compare as a signed one of both sides' sign bits flipped)
static inline uint32_t pm_range_mask32(const int32_t * a, uint32_t lo, uint32_t width) {
#if defined(__SSE2__) || defined(_M_X64)
    const __m128i base = _mm_set1_epi32((int32_t) lo), flip = _mm_set1_epi32(INT32_MIN);
    const __m128i w = _mm_set1_epi32((int32_t) (width ^ 0x80000000u));
    uint32_t      m = 0;
    for (int h = 0; h < 2; ++h) {
        __m128i e[4];
        for (int q = 0; q < 4; ++q) {
            e[q] = _mm_cmplt_epi32(_mm_xor_si128(_mm_sub_epi32(PM_LOAD4(a + 16 * h, q), base), flip), w);
        }
        m |= pm_signs16(e[0], e[1], e[2], e[3]) << (16 * h);
    }
    return m;
#else
    uint32_t m = 0;
    for (int j = 0; j < 32; ++j) {
        m |= (uint32_t) ((uint32_t) a[j] - lo < width) << j;
    }
    return m;
#endif
}

// Bit j: words[j] & bit != 0, for the 32 one-word bitsets from words on (a cell's
// sequences, one word a cell): the cells whose bitset names a sequence. Each 64-bit word
// is zero only where both its halves are, so each half's compare is ANDed with its
// partner's; then the low halves of four vectors' cells go to one vector for the packs.
static inline uint32_t pm_bit_mask32(const uint64_t * words, uint64_t bit) {
#if defined(__SSE2__) || defined(_M_X64)
    const __m128i b = _mm_set1_epi64x((long long) bit), z = _mm_setzero_si128();
    __m128i       q[8];  // q[k]: cells 4 k .. 4 k + 3, all ones where the word is zero
    for (int k = 0; k < 8; ++k) {
        __m128i e[2];
        for (int h = 0; h < 2; ++h) {
            const __m128i v = _mm_loadu_si128((const __m128i *) (const void *) (words + 4 * k + 2 * h));
            const __m128i c = _mm_cmpeq_epi32(_mm_and_si128(v, b), z);
            e[h]            = _mm_and_si128(c, _mm_shuffle_epi32(c, _MM_SHUFFLE(2, 3, 0, 1)));
        }
        q[k] = _mm_castps_si128(
            _mm_shuffle_ps(_mm_castsi128_ps(e[0]), _mm_castsi128_ps(e[1]), _MM_SHUFFLE(2, 0, 2, 0)));
    }
    return ~(pm_signs16(q[0], q[1], q[2], q[3]) | pm_signs16(q[4], q[5], q[6], q[7]) << 16);
#else
    uint32_t m = 0;
    for (int j = 0; j < 32; ++j) {
        m |= (uint32_t) ((words[j] & bit) != 0) << j;
    }
    return m;
#endif
}

// Whether one meta record's words are not a fixed record's: a position below 0, an
// n_seq_id other than 1, an id outside [0, n_seq_max) (branch-free: 0 or 1)
static inline uint32_t pm_record_bad(int32_t pos, int32_t n_seq_id, int32_t id, int32_t n_seq_max) {
    return (uint32_t) (pos < 0) | (uint32_t) (n_seq_id != 1) | (uint32_t) ((uint32_t) id >= (uint32_t) n_seq_max);
}

// Whether any of n meta records of a state blob (rec int32 words each, at any alignment:
// position, n_seq_id, rec - 3 ext words, the one sequence id) is not a fixed one: a
// position below 0, n_seq_id other than 1, an id outside [0, n_seq_max). Branch-free; the
// common record of 3 words is read 4 records at a time (about 3x faster than the general
// stride: these scans cover every cell of a whole restore, twice).
static inline int32_t pm_records_not_fixed(const int32_t * words, int64_t n, int64_t rec, int32_t n_seq_max) {
    uint32_t bad = 0;
    int64_t i = 0;
    if (rec == 3) {
        for (; i + 4 <= n; i += 4) {
            const int32_t * r = words + 3 * i;
            PM_PREFETCH(r + 256);  // 1 KiB ahead: a cold blob's scan is latency-bound
            for (int j = 0; j < 12; j += 3) {
                int32_t p, one, id;
                memcpy(&p, r + j, 4);
                memcpy(&one, r + j + 1, 4);
                memcpy(&id, r + j + 2, 4);
                bad |= pm_record_bad(p, one, id, n_seq_max);
            }
        }
    }
    for (; i < n; i++) {
        const int32_t * r = words + i * rec;
        int32_t p, one, id;
        memcpy(&p, r, 4);
        memcpy(&one, r + 1, 4);
        memcpy(&id, r + rec - 1, 4);
        bad |= pm_record_bad(p, one, id, n_seq_max);
    }
    return bad != 0;
}

#ifdef __cplusplus
extern "C" {
#endif

// PYMEM_CDEF_BEGIN: csrc/gen_cffi.py hands the lines up to PYMEM_CDEF_END to cffi as they
// are, so this block stays plain declarations (no preprocessor lines)
typedef enum {
    PM_OK = 0,
    PM_ERR_ARG = 1,      // a null pointer or negative count
    PM_ERR_RANGE = 2,    // a row, offset or size outside the tensor
    PM_ERR_MISMATCH = 3, // tensors of different type or row size
    PM_ERR_ALLOC = 4,    // ggml could not allocate
    PM_ERR_BACKEND = 5,  // a ggml backend call failed
} pm_status;

int32_t pm_abi_version(void);

// contiguous bytes [offset, offset + size) of a tensor
pm_status pm_tensor_read(const struct ggml_tensor * t, size_t offset, size_t size, void * dst);
pm_status pm_tensor_write(struct ggml_tensor * t, size_t offset, size_t size, const void * src);

// n_chunks pieces of chunk bytes, stride bytes apart, starting at offset; dst/src packed
pm_status pm_tensor_read_strided(const struct ggml_tensor * t, size_t offset, size_t chunk,
                                 size_t stride, int64_t n_chunks, void * dst);
pm_status pm_tensor_write_strided(struct ggml_tensor * t, size_t offset, size_t chunk, size_t stride,
                                  int64_t n_chunks, const void * src);

// n_ranges byte ranges [offsets[i], offsets[i] + sizes[i]) packed back to back in dst/src,
// in index order: one call for a whole fragmented state section (e.g. transposed V runs)
pm_status pm_tensor_read_ranges(const struct ggml_tensor * t, const uint64_t * offsets,
                                const uint64_t * sizes, int64_t n_ranges, void * dst);
pm_status pm_tensor_write_ranges(struct ggml_tensor * t, const uint64_t * offsets, const uint64_t * sizes,
                                 int64_t n_ranges, const void * src);

// rows are units of nb[1] bytes over the whole tensor (all dims above 0 flattened);
// dst/src hold n_rows packed rows in the order of the index array
pm_status pm_rows_read(const struct ggml_tensor * t, const int64_t * rows, int64_t n_rows, void * dst);
pm_status pm_rows_write(struct ggml_tensor * t, const int64_t * rows, int64_t n_rows, const void * src);
pm_status pm_rows_fill(struct ggml_tensor * t, const int64_t * rows, int64_t n_rows, uint8_t value);

// dst row dst_rows[i] = src row src_rows[i]; runs of consecutive indices are moved in one
// device copy (no host round trip when both tensors live in the same device buffer type)
pm_status pm_rows_copy(const struct ggml_tensor * src, const int64_t * src_rows,
                       struct ggml_tensor * dst, const int64_t * dst_rows, int64_t n_rows);

// look up and call the backend's "ggml_backend_set_n_threads" (CPU-like backends only);
// returns PM_ERR_BACKEND when the backend has no such function
pm_status pm_backend_set_n_threads(ggml_backend_t backend, int32_t n_threads);

// repeated runs: bytes [skip, skip + size) of the stream "for r < n_rep: for i < n_runs:
// [offset + r * rep_stride + starts[i], + sizes[i])", packed in dst/src. One call moves a
// whole K/V row section (n_rep 1) or a transposed V section (one repetition per channel);
// skip/size let a file writer stream it in bounded pieces. Every byte is bounds-checked
// before any is copied.
pm_status pm_tensor_read_runs(const struct ggml_tensor * t, size_t offset, int64_t n_rep, size_t rep_stride,
                              const uint64_t * starts, const uint64_t * sizes, int64_t n_runs, size_t skip,
                              size_t size, void * dst);
pm_status pm_tensor_write_runs(struct ggml_tensor * t, size_t offset, int64_t n_rep, size_t rep_stride,
                               const uint64_t * starts, const uint64_t * sizes, int64_t n_runs, size_t skip,
                               size_t size, const void * src);

// the distinct buffer types of the tensors a graph's nodes read and write (each node and its
// sources; a view counts as its view_src), in first-use order: which devices a graph spans
// before it is allocated. Tensors without a buffer yet (inputs, intermediates) are skipped.
// *n_out = the number found; PM_ERR_RANGE when more than cap exist (out holds the first cap)
pm_status pm_graph_buffer_types(struct ggml_cgraph * graph, ggml_backend_buffer_type_t * out, int32_t cap,
                                int32_t * n_out);

// ggml_swiglu_clamp(ctx, a, b, limit) of the process's ggml, looked up at run time (the
// ggml headers pymem may compile against, libggml-python 0.20, do not declare it); NULL
// when this ggml has no such function
struct ggml_tensor * pm_swiglu_clamp(struct ggml_context * ctx, struct ggml_tensor * a,
                                     struct ggml_tensor * b, float limit);

// KQ masks of a decode step (pymem/kv/inputs.py; the numpy evaluation there is the
// reference these equal). elem_size 2 writes float16, 4 float32: 0 where a cell is
// attended, -inf elsewhere. Cells [0, n_kv) of a row; none may be held by several
// sequences (owner is the one sequence, -1 none). lo[t] <= pos <= hi[t] is token t's
// causality and window. owner / pos hold n_cells entries (PM_ERR_RANGE past them).
// rows: token t reads row_off[t] (the first cell of its stream in owner / pos) and
// attends the cells whose owner is seq[t]; out is [n_tokens, n_kv]
pm_status pm_kq_mask_rows(const int32_t * owner, const int32_t * pos, int64_t n_cells, const int64_t * row_off,
                          const int32_t * seq, const int32_t * lo, const int32_t * hi, int64_t n_tokens,
                          int64_t n_kv, int32_t elem_size, void * out);
// one row, any number of tokens per sequence: the tokens of sequence q are
// seq_tok[seq_ptr[q] .. seq_ptr[q + 1]) (seq_ptr: n_seqs + 1 ascending offsets from 0, at
// most n_tokens); cell j pairs with the tokens of its owner, and a cell held by several
// sequences (owner -2), when bits is not NULL, with those of each sequence q of its bitset
// (bits + j * n_words, n_words in [1, 4], 64 * n_words <= n_seqs); token t attends the
// cells with lo[t] <= pos <= hi[t]. out is [n_tokens, n_kv], filled whole. Every list is
// checked before the first write (PM_ERR_RANGE).
pm_status pm_kq_mask_seqs(const int32_t * owner, const int32_t * pos, int64_t n_cells, const int64_t * seq_ptr,
                          const int64_t * seq_tok, int64_t n_seqs, const uint64_t * bits, int64_t n_words,
                          const int32_t * lo, const int32_t * hi, int64_t n_tokens, int64_t n_kv, int32_t elem_size,
                          void * out);
// one row, tokens of distinct sequences: cell j pairs only with token tok_of[owner[j] + 2]
// (-1: none; tok_of has n_tok_of entries, owners -2 and -1 read entries 0 and 1), and a
// cell held by several sequences (owner -2), when bits is not NULL, with the token
// tok_of[q + 2] of each sequence q of its bitset (bits + j * n_words, n_words in [1, 4]);
// out is [n_tokens, n_kv], filled whole
pm_status pm_kq_mask_owner(const int32_t * owner, const int32_t * pos, int64_t n_cells, const int64_t * tok_of,
                           int64_t n_tok_of, const uint64_t * bits, int64_t n_words, const int32_t * lo,
                           const int32_t * hi, int64_t n_tokens, int64_t n_kv, int32_t elem_size, void * out);

// PYMEM_CDEF_END

#ifdef __cplusplus
}
#endif

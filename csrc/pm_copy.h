// pm_copy_bytes: a memcpy that keeps its speed at every offset between its buffers. Its
// own header (no ggml) so that benchmarks/layout_bound.c's least work copies as pymem
// does: a least slowed by an unlucky offset would call a layout bound that is not one.
#ifndef PM_COPY_H
#define PM_COPY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#endif

// memcpy of n bytes between buffers that do not overlap, except for a long copy whose
// destination lies less than 64 bytes past the source modulo 4 KiB. There glibc's x86
// memcpy takes `rep movsb`, which this project's AMD EPYC runs several times slower (8 KiB
// runs 3x, 64 KiB runs 6x), and any forward copy loop stalls too: each load looks like it
// may read the store just before it (the same address bits 0-11, "4K aliasing"). A state
// call's runs all share one such offset (the blob's against the tensor's), so a whole
// call ran up to 4x slower or not, by where the caller's buffer happened to land. Those
// copies go backward, 64 bytes at a time, each block's four loads before its stores:
// no load then follows a store to the same low address bits.
static inline void pm_copy_bytes(void * dst, const void * src, size_t n) {
#if defined(__SSE2__) || defined(_M_X64)
    if (n >= 1024 && (((uintptr_t) dst - (uintptr_t) src) & 4095) < 64) {
        char * d = (char *) dst;
        const char * s = (const char *) src;
        size_t i = n - n % 64;
        memcpy(d + i, s + i, n - i);  // the tail first (under 64 bytes)
        while (i >= 64) {
            i -= 64;
            const __m128i a = _mm_loadu_si128((const __m128i *) (const void *) (s + i));
            const __m128i b = _mm_loadu_si128((const __m128i *) (const void *) (s + i + 16));
            const __m128i c = _mm_loadu_si128((const __m128i *) (const void *) (s + i + 32));
            const __m128i e = _mm_loadu_si128((const __m128i *) (const void *) (s + i + 48));
            _mm_storeu_si128((__m128i *) (void *) (d + i), a);
            _mm_storeu_si128((__m128i *) (void *) (d + i + 16), b);
            _mm_storeu_si128((__m128i *) (void *) (d + i + 32), c);
            _mm_storeu_si128((__m128i *) (void *) (d + i + 48), e);
        }
        return;
    }
#endif
    memcpy(dst, src, n);
}

#endif

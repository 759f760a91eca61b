// cffi declarations of pymem's own C layer (see pymem_native.h for the contracts).

typedef enum {
    PM_OK = 0,
    PM_ERR_ARG = 1,
    PM_ERR_RANGE = 2,
    PM_ERR_MISMATCH = 3,
    PM_ERR_ALLOC = 4,
    PM_ERR_BACKEND = 5,
} pm_status;

int32_t pm_abi_version(void);
pm_status pm_tensor_read(const struct ggml_tensor * t, size_t offset, size_t size, void * dst);
pm_status pm_tensor_write(struct ggml_tensor * t, size_t offset, size_t size, const void * src);
pm_status pm_tensor_read_strided(const struct ggml_tensor * t, size_t offset, size_t chunk,
                                 size_t stride, int64_t n_chunks, void * dst);
pm_status pm_tensor_write_strided(struct ggml_tensor * t, size_t offset, size_t chunk, size_t stride,
                                  int64_t n_chunks, const void * src);
pm_status pm_tensor_read_ranges(const struct ggml_tensor * t, const uint64_t * offsets,
                                const uint64_t * sizes, int64_t n_ranges, void * dst);
pm_status pm_tensor_write_ranges(struct ggml_tensor * t, const uint64_t * offsets, const uint64_t * sizes,
                                 int64_t n_ranges, const void * src);
pm_status pm_rows_read(const struct ggml_tensor * t, const int64_t * rows, int64_t n_rows, void * dst);
pm_status pm_rows_write(struct ggml_tensor * t, const int64_t * rows, int64_t n_rows, const void * src);
pm_status pm_rows_fill(struct ggml_tensor * t, const int64_t * rows, int64_t n_rows, uint8_t value);
pm_status pm_rows_copy(const struct ggml_tensor * src, const int64_t * src_rows,
                       struct ggml_tensor * dst, const int64_t * dst_rows, int64_t n_rows);
pm_status pm_backend_set_n_threads(ggml_backend_t backend, int32_t n_threads);

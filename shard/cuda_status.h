/* The CUDA runtime's and cuBLAS's error codes as uc_status, for the host code of the CUDA build
 * (the backend, its products and the data planes): CU(expr) and BLAS(expr) are UC_OK, or the
 * error logged with the expression and where it failed (UC_ERR_DEVICE_NOMEM for an allocation,
 * else UC_ERR_CUDA). */
#ifndef UC_SHARD_CUDA_STATUS_H
#define UC_SHARD_CUDA_STATUS_H

#include <cublas_api.h>
#include <cuda_runtime.h>

#include "base/status.h"

static inline uc_status uc_cuda_status(cudaError_t e, const char *expr, const char *file,
                                       int line, const char *func)
{
    if (e == cudaSuccess) {
        return UC_OK;
    }
    uc_status st = e == cudaErrorMemoryAllocation ? UC_ERR_DEVICE_NOMEM : UC_ERR_CUDA;
    return uc_error_at(st, file, line, func, "%s: %s (%s)", expr, cudaGetErrorName(e),
                       cudaGetErrorString(e));
}
#define CU(e) uc_cuda_status((e), #e, __FILE__, __LINE__, __func__)

static inline uc_status uc_cublas_status(cublasStatus_t s, const char *expr, const char *file,
                                         int line, const char *func)
{
    if (s == CUBLAS_STATUS_SUCCESS) {
        return UC_OK;
    }
    uc_status st = s == CUBLAS_STATUS_ALLOC_FAILED ? UC_ERR_DEVICE_NOMEM : UC_ERR_CUDA;
    return uc_error_at(st, file, line, func, "%s: %s", expr, cublasGetStatusString(s));
}
#define BLAS(e) uc_cublas_status((e), #e, __FILE__, __LINE__, __func__)

#endif

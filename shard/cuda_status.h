/* The CUDA runtime's error codes as uc_status, for the host code of the CUDA build (the
 * backend and the data planes): CU(expr) is UC_OK, or the error logged with the expression and
 * where it failed (UC_ERR_DEVICE_NOMEM for an allocation, else UC_ERR_CUDA). */
#ifndef UC_SHARD_CUDA_STATUS_H
#define UC_SHARD_CUDA_STATUS_H

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

#endif

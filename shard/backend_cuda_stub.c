/* Built when UC_CUDA is OFF: the CUDA backend is refused at run time, so model.c needs no
 * #ifdef and a CPU-only build links. */
#include "backend.h"
#include "comm_nccl.h"
#include "comm_staged.h"

uc_status uc_backend_cuda_create(struct uc_backend **out, const struct uc_backend_params *p)
{
    *out = NULL;
    return UC_ERRF(UC_ERR_UNSUPPORTED,
                   "backend=cuda: this build has no CUDA support (configure with -DUC_CUDA=ON)");
}

int uc_backend_cuda_device_count(void) { return 0; }

uc_status uc_comm_nccl_attach(struct uc_comm *c, int device)
{
    (void)c;
    (void)device;
    return UC_ERRF(UC_ERR_UNSUPPORTED, "NCCL: this build has no CUDA support");
}

uc_status uc_comm_staged_attach(struct uc_comm *c, int device)
{
    (void)c;
    (void)device;
    return UC_ERRF(UC_ERR_UNSUPPORTED, "staged data plane: this build has no CUDA support");
}

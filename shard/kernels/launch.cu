/* The switch for programmatic dependent launches (uck_launch in common.cuh), set once by the
 * backend for the device it drives. */
#include "common.cuh"

static bool pdl_on;

extern "C" void uc_cuda_set_pdl(int on) { pdl_on = on != 0; }

bool uck_pdl_enabled(void) { return pdl_on; }

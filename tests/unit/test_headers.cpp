// Every public header of the engine and the compression library compiles as C++ (the CUDA
// kernels and any C++ embedder include them), and a few calls through them behave.
#include "backend.h"
#include "base/log.h"
#include "base/mem.h"
#include "base/shapes.h"
#include "base/status.h"
#include "base/util.h"
#include "comm.h"
#include "comm_nccl.h"
#include "compress/entropy.h"
#include "compress/policy.h"
#include "compress/profile.h"
#include "compress/select.h"
#include "engine.h"
#include "kv_cache.h"
#include "model.h"
#include "model_config.h"
#include "safetensors.h"
#include "sampler.h"
#include "tokenizer.h"

#include <cstdio>
#include <cstring>

int main()
{
    // a few real calls through the C++ front end, checked
    struct uc_compress_params p = uc_compress_default_params();
    enum uc_policy policy_value = UC_POLICY_UNCOMP;
    int fails = 0;
    fails += std::strcmp(uc_policy_name(policy_value), "uncomp") != 0;
    fails += p.window != 8;
    fails += uc_group_budget(384, 1, 2, 1.0f / 3.0f) != 512;
    fails += uc_round_half_up(2.5) != 3;
    std::printf("%s: C++ view of the public headers\n", fails ? "FAILED" : "PASSED");
    return fails;
}

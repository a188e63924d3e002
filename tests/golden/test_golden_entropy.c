/* Matrix entropy against the golden spectra: for every golden prompt of both fixtures, the
 * truncated entropy (k = d/4 and k = d) of every layer's query heads and input hidden states,
 * computed by the engine (post-RoPE queries, covariance, LAPACK eigensolver), equals the value
 * derived from golden.json's spectra within 1e-6. Runs at any tp under mpirun (query heads are
 * computed on the rank that owns them and gathered). Usage: test_golden_entropy SHARED_DIR */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/mem.h"
#include "comm.h"
#include "compress/entropy.h"
#include "engine.h"
#include "test_util.h"

#define TOL 1e-6

static double spectrum_entropy(const cJSON *spec, int64_t k)
{
    int64_t d = cJSON_GetArraySize(spec);
    double eig[8192];
    for (int64_t i = 0; i < d && i < 8192; i++) {
        eig[i] = cJSON_GetArrayItem(spec, (int)i)->valuedouble;
    }
    return uc_entropy_truncated(eig, d, k);
}

static void check_model(struct uc_engine *e, const char *model, const cJSON *gold)
{
    const struct uc_model_config *cfg = uc_engine_config(e);
    int64_t d = cfg->head_dim, c = cfg->hidden;
    const cJSON *p;
    cJSON_ArrayForEach(p, cJSON_GetObjectItem(gold, "prompts"))
    {
        int64_t n;
        int32_t *ids = tu_json_ints(cJSON_GetObjectItem(p, "ids"), &n);
        TU_CHECK(tu_prefill(e, 3, ids, n, UC_SEQ_SPECTRA, NULL, 1) == UC_OK, "prefill");
        double qerr = 0, herr = 0;
        int64_t checked = 0;
        const cJSON *qs = cJSON_GetObjectItem(p, "query_spectra");
        const cJSON *hs = cJSON_GetObjectItem(p, "hidden_spectra");
        for (int64_t l = 0; l < cfg->n_layers; l++) {
            int64_t ks[2] = {uc_entropy_default_k(d), d};
            for (int64_t h = 0; h < cfg->n_heads; h++) {
                const double *ours = uc_engine_seq_query_spectrum(e, 3, l, h);
                const cJSON *want = cJSON_GetArrayItem(cJSON_GetArrayItem(qs, (int)l), (int)h);
                for (int i = 0; i < 2; i++) {
                    double err = fabs(uc_entropy_truncated(ours, d, ks[i]) -
                                      spectrum_entropy(want, ks[i]));
                    qerr = err > qerr ? err : qerr;
                    checked++;
                }
            }
            int64_t kh[2] = {uc_entropy_default_k(c), c};
            const double *hours = uc_engine_seq_hidden_spectrum(e, 3, l);
            for (int i = 0; i < 2; i++) {
                double err = fabs(uc_entropy_truncated(hours, c, kh[i]) -
                                  spectrum_entropy(cJSON_GetArrayItem(hs, (int)l), kh[i]));
                herr = err > herr ? err : herr;
                checked++;
            }
        }
        const char *name = cJSON_GetObjectItem(p, "name")->valuestring;
        TU_CHECK(qerr <= TOL, "%s/%s: query-head entropy error %.2e", model, name, qerr);
        TU_CHECK(herr <= TOL, "%s/%s: hidden-state entropy error %.2e", model, name, herr);
        printf("%-12s %-14s entropies=%-4lld max_err query=%.1e hidden=%.1e %s\n", model, name,
               (long long)checked, qerr, herr, tu_failures ? "FAIL" : "ok");
        tu_free(e, 3);
        uc_free(ids);
    }
}

int main(int argc, char **argv)
{
    struct uc_comm *comm = NULL;
    if (uc_comm_create(&comm, &argc, &argv, 120000) != UC_OK) {
        return 1;
    }
    const char *shared = tu_shared_dir(argc, argv);
    const char *models[] = {"stories260K", "uncomp-tiny"};
    for (int mi = 0; mi < 2; mi++) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", tu_model_dir(shared, models[mi]));
        struct uc_engine_params ep = uc_engine_default_params();
        ep.model_dir = dir;
        ep.kv_memory_bytes = 32 << 20;
        ep.backend = tu_backend_params();
        struct uc_engine *e = NULL;
        if (uc_engine_create(&e, &ep, comm) != UC_OK) {
            uc_comm_abort(comm, 1);
        }
        if (uc_comm_rank(comm) != 0) {
            uc_engine_serve(e);
        } else {
            char path[4200];
            snprintf(path, sizeof path, "%s/golden.json", dir);
            cJSON *gold = tu_json_load(path);
            check_model(e, models[mi], gold);
            cJSON_Delete(gold);
            uc_engine_shutdown(e);
        }
        uc_engine_destroy(e);
    }
    int failures = tu_failures;
    if (uc_comm_rank(comm) == 0) {
        printf("%s: %d failure(s) at tp=%d\n", failures ? "FAILED" : "PASSED", failures,
               uc_comm_size(comm));
    }
    uc_comm_destroy(comm);
    return failures ? 1 : 0;
}

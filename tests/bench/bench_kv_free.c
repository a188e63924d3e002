/* bench_kv_free: the host time of ending sequences' KV caches (uc_kv_seq_fini), the work of a
 * step that frees a batch ended together (workload b of issue 11: 32 sequences of 8,320 tokens,
 * 32 layers x 8 KV heads, 4.3M blocks, took 9.8 ms on the GPU host). Takes the blocks as a
 * prefill does (a layer's heads at once), frees every sequence, and prints the median of the
 * rounds in ms and ns a block at each OpenMP thread count asked.
 *
 * Usage: bench_kv_free [--seqs 16] [--tokens 8320] [--layers 32] [--heads 8] [--rounds 7]
 *                      [--threads 1,2]
 * (head_dim 8 keeps the pool small: the cost is the block tables', not the K/V's) */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "base/util.h"
#include "kv_cache.h"

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int seqs = 16, tokens = 8320, layers = 32, heads = 8, rounds = 7;
    const char *threads = "1,2";
    for (int i = 1; i + 1 < argc; i += 2) {
        int v = atoi(argv[i + 1]);
        if (!strcmp(argv[i], "--seqs")) {
            seqs = v;
        } else if (!strcmp(argv[i], "--tokens")) {
            tokens = v;
        } else if (!strcmp(argv[i], "--layers")) {
            layers = v;
        } else if (!strcmp(argv[i], "--heads")) {
            heads = v;
        } else if (!strcmp(argv[i], "--rounds")) {
            rounds = v;
        } else if (!strcmp(argv[i], "--threads")) {
            threads = argv[i + 1];
        } else {
            fprintf(stderr, "bench_kv_free: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (seqs < 1 || tokens < 1 || layers < 1 || heads < 1 || rounds < 1 || argc % 2 == 0) {
        fprintf(stderr, "usage: bench_kv_free [--seqs N] [--tokens N] [--layers N] [--heads N] "
                        "[--rounds N] [--threads A,B,...]\n");
        return 2;
    }
    struct uc_backend *be = NULL;
    struct uc_backend_params bp = uc_backend_default_params();
    if (uc_backend_create(&be, &bp) != UC_OK) {
        return 1;
    }
    const int64_t per = (tokens + 15) / 16, blocks = (int64_t)seqs * layers * heads * per;
    struct uc_kv_cache kv;
    if (uc_kv_cache_init(&kv, be, blocks, 16, 8) != UC_OK) {
        fprintf(stderr, "bench_kv_free: a pool of %lld blocks\n", (long long)blocks);
        return 1;
    }
    struct uc_kv_seq *s = calloc((size_t)seqs, sizeof *s);
    double *ms = calloc((size_t)rounds, sizeof *ms);
    if (!s || !ms) {
        return 1;
    }
    printf("bench_kv_free: %d sequences x %d tokens x %d layers x %d KV heads = %lld blocks\n",
           seqs, tokens, layers, heads, (long long)blocks);
    for (const char *p = threads; *p;) {
        char *end;
        long t = strtol(p, &end, 10);
        if (t < 1 || end == p) {
            fprintf(stderr, "bench_kv_free: --threads takes counts separated by commas\n");
            return 2;
        }
        omp_set_num_threads((int)t);
        for (int r = -1; r < rounds; r++) { /* round -1 warms the pool and the threads up */
            for (int q = 0; q < seqs; q++) {
                if (uc_kv_seq_init(&s[q], layers, heads) != UC_OK) {
                    return 1;
                }
                for (int64_t i = 0; i < (int64_t)layers * heads; i++) {
                    if (uc_kv_head_reserve(&kv, &s[q].heads[i], tokens) != UC_OK) {
                        return 1;
                    }
                }
            }
            double t0 = uc_time_s();
            for (int q = 0; q < seqs; q++) {
                uc_kv_seq_fini(&kv, &s[q]);
            }
            if (r >= 0) {
                ms[r] = (uc_time_s() - t0) * 1e3;
            }
        }
        qsort(ms, (size_t)rounds, sizeof *ms, cmp_d);
        printf("threads %2ld: free median %.2f ms (%.2f ns a block), fastest %.2f, slowest %.2f\n",
               t, ms[rounds / 2], ms[rounds / 2] * 1e6 / (double)blocks, ms[0], ms[rounds - 1]);
        p = *end == ',' ? end + 1 : end;
    }
    free(ms);
    free(s);
    uc_kv_cache_fini(&kv);
    uc_backend_destroy(be);
    return 0;
}

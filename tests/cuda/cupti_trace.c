/* A profiling aid for the device machine (which has no Nsight Systems): preloaded into a CUDA
 * program, it records the start and end of every kernel (graph nodes included) and memory copy
 * with CUPTI and writes them as CSV (start_ns,end_ns,kind,name) to $UC_TRACE_OUT at exit.
 * tests/cuda/trace_steps.py summarises decode steps from it. Build and use:
 *   gcc -O2 -shared -fPIC -I/usr/local/cuda/include tests/cuda/cupti_trace.c \
 *       -L<dir of libcupti.so> -lcupti -o /tmp/cupti_trace.so
 *   UC_TRACE_OUT=/tmp/t.csv LD_PRELOAD=/tmp/cupti_trace.so build/tests/bench/bench_gpu ... */
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#define TRACE_BUF_BYTES (16u << 20)

static FILE *trace_out;

static void CUPTIAPI buffer_requested(uint8_t **buf, size_t *size, size_t *max_records)
{
    *buf = aligned_alloc(8, TRACE_BUF_BYTES);
    *size = *buf ? TRACE_BUF_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size,
                                      size_t valid)
{
    CUpti_Activity *r = NULL;
    (void)ctx;
    (void)stream;
    (void)size;
    while (trace_out && cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
        if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)r;
            fprintf(trace_out, "%llu,%llu,kernel,%s\n", (unsigned long long)k->start,
                    (unsigned long long)k->end, k->name);
        } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)r;
            fprintf(trace_out, "%llu,%llu,memcpy,memcpy_kind%d_%llu\n",
                    (unsigned long long)m->start, (unsigned long long)m->end, (int)m->copyKind,
                    (unsigned long long)m->bytes);
        }
    }
    free(buf);
}

__attribute__((constructor)) static void trace_init(void)
{
    const char *path = getenv("UC_TRACE_OUT");
    if (!path || !(trace_out = fopen(path, "w"))) {
        return;
    }
    fprintf(trace_out, "start,end,kind,name\n");
    cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
}

__attribute__((destructor)) static void trace_fini(void)
{
    if (trace_out) {
        cuptiActivityFlushAll(1);
        fclose(trace_out);
        trace_out = NULL;
    }
}

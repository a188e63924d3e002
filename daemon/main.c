/* uncompd: every rank runs this binary. All ranks parse the same options, agree on them, and load
 * their slice of the model; ranks > 0 then serve engine steps until shutdown, while rank 0 runs
 * the scheduler on this thread and either the gRPC server (daemon mode) or one request
 * (one-shot mode, --prompt). SIGTERM drains: no new requests, in-flight ones finish up to
 * --drain-timeout, then every rank exits 0. Usage errors exit 2. */
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "daemon.h"
#include "engine.h"
#include "front.h"
#include "metrics.h"
#include "sched.h"
#include "tokenizer.h"
#ifdef UC_HAVE_GRPC
#include "server.h"
#endif

#define UC_VERSION "0.1.0"

/* ---- options ---------------------------------------------------------------------------- */

uc_status uc_config_compress(const struct uc_config *c, int64_t n_layers,
                             struct uc_compress_params *out, char *msg, size_t msg_size)
{
    struct uc_compress_params p = uc_compress_default_params();
    char pmsg[400];
    if (uc_policy_spec_parse(c->policy, &p, pmsg, sizeof pmsg) != UC_OK) {
        snprintf(msg, msg_size, "--%s", pmsg);
        return UC_ERR_INVALID_ARG;
    }
    if (!uc_decode_mode_parse(c->decode_mode, &p.decode_mode)) {
        snprintf(msg, msg_size, "--decode-mode=%s must be append or evict", c->decode_mode);
        return UC_ERR_INVALID_ARG;
    }
    if (!uc_grouping_parse(c->grouping, &p.grouping)) {
        snprintf(msg, msg_size, "--grouping=%s must be profile or prompt", c->grouping);
        return UC_ERR_INVALID_ARG;
    }
    enum uc_row_score rs;
    if (!uc_row_score_parse(c->row_score, &rs)) {
        snprintf(msg, msg_size, "--row-score=%s must be sum, max, accum or accum-max",
                 c->row_score);
        return UC_ERR_INVALID_ARG;
    }
    p.row_score = (int32_t)rs;
    p.kv_budget = (int32_t)c->kv_budget;
    p.window = (int32_t)c->window;
    p.pool_kernel = (int32_t)c->pool_kernel;
    p.sink_tokens = (int32_t)c->sink_tokens;
    p.head_groups = (int32_t)c->head_groups;
    p.spread = (float)c->spread;
    p.r_min = (float)c->r_min;
    p.think_ratio = (float)c->think_ratio; /* used with a +think policy */
    /* used with a +minicache policy; gamma 0 asks for none retained */
    p.minicache_t = (float)c->minicache_t;
    p.minicache_gamma = c->minicache_gamma > 0.0 ? (float)c->minicache_gamma : -1.0f;
    p.minicache_start = (int32_t)c->minicache_start;
    p.lorc_ratio = (float)c->lorc_ratio;   /* used with a +lorc policy */
    const char *sp = c->stage_starts;
    while (*sp) {
        char *end;
        long v = strtol(sp, &end, 10);
        if (end == sp || p.n_stage_starts >= UC_MAX_STAGES - 1) {
            snprintf(msg, msg_size, "--stage-starts=%s must be a comma-separated list of layers",
                     c->stage_starts);
            return UC_ERR_INVALID_ARG;
        }
        p.stage_starts[p.n_stage_starts++] = (int32_t)v;
        sp = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') {
            snprintf(msg, msg_size, "--stage-starts=%s must be a comma-separated list of layers",
                     c->stage_starts);
            return UC_ERR_INVALID_ARG;
        }
    }
    uc_status rc = uc_compress_params_validate(&p, n_layers, msg, msg_size);
    if (rc == UC_OK) {
        *out = p;
    }
    return rc;
}

/* The bundled model when --model is not given: next to the binary, in the source tree or an
 * installed share folder. */
static char *default_model_dir(void)
{
    const char *env = getenv("UNCOMP_MODEL");
    if (env && env[0]) {
        return uc_strdup(env);
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
        }
        const char *rel[] = {"/../models/uncomp-tiny", "/../../models/uncomp-tiny",
                             "/../share/uncomp/models/uncomp-tiny"};
        for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
            char cand[PATH_MAX + 64];
            snprintf(cand, sizeof cand, "%s%s/config.json", exe, rel[i]);
            if (uc_file_exists(cand)) {
                cand[strlen(cand) - strlen("/config.json")] = '\0';
                char *real = realpath(cand, NULL);
                char *out = uc_strdup(real ? real : cand);
                free(real);
                return out;
            }
        }
    }
    return uc_strdup("models/uncomp-tiny");
}

/* ---- signals and drain ------------------------------------------------------------------ */

struct daemon {
    struct uc_config cfg;
    struct uc_comm *comm;
    struct uc_engine *engine;
    struct uc_tokenizer *tok;
    struct metrics *metrics;
    struct uc_sched *sched;
    struct uc_front *front; /* API keys, chat template, the OpenAI HTTP front */
#ifdef UC_HAVE_GRPC
    struct uc_server *server;
#endif
    pthread_t sig_thread;
    bool sig_thread_started;
    char bundled_calib[4096]; /* calibration.txt of the bundled model, when a model has none */
#ifdef UC_HAVE_GRPC
    struct uc_cluster_info cluster; /* every rank's host, device and memory (rank 0) */
#endif
};

#ifdef UC_HAVE_GRPC
static int front_state(void *user)
{
    const struct daemon *d = user;
    enum uc_server_state st = d->server ? uc_server_get_state(d->server) : UC_SERVER_LOADING;
    return st == UC_SERVER_SERVING ? 1 : st == UC_SERVER_LOADING ? 0 : 2;
}

static void on_drained(void *user)
{
    struct daemon *d = user;
    uc_sched_stop(d->sched);
}

#endif

static void *signal_thread(void *arg)
{
    struct daemon *d = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1); /* internal: wake up to exit */
    int n_term = 0;
    for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0 || sig == SIGUSR1) {
            return NULL;
        }
        n_term++;
        if (n_term > 1) {
            UC_LOG_WARN("uncompd: second signal %d: stopping now", sig);
            uc_sched_stop(d->sched);
            continue;
        }
        UC_LOG_NOTICE("uncompd: signal %d: draining (up to %lld ms)", sig,
                      (long long)d->cfg.drain_timeout_ms);
#ifdef UC_HAVE_GRPC
        if (d->server) {
            uc_server_drain(d->server);
            continue;
        }
#endif
        uc_sched_stop(d->sched);
    }
}

#ifdef UC_HAVE_GRPC
static void write_config_info(void *user, struct uc_buf *b)
{
    const struct daemon *d = user;
    uc_config_write_info(&d->cfg, b);
}

/* ---- start-up --------------------------------------------------------------------------- */

/* Every rank reports host, device and memory; rank 0 keeps the table. Collective. */
static uc_status gather_cluster(struct daemon *d, struct uc_cluster_info *ci)
{
    int r = uc_comm_size(d->comm);
    struct uc_rank_info mine = {.rank = uc_comm_rank(d->comm)};
    snprintf(mine.host, sizeof mine.host, "%s", uc_comm_host(d->comm));
    snprintf(mine.device, sizeof mine.device, "%s", uc_engine_backend(d->engine)->device_name);
    mine.weight_bytes = uc_engine_weight_bytes(d->engine);
    mine.kv_bytes = (uint64_t)uc_engine_kv_blocks_total(d->engine) *
                    (uint64_t)uc_engine_kv_block_tokens(d->engine) *
                    uc_engine_kv_bytes_per_token(d->engine);
    ci->tp_size = r;
    ci->ranks = uc_calloc((size_t)r, sizeof *ci->ranks);
    if (!ci->ranks) {
        return UC_ERRF(UC_ERR_NOMEM, "cluster info");
    }
    return uc_comm_allgather(d->comm, &mine, ci->ranks, sizeof mine);
}

/* A one-token forward on every rank before health turns SERVING. */
static uc_status warm_up(struct uc_engine *e)
{
    int32_t tok = 0;
    struct uc_step_new n = {.seq_id = -1000, .max_new_tokens = 1,
                            .cp = uc_compress_default_params(), .n_prompt = 1, .prompt = &tok};
    struct uc_step_prefill pf = {.seq_id = -1000};
    struct uc_step s = {.op = UC_STEP_RUN, .n_new = 1, .news = &n, .n_prefill = 1,
                        .prefills = &pf};
    uc_status rc = uc_engine_step(e, &s);
    int64_t id = -1000;
    struct uc_step f = {.op = UC_STEP_RUN, .n_free = 1, .frees = &id};
    return rc == UC_OK ? uc_engine_step(e, &f) : rc;
}
#endif

static int run_rank0(struct daemon *d)
{
    const struct uc_config *c = &d->cfg;
    char msg[512];
    uc_status rc;
    struct uc_sched_params sp = uc_sched_default_params();
    int64_t n_layers = uc_engine_config(d->engine)->n_layers;
    rc = uc_config_compress(c, n_layers, &sp.default_compress, msg, sizeof msg);
    if (rc == UC_OK && 2 * c->minicache_pairs > n_layers) {
        snprintf(msg, sizeof msg, "--minicache-pairs=%lld: the model's %lld layers hold at most "
                 "%lld disjoint pairs", (long long)c->minicache_pairs, (long long)n_layers,
                 (long long)(n_layers / 2));
        rc = UC_ERR_INVALID_ARG;
    }
    if (rc != UC_OK) {
        fprintf(stderr, "uncompd: %s\n", msg);
        uc_engine_shutdown(d->engine);
        return 2;
    }
    sp.max_queued_requests = (int32_t)c->max_queued_requests;
    sp.max_queued_tokens = c->max_queued_tokens;
    sp.max_running = (int32_t)c->max_running;
    bool gpu = uc_engine_backend(d->engine)->kind == UC_BACKEND_CUDA;
    sp.prefill_step_tokens = c->prefill_step_tokens > 0 ? c->prefill_step_tokens
                             : gpu                      ? 65536
                                                        : 2048;
    sp.prefill_memory = c->prefill_memory;
    (void)uc_schedule_parse(c->schedule, &sp.schedule); /* uc_config_validate checked it */
    sp.max_decode_wait_ms = c->max_decode_wait_ms;
    sp.step_trace_path = c->step_trace[0] ? c->step_trace : NULL;
    sp.default_max_tokens = (int32_t)c->default_max_tokens;
    sp.max_tokens_limit = (int32_t)c->max_tokens_limit;
    sp.max_stop_strings = (int32_t)c->max_stop_strings;
    sp.heartbeat_ms = c->heartbeat_ms;
    sp.calib_text_path = c->calibration_text[0] ? c->calibration_text : NULL;
    sp.calib_fallback_path = d->bundled_calib;
    sp.calib_window_tokens = (int32_t)c->calib_window;
    sp.calib_max_windows = (int32_t)c->calib_windows;
    sp.calib_max_text_bytes = (size_t)c->calib_max_text_bytes;
    sp.kvsharer = uc_kvsharer_default_params();
    sp.kvsharer.ratio = c->kvsharer_layers;
    sp.kvsharer.threshold = c->kvsharer_threshold;
    sp.kvsharer_window = (int32_t)c->kvsharer_window;
    sp.minicache_pairs = (int32_t)c->minicache_pairs;
    sp.minicache_window = (int32_t)c->minicache_window;
    rc = uc_tokenizer_create(&d->tok, uc_engine_model_dir(d->engine));
    if (rc == UC_OK && uc_tokenizer_vocab_size(d->tok) > uc_engine_config(d->engine)->vocab) {
        /* an id past the embedding rows would read outside the table at the first prompt */
        rc = UC_ERRF(UC_ERR_FORMAT, "dir=%s tokenizer.json has token ids up to %lld but the "
                     "model (config.json vocab_size) has %lld embedding rows",
                     uc_engine_model_dir(d->engine),
                     (long long)uc_tokenizer_vocab_size(d->tok) - 1,
                     (long long)uc_engine_config(d->engine)->vocab);
    }
    if (rc == UC_OK) {
        rc = metrics_create(&d->metrics);
    }
    if (rc == UC_OK) {
        rc = uc_sched_create(&d->sched, &sp, d->engine, d->tok, d->metrics);
    }
    if (rc != UC_OK) {
        fprintf(stderr, "uncompd: start-up failed: %s\n", uc_status_str(rc));
        uc_engine_shutdown(d->engine);
        return 1;
    }
    if (c->prompt[0] || c->prompt_file[0]) {
        return uc_oneshot_run(d->sched, c, d->tok);
    }
    rc = uc_front_create(&d->front, c, uc_engine_model_dir(d->engine), msg, sizeof msg);
    if (rc != UC_OK) {
        fprintf(stderr, "uncompd: %s\n", msg);
        uc_sched_stop(d->sched);
        uc_sched_run(d->sched);
        return rc == UC_ERR_NOMEM ? 1 : 2;
    }
    metrics_set_model_name(d->metrics, uc_front_model_name(d->front));
#ifdef UC_HAVE_GRPC
    struct uc_cluster_info ci = d->cluster;
    snprintf(ci.version, sizeof ci.version, "%s", UC_VERSION);
    snprintf(ci.backend, sizeof ci.backend, "%s", c->backend);
    snprintf(ci.model_path, sizeof ci.model_path, "%s", uc_engine_model_dir(d->engine));
    snprintf(ci.build, sizeof ci.build, "backend=%s tp=%d mpi=%s", c->backend,
             uc_comm_size(d->comm), "Open MPI");
    struct uc_server_params srv = {
        .listen = c->listen,
        .tls_cert = c->tls_cert[0] ? c->tls_cert : NULL,
        .tls_key = c->tls_key[0] ? c->tls_key : NULL,
        .metrics_port = (int)c->metrics_port,
        .max_message_bytes = c->max_message_bytes,
        .drain_timeout_ms = c->drain_timeout_ms,
        .sched = d->sched,
        .metrics = d->metrics,
        .engine = d->engine,
        .tok = d->tok,
        .cluster = &ci,
        .auth = uc_front_auth(d->front),
        .chat = uc_front_chat(d->front),
        .send_trace_path = c->send_trace[0] ? c->send_trace : NULL,
        .write_config_info = write_config_info,
        .config_user = d,
        .on_drained = on_drained,
        .drained_user = d,
    };
    rc = uc_server_create(&d->server, &srv);
    if (rc == UC_OK) {
        const struct uc_model_config *mc = uc_engine_config(d->engine);
        rc = uc_front_start_http(d->front, c, d->sched, d->tok, d->metrics, mc->vocab,
                                 mc->n_layers, uc_engine_max_ctx(d->engine), front_state, d);
    }
    if (rc == UC_OK) {
        rc = warm_up(d->engine);
    }
    int code = 0;
    if (rc != UC_OK) {
        fprintf(stderr, "uncompd: start-up failed: %s\n", uc_status_str(rc));
        uc_sched_stop(d->sched);
        code = 1;
    } else {
        uc_server_set_state(d->server, UC_SERVER_SERVING);
        UC_LOG_NOTICE("uncompd: serving %s on %s (tp=%d, backend=%s)",
                      uc_engine_model_dir(d->engine), c->listen, uc_comm_size(d->comm),
                      c->backend);
    }
    if (uc_sched_run(d->sched) != UC_OK) {
        code = 1;
    }
    uc_front_destroy(d->front); /* every request has ended: no connection waits */
    d->front = NULL;
    if (d->server) {
        uc_server_set_state(d->server, UC_SERVER_STOPPED);
        uc_server_destroy(d->server);
        d->server = NULL;
    }
    return code;
#else
    fprintf(stderr, "uncompd: this build has no gRPC server (configure with gRPC and protobuf-c "
                    "installed); only the one-shot mode (--prompt) is available\n");
    uc_sched_stop(d->sched);
    uc_sched_run(d->sched);
    return 2;
#endif
}

int main(int argc, char **argv)
{
    struct daemon d;
    memset(&d, 0, sizeof d);
    char msg[512];
    bool help = false, list = false;
    /* signals go to the signal thread only; ranks > 0 leave them to rank 0's drain */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--version") == 0) {
            printf("uncompd %s\n", UC_VERSION);
            return 0;
        }
    }
    uc_status rc = uc_config_load(&d.cfg, argc, argv, msg, sizeof msg, &help, &list);
    if (rc != UC_OK) {
        fprintf(stderr, "uncompd: %s\n", msg);
        uc_config_fini(&d.cfg);
        return 2;
    }
    if (help || list) {
        struct uc_buf b;
        uc_buf_init(&b);
        if (help) {
            uc_config_write_help(&b);
            uc_buf_printf(&b,
                          "\nOther:\n"
                          "  %-30s this help\n"
                          "  %-30s the option names, one a line\n"
                          "  %-30s print the version (uncompd %s) and exit\n",
                          "--help, -h", "--list-options", "--version", UC_VERSION);
        } else {
            for (const struct uc_cfg_option *o = uc_config_options(); o->name; o++) {
                uc_buf_printf(&b, "%s\n", o->name);
            }
        }
        fputs(b.data, stdout);
        uc_buf_fini(&b);
        uc_config_fini(&d.cfg);
        return 0;
    }
    enum uc_log_level lvl;
    if (!uc_log_level_parse(d.cfg.log_level, &lvl)) {
        fprintf(stderr, "uncompd: --log-level=%s must be error, warn, notice, info or debug\n",
                d.cfg.log_level);
        uc_config_fini(&d.cfg);
        return 2;
    }
    bool oneshot = d.cfg.prompt[0] || d.cfg.prompt_file[0];
    uc_log_set_level(oneshot && lvl == UC_LOG_LEVEL_NOTICE ? UC_LOG_LEVEL_WARN : lvl);
    char *bundled = default_model_dir();
    snprintf(d.bundled_calib, sizeof d.bundled_calib, "%s/calibration.txt",
             bundled ? bundled : "models/uncomp-tiny");
    if (!d.cfg.model[0]) {
        uc_free(d.cfg.model);
        d.cfg.model = bundled;
    } else {
        uc_free(bundled);
    }
    rc = uc_comm_create(&d.comm, &argc, &argv, d.cfg.comm_timeout_ms);
    if (rc != UC_OK) {
        fprintf(stderr, "uncompd: MPI start-up failed\n");
        uc_config_fini(&d.cfg);
        return 1;
    }
    int rank = uc_comm_rank(d.comm), world = uc_comm_size(d.comm);
    int code = 0;
    rc = uc_config_validate(&d.cfg, world, msg, sizeof msg);
    if (rc != UC_OK) {
        if (rank == 0) {
            fprintf(stderr, "uncompd: %s\n", msg);
        }
        code = 2;
        goto out;
    }
    int same = 1;
    rc = uc_comm_agree_u64(d.comm, uc_config_hash(&d.cfg), "configuration", &same);
    if (rc != UC_OK || !same) {
        if (rank == 0) {
            fprintf(stderr, "uncompd: ranks were started with different options\n");
        }
        code = 2;
        goto out;
    }
    if (rank == 0 && !oneshot) {
        struct uc_buf b;
        uc_buf_init(&b);
        uc_config_write_table(&d.cfg, &b);
        UC_LOG_NOTICE("uncompd %s: effective configuration:\n%s", UC_VERSION, b.data);
        uc_buf_fini(&b);
    }
    struct uc_engine_params ep = uc_engine_default_params();
    ep.model_dir = d.cfg.model;
    uc_backend_parse(d.cfg.backend, &ep.backend.kind);
    ep.backend.device_index = (int)d.cfg.device;
    ep.backend.fp32 = d.cfg.fp32;
    ep.kv_memory_bytes = d.cfg.kv_memory;
    ep.block_tokens = d.cfg.kv_block_tokens;
    /* a GPU wants long products (an 8K-row layer in one pass); 512 rows suit a CPU's caches */
    bool gpu = ep.backend.kind == UC_BACKEND_CUDA;
    ep.prefill_chunk = d.cfg.prefill_chunk > 0 ? d.cfg.prefill_chunk : gpu ? 8192 : 512;
    ep.no_overlap = strcmp(d.cfg.decode_overlap, "no") == 0;
    ep.overlap_sync = strcmp(d.cfg.decode_overlap, "yes") == 0;
    ep.max_batch = d.cfg.max_batch;
    ep.max_ctx = d.cfg.max_context;
    ep.profile_path = d.cfg.profile[0] ? d.cfg.profile : NULL;
    rc = uc_engine_create(&d.engine, &ep, d.comm);
    if (rc != UC_OK) {
        if (rank == 0) {
            fprintf(stderr,
                    "uncompd: cannot start the engine on the model from %s (%s); see the log "
                    "above\n",
                    d.cfg.model, uc_status_str(rc));
        }
        code = 1;
        goto out;
    }
#ifdef UC_HAVE_GRPC
    /* collective, before ranks > 0 start serving steps: the table GetServerInfo reports */
    if (!oneshot && gather_cluster(&d, &d.cluster) != UC_OK) {
        code = 1;
        goto out;
    }
#endif
    if (rank != 0) {
        rc = uc_engine_serve(d.engine);
        code = rc == UC_OK ? 0 : 1;
        goto out;
    }
    if (pthread_create(&d.sig_thread, NULL, signal_thread, &d) == 0) {
        d.sig_thread_started = true;
    }
    code = run_rank0(&d);
out:
    if (d.sig_thread_started) {
        pthread_kill(d.sig_thread, SIGUSR1);
        pthread_join(d.sig_thread, NULL);
    }
    uc_front_destroy(d.front);
    uc_sched_destroy(d.sched);
    metrics_destroy(d.metrics);
    uc_tokenizer_destroy(d.tok);
    uc_engine_destroy(d.engine);
    uc_comm_destroy(d.comm);
    uc_config_fini(&d.cfg);
#ifdef UC_HAVE_GRPC
    uc_free(d.cluster.ranks);
#endif
    return code;
}

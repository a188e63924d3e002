/* Fault tests of model loading (label `fault`):
 *  1. bad model folders made here from stories260K (a truncated shard, a header lying about
 *     offsets, a missing and a mis-shaped tensor, an unsupported architecture, an unsupported
 *     tokenizer component, no config.json): uc_engine_create (or uc_tokenizer_create) returns
 *     the right status, the log names the file, tensor or field, and nothing leaks; NaN
 *     weights are named by layer, and finite weights whose activations overflow are named by
 *     the diagnosis of the cached K/V;
 *  2. allocation N fails for every N up to the number a successful uc_engine_create makes:
 *     each create fails cleanly (or succeeds and destroys cleanly) with zero leaked blocks;
 *  3. the uncompd binary's one-shot mode exits non-zero with the reason on stderr for a bad
 *     model folder and for a prompt longer than --max-context.
 * Usage: test_fault_load SHARED_DIR UNCOMPD_PATH. Part 3 runs before MPI starts in this process
 * (uncompd is a child process, started without forking an MPI process). */
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "engine.h"
#include "test_util.h"
#include "tokenizer.h"

extern char **environ;

static const char *shared_dir;
static const char *uncompd_path;
static char src_model[1024];
static struct uc_comm *comm;

/* ---- log capture ------------------------------------------------------------------------- */


#define assert_has(hay, needle)                                                                    \
    do {                                                                                           \
        if (!strstr((hay), (needle))) {                                                            \
            fail_msg("'%s' not found in:\n%s", (needle), (hay));                                   \
        }                                                                                          \
    } while (0)

/* ---- building bad model folders ------------------------------------------------------------ */

static char work_dir[64];


static void copy_file(const char *dir, const char *name)
{
    char *src = uc_path_join(src_model, name), *dst = uc_path_join(dir, name);
    char *data = NULL;
    size_t n = 0;
    assert_int_equal(uc_file_read_all(&data, &n, src), UC_OK);
    assert_int_equal(uc_file_write_all(dst, data, n), UC_OK);
    uc_free(data);
    uc_free(src);
    uc_free(dst);
}

/* A fresh copy of stories260K in work_dir/<name>; returns its path (static storage). */
static const char *make_model(const char *name)
{
    static char dir[2][256];
    static int k;
    k ^= 1;
    snprintf(dir[k], sizeof dir[k], "%s/%s", work_dir, name);
    assert_int_equal(mkdir(dir[k], 0755), 0);
    copy_file(dir[k], "config.json");
    copy_file(dir[k], "tokenizer.json");
    copy_file(dir[k], "tokenizer_config.json");
    copy_file(dir[k], "model.safetensors");
    return dir[k];
}

static char *file_in(const char *dir, const char *name)
{
    static char buf[512];
    snprintf(buf, sizeof buf, "%s/%s", dir, name);
    return buf;
}

/* DIR/model.safetensors read whole, its JSON header parsed. */
struct shard_file {
    const char *path;
    char *data;
    size_t n;
    uint64_t hlen;  /* header bytes after the 8-byte length */
    char *htext;
    cJSON *hdr;
};

static void shard_read(struct shard_file *f, const char *dir)
{
    memset(f, 0, sizeof *f);
    f->path = file_in(dir, "model.safetensors");
    assert_int_equal(uc_file_read_all(&f->data, &f->n, f->path), UC_OK);
    for (int i = 0; i < 8; i++) {
        f->hlen |= (uint64_t)(unsigned char)f->data[i] << (8 * i);
    }
    f->htext = strndup(f->data + 8, f->hlen);
    f->hdr = cJSON_Parse(f->htext);
    assert_non_null(f->hdr);
}

static void shard_free(struct shard_file *f)
{
    cJSON_Delete(f->hdr);
    free(f->htext);
    uc_free(f->data);
}

/* Edits the JSON header of DIR/model.safetensors with fn and writes the file back with the
 * same data section. */
static void edit_header(const char *dir, void (*fn)(cJSON *hdr))
{
    struct shard_file f;
    shard_read(&f, dir);
    fn(f.hdr);
    char *nh = cJSON_PrintUnformatted(f.hdr);
    size_t nl = strlen(nh), padded = (nl + 7) / 8 * 8;
    size_t data_bytes = f.n - 8 - f.hlen;
    unsigned char *out = malloc(8 + padded + data_bytes);
    assert_non_null(out);
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    }
    memcpy(out + 8, nh, nl);
    memset(out + 8 + nl, ' ', padded - nl);
    memcpy(out + 8 + padded, f.data + 8 + f.hlen, data_bytes);
    assert_int_equal(uc_file_write_all(f.path, out, 8 + padded + data_bytes), UC_OK);
    free(out);
    cJSON_free(nh);
    shard_free(&f);
}

static void edit_json_file(const char *dir, const char *name, void (*fn)(cJSON *root))
{
    const char *path = file_in(dir, name);
    char *text = NULL;
    assert_int_equal(uc_file_read_all(&text, NULL, path), UC_OK);
    cJSON *root = cJSON_Parse(text);
    assert_non_null(root);
    fn(root);
    char *out = cJSON_Print(root);
    assert_int_equal(uc_file_write_all(path, out, strlen(out)), UC_OK);
    cJSON_free(out);
    cJSON_Delete(root);
    uc_free(text);
}

static void set_offsets(cJSON *hdr, const char *tensor, double b, double e)
{
    cJSON *t = cJSON_GetObjectItemCaseSensitive(hdr, tensor);
    assert_non_null(t);
    cJSON *offs = cJSON_CreateArray();
    cJSON_AddItemToArray(offs, cJSON_CreateNumber(b));
    cJSON_AddItemToArray(offs, cJSON_CreateNumber(e));
    cJSON_ReplaceItemInObjectCaseSensitive(t, "data_offsets", offs);
}

static double offset_of(cJSON *hdr, const char *tensor, int which)
{
    cJSON *t = cJSON_GetObjectItemCaseSensitive(hdr, tensor);
    return cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(t, "data_offsets"), which)
        ->valuedouble;
}

/* Overwrites the first bytes of tensor `name` in DIR/model.safetensors with 0xFF: a NaN in
 * float32, float16 and bfloat16 alike. */
static void poison_tensor(const char *dir, const char *name)
{
    struct shard_file f;
    shard_read(&f, dir);
    double at = offset_of(f.hdr, name, 0);
    memset(f.data + 8 + f.hlen + (size_t)at, 0xFF, 16);
    assert_int_equal(uc_file_write_all(f.path, f.data, f.n), UC_OK);
    shard_free(&f);
}

/* Multiplies every value of the F32 tensor `name` in DIR/model.safetensors by 2^k, exactly (the
 * exponent field moves; zeros stay zero): weights that stay finite while their products
 * overflow float32 (and bfloat16, whose range is the same). */
static void scale_tensor(const char *dir, const char *name, int k)
{
    struct shard_file f;
    shard_read(&f, dir);
    cJSON *t = cJSON_GetObjectItemCaseSensitive(f.hdr, name);
    assert_non_null(t);
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(t, "dtype")->valuestring, "F32");
    size_t b = (size_t)offset_of(f.hdr, name, 0), e = (size_t)offset_of(f.hdr, name, 1);
    for (size_t at = 8 + f.hlen + b; at < 8 + f.hlen + e; at += 4) {
        uint32_t u;
        memcpy(&u, f.data + at, 4);
        uint32_t ex = (u >> 23) & 0xffu;
        if (ex != 0) {
            assert_true(ex + (uint32_t)k < 0xffu); /* stays finite */
            u += (uint32_t)k << 23;
        }
        memcpy(f.data + at, &u, 4);
    }
    assert_int_equal(uc_file_write_all(f.path, f.data, f.n), UC_OK);
    shard_free(&f);
}

/* model.norm.weight (64 floats) claims the 256 bytes past the end of the data */
static void lie_past_end(cJSON *hdr)
{
    double end = 0;
    cJSON *it;
    cJSON_ArrayForEach(it, hdr)
    {
        if (strcmp(it->string, "__metadata__") != 0) {
            double e = offset_of(hdr, it->string, 1);
            end = e > end ? e : end;
        }
    }
    set_offsets(hdr, "model.norm.weight", end, end + 256);
}

/* model.layers.2.input_layernorm.weight claims bytes of the embedding table */
static void lie_overlap(cJSON *hdr)
{
    set_offsets(hdr, "model.layers.2.input_layernorm.weight", 1024, 1024 + 256);
}

static void drop_tensor(cJSON *hdr)
{
    cJSON_DeleteItemFromObjectCaseSensitive(hdr, "model.layers.3.mlp.up_proj.weight");
}

/* k_proj is (32, 64); the header says (64, 32): the same bytes, the wrong shape */
static void transpose_k(cJSON *hdr)
{
    cJSON *t = cJSON_GetObjectItemCaseSensitive(hdr, "model.layers.1.self_attn.k_proj.weight");
    assert_non_null(t);
    cJSON *shape = cJSON_CreateArray();
    cJSON_AddItemToArray(shape, cJSON_CreateNumber(64));
    cJSON_AddItemToArray(shape, cJSON_CreateNumber(32));
    cJSON_ReplaceItemInObjectCaseSensitive(t, "shape", shape);
}

static void arch_neox(cJSON *cfg)
{
    cJSON *a = cJSON_CreateArray();
    cJSON_AddItemToArray(a, cJSON_CreateString("GPTNeoXForCausalLM"));
    cJSON_ReplaceItemInObjectCaseSensitive(cfg, "architectures", a);
}

static void tok_wordpiece(cJSON *tok)
{
    cJSON *m = cJSON_GetObjectItemCaseSensitive(tok, "model");
    cJSON_ReplaceItemInObjectCaseSensitive(m, "type", cJSON_CreateString("WordPiece"));
}

static void tok_catastrophic_split(cJSON *tok)
{
    cJSON_ReplaceItemInObject(
        tok, "pre_tokenizer",
        cJSON_Parse("{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(a|aa)+(?:x|$)\"},"
                    "\"behavior\":\"Isolated\",\"invert\":false}"));
}

static void truncate_shard(const char *dir)
{
    const char *path = file_in(dir, "model.safetensors");
    char *data = NULL;
    size_t n = 0;
    assert_int_equal(uc_file_read_all(&data, &n, path), UC_OK);
    assert_int_equal(uc_file_write_all(path, data, n / 2), UC_OK);
    uc_free(data);
}

/* ---- part 3: the uncompd binary ---------------------------------------------------------- */

struct run_result {
    int code; /* exit status, or -signal */
    char out[8192];
    char err[16384];
};

static void slurp(const char *path, char *buf, size_t n)
{
    FILE *f = fopen(path, "rb");
    size_t k = f ? fread(buf, 1, n - 1, f) : 0;
    buf[k] = '\0';
    if (f) {
        fclose(f);
    }
}

/* Runs uncompd with args (NULL-terminated), a 60 s limit, stdout and stderr captured. */
static void run_uncompd(struct run_result *r, const char *const *args)
{
    char out_path[128], err_path[128];
    snprintf(out_path, sizeof out_path, "%s/stdout.txt", work_dir);
    snprintf(err_path, sizeof err_path, "%s/stderr.txt", work_dir);
    char *argv[32];
    int argc = 0;
    argv[argc++] = (char *)(uintptr_t)uncompd_path;
    for (int i = 0; args[i]; i++) {
        argv[argc++] = (char *)(uintptr_t)args[i];
    }
    argv[argc] = NULL;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid;
    int rc = posix_spawn(&pid, uncompd_path, &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        fail_msg("cannot start %s: %s", uncompd_path, strerror(rc));
    }
    int status = 0;
    double t0 = uc_time_s();
    for (;;) {
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid) {
            break;
        }
        if (uc_time_s() - t0 > 60.0) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            fail_msg("uncompd did not exit within 60 s");
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    r->code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    slurp(out_path, r->out, sizeof r->out);
    slurp(err_path, r->err, sizeof r->err);
}

#define RUN(r, ...) run_uncompd((r), (const char *const[]){__VA_ARGS__, NULL})

static void test_uncompd_bad_models(void **state)
{
    (void)state;
    static struct run_result r;
    /* a missing tensor */
    const char *dir = make_model("cli_missing_tensor");
    edit_header(dir, drop_tensor);
    RUN(&r, "--model", dir, "--prompt", "Once upon a time", "--max-tokens", "4");
    assert_true(r.code > 0);
    assert_has(r.err, "cannot start the engine on the model from");
    assert_has(r.err, "tensor=model.layers.3.mlp.up_proj.weight");
    assert_has(r.err, "UC_ERR_FORMAT");
    assert_true(r.out[0] == '\0' || strcmp(r.out, "\n") == 0);
    /* (no config.json, an unsupported architecture ... : the same path, checked through the
     * library below) */
    /* the tokenizer is loaded after the model: its refusal must still end the process */
    dir = make_model("cli_tok");
    edit_json_file(dir, "tokenizer.json", tok_wordpiece);
    RUN(&r, "--model", dir, "--prompt", "hi");
    assert_true(r.code > 0);
    assert_has(r.err, "field=model.type");
    assert_has(r.err, "WordPiece");
    /* issue 17: a tokenizer failure other than bad UTF-8 (here PCRE2's match limit) is reported
     * as what it is, not as "the prompt is not valid UTF-8" */
    dir = make_model("cli_tok_limit");
    edit_json_file(dir, "tokenizer.json", tok_catastrophic_split);
    RUN(&r, "--model", dir, "--prompt", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!");
    assert_true(r.code > 0);
    assert_has(r.err, "the prompt cannot be tokenized");
    assert_has(r.err, "match limit");
    assert_true(strstr(r.err, "not valid UTF-8") == NULL);
}

/* A KV pool larger than the memory left is refused at start-up, named, with what is left (it
 * used to be promised by the host and fail only when a load touched it, or on a GPU to stop with
 * a bare out-of-memory). */
static void test_uncompd_kv_pool_too_big(void **state)
{
    (void)state;
    static struct run_result r;
    const char *dir = make_model("cli_pool");
    RUN(&r, "--model", dir, "--kv-memory", "64TiB", "--prompt", "hi", "--max-tokens", "1");
    assert_true(r.code > 0);
    assert_has(r.err, "the KV pool of 65536.00 GiB (uncompd --kv-memory) does not fit");
    assert_has(r.err, "GiB left after the model's weights and workspaces");
    assert_has(r.err, "cannot start the engine on the model from");
}

static void test_uncompd_prompt_too_long(void **state)
{
    (void)state;
    static struct run_result r;
    char prompt[4096] = "";
    for (int i = 0; i < 30; i++) {
        strcat(prompt, "Once upon a time there was a dog. ");
    }
    RUN(&r, "--model", src_model, "--max-context", "64", "--prompt", prompt, "--max-tokens", "8");
    assert_true(r.code > 0);
    assert_has(r.err, "exceeds the context length 64");
    /* the same prompt fits the model's own context (512): a completion, exit 0 */
    RUN(&r, "--model", src_model, "--prompt", prompt, "--max-tokens", "3");
    if (r.code != 0) {
        fail_msg("uncompd exited %d:\n%s", r.code, r.err);
    }
    assert_true(strlen(r.out) > 1);
    /* a usage error exits 2 and names the option */
    RUN(&r, "--model", src_model, "--max-context", "-1", "--prompt", "hi");
    assert_int_equal(r.code, 2);
    assert_has(r.err, "--max-context=-1");
}

/* ---- part 1: bad folders through the library ---------------------------------------------- */

static uc_status create_engine(const char *dir, struct uc_engine **e)
{
    struct uc_engine_params ep = uc_engine_default_params();
    ep.model_dir = dir;
    ep.kv_memory_bytes = 1 << 20;
    ep.prefill_chunk = 64;
    ep.max_batch = 4;
    return uc_engine_create(e, &ep, comm);
}

/* uc_engine_create on dir: status, log strings, NULL engine, no leak. */
static void expect_engine_refused(const char *dir, uc_status want, const char *a, const char *b)
{
    int64_t blocks = uc_mem_blocks_in_use();
    tu_log_reset();
    struct uc_engine *e = (struct uc_engine *)(uintptr_t)1;
    uc_status rc = create_engine(dir, &e);
    if (rc != want) {
        uc_engine_destroy(rc == UC_OK ? e : NULL);
        fail_msg("%s: want %s, got %s\n%s", dir, uc_status_str(want), uc_status_str(rc),
                 tu_log_text);
    }
    assert_null(e);
    assert_has(tu_log_text, uc_status_str(want));
    assert_has(tu_log_text, a);
    if (b) {
        assert_has(tu_log_text, b);
    }
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_engine_bad_folders(void **state)
{
    (void)state;
    const char *dir = make_model("truncated");
    truncate_shard(dir);
    expect_engine_refused(dir, UC_ERR_FORMAT, file_in(dir, "model.safetensors"),
                          "outside the data section");

    dir = make_model("past_end");
    edit_header(dir, lie_past_end);
    expect_engine_refused(dir, UC_ERR_FORMAT, "tensor=model.norm.weight", "data_offsets");
    assert_has(tu_log_text, file_in(dir, "model.safetensors"));

    dir = make_model("overlap");
    edit_header(dir, lie_overlap);
    expect_engine_refused(dir, UC_ERR_FORMAT, "model.layers.2.input_layernorm.weight", "overlap");

    dir = make_model("missing_tensor");
    edit_header(dir, drop_tensor);
    expect_engine_refused(dir, UC_ERR_FORMAT, "tensor=model.layers.3.mlp.up_proj.weight",
                          "missing");

    dir = make_model("misshaped");
    edit_header(dir, transpose_k);
    expect_engine_refused(dir, UC_ERR_FORMAT, "tensor=model.layers.1.self_attn.k_proj.weight",
                          "shape [64,32], config needs [32,64]");

    dir = make_model("arch");
    edit_json_file(dir, "config.json", arch_neox);
    expect_engine_refused(dir, UC_ERR_UNSUPPORTED, "field=architectures", "GPTNeoXForCausalLM");
    assert_has(tu_log_text, file_in(dir, "config.json"));

    dir = make_model("no_config");
    assert_int_equal(unlink(file_in(dir, "config.json")), 0);
    expect_engine_refused(dir, UC_ERR_IO, file_in(dir, "config.json"), NULL);

    dir = make_model("no_weights");
    assert_int_equal(unlink(file_in(dir, "model.safetensors")), 0);
    expect_engine_refused(dir, UC_ERR_IO, "neither model.safetensors", NULL);

    /* issue 17: model parts must be regular files (opening a FIFO used to wait for a writer
     * forever, hanging the start-up) */
    dir = make_model("fifo_shard");
    assert_int_equal(unlink(file_in(dir, "model.safetensors")), 0);
    assert_int_equal(mkfifo(file_in(dir, "model.safetensors"), 0644), 0);
    double t0 = uc_time_s();
    expect_engine_refused(dir, UC_ERR_IO, file_in(dir, "model.safetensors"),
                          "not a regular file");
    dir = make_model("fifo_config");
    assert_int_equal(unlink(file_in(dir, "config.json")), 0);
    assert_int_equal(mkfifo(file_in(dir, "config.json"), 0644), 0);
    expect_engine_refused(dir, UC_ERR_IO, file_in(dir, "config.json"), "not a regular file");
    assert_true(uc_time_s() - t0 < 5.0);
}

/* issue 17: NaN weights load (with a warning naming the layer) and the daemon's requests then end
 * with INTERNAL naming that layer (tests/e2e/test_reliability.py) */
static void test_engine_nan_weights_named(void **state)
{
    (void)state;
    const char *dir = make_model("nan_weights");
    poison_tensor(dir, "model.layers.2.mlp.down_proj.weight");
    int64_t blocks = uc_mem_blocks_in_use();
    tu_log_reset();
    struct uc_engine *e = NULL;
    assert_int_equal(create_engine(dir, &e), UC_OK);
    assert_has(tu_log_text, "non-finite weight");
    assert_has(tu_log_text, "layer 2");
    assert_string_equal(uc_engine_nonfinite_weights(e), "layer 2");
    uc_engine_destroy(e);
    assert_int_equal(create_engine(src_model, &e), UC_OK);
    assert_null(uc_engine_nonfinite_weights(e));
    uc_engine_destroy(e);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Prefills 40 tokens into sequence 1 (policy full); returns whether every logit is finite. */
static bool prefill_finite(struct uc_engine *e)
{
    int32_t ids[40];
    for (int i = 0; i < 40; i++) {
        ids[i] = 1 + (i * 37) % 500;
    }
    struct uc_compress_params cp = uc_compress_default_params();
    cp.policy = UC_POLICY_FULL;
    assert_int_equal(tu_prefill(e, 1, ids, 40, 0, &cp, 4), UC_OK);
    int64_t rows = 0, v = uc_engine_config(e)->vocab;
    const float *lg = uc_engine_seq_logits(e, 1, &rows);
    assert_non_null(lg);
    bool finite = true;
    for (int64_t i = 0; i < v; i++) {
        finite = finite && isfinite(lg[(rows - 1) * v + i]);
    }
    return finite;
}

/* issue 17: finite weights whose activations overflow (layer 2's gate and up projections
 * scaled by 2^83: their product passes float32's range) give non-finite logits, and the
 * diagnosis names the layer: layer 3's cached K/V are the first non-finite ones, so the
 * activations went non-finite in layer 2. A healthy model's cache is finite throughout. */
static void test_engine_overflow_layer_named(void **state)
{
    (void)state;
    const char *dir = make_model("overflow");
    scale_tensor(dir, "model.layers.2.mlp.gate_proj.weight", 83);
    scale_tensor(dir, "model.layers.2.mlp.up_proj.weight", 83);
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_engine *e = NULL;
    assert_int_equal(create_engine(dir, &e), UC_OK);
    assert_null(uc_engine_nonfinite_weights(e)); /* every weight is finite */
    assert_false(prefill_finite(e));
    int64_t layer = -1;
    char where[160];
    assert_int_equal(uc_engine_diagnose_nonfinite(e, 1, &layer), UC_OK);
    assert_int_equal(layer, 3);
    uc_engine_nonfinite_origin(e, layer, where, sizeof where);
    assert_string_equal(where, "layer 2: its K/V cache is finite, layer 3's is not (so layer 2's "
                        "attention or MLP, or layer 3's K/V projection)");
    /* an unknown sequence is refused */
    tu_log_reset();
    assert_int_equal(uc_engine_diagnose_nonfinite(e, 99, &layer), UC_ERR_INVALID_ARG);
    assert_int_equal(layer, -1);
    assert_has(tu_log_text, "no sequence 99");
    uc_engine_destroy(e);
    /* the same prompt through the healthy model: finite logits, every layer's cache finite */
    assert_int_equal(create_engine(src_model, &e), UC_OK);
    assert_true(prefill_finite(e));
    assert_int_equal(uc_engine_diagnose_nonfinite(e, 1, &layer), UC_OK);
    assert_int_equal(layer, 5);
    uc_engine_nonfinite_origin(e, layer, where, sizeof where);
    assert_string_equal(where, "layer 4 or the LM head: every cached K/V is finite");
    uc_engine_nonfinite_origin(e, 0, where, sizeof where);
    assert_has(where, "the embedding");
    uc_engine_destroy(e);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* The engine does not read tokenizer.json; the tokenizer refuses it with the field named. */
static void test_tokenizer_unsupported_component(void **state)
{
    (void)state;
    const char *dir = make_model("tokenizer");
    edit_json_file(dir, "tokenizer.json", tok_wordpiece);
    int64_t blocks = uc_mem_blocks_in_use();
    tu_log_reset();
    struct uc_tokenizer *t = NULL;
    assert_int_equal(uc_tokenizer_create(&t, dir), UC_ERR_UNSUPPORTED);
    assert_null(t);
    assert_has(tu_log_text, "field=model.type");
    assert_has(tu_log_text, "WordPiece");
    assert_has(tu_log_text, file_in(dir, "tokenizer.json"));
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
    /* the model itself still loads from that folder */
    struct uc_engine *e = NULL;
    assert_int_equal(create_engine(dir, &e), UC_OK);
    uc_engine_destroy(e);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* ---- part 2: allocation failures ---------------------------------------------------------- */

/* A crash while allocation N fails is a bug: say which N before cmocka reports the signal. */
static volatile sig_atomic_t failing_n;
static void (*prev_segv)(int);

static void on_segv(int sig)
{
    char b[160];
    int k = snprintf(b, sizeof b, "uc_engine_create crashed (signal %d) while allocation %d "
                     "was made to fail\n", sig, (int)failing_n);
    if (write(2, b, (size_t)k) < 0) {
        k = 0;
    }
    signal(SIGSEGV, prev_segv);
    if (prev_segv == SIG_DFL || prev_segv == SIG_IGN || prev_segv == SIG_ERR) {
        raise(sig);
    } else {
        prev_segv(sig);
    }
}

/* Every allocation of uc_engine_create fails in turn. Regression: allocation 2 (the uc_strdup
 * of the model folder) failing used to crash in uc_path_join(NULL, ...) before the NULL check. */
static void test_engine_allocation_failures(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_engine *e = NULL;
    int64_t calls0 = uc_mem_alloc_calls();
    assert_int_equal(create_engine(src_model, &e), UC_OK);
    int64_t n_calls = uc_mem_alloc_calls() - calls0;
    uc_engine_destroy(e);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
    assert_true(n_calls > 20);
    int n_ok = 0;
    for (int64_t n = 1; n <= n_calls; n++) {
        tu_log_reset();
        e = (struct uc_engine *)(uintptr_t)1;
        failing_n = (sig_atomic_t)n;
        prev_segv = signal(SIGSEGV, on_segv);
        uc_mem_fail_after(n);
        uc_status rc = create_engine(src_model, &e);
        uc_mem_fail_after(0);
        signal(SIGSEGV, prev_segv);
        if (rc == UC_OK) {
            n_ok++; /* the failed allocation was retried or optional */
            assert_non_null(e);
            uc_engine_destroy(e);
        } else {
            if (rc != UC_ERR_NOMEM) {
                fail_msg("allocation %lld of %lld failed: create returned %s, not "
                         "UC_ERR_NOMEM\n%s", (long long)n, (long long)n_calls,
                         uc_status_str(rc), tu_log_text);
            }
            assert_null(e);
            assert_has(tu_log_text, "UC_ERR_NOMEM");
        }
        if (uc_mem_blocks_in_use() != blocks) {
            fail_msg("allocation %lld of %lld failed (%s): %lld blocks leaked", (long long)n,
                     (long long)n_calls, uc_status_str(rc),
                     (long long)(uc_mem_blocks_in_use() - blocks));
        }
    }
    print_message("uc_engine_create: %lld allocations, each failed once; %d creates still "
                  "succeeded\n", (long long)n_calls, n_ok);
    assert_true(n_ok < n_calls / 2);
}

/* ---- main ---------------------------------------------------------------------------------- */

static int group_setup(void **state)
{
    (void)state;
    snprintf(work_dir, sizeof work_dir, "/tmp/uc_fault_load_XXXXXX");
    return mkdtemp(work_dir) ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    return tu_rmtree(work_dir);
}

int main(int argc, char **argv)
{
    shared_dir = tu_shared_dir(argc, argv);
    uncompd_path = argc > 2 ? argv[2] : NULL;
    snprintf(src_model, sizeof src_model, "%s", tu_model_dir(shared_dir, "stories260K"));
    if (!uncompd_path || access(uncompd_path, X_OK) != 0) {
        fprintf(stderr, "FAIL: the uncompd binary (argv[2]) is missing: %s\n",
                uncompd_path ? uncompd_path : "(not given)");
        return 1;
    }
    /* Singletons (this process and the uncompd it starts) need no runtime daemon: starts in
     * a third of the time. */
    setenv("OMPI_MCA_ess_singleton_isolated", "1", 0);
    /* part 3 first: no MPI in this process yet */
    const struct CMUnitTest cli[] = {
        cmocka_unit_test(test_uncompd_bad_models),
        cmocka_unit_test(test_uncompd_prompt_too_long),
        cmocka_unit_test(test_uncompd_kv_pool_too_big),
    };
    int failed = cmocka_run_group_tests_name("uncompd", cli, group_setup, group_teardown);
    if (uc_comm_create(&comm, &argc, &argv, 60000) != UC_OK) {
        fprintf(stderr, "FAIL: MPI start-up\n");
        return 1;
    }
    tu_log_capture();
    const struct CMUnitTest lib[] = {
        cmocka_unit_test(test_engine_bad_folders),
        cmocka_unit_test(test_engine_nan_weights_named),
        cmocka_unit_test(test_engine_overflow_layer_named),
        cmocka_unit_test(test_tokenizer_unsupported_component),
        cmocka_unit_test(test_engine_allocation_failures),
    };
    failed += cmocka_run_group_tests_name("engine", lib, group_setup, group_teardown);
    uc_log_set_sink(NULL, NULL);
    uc_comm_destroy(comm);
    return failed ? 1 : 0;
}

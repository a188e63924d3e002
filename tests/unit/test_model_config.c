/* Unit tests for shard/model_config.c: config.json files of the Llama, Mistral and Qwen2 families
 * written here (head_dim given or derived, rope_theta or transformers-5 rope_parameters, llama3
 * and linear rope scaling with exact values, tied embeddings, Qwen2's qkv bias, bos/eos as an int
 * or a list, sliding windows), every refusal (UC_ERR_UNSUPPORTED / UC_ERR_FORMAT, with the log
 * line naming the file and the field), the synthetic presets, the config hash, and leaks.
 * JSON here uses ' for " (converted at run time). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "model_config.h"
#include "test_util.h"

/* ---- log capture: every line since the last reset ---------------------------------------- */


/* Fails unless the captured log contains every given string. */
#define assert_log_has(s) assert_non_null(strstr(tu_log_text, (s)))

/* Copies s with every ' turned into ". */
static const char *q(const char *s)
{
    static char buf[8192];
    size_t n = strlen(s);
    assert_true(n < sizeof buf);
    for (size_t i = 0; i <= n; i++) {
        buf[i] = s[i] == '\'' ? '"' : s[i];
    }
    return buf;
}

/* Parses a config, checks the status and that nothing leaked. */
static uc_status parse(struct uc_model_config *cfg, const char *json)
{
    int64_t blocks = uc_mem_blocks_in_use();
    tu_log_reset();
    uc_status rc = uc_model_config_parse(cfg, q(json), "/m/config.json");
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
    return rc;
}

/* A refusal: the status, exactly one error line naming the file and the field (and `also`). */
static void expect_refusal(const char *json, uc_status want, const char *field, const char *also)
{
    struct uc_model_config cfg;
    uc_status rc = parse(&cfg, json);
    if (rc != want) {
        fail_msg("want %s, got %s for %s", uc_status_str(want), uc_status_str(rc), json);
    }
    assert_int_equal(tu_log_errors, 1);
    assert_log_has("file=/m/config.json");
    assert_log_has(field);
    assert_log_has(uc_status_str(want));
    if (also) {
        assert_log_has(also);
    }
}

/* The fields every test config shares (only the required ones and max_position_embeddings, so a
 * tail never repeats a key); tail is spliced in before the closing brace. */
static const char *llama_with(const char *tail)
{
    static char tmp[4096];
    snprintf(tmp, sizeof tmp,
             "{'architectures':['LlamaForCausalLM'],'model_type':'llama','hidden_size':64,"
             "'intermediate_size':172,'num_hidden_layers':5,'num_attention_heads':8,"
             "'vocab_size':512,'max_position_embeddings':512%s%s}",
             tail[0] ? "," : "", tail);
    return tmp;
}

/* ---- Llama 3.1 8B, as published -------------------------------------------------------- */

static const char *LLAMA31_8B =
    "{'architectures':['LlamaForCausalLM'],'attention_bias':false,'attention_dropout':0.0,"
    "'bos_token_id':128000,'eos_token_id':[128001,128008,128009],'hidden_act':'silu',"
    "'hidden_size':4096,'initializer_range':0.02,'intermediate_size':14336,"
    "'max_position_embeddings':131072,'mlp_bias':false,'model_type':'llama',"
    "'num_attention_heads':32,'num_hidden_layers':32,'num_key_value_heads':8,"
    "'pretraining_tp':1,'rms_norm_eps':1e-05,'rope_scaling':{'factor':8.0,"
    "'low_freq_factor':1.0,'high_freq_factor':4.0,'original_max_position_embeddings':8192,"
    "'rope_type':'llama3'},'rope_theta':500000.0,'tie_word_embeddings':false,"
    "'torch_dtype':'bfloat16','transformers_version':'4.43.0.dev0','use_cache':true,"
    "'vocab_size':128256}";

static void test_llama31_8b(void **state)
{
    (void)state;
    struct uc_model_config c;
    assert_int_equal(parse(&c, LLAMA31_8B), UC_OK);
    assert_int_equal(tu_log_errors, 0);
    assert_string_equal(c.arch, "LlamaForCausalLM");
    assert_string_equal(c.model_type, "llama");
    assert_int_equal(c.n_layers, 32);
    assert_int_equal(c.hidden, 4096);
    assert_int_equal(c.ffn, 14336);
    assert_int_equal(c.n_heads, 32);
    assert_int_equal(c.n_heads_kv, 8);
    assert_int_equal(c.head_dim, 128); /* derived: 4096 / 32 */
    assert_int_equal(c.vocab, 128256);
    assert_int_equal(c.max_ctx, 131072);
    assert_true(c.norm_eps == 1e-5);
    assert_true(c.rope_theta == 500000.0);
    assert_int_equal(c.rope_kind, UC_ROPE_LLAMA3);
    assert_true(c.rope_factor == 8.0);
    assert_true(c.rope_low_freq_factor == 1.0);
    assert_true(c.rope_high_freq_factor == 4.0);
    assert_true(c.rope_orig_max_ctx == 8192.0);
    assert_false(c.tie_embeddings);
    assert_false(c.qkv_bias);
    assert_false(c.o_bias);
    assert_false(c.mlp_bias);
    assert_int_equal(c.sliding_window, 0);
    assert_int_equal(c.bos_id, 128000);
    assert_int_equal(c.n_eos, 3);
    assert_int_equal(c.eos_ids[0], 128001);
    assert_int_equal(c.eos_ids[1], 128008);
    assert_int_equal(c.eos_ids[2], 128009);
    assert_string_equal(c.torch_dtype, "bfloat16");
    assert_true(uc_model_config_is_eos(&c, 128009));
    assert_true(uc_model_config_is_eos(&c, 128001));
    assert_false(uc_model_config_is_eos(&c, 128000));
    assert_false(uc_model_config_is_eos(&c, 2));
}

/* Llama 3.2 1B: tied embeddings, head_dim given explicitly (64 = 2048 / 32 as well), and
 * transformers 5's rope_parameters holding both theta and the llama3 scaling. */
static void test_rope_parameters_tf5(void **state)
{
    (void)state;
    struct uc_model_config c;
    const char *j =
        "{'architectures':['LlamaForCausalLM'],'model_type':'llama','hidden_size':2048,"
        "'intermediate_size':8192,'num_hidden_layers':16,'num_attention_heads':32,"
        "'num_key_value_heads':8,'head_dim':64,'vocab_size':128256,"
        "'max_position_embeddings':131072,'rms_norm_eps':1e-05,'tie_word_embeddings':true,"
        "'rope_parameters':{'rope_theta':500000.0,'rope_type':'llama3','factor':32.0,"
        "'low_freq_factor':1.0,'high_freq_factor':4.0,'original_max_position_embeddings':8192},"
        "'dtype':'bfloat16','bos_token_id':128000,'eos_token_id':128001}";
    assert_int_equal(parse(&c, j), UC_OK);
    assert_true(c.rope_theta == 500000.0);
    assert_int_equal(c.rope_kind, UC_ROPE_LLAMA3);
    assert_true(c.rope_factor == 32.0);
    assert_true(c.rope_low_freq_factor == 1.0);
    assert_true(c.rope_high_freq_factor == 4.0);
    assert_true(c.rope_orig_max_ctx == 8192.0);
    assert_true(c.tie_embeddings);
    assert_int_equal(c.head_dim, 64);
    assert_string_equal(c.torch_dtype, "bfloat16"); /* from 'dtype' */
    assert_int_equal(c.n_eos, 1);
    assert_int_equal(c.eos_ids[0], 128001);

    /* rope_parameters of type default: theta from it, no scaling */
    assert_int_equal(parse(&c, llama_with("'rope_parameters':{'rope_theta':1000000.0,"
                                          "'rope_type':'default'}")),
                     UC_OK);
    assert_true(c.rope_theta == 1000000.0);
    assert_int_equal(c.rope_kind, UC_ROPE_DEFAULT);
    assert_true(c.rope_factor == 1.0);
    /* a top-level rope_theta wins over rope_parameters' */
    assert_int_equal(parse(&c, llama_with("'rope_theta':250000.0,'rope_parameters':{'rope_theta':"
                                          "1000000.0,'rope_type':'default'}")),
                     UC_OK);
    assert_true(c.rope_theta == 250000.0);
}

/* Mistral NeMo: head_dim 128 is given and differs from hidden / heads (5120 / 32 = 160). */
static void test_head_dim_given_vs_derived(void **state)
{
    (void)state;
    struct uc_model_config c;
    const char *nemo =
        "{'architectures':['MistralForCausalLM'],'model_type':'mistral','hidden_size':5120,"
        "'intermediate_size':14336,'num_hidden_layers':40,'num_attention_heads':32,"
        "'num_key_value_heads':8,'head_dim':128,'vocab_size':131072,"
        "'max_position_embeddings':1024000,'rms_norm_eps':1e-05,'rope_theta':1000000.0,"
        "'sliding_window':null,'hidden_act':'silu','tie_word_embeddings':false,"
        "'bos_token_id':1,'eos_token_id':2,'torch_dtype':'bfloat16'}";
    assert_int_equal(parse(&c, nemo), UC_OK);
    assert_string_equal(c.arch, "MistralForCausalLM");
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.hidden, 5120);
    assert_int_equal(c.sliding_window, 0);
    assert_int_equal(c.max_ctx, 1024000);
    assert_true(c.rope_theta == 1000000.0);
    assert_int_equal(c.rope_kind, UC_ROPE_DEFAULT);
    assert_int_equal(c.bos_id, 1);

    /* derived when absent, and when null */
    assert_int_equal(parse(&c, llama_with("")), UC_OK);
    assert_int_equal(c.head_dim, 8);
    assert_int_equal(parse(&c, llama_with("'head_dim':null")), UC_OK);
    assert_int_equal(c.head_dim, 8);
    /* given and different from 64 / 8 */
    assert_int_equal(parse(&c, llama_with("'head_dim':16")), UC_OK);
    assert_int_equal(c.head_dim, 16);
}

/* Mistral 7B v0.1: a sliding window below max_position_embeddings limits the context (with a
 * warning naming it); Qwen2's sliding_window is ignored unless use_sliding_window is true. */
static void test_sliding_window(void **state)
{
    (void)state;
    struct uc_model_config c;
    const char *m01 =
        "{'architectures':['MistralForCausalLM'],'model_type':'mistral','hidden_size':4096,"
        "'intermediate_size':14336,'num_hidden_layers':32,'num_attention_heads':32,"
        "'num_key_value_heads':8,'vocab_size':32000,'max_position_embeddings':32768,"
        "'rms_norm_eps':1e-05,'rope_theta':10000.0,'sliding_window':4096,'hidden_act':'silu',"
        "'tie_word_embeddings':false,'bos_token_id':1,'eos_token_id':2}";
    assert_int_equal(parse(&c, m01), UC_OK);
    assert_int_equal(c.sliding_window, 4096);
    assert_int_equal(c.max_ctx, 4096);
    assert_int_equal(tu_log_warns, 1);
    assert_log_has("sliding_window=4096");
    assert_int_equal(c.head_dim, 128);
    assert_string_equal(c.torch_dtype, "float32"); /* neither torch_dtype nor dtype */

    /* a window as large as the context changes nothing */
    assert_int_equal(parse(&c, llama_with("'sliding_window':512")), UC_OK);
    assert_int_equal(c.sliding_window, 0);
    assert_int_equal(c.max_ctx, 512);
    /* use_sliding_window false switches it off for Llama-family too */
    assert_int_equal(parse(&c, llama_with("'sliding_window':128,'use_sliding_window':false")),
                     UC_OK);
    assert_int_equal(c.sliding_window, 0);
    assert_int_equal(c.max_ctx, 512);
    assert_int_equal(parse(&c, llama_with("'sliding_window':128")), UC_OK);
    assert_int_equal(c.sliding_window, 128);
    assert_int_equal(c.max_ctx, 128);
}

/* Qwen2.5 0.5B: attention has q/k/v biases without any config field saying so; o_proj has none;
 * sliding_window with use_sliding_window false does not limit the context. */
static void test_qwen2(void **state)
{
    (void)state;
    struct uc_model_config c;
    const char *qwen =
        "{'architectures':['Qwen2ForCausalLM'],'attention_dropout':0.0,'bos_token_id':151643,"
        "'eos_token_id':151643,'hidden_act':'silu','hidden_size':896,'initializer_range':0.02,"
        "'intermediate_size':4864,'max_position_embeddings':32768,'max_window_layers':24,"
        "'model_type':'qwen2','num_attention_heads':14,'num_hidden_layers':24,"
        "'num_key_value_heads':2,'rms_norm_eps':1e-06,'rope_theta':1000000.0,"
        "'sliding_window':32768,'tie_word_embeddings':true,'torch_dtype':'bfloat16',"
        "'use_cache':true,'use_sliding_window':false,'vocab_size':151936}";
    assert_int_equal(parse(&c, qwen), UC_OK);
    assert_string_equal(c.model_type, "qwen2");
    assert_true(c.qkv_bias);
    assert_false(c.o_bias);
    assert_false(c.mlp_bias);
    assert_true(c.tie_embeddings);
    assert_int_equal(c.head_dim, 64);
    assert_int_equal(c.n_heads_kv, 2);
    assert_int_equal(c.sliding_window, 0);
    assert_int_equal(c.max_ctx, 32768);
    assert_true(c.norm_eps == 1e-6);
    assert_int_equal(c.bos_id, 151643);
    assert_int_equal(c.n_eos, 1);

    /* Qwen2 with a smaller window but use_sliding_window absent: still no window */
    const char *q2 =
        "{'architectures':['Qwen2ForCausalLM'],'hidden_size':64,'intermediate_size':128,"
        "'num_hidden_layers':2,'num_attention_heads':4,'num_key_value_heads':2,"
        "'vocab_size':100,'max_position_embeddings':4096,'sliding_window':1024}";
    assert_int_equal(parse(&c, q2), UC_OK);
    assert_int_equal(c.sliding_window, 0);
    assert_int_equal(c.max_ctx, 4096);
    assert_true(c.qkv_bias);

    /* Llama with attention_bias: biases on q, k, v and o */
    assert_int_equal(parse(&c, llama_with("'attention_bias':true,'mlp_bias':true")), UC_OK);
    assert_true(c.qkv_bias);
    assert_true(c.o_bias);
    assert_true(c.mlp_bias);
    assert_int_equal(parse(&c, llama_with("")), UC_OK);
    assert_false(c.qkv_bias);
    assert_false(c.o_bias);
}

static void test_rope_linear(void **state)
{
    (void)state;
    struct uc_model_config c;
    assert_int_equal(parse(&c, llama_with("'rope_scaling':{'type':'linear','factor':4.0}")), UC_OK);
    assert_int_equal(c.rope_kind, UC_ROPE_LINEAR);
    assert_true(c.rope_factor == 4.0);
    assert_true(c.rope_theta == 10000.0);
    /* rope_type wins over type; 'default' means none */
    assert_int_equal(parse(&c, llama_with("'rope_scaling':{'rope_type':'linear','type':'yarn',"
                                          "'factor':2.5}")),
                     UC_OK);
    assert_int_equal(c.rope_kind, UC_ROPE_LINEAR);
    assert_true(c.rope_factor == 2.5);
    assert_int_equal(parse(&c, llama_with("'rope_scaling':{'rope_type':'default'}")), UC_OK);
    assert_int_equal(c.rope_kind, UC_ROPE_DEFAULT);
    assert_true(c.rope_factor == 1.0);
    assert_int_equal(parse(&c, llama_with("'rope_scaling':null")), UC_OK);
    assert_int_equal(c.rope_kind, UC_ROPE_DEFAULT);
    /* rope_theta absent: 10000 */
    const char *no_theta =
        "{'architectures':['LlamaForCausalLM'],'hidden_size':64,'intermediate_size':172,"
        "'num_hidden_layers':5,'num_attention_heads':8,'vocab_size':512}";
    assert_int_equal(parse(&c, no_theta), UC_OK);
    assert_true(c.rope_theta == 10000.0);
    /* and the defaults of every optional field */
    assert_int_equal(c.n_heads_kv, 8);
    assert_int_equal(c.max_ctx, 2048);
    assert_int_equal(tu_log_warns, 1);
    assert_log_has("max_position_embeddings");
    assert_true(c.norm_eps == 1e-6);
    assert_false(c.tie_embeddings);
    assert_int_equal(c.bos_id, -1);
    assert_int_equal(c.n_eos, 0);
    assert_false(uc_model_config_is_eos(&c, 0));
    assert_string_equal(c.model_type, "");

    /* linear without a factor, or with factor 0 */
    expect_refusal(llama_with("'rope_scaling':{'type':'linear'}"), UC_ERR_FORMAT,
                   "field=rope_scaling.factor", NULL);
    expect_refusal(llama_with("'rope_scaling':{'type':'linear','factor':0}"), UC_ERR_FORMAT,
                   "field=rope_scaling.factor", NULL);
}

static void test_rope_refusals(void **state)
{
    (void)state;
    expect_refusal(llama_with("'rope_scaling':{'type':'yarn','factor':4.0,"
                              "'original_max_position_embeddings':4096}"),
                   UC_ERR_UNSUPPORTED, "field=rope_scaling", "type=yarn");
    expect_refusal(llama_with("'rope_scaling':{'rope_type':'dynamic','factor':2.0}"),
                   UC_ERR_UNSUPPORTED, "field=rope_scaling", "type=dynamic");
    expect_refusal(llama_with("'rope_parameters':{'rope_type':'longrope','rope_theta':1e4}"),
                   UC_ERR_UNSUPPORTED, "field=rope_scaling", "type=longrope");
    /* llama3 with a field missing, or with inconsistent values */
    expect_refusal(llama_with("'rope_scaling':{'rope_type':'llama3','factor':8.0,"
                              "'low_freq_factor':1.0,'high_freq_factor':4.0}"),
                   UC_ERR_FORMAT, "field=rope_scaling", "original_max_position_embeddings");
    expect_refusal(llama_with("'rope_scaling':{'rope_type':'llama3','factor':8.0,"
                              "'low_freq_factor':4.0,'high_freq_factor':4.0,"
                              "'original_max_position_embeddings':8192}"),
                   UC_ERR_FORMAT, "field=rope_scaling", "invalid llama3");
    expect_refusal(llama_with("'rope_scaling':{'rope_type':'llama3','factor':-8.0,"
                              "'low_freq_factor':1.0,'high_freq_factor':4.0,"
                              "'original_max_position_embeddings':8192}"),
                   UC_ERR_FORMAT, "field=rope_scaling", "invalid llama3");
    /* rope_theta must be positive */
    expect_refusal(
        "{'architectures':['LlamaForCausalLM'],'hidden_size':64,'intermediate_size':172,"
        "'num_hidden_layers':5,'num_attention_heads':8,'vocab_size':512,'rope_theta':0}",
        UC_ERR_FORMAT, "field=rope_theta", NULL);
    expect_refusal(
        "{'architectures':['LlamaForCausalLM'],'hidden_size':64,'intermediate_size':172,"
        "'num_hidden_layers':5,'num_attention_heads':8,'vocab_size':512,'rope_theta':-1}",
        UC_ERR_FORMAT, "field=rope_theta", NULL);
}

static void test_bos_eos(void **state)
{
    (void)state;
    struct uc_model_config c;
    assert_int_equal(parse(&c, llama_with("'bos_token_id':1,'eos_token_id':2")), UC_OK);
    assert_int_equal(c.bos_id, 1);
    assert_int_equal(c.n_eos, 1);
    assert_int_equal(c.eos_ids[0], 2);
    assert_true(uc_model_config_is_eos(&c, 2));
    assert_false(uc_model_config_is_eos(&c, 1));
    /* lists: every eos id, the first bos id */
    assert_int_equal(parse(&c, llama_with("'bos_token_id':[5,6],'eos_token_id':[7,8,511]")),
                     UC_OK);
    assert_int_equal(c.bos_id, 5);
    assert_int_equal(c.n_eos, 3);
    assert_int_equal(c.eos_ids[2], 511);
    assert_true(uc_model_config_is_eos(&c, 8));
    assert_true(uc_model_config_is_eos(&c, 511));
    assert_false(uc_model_config_is_eos(&c, 5));
    /* null and empty lists mean none */
    assert_int_equal(parse(&c, llama_with("'bos_token_id':null,'eos_token_id':[]")), UC_OK);
    assert_int_equal(c.bos_id, -1);
    assert_int_equal(c.n_eos, 0);
    /* exactly UC_MAX_EOS_IDS is fine, one more is not */
    assert_int_equal(parse(&c, llama_with("'eos_token_id':[1,2,3,4,5,6,7,8]")), UC_OK);
    assert_int_equal(c.n_eos, UC_MAX_EOS_IDS);
    assert_int_equal(c.eos_ids[7], 8);
    expect_refusal(llama_with("'eos_token_id':[1,2,3,4,5,6,7,8,9]"), UC_ERR_FORMAT,
                   "field=eos_token_id", NULL);
    expect_refusal(llama_with("'eos_token_id':[1,'two']"), UC_ERR_FORMAT, "field=eos_token_id",
                   NULL);
    /* outside the vocabulary (512) */
    expect_refusal(llama_with("'eos_token_id':512"), UC_ERR_FORMAT, "field=eos_token_id=512",
                   NULL);
    expect_refusal(llama_with("'eos_token_id':[2,-1]"), UC_ERR_FORMAT, "field=eos_token_id=-1",
                   NULL);
    expect_refusal(llama_with("'bos_token_id':512"), UC_ERR_FORMAT, "field=bos_token_id=512",
                   NULL);
}

/* issue 17: ids are range-checked as numbers before any conversion (1e20 or 2^32+1 cast to int32
 * is undefined; 2^32+1 used to become token 1), and every dimension is bounded so that products
 * such as (H + 2 Hkv) D cannot overflow */
static void test_ids_and_dims_bounded(void **state)
{
    (void)state;
    expect_refusal(llama_with("'eos_token_id':4294967297"), UC_ERR_FORMAT, "field=eos_token_id",
                   "outside vocab");
    expect_refusal(llama_with("'eos_token_id':[2,1e20]"), UC_ERR_FORMAT, "field=eos_token_id",
                   NULL);
    expect_refusal(llama_with("'bos_token_id':1e20"), UC_ERR_FORMAT, "field=bos_token_id", NULL);
    expect_refusal(llama_with("'bos_token_id':-1e20"), UC_ERR_FORMAT, "field=bos_token_id", NULL);
    expect_refusal(llama_with("'bos_token_id':[1.5]"), UC_ERR_FORMAT, "field=bos_token_id",
                   "integer");
    struct uc_model_config c;
    assert_int_equal(parse(&c, llama_with("'bos_token_id':-1,'eos_token_id':511")), UC_OK);
    assert_int_equal(c.bos_id, -1);
    expect_refusal("{'architectures':['LlamaForCausalLM'],'hidden_size':64,"
                   "'intermediate_size':172,'num_hidden_layers':5,"
                   "'num_attention_heads':3000000000000000,'num_key_value_heads':3000000000000000,"
                   "'head_dim':2000000000000000,'vocab_size':512}",
                   UC_ERR_FORMAT, "field=num_attention_heads", "exceeds");
    expect_refusal(llama_with("'head_dim':4000000000000000"), UC_ERR_FORMAT, "field=head_dim",
                   "exceeds");
    expect_refusal("{'architectures':['LlamaForCausalLM'],'hidden_size':64,"
                   "'intermediate_size':172,'num_hidden_layers':5,'num_attention_heads':8,"
                   "'vocab_size':8000000000000000}",
                   UC_ERR_FORMAT, "field=vocab_size", "exceeds");
    assert_int_equal(parse(&c, llama_with("'rope_theta':10000.0")), UC_OK);
}

static void test_unsupported(void **state)
{
    (void)state;
    expect_refusal(
        "{'architectures':['GPT2LMHeadModel'],'model_type':'gpt2','n_embd':768,'n_layer':12}",
        UC_ERR_UNSUPPORTED, "field=architectures", "value=GPT2LMHeadModel");
    expect_refusal(
        "{'architectures':['MixtralForCausalLM'],'hidden_size':64,'intermediate_size':172,"
        "'num_hidden_layers':5,'num_attention_heads':8,'vocab_size':512}",
        UC_ERR_UNSUPPORTED, "field=architectures", "value=MixtralForCausalLM");
    expect_refusal(llama_with("'hidden_act':'gelu'"), UC_ERR_UNSUPPORTED, "field=hidden_act=gelu",
                   NULL);
    expect_refusal(llama_with("'hidden_act':'relu'"), UC_ERR_UNSUPPORTED, "field=hidden_act=relu",
                   NULL);
    struct uc_model_config c;
    assert_int_equal(parse(&c, llama_with("'hidden_act':'swish'")), UC_OK);
}

/* Each required field missing, and each with a value that is not a positive integer. */
static void test_missing_and_invalid_fields(void **state)
{
    (void)state;
    static const char *fields[] = {"num_hidden_layers", "hidden_size", "intermediate_size",
                                   "num_attention_heads", "vocab_size"};
    static const char *values[] = {"", "0", "-4", "64.5", "'64'", "null", "[64]"};
    const char *base[] = {"'num_hidden_layers':5", "'hidden_size':64", "'intermediate_size':172",
                          "'num_attention_heads':8", "'vocab_size':512"};
    for (size_t f = 0; f < 5; f++) {
        for (size_t v = 0; v < sizeof values / sizeof values[0]; v++) {
            char json[1024];
            int n = snprintf(json, sizeof json, "{'architectures':['LlamaForCausalLM']");
            for (size_t k = 0; k < 5; k++) {
                if (k != f) {
                    n += snprintf(json + n, sizeof json - (size_t)n, ",%s", base[k]);
                } else if (values[v][0]) {
                    n += snprintf(json + n, sizeof json - (size_t)n, ",'%s':%s", fields[k],
                                  values[v]);
                }
            }
            snprintf(json + n, sizeof json - (size_t)n, "}");
            char want[96];
            snprintf(want, sizeof want, "field=%s", fields[f]);
            expect_refusal(json, UC_ERR_FORMAT, want, NULL);
        }
    }
    /* structure */
    expect_refusal("{'model_type':'llama','hidden_size':64}", UC_ERR_FORMAT,
                   "field=architectures", "missing");
    expect_refusal("{'architectures':[],'hidden_size':64}", UC_ERR_FORMAT, "field=architectures",
                   NULL);
    expect_refusal("{'architectures':'LlamaForCausalLM','hidden_size':64}", UC_ERR_FORMAT,
                   "field=architectures", NULL);
    expect_refusal("{'architectures':['LlamaForCausalLM'],", UC_ERR_FORMAT, "not a JSON object",
                   NULL);
    expect_refusal("['LlamaForCausalLM']", UC_ERR_FORMAT, "not a JSON object", NULL);
    expect_refusal("", UC_ERR_FORMAT, "not a JSON object", NULL);
    /* shapes that cannot work */
    expect_refusal(llama_with("'num_key_value_heads':3"), UC_ERR_FORMAT,
                   "field=num_key_value_heads=3", "num_attention_heads=8");
    expect_refusal(llama_with("'num_key_value_heads':0"), UC_ERR_FORMAT,
                   "field=num_key_value_heads=0", NULL);
    expect_refusal(llama_with("'num_key_value_heads':16"), UC_ERR_FORMAT,
                   "field=num_key_value_heads=16", NULL);
    expect_refusal(
        "{'architectures':['LlamaForCausalLM'],'hidden_size':60,'intermediate_size':172,"
        "'num_hidden_layers':5,'num_attention_heads':8,'vocab_size':512}",
        UC_ERR_FORMAT, "field=hidden_size=60", "num_attention_heads");
    expect_refusal(
        "{'architectures':['LlamaForCausalLM'],'hidden_size':56,'intermediate_size':172,"
        "'num_hidden_layers':5,'num_attention_heads':8,'vocab_size':512}",
        UC_ERR_FORMAT, "field=head_dim=7", "even");
    expect_refusal(llama_with("'head_dim':9"), UC_ERR_FORMAT, "field=head_dim=9", NULL);
    expect_refusal(llama_with("'head_dim':0"), UC_ERR_FORMAT, "field=head_dim", NULL);
    expect_refusal(llama_with("'head_dim':12.5"), UC_ERR_FORMAT, "field=head_dim", NULL);
}

/* uc_model_config_load reads DIR/config.json; a missing file is UC_ERR_IO naming the path. */
static void test_load_from_dir(void **state)
{
    (void)state;
    char dir[] = "/tmp/uc_test_cfg_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    struct uc_model_config c;
    int64_t blocks = uc_mem_blocks_in_use();
    tu_log_reset();
    assert_int_equal(uc_model_config_load(&c, dir), UC_ERR_IO);
    assert_log_has(path);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);

    const char *j = q(llama_with("'eos_token_id':2"));
    assert_int_equal(uc_file_write_all(path, j, strlen(j)), UC_OK);
    assert_int_equal(uc_model_config_load(&c, dir), UC_OK);
    assert_int_equal(c.hidden, 64);
    assert_int_equal(c.eos_ids[0], 2);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);

    /* a bad file names its real path */
    const char *bad = q(llama_with("'hidden_act':'gelu_new'"));
    assert_int_equal(uc_file_write_all(path, bad, strlen(bad)), UC_OK);
    tu_log_reset();
    assert_int_equal(uc_model_config_load(&c, dir), UC_ERR_UNSUPPORTED);
    assert_log_has(path);
    assert_log_has("field=hidden_act=gelu_new");
    assert_int_equal(uc_mem_blocks_in_use(), blocks);

    /* allocation failures: each one is UC_ERR_NOMEM and leaks nothing */
    j = q(llama_with("'eos_token_id':2"));
    assert_int_equal(uc_file_write_all(path, j, strlen(j)), UC_OK);
    for (int64_t n = 1; n <= 4; n++) {
        uc_mem_fail_after(n);
        uc_status rc = uc_model_config_load(&c, dir);
        uc_mem_fail_after(0);
        assert_true(rc == UC_OK || rc == UC_ERR_NOMEM);
        assert_int_equal(uc_mem_blocks_in_use(), blocks);
        if (n <= 2) {
            assert_int_equal(rc, UC_ERR_NOMEM); /* the path, then the file buffer */
        }
    }
    unlink(path);
    rmdir(dir);
}

static void test_synthetic_presets(void **state)
{
    (void)state;
    struct uc_model_config c;
    assert_true(uc_model_is_synthetic("synthetic:llama3-8b"));
    assert_false(uc_model_is_synthetic("/models/llama3-8b"));
    assert_false(uc_model_is_synthetic("synthetic"));

    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:llama3-8b"), UC_OK);
    assert_string_equal(c.arch, "LlamaForCausalLM");
    assert_int_equal(c.n_layers, 32);
    assert_int_equal(c.hidden, 4096);
    assert_int_equal(c.ffn, 14336);
    assert_int_equal(c.n_heads, 32);
    assert_int_equal(c.n_heads_kv, 8);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.vocab, 128256);
    assert_int_equal(c.max_ctx, 131072);
    assert_true(c.rope_theta == 500000.0);
    assert_int_equal(c.rope_kind, UC_ROPE_LLAMA3);
    assert_true(c.rope_factor == 8.0);
    assert_true(c.rope_low_freq_factor == 1.0);
    assert_true(c.rope_high_freq_factor == 4.0);
    assert_true(c.rope_orig_max_ctx == 8192.0);
    assert_false(c.tie_embeddings);
    assert_int_equal(c.n_eos, 1);

    /* the preset parses to what the real config.json gives for the shape fields */
    struct uc_model_config real;
    assert_int_equal(parse(&real, LLAMA31_8B), UC_OK);
    assert_int_equal(real.n_layers, c.n_layers);
    assert_int_equal(real.ffn, c.ffn);
    assert_int_equal(real.head_dim, c.head_dim);
    assert_true(real.rope_factor == c.rope_factor);

    assert_int_equal(uc_model_config_synthetic(&c, "llama3-1b"), UC_OK);
    assert_int_equal(c.n_layers, 16);
    assert_int_equal(c.hidden, 2048);
    assert_int_equal(c.head_dim, 64);
    assert_true(c.tie_embeddings);

    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:llama3-70b"), UC_OK);
    assert_int_equal(c.n_layers, 80);
    assert_int_equal(c.hidden, 8192);
    assert_int_equal(c.n_heads, 64);
    assert_int_equal(c.ffn, 28672);

    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:tiny"), UC_OK);
    assert_int_equal(c.n_layers, 8);
    assert_int_equal(c.hidden, 256);
    assert_int_equal(c.n_heads, 8);
    assert_int_equal(c.n_heads_kv, 4);
    assert_int_equal(c.head_dim, 32);
    assert_int_equal(c.vocab, 4096);
    assert_int_equal(c.rope_kind, UC_ROPE_DEFAULT);
    assert_true(c.rope_theta == 10000.0);

    /* :layers=N keeps N layers and nothing else changes */
    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:llama3-70b:layers=5"), UC_OK);
    assert_int_equal(c.n_layers, 5);
    assert_int_equal(c.hidden, 8192);
    assert_int_equal(uc_model_config_synthetic(&c, "llama3-8b:layers=32"), UC_OK);
    assert_int_equal(c.n_layers, 32);

    tu_log_reset();
    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:llama3-8b:layers=0"),
                     UC_ERR_INVALID_ARG);
    assert_log_has("layers=N");
    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:llama3-8b:layers=33"),
                     UC_ERR_INVALID_ARG);
    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:tiny:heads=3"), UC_ERR_INVALID_ARG);
    tu_log_reset();
    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:gpt2"), UC_ERR_UNSUPPORTED);
    assert_log_has("gpt2");
    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:llama3-8bx"), UC_ERR_UNSUPPORTED);
    assert_int_equal(uc_model_config_synthetic(&c, "synthetic:"), UC_ERR_UNSUPPORTED);
}

/* The hash covers every field that changes the computation and ignores nothing that does. */
static void test_hash(void **state)
{
    (void)state;
    struct uc_model_config a, b;
    assert_int_equal(parse(&a, llama_with("'eos_token_id':2")), UC_OK);
    assert_int_equal(parse(&b, llama_with("'eos_token_id':2")), UC_OK);
    uint64_t h = uc_model_config_hash(&a);
    assert_true(h == uc_model_config_hash(&b));
    static const char *changes[] = {
        "'eos_token_id':3",
        "'eos_token_id':[2,3]",
        "'eos_token_id':2,'rope_theta':500000.0",
        "'eos_token_id':2,'rms_norm_eps':1e-5",
        "'eos_token_id':2,'tie_word_embeddings':true",
        "'eos_token_id':2,'head_dim':16",
        "'eos_token_id':2,'bos_token_id':1",
        "'eos_token_id':2,'rope_scaling':{'type':'linear','factor':2.0}",
        "'eos_token_id':2,'attention_bias':true",
        "'eos_token_id':2,'sliding_window':64",
    };
    for (size_t i = 0; i < sizeof changes / sizeof changes[0]; i++) {
        assert_int_equal(parse(&b, llama_with(changes[i])), UC_OK);
        if (uc_model_config_hash(&b) == h) {
            fail_msg("hash unchanged by %s", changes[i]);
        }
    }
    struct uc_model_config s1, s2;
    assert_int_equal(uc_model_config_synthetic(&s1, "llama3-8b"), UC_OK);
    assert_int_equal(uc_model_config_synthetic(&s2, "llama3-8b:layers=4"), UC_OK);
    assert_true(uc_model_config_hash(&s1) != uc_model_config_hash(&s2));
}

int main(void)
{
    tu_log_capture();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama31_8b),
        cmocka_unit_test(test_rope_parameters_tf5),
        cmocka_unit_test(test_head_dim_given_vs_derived),
        cmocka_unit_test(test_sliding_window),
        cmocka_unit_test(test_qwen2),
        cmocka_unit_test(test_rope_linear),
        cmocka_unit_test(test_rope_refusals),
        cmocka_unit_test(test_bos_eos),
        cmocka_unit_test(test_ids_and_dims_bounded),
        cmocka_unit_test(test_unsupported),
        cmocka_unit_test(test_missing_and_invalid_fields),
        cmocka_unit_test(test_load_from_dir),
        cmocka_unit_test(test_synthetic_presets),
        cmocka_unit_test(test_hash),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

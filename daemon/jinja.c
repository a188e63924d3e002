/* The Jinja subset of jinja.h: a lexer (with trim_blocks, lstrip_blocks and the `-` whitespace
 * controls), a recursive-descent parser into a tree kept in the template's arena, and a tree
 * walker whose values live in a per-render arena. Names of filters, tests and methods are checked
 * against the tables below when the template is parsed, so an unsupported one fails at load. */
#include "jinja.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/mem.h"
#include "base/util.h"

#define OUT_MAX_BYTES (16u << 20)
#define OPS_MAX 2000000
#define ARENA_MAX_BYTES (256u << 20)
#define DEPTH_MAX 64

/* ---- arena ---------------------------------------------------------------------------------- */

struct ablk {
    struct ablk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
};

struct arena {
    struct ablk *head;
    size_t total;
    bool oom;
    bool over; /* ARENA_MAX_BYTES reached */
};

static void *aalloc(struct arena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (!a->head || a->head->cap - a->head->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        if (a->total + cap > ARENA_MAX_BYTES) {
            a->oom = a->over = true;
            return NULL;
        }
        a->total += cap;
        struct ablk *b = uc_malloc(sizeof *b + cap);
        if (!b) {
            a->oom = true;
            return NULL;
        }
        b->next = a->head;
        b->used = 0;
        b->cap = cap;
        a->head = b;
    }
    void *p = a->head->data + a->head->used;
    a->head->used += n;
    memset(p, 0, n);
    return p;
}

static void afree(struct arena *a)
{
    struct ablk *b = a->head;
    while (b) {
        struct ablk *n = b->next;
        uc_free(b);
        b = n;
    }
    a->head = NULL;
}

static char *astrndup(struct arena *a, const char *s, size_t n)
{
    char *p = aalloc(a, n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* ---- lexer ---------------------------------------------------------------------------------- */

enum tk {
    TK_EOF, TK_TEXT, TK_EXPR_OPEN, TK_EXPR_CLOSE, TK_STMT_OPEN, TK_STMT_CLOSE, TK_NAME,
    TK_STR, TK_INT, TK_FLOAT, TK_OP,
};

struct token {
    enum tk kind;
    const char *s; /* TEXT/NAME/STR (decoded)/OP */
    size_t n;
    int64_t i;
    double f;
    int line;
};

struct lexer {
    struct arena *a;
    const char *src;
    size_t len, pos;
    int line;
    struct token *toks;
    size_t n_toks, cap_toks;
    char *msg;
    size_t msg_size;
    uc_status rc;
};

static bool lex_fail(struct lexer *L, uc_status rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool lex_fail(struct lexer *L, uc_status rc, const char *fmt, ...)
{
    if (L->rc == UC_OK) {
        va_list ap;
        va_start(ap, fmt);
        int k = snprintf(L->msg, L->msg_size, "line %d: ", L->line);
        if (k >= 0 && (size_t)k < L->msg_size) {
            vsnprintf(L->msg + k, L->msg_size - (size_t)k, fmt, ap);
        }
        va_end(ap);
        L->rc = rc;
    }
    return false;
}

static struct token *push_tok(struct lexer *L, enum tk kind, const char *s, size_t n)
{
    if (L->n_toks == L->cap_toks) {
        size_t cap = L->cap_toks ? L->cap_toks * 2 : 256;
        struct token *t = aalloc(L->a, cap * sizeof *t);
        if (!t) {
            lex_fail(L, UC_ERR_NOMEM, "out of memory");
            return NULL;
        }
        if (L->n_toks) {
            memcpy(t, L->toks, L->n_toks * sizeof *t);
        }
        L->toks = t;
        L->cap_toks = cap;
    }
    struct token *t = &L->toks[L->n_toks++];
    memset(t, 0, sizeof *t);
    t->kind = kind;
    t->s = s;
    t->n = n;
    t->line = L->line;
    return t;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
static bool is_ident0(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
static bool is_digit(char c) { return c >= '0' && c <= '9'; }

/* trim_blocks and lstrip_blocks as @huggingface/jinja applies them: on the text before lexing. */
static char *preprocess(struct arena *a, const char *src, size_t len, size_t *out_len)
{
    if (len > 0 && src[len - 1] == '\n') {
        len--;
    }
    char *o = aalloc(a, len + 1);
    if (!o) {
        return NULL;
    }
    size_t n = 0;
    /* lstrip_blocks: spaces and tabs at a line start before "{%", "{#" (or "{-") go */
    for (size_t i = 0; i < len;) {
        if (i == 0 || src[i - 1] == '\n') {
            size_t j = i;
            while (j < len && (src[j] == ' ' || src[j] == '\t')) {
                j++;
            }
            if (j + 1 < len && src[j] == '{' &&
                (src[j + 1] == '%' || src[j + 1] == '#' || src[j + 1] == '-')) {
                i = j;
            }
        }
        o[n++] = src[i++];
    }
    /* trim_blocks: the newline right after "%}", "#}" (or "-}") goes (matched on the text
     * lstrip_blocks left, as the reference does) */
    char *t = aalloc(a, n + 1);
    if (!t) {
        return NULL;
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (o[i] == '\n' && i >= 2 && o[i - 1] == '}' &&
            (o[i - 2] == '%' || o[i - 2] == '#' || o[i - 2] == '-')) {
            continue;
        }
        t[m++] = o[i];
    }
    o = t;
    o[m] = '\0';
    *out_len = m;
    return o;
}

static void rstrip_text(struct lexer *L)
{
    if (L->n_toks && L->toks[L->n_toks - 1].kind == TK_TEXT) {
        struct token *t = &L->toks[L->n_toks - 1];
        while (t->n && is_space(t->s[t->n - 1])) {
            t->n--;
        }
    }
}

static const char *const ops2[] = {"==", "!=", "<=", ">=", "//", "**", NULL};
static const char ops1[] = "+-*/%~<>=()[]{}.,:|!";

/* Lexes inside a tag up to its close; returns false on error. */
static bool lex_tag(struct lexer *L, bool stmt, bool *strip_next)
{
    int depth = 0;
    for (;;) {
        while (L->pos < L->len && is_space(L->src[L->pos])) {
            if (L->src[L->pos] == '\n') {
                L->line++;
            }
            L->pos++;
        }
        if (L->pos >= L->len) {
            return lex_fail(L, UC_ERR_FORMAT, "unclosed %s", stmt ? "{%" : "{{");
        }
        const char *p = L->src + L->pos;
        size_t left = L->len - L->pos;
        /* close */
        if (depth == 0) {
            bool dash = p[0] == '-' && left >= 3;
            const char *q = dash ? p + 1 : p;
            if (left >= (size_t)(dash ? 3 : 2) && q[1] == '}' && q[0] == (stmt ? '%' : '}')) {
                L->pos += dash ? 3 : 2;
                *strip_next = dash;
                return push_tok(L, stmt ? TK_STMT_CLOSE : TK_EXPR_CLOSE, NULL, 0) != NULL;
            }
        }
        if (is_ident0(p[0])) {
            size_t k = 1;
            while (k < left && (is_ident0(p[k]) || is_digit(p[k]))) {
                k++;
            }
            if (!push_tok(L, TK_NAME, p, k)) {
                return false;
            }
            L->pos += k;
            continue;
        }
        if (is_digit(p[0])) {
            size_t k = 0;
            bool fl = false;
            while (k < left && is_digit(p[k])) {
                k++;
            }
            if (k + 1 < left && p[k] == '.' && is_digit(p[k + 1])) {
                fl = true;
                k++;
                while (k < left && is_digit(p[k])) {
                    k++;
                }
            }
            char num[64];
            if (k >= sizeof num) {
                return lex_fail(L, UC_ERR_FORMAT, "number too long");
            }
            memcpy(num, p, k);
            num[k] = '\0';
            struct token *t = push_tok(L, fl ? TK_FLOAT : TK_INT, NULL, 0);
            if (!t) {
                return false;
            }
            if (fl) {
                t->f = strtod(num, NULL);
            } else {
                t->i = strtoll(num, NULL, 10);
                t->f = (double)t->i;
            }
            L->pos += k;
            continue;
        }
        if (p[0] == '\'' || p[0] == '"') {
            char qc = p[0];
            char *buf = aalloc(L->a, left + 1);
            if (!buf) {
                return lex_fail(L, UC_ERR_NOMEM, "out of memory");
            }
            size_t n = 0, k = 1;
            int line0 = L->line;
            while (k < left && p[k] != qc) {
                char c = p[k++];
                if (c == '\n') {
                    L->line++;
                }
                if (c == '\\' && k < left) {
                    char e = p[k++];
                    switch (e) {
                    case 'n': c = '\n'; break;
                    case 't': c = '\t'; break;
                    case 'r': c = '\r'; break;
                    case 'b': c = '\b'; break;
                    case 'f': c = '\f'; break;
                    case 'v': c = '\v'; break;
                    case '\\': c = '\\'; break;
                    case '\'': c = '\''; break;
                    case '"': c = '"'; break;
                    default:
                        buf[n++] = '\\';
                        c = e;
                        break;
                    }
                }
                buf[n++] = c;
            }
            if (k >= left) {
                L->line = line0;
                return lex_fail(L, UC_ERR_FORMAT, "unterminated string");
            }
            buf[n] = '\0';
            struct token *t = push_tok(L, TK_STR, buf, n);
            if (!t) {
                return false;
            }
            t->line = line0;
            L->pos += k + 1;
            continue;
        }
        const char *op = NULL;
        for (int i = 0; ops2[i]; i++) {
            if (left >= 2 && p[0] == ops2[i][0] && p[1] == ops2[i][1]) {
                op = ops2[i];
            }
        }
        size_t opn = op ? 2 : 1;
        if (!op) {
            const char *f = strchr(ops1, p[0]);
            if (!f || !p[0]) {
                return lex_fail(L, UC_ERR_FORMAT, "unexpected character '%c'", p[0]);
            }
            op = p;
        }
        if (op[0] == '(' || op[0] == '[' || op[0] == '{') {
            depth++;
        } else if (opn == 1 && (op[0] == ')' || op[0] == ']' || op[0] == '}')) {
            depth--;
            if (depth < 0) {
                return lex_fail(L, UC_ERR_FORMAT, "unbalanced '%c'", op[0]);
            }
        }
        if (!push_tok(L, TK_OP, op, opn)) {
            return false;
        }
        L->pos += opn;
    }
}

static bool lex(struct lexer *L)
{
    bool strip_next = false;
    while (L->pos < L->len) {
        const char *p = L->src + L->pos;
        size_t left = L->len - L->pos;
        size_t k = 0;
        while (k + 1 < left && !(p[k] == '{' && (p[k + 1] == '{' || p[k + 1] == '%' ||
                                                  p[k + 1] == '#'))) {
            k++;
        }
        if (k + 1 >= left) {
            k = left;
        }
        if (k > 0) {
            const char *s = p;
            size_t n = k;
            if (strip_next) {
                while (n && is_space(*s)) {
                    s++;
                    n--;
                }
            }
            if (n && !push_tok(L, TK_TEXT, s, n)) {
                return false;
            }
            for (size_t i = 0; i < k; i++) {
                L->line += p[i] == '\n';
            }
            L->pos += k;
        }
        strip_next = false;
        if (L->pos >= L->len) {
            break;
        }
        p = L->src + L->pos;
        left = L->len - L->pos;
        bool dash = left > 2 && p[2] == '-';
        if (dash) {
            rstrip_text(L);
        }
        if (p[1] == '#') {
            const char *e = NULL;
            for (size_t i = 2; i + 1 < left; i++) {
                if (p[i] == '#' && p[i + 1] == '}') {
                    e = p + i;
                    break;
                }
            }
            if (!e) {
                return lex_fail(L, UC_ERR_FORMAT, "unclosed comment");
            }
            strip_next = e > p + 2 && e[-1] == '-';
            for (const char *c = p; c < e; c++) {
                L->line += *c == '\n';
            }
            L->pos += (size_t)(e - p) + 2;
            continue;
        }
        bool stmt = p[1] == '%';
        if (!push_tok(L, stmt ? TK_STMT_OPEN : TK_EXPR_OPEN, NULL, 0)) {
            return false;
        }
        L->pos += dash ? 3 : 2;
        if (!lex_tag(L, stmt, &strip_next)) {
            return false;
        }
    }
    return push_tok(L, TK_EOF, NULL, 0) != NULL;
}

/* ---- tree ----------------------------------------------------------------------------------- */

enum nk {
    /* statements */
    N_TEXT, N_OUTPUT, N_IF, N_FOR, N_SET, N_SET_ATTR, N_SET_BLOCK, N_MACRO, N_BREAK, N_CONTINUE,
    /* expressions */
    E_NONE, E_BOOL, E_INT, E_FLOAT, E_STR, E_NAME, E_ATTR, E_INDEX, E_SLICE, E_CALL, E_FILTER,
    E_TEST, E_NEG, E_NOT, E_AND, E_OR, E_BIN, E_COND, E_LIST, E_DICT,
};

struct node;
struct nlist {
    struct node **v;
    int n;
};

struct node {
    enum nk kind;
    int line;
    const char *s; /* text, name, string literal, operator, filter/test/method name */
    size_t n;
    int64_t i;
    double f;
    bool neg;      /* `is not` */
    struct node *a, *b, *c;
    struct nlist args;   /* call/filter/test arguments, list/dict items (k0, v0, k1, ...) */
    const char **kw;     /* per argument: keyword name or NULL */
    struct nlist body, orelse;
    const char *targets[2];
    int n_targets;
};

struct parser {
    struct arena *a;
    const struct token *t;
    size_t pos;
    char *msg;
    size_t msg_size;
    uc_status rc;
};

static bool perr(struct parser *P, uc_status rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool perr(struct parser *P, uc_status rc, const char *fmt, ...)
{
    if (P->rc == UC_OK) {
        va_list ap;
        va_start(ap, fmt);
        int k = snprintf(P->msg, P->msg_size, "line %d: ", P->t[P->pos].line);
        if (k >= 0 && (size_t)k < P->msg_size) {
            vsnprintf(P->msg + k, P->msg_size - (size_t)k, fmt, ap);
        }
        va_end(ap);
        P->rc = rc;
    }
    return false;
}

static const struct token *cur(struct parser *P) { return &P->t[P->pos]; }

static bool tok_is(const struct token *t, enum tk k, const char *s)
{
    if (t->kind != k) {
        return false;
    }
    if (!s) {
        return true;
    }
    return t->n == strlen(s) && memcmp(t->s, s, t->n) == 0;
}
static bool at_op(struct parser *P, const char *s) { return tok_is(cur(P), TK_OP, s); }
static bool at_name(struct parser *P, const char *s) { return tok_is(cur(P), TK_NAME, s); }

static bool accept_op(struct parser *P, const char *s)
{
    if (at_op(P, s)) {
        P->pos++;
        return true;
    }
    return false;
}
static bool accept_name(struct parser *P, const char *s)
{
    if (at_name(P, s)) {
        P->pos++;
        return true;
    }
    return false;
}
static bool expect_op(struct parser *P, const char *s)
{
    if (accept_op(P, s)) {
        return true;
    }
    return perr(P, UC_ERR_FORMAT, "expected '%s'", s);
}

static struct node *mk(struct parser *P, enum nk kind)
{
    struct node *n = aalloc(P->a, sizeof *n);
    if (!n) {
        perr(P, UC_ERR_NOMEM, "out of memory");
        return NULL;
    }
    n->kind = kind;
    n->line = cur(P)->line;
    return n;
}

static bool nl_push(struct parser *P, struct nlist *l, struct node *x)
{
    if (!x) {
        return false;
    }
    if ((l->n & (l->n - 1)) == 0) { /* 0, 1, 2, 4, ...: grow */
        int cap = l->n ? l->n * 2 : 1;
        struct node **v = aalloc(P->a, (size_t)cap * sizeof *v);
        if (!v) {
            return perr(P, UC_ERR_NOMEM, "out of memory");
        }
        if (l->n) {
            memcpy(v, l->v, (size_t)l->n * sizeof *v);
        }
        l->v = v;
    }
    l->v[l->n++] = x;
    return true;
}

/* names the templates may use */
static const char *const filter_names[] = {
    "abs", "capitalize", "count", "d", "default", "dictsort", "first", "float", "indent",
    "int", "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject",
    "rejectattr", "replace", "reverse", "round", "safe", "select", "selectattr", "sort",
    "string", "sum", "title", "tojson", "trim", "unique", "upper", "wordcount", NULL};
static const char *const test_names[] = {
    "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "even", "false", "float",
    "ge", "gt", "in", "integer", "iterable", "le", "lower", "lt", "mapping", "ne", "none",
    "number", "odd", "sameas", "sequence", "string", "true", "undefined", "upper", NULL};
static const char *const method_names[] = {
    "append", "capitalize", "count", "endswith", "find", "get", "index", "items", "join",
    "keys", "lower", "lstrip", "pop", "replace", "rstrip", "split", "startswith", "strip",
    "title", "upper", "values", NULL};

static bool in_table(const char *const *tab, const char *s, size_t n)
{
    for (int i = 0; tab[i]; i++) {
        if (strlen(tab[i]) == n && memcmp(tab[i], s, n) == 0) {
            return true;
        }
    }
    return false;
}

static struct node *p_expr(struct parser *P);
static struct node *p_or(struct parser *P);

static bool p_args(struct parser *P, struct node *n)
{
    /* '(' already consumed */
    int cap = 0;
    while (!accept_op(P, ")")) {
        if (n->args.n > 0 && !expect_op(P, ",")) {
            return false;
        }
        if (accept_op(P, ")")) {
            break;
        }
        const char *kw = NULL;
        if (cur(P)->kind == TK_NAME && tok_is(&P->t[P->pos + 1], TK_OP, "=")) {
            kw = astrndup(P->a, cur(P)->s, cur(P)->n);
            P->pos += 2;
        }
        if (!nl_push(P, &n->args, p_expr(P))) {
            return false;
        }
        if (n->args.n > cap) {
            int nc = cap ? cap * 2 : 4;
            while (nc < n->args.n) {
                nc *= 2;
            }
            const char **k = aalloc(P->a, (size_t)nc * sizeof *k);
            if (!k) {
                return perr(P, UC_ERR_NOMEM, "out of memory");
            }
            if (n->kw) {
                memcpy(k, n->kw, (size_t)(n->args.n - 1) * sizeof *k);
            }
            n->kw = k;
            cap = nc;
        }
        n->kw[n->args.n - 1] = kw;
    }
    return true;
}

static struct node *p_primary(struct parser *P)
{
    const struct token *t = cur(P);
    struct node *n = NULL;
    switch (t->kind) {
    case TK_STR: {
        n = mk(P, E_STR);
        if (!n) {
            return NULL;
        }
        /* adjacent literals concatenate, as in Python */
        size_t total = 0;
        size_t j = P->pos;
        while (P->t[j].kind == TK_STR) {
            total += P->t[j++].n;
        }
        char *s = aalloc(P->a, total + 1);
        if (!s) {
            perr(P, UC_ERR_NOMEM, "out of memory");
            return NULL;
        }
        size_t o = 0;
        while (cur(P)->kind == TK_STR) {
            memcpy(s + o, cur(P)->s, cur(P)->n);
            o += cur(P)->n;
            P->pos++;
        }
        n->s = s;
        n->n = total;
        return n;
    }
    case TK_INT:
    case TK_FLOAT:
        n = mk(P, t->kind == TK_INT ? E_INT : E_FLOAT);
        if (n) {
            n->i = t->i;
            n->f = t->f;
            P->pos++;
        }
        return n;
    case TK_NAME:
        if (tok_is(t, TK_NAME, "true") || tok_is(t, TK_NAME, "True") ||
            tok_is(t, TK_NAME, "false") || tok_is(t, TK_NAME, "False")) {
            n = mk(P, E_BOOL);
            if (n) {
                n->i = t->s[0] == 't' || t->s[0] == 'T';
                P->pos++;
            }
            return n;
        }
        if (tok_is(t, TK_NAME, "none") || tok_is(t, TK_NAME, "None")) {
            n = mk(P, E_NONE);
            P->pos++;
            return n;
        }
        n = mk(P, E_NAME);
        if (n) {
            n->s = astrndup(P->a, t->s, t->n);
            n->n = t->n;
            P->pos++;
        }
        return n;
    case TK_OP:
        if (accept_op(P, "(")) {
            struct node *e = p_expr(P);
            if (!e) {
                return NULL;
            }
            if (at_op(P, ",")) { /* a tuple: a list */
                n = mk(P, E_LIST);
                if (!n || !nl_push(P, &n->args, e)) {
                    return NULL;
                }
                while (accept_op(P, ",")) {
                    if (at_op(P, ")")) {
                        break;
                    }
                    if (!nl_push(P, &n->args, p_expr(P))) {
                        return NULL;
                    }
                }
                e = n;
            }
            return expect_op(P, ")") ? e : NULL;
        }
        if (accept_op(P, "[")) {
            n = mk(P, E_LIST);
            while (n && !accept_op(P, "]")) {
                if (n->args.n > 0 && !expect_op(P, ",")) {
                    return NULL;
                }
                if (accept_op(P, "]")) {
                    break;
                }
                if (!nl_push(P, &n->args, p_expr(P))) {
                    return NULL;
                }
            }
            return n;
        }
        if (accept_op(P, "{")) {
            n = mk(P, E_DICT);
            while (n && !accept_op(P, "}")) {
                if (n->args.n > 0 && !expect_op(P, ",")) {
                    return NULL;
                }
                if (accept_op(P, "}")) {
                    break;
                }
                if (!nl_push(P, &n->args, p_expr(P)) || !expect_op(P, ":") ||
                    !nl_push(P, &n->args, p_expr(P))) {
                    return NULL;
                }
            }
            return n;
        }
        break;
    default:
        break;
    }
    perr(P, UC_ERR_FORMAT, "unexpected %s in an expression",
         t->kind == TK_EOF ? "end of template" : t->kind == TK_STMT_CLOSE ? "'%}'"
                                             : t->kind == TK_EXPR_CLOSE ? "'}}'" : "token");
    return NULL;
}

static struct node *p_postfix(struct parser *P, struct node *n)
{
    while (n) {
        if (accept_op(P, ".")) {
            if (cur(P)->kind != TK_NAME) {
                perr(P, UC_ERR_FORMAT, "expected a name after '.'");
                return NULL;
            }
            struct node *m = mk(P, E_ATTR);
            if (!m) {
                return NULL;
            }
            m->a = n;
            m->s = astrndup(P->a, cur(P)->s, cur(P)->n);
            m->n = cur(P)->n;
            P->pos++;
            n = m;
        } else if (accept_op(P, "[")) {
            struct node *parts[3] = {NULL, NULL, NULL};
            int colons = 0;
            for (;;) {
                if (at_op(P, ":")) {
                    if (++colons > 2) {
                        perr(P, UC_ERR_FORMAT, "too many ':' in a slice");
                        return NULL;
                    }
                    P->pos++;
                    continue;
                }
                if (at_op(P, "]")) {
                    P->pos++;
                    break;
                }
                if (parts[colons]) {
                    perr(P, UC_ERR_FORMAT, "expected ']'");
                    return NULL;
                }
                parts[colons] = p_expr(P);
                if (!parts[colons]) {
                    return NULL;
                }
            }
            struct node *m = mk(P, colons ? E_SLICE : E_INDEX);
            if (!m) {
                return NULL;
            }
            if (!colons && !parts[0]) {
                perr(P, UC_ERR_FORMAT, "empty subscript");
                return NULL;
            }
            m->a = n;
            m->b = parts[0];
            m->c = parts[1];
            if (colons) {
                m->args.v = NULL;
                if (parts[2] && !nl_push(P, &m->args, parts[2])) {
                    return NULL;
                }
            }
            n = m;
        } else if (accept_op(P, "(")) {
            struct node *m = mk(P, E_CALL);
            if (!m) {
                return NULL;
            }
            m->a = n;
            if (n->kind == E_ATTR && !in_table(method_names, n->s, n->n) &&
                !(n->n == 5 && memcmp(n->s, "cycle", 5) == 0)) {
                perr(P, UC_ERR_UNSUPPORTED, "unsupported method '%s'", n->s);
                return NULL;
            }
            if (!p_args(P, m)) {
                return NULL;
            }
            n = m;
        } else {
            break;
        }
    }
    return n;
}

static struct node *p_filters(struct parser *P, struct node *n)
{
    while (n) {
        if (accept_op(P, "|")) {
            if (cur(P)->kind != TK_NAME) {
                perr(P, UC_ERR_FORMAT, "expected a filter name after '|'");
                return NULL;
            }
            const struct token *t = cur(P);
            if (!in_table(filter_names, t->s, t->n)) {
                perr(P, UC_ERR_UNSUPPORTED, "unsupported filter '%.*s'", (int)t->n, t->s);
                return NULL;
            }
            struct node *m = mk(P, E_FILTER);
            if (!m) {
                return NULL;
            }
            m->a = n;
            m->s = astrndup(P->a, t->s, t->n);
            m->n = t->n;
            P->pos++;
            if (accept_op(P, "(") && !p_args(P, m)) {
                return NULL;
            }
            n = m;
        } else if (accept_name(P, "is")) {
            struct node *m = mk(P, E_TEST);
            if (!m) {
                return NULL;
            }
            m->neg = accept_name(P, "not");
            const struct token *t = cur(P);
            if (t->kind != TK_NAME) {
                perr(P, UC_ERR_FORMAT, "expected a test name after 'is'");
                return NULL;
            }
            if (!in_table(test_names, t->s, t->n)) {
                perr(P, UC_ERR_UNSUPPORTED, "unsupported test '%.*s'", (int)t->n, t->s);
                return NULL;
            }
            m->a = n;
            m->s = astrndup(P->a, t->s, t->n);
            m->n = t->n;
            P->pos++;
            if (accept_op(P, "(")) {
                if (!p_args(P, m)) {
                    return NULL;
                }
            } else if (cur(P)->kind == TK_STR || cur(P)->kind == TK_INT ||
                       cur(P)->kind == TK_FLOAT ||
                       (cur(P)->kind == TK_NAME && !at_name(P, "and") && !at_name(P, "or") &&
                        !at_name(P, "else") && !at_name(P, "if") && !at_name(P, "in") &&
                        !at_name(P, "not") && !at_name(P, "is"))) {
                if (!nl_push(P, &m->args, p_primary(P))) {
                    return NULL;
                }
            }
            n = m;
        } else {
            break;
        }
    }
    return n;
}

static struct node *p_unary_nf(struct parser *P, bool with_filter);
static struct node *p_unary(struct parser *P) { return p_unary_nf(P, true); }

/* Jinja's parse_unary: `-x|f` is (-x)|f */
static struct node *p_unary_nf(struct parser *P, bool with_filter)
{
    if (accept_op(P, "-")) {
        struct node *n = mk(P, E_NEG);
        if (n) {
            n->a = p_unary_nf(P, false);
            if (!n->a) {
                return NULL;
            }
        }
        return with_filter ? p_filters(P, n) : n;
    }
    if (accept_op(P, "+")) {
        return p_unary_nf(P, with_filter);
    }
    struct node *n = p_postfix(P, p_primary(P));
    return with_filter ? p_filters(P, n) : n;
}

static struct node *bin(struct parser *P, const char *op, struct node *a, struct node *b)
{
    if (!a || !b) {
        return NULL;
    }
    struct node *n = mk(P, E_BIN);
    if (n) {
        n->s = op;
        n->a = a;
        n->b = b;
    }
    return n;
}

static struct node *p_pow(struct parser *P)
{
    struct node *a = p_unary(P);
    while (a && at_op(P, "**")) {
        P->pos++;
        a = bin(P, "**", a, p_unary(P));
    }
    return a;
}

static struct node *p_mul(struct parser *P)
{
    struct node *a = p_pow(P);
    for (;;) {
        const char *op = at_op(P, "*") ? "*" : at_op(P, "//") ? "//" : at_op(P, "/") ? "/"
                         : at_op(P, "%") ? "%" : NULL;
        if (!a || !op) {
            return a;
        }
        P->pos++;
        a = bin(P, op, a, p_pow(P));
    }
}

static struct node *p_concat(struct parser *P)
{
    struct node *a = p_mul(P);
    while (a && at_op(P, "~")) {
        P->pos++;
        a = bin(P, "~", a, p_mul(P));
    }
    return a;
}

static struct node *p_add(struct parser *P)
{
    struct node *a = p_concat(P);
    for (;;) {
        const char *op = at_op(P, "+") ? "+" : at_op(P, "-") ? "-" : NULL;
        if (!a || !op) {
            return a;
        }
        P->pos++;
        a = bin(P, op, a, p_concat(P));
    }
}

static struct node *p_compare(struct parser *P)
{
    struct node *a = p_add(P);
    for (;;) {
        const char *op = NULL;
        static const char *const cmps[] = {"==", "!=", "<=", ">=", "<", ">", NULL};
        for (int i = 0; cmps[i] && !op; i++) {
            if (at_op(P, cmps[i])) {
                op = cmps[i];
            }
        }
        if (!a) {
            return NULL;
        }
        if (op) {
            P->pos++;
        } else if (at_name(P, "in")) {
            P->pos++;
            op = "in";
        } else if (at_name(P, "not") && tok_is(&P->t[P->pos + 1], TK_NAME, "in")) {
            P->pos += 2;
            op = "not in";
        } else {
            return a;
        }
        a = bin(P, op, a, p_add(P));
    }
}

static struct node *p_not(struct parser *P)
{
    if (accept_name(P, "not")) {
        struct node *n = mk(P, E_NOT);
        if (n) {
            n->a = p_not(P);
            if (!n->a) {
                return NULL;
            }
        }
        return n;
    }
    return p_compare(P);
}

static struct node *p_and(struct parser *P)
{
    struct node *a = p_not(P);
    while (a && accept_name(P, "and")) {
        struct node *n = mk(P, E_AND);
        if (!n) {
            return NULL;
        }
        n->a = a;
        n->b = p_not(P);
        if (!n->b) {
            return NULL;
        }
        a = n;
    }
    return a;
}

static struct node *p_or(struct parser *P)
{
    struct node *a = p_and(P);
    while (a && accept_name(P, "or")) {
        struct node *n = mk(P, E_OR);
        if (!n) {
            return NULL;
        }
        n->a = a;
        n->b = p_and(P);
        if (!n->b) {
            return NULL;
        }
        a = n;
    }
    return a;
}

static struct node *p_expr(struct parser *P)
{
    struct node *a = p_or(P);
    while (a && at_name(P, "if")) {
        P->pos++;
        struct node *n = mk(P, E_COND);
        if (!n) {
            return NULL;
        }
        n->a = a;
        n->b = p_or(P);
        if (!n->b) {
            return NULL;
        }
        if (accept_name(P, "else")) {
            n->c = p_expr(P);
            if (!n->c) {
                return NULL;
            }
        }
        a = n;
    }
    return a;
}

/* ---- statements ----------------------------------------------------------------------------- */

static bool p_body(struct parser *P, struct nlist *body, const char *const *ends, int *which);

static bool expect_close(struct parser *P)
{
    if (cur(P)->kind == TK_STMT_CLOSE) {
        P->pos++;
        return true;
    }
    return perr(P, UC_ERR_FORMAT, "expected '%%}'");
}

static bool take_name(struct parser *P, const char **out, size_t *n)
{
    if (cur(P)->kind != TK_NAME) {
        return perr(P, UC_ERR_FORMAT, "expected a name");
    }
    *out = astrndup(P->a, cur(P)->s, cur(P)->n);
    if (n) {
        *n = cur(P)->n;
    }
    P->pos++;
    return *out != NULL;
}

static struct node *p_if(struct parser *P)
{
    struct node *n = mk(P, N_IF);
    if (!n || !(n->a = p_expr(P)) || !expect_close(P)) {
        return NULL;
    }
    static const char *const ends[] = {"elif", "else", "endif", NULL};
    int which = -1;
    if (!p_body(P, &n->body, ends, &which)) {
        return NULL;
    }
    if (which == 0) {
        struct node *e = p_if(P);
        if (!e || !nl_push(P, &n->orelse, e)) {
            return NULL;
        }
        return n;
    }
    if (which == 1) {
        static const char *const ends2[] = {"endif", NULL};
        if (!expect_close(P) || !p_body(P, &n->orelse, ends2, &which)) {
            return NULL;
        }
    }
    return expect_close(P) ? n : NULL;
}

static struct node *p_stmt(struct parser *P)
{
    const struct token *t = cur(P);
    if (t->kind != TK_NAME) {
        perr(P, UC_ERR_FORMAT, "expected a statement name after '{%%'");
        return NULL;
    }
    if (accept_name(P, "if")) {
        return p_if(P);
    }
    if (accept_name(P, "for")) {
        struct node *n = mk(P, N_FOR);
        if (!n) {
            return NULL;
        }
        do {
            if (n->n_targets == 2) {
                perr(P, UC_ERR_UNSUPPORTED, "unsupported: more than two loop targets");
                return NULL;
            }
            if (!take_name(P, &n->targets[n->n_targets++], NULL)) {
                return NULL;
            }
        } while (accept_op(P, ","));
        if (!accept_name(P, "in")) {
            perr(P, UC_ERR_FORMAT, "expected 'in' in a for statement");
            return NULL;
        }
        n->a = p_or(P); /* `if` after the iterable filters items */
        if (!n->a) {
            return NULL;
        }
        if (accept_name(P, "if")) {
            n->b = p_expr(P);
            if (!n->b) {
                return NULL;
            }
        }
        if (at_name(P, "recursive")) {
            perr(P, UC_ERR_UNSUPPORTED, "unsupported: recursive loops");
            return NULL;
        }
        if (!expect_close(P)) {
            return NULL;
        }
        static const char *const ends[] = {"else", "endfor", NULL};
        int which = -1;
        if (!p_body(P, &n->body, ends, &which)) {
            return NULL;
        }
        if (which == 0) {
            static const char *const ends2[] = {"endfor", NULL};
            if (!expect_close(P) || !p_body(P, &n->orelse, ends2, &which)) {
                return NULL;
            }
        }
        return expect_close(P) ? n : NULL;
    }
    if (accept_name(P, "set")) {
        const char *name;
        size_t nl;
        if (!take_name(P, &name, &nl)) {
            return NULL;
        }
        struct node *n;
        if (accept_op(P, ".")) {
            n = mk(P, N_SET_ATTR);
            if (!n || !take_name(P, &n->targets[1], NULL)) {
                return NULL;
            }
        } else if (at_op(P, ",")) {
            perr(P, UC_ERR_UNSUPPORTED, "unsupported: set with several targets");
            return NULL;
        } else if (cur(P)->kind == TK_STMT_CLOSE) {
            n = mk(P, N_SET_BLOCK);
            if (!n) {
                return NULL;
            }
            n->targets[0] = name;
            P->pos++;
            static const char *const ends[] = {"endset", NULL};
            int which;
            if (!p_body(P, &n->body, ends, &which) || !expect_close(P)) {
                return NULL;
            }
            return n;
        } else {
            n = mk(P, N_SET);
        }
        if (!n) {
            return NULL;
        }
        n->targets[0] = name;
        if (!expect_op(P, "=") || !(n->a = p_expr(P)) || !expect_close(P)) {
            return NULL;
        }
        return n;
    }
    if (accept_name(P, "macro")) {
        struct node *n = mk(P, N_MACRO);
        if (!n || !take_name(P, &n->targets[0], NULL) || !expect_op(P, "(")) {
            return NULL;
        }
        /* parameters: names with optional defaults, kept as args (E_NAME or a default) */
        while (!accept_op(P, ")")) {
            if (n->args.n > 0 && !expect_op(P, ",")) {
                return NULL;
            }
            struct node *prm = mk(P, E_NAME);
            if (!prm || !take_name(P, &prm->s, &prm->n)) {
                return NULL;
            }
            if (accept_op(P, "=")) {
                prm->a = p_expr(P);
                if (!prm->a) {
                    return NULL;
                }
            }
            if (!nl_push(P, &n->args, prm)) {
                return NULL;
            }
        }
        if (!expect_close(P)) {
            return NULL;
        }
        static const char *const ends[] = {"endmacro", NULL};
        int which;
        if (!p_body(P, &n->body, ends, &which)) {
            return NULL;
        }
        if (cur(P)->kind == TK_NAME) {
            P->pos++; /* {% endmacro name %} */
        }
        return expect_close(P) ? n : NULL;
    }
    if (accept_name(P, "break") || accept_name(P, "continue")) {
        struct node *n = mk(P, t->s[0] == 'b' ? N_BREAK : N_CONTINUE);
        return n && expect_close(P) ? n : NULL;
    }
    if (accept_name(P, "generation") || accept_name(P, "endgeneration")) {
        struct node *n = mk(P, N_TEXT); /* assistant-mask markers: no output */
        return n && expect_close(P) ? n : NULL;
    }
    perr(P, UC_ERR_UNSUPPORTED, "unsupported statement '%.*s'", (int)t->n, t->s);
    return NULL;
}

/* Parses statements until one of `ends` (a `{% name` left with its name consumed; *which is its
 * index) or, with ends NULL, the end of the template. */
static bool p_body(struct parser *P, struct nlist *body, const char *const *ends, int *which)
{
    for (;;) {
        const struct token *t = cur(P);
        if (t->kind == TK_EOF) {
            if (ends) {
                int last = 0;
                while (ends[last + 1]) {
                    last++;
                }
                return perr(P, UC_ERR_FORMAT, "missing '{%% %s %%}'", ends[last]);
            }
            return true;
        }
        if (t->kind == TK_TEXT) {
            struct node *n = mk(P, N_TEXT);
            if (!n) {
                return false;
            }
            n->s = t->s;
            n->n = t->n;
            P->pos++;
            if (!nl_push(P, body, n)) {
                return false;
            }
            continue;
        }
        if (t->kind == TK_EXPR_OPEN) {
            P->pos++;
            struct node *n = mk(P, N_OUTPUT);
            if (!n || !(n->a = p_expr(P))) {
                return false;
            }
            if (cur(P)->kind != TK_EXPR_CLOSE) {
                return perr(P, UC_ERR_FORMAT, "expected '}}'");
            }
            P->pos++;
            if (!nl_push(P, body, n)) {
                return false;
            }
            continue;
        }
        if (t->kind == TK_STMT_OPEN) {
            const struct token *kw = &P->t[P->pos + 1];
            if (ends && kw->kind == TK_NAME) {
                for (int i = 0; ends[i]; i++) {
                    if (tok_is(kw, TK_NAME, ends[i])) {
                        P->pos += 2;
                        *which = i;
                        return true;
                    }
                }
            }
            if (kw->kind == TK_NAME &&
                (tok_is(kw, TK_NAME, "endif") || tok_is(kw, TK_NAME, "endfor") ||
                 tok_is(kw, TK_NAME, "else") || tok_is(kw, TK_NAME, "elif") ||
                 tok_is(kw, TK_NAME, "endset") || tok_is(kw, TK_NAME, "endmacro"))) {
                P->pos++;
                return perr(P, UC_ERR_FORMAT, "unexpected '{%% %.*s %%}'", (int)kw->n, kw->s);
            }
            P->pos++;
            if (!nl_push(P, body, p_stmt(P))) {
                return false;
            }
            continue;
        }
        return perr(P, UC_ERR_FORMAT, "unexpected token");
    }
}

struct uc_jinja {
    struct arena a;
    struct nlist body;
};

uc_status uc_jinja_create(struct uc_jinja **out, const char *src, size_t len, char *msg,
                          size_t msg_size)
{
    *out = NULL;
    msg[0] = '\0';
    struct uc_jinja *t = uc_calloc(1, sizeof *t);
    if (!t) {
        snprintf(msg, msg_size, "out of memory");
        return UC_ERR_NOMEM;
    }
    size_t plen = 0;
    char *pre = preprocess(&t->a, src, len, &plen);
    struct lexer L = {.a = &t->a, .src = pre, .len = plen, .line = 1, .msg = msg,
                      .msg_size = msg_size, .rc = UC_OK};
    if (!pre) {
        snprintf(msg, msg_size, "out of memory");
        uc_jinja_destroy(t);
        return UC_ERR_NOMEM;
    }
    if (!lex(&L)) {
        uc_jinja_destroy(t);
        return L.rc;
    }
    struct parser P = {.a = &t->a, .t = L.toks, .msg = msg, .msg_size = msg_size, .rc = UC_OK};
    if (!p_body(&P, &t->body, NULL, NULL)) {
        uc_jinja_destroy(t);
        return P.rc != UC_OK ? P.rc : UC_ERR_FORMAT;
    }
    *out = t;
    return UC_OK;
}

void uc_jinja_destroy(struct uc_jinja *t)
{
    if (!t) {
        return;
    }
    afree(&t->a);
    uc_free(t);
}

/* ---- values --------------------------------------------------------------------------------- */

enum vk { VK_UNDEF, VK_NONE, VK_BOOL, VK_INT, VK_FLOAT, VK_STR, VK_LIST, VK_DICT, VK_MACRO,
          VK_GLOBAL };
enum glob { G_RANGE = 1, G_NAMESPACE, G_RAISE, G_STRFTIME, G_DICT, G_CYCLE };

struct vlist;
struct vdict;
struct val {
    enum vk k;
    int64_t i;    /* BOOL, INT, GLOBAL */
    double f;
    const char *s;
    size_t n;
    struct vlist *l;
    struct vdict *d;
    const struct node *m;
};

struct vlist {
    struct val *v;
    int64_t n, cap;
};

struct vdict {
    struct val *keys; /* strings */
    struct val *vals;
    int64_t n, cap;
};

struct frame {
    struct vdict *vars;
    struct frame *parent;
};

struct rctx {
    struct arena a;
    char *msg;
    size_t msg_size;
    uc_status rc;
    int64_t ops;
    int depth;
    int ctl; /* 1 break, 2 continue */
    struct frame *root;
};

static bool rerr(struct rctx *R, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool rerr(struct rctx *R, int line, const char *fmt, ...)
{
    if (R->rc == UC_OK) {
        va_list ap;
        va_start(ap, fmt);
        int k = line > 0 ? snprintf(R->msg, R->msg_size, "line %d: ", line) : 0;
        if (k >= 0 && (size_t)k < R->msg_size) {
            vsnprintf(R->msg + k, R->msg_size - (size_t)k, fmt, ap);
        }
        va_end(ap);
        R->rc = UC_ERR_INVALID_ARG;
    }
    return false;
}

static bool oom(struct rctx *R)
{
    if (R->rc == UC_OK && R->a.over) {
        snprintf(R->msg, R->msg_size, "the template needs more than %u MiB",
                 ARENA_MAX_BYTES >> 20);
        R->rc = UC_ERR_INVALID_ARG;
    } else if (R->rc == UC_OK) {
        snprintf(R->msg, R->msg_size, "out of memory");
        R->rc = UC_ERR_NOMEM;
    }
    return false;
}

static struct val v_undef(void) { return (struct val){.k = VK_UNDEF}; }
static struct val v_none(void) { return (struct val){.k = VK_NONE}; }
static struct val v_bool(bool b) { return (struct val){.k = VK_BOOL, .i = b}; }
static struct val v_int(int64_t i) { return (struct val){.k = VK_INT, .i = i, .f = (double)i}; }
static struct val v_float(double f) { return (struct val){.k = VK_FLOAT, .f = f}; }
static struct val v_str(const char *s, size_t n) { return (struct val){.k = VK_STR, .s = s, .n = n}; }

static struct vlist *list_new(struct rctx *R)
{
    struct vlist *l = aalloc(&R->a, sizeof *l);
    if (!l) {
        oom(R);
    }
    return l;
}

static bool list_push(struct rctx *R, struct vlist *l, struct val v)
{
    if (l->n == l->cap) {
        int64_t cap = l->cap ? l->cap * 2 : 8;
        struct val *nv = aalloc(&R->a, (size_t)cap * sizeof *nv);
        if (!nv) {
            return oom(R);
        }
        if (l->n) {
            memcpy(nv, l->v, (size_t)l->n * sizeof *nv);
        }
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
    return true;
}

static struct vdict *dict_new(struct rctx *R)
{
    struct vdict *d = aalloc(&R->a, sizeof *d);
    if (!d) {
        oom(R);
    }
    return d;
}

static int64_t dict_find(const struct vdict *d, const char *s, size_t n)
{
    for (int64_t i = 0; i < d->n; i++) {
        if (d->keys[i].n == n && memcmp(d->keys[i].s, s, n) == 0) {
            return i;
        }
    }
    return -1;
}

static bool dict_set(struct rctx *R, struct vdict *d, const char *s, size_t n, struct val v)
{
    int64_t i = dict_find(d, s, n);
    if (i >= 0) {
        d->vals[i] = v;
        return true;
    }
    if (d->n == d->cap) {
        int64_t cap = d->cap ? d->cap * 2 : 8;
        struct val *nk = aalloc(&R->a, (size_t)cap * sizeof *nk);
        struct val *nv = aalloc(&R->a, (size_t)cap * sizeof *nv);
        if (!nk || !nv) {
            return oom(R);
        }
        if (d->n) {
            memcpy(nk, d->keys, (size_t)d->n * sizeof *nk);
            memcpy(nv, d->vals, (size_t)d->n * sizeof *nv);
        }
        d->keys = nk;
        d->vals = nv;
        d->cap = cap;
    }
    d->keys[d->n] = v_str(s, n);
    d->vals[d->n] = v;
    d->n++;
    return true;
}

static struct val from_json(struct rctx *R, const cJSON *j)
{
    if (!j || cJSON_IsNull(j)) {
        return v_none();
    }
    if (cJSON_IsBool(j)) {
        return v_bool(cJSON_IsTrue(j));
    }
    if (cJSON_IsNumber(j)) {
        double f = j->valuedouble;
        if (f == floor(f) && fabs(f) < 9e15) {
            return v_int((int64_t)f);
        }
        return v_float(f);
    }
    if (cJSON_IsString(j)) {
        return v_str(j->valuestring, strlen(j->valuestring));
    }
    if (cJSON_IsArray(j)) {
        struct vlist *l = list_new(R);
        for (const cJSON *c = j->child; l && c; c = c->next) {
            if (!list_push(R, l, from_json(R, c))) {
                break;
            }
        }
        return l ? (struct val){.k = VK_LIST, .l = l} : v_none();
    }
    if (cJSON_IsObject(j)) {
        struct vdict *d = dict_new(R);
        for (const cJSON *c = j->child; d && c; c = c->next) {
            if (!dict_set(R, d, c->string, strlen(c->string), from_json(R, c))) {
                break;
            }
        }
        return d ? (struct val){.k = VK_DICT, .d = d} : v_none();
    }
    return v_none();
}

static bool truthy(const struct val *v)
{
    switch (v->k) {
    case VK_UNDEF:
    case VK_NONE:
        return false;
    case VK_BOOL:
    case VK_INT:
        return v->i != 0;
    case VK_FLOAT:
        return v->f != 0.0;
    case VK_STR:
        return v->n > 0;
    case VK_LIST:
        return v->l->n > 0;
    case VK_DICT:
        return v->d->n > 0;
    default:
        return true;
    }
}

static const char *type_name(const struct val *v)
{
    static const char *const names[] = {"undefined", "none", "boolean", "integer", "float",
                                        "string", "list", "dict", "macro", "function"};
    return names[v->k];
}

static void put_json_str(struct uc_buf *b, const char *s, size_t n)
{
    uc_buf_append(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': uc_buf_append(b, "\\\"", 2); break;
        case '\\': uc_buf_append(b, "\\\\", 2); break;
        case '\n': uc_buf_append(b, "\\n", 2); break;
        case '\r': uc_buf_append(b, "\\r", 2); break;
        case '\t': uc_buf_append(b, "\\t", 2); break;
        case '\b': uc_buf_append(b, "\\b", 2); break;
        case '\f': uc_buf_append(b, "\\f", 2); break;
        default:
            if (c < 0x20) {
                uc_buf_printf(b, "\\u%04x", c);
            } else {
                uc_buf_append(b, &s[i], 1);
            }
        }
    }
    uc_buf_append(b, "\"", 1);
}

static void put_num(struct uc_buf *b, const struct val *v)
{
    if (v->k == VK_INT) {
        uc_buf_printf(b, "%lld", (long long)v->i);
        return;
    }
    double f = v->f;
    if (isnan(f)) {
        uc_buf_puts(b, "NaN");
    } else if (isinf(f)) {
        uc_buf_puts(b, f > 0 ? "Infinity" : "-Infinity");
    } else if (f == floor(f) && fabs(f) < 1e16) {
        uc_buf_printf(b, "%.1f", f);
    } else {
        char tmp[40];
        for (int prec = 1; prec <= 17; prec++) { /* shortest that reads back the same */
            snprintf(tmp, sizeof tmp, "%.*g", prec, f);
            if (strtod(tmp, NULL) == f) {
                break;
            }
        }
        uc_buf_puts(b, tmp);
    }
}

/* JSON text: tojson, and how lists and dicts print (as @huggingface/jinja prints them). */
static void put_json(struct uc_buf *b, const struct val *v, int indent, int level)
{
    switch (v->k) {
    case VK_UNDEF:
    case VK_NONE:
        uc_buf_puts(b, "null");
        return;
    case VK_BOOL:
        uc_buf_puts(b, v->i ? "true" : "false");
        return;
    case VK_INT:
    case VK_FLOAT:
        put_num(b, v);
        return;
    case VK_STR:
        put_json_str(b, v->s, v->n);
        return;
    case VK_LIST:
    case VK_DICT: {
        bool is_list = v->k == VK_LIST;
        int64_t n = is_list ? v->l->n : v->d->n;
        uc_buf_puts(b, is_list ? "[" : "{");
        for (int64_t i = 0; i < n; i++) {
            if (i) {
                uc_buf_puts(b, indent > 0 ? "," : ", ");
            }
            if (indent > 0) {
                uc_buf_printf(b, "\n%*s", indent * (level + 1), "");
            }
            if (!is_list) {
                put_json_str(b, v->d->keys[i].s, v->d->keys[i].n);
                uc_buf_puts(b, ": ");
            }
            put_json(b, is_list ? &v->l->v[i] : &v->d->vals[i], indent, level + 1);
        }
        if (indent > 0 && n > 0) {
            uc_buf_printf(b, "\n%*s", indent * level, "");
        }
        uc_buf_puts(b, is_list ? "]" : "}");
        return;
    }
    default:
        uc_buf_puts(b, "null");
    }
}

static void put_val(struct uc_buf *b, const struct val *v)
{
    switch (v->k) {
    case VK_UNDEF:
    case VK_NONE:
        return;
    case VK_BOOL:
        uc_buf_puts(b, v->i ? "true" : "false");
        return;
    case VK_STR:
        uc_buf_append(b, v->s, v->n);
        return;
    case VK_INT:
    case VK_FLOAT:
        put_num(b, v);
        return;
    case VK_LIST:
    case VK_DICT:
        put_json(b, v, 0, 0);
        return;
    default:
        uc_buf_puts(b, "<function>");
    }
}

static struct val to_str(struct rctx *R, const struct val *v)
{
    if (v->k == VK_STR) {
        return *v;
    }
    struct uc_buf b;
    uc_buf_init(&b);
    put_val(&b, v);
    if (b.oom) {
        uc_buf_fini(&b);
        oom(R);
        return v_str("", 0);
    }
    char *s = astrndup(&R->a, b.data ? b.data : "", b.len);
    size_t n = b.len;
    uc_buf_fini(&b);
    if (!s) {
        oom(R);
        return v_str("", 0);
    }
    return v_str(s, n);
}

static bool is_num(const struct val *v)
{
    return v->k == VK_INT || v->k == VK_FLOAT || v->k == VK_BOOL;
}

static bool v_eq(const struct val *a, const struct val *b)
{
    if (is_num(a) && is_num(b)) {
        if (a->k != VK_FLOAT && b->k != VK_FLOAT) {
            return a->i == b->i;
        }
        double x = a->k == VK_FLOAT ? a->f : (double)a->i;
        double y = b->k == VK_FLOAT ? b->f : (double)b->i;
        return x == y;
    }
    if (a->k != b->k) {
        return false;
    }
    switch (a->k) {
    case VK_UNDEF:
    case VK_NONE:
        return true;
    case VK_STR:
        return a->n == b->n && memcmp(a->s, b->s, a->n) == 0;
    case VK_LIST:
        if (a->l->n != b->l->n) {
            return false;
        }
        for (int64_t i = 0; i < a->l->n; i++) {
            if (!v_eq(&a->l->v[i], &b->l->v[i])) {
                return false;
            }
        }
        return true;
    case VK_DICT:
        if (a->d->n != b->d->n) {
            return false;
        }
        for (int64_t i = 0; i < a->d->n; i++) {
            int64_t j = dict_find(b->d, a->d->keys[i].s, a->d->keys[i].n);
            if (j < 0 || !v_eq(&a->d->vals[i], &b->d->vals[j])) {
                return false;
            }
        }
        return true;
    default:
        return a->m == b->m && a->i == b->i;
    }
}

/* <0, 0, >0; false when the two cannot be ordered */
static bool v_cmp(struct rctx *R, int line, const struct val *a, const struct val *b, int *out)
{
    if (is_num(a) && is_num(b)) {
        double x = a->k == VK_FLOAT ? a->f : (double)a->i;
        double y = b->k == VK_FLOAT ? b->f : (double)b->i;
        *out = x < y ? -1 : x > y ? 1 : 0;
        return true;
    }
    if (a->k == VK_STR && b->k == VK_STR) {
        size_t n = a->n < b->n ? a->n : b->n;
        int c = memcmp(a->s, b->s, n);
        *out = c ? c : a->n < b->n ? -1 : a->n > b->n ? 1 : 0;
        return true;
    }
    return rerr(R, line, "cannot compare %s with %s", type_name(a), type_name(b));
}

static int64_t utf8_len(const char *s, size_t n)
{
    int64_t k = 0;
    for (size_t i = 0; i < n; i++) {
        k += ((unsigned char)s[i] & 0xC0) != 0x80;
    }
    return k;
}

/* ---- evaluation ----------------------------------------------------------------------------- */

static bool eval(struct rctx *R, struct frame *F, const struct node *e, struct val *out);
static bool exec_body(struct rctx *R, struct frame *F, const struct nlist *body,
                      struct uc_buf *o);

static bool lookup(struct frame *F, const char *s, size_t n, struct val *out)
{
    for (; F; F = F->parent) {
        int64_t i = dict_find(F->vars, s, n);
        if (i >= 0) {
            *out = F->vars->vals[i];
            return true;
        }
    }
    return false;
}

static bool member(struct rctx *R, int line, const struct val *obj, const struct val *key,
                   struct val *out)
{
    *out = v_undef();
    if (obj->k == VK_DICT && key->k == VK_STR) {
        int64_t i = dict_find(obj->d, key->s, key->n);
        if (i >= 0) {
            *out = obj->d->vals[i];
        }
        return true;
    }
    if ((obj->k == VK_LIST || obj->k == VK_STR) && (key->k == VK_INT || key->k == VK_BOOL)) {
        int64_t n = obj->k == VK_LIST ? obj->l->n : (int64_t)obj->n;
        int64_t i = key->i < 0 ? key->i + n : key->i;
        if (i < 0 || i >= n) {
            return true; /* undefined, as Jinja's subscript of a missing index */
        }
        *out = obj->k == VK_LIST ? obj->l->v[i] : v_str(obj->s + i, 1);
        return true;
    }
    if (obj->k == VK_UNDEF || obj->k == VK_NONE) {
        return rerr(R, line, "cannot read a member of %s", type_name(obj));
    }
    return true;
}

static bool eval_slice(struct rctx *R, struct frame *F, const struct node *e, struct val *out)
{
    struct val obj, b = v_none(), c = v_none(), st = v_none();
    if (!eval(R, F, e->a, &obj) || (e->b && !eval(R, F, e->b, &b)) ||
        (e->c && !eval(R, F, e->c, &c)) || (e->args.n && !eval(R, F, e->args.v[0], &st))) {
        return false;
    }
    if (obj.k != VK_LIST && obj.k != VK_STR) {
        return rerr(R, e->line, "cannot slice %s", type_name(&obj));
    }
    int64_t n = obj.k == VK_LIST ? obj.l->n : (int64_t)obj.n;
    int64_t step = st.k == VK_INT ? st.i : 1;
    if (step == 0) {
        return rerr(R, e->line, "slice step cannot be zero");
    }
    int64_t lo, hi;
    if (step > 0) {
        lo = b.k == VK_INT ? b.i : 0;
        hi = c.k == VK_INT ? c.i : n;
        lo = lo < 0 ? (lo + n < 0 ? 0 : lo + n) : (lo > n ? n : lo);
        hi = hi < 0 ? (hi + n < 0 ? 0 : hi + n) : (hi > n ? n : hi);
    } else {
        lo = b.k == VK_INT ? b.i : n - 1;
        hi = c.k == VK_INT ? c.i : -n - 1;
        lo = lo < 0 ? (lo + n < -1 ? -1 : lo + n) : (lo >= n ? n - 1 : lo);
        hi = hi < 0 ? (hi + n < -1 ? -1 : hi + n) : (hi >= n ? n - 1 : hi);
    }
    if (obj.k == VK_LIST) {
        struct vlist *l = list_new(R);
        if (!l) {
            return false;
        }
        for (int64_t i = lo; step > 0 ? i < hi : i > hi; i += step) {
            if (!list_push(R, l, obj.l->v[i])) {
                return false;
            }
        }
        *out = (struct val){.k = VK_LIST, .l = l};
        return true;
    }
    char *s = aalloc(&R->a, (size_t)n + 1);
    if (!s) {
        return oom(R);
    }
    size_t k = 0;
    for (int64_t i = lo; step > 0 ? i < hi : i > hi; i += step) {
        s[k++] = obj.s[i];
    }
    *out = v_str(s, k);
    return true;
}

/* evaluated arguments of a call, filter or test */
struct args {
    struct val pos[8];
    int n_pos;
    const char *kw[8];
    struct val kwv[8];
    int n_kw;
};

static bool eval_args(struct rctx *R, struct frame *F, const struct node *e, int skip,
                      struct args *A)
{
    memset(A, 0, sizeof *A);
    for (int i = skip; i < e->args.n; i++) {
        struct val v;
        if (!eval(R, F, e->args.v[i], &v)) {
            return false;
        }
        if (e->kw && e->kw[i]) {
            if (A->n_kw == 8) {
                return rerr(R, e->line, "too many keyword arguments");
            }
            A->kw[A->n_kw] = e->kw[i];
            A->kwv[A->n_kw++] = v;
        } else {
            if (A->n_pos == 8) {
                return rerr(R, e->line, "too many arguments");
            }
            A->pos[A->n_pos++] = v;
        }
    }
    return true;
}

static const struct val *arg(const struct args *A, int i, const char *kw)
{
    if (i < A->n_pos) {
        return &A->pos[i];
    }
    for (int k = 0; kw && k < A->n_kw; k++) {
        if (strcmp(A->kw[k], kw) == 0) {
            return &A->kwv[k];
        }
    }
    return NULL;
}

static bool want_str(struct rctx *R, int line, const struct val *v, const char *what)
{
    if (v->k != VK_STR) {
        return rerr(R, line, "%s needs a string, not %s", what, type_name(v));
    }
    return true;
}

static bool strip_set(char c, const struct val *chars)
{
    if (!chars || chars->k != VK_STR) {
        return is_space(c);
    }
    return memchr(chars->s, c, chars->n) != NULL;
}

static struct val str_strip(const struct val *s, const struct val *chars, bool left, bool right)
{
    size_t b = 0, e = s->n;
    while (left && b < e && strip_set(s->s[b], chars)) {
        b++;
    }
    while (right && e > b && strip_set(s->s[e - 1], chars)) {
        e--;
    }
    return v_str(s->s + b, e - b);
}

static bool str_map(struct rctx *R, const struct val *s, int mode, struct val *out)
{
    char *o = astrndup(&R->a, s->s, s->n);
    if (!o) {
        return oom(R);
    }
    bool start = true;
    for (size_t i = 0; i < s->n; i++) {
        char c = o[i];
        bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        bool up;
        switch (mode) {
        case 0: up = true; break;                      /* upper */
        case 1: up = false; break;                     /* lower */
        case 2: up = start; break;                     /* title */
        default: up = i == 0; break;                   /* capitalize */
        }
        if (alpha) {
            o[i] = up ? (char)(c & ~0x20) : (char)(c | 0x20);
        }
        if (mode == 2) {
            start = !alpha && !((unsigned char)c & 0x80) && !(c >= '0' && c <= '9');
        }
    }
    *out = v_str(o, s->n);
    return true;
}

static bool str_replace(struct rctx *R, const struct val *s, const struct val *a,
                        const struct val *b, int64_t count, struct val *out)
{
    struct uc_buf o;
    uc_buf_init(&o);
    size_t i = 0;
    int64_t done = 0;
    while (i <= s->n) {
        if ((count < 0 || done < count) && a->n == 0) {
            uc_buf_append(&o, b->s, b->n);
            done++;
            if (i < s->n) {
                uc_buf_append(&o, s->s + i, 1);
            }
            i++;
            continue;
        }
        if ((count < 0 || done < count) && a->n > 0 && i + a->n <= s->n &&
            memcmp(s->s + i, a->s, a->n) == 0) {
            uc_buf_append(&o, b->s, b->n);
            i += a->n;
            done++;
            continue;
        }
        if (i < s->n) {
            uc_buf_append(&o, s->s + i, 1);
        }
        i++;
    }
    char *r = o.oom ? NULL : astrndup(&R->a, o.data ? o.data : "", o.len);
    size_t n = o.len;
    uc_buf_fini(&o);
    if (!r) {
        return oom(R);
    }
    *out = v_str(r, n);
    return true;
}

static bool str_split(struct rctx *R, const struct val *s, const struct val *sep, int64_t max,
                      struct val *out)
{
    struct vlist *l = list_new(R);
    if (!l) {
        return false;
    }
    *out = (struct val){.k = VK_LIST, .l = l};
    if (!sep || sep->k == VK_NONE) { /* runs of whitespace; no empty parts */
        size_t i = 0;
        while (i < s->n) {
            while (i < s->n && is_space(s->s[i])) {
                i++;
            }
            if (i >= s->n) {
                break;
            }
            size_t j = i;
            if (max >= 0 && l->n == max) {
                size_t e = s->n;
                while (e > i && is_space(s->s[e - 1])) {
                    e--;
                }
                return list_push(R, l, v_str(s->s + i, e - i));
            }
            while (j < s->n && !is_space(s->s[j])) {
                j++;
            }
            if (!list_push(R, l, v_str(s->s + i, j - i))) {
                return false;
            }
            i = j;
        }
        return true;
    }
    if (sep->k != VK_STR || sep->n == 0) {
        return rerr(R, 0, "split needs a non-empty string separator");
    }
    size_t i = 0, start = 0;
    while (i + sep->n <= s->n && (max < 0 || l->n < max)) {
        if (memcmp(s->s + i, sep->s, sep->n) == 0) {
            if (!list_push(R, l, v_str(s->s + start, i - start))) {
                return false;
            }
            i += sep->n;
            start = i;
        } else {
            i++;
        }
    }
    return list_push(R, l, v_str(s->s + start, s->n - start));
}

static bool affix(const struct val *s, const struct val *p, bool end)
{
    if (p->k == VK_LIST) {
        for (int64_t i = 0; i < p->l->n; i++) {
            if (affix(s, &p->l->v[i], end)) {
                return true;
            }
        }
        return false;
    }
    if (p->k != VK_STR || p->n > s->n) {
        return false;
    }
    return memcmp(s->s + (end ? s->n - p->n : 0), p->s, p->n) == 0;
}

static bool join(struct rctx *R, const struct val *list, const struct val *sep, struct val *out)
{
    struct uc_buf o;
    uc_buf_init(&o);
    for (int64_t i = 0; i < list->l->n; i++) {
        if (i && sep) {
            uc_buf_append(&o, sep->s, sep->n);
        }
        put_val(&o, &list->l->v[i]);
    }
    char *r = o.oom ? NULL : astrndup(&R->a, o.data ? o.data : "", o.len);
    size_t n = o.len;
    uc_buf_fini(&o);
    if (!r) {
        return oom(R);
    }
    *out = v_str(r, n);
    return true;
}

static bool items_of(struct rctx *R, const struct val *d, struct val *out)
{
    struct vlist *l = list_new(R);
    if (!l) {
        return false;
    }
    for (int64_t i = 0; i < d->d->n; i++) {
        struct vlist *p = list_new(R);
        if (!p || !list_push(R, p, d->d->keys[i]) || !list_push(R, p, d->d->vals[i]) ||
            !list_push(R, l, (struct val){.k = VK_LIST, .l = p})) {
            return false;
        }
    }
    *out = (struct val){.k = VK_LIST, .l = l};
    return true;
}

static bool call_method(struct rctx *R, struct frame *F, const struct node *e, struct val *out)
{
    const struct node *callee = e->a;
    struct val obj;
    if (!eval(R, F, callee->a, &obj)) {
        return false;
    }
    struct args A;
    if (!eval_args(R, F, e, 0, &A)) {
        return false;
    }
    const char *m = callee->s;
    const struct val *a0 = arg(&A, 0, NULL), *a1 = arg(&A, 1, NULL);
    *out = v_none();
    if (obj.k == VK_STR) {
        if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
            *out = str_strip(&obj, a0, m[0] != 'r', m[0] != 'l');
            return true;
        }
        if (!strcmp(m, "upper") || !strcmp(m, "lower") || !strcmp(m, "title") ||
            !strcmp(m, "capitalize")) {
            int mode = m[0] == 'u' ? 0 : m[0] == 'l' ? 1 : m[0] == 't' ? 2 : 3;
            return str_map(R, &obj, mode, out);
        }
        if (!strcmp(m, "startswith") || !strcmp(m, "endswith")) {
            if (!a0) {
                return rerr(R, e->line, "%s needs an argument", m);
            }
            *out = v_bool(affix(&obj, a0, m[0] == 'e'));
            return true;
        }
        if (!strcmp(m, "split")) {
            const struct val *mx = arg(&A, 1, "maxsplit");
            return str_split(R, &obj, a0 ? a0 : arg(&A, 0, "sep"), mx && mx->k == VK_INT
                                                                      ? mx->i : -1, out);
        }
        if (!strcmp(m, "replace")) {
            if (!a0 || !a1 || a0->k != VK_STR || a1->k != VK_STR) {
                return rerr(R, e->line, "replace needs two strings");
            }
            const struct val *c = arg(&A, 2, "count");
            return str_replace(R, &obj, a0, a1, c && c->k == VK_INT ? c->i : -1, out);
        }
        if (!strcmp(m, "find") || !strcmp(m, "count") || !strcmp(m, "index")) {
            if (!a0 || a0->k != VK_STR) {
                return rerr(R, e->line, "%s needs a string", m);
            }
            int64_t found = -1, cnt = 0;
            for (size_t i = 0; a0->n && i + a0->n <= obj.n; i++) {
                if (memcmp(obj.s + i, a0->s, a0->n) == 0) {
                    found = found < 0 ? (int64_t)i : found;
                    cnt++;
                    i += a0->n - 1;
                }
            }
            if (!strcmp(m, "index") && found < 0) {
                return rerr(R, e->line, "substring not found");
            }
            *out = v_int(!strcmp(m, "count") ? cnt : found);
            return true;
        }
        if (!strcmp(m, "join")) {
            if (!a0 || a0->k != VK_LIST) {
                return rerr(R, e->line, "join needs a list");
            }
            return join(R, a0, &obj, out);
        }
    } else if (obj.k == VK_DICT) {
        if (!strcmp(m, "items")) {
            return items_of(R, &obj, out);
        }
        if (!strcmp(m, "keys") || !strcmp(m, "values")) {
            struct vlist *l = list_new(R);
            for (int64_t i = 0; l && i < obj.d->n; i++) {
                if (!list_push(R, l, m[0] == 'k' ? obj.d->keys[i] : obj.d->vals[i])) {
                    return false;
                }
            }
            *out = (struct val){.k = VK_LIST, .l = l};
            return l != NULL;
        }
        if (!strcmp(m, "get")) {
            if (!a0 || a0->k != VK_STR) {
                return rerr(R, e->line, "get needs a string key");
            }
            int64_t i = dict_find(obj.d, a0->s, a0->n);
            *out = i >= 0 ? obj.d->vals[i] : a1 ? *a1 : v_none();
            return true;
        }
    } else if (obj.k == VK_LIST) {
        if (!strcmp(m, "append")) {
            if (!a0) {
                return rerr(R, e->line, "append needs an argument");
            }
            return list_push(R, obj.l, *a0);
        }
        if (!strcmp(m, "pop")) {
            if (obj.l->n == 0) {
                return rerr(R, e->line, "pop from an empty list");
            }
            int64_t i = a0 && a0->k == VK_INT ? a0->i : -1;
            i = i < 0 ? i + obj.l->n : i;
            if (i < 0 || i >= obj.l->n) {
                return rerr(R, e->line, "pop index out of range");
            }
            *out = obj.l->v[i];
            memmove(obj.l->v + i, obj.l->v + i + 1, (size_t)(obj.l->n - i - 1) * sizeof *out);
            obj.l->n--;
            return true;
        }
        if (!strcmp(m, "index") || !strcmp(m, "count")) {
            int64_t found = -1, cnt = 0;
            for (int64_t i = 0; a0 && i < obj.l->n; i++) {
                if (v_eq(&obj.l->v[i], a0)) {
                    found = found < 0 ? i : found;
                    cnt++;
                }
            }
            if (m[0] == 'i' && found < 0) {
                return rerr(R, e->line, "value not in list");
            }
            *out = v_int(m[0] == 'i' ? found : cnt);
            return true;
        }
    }
    return rerr(R, e->line, "%s has no method '%s'", type_name(&obj), m);
}

static bool apply_test(struct rctx *R, int line, const char *t, const struct val *v,
                       const struct args *A, bool *out);

static bool call_macro(struct rctx *R, const struct node *mac, const struct args *A, int line,
                       struct val *out)
{
    if (R->depth >= DEPTH_MAX) {
        return rerr(R, line, "macro calls nest deeper than %d", DEPTH_MAX);
    }
    struct frame fr = {.vars = dict_new(R), .parent = R->root};
    if (!fr.vars) {
        return false;
    }
    for (int i = 0; i < mac->args.n; i++) {
        const struct node *prm = mac->args.v[i];
        const struct val *v = arg(A, i, prm->s);
        struct val d = v_undef();
        if (!v && prm->a) {
            if (!eval(R, &fr, prm->a, &d)) {
                return false;
            }
            v = &d;
        }
        if (!dict_set(R, fr.vars, prm->s, prm->n, v ? *v : v_undef())) {
            return false;
        }
    }
    struct uc_buf o;
    uc_buf_init(&o);
    R->depth++;
    bool ok = exec_body(R, &fr, &mac->body, &o);
    R->depth--;
    R->ctl = 0;
    char *s = ok && !o.oom ? astrndup(&R->a, o.data ? o.data : "", o.len) : NULL;
    size_t n = o.len;
    uc_buf_fini(&o);
    if (!ok) {
        return false;
    }
    if (!s) {
        return oom(R);
    }
    *out = v_str(s, n);
    return true;
}

static bool call_global(struct rctx *R, struct frame *F, const struct node *e,
                        const struct val *fn, struct val *out)
{
    struct args A;
    if (!eval_args(R, F, e, 0, &A)) {
        return false;
    }
    if (fn->k == VK_MACRO) {
        return call_macro(R, fn->m, &A, e->line, out);
    }
    switch ((enum glob)fn->i) {
    case G_RANGE: {
        int64_t lo = 0, hi, st = 1;
        for (int i = 0; i < A.n_pos; i++) {
            if (A.pos[i].k != VK_INT) {
                return rerr(R, e->line, "range needs integers");
            }
        }
        if (A.n_pos == 1) {
            hi = A.pos[0].i;
        } else if (A.n_pos >= 2) {
            lo = A.pos[0].i;
            hi = A.pos[1].i;
            st = A.n_pos > 2 ? A.pos[2].i : 1;
        } else {
            return rerr(R, e->line, "range needs an argument");
        }
        if (st == 0) {
            return rerr(R, e->line, "range step cannot be zero");
        }
        struct vlist *l = list_new(R);
        for (int64_t i = lo; l && (st > 0 ? i < hi : i > hi); i += st) {
            if (l->n >= 1000000) {
                return rerr(R, e->line, "range is too long");
            }
            if (!list_push(R, l, v_int(i))) {
                return false;
            }
        }
        *out = (struct val){.k = VK_LIST, .l = l};
        return l != NULL;
    }
    case G_NAMESPACE:
    case G_DICT: {
        struct vdict *d = dict_new(R);
        if (!d) {
            return false;
        }
        if (A.n_pos > 0 && A.pos[0].k == VK_DICT) {
            for (int64_t i = 0; i < A.pos[0].d->n; i++) {
                if (!dict_set(R, d, A.pos[0].d->keys[i].s, A.pos[0].d->keys[i].n,
                              A.pos[0].d->vals[i])) {
                    return false;
                }
            }
        }
        for (int i = 0; i < A.n_kw; i++) {
            if (!dict_set(R, d, A.kw[i], strlen(A.kw[i]), A.kwv[i])) {
                return false;
            }
        }
        *out = (struct val){.k = VK_DICT, .d = d};
        return true;
    }
    case G_RAISE: {
        struct val m = A.n_pos ? to_str(R, &A.pos[0]) : v_str("raise_exception", 15);
        return rerr(R, 0, "%.*s", (int)m.n, m.s);
    }
    case G_STRFTIME: {
        if (!A.n_pos || A.pos[0].k != VK_STR) {
            return rerr(R, e->line, "strftime_now needs a format string");
        }
        char fmt[128], buf[256];
        snprintf(fmt, sizeof fmt, "%.*s", (int)A.pos[0].n, A.pos[0].s);
        time_t now = time(NULL);
        struct tm tmv;
        localtime_r(&now, &tmv);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
        size_t n = strftime(buf, sizeof buf, fmt, &tmv); /* the template's own format */
#pragma GCC diagnostic pop
        char *s = astrndup(&R->a, buf, n);
        if (!s) {
            return oom(R);
        }
        *out = v_str(s, n);
        return true;
    }
    default:
        break;
    }
    return rerr(R, e->line, "not callable");
}

static bool apply_filter(struct rctx *R, struct frame *F, const struct node *e, struct val *out)
{
    struct val v;
    if (!eval(R, F, e->a, &v)) {
        return false;
    }
    struct args A;
    if (!eval_args(R, F, e, 0, &A)) {
        return false;
    }
    const char *f = e->s;
    const struct val *a0 = arg(&A, 0, NULL);
    int line = e->line;
    if (!strcmp(f, "default") || !strcmp(f, "d")) {
        const struct val *bo = arg(&A, 1, "boolean");
        bool use = v.k == VK_UNDEF || (bo && truthy(bo) && !truthy(&v));
        const struct val *dv = arg(&A, 0, "default_value");
        *out = use ? (dv ? *dv : v_str("", 0)) : v;
        return true;
    }
    if (!strcmp(f, "safe")) {
        *out = v;
        return true;
    }
    if (!strcmp(f, "string")) {
        *out = to_str(R, &v);
        return R->rc == UC_OK;
    }
    if (!strcmp(f, "tojson")) {
        const struct val *ind = arg(&A, 0, "indent");
        struct uc_buf b;
        uc_buf_init(&b);
        put_json(&b, &v, ind && ind->k == VK_INT ? (int)ind->i : 0, 0);
        char *s = b.oom ? NULL : astrndup(&R->a, b.data ? b.data : "", b.len);
        size_t n = b.len;
        uc_buf_fini(&b);
        if (!s) {
            return oom(R);
        }
        *out = v_str(s, n);
        return true;
    }
    if (!strcmp(f, "length") || !strcmp(f, "count")) {
        if (v.k == VK_STR) {
            *out = v_int(utf8_len(v.s, v.n));
        } else if (v.k == VK_LIST) {
            *out = v_int(v.l->n);
        } else if (v.k == VK_DICT) {
            *out = v_int(v.d->n);
        } else if (v.k == VK_UNDEF) {
            *out = v_int(0);
        } else {
            return rerr(R, line, "length of %s", type_name(&v));
        }
        return true;
    }
    if (!strcmp(f, "trim") || !strcmp(f, "upper") || !strcmp(f, "lower") ||
        !strcmp(f, "title") || !strcmp(f, "capitalize") || !strcmp(f, "replace") ||
        !strcmp(f, "wordcount") || !strcmp(f, "indent")) {
        if (v.k == VK_UNDEF) {
            v = v_str("", 0);
        }
        if (!want_str(R, line, &v, f)) {
            return false;
        }
        if (f[0] == 't' && f[1] == 'r') {
            *out = str_strip(&v, a0, true, true);
            return true;
        }
        if (!strcmp(f, "replace")) {
            const struct val *a1 = arg(&A, 1, NULL);
            if (!a0 || !a1 || a0->k != VK_STR || a1->k != VK_STR) {
                return rerr(R, line, "replace needs two strings");
            }
            const struct val *c = arg(&A, 2, "count");
            return str_replace(R, &v, a0, a1, c && c->k == VK_INT ? c->i : -1, out);
        }
        if (!strcmp(f, "wordcount")) {
            struct val parts;
            if (!str_split(R, &v, NULL, -1, &parts)) {
                return false;
            }
            *out = v_int(parts.l->n);
            return true;
        }
        if (!strcmp(f, "indent")) {
            const struct val *w = arg(&A, 0, "width");
            const struct val *first = arg(&A, 1, "first");
            const struct val *blank = arg(&A, 2, "blank");
            int64_t width = w && w->k == VK_INT ? w->i : 4;
            if (width < 0 || width > 256) {
                return rerr(R, line, "indent width out of range");
            }
            struct uc_buf o;
            uc_buf_init(&o);
            bool at_start = true;
            for (size_t i = 0; i < v.n; i++) {
                bool line_empty = v.s[i] == '\n';
                if (at_start && (i > 0 || (first && truthy(first))) &&
                    (!line_empty || (blank && truthy(blank)))) {
                    uc_buf_printf(&o, "%*s", (int)width, "");
                }
                uc_buf_append(&o, &v.s[i], 1);
                at_start = v.s[i] == '\n';
            }
            char *s = o.oom ? NULL : astrndup(&R->a, o.data ? o.data : "", o.len);
            size_t n = o.len;
            uc_buf_fini(&o);
            if (!s) {
                return oom(R);
            }
            *out = v_str(s, n);
            return true;
        }
        int mode = f[0] == 'u' ? 0 : f[0] == 'l' ? 1 : f[0] == 't' ? 2 : 3;
        return str_map(R, &v, mode, out);
    }
    if (!strcmp(f, "int") || !strcmp(f, "float") || !strcmp(f, "abs") || !strcmp(f, "round")) {
        double x;
        if (v.k == VK_STR) {
            char tmp[64];
            snprintf(tmp, sizeof tmp, "%.*s", (int)(v.n < 63 ? v.n : 63), v.s);
            char *end;
            x = strtod(tmp, &end);
            if (end == tmp) {
                x = 0;
            }
        } else if (is_num(&v)) {
            x = v.k == VK_FLOAT ? v.f : (double)v.i;
        } else {
            return rerr(R, line, "%s of %s", f, type_name(&v));
        }
        if (!strcmp(f, "int")) {
            *out = v_int((int64_t)x);
        } else if (!strcmp(f, "float")) {
            *out = v_float(x);
        } else if (!strcmp(f, "abs")) {
            *out = v.k == VK_FLOAT ? v_float(fabs(x)) : v_int(x < 0 ? -(int64_t)x : (int64_t)x);
        } else {
            const struct val *p = arg(&A, 0, "precision");
            double sc = pow(10.0, p && p->k == VK_INT ? (double)p->i : 0.0);
            *out = v_float(round(x * sc) / sc);
        }
        return true;
    }
    if (!strcmp(f, "items") || !strcmp(f, "dictsort")) {
        if (v.k != VK_DICT) {
            return rerr(R, line, "%s needs a dict", f);
        }
        if (!items_of(R, &v, out)) {
            return false;
        }
        if (f[0] == 'd') { /* by key */
            struct vlist *l = out->l;
            for (int64_t i = 1; i < l->n; i++) {
                for (int64_t j = i; j > 0; j--) {
                    int c = 0;
                    v_cmp(R, line, &l->v[j - 1].l->v[0], &l->v[j].l->v[0], &c);
                    if (c <= 0) {
                        break;
                    }
                    struct val t = l->v[j];
                    l->v[j] = l->v[j - 1];
                    l->v[j - 1] = t;
                }
            }
        }
        return true;
    }
    /* the rest take a sequence */
    if (v.k == VK_STR && (!strcmp(f, "list") || !strcmp(f, "first") || !strcmp(f, "last") ||
                          !strcmp(f, "reverse"))) {
        struct vlist *l = list_new(R);
        for (size_t i = 0; l && i < v.n;) {
            size_t k = 1;
            while (i + k < v.n && ((unsigned char)v.s[i + k] & 0xC0) == 0x80) {
                k++;
            }
            if (!list_push(R, l, v_str(v.s + i, k))) {
                return false;
            }
            i += k;
        }
        if (!l) {
            return false;
        }
        struct val lv = {.k = VK_LIST, .l = l};
        if (!strcmp(f, "reverse")) {
            struct uc_buf o;
            uc_buf_init(&o);
            for (int64_t i = l->n - 1; i >= 0; i--) {
                uc_buf_append(&o, l->v[i].s, l->v[i].n);
            }
            char *s = o.oom ? NULL : astrndup(&R->a, o.data ? o.data : "", o.len);
            size_t n = o.len;
            uc_buf_fini(&o);
            if (!s) {
                return oom(R);
            }
            *out = v_str(s, n);
            return true;
        }
        v = lv;
    }
    if (v.k == VK_DICT && !strcmp(f, "list")) {
        struct vlist *l = list_new(R);
        for (int64_t i = 0; l && i < v.d->n; i++) {
            if (!list_push(R, l, v.d->keys[i])) {
                return false;
            }
        }
        *out = (struct val){.k = VK_LIST, .l = l};
        return l != NULL;
    }
    if (v.k != VK_LIST) {
        return rerr(R, line, "filter '%s' needs a list, not %s", f, type_name(&v));
    }
    struct vlist *in = v.l;
    if (!strcmp(f, "list")) {
        *out = v;
        return true;
    }
    if (!strcmp(f, "first") || !strcmp(f, "last")) {
        *out = in->n == 0 ? v_undef() : in->v[f[0] == 'f' ? 0 : in->n - 1];
        return true;
    }
    if (!strcmp(f, "join")) {
        const struct val *sep = arg(&A, 0, "d");
        if (sep && sep->k != VK_STR) {
            return rerr(R, line, "join needs a string separator");
        }
        return join(R, &v, sep, out);
    }
    struct vlist *l = list_new(R);
    if (!l) {
        return false;
    }
    *out = (struct val){.k = VK_LIST, .l = l};
    if (!strcmp(f, "reverse")) {
        for (int64_t i = in->n - 1; i >= 0; i--) {
            if (!list_push(R, l, in->v[i])) {
                return false;
            }
        }
        return true;
    }
    if (!strcmp(f, "unique")) {
        for (int64_t i = 0; i < in->n; i++) {
            bool seen = false;
            for (int64_t j = 0; j < l->n && !seen; j++) {
                seen = v_eq(&l->v[j], &in->v[i]);
            }
            if (!seen && !list_push(R, l, in->v[i])) {
                return false;
            }
        }
        return true;
    }
    if (!strcmp(f, "sort") || !strcmp(f, "min") || !strcmp(f, "max") || !strcmp(f, "sum")) {
        const struct val *attr = arg(&A, !strcmp(f, "sort") ? 2 : 1, "attribute");
        const struct val *rev = arg(&A, 0, "reverse");
        struct val *keys = aalloc(&R->a, (size_t)(in->n + 1) * sizeof *keys);
        if (!keys) {
            return oom(R);
        }
        for (int64_t i = 0; i < in->n; i++) {
            keys[i] = in->v[i];
            if (attr && !member(R, line, &in->v[i], attr, &keys[i])) {
                return false;
            }
            if (!list_push(R, l, in->v[i])) {
                return false;
            }
        }
        if (!strcmp(f, "sum")) {
            double s = 0;
            bool fl = false;
            for (int64_t i = 0; i < in->n; i++) {
                if (!is_num(&keys[i])) {
                    return rerr(R, line, "sum of %s", type_name(&keys[i]));
                }
                fl = fl || keys[i].k == VK_FLOAT;
                s += keys[i].k == VK_FLOAT ? keys[i].f : (double)keys[i].i;
            }
            *out = fl ? v_float(s) : v_int((int64_t)s);
            return true;
        }
        for (int64_t i = 1; i < l->n; i++) { /* stable insertion sort */
            for (int64_t j = i; j > 0; j--) {
                int c = 0;
                if (!v_cmp(R, line, &keys[j - 1], &keys[j], &c)) {
                    return false;
                }
                if (rev && truthy(rev) && f[1] == 'o' ? c >= 0 : c <= 0) {
                    break;
                }
                struct val t = l->v[j], tk = keys[j];
                l->v[j] = l->v[j - 1];
                keys[j] = keys[j - 1];
                l->v[j - 1] = t;
                keys[j - 1] = tk;
            }
        }
        if (!strcmp(f, "min") || !strcmp(f, "max")) {
            *out = l->n == 0 ? v_undef() : l->v[f[1] == 'i' ? 0 : l->n - 1];
        }
        return true;
    }
    if (!strcmp(f, "map")) {
        const struct val *attr = arg(&A, 99, "attribute");
        for (int64_t i = 0; i < in->n; i++) {
            struct val r;
            if (attr) {
                if (!member(R, line, &in->v[i], attr, &r)) {
                    return false;
                }
                if (r.k == VK_UNDEF) {
                    const struct val *dv = arg(&A, 99, "default");
                    r = dv ? *dv : r;
                }
            } else if (a0 && a0->k == VK_STR) {
                if (in->v[i].k != VK_STR) {
                    return rerr(R, line, "map('%.*s') of %s", (int)a0->n, a0->s,
                                type_name(&in->v[i]));
                }
                if (a0->n == 5 && !memcmp(a0->s, "upper", 5)) {
                    str_map(R, &in->v[i], 0, &r);
                } else if (a0->n == 5 && !memcmp(a0->s, "lower", 5)) {
                    str_map(R, &in->v[i], 1, &r);
                } else if (a0->n == 4 && !memcmp(a0->s, "trim", 4)) {
                    r = str_strip(&in->v[i], NULL, true, true);
                } else {
                    return rerr(R, line, "map with filter '%.*s' is not supported", (int)a0->n,
                                a0->s);
                }
            } else {
                return rerr(R, line, "map needs attribute= or a filter name");
            }
            if (!list_push(R, l, r)) {
                return false;
            }
        }
        return true;
    }
    if (!strcmp(f, "selectattr") || !strcmp(f, "rejectattr") || !strcmp(f, "select") ||
        !strcmp(f, "reject")) {
        bool attr = strstr(f, "attr") != NULL;
        bool keep_true = f[0] == 's';
        if (attr && (!a0 || a0->k != VK_STR)) {
            return rerr(R, line, "%s needs an attribute name", f);
        }
        const struct val *tname = arg(&A, attr ? 1 : 0, NULL);
        struct args TA;
        memset(&TA, 0, sizeof TA);
        for (int i = attr ? 2 : 1; i < A.n_pos; i++) {
            TA.pos[TA.n_pos++] = A.pos[i];
        }
        char tn[32] = "";
        if (tname) {
            if (tname->k != VK_STR || !in_table(test_names, tname->s, tname->n)) {
                return rerr(R, line, "%s: unsupported test", f);
            }
            snprintf(tn, sizeof tn, "%.*s", (int)tname->n, tname->s);
        }
        for (int64_t i = 0; i < in->n; i++) {
            struct val x = in->v[i];
            if (attr && !member(R, line, &in->v[i], a0, &x)) {
                return false;
            }
            bool ok;
            if (tn[0]) {
                if (!apply_test(R, line, tn, &x, &TA, &ok)) {
                    return false;
                }
            } else {
                ok = truthy(&x);
            }
            if (ok == keep_true && !list_push(R, l, in->v[i])) {
                return false;
            }
        }
        return true;
    }
    return rerr(R, line, "filter '%s' is not supported here", f);
}

static bool apply_test(struct rctx *R, int line, const char *t, const struct val *v,
                       const struct args *A, bool *out)
{
    const struct val *a0 = A->n_pos ? &A->pos[0] : NULL;
    if (!strcmp(t, "defined")) {
        *out = v->k != VK_UNDEF;
    } else if (!strcmp(t, "undefined")) {
        *out = v->k == VK_UNDEF;
    } else if (!strcmp(t, "none")) {
        *out = v->k == VK_NONE;
    } else if (!strcmp(t, "string")) {
        *out = v->k == VK_STR;
    } else if (!strcmp(t, "number")) {
        *out = v->k == VK_INT || v->k == VK_FLOAT;
    } else if (!strcmp(t, "integer")) {
        *out = v->k == VK_INT;
    } else if (!strcmp(t, "float")) {
        *out = v->k == VK_FLOAT;
    } else if (!strcmp(t, "boolean")) {
        *out = v->k == VK_BOOL;
    } else if (!strcmp(t, "true") || !strcmp(t, "false")) {
        *out = v->k == VK_BOOL && v->i == (t[0] == 't');
    } else if (!strcmp(t, "mapping")) {
        *out = v->k == VK_DICT;
    } else if (!strcmp(t, "iterable")) {
        *out = v->k == VK_LIST || v->k == VK_DICT || v->k == VK_STR;
    } else if (!strcmp(t, "sequence")) {
        *out = v->k == VK_LIST || v->k == VK_STR || v->k == VK_DICT;
    } else if (!strcmp(t, "callable")) {
        *out = v->k == VK_MACRO || v->k == VK_GLOBAL;
    } else if (!strcmp(t, "lower") || !strcmp(t, "upper")) {
        bool up = t[0] == 'u', ok = v->k == VK_STR;
        for (size_t i = 0; ok && i < v->n; i++) {
            char c = v->s[i];
            ok = up ? !(c >= 'a' && c <= 'z') : !(c >= 'A' && c <= 'Z');
        }
        *out = ok;
    } else if (!strcmp(t, "odd") || !strcmp(t, "even") || !strcmp(t, "divisibleby")) {
        if (v->k != VK_INT) {
            return rerr(R, line, "test '%s' needs an integer, not %s", t, type_name(v));
        }
        int64_t d = t[0] == 'd' ? (a0 && a0->k == VK_INT ? a0->i : 0) : 2;
        if (d == 0) {
            return rerr(R, line, "divisibleby needs a non-zero integer");
        }
        int64_t r = v->i % d;
        *out = t[0] == 'o' ? r != 0 : r == 0;
    } else if (!strcmp(t, "in")) {
        if (!a0) {
            return rerr(R, line, "test 'in' needs an argument");
        }
        bool found = false;
        if (a0->k == VK_LIST) {
            for (int64_t i = 0; i < a0->l->n && !found; i++) {
                found = v_eq(&a0->l->v[i], v);
            }
        } else if (a0->k == VK_STR && v->k == VK_STR) {
            found = v->n == 0 || (v->n <= a0->n && memmem(a0->s, a0->n, v->s, v->n) != NULL);
        } else if (a0->k == VK_DICT && v->k == VK_STR) {
            found = dict_find(a0->d, v->s, v->n) >= 0;
        }
        *out = found;
    } else {
        if (!a0) {
            return rerr(R, line, "test '%s' needs an argument", t);
        }
        if (!strcmp(t, "eq") || !strcmp(t, "equalto") || !strcmp(t, "sameas")) {
            *out = v_eq(v, a0);
        } else if (!strcmp(t, "ne")) {
            *out = !v_eq(v, a0);
        } else {
            int c;
            if (!v_cmp(R, line, v, a0, &c)) {
                return false;
            }
            *out = !strcmp(t, "lt") ? c < 0 : !strcmp(t, "le") ? c <= 0 : !strcmp(t, "gt")
                                                                     ? c > 0 : c >= 0;
        }
    }
    return true;
}

static bool arith(struct rctx *R, int line, const char *op, const struct val *a,
                  const struct val *b, struct val *out)
{
    if (op[0] == '~') {
        struct val x = to_str(R, a), y = to_str(R, b);
        char *s = aalloc(&R->a, x.n + y.n + 1);
        if (!s) {
            return oom(R);
        }
        memcpy(s, x.s, x.n);
        memcpy(s + x.n, y.s, y.n);
        *out = v_str(s, x.n + y.n);
        return true;
    }
    if (op[0] == '+' && a->k == VK_STR && b->k == VK_STR) {
        char *s = aalloc(&R->a, a->n + b->n + 1);
        if (!s) {
            return oom(R);
        }
        memcpy(s, a->s, a->n);
        memcpy(s + a->n, b->s, b->n);
        *out = v_str(s, a->n + b->n);
        return true;
    }
    if (op[0] == '+' && a->k == VK_LIST && b->k == VK_LIST) {
        struct vlist *l = list_new(R);
        for (int64_t i = 0; l && i < a->l->n + b->l->n; i++) {
            if (!list_push(R, l, i < a->l->n ? a->l->v[i] : b->l->v[i - a->l->n])) {
                return false;
            }
        }
        *out = (struct val){.k = VK_LIST, .l = l};
        return l != NULL;
    }
    if (op[0] == '*' && op[1] == '\0' && ((a->k == VK_STR && b->k == VK_INT) ||
                                          (a->k == VK_INT && b->k == VK_STR))) {
        const struct val *s = a->k == VK_STR ? a : b;
        int64_t k = a->k == VK_INT ? a->i : b->i;
        if (k < 0) {
            k = 0;
        }
        if (s->n && (uint64_t)k > OUT_MAX_BYTES / s->n) {
            return rerr(R, line, "string repetition is too long");
        }
        char *o = aalloc(&R->a, s->n * (size_t)k + 1);
        if (!o) {
            return oom(R);
        }
        for (int64_t i = 0; i < k; i++) {
            memcpy(o + (size_t)i * s->n, s->s, s->n);
        }
        *out = v_str(o, s->n * (size_t)k);
        return true;
    }
    if (!is_num(a) || !is_num(b)) {
        return rerr(R, line, "unsupported operand types for %s: %s and %s", op, type_name(a),
                    type_name(b));
    }
    bool fl = a->k == VK_FLOAT || b->k == VK_FLOAT;
    double x = a->k == VK_FLOAT ? a->f : (double)a->i;
    double y = b->k == VK_FLOAT ? b->f : (double)b->i;
    int64_t xi = a->i, yi = b->i;
    switch (op[0]) {
    case '+':
        *out = fl ? v_float(x + y) : v_int(xi + yi);
        return true;
    case '-':
        *out = fl ? v_float(x - y) : v_int(xi - yi);
        return true;
    case '*':
        if (op[1] == '*') {
            *out = fl || yi < 0 ? v_float(pow(x, y)) : v_int((int64_t)pow(x, y));
        } else {
            *out = fl ? v_float(x * y) : v_int(xi * yi);
        }
        return true;
    case '/':
        if (y == 0) {
            return rerr(R, line, "division by zero");
        }
        if (op[1] == '/') {
            *out = fl ? v_float(floor(x / y))
                      : v_int(xi / yi - ((xi % yi != 0) && ((xi < 0) != (yi < 0))));
        } else {
            *out = v_float(x / y);
        }
        return true;
    case '%':
        if (y == 0) {
            return rerr(R, line, "modulo by zero");
        }
        if (fl) {
            double r = fmod(x, y);
            *out = v_float(r != 0 && ((r < 0) != (y < 0)) ? r + y : r);
        } else {
            int64_t r = xi % yi;
            *out = v_int(r != 0 && ((r < 0) != (yi < 0)) ? r + yi : r);
        }
        return true;
    default:
        return rerr(R, line, "unknown operator %s", op);
    }
}

static bool contains(struct rctx *R, int line, const struct val *hay, const struct val *x,
                     bool *out)
{
    struct args A;
    memset(&A, 0, sizeof A);
    A.pos[0] = *hay;
    A.n_pos = 1;
    if (hay->k != VK_LIST && hay->k != VK_STR && hay->k != VK_DICT && hay->k != VK_UNDEF) {
        return rerr(R, line, "'in' needs a list, string or dict, not %s", type_name(hay));
    }
    return apply_test(R, line, "in", x, &A, out);
}

static bool eval(struct rctx *R, struct frame *F, const struct node *e, struct val *out)
{
    if (++R->ops > OPS_MAX) {
        return rerr(R, e->line, "the template takes too many steps");
    }
    switch (e->kind) {
    case E_NONE:
        *out = v_none();
        return true;
    case E_BOOL:
        *out = v_bool(e->i != 0);
        return true;
    case E_INT:
        *out = v_int(e->i);
        return true;
    case E_FLOAT:
        *out = v_float(e->f);
        return true;
    case E_STR:
        *out = v_str(e->s, e->n);
        return true;
    case E_NAME: {
        if (lookup(F, e->s, e->n, out)) {
            return true;
        }
        static const struct {
            const char *name;
            enum glob g;
        } globals[] = {{"range", G_RANGE}, {"namespace", G_NAMESPACE},
                       {"raise_exception", G_RAISE}, {"strftime_now", G_STRFTIME},
                       {"dict", G_DICT}};
        for (size_t i = 0; i < sizeof globals / sizeof globals[0]; i++) {
            if (!strcmp(e->s, globals[i].name)) {
                *out = (struct val){.k = VK_GLOBAL, .i = globals[i].g};
                return true;
            }
        }
        *out = v_undef();
        return true;
    }
    case E_ATTR: {
        struct val obj;
        if (!eval(R, F, e->a, &obj)) {
            return false;
        }
        return member(R, e->line, &obj, &(struct val){.k = VK_STR, .s = e->s, .n = e->n}, out);
    }
    case E_INDEX: {
        struct val obj, key;
        if (!eval(R, F, e->a, &obj) || !eval(R, F, e->b, &key)) {
            return false;
        }
        return member(R, e->line, &obj, &key, out);
    }
    case E_SLICE:
        return eval_slice(R, F, e, out);
    case E_CALL: {
        if (e->a->kind == E_ATTR) {
            struct val obj;
            if (!eval(R, F, e->a->a, &obj)) {
                return false;
            }
            if (obj.k == VK_STR || obj.k == VK_LIST ||
                (obj.k == VK_DICT && dict_find(obj.d, e->a->s, e->a->n) < 0)) {
                return call_method(R, F, e, out);
            }
        }
        struct val fn;
        if (!eval(R, F, e->a, &fn)) {
            return false;
        }
        if (fn.k != VK_MACRO && fn.k != VK_GLOBAL) {
            return rerr(R, e->line, "%s is not callable", type_name(&fn));
        }
        return call_global(R, F, e, &fn, out);
    }
    case E_FILTER:
        return apply_filter(R, F, e, out);
    case E_TEST: {
        struct val v;
        struct args A;
        bool r;
        if (!eval(R, F, e->a, &v) || !eval_args(R, F, e, 0, &A) ||
            !apply_test(R, e->line, e->s, &v, &A, &r)) {
            return false;
        }
        *out = v_bool(r != e->neg);
        return true;
    }
    case E_NEG: {
        struct val v;
        if (!eval(R, F, e->a, &v)) {
            return false;
        }
        if (v.k == VK_INT || v.k == VK_BOOL) {
            *out = v_int(-v.i);
        } else if (v.k == VK_FLOAT) {
            *out = v_float(-v.f);
        } else {
            return rerr(R, e->line, "cannot negate %s", type_name(&v));
        }
        return true;
    }
    case E_NOT: {
        struct val v;
        if (!eval(R, F, e->a, &v)) {
            return false;
        }
        *out = v_bool(!truthy(&v));
        return true;
    }
    case E_AND:
    case E_OR: {
        struct val a;
        if (!eval(R, F, e->a, &a)) {
            return false;
        }
        if (truthy(&a) == (e->kind == E_OR)) {
            *out = a;
            return true;
        }
        return eval(R, F, e->b, out);
    }
    case E_COND: {
        struct val c;
        if (!eval(R, F, e->b, &c)) {
            return false;
        }
        if (truthy(&c)) {
            return eval(R, F, e->a, out);
        }
        if (e->c) {
            return eval(R, F, e->c, out);
        }
        *out = v_undef();
        return true;
    }
    case E_BIN: {
        struct val a, b;
        if (!eval(R, F, e->a, &a) || !eval(R, F, e->b, &b)) {
            return false;
        }
        const char *op = e->s;
        if (!strcmp(op, "==") || !strcmp(op, "!=")) {
            *out = v_bool(v_eq(&a, &b) == (op[0] == '='));
            return true;
        }
        if (!strcmp(op, "in") || !strcmp(op, "not in")) {
            bool r;
            if (!contains(R, e->line, &b, &a, &r)) {
                return false;
            }
            *out = v_bool(r == (op[0] == 'i'));
            return true;
        }
        if (op[0] == '<' || op[0] == '>') {
            int c;
            if (!v_cmp(R, e->line, &a, &b, &c)) {
                return false;
            }
            bool r = op[0] == '<' ? (op[1] ? c <= 0 : c < 0) : (op[1] ? c >= 0 : c > 0);
            *out = v_bool(r);
            return true;
        }
        return arith(R, e->line, op, &a, &b, out);
    }
    case E_LIST: {
        struct vlist *l = list_new(R);
        for (int i = 0; l && i < e->args.n; i++) {
            struct val v;
            if (!eval(R, F, e->args.v[i], &v) || !list_push(R, l, v)) {
                return false;
            }
        }
        *out = (struct val){.k = VK_LIST, .l = l};
        return l != NULL;
    }
    case E_DICT: {
        struct vdict *d = dict_new(R);
        for (int i = 0; d && i + 1 < e->args.n; i += 2) {
            struct val k, v;
            if (!eval(R, F, e->args.v[i], &k) || !eval(R, F, e->args.v[i + 1], &v)) {
                return false;
            }
            if (k.k != VK_STR) {
                return rerr(R, e->line, "dict keys must be strings");
            }
            if (!dict_set(R, d, k.s, k.n, v)) {
                return false;
            }
        }
        *out = (struct val){.k = VK_DICT, .d = d};
        return d != NULL;
    }
    default:
        return rerr(R, e->line, "internal: not an expression");
    }
}

/* ---- statements ----------------------------------------------------------------------------- */

static bool emit(struct rctx *R, struct uc_buf *o, const char *s, size_t n)
{
    if (o->len + n > OUT_MAX_BYTES) {
        return rerr(R, 0, "the rendered text is over %u bytes", OUT_MAX_BYTES);
    }
    uc_buf_append(o, s, n);
    return o->oom ? oom(R) : true;
}

static bool exec_for(struct rctx *R, struct frame *F, const struct node *st, struct uc_buf *o)
{
    struct val it;
    if (!eval(R, F, st->a, &it)) {
        return false;
    }
    struct vlist *items = NULL;
    if (it.k == VK_LIST) {
        items = it.l;
    } else if (it.k == VK_DICT) {
        items = list_new(R);
        for (int64_t i = 0; items && i < it.d->n; i++) {
            if (!list_push(R, items, it.d->keys[i])) {
                return false;
            }
        }
    } else if (it.k == VK_STR) {
        struct val lv;
        struct node fn = {.kind = E_FILTER, .line = st->line, .s = "list", .n = 4};
        struct node lit = {.kind = E_STR, .line = st->line, .s = it.s, .n = it.n};
        fn.a = &lit;
        if (!apply_filter(R, F, &fn, &lv)) {
            return false;
        }
        items = lv.l;
    } else if (it.k == VK_UNDEF) {
        items = list_new(R);
    } else {
        return rerr(R, st->line, "cannot loop over %s", type_name(&it));
    }
    if (!items) {
        return false;
    }
    /* the loop's `if` filters first, so loop.length and loop.last count kept items */
    if (st->b) {
        struct vlist *kept = list_new(R);
        if (!kept) {
            return false;
        }
        for (int64_t i = 0; i < items->n; i++) {
            struct frame fr = {.vars = dict_new(R), .parent = F};
            if (!fr.vars || !dict_set(R, fr.vars, st->targets[0], strlen(st->targets[0]),
                                      items->v[i])) {
                return false;
            }
            struct val c;
            if (!eval(R, &fr, st->b, &c)) {
                return false;
            }
            if (truthy(&c) && !list_push(R, kept, items->v[i])) {
                return false;
            }
        }
        items = kept;
    }
    int64_t n = items->n;
    struct frame fr = {.vars = dict_new(R), .parent = F};
    struct vdict *loop = dict_new(R);
    if (!fr.vars || !loop) {
        return false;
    }
    for (int64_t i = 0; i < n; i++) {
        if (++R->ops > OPS_MAX) {
            return rerr(R, st->line, "the template takes too many steps");
        }
        fr.vars->n = 0; /* names set in one iteration do not reach the next */
        bool ok = dict_set(R, loop, "index", 5, v_int(i + 1)) &&
                  dict_set(R, loop, "index0", 6, v_int(i)) &&
                  dict_set(R, loop, "revindex", 8, v_int(n - i)) &&
                  dict_set(R, loop, "revindex0", 9, v_int(n - i - 1)) &&
                  dict_set(R, loop, "first", 5, v_bool(i == 0)) &&
                  dict_set(R, loop, "last", 4, v_bool(i == n - 1)) &&
                  dict_set(R, loop, "length", 6, v_int(n)) &&
                  dict_set(R, loop, "previtem", 8, i > 0 ? items->v[i - 1] : v_undef()) &&
                  dict_set(R, loop, "nextitem", 8, i + 1 < n ? items->v[i + 1] : v_undef()) &&
                  dict_set(R, fr.vars, "loop", 4, (struct val){.k = VK_DICT, .d = loop});
        if (!ok) {
            return false;
        }
        const struct val *item = &items->v[i];
        if (st->n_targets == 1) {
            ok = dict_set(R, fr.vars, st->targets[0], strlen(st->targets[0]), *item);
        } else {
            if (item->k != VK_LIST || item->l->n != 2) {
                return rerr(R, st->line, "cannot unpack %s into two names", type_name(item));
            }
            ok = dict_set(R, fr.vars, st->targets[0], strlen(st->targets[0]), item->l->v[0]) &&
                 dict_set(R, fr.vars, st->targets[1], strlen(st->targets[1]), item->l->v[1]);
        }
        if (!ok || !exec_body(R, &fr, &st->body, o)) {
            return false;
        }
        if (R->ctl == 1) {
            R->ctl = 0;
            break;
        }
        R->ctl = 0;
    }
    if (n == 0 && st->orelse.n) {
        return exec_body(R, F, &st->orelse, o);
    }
    return true;
}

static bool exec_body(struct rctx *R, struct frame *F, const struct nlist *body,
                      struct uc_buf *o)
{
    for (int i = 0; i < body->n && !R->ctl; i++) {
        const struct node *st = body->v[i];
        if (++R->ops > OPS_MAX) {
            return rerr(R, st->line, "the template takes too many steps");
        }
        switch (st->kind) {
        case N_TEXT:
            if (st->n && !emit(R, o, st->s, st->n)) {
                return false;
            }
            break;
        case N_OUTPUT: {
            struct val v;
            if (!eval(R, F, st->a, &v)) {
                return false;
            }
            if (v.k == VK_STR) {
                if (!emit(R, o, v.s, v.n)) {
                    return false;
                }
            } else {
                struct val s = to_str(R, &v);
                if (R->rc != UC_OK || !emit(R, o, s.s, s.n)) {
                    return false;
                }
            }
            break;
        }
        case N_IF: {
            struct val c;
            if (!eval(R, F, st->a, &c)) {
                return false;
            }
            if (!exec_body(R, F, truthy(&c) ? &st->body : &st->orelse, o)) {
                return false;
            }
            break;
        }
        case N_FOR:
            if (!exec_for(R, F, st, o)) {
                return false;
            }
            break;
        case N_SET: {
            struct val v;
            if (!eval(R, F, st->a, &v) ||
                !dict_set(R, F->vars, st->targets[0], strlen(st->targets[0]), v)) {
                return false;
            }
            break;
        }
        case N_SET_ATTR: {
            struct val ns, v;
            if (!lookup(F, st->targets[0], strlen(st->targets[0]), &ns) || ns.k != VK_DICT) {
                return rerr(R, st->line, "'%s' is not a namespace", st->targets[0]);
            }
            if (!eval(R, F, st->a, &v) ||
                !dict_set(R, ns.d, st->targets[1], strlen(st->targets[1]), v)) {
                return false;
            }
            break;
        }
        case N_SET_BLOCK: {
            struct uc_buf b;
            uc_buf_init(&b);
            bool ok = exec_body(R, F, &st->body, &b);
            char *s = ok && !b.oom ? astrndup(&R->a, b.data ? b.data : "", b.len) : NULL;
            size_t n = b.len;
            uc_buf_fini(&b);
            if (!ok) {
                return false;
            }
            if (!s) {
                return oom(R);
            }
            if (!dict_set(R, F->vars, st->targets[0], strlen(st->targets[0]), v_str(s, n))) {
                return false;
            }
            break;
        }
        case N_MACRO:
            if (!dict_set(R, F->vars, st->targets[0], strlen(st->targets[0]),
                          (struct val){.k = VK_MACRO, .m = st})) {
                return false;
            }
            break;
        case N_BREAK:
            R->ctl = 1;
            break;
        case N_CONTINUE:
            R->ctl = 2;
            break;
        default:
            return rerr(R, st->line, "internal: not a statement");
        }
    }
    return true;
}

uc_status uc_jinja_render(const struct uc_jinja *t, const cJSON *vars, char **out,
                          size_t *out_len, char *msg, size_t msg_size)
{
    *out = NULL;
    *out_len = 0;
    msg[0] = '\0';
    struct rctx R = {.msg = msg, .msg_size = msg_size, .rc = UC_OK};
    struct frame root = {.vars = dict_new(&R)};
    R.root = &root;
    struct uc_buf o;
    uc_buf_init(&o);
    if (root.vars && vars && cJSON_IsObject(vars)) {
        for (const cJSON *c = vars->child; c && R.rc == UC_OK; c = c->next) {
            dict_set(&R, root.vars, c->string, strlen(c->string), from_json(&R, c));
        }
    }
    if (R.rc == UC_OK && !R.a.oom) {
        exec_body(&R, &root, &t->body, &o);
    }
    if ((R.a.oom || o.oom) && R.rc == UC_OK) {
        oom(&R);
    }
    uc_status rc = R.rc;
    if (rc == UC_OK) {
        *out_len = o.len;
        *out = uc_buf_take(&o);
        if (!*out) {
            *out = uc_malloc(1);
            if (*out) {
                (*out)[0] = '\0';
            } else {
                snprintf(msg, msg_size, "out of memory");
                rc = UC_ERR_NOMEM;
            }
        }
    }
    uc_buf_fini(&o);
    afree(&R.a);
    return rc;
}

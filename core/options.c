/* options.c: the option store behind core/options.h: tables, parsing, typed
 * access, help, and the edit distance behind every "did you mean".
 *
 * Parsing follows argparse as fairseq configures it: `--key value` and
 * `--key=value`, a flag takes no value, the last occurrence wins, no prefix
 * abbreviations, `-h` is --help, a word like "-1.0" is a value (a negative
 * number), not a flag, and everything after a bare `--` is positional.
 * Values are validated when they are stored (command line, moe_opts_set,
 * table defaults), so the typed getters never fail on a registered name.
 *
 * Not here: which flags contradict each other (core/config.c), and what the
 * values mean (the components that read them). Option definitions are copied
 * in, so a plugin's table need not outlive the store. Flags are stored as
 * "1" (on) or None (off).
 */
#include "core/options.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "core/log.h"
#include "core/options_table.h"

#define HELP_COLUMN 34
#define HELP_WIDTH 100

typedef struct opt_entry {
    moe_option def;  /* strings owned by the store */
    int group;       /* index into moe_opts.groups */
    char *value;     /* NULL: None */
    int given;       /* on the command line or set with moe_opts_set */
} opt_entry;

#define MAX_POSITIONAL 4

struct moe_opts {
    opt_entry *e;
    int n, cap;
    char **groups;   /* help groups: the core's titles, then plugin owners */
    int n_groups, cap_groups;
    const char *prog;   /* the executable, for messages and help */
    const char *usage;  /* the usage line after "usage: <prog> " */
    const char *about;  /* the help's paragraph */
    char *positional[MAX_POSITIONAL]; /* options bare words fill, in order */
    int n_positional;
};

/* ------------------------------------------------------------ small helpers */

static char *dup_str(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static moe_status nomem(void) { return moe_error_set(MOE_ERR_NOMEM, "out of host memory while storing options"); }

static const char *type_name(moe_opt_type t)
{
    switch (t) {
    case MOE_OPT_FLAG: return "FLAG";
    case MOE_OPT_INT: return "INT";
    case MOE_OPT_FLOAT: return "FLOAT";
    case MOE_OPT_STRING: return "STR";
    case MOE_OPT_CHOICE: return "CHOICE";
    case MOE_OPT_FLOATS: return "FLOATS";
    }
    return "?";
}

/* Whole string, base 10, no surrounding space, no overflow (Python's int()
 * without its underscores). */
static int parse_int(const char *s, int64_t *out)
{
    if (!s || !*s || isspace((unsigned char)*s))
        return 0;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno == ERANGE || *end)
        return 0;
    *out = (int64_t)v;
    return 1;
}

/* Whole string; decimal or exponent notation, inf and nan as Python's
 * float() takes them; hexadecimal floats are refused (Python refuses them). */
static int parse_float(const char *s, double *out)
{
    if (!s || !*s || isspace((unsigned char)*s) || strpbrk(s, "xX"))
        return 0;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (*end || (errno == ERANGE && isinf(v)))
        return 0;
    *out = v;
    return 1;
}

/* "-1.0" and "-5" are values; "-h", "--lr" and "-x" are option words. */
static int is_option_word(const char *w)
{
    double v;
    return w && w[0] == '-' && w[1] != '\0' && !parse_float(w, &v);
}

static int flag_text(const char *v, int *on)
{
    if (!v || strcmp(v, "0") == 0 || strcmp(v, "false") == 0 || strcmp(v, "False") == 0) {
        *on = 0;
        return 1;
    }
    if (strcmp(v, "1") == 0 || strcmp(v, "true") == 0 || strcmp(v, "True") == 0) {
        *on = 1;
        return 1;
    }
    return 0;
}

static int choice_has(const char *choices, const char *v)
{
    size_t n = strlen(v);
    for (const char *p = choices; p && *p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, v, n) == 0)
            return 1;
        p = bar ? bar + 1 : p + len;
    }
    return 0;
}

/* "a|b|c" -> "a, b, c" (sep ", ") or "a,b,c" (sep ","). */
static void choices_list(const char *choices, const char *sep, char *buf, size_t size)
{
    size_t o = 0;
    buf[0] = '\0';
    for (const char *p = choices; p && *p && o + 1 < size; p++) {
        if (*p == '|') {
            for (const char *s = sep; *s && o + 1 < size; s++)
                buf[o++] = *s;
        } else {
            buf[o++] = *p;
        }
    }
    buf[o] = '\0';
}

/* A suggestion is worth making when it is within a third of what was typed
 * (at least one edit): "moe-expert-cout" -> "moe-expert-count", not "foo" -> "lr". */
static int close_enough(int dist, const char *typed)
{
    int len = (int)strlen(typed);
    int limit = len / 3 > 1 ? len / 3 : 1;
    return dist <= limit;
}

/* The choice of `choices` closest to `v` into buf, or "" when none is close.
 * A cut-off value ("sqrt_world") that starts exactly one choice names it. */
static void closest_choice(const char *choices, const char *v, char *buf, size_t size)
{
    int best = -1, prefixed = 0;
    size_t vlen = strlen(v);
    char prefix_of[128] = "";
    buf[0] = '\0';
    for (const char *p = choices; p && *p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        char c[128];
        if (len < sizeof c) {
            memcpy(c, p, len);
            c[len] = '\0';
            if (vlen >= 3 && strncmp(c, v, vlen) == 0 && prefixed++ == 0)
                snprintf(prefix_of, sizeof prefix_of, "%s", c);
            int d = moe_edit_distance(v, c);
            if (close_enough(d, v) && (best < 0 || d < best)) {
                best = d;
                snprintf(buf, size, "%s", c);
            }
        }
        p = bar ? bar + 1 : p + len;
    }
    if (prefixed == 1)
        snprintf(buf, size, "%s", prefix_of);
}

static void fmt_bound(char *buf, size_t size, moe_opt_type t, double v)
{
    if (t == MOE_OPT_INT)
        snprintf(buf, size, "%.0f", v);
    else
        snprintf(buf, size, "%.12g", v);
}

/* The bounds a value is checked against: the table's, or for an integer
 * option without one the 32-bit range (every integer option has a range, so
 * no size computed from one can overflow). 0 when there are none. */
static int value_bounds(const moe_option *d, double *lo, double *hi)
{
    if (d->min < d->max) {
        *lo = d->min;
        *hi = d->max;
        return 1;
    }
    if (d->type == MOE_OPT_INT) {
        *lo = -2147483648.0;
        *hi = 2147483647.0;
        return 1;
    }
    return 0;
}

/* What a value of this option must look like: "an integer of at least 1". */
static void expected_text(const moe_option *d, char *buf, size_t size)
{
    const char *what = d->type == MOE_OPT_INT ? "an integer" : "a number";
    double bmin, bmax;
    if (value_bounds(d, &bmin, &bmax)) {
        char lo[48], hi[48];
        fmt_bound(lo, sizeof lo, d->type, bmin);
        fmt_bound(hi, sizeof hi, d->type, bmax);
        if (isinf(bmax))
            snprintf(buf, size, "%s of at least %s", what, lo);
        else
            snprintf(buf, size, "%s in [%s, %s]", what, lo, hi);
    } else {
        snprintf(buf, size, "%s", what);
    }
}

/* One element of a list: a token up to ',', ')', ']' or space. */
static int list_token(const char **pp, double *v)
{
    const char *p = *pp;
    size_t n = strcspn(p, ",)] \t");
    char tok[64];
    if (n == 0 || n >= sizeof tok)
        return 0;
    memcpy(tok, p, n);
    tok[n] = '\0';
    if (!parse_float(tok, v))
        return 0;
    *pp = p + n;
    return 1;
}

static const char *skip_space(const char *p)
{
    while (*p == ' ' || *p == '\t')
        p++;
    return p;
}


/* The list text: '(0.9, 0.98)', '[0.9,0.98]', '0.9,0.98', '(0.5,)', '()'.
 * Returns 1 when well formed; *n is the count (values beyond max are
 * counted, not stored). */
static int parse_list(const char *text, double *out, int max, int *n)
{
    *n = 0;
    if (!text)
        return 1;
    const char *p = skip_space(text);
    char close = *p == '(' ? ')' : *p == '[' ? ']' : '\0';
    if (close)
        p++;
    int count = 0, ok = 0;
    for (;;) {
        p = skip_space(p);
        if (close && *p == close && count == 0) { /* "()" */
            p++;
            ok = 1;
            break;
        }
        double v;
        if (!list_token(&p, &v))
            break;
        if (count < max && out)
            out[count] = v;
        count++;
        p = skip_space(p);
        if (*p == ',') {
            p = skip_space(p + 1);
            if (close && *p == close) { /* "(0.9,)" */
                p++;
                ok = 1;
                break;
            }
            if (!close && !*p) { /* "0.9," */
                ok = 1;
                break;
            }
            continue;
        }
        if (close && *p == close) {
            p++;
            ok = 1;
        } else if (!close && !*p) {
            ok = 1;
        }
        break;
    }
    if (ok)
        p = skip_space(p);
    if (!ok || *p || (!close && count == 0))
        return 0;
    *n = count;
    return 1;
}

/* 1 if `v` is a valid value of `d`; otherwise 0 and `why` says what was
 * expected ("an integer", "one of json, simple, ..."), `hint` what to try. */
static int value_ok(const moe_option *d, const char *v, char *why, size_t wsize, char *hint, size_t hsize)
{
    why[0] = hint[0] = '\0';
    switch (d->type) {
    case MOE_OPT_FLAG: {
        int on;
        if (flag_text(v, &on))
            return 1;
        snprintf(why, wsize, "a flag value (1 or 0)");
        return 0;
    }
    case MOE_OPT_INT:
    case MOE_OPT_FLOAT: {
        int64_t iv = 0;
        double fv = 0.0;
        int ok = d->type == MOE_OPT_INT ? parse_int(v, &iv) : parse_float(v, &fv);
        if (ok && d->type == MOE_OPT_INT)
            fv = (double)iv;
        if (ok && !isfinite(fv)) /* nan and inf mean nothing as a setting */
            ok = 0;
        double lo, hi;
        if (ok && value_bounds(d, &lo, &hi) && (fv < lo || fv > hi))
            ok = 0;
        if (ok)
            return 1;
        expected_text(d, why, wsize);
        const char *example = d->default_value;
        char bound[48];
        if (!example && d->min < d->max) {
            fmt_bound(bound, sizeof bound, d->type, d->min);
            example = bound;
        }
        if (example)
            snprintf(hint, hsize, " (e.g. --%s %s)", d->name, example);
        return 0;
    }
    case MOE_OPT_STRING:
        return 1;
    case MOE_OPT_FLOATS: {
        double vals[64];
        int n = 0, want = d->choices && *d->choices ? atoi(d->choices) : 0;
        int ok = parse_list(v, vals, 64, &n) && n <= 64 && (want <= 0 || n == want) && (want > 0 || n > 0);
        for (int i = 0; ok && i < n; i++)
            ok = isfinite(vals[i]) && !(d->min < d->max && (vals[i] < d->min || vals[i] > d->max));
        if (ok)
            return 1;
        char range[120] = "";
        if (d->min < d->max) {
            char lo[48], hi[48];
            fmt_bound(lo, sizeof lo, MOE_OPT_FLOAT, d->min);
            fmt_bound(hi, sizeof hi, MOE_OPT_FLOAT, d->max);
            snprintf(range, sizeof range, isinf(d->max) ? ", each at least %s" : ", each in [%s, %s]", lo, hi);
        }
        if (want > 0)
            snprintf(why, wsize, "a list of %d finite numbers%s", want, range);
        else
            snprintf(why, wsize, "a list of finite numbers%s", range);
        if (d->default_value)
            snprintf(hint, hsize, " (e.g. --%s '%s')", d->name, d->default_value);
        return 0;
    }
    case MOE_OPT_CHOICE: {
        if (v && choice_has(d->choices, v))
            return 1;
        char list[512], near[128];
        choices_list(d->choices, ", ", list, sizeof list);
        snprintf(why, wsize, "one of %s", list);
        closest_choice(d->choices, v ? v : "", near, sizeof near);
        if (near[0])
            snprintf(hint, hsize, " (did you mean %s?)", near);
        return 0;
    }
    }
    snprintf(why, wsize, "a known option type");
    return 0;
}

/* ------------------------------------------------------------------ lookup */

static const char *alias_target(const char *name, size_t len)
{
    for (int i = 0; i < moe_core_option_aliases_count; i++) {
        const char *a = moe_core_option_aliases[i].alias;
        if (strlen(a) == len && strncmp(a, name, len) == 0)
            return moe_core_option_aliases[i].name;
    }
    return NULL;
}

static int find_n(const moe_opts *o, const char *name, size_t len)
{
    if (!o || !name)
        return -1;
    for (int i = 0; i < o->n; i++) {
        const char *s = o->e[i].def.name;
        if (strlen(s) == len && strncmp(s, name, len) == 0)
            return i;
    }
    const char *target = alias_target(name, len);
    return target ? find_n(o, target, strlen(target)) : -1;
}

static int find(const moe_opts *o, const char *name) { return name ? find_n(o, name, strlen(name)) : -1; }

/* Getters on a name nobody registered are a bug in the caller: say so loudly
 * and answer None. */
static const opt_entry *entry_or_warn(const moe_opts *o, const char *name)
{
    int i = find(o, name);
    if (i >= 0)
        return &o->e[i];
    moe_log(MOE_LOG_ERROR, "moelm.options", "option --%s was read but no option table registers it (returning None)",
            name ? name : "(null)");
    return NULL;
}

/* ------------------------------------------------------------------ tables */

static moe_status group_index(moe_opts *o, const char *title, int *out)
{
    for (int i = 0; i < o->n_groups; i++)
        if (strcmp(o->groups[i], title) == 0) {
            *out = i;
            return MOE_OK;
        }
    if (o->n_groups == o->cap_groups) {
        int cap = o->cap_groups ? 2 * o->cap_groups : 16;
        char **g = realloc(o->groups, (size_t)cap * sizeof *g);
        if (!g)
            return nomem();
        o->groups = g;
        o->cap_groups = cap;
    }
    char *t = dup_str(title);
    if (!t)
        return nomem();
    o->groups[o->n_groups] = t;
    *out = o->n_groups++;
    return MOE_OK;
}

static int name_ok(const char *s)
{
    if (!s || !isalnum((unsigned char)s[0]))
        return 0;
    for (const char *p = s; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '-')
            return 0;
    return 1;
}

/* Checks one definition on its own; the message names the owner. */
static moe_status check_def(const char *owner, const moe_option *d)
{
    if (!name_ok(d->name))
        return moe_error_set(MOE_ERR_PLUGIN,
                             "option table of %s: expected option names of letters, digits and dashes without the "
                             "leading '--' (e.g. \"moe-expert-count\"), found \"%s\"; fix the table",
                             owner, d->name ? d->name : "(null)");
    if ((int)d->type < (int)MOE_OPT_FLAG || (int)d->type > (int)MOE_OPT_FLOATS)
        return moe_error_set(MOE_ERR_PLUGIN, "option table of %s: --%s has type %d, expected a moe_opt_type (0..%d)",
                             owner, d->name, (int)d->type, (int)MOE_OPT_FLOATS);
    if (d->type == MOE_OPT_FLOATS && d->choices && *d->choices &&
        (atoi(d->choices) < 1 || atoi(d->choices) > 64 || strspn(d->choices, "0123456789") != strlen(d->choices)))
        return moe_error_set(MOE_ERR_PLUGIN,
                             "option table of %s: --%s is a FLOATS option whose count \"%s\" is not a number of "
                             "values in 1..64; give it as \"2\" or leave it NULL",
                             owner, d->name, d->choices);
    if (d->type == MOE_OPT_CHOICE && (!d->choices || !*d->choices))
        return moe_error_set(MOE_ERR_PLUGIN,
                             "option table of %s: --%s is a CHOICE option without choices; give them as \"a|b|c\"",
                             owner, d->name);
    if (d->default_value) {
        char why[600], hint[200];
        if (!value_ok(d, d->default_value, why, sizeof why, hint, sizeof hint))
            return moe_error_set(MOE_ERR_PLUGIN,
                                 "option table of %s: --%s has default '%s', expected %s; fix the table", owner,
                                 d->name, d->default_value, why);
    }
    return MOE_OK;
}

/* Checks that `d` may join the store: new, or the same name and type as an
 * option already there (then shared). */
static moe_status check_clash(const moe_opts *o, const char *owner, const moe_option *d)
{
    int i = find(o, d->name);
    if (i < 0)
        return MOE_OK;
    const opt_entry *e = &o->e[i];
    if (e->def.type == d->type)
        return MOE_OK;
    return moe_error_set(MOE_ERR_PLUGIN,
                         "option --%s of %s is %s, but %s already defines --%s as %s; one of them must rename it or "
                         "use the same type",
                         d->name, owner, type_name(d->type), o->groups[e->group], e->def.name, type_name(e->def.type));
}

static moe_status append(moe_opts *o, int group, const moe_option *d)
{
    if (o->n == o->cap) {
        int cap = o->cap ? 2 * o->cap : 128;
        opt_entry *e = realloc(o->e, (size_t)cap * sizeof *e);
        if (!e)
            return nomem();
        o->e = e;
        o->cap = cap;
    }
    opt_entry *e = &o->e[o->n];
    memset(e, 0, sizeof *e);
    e->def = *d;
    e->group = group;
    e->def.name = dup_str(d->name);
    e->def.help = dup_str(d->help ? d->help : "");
    e->def.default_value = dup_str(d->default_value);
    e->def.choices = dup_str(d->choices);
    int on = 0;
    if (d->type == MOE_OPT_FLAG)
        flag_text(d->default_value, &on);
    e->value = d->type == MOE_OPT_FLAG ? (on ? dup_str("1") : NULL) : dup_str(d->default_value);
    o->n++; /* counted first so that destroy frees whatever was copied */
    int want_value = d->type == MOE_OPT_FLAG ? on : d->default_value != NULL;
    int lost = !e->def.name || !e->def.help || (d->default_value && !e->def.default_value) ||
               (d->choices && !e->def.choices) || (want_value && !e->value);
    return lost ? nomem() : MOE_OK;
}

static moe_status add_entries(moe_opts *o, const char *owner, const moe_option *opts, int n)
{
    for (int i = 0; i < n; i++) {
        MOE_TRY(check_def(owner, &opts[i]));
        MOE_TRY(check_clash(o, owner, &opts[i]));
        for (int j = 0; j < i; j++)
            if (strcmp(opts[j].name, opts[i].name) == 0 && opts[j].type != opts[i].type)
                return moe_error_set(MOE_ERR_PLUGIN, "option table of %s lists --%s twice, as %s and as %s; keep one",
                                     owner, opts[i].name, type_name(opts[j].type), type_name(opts[i].type));
    }
    int group = 0;
    MOE_TRY(group_index(o, owner, &group));
    for (int i = 0; i < n; i++)
        if (find(o, opts[i].name) < 0)
            MOE_TRY(append(o, group, &opts[i]));
    return MOE_OK;
}

moe_status moe_opts_create_tool(const char *prog, const char *usage, const char *about, moe_opts **out)
{
    *out = NULL;
    moe_opts *o = calloc(1, sizeof *o);
    if (!o)
        return nomem();
    o->prog = prog ? prog : "moelm";
    o->usage = usage ? usage : "[-h] [options]";
    o->about = about ? about : "";
    *out = o;
    return MOE_OK;
}

moe_status moe_opts_add_positional(moe_opts *o, const char *name)
{
    if (!o || !name || find(o, name) < 0 || o->e[find(o, name)].def.type != MOE_OPT_STRING)
        return moe_error_set(MOE_ERR_INTERNAL, "moe_opts_add_positional: '%s' is not a registered string option",
                             name ? name : "(null)");
    if (o->n_positional == MAX_POSITIONAL)
        return moe_error_set(MOE_ERR_INTERNAL, "moe_opts_add_positional: more than %d positional arguments",
                             MAX_POSITIONAL);
    char *c = dup_str(name);
    if (!c)
        return nomem();
    o->positional[o->n_positional++] = c;
    return MOE_OK;
}

moe_status moe_opts_create(moe_opts **out)
{
    MOE_TRY(moe_opts_create_tool("moelm-train",
                                 "[-h] --arch ARCH --optimizer OPTIMIZER [--task TASK] [--criterion CRITERION] "
                                 "[options] [DATA]",
                                 "Trains Mixture-of-Experts language models with fairseq's command line. The flags "
                                 "of the selected components (--arch, --task, --criterion, --optimizer, "
                                 "--lr-scheduler, the gate and the normalizer) follow the core's; --list-plugins "
                                 "shows what is installed.",
                                 out));
    moe_opts *o = *out;
    *out = NULL;
    moe_status st = MOE_OK;
    /* the core's table, one help group at a time */
    for (int g = 0; g < moe_core_option_groups_count && st == MOE_OK; g++) {
        int first = -1, end = moe_core_options_count;
        for (int i = 0; i < moe_core_options_count; i++) {
            if (strcmp(moe_core_options[i].name, moe_core_option_groups[g].first) == 0)
                first = i;
            if (g + 1 < moe_core_option_groups_count &&
                strcmp(moe_core_options[i].name, moe_core_option_groups[g + 1].first) == 0)
                end = i;
        }
        if (first < 0 || end < first) {
            st = moe_error_set(MOE_ERR_INTERNAL, "core option groups: group \"%s\" starts at --%s, which is %s",
                               moe_core_option_groups[g].title, moe_core_option_groups[g].first,
                               first < 0 ? "not in the table" : "after the next group's first option");
            break;
        }
        if (g == 0 && first != 0)
            st = moe_error_set(MOE_ERR_INTERNAL, "core option groups: the first group must start at --%s",
                               moe_core_options[0].name);
        else
            st = add_entries(o, moe_core_option_groups[g].title, moe_core_options + first, end - first);
    }
    if (st == MOE_OK && o->n != moe_core_options_count)
        st = moe_error_set(MOE_ERR_INTERNAL, "core option table: %d options registered out of %d (a duplicate name?)",
                           o->n, moe_core_options_count);
    for (int i = 0; st == MOE_OK && i < moe_core_option_aliases_count; i++)
        if (find(o, moe_core_option_aliases[i].name) < 0)
            st = moe_error_set(MOE_ERR_INTERNAL, "core option aliases: --%s names --%s, which is not in the table",
                               moe_core_option_aliases[i].alias, moe_core_option_aliases[i].name);
    if (st == MOE_OK)
        st = moe_opts_add_positional(o, "data");
    if (st != MOE_OK) {
        moe_opts_destroy(o);
        return st;
    }
    *out = o;
    return MOE_OK;
}

void moe_opts_destroy(moe_opts *o)
{
    if (!o)
        return;
    for (int i = 0; i < o->n; i++) {
        free((char *)o->e[i].def.name);
        free((char *)o->e[i].def.help);
        free((char *)o->e[i].def.default_value);
        free((char *)o->e[i].def.choices);
        free(o->e[i].value);
    }
    for (int i = 0; i < o->n_groups; i++)
        free(o->groups[i]);
    for (int i = 0; i < o->n_positional; i++)
        free(o->positional[i]);
    free(o->groups);
    free(o->e);
    free(o);
}

moe_status moe_opts_add_table(moe_opts *o, const char *owner, const moe_option *opts, int n)
{
    if (!o || n < 0 || (n > 0 && !opts))
        return moe_error_set(MOE_ERR_INVALID_ARG, "moe_opts_add_table: expected a store and %d options, found NULL",
                             n);
    return add_entries(o, owner && *owner ? owner : "plugin", opts, n);
}

/* ----------------------------------------------------------------- parsing */

/* Stores an already split value; `spelled` is the flag as the user wrote it. */
static moe_status store(opt_entry *e, const char *spelled, const char *value)
{
    char why[600], hint[200];
    if (!value_ok(&e->def, value, why, sizeof why, hint, sizeof hint))
        return moe_error_set(MOE_ERR_INVALID_ARG, "argument %s: expected %s, found '%s'%s", spelled, why, value,
                             hint);
    char *v = dup_str(value);
    if (!v)
        return nomem();
    free(e->value);
    e->value = v;
    e->given = 1;
    return MOE_OK;
}

/* The error for an unknown flag: `word` as typed, `typed`/`len` its name
 * without dashes. Suggests the closest known name (aliases included). */
static moe_status unknown_error(const moe_opts *o, const char *word, const char *typed, size_t len)
{
    char name[256];
    if (len >= sizeof name)
        len = sizeof name - 1;
    memcpy(name, typed, len);
    name[len] = '\0';
    char dashed[256];
    memcpy(dashed, name, len + 1);
    for (char *p = dashed; *p; p++)
        if (*p == '_')
            *p = '-';
    int dword = (int)(strchr(word, '=') ? (size_t)(strchr(word, '=') - word) : strlen(word));
    if (strcmp(dashed, name) != 0 && find(o, dashed) >= 0)
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "unrecognized argument: %.*s (did you mean --%s? flags are spelled with dashes)", dword,
                             word, dashed);
    const char *best = NULL;
    int best_d = 0;
    for (int i = 0; i < o->n + moe_core_option_aliases_count; i++) {
        const char *cand = i < o->n ? o->e[i].def.name : moe_core_option_aliases[i - o->n].alias;
        int d = moe_edit_distance(dashed, cand);
        if (!best || d < best_d) {
            best = cand;
            best_d = d;
        }
    }
    if (best && close_enough(best_d, dashed))
        return moe_error_set(MOE_ERR_INVALID_ARG, "unrecognized argument: %.*s (did you mean --%s?)", dword, word,
                             best);
    return moe_error_set(MOE_ERR_INVALID_ARG,
                         "unrecognized argument: %.*s (not a flag of %s%s; see --help)", dword, word, o->prog,
                         strcmp(o->prog, "moelm-train") == 0 ? " or of the selected components" : "");
}

moe_status moe_opts_parse(moe_opts *o, int argc, char **argv, int strict)
{
    if (!o || (argc > 1 && !argv))
        return moe_error_set(MOE_ERR_INVALID_ARG, "moe_opts_parse: expected a store and argv, found NULL");
    int positional_only = 0, n_pos = 0;
    for (int i = 1; i < argc; i++) {
        const char *w = argv[i];
        if (!w)
            continue;
        if (!positional_only && strcmp(w, "--") == 0) {
            positional_only = 1;
            continue;
        }
        if (positional_only || !is_option_word(w)) {
            if (n_pos < o->n_positional) {
                char spelled[300];
                snprintf(spelled, sizeof spelled, "%s", o->positional[n_pos]);
                for (char *p = spelled; *p; p++)
                    *p = (char)toupper((unsigned char)*p);
                MOE_TRY(store(&o->e[find(o, o->positional[n_pos])], spelled, w));
                n_pos++;
                continue;
            }
            if (strict) {
                if (o->n_positional == 0)
                    return moe_error_set(MOE_ERR_INVALID_ARG,
                                         "unrecognized argument: '%s' (%s takes no positional arguments; flags "
                                         "start with --, and a value with spaces needs quotes)",
                                         w, o->prog);
                return moe_error_set(MOE_ERR_INVALID_ARG,
                                     "unrecognized argument: '%s' (%s takes %d positional argument%s; flags start "
                                     "with --, and a value with spaces needs quotes)",
                                     w, o->prog, o->n_positional, o->n_positional == 1 ? "" : "s");
            }
            continue;
        }
        const char *name, *inline_value = NULL;
        size_t len;
        if (strcmp(w, "-h") == 0) {
            name = "help";
            len = 4;
        } else if (w[1] != '-') { /* single-dash words other than -h are not flags of ours */
            name = w;
            len = strlen(w);
        } else {
            name = w + 2;
            const char *eq = strchr(name, '=');
            len = eq ? (size_t)(eq - name) : strlen(name);
            inline_value = eq ? eq + 1 : NULL;
        }
        int idx = w[1] == '-' || strcmp(w, "-h") == 0 ? find_n(o, name, len) : -1;
        if (idx < 0) {
            if (strict)
                return unknown_error(o, w, name, len);
            /* lenient: skip it, and its value when one follows */
            if (!inline_value && i + 1 < argc && argv[i + 1] && !is_option_word(argv[i + 1]) &&
                strcmp(argv[i + 1], "--") != 0)
                i++;
            continue;
        }
        opt_entry *e = &o->e[idx];
        char spelled[300]; /* the flag as the user wrote it, for messages */
        if (strcmp(w, "-h") == 0)
            snprintf(spelled, sizeof spelled, "-h");
        else
            snprintf(spelled, sizeof spelled, "--%.*s", (int)len, name);
        if (e->def.type == MOE_OPT_FLAG) {
            if (inline_value)
                return moe_error_set(MOE_ERR_INVALID_ARG,
                                     "argument %s: expected no value (it is a flag), found '%s'; give %s alone",
                                     spelled, w, spelled);
            MOE_TRY(store(e, spelled, "1"));
            continue;
        }
        const char *value = inline_value;
        if (!value) {
            const char *next = i + 1 < argc ? argv[i + 1] : NULL;
            if (!next)
                return moe_error_set(MOE_ERR_INVALID_ARG,
                                     "argument %s: expected one value, found the end of the command line; give %s %s",
                                     spelled, spelled, type_name(e->def.type));
            if (is_option_word(next))
                return moe_error_set(MOE_ERR_INVALID_ARG,
                                     "argument %s: expected one value, found the flag '%s'; give %s %s before it",
                                     spelled, next, spelled, type_name(e->def.type));
            value = argv[++i];
        }
        MOE_TRY(store(e, spelled, value));
    }
    return MOE_OK;
}

/* ------------------------------------------------------------------ access */

int moe_opts_known(const moe_opts *o, const char *name) { return find(o, name) >= 0; }

int moe_opts_given(const moe_opts *o, const char *name)
{
    int i = find(o, name);
    return i >= 0 && o->e[i].given;
}

int moe_opts_has_value(const moe_opts *o, const char *name)
{
    int i = find(o, name);
    return i >= 0 && o->e[i].value != NULL;
}

const char *moe_opts_str(const moe_opts *o, const char *name)
{
    const opt_entry *e = entry_or_warn(o, name);
    return e ? e->value : NULL;
}

int64_t moe_opts_int(const moe_opts *o, const char *name)
{
    const opt_entry *e = entry_or_warn(o, name);
    if (!e || !e->value)
        return 0;
    int64_t v;
    if (parse_int(e->value, &v))
        return v;
    /* a number read as an integer: truncated, and saturated where int64
     * ends (converting an out-of-range double is undefined) */
    double f;
    if (!parse_float(e->value, &f) || isnan(f))
        return 0;
    if (f >= 9223372036854775807.0)
        return INT64_MAX;
    if (f <= -9223372036854775808.0)
        return INT64_MIN;
    return (int64_t)f;
}

double moe_opts_float(const moe_opts *o, const char *name)
{
    const opt_entry *e = entry_or_warn(o, name);
    double v;
    return e && e->value && parse_float(e->value, &v) ? v : 0.0;
}

int moe_opts_flag(const moe_opts *o, const char *name)
{
    const opt_entry *e = entry_or_warn(o, name);
    if (!e || !e->value)
        return 0;
    int on;
    return flag_text(e->value, &on) ? on : 1;
}

moe_status moe_opts_set(moe_opts *o, const char *name, const char *value)
{
    int i = find(o, name);
    if (i < 0)
        return moe_error_set(MOE_ERR_INTERNAL,
                             "moe_opts_set: expected a registered option, found --%s; register it in an option table",
                             name ? name : "(null)");
    opt_entry *e = &o->e[i];
    char spelled[300];
    snprintf(spelled, sizeof spelled, "--%s", e->def.name);
    if (e->def.type == MOE_OPT_FLAG) {
        int on;
        if (!flag_text(value, &on))
            return moe_error_set(MOE_ERR_INVALID_ARG, "argument %s: expected 1 or 0 (a flag), found '%s'", spelled,
                                 value);
        if (!on) {
            free(e->value);
            e->value = NULL;
            e->given = 1;
            return MOE_OK;
        }
        return store(e, spelled, "1");
    }
    if (!value) {
        free(e->value);
        e->value = NULL;
        e->given = 1;
        return MOE_OK;
    }
    return store(e, spelled, value);
}

moe_status moe_opts_reset(moe_opts *o, const char *name)
{
    int i = find(o, name);
    if (i < 0)
        return MOE_OK;
    opt_entry *e = &o->e[i];
    const char *def = e->def.default_value;
    if (e->def.type == MOE_OPT_FLAG) {
        int on = 0;
        flag_text(def, &on);
        def = on ? "1" : NULL;
    }
    char *v = NULL;
    if (def && !(v = dup_str(def)))
        return nomem();
    free(e->value);
    e->value = v;
    e->given = 0;
    return MOE_OK;
}

void moe_opts_set_program(moe_opts *o, const char *prog, const char *usage, const char *about)
{
    if (prog)
        o->prog = prog;
    if (usage)
        o->usage = usage;
    if (about)
        o->about = about;
}

moe_status moe_opts_float_list(const moe_opts *o, const char *name, double *out, int max, int *n)
{
    *n = 0;
    int idx = find(o, name);
    if (idx < 0)
        return moe_error_set(MOE_ERR_INTERNAL,
                             "moe_opts_float_list: expected a registered option, found --%s; register it first",
                             name ? name : "(null)");
    const char *text = o->e[idx].value;
    if (!text)
        return MOE_OK;
    int count;
    if (!parse_list(text, out, max, &count))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "argument --%s: expected a list of numbers such as '(0.9, 0.98)' or '0.9,0.98', "
                             "found '%s'",
                             o->e[idx].def.name, text);
    if (count > max)
        return moe_error_set(MOE_ERR_INVALID_ARG, "argument --%s: expected at most %d number%s, found %d in '%s'",
                             o->e[idx].def.name, max, max == 1 ? "" : "s", count, text);
    *n = count;
    return MOE_OK;
}

/* -------------------------------------------------------------------- help */

/* Writes `text` from column `col` (the cursor is there), wrapping at
 * HELP_WIDTH and indenting continuation lines to `col`. */
static void print_wrapped(FILE *out, const char *text, int col)
{
    int pos = col;
    const char *p = text;
    while (*p) {
        while (*p == ' ')
            p++;
        size_t n = strcspn(p, " ");
        if (n == 0)
            break;
        if (pos > col && pos + 1 + (int)n > HELP_WIDTH) {
            fprintf(out, "\n%*s", col, "");
            pos = col;
        }
        if (pos > col) {
            fputc(' ', out);
            pos++;
        }
        fwrite(p, 1, n, out);
        pos += (int)n;
        p += n;
    }
    fputc('\n', out);
}

static void print_entry(FILE *out, const opt_entry *e)
{
    char left[512];
    int len;
    if (strcmp(e->def.name, "help") == 0)
        len = snprintf(left, sizeof left, "  -h, --help");
    else
        len = snprintf(left, sizeof left, "  --%s", e->def.name);
    for (int a = 0; a < moe_core_option_aliases_count; a++)
        if (strcmp(moe_core_option_aliases[a].name, e->def.name) == 0 && len < (int)sizeof left)
            len += snprintf(left + len, sizeof left - (size_t)len, ", --%s", moe_core_option_aliases[a].alias);
    if (len < (int)sizeof left) {
        if (e->def.type == MOE_OPT_CHOICE) {
            char list[400];
            choices_list(e->def.choices, ",", list, sizeof list);
            len += snprintf(left + len, sizeof left - (size_t)len, " {%s}", list);
        } else if (e->def.type != MOE_OPT_FLAG) {
            len += snprintf(left + len, sizeof left - (size_t)len, " %s", type_name(e->def.type));
        }
    }
    if (len >= (int)sizeof left)
        len = (int)sizeof left - 1;
    char right[1200];
    if (e->def.type != MOE_OPT_FLAG && !strstr(e->def.help, "(default:"))
        snprintf(right, sizeof right, "%s (default: %s)", e->def.help,
                 e->def.default_value ? e->def.default_value : "None");
    else
        snprintf(right, sizeof right, "%s", e->def.help);
    fputs(left, out);
    if (len + 2 > HELP_COLUMN) {
        fprintf(out, "\n%*s", HELP_COLUMN, "");
    } else {
        fprintf(out, "%*s", HELP_COLUMN - len, "");
    }
    print_wrapped(out, right, HELP_COLUMN);
}

void moe_opts_print_help(const moe_opts *o, FILE *out)
{
    fprintf(out, "usage: %s %s\n\n", o->prog, o->usage);
    if (*o->about)
        print_wrapped(out, o->about, 0);
    for (int g = 0; g < o->n_groups; g++) {
        int any = 0;
        for (int i = 0; i < o->n && !any; i++)
            any = o->e[i].group == g;
        if (!any)
            continue;
        fprintf(out, "\n%s:\n", o->groups[g]);
        for (int i = 0; i < o->n; i++)
            if (o->e[i].group == g)
                print_entry(out, &o->e[i]);
    }
}

/* ----------------------------------------------------------- edit distance */

int moe_edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    int *row = malloc((lb + 1) * sizeof *row);
    if (!row) /* an upper bound is still a usable answer */
        return (int)(la > lb ? la : lb);
    for (size_t j = 0; j <= lb; j++)
        row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j];
            int cost = a[i - 1] == b[j - 1] ? 0 : 1;
            int best = diag + cost;
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    int d = row[lb];
    free(row);
    return d;
}

/* options.h: the command line: option tables, parsing, typed access, help.
 *
 * The core registers its own table (every fairseq flag moelm knows, with
 * fairseq's defaults; core/options.c); each loaded plugin adds its table
 * (fairseq's add_args). Parsing is two-phase like fairseq: a lenient pass that
 * skips unknown flags (so --arch etc. can be read and plugins loaded), then a
 * strict pass once every table is in.
 *
 * Names are stored without the leading dashes; underscores in user input are
 * not accepted (fairseq uses dashes). Values keep their text; typed getters
 * convert (validated at parse time, so they cannot fail on a known name).
 */
#ifndef MOE_CORE_OPTIONS_H
#define MOE_CORE_OPTIONS_H

#include <stdint.h>
#include <stdio.h>

#include "moe/plugin.h"

typedef struct moe_opts moe_opts;

/* Creates moelm-train's store: the core's table registered, and the
 * positional DATA argument (fairseq's task data path) stored as "data". */
moe_status moe_opts_create(moe_opts **o);
/* An empty store for another executable: `prog` names it in messages,
 * `usage` follows "usage: <prog> " in --help, `about` is help's paragraph
 * (the strings must outlive the store). Add tables with moe_opts_add_table. */
moe_status moe_opts_create_tool(const char *prog, const char *usage, const char *about, moe_opts **o);
/* Bare words on the command line fill the registered string options named
 * here, in the order added (at most 4); a word beyond them is an error in
 * the strict pass. */
moe_status moe_opts_add_positional(moe_opts *o, const char *name);
void moe_opts_destroy(moe_opts *o);

/* Add a plugin's options. owner names it in --help ("criterion moe_cross_entropy").
 * A name already present with the same type is shared (not an error). */
moe_status moe_opts_add_table(moe_opts *o, const char *owner, const moe_option *opts, int n);

/* Parse argv[1..argc-1]. strict = 0: unknown flags are skipped (their value
 * too, when the next word is not a flag). strict = 1: an unknown flag is an
 * error naming the closest known flag. Values are checked against type,
 * range and choices in both passes. Bare words fill the positional options
 * (moe_opts_add_positional); any other is an error (strict). */
moe_status moe_opts_parse(moe_opts *o, int argc, char **argv, int strict);

int moe_opts_known(const moe_opts *o, const char *name);
int moe_opts_given(const moe_opts *o, const char *name);    /* on the command line */
int moe_opts_has_value(const moe_opts *o, const char *name);/* given or non-None default */
const char *moe_opts_str(const moe_opts *o, const char *name); /* NULL when None */
int64_t moe_opts_int(const moe_opts *o, const char *name);
double moe_opts_float(const moe_opts *o, const char *name);
int moe_opts_flag(const moe_opts *o, const char *name);
/* Set a value as if given (used for derived defaults, e.g. --fp16 from
 * --memory-efficient-fp16). Validated like user input. */
moe_status moe_opts_set(moe_opts *o, const char *name, const char *value);

/* Back to the table's default, as if never given (no-op for an unknown name). */
moe_status moe_opts_reset(moe_opts *o, const char *name);
/* Another executable's name, usage line and help paragraph for a store made
 * by moe_opts_create (NULL keeps one; the strings must outlive the store). */
void moe_opts_set_program(moe_opts *o, const char *prog, const char *usage, const char *about);

/* --adam-betas '(0.9, 0.98)' and friends: a Python tuple/list of floats. */
moe_status moe_opts_float_list(const moe_opts *o, const char *name, double *out, int max, int *n);

/* fairseq-style help: usage, then groups by owner, each flag with type,
 * default and help text. */
void moe_opts_print_help(const moe_opts *o, FILE *out);

/* Levenshtein distance, for "did you mean" (also used by the registry). */
int moe_edit_distance(const char *a, const char *b);

#endif

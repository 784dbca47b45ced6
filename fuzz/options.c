/* options.c (fuzz): the option parser on command lines made of the input's
 * lines: moelm-train's table plus one option of every type (ranged and not,
 * number lists with a count, choices, strings, flags), both parsing passes,
 * every getter, the list reader, the combination checks and --help. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "core/internal.h"
#include "core/options.h"
#include "fuzz_util.h"

static const moe_option fz_options[] = {
    {"fz-int", MOE_OPT_INT, "3", "an integer", 0, 0, NULL},
    {"fz-int-ranged", MOE_OPT_INT, "5", "a ranged integer", -10, 1e9, NULL},
    {"fz-float", MOE_OPT_FLOAT, "0.5", "a number", 0, 0, NULL},
    {"fz-float-ranged", MOE_OPT_FLOAT, "0.5", "a ranged number", 0, 1, NULL},
    {"fz-floats", MOE_OPT_FLOATS, "(0.9, 0.98)", "two numbers", 0, 1, "2"},
    {"fz-floats-any", MOE_OPT_FLOATS, NULL, "numbers", 0, 0, NULL},
    {"fz-choice", MOE_OPT_CHOICE, "a", "a choice", 0, 0, "a|bb|ccc"},
    {"fz-str", MOE_OPT_STRING, NULL, "a string", 0, 0, NULL},
    {"fz-flag", MOE_OPT_FLAG, NULL, "a flag", 0, 0, NULL},
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static FILE *devnull;
    if (!devnull)
        devnull = fopen("/dev/null", "w");
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    char *argv[65];
    int argc = 0;
    argv[argc++] = (char *)"moelm-train";
    for (char *p = text, *line; argc < 65 && (line = strsep(&p, "\n")) != NULL;)
        argv[argc++] = line;

    moe_opts *o = NULL;
    if (moe_opts_create(&o) == MOE_OK && moe_opts_add_table(o, "fuzz", fz_options, 9) == MOE_OK) {
        moe_opts_parse(o, argc, argv, 0);
        moe_error_clear();
        moe_status st = moe_opts_parse(o, argc, argv, 1);
        moe_error_clear();
        const char *names[] = {"fz-int", "fz-int-ranged", "fz-float", "fz-float-ranged", "fz-floats", "fz-floats-any",
                               "fz-choice", "fz-str", "fz-flag", "lr", "update-freq", "max-update", "seed",
                               "batch-size", "save-dir", "distributed-world-size"};
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
            (void)moe_opts_known(o, names[i]);
            (void)moe_opts_given(o, names[i]);
            (void)moe_opts_has_value(o, names[i]);
            (void)moe_opts_str(o, names[i]);
            (void)moe_opts_int(o, names[i]);
            (void)moe_opts_float(o, names[i]);
            (void)moe_opts_flag(o, names[i]);
            double v[8];
            int n;
            moe_opts_float_list(o, names[i], v, 8, &n);
            moe_error_clear();
        }
        if (st == MOE_OK) {
            moe_config_check(o, argc % 8 + 1);
            moe_error_clear();
        }
        /* values set as the program sets derived defaults */
        for (int i = 1; i + 1 < argc && i < 8; i += 2) {
            moe_opts_set(o, "fz-floats", argv[i]);
            moe_opts_set(o, "fz-choice", argv[i + 1]);
            moe_error_clear();
        }
        moe_opts_reset(o, "fz-int");
        if (devnull && argc > 1 && argv[1][0] == 'h')
            moe_opts_print_help(o, devnull);
    }
    moe_error_clear();
    moe_opts_destroy(o);
    free(text);
    return 0;
}

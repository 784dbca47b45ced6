/* runcmd.h: run moelm-train as a user would, for the end-to-end tests:
 * captures stdout and stderr separately and the exit status. */
#ifndef MOE_TESTS_RUNCMD_H
#define MOE_TESTS_RUNCMD_H

typedef struct moe_cmd_result {
    int status;      /* exit status, or -1 if it did not exit normally */
    char *out;       /* stdout, NUL-terminated (malloc'd) */
    char *err;       /* stderr */
    double seconds;  /* wall time */
} moe_cmd_result;

/* Runs MOE_TEST_BIN_DIR/moelm-train with `args` (a shell-quoted string). */
int moe_run_train(const char *args, moe_cmd_result *r);
/* Runs a shell command line the same way. */
int moe_run_shell(const char *cmdline, moe_cmd_result *r);
void moe_cmd_result_free(moe_cmd_result *r);
/* Lets mpirun run here (as root too, without the shared-memory single copy
 * that containers refuse) and says whether it is installed. */
int moe_mpirun_prepare(void);
/* The number of lines of `text` containing `needle`. */
int moe_count_lines(const char *text, const char *needle);

#endif

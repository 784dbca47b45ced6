/* runcmd.c: see runcmd.h. Uses the shell so tests can pass arguments the way
 * a user types them (quotes included). */
#include "runcmd.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf) {
        size_t got = fread(buf, 1, (size_t)n, f);
        buf[got] = '\0';
    }
    fclose(f);
    return buf;
}

int moe_run_train(const char *args, moe_cmd_result *r)
{
    size_t len = strlen(args) + strlen(MOE_TEST_BIN_DIR) + 32;
    char *cmd = malloc(len);
    if (!cmd)
        return -1;
    snprintf(cmd, len, "%s/moelm-train %s", MOE_TEST_BIN_DIR, args);
    int rc = moe_run_shell(cmd, r);
    free(cmd);
    return rc;
}

int moe_run_shell(const char *cmdline, moe_cmd_result *r)
{
    memset(r, 0, sizeof *r);
    char out_path[] = "/tmp/moelm-test-out-XXXXXX";
    char err_path[] = "/tmp/moelm-test-err-XXXXXX";
    int fo = mkstemp(out_path), fe = mkstemp(err_path);
    if (fo < 0 || fe < 0)
        return -1;
    close(fo);
    close(fe);
    size_t len = strlen(cmdline) + strlen(out_path) + strlen(err_path) + 32;
    char *cmd = malloc(len);
    if (!cmd)
        return -1;
    snprintf(cmd, len, "%s >%s 2>%s", cmdline, out_path, err_path);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    int rc = system(cmd);
    clock_gettime(CLOCK_MONOTONIC, &b);
    free(cmd);
    r->seconds = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
    r->status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    r->out = slurp(out_path);
    r->err = slurp(err_path);
    unlink(out_path);
    unlink(err_path);
    if (!r->out || !r->err)
        return -1;
    return 0;
}

void moe_cmd_result_free(moe_cmd_result *r)
{
    free(r->out);
    free(r->err);
    memset(r, 0, sizeof *r);
}

int moe_mpirun_prepare(void)
{
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
    return system("command -v mpirun >/dev/null 2>&1") == 0;
}

int moe_count_lines(const char *text, const char *needle)
{
    int n = 0;
    const char *line = text;
    while (line && *line) {
        const char *end = strchr(line, '\n');
        size_t l = end ? (size_t)(end - line) : strlen(line);
        const char *hit = strstr(line, needle);
        if (hit && hit < line + l)
            n++;
        line = end ? end + 1 : NULL;
    }
    return n;
}

/* test_registry.c: the plugin loader against fixtures broken on purpose.
 *
 * Each fixture (tests/fixtures) has one fault; loading it with the fixture
 * directory as --user-dir must fail with MOE_ERR_PLUGIN and a message that
 * names the file and the fault. Also: the search order (--user-dir, then
 * MOE_PLUGIN_PATH, then the install dir and the build tree), the unknown-name
 * listing (closest first) and --list-plugins output.
 *
 * `test_registry --example` runs a second group instead: load the out-of-tree
 * example plugin from MOE_TEST_EXAMPLE_DIR (built by tests/example_build.sh)
 * and run its schedule through a fake host.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/internal.h"
#include "core/registry.h"

#define FIXTURES MOE_TEST_FIXTURE_DIR
#define ORDER_USER MOE_TEST_FIXTURE_DIR "/order_user"
#define ORDER_PATH MOE_TEST_FIXTURE_DIR "/order_path"

/* Fails the test, printing the message, when `needle` is not in `text`. */
#define assert_contains(text, needle) assert_contains_at((text), (needle), __FILE__, __LINE__)

static void assert_contains_at(const char *text, const char *needle, const char *file, int line)
{
    if (text && needle && strstr(text, needle))
        return;
    print_error("%s:%d: expected to find\n  \"%s\"\nin\n  \"%s\"\n", file, line, needle ? needle : "(null)",
                text ? text : "(null)");
    fail();
}

/* |a - b| <= tol, with both values printed when not. */
#define assert_close(a, b, tol) assert_close_at((a), (b), (tol), __FILE__, __LINE__)

static void assert_close_at(double a, double b, double tol, const char *file, int line)
{
    if (a - b <= tol && b - a <= tol)
        return;
    print_error("%s:%d: expected %.17g, found %.17g (tolerance %g)\n", file, line, b, a, tol);
    fail();
}

static int setup(void **state)
{
    (void)state;
    setenv("MOE_PLUGIN_PATH", "", 1);
    moe_error_clear();
    return 0;
}

static moe_registry *registry_at(const char *user_dir)
{
    moe_registry *r = NULL;
    moe_status st = moe_registry_create(user_dir, &r);
    if (st != MOE_OK)
        print_error("moe_registry_create: %s\n", moe_error_message());
    assert_int_equal(st, MOE_OK);
    assert_non_null(r);
    return r;
}

static void fixture_path(char *buf, size_t n, const char *dir, const char *kind, const char *name)
{
    snprintf(buf, n, "%s/libmoe-%s-%s.so", dir, kind, name);
}

/* Load criterion `name` from the fixture dir: must fail with MOE_ERR_PLUGIN,
 * naming the file and containing each reason. */
static void expect_rejected(const char *name, const char *reason1, const char *reason2)
{
    moe_registry *r = registry_at(FIXTURES);
    const moe_plugin_desc *d = (const moe_plugin_desc *)&d; /* anything non-NULL */
    moe_status st = moe_registry_load(r, MOE_KIND_CRITERION, name, &d);
    if (st != MOE_ERR_PLUGIN)
        print_error("loading %s: status %d, message: %s\n", name, (int)st, moe_error_message());
    assert_int_equal(st, MOE_ERR_PLUGIN);
    assert_null(d);
    char path[1024];
    fixture_path(path, sizeof path, FIXTURES, "criterion", name);
    const char *msg = moe_error_message();
    assert_contains(msg, path);
    assert_contains(msg, reason1);
    if (reason2)
        assert_contains(msg, reason2);
    assert_null(strchr(msg, '\n')); /* one line */
    assert_null(moe_registry_path(r, MOE_KIND_CRITERION, name));

    /* a failure is not cached: the second attempt fails the same way */
    moe_error_clear();
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, name, &d), MOE_ERR_PLUGIN);
    assert_contains(moe_error_message(), reason1);
    moe_error_clear();
    moe_registry_destroy(r);
}

/* ------------------------------------------------------------ good plugin */

static void test_registry_loads_good_fixture(void **state)
{
    (void)state;
    moe_registry *r = registry_at(FIXTURES);

    /* a broken plugin first: it must not poison the registry */
    const moe_plugin_desc *d = NULL;
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_abi_major", &d), MOE_ERR_PLUGIN);
    moe_error_clear();

    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_good", &d), MOE_OK);
    assert_non_null(d);
    assert_int_equal(d->kind, MOE_KIND_CRITERION);
    assert_string_equal(d->name, "fixture_good");
    assert_string_equal(d->version, "1.2.3");
    assert_int_equal(d->n_options, 1);
    assert_string_equal(d->options[0].name, "fixture-weight");

    char path[1024];
    fixture_path(path, sizeof path, FIXTURES, "criterion", "fixture_good");
    assert_string_equal(moe_registry_path(r, MOE_KIND_CRITERION, "fixture_good"), path);
    assert_null(moe_registry_path(r, MOE_KIND_GATE, "fixture_good"));

    /* the table is the plugin's own and callable */
    const moe_criterion_ops *ops = d->ops;
    void *crit = NULL;
    assert_int_equal(ops->init(NULL, &crit), MOE_OK);
    float dl_aux = -1.0f;
    assert_int_equal(ops->compute(crit, NULL, &dl_aux), MOE_OK);
    assert_true(dl_aux == 0.0f);
    ops->destroy(crit);

    /* loading again returns the same descriptor, not a second copy */
    const moe_plugin_desc *again = NULL;
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_good", &again), MOE_OK);
    assert_ptr_equal(again, d);
    assert_string_equal(moe_error_message(), "");
    moe_registry_destroy(r);
}

/* ----------------------------------------------------------- each fault */

static void test_registry_rejects_missing_symbol(void **state)
{
    (void)state;
    expect_rejected("fixture_no_symbol", "expected the exported entry point moe_plugin_descriptor()",
                    "found no such symbol");
}

static void test_registry_rejects_null_descriptor(void **state)
{
    (void)state;
    expect_rejected("fixture_null_descriptor", "to return a descriptor", "found NULL");
}

static void test_registry_rejects_other_abi_major(void **state)
{
    (void)state;
    char why[128];
    snprintf(why, sizeof why, "built against moelm ABI 99.%d, this moelm is %d.%d: rebuild the plugin",
             MOE_ABI_MINOR, MOE_ABI_MAJOR, MOE_ABI_MINOR);
    expect_rejected("fixture_abi_major", why, NULL);
}

static void test_registry_rejects_newer_abi_minor(void **state)
{
    (void)state;
    char why[128];
    snprintf(why, sizeof why, "built against moelm ABI %d.%d, this moelm is %d.%d: rebuild the plugin",
             MOE_ABI_MAJOR, MOE_ABI_MINOR + 1, MOE_ABI_MAJOR, MOE_ABI_MINOR);
    expect_rejected("fixture_abi_minor", why, NULL);
}

static void test_registry_rejects_host_size(void **state)
{
    (void)state;
    char why[192];
    snprintf(why, sizeof why, "expected host services of at least %zu bytes (the members of moe_host in ABI %d.0), "
             "found %zu", offsetof(moe_host, gate_ops) + sizeof(void *), MOE_ABI_MAJOR, offsetof(moe_host, gate_ops));
    expect_rejected("fixture_host_size", why, "rebuild");
}

static void test_registry_rejects_wrong_kind(void **state)
{
    (void)state;
    expect_rejected("fixture_wrong_kind", "expected kind criterion (from the file name), found gate", NULL);
}

static void test_registry_rejects_wrong_name(void **state)
{
    (void)state;
    expect_rejected("fixture_wrong_name", "expected name 'fixture_wrong_name' (from the file name)",
                    "found 'fixture_other_name'");
}

static void test_registry_rejects_ops_size(void **state)
{
    (void)state;
    char why[192];
    snprintf(why, sizeof why,
             "expected an ops table of at most %zu bytes (moe_criterion_ops of moelm ABI %d.%d), found %zu",
             sizeof(moe_criterion_ops), MOE_ABI_MAJOR, MOE_ABI_MINOR, sizeof(moe_criterion_ops) + sizeof(void *));
    expect_rejected("fixture_ops_size", why, "newer headers");
}

static void test_registry_rejects_null_ops(void **state)
{
    (void)state;
    expect_rejected("fixture_null_ops", "expected a moe_criterion_ops table", "found ops = NULL");
}

static void test_registry_rejects_null_function(void **state)
{
    (void)state;
    expect_rejected("fixture_null_function", "expected moe_criterion_ops.compute to be set", "found NULL");
}

static void test_registry_rejects_not_elf(void **state)
{
    (void)state;
    expect_rejected("not_elf", "expected a shared object", "dlopen failed");
}

static void test_registry_rejects_undefined_symbol(void **state)
{
    (void)state;
    expect_rejected("fixture_undefined", "dlopen failed", "moe_fixture_missing_function");
}

static void test_registry_rejects_duplicate(void **state)
{
    (void)state;
    char alias[1024], good[1024];
    fixture_path(alias, sizeof alias, FIXTURES, "criterion", "fixture_alias");
    fixture_path(good, sizeof good, FIXTURES, "criterion", "fixture_good");

    /* fixture_alias is a link to fixture_good's file */
    moe_registry *r = registry_at(FIXTURES);
    const moe_plugin_desc *d;
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_good", &d), MOE_OK);
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_alias", &d), MOE_ERR_PLUGIN);
    assert_null(d);
    assert_contains(moe_error_message(), alias);
    assert_contains(moe_error_message(), "same shared object as criterion 'fixture_good'");
    assert_contains(moe_error_message(), good);
    moe_error_clear();
    /* the first one is still loaded and usable */
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_good", &d), MOE_OK);
    moe_registry_destroy(r);

    /* alone, the link is a plugin whose descriptor has another name */
    expect_rejected("fixture_alias", "expected name 'fixture_alias'", "found 'fixture_good'");
}

static void test_registry_rejects_bad_names(void **state)
{
    (void)state;
    moe_registry *r = registry_at(FIXTURES);
    const moe_plugin_desc *d;
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "../fixtures/fixture_good", &d), MOE_ERR_INVALID_ARG);
    assert_contains(moe_error_message(), "expected a criterion name");
    moe_error_clear();
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "", &d), MOE_ERR_INVALID_ARG);
    moe_error_clear();
    assert_int_equal(moe_registry_load(r, MOE_KIND_COUNT, "fixture_good", &d), MOE_ERR_INTERNAL);
    moe_error_clear();
    moe_registry_destroy(r);
}

static void test_registry_user_dir_must_be_a_directory(void **state)
{
    (void)state;
    moe_registry *r = (moe_registry *)&r; /* anything non-NULL: a failed create must clear it */
    assert_int_equal(moe_registry_create(FIXTURES "/no_such_dir", &r), MOE_ERR_INVALID_ARG);
    assert_null(r);
    assert_contains(moe_error_message(), "--user-dir '" FIXTURES "/no_such_dir'");
    assert_contains(moe_error_message(), "No such file or directory");
    moe_error_clear();
    assert_int_equal(moe_registry_create(FIXTURES "/libmoe-criterion-not_elf.so", &r), MOE_ERR_INVALID_ARG);
    assert_contains(moe_error_message(), "not a directory");
    moe_error_clear();
    /* NULL and "" mean no --user-dir */
    r = registry_at(NULL);
    moe_registry_destroy(r);
    r = registry_at("");
    moe_registry_destroy(r);
}

/* ---------------------------------------------------------- unknown names */

static void test_registry_unknown_name_lists_closest_first(void **state)
{
    (void)state;
    moe_registry *r = registry_at(FIXTURES);
    const moe_plugin_desc *d;
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_god", &d), MOE_ERR_PLUGIN);
    assert_null(d);
    const char *msg = moe_error_message();
    assert_contains(msg, "unknown criterion 'fixture_god'; installed: fixture_good, ");
    /* every installed name is there, each once */
    assert_contains(msg, "fixture_undefined");
    assert_contains(msg, "not_elf");
    const char *first = strstr(msg, "fixture_null_ops");
    assert_non_null(first);
    assert_null(strstr(first + 1, "fixture_null_ops"));
    /* and where it looked */
    assert_contains(msg, "(searched: " FIXTURES);
    moe_error_clear();
    moe_registry_destroy(r);
}

/* ----------------------------------------------------------- search order */

static const char *load_version(moe_registry *r, moe_plugin_kind kind, const char *name)
{
    const moe_plugin_desc *d = NULL;
    moe_status st = moe_registry_load(r, kind, name, &d);
    if (st != MOE_OK)
        print_error("loading %s %s: %s\n", moe_kind_name(kind), name, moe_error_message());
    assert_int_equal(st, MOE_OK);
    return d->version;
}

static void test_registry_search_order_user_dir_then_path(void **state)
{
    (void)state;
    char want[1024];

    /* --user-dir beats MOE_PLUGIN_PATH */
    setenv("MOE_PLUGIN_PATH", ORDER_PATH, 1);
    moe_registry *r = registry_at(ORDER_USER);
    assert_string_equal(load_version(r, MOE_KIND_CRITERION, "fixture_order"), "user");
    fixture_path(want, sizeof want, ORDER_USER, "criterion", "fixture_order");
    assert_string_equal(moe_registry_path(r, MOE_KIND_CRITERION, "fixture_order"), want);
    /* what only the path has is still found */
    load_version(r, MOE_KIND_CRITERION, "fixture_path_only");
    fixture_path(want, sizeof want, ORDER_PATH, "criterion", "fixture_path_only");
    assert_string_equal(moe_registry_path(r, MOE_KIND_CRITERION, "fixture_path_only"), want);
    moe_registry_destroy(r);

    /* without --user-dir; empty entries and missing directories are skipped */
    setenv("MOE_PLUGIN_PATH", ":" FIXTURES "/no_such_dir::" ORDER_PATH ":" ORDER_USER ":", 1);
    r = registry_at(NULL);
    assert_string_equal(load_version(r, MOE_KIND_CRITERION, "fixture_order"), "path");
    fixture_path(want, sizeof want, ORDER_PATH, "criterion", "fixture_order");
    assert_string_equal(moe_registry_path(r, MOE_KIND_CRITERION, "fixture_order"), want);
    moe_registry_destroy(r);

    /* MOE_PLUGIN_PATH is read when the registry is created */
    setenv("MOE_PLUGIN_PATH", ORDER_USER, 1);
    r = registry_at(NULL);
    setenv("MOE_PLUGIN_PATH", ORDER_PATH, 1);
    assert_string_equal(load_version(r, MOE_KIND_CRITERION, "fixture_order"), "user");
    moe_registry_destroy(r);
}

static void test_registry_search_order_before_build_tree(void **state)
{
    (void)state;
    char built[1024], installed[1024], want[1024];
    fixture_path(built, sizeof built, MOE_TEST_PLUGIN_DIR, "communicator", "single");
    fixture_path(installed, sizeof installed, MOE_TEST_INSTALL_DIR, "communicator", "single");
    if (access(built, F_OK) != 0)
        skip(); /* the single-process communicator is not built */
    /* the install directory comes before the build tree */
    const char *expected = access(installed, F_OK) == 0 ? installed : built;

    moe_registry *r = registry_at(NULL);
    const char *v = load_version(r, MOE_KIND_COMMUNICATOR, "single");
    assert_string_not_equal(v, "user");
    assert_string_not_equal(v, "path");
    assert_string_equal(moe_registry_path(r, MOE_KIND_COMMUNICATOR, "single"), expected);
    moe_registry_destroy(r);

    setenv("MOE_PLUGIN_PATH", ORDER_PATH, 1);
    r = registry_at(NULL);
    assert_string_equal(load_version(r, MOE_KIND_COMMUNICATOR, "single"), "path");
    fixture_path(want, sizeof want, ORDER_PATH, "communicator", "single");
    assert_string_equal(moe_registry_path(r, MOE_KIND_COMMUNICATOR, "single"), want);
    moe_registry_destroy(r);

    r = registry_at(ORDER_USER);
    assert_string_equal(load_version(r, MOE_KIND_COMMUNICATOR, "single"), "user");
    moe_registry_destroy(r);
}

static int index_of(char **names, int n, const char *name)
{
    int at = -1;
    for (int i = 0; i < n; i++) {
        if (strcmp(names[i], name) == 0) {
            assert_int_equal(at, -1); /* listed once */
            at = i;
        }
    }
    return at;
}

static void test_registry_names_in_search_order(void **state)
{
    (void)state;
    setenv("MOE_PLUGIN_PATH", ORDER_PATH, 1);
    moe_registry *r = registry_at(ORDER_USER);
    char **names;
    int n = moe_registry_names(r, MOE_KIND_CRITERION, &names);
    int order = index_of(names, n, "fixture_order");
    int path_only = index_of(names, n, "fixture_path_only");
    assert_true(order >= 0);
    assert_true(path_only > order);
    assert_int_equal(index_of(names, n, "fixture_good"), -1); /* fixture dir not on the path */
    moe_registry_free_names(names, n);

    n = moe_registry_names(r, MOE_KIND_COMMUNICATOR, &names);
    assert_int_equal(index_of(names, n, "single"), 0);
    moe_registry_free_names(names, n);

    /* nothing is loaded by listing */
    assert_null(moe_registry_path(r, MOE_KIND_CRITERION, "fixture_order"));
    moe_registry_destroy(r);
}

/* ---------------------------------------------------------------- listing */

static char *print_listing(moe_registry *r)
{
    FILE *f = tmpfile();
    assert_non_null(f);
    assert_int_equal(moe_registry_print(r, f), MOE_OK);
    long len = ftell(f);
    assert_true(len > 0);
    char *text = malloc((size_t)len + 1);
    assert_non_null(text);
    rewind(f);
    assert_int_equal(fread(text, 1, (size_t)len, f), (size_t)len);
    text[len] = '\0';
    fclose(f);
    return text;
}

/* The line of `text` that starts with `prefix`, copied into buf. */
static const char *line_starting(const char *text, const char *prefix, char *buf, size_t n)
{
    size_t lp = strlen(prefix);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (strncmp(p, prefix, lp) == 0) {
            const char *e = strchr(p, '\n');
            size_t l = e ? (size_t)(e - p) : strlen(p);
            if (l >= n)
                l = n - 1;
            memcpy(buf, p, l);
            buf[l] = '\0';
            return buf;
        }
    }
    print_error("no line starting with \"%s\" in:\n%s\n", prefix, text);
    fail();
    return NULL;
}

static void test_registry_print_lists_by_kind(void **state)
{
    (void)state;
    moe_registry *r = registry_at(FIXTURES);
    char *text = print_listing(r);
    char line[2048], path[1024];

    assert_contains(text, "plugin search path");
    assert_contains(text, "\n  " FIXTURES "\n");
    /* kinds in enum order */
    const char *crit = strstr(text, "\ncriterion:\n");
    const char *gate = strstr(text, "\ngate:\n");
    assert_non_null(crit);
    assert_non_null(gate);
    assert_true(crit < gate);

    /* "  name  version  path  description" */
    line_starting(crit + 1, "  fixture_good ", line, sizeof line);
    fixture_path(path, sizeof path, FIXTURES, "criterion", "fixture_good");
    assert_contains(line, " 1.2.3 ");
    assert_contains(line, path);
    assert_contains(line, "registry fixture: a well-formed criterion");
    assert_true(strstr(line, "1.2.3") < strstr(line, path));

    /* broken ones are listed with their reason, not dropped */
    line_starting(crit + 1, "  fixture_abi_major ", line, sizeof line);
    assert_contains(line, "not loadable");
    assert_contains(line, "built against moelm ABI 99.");
    line_starting(crit + 1, "  not_elf ", line, sizeof line);
    assert_contains(line, "dlopen failed");

    /* the listing leaves no error pending */
    assert_string_equal(moe_error_message(), "");
    free(text);
    moe_registry_destroy(r);
}

/* An empty --user-dir: nothing to list there, nothing to sort (qsort must
 * not see the NULL array of no names: UBSan flags it). */
static void test_registry_empty_user_dir_lists_nothing(void **state)
{
    (void)state;
    char dir[] = "/tmp/moelm-test-empty-XXXXXX";
    assert_non_null(mkdtemp(dir));
    moe_registry *r = registry_at(dir);
    /* the empty directory comes first: no names yet when it is sorted */
    char **names;
    int n = moe_registry_names(r, MOE_KIND_CRITERION, &names);
    for (int i = 0; i < n; i++)
        assert_non_null(names[i]);
    moe_registry_free_names(names, n);
    char *text = print_listing(r);
    assert_contains(text, dir);
    free(text);
    moe_registry_destroy(r);
    rmdir(dir);
}

/* A directory, a symlink loop and a dangling symlink named like plugins are
 * reported as what they are, not as unknown names. */
static void test_registry_rejects_non_files(void **state)
{
    (void)state;
    expect_rejected("fixture_dir", "expected a shared object file, found a directory", NULL);
    expect_rejected("fixture_loop", "symbolic link that cannot be followed", "Too many levels of symbolic links");
    expect_rejected("fixture_dangling", "symbolic link that cannot be followed", "No such file or directory");
    moe_registry *r = registry_at(FIXTURES);
    const moe_plugin_desc *d;
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_dir", &d), MOE_ERR_PLUGIN);
    const char *msg = moe_error_message();
    if (strstr(msg, "unknown criterion"))
        fail_msg("a directory reported as an unknown name: %s", msg);
    moe_error_clear();
    moe_registry_destroy(r);
}

/* A load hook's failure names the file, the hook and the plugin's message. */
static void test_registry_hook_error_names_file_and_message(void **state)
{
    (void)state;
    moe_registry *r = registry_at(FIXTURES);
    const moe_plugin_desc *d;
    char path[1024];
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_load_fails", &d), MOE_OK);
    assert_non_null(d->load);
    moe_error_set(MOE_ERR_IO, "fixture: cannot open its table /nonexistent/fixture-table.bin");
    assert_int_equal(moe_registry_hook_error(r, d, "load", MOE_ERR_IO), MOE_ERR_IO);
    fixture_path(path, sizeof path, FIXTURES, "criterion", "fixture_load_fails");
    assert_contains(moe_error_message(), path);
    assert_contains(moe_error_message(), "load hook failed with MOE_ERR_IO");
    assert_contains(moe_error_message(), "cannot open its table /nonexistent/fixture-table.bin");
    moe_error_clear();
    assert_int_equal(moe_registry_load(r, MOE_KIND_CRITERION, "fixture_load_silent", &d), MOE_OK);
    assert_int_equal(moe_registry_hook_error(r, d, "load", MOE_ERR_IO), MOE_ERR_IO);
    assert_contains(moe_error_message(), "the plugin gave no message");
    moe_error_clear();
    moe_registry_destroy(r);
}

/* ------------------------------------------------- the out-of-tree example */

/* A fake host: options from a table, errors into a buffer. */
typedef struct fake_opt {
    const char *name, *value;
} fake_opt;

static const fake_opt *fake_opts;
static char fake_error[512];

static const char *fake_value(const char *name)
{
    for (const fake_opt *o = fake_opts; o && o->name; o++)
        if (strcmp(o->name, name) == 0)
            return o->value;
    return NULL;
}

static int fake_opt_set(const moe_host *h, const char *name) { (void)h; return fake_value(name) != NULL; }
static int64_t fake_opt_int(const moe_host *h, const char *name)
{
    (void)h;
    const char *v = fake_value(name);
    return v ? strtoll(v, NULL, 10) : 0;
}
static double fake_opt_float(const moe_host *h, const char *name)
{
    (void)h;
    const char *v = fake_value(name);
    return v ? strtod(v, NULL) : 0.0;
}
static int fake_opt_flag(const moe_host *h, const char *name) { (void)h; return fake_value(name) != NULL; }
static const char *fake_opt_str(const moe_host *h, const char *name) { (void)h; return fake_value(name); }

static moe_status fake_host_error(const moe_host *h, moe_status st, const char *fmt, ...)
{
    (void)h;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fake_error, sizeof fake_error, fmt, ap);
    va_end(ap);
    return st;
}

static moe_host fake_host(const fake_opt *opts)
{
    fake_opts = opts;
    fake_error[0] = '\0';
    moe_host h;
    memset(&h, 0, sizeof h);
    h.size = (uint32_t)sizeof h;
    h.error = fake_host_error;
    h.opt_set = fake_opt_set;
    h.opt_int = fake_opt_int;
    h.opt_float = fake_opt_float;
    h.opt_flag = fake_opt_flag;
    h.opt_str = fake_opt_str;
    h.seed = 1;
    h.world = 1;
    return h;
}

static const char *example_dir(void)
{
    const char *dir = getenv("MOE_TEST_EXAMPLE_DIR");
    if (!dir || !dir[0]) {
        print_error("MOE_TEST_EXAMPLE_DIR is not set: run tests/example_build.sh first (ctest does)\n");
        fail();
    }
    return dir;
}

static const moe_lr_scheduler_ops *load_example(moe_registry **r)
{
    *r = registry_at(example_dir());
    const moe_plugin_desc *d = NULL;
    moe_status st = moe_registry_load(*r, MOE_KIND_LR_SCHEDULER, "example_linear_decay", &d);
    if (st != MOE_OK)
        print_error("%s\n", moe_error_message());
    assert_int_equal(st, MOE_OK);
    return d->ops;
}

static void test_registry_loads_example_from_user_dir(void **state)
{
    (void)state;
    moe_registry *r;
    load_example(&r);
    char want[1024];
    fixture_path(want, sizeof want, example_dir(), "lr_scheduler", "example_linear_decay");
    assert_string_equal(moe_registry_path(r, MOE_KIND_LR_SCHEDULER, "example_linear_decay"), want);

    const moe_plugin_desc *d;
    assert_int_equal(moe_registry_load(r, MOE_KIND_LR_SCHEDULER, "example_linear_decay", &d), MOE_OK);
    assert_int_equal(d->n_options, 2);
    assert_string_equal(d->options[0].name, "warmup-updates");
    assert_string_equal(d->options[1].name, "example-end-lr");
    moe_registry_destroy(r);
}

static void test_registry_example_schedule(void **state)
{
    (void)state;
    moe_registry *r;
    const moe_lr_scheduler_ops *ops = load_example(&r);
    static const fake_opt opts[] = {
        {"lr", "0.001"}, {"max-update", "10"}, {"warmup-updates", "4"}, {"example-end-lr", "0.0001"}, {NULL, NULL}};
    moe_host h = fake_host(opts);
    void *s = NULL;
    assert_int_equal(ops->init(&h, &s), MOE_OK);
    /* warmup: the LR after n updates is lr * (n + 1) / W */
    assert_close(ops->lr_at(s, 0), 0.00025, 1e-15);
    assert_close(ops->lr_at(s, 2), 0.00075, 1e-15);
    /* peak at W, then linear to the end LR at --max-update */
    assert_close(ops->lr_at(s, 4), 0.001, 1e-15);
    assert_close(ops->lr_at(s, 7), 0.0001 + 0.0009 * 3.0 / 6.0, 1e-15);
    assert_close(ops->lr_at(s, 10), 0.0001, 1e-15);
    assert_close(ops->lr_at(s, 1000), 0.0001, 1e-15);
    ops->destroy(s);

    /* its errors go through the host */
    static const fake_opt bad[] = {{"lr", "0.001"}, {"max-update", "0"}, {"warmup-updates", "0"}, {NULL, NULL}};
    h = fake_host(bad);
    s = NULL;
    assert_int_equal(ops->init(&h, &s), MOE_ERR_INVALID_ARG);
    assert_null(s);
    assert_contains(fake_error, "expected --max-update > 0");
    moe_registry_destroy(r);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest registry_tests[] = {
        cmocka_unit_test_setup(test_registry_loads_good_fixture, setup),
        cmocka_unit_test_setup(test_registry_rejects_missing_symbol, setup),
        cmocka_unit_test_setup(test_registry_rejects_null_descriptor, setup),
        cmocka_unit_test_setup(test_registry_rejects_other_abi_major, setup),
        cmocka_unit_test_setup(test_registry_rejects_newer_abi_minor, setup),
        cmocka_unit_test_setup(test_registry_rejects_host_size, setup),
        cmocka_unit_test_setup(test_registry_rejects_wrong_kind, setup),
        cmocka_unit_test_setup(test_registry_rejects_wrong_name, setup),
        cmocka_unit_test_setup(test_registry_rejects_ops_size, setup),
        cmocka_unit_test_setup(test_registry_rejects_null_ops, setup),
        cmocka_unit_test_setup(test_registry_rejects_null_function, setup),
        cmocka_unit_test_setup(test_registry_rejects_not_elf, setup),
        cmocka_unit_test_setup(test_registry_rejects_undefined_symbol, setup),
        cmocka_unit_test_setup(test_registry_rejects_duplicate, setup),
        cmocka_unit_test_setup(test_registry_rejects_bad_names, setup),
        cmocka_unit_test_setup(test_registry_user_dir_must_be_a_directory, setup),
        cmocka_unit_test_setup(test_registry_unknown_name_lists_closest_first, setup),
        cmocka_unit_test_setup(test_registry_search_order_user_dir_then_path, setup),
        cmocka_unit_test_setup(test_registry_search_order_before_build_tree, setup),
        cmocka_unit_test_setup(test_registry_names_in_search_order, setup),
        cmocka_unit_test_setup(test_registry_print_lists_by_kind, setup),
        cmocka_unit_test_setup(test_registry_empty_user_dir_lists_nothing, setup),
        cmocka_unit_test_setup(test_registry_rejects_non_files, setup),
        cmocka_unit_test_setup(test_registry_hook_error_names_file_and_message, setup),
    };
    const struct CMUnitTest example_tests[] = {
        cmocka_unit_test_setup(test_registry_loads_example_from_user_dir, setup),
        cmocka_unit_test_setup(test_registry_example_schedule, setup),
    };
    if (argc == 2 && strcmp(argv[1], "--example") == 0)
        return cmocka_run_group_tests_name("registry_example", example_tests, NULL, NULL);
    if (argc > 1) {
        fprintf(stderr, "usage: %s [--example]\n", argv[0]);
        return 2;
    }
    return cmocka_run_group_tests_name("registry", registry_tests, NULL, NULL);
}

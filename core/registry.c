/* registry.c: finds plugin files, loads them with dlopen and checks them
 * against the ABI this core was built with; lists what is installed.
 *
 * A plugin of kind K named N is the file libmoe-<K>-<N>.so in the first
 * directory of the search path that has it: --user-dir, each entry of
 * MOE_PLUGIN_PATH (colon-separated, empty entries ignored), the install
 * directory, the build tree (MOE_PLUGIN_INSTALL_DIR and MOE_PLUGIN_BUILD_DIR,
 * compile definitions). MOE_PLUGIN_PATH is read when the registry is created.
 *
 * Checks, in order, each failing with one MOE_ERR_PLUGIN message that names
 * the file, what was expected and what was found: file found; dlopen(RTLD_NOW |
 * RTLD_LOCAL), so an unresolved symbol fails here and not mid-run; not the same
 * shared object as a plugin already loaded under another name (a symlink or
 * hard link); entry symbol present; descriptor non-NULL; ABI major equal and
 * minor not newer; descriptor, host and ops table sizes between the end of
 * the major's first minor (x.0) and this core's; kind and name equal to what
 * the file name says; option table consistent; ops non-NULL and the kind's
 * required functions set; a backend's moe_ops size in the same bounds. Kind
 * is checked before the ops table size because the expected size depends on
 * the kind, and a wrong kind is the clearer message.
 *
 * A plugin of an older minor has shorter tables (plugin.h, "ABI versions"):
 * the registry hands out its own copies of the descriptor, the kind's table
 * and a backend's moe_ops, each at this core's size and zero-filled past
 * what the plugin had, so absent members read as NULL/0 everywhere.
 *
 * What it deliberately is not: it calls neither a plugin's load() nor its
 * unload(). Both belong to whoever owns the host (the runtime), which calls
 * unload() only for plugins it called load() on, before the registry goes.
 * The registry never unloads a plugin while it lives; moe_registry_destroy
 * dlcloses them in reverse load order.
 */
#include "core/registry.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/internal.h"
#include "core/options.h"

#ifndef MOE_PLUGIN_INSTALL_DIR
#define MOE_PLUGIN_INSTALL_DIR ""
#endif
#ifndef MOE_PLUGIN_BUILD_DIR
#define MOE_PLUGIN_BUILD_DIR ""
#endif

#define FILE_PREFIX "libmoe-"
#define FILE_SUFFIX ".so"

/* ------------------------------------------------------------ kind tables */

/* Where a member ends: a table of an older minor ends at one of its members. */
#define END_OF(type, member) (offsetof(type, member) + sizeof(((type *)0)->member))

/* The end of each struct's ABI 1.0 members: the least a plugin may have. */
#define HOST_1_0_END END_OF(moe_host, gate_ops)
#define DESC_1_0_END END_OF(moe_plugin_desc, ops)
#define MOE_OPS_1_0_END END_OF(moe_ops, sgd_step)

/* A member of a kind's ops table that must not be NULL (all of them ABI 1.0
 * members: later ones are optional). */
typedef struct required_slot {
    size_t offset;
    const char *name;
    int is_data; /* a data pointer (backend->ops), not a function */
} required_slot;

#define FN(type, member) {offsetof(type, member), #member, 0}
#define DATA(type, member) {offsetof(type, member), #member, 1}

static const required_slot arch_required[] = {
    FN(moe_arch_ops, build), FN(moe_arch_ops, destroy),  FN(moe_arch_ops, info),
    FN(moe_arch_ops, setup), FN(moe_arch_ops, forward), FN(moe_arch_ops, backward),
};
static const required_slot task_required[] = {
    FN(moe_task_ops, init),         FN(moe_task_ops, destroy),   FN(moe_task_ops, vocab_size),
    FN(moe_task_ops, padding_idx),  FN(moe_task_ops, num_batches), FN(moe_task_ops, get_batch),
    FN(moe_task_ops, free_batch),
};
static const required_slot criterion_required[] = {
    FN(moe_criterion_ops, init), FN(moe_criterion_ops, destroy), FN(moe_criterion_ops, compute),
};
static const required_slot optimizer_required[] = {
    FN(moe_optimizer_ops, init), FN(moe_optimizer_ops, destroy), FN(moe_optimizer_ops, step),
    FN(moe_optimizer_ops, state_bytes_per_param),
};
static const required_slot lr_scheduler_required[] = {
    FN(moe_lr_scheduler_ops, init), FN(moe_lr_scheduler_ops, destroy), FN(moe_lr_scheduler_ops, lr_at),
};
static const required_slot gate_required[] = {
    FN(moe_gate_ops, init),    FN(moe_gate_ops, destroy),  FN(moe_gate_ops, configure),
    FN(moe_gate_ops, forward), FN(moe_gate_ops, backward),
};
static const required_slot normalizer_required[] = {
    FN(moe_normalizer_ops, divisor),
};
static const required_slot backend_required[] = {
    FN(moe_backend_ops, create),         FN(moe_backend_ops, destroy),      FN(moe_backend_ops, available),
    FN(moe_backend_ops, alloc),          FN(moe_backend_ops, free),         FN(moe_backend_ops, copy_to_host),
    FN(moe_backend_ops, copy_from_host), FN(moe_backend_ops, copy),         FN(moe_backend_ops, synchronize),
    FN(moe_backend_ops, memory_stats),   FN(moe_backend_ops, reset_peak),   DATA(moe_backend_ops, ops),
};
/* A communicator implements every blocking collective: expert parallelism
 * needs the all-to-alls and fully sharded training the reduce-scatter/all-
 * gather. The overlapping start ops (1.1) are optional; wait is checked
 * separately (needed when a start op is set). */
static const required_slot communicator_required[] = {
    FN(moe_comm_ops, init),         FN(moe_comm_ops, destroy),        FN(moe_comm_ops, rank),
    FN(moe_comm_ops, world),        FN(moe_comm_ops, group_create),   FN(moe_comm_ops, all_reduce),
    FN(moe_comm_ops, reduce_scatter), FN(moe_comm_ops, all_gather),   FN(moe_comm_ops, all_to_all),
    FN(moe_comm_ops, all_to_allv),  FN(moe_comm_ops, broadcast),      FN(moe_comm_ops, barrier),
};

#undef FN
#undef DATA

typedef struct kind_info {
    const char *name;     /* file-name and CLI spelling */
    const char *ops_type; /* for messages */
    size_t ops_size;
    size_t ops_1_0_end; /* the least ops_size a plugin may have */
    const required_slot *required;
    int n_required;
} kind_info;

/* last_: the table's last ABI 1.0 member */
#define KIND(name_, type_, last_, req_) \
    {name_, #type_, sizeof(type_), END_OF(type_, last_), req_, (int)(sizeof(req_) / sizeof(req_[0]))}

static const kind_info kinds[MOE_KIND_COUNT] = {
    [MOE_KIND_ARCH] = KIND("arch", moe_arch_ops, backward, arch_required),
    [MOE_KIND_TASK] = KIND("task", moe_task_ops, free_batch, task_required),
    [MOE_KIND_CRITERION] = KIND("criterion", moe_criterion_ops, compute, criterion_required),
    [MOE_KIND_OPTIMIZER] = KIND("optimizer", moe_optimizer_ops, state_bytes_per_param, optimizer_required),
    [MOE_KIND_LR_SCHEDULER] = KIND("lr_scheduler", moe_lr_scheduler_ops, lr_at, lr_scheduler_required),
    [MOE_KIND_GATE] = KIND("gate", moe_gate_ops, backward, gate_required),
    [MOE_KIND_NORMALIZER] = KIND("normalizer", moe_normalizer_ops, divisor, normalizer_required),
    [MOE_KIND_BACKEND] = KIND("backend", moe_backend_ops, native_stream, backend_required),
    [MOE_KIND_COMMUNICATOR] = KIND("communicator", moe_comm_ops, barrier, communicator_required),
};

#undef KIND

static int kind_valid(moe_plugin_kind kind) { return (int)kind >= 0 && (int)kind < MOE_KIND_COUNT; }

const char *moe_kind_name(moe_plugin_kind kind) { return kind_valid(kind) ? kinds[kind].name : "unknown"; }

/* ------------------------------------------------------------ the copies */

/* The size of a backend's moe_ops: what moe_backend_ops.ops_size (ABI 1.3)
 * says, *said = 1 (0 if the backend left it unset, which the check
 * refuses); or, when its table is too short to hold the member (an older
 * minor), the 1.0 ops through sgd_step, *said = 0. */
static size_t backend_ops_table_size(const moe_plugin_desc *d, int *said)
{
    const size_t at = offsetof(moe_backend_ops, ops_size);
    *said = d->ops_size >= at + sizeof(uint32_t);
    if (!*said)
        return MOE_OPS_1_0_END;
    uint32_t n;
    memcpy(&n, (const char *)d->ops + at, sizeof n);
    return n;
}

static void free_copy(moe_plugin_kind kind, moe_plugin_desc *c)
{
    if (!c)
        return;
    if (kind == MOE_KIND_BACKEND && c->ops)
        free((void *)((const moe_backend_ops *)c->ops)->ops);
    free((void *)c->ops);
    free(c);
}

/* A checked descriptor copied at this core's sizes: each table zero-filled
 * past the plugin's size, so members its headers lacked are NULL/0. */
static moe_status copy_plugin(moe_plugin_kind kind, const moe_plugin_desc *d, moe_plugin_desc **out)
{
    const kind_info *k = &kinds[kind];
    moe_plugin_desc *c = calloc(1, sizeof *c);
    void *ops = calloc(1, k->ops_size);
    moe_ops *be_ops = kind == MOE_KIND_BACKEND ? calloc(1, sizeof *be_ops) : NULL;
    if (!c || !ops || (kind == MOE_KIND_BACKEND && !be_ops)) {
        free(c);
        free(ops);
        free(be_ops);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory copying a plugin's descriptor");
    }
    memcpy(c, d, d->desc_size);
    memcpy(ops, d->ops, d->ops_size);
    if (be_ops) {
        moe_backend_ops *be = ops;
        int said;
        memcpy(be_ops, be->ops, backend_ops_table_size(d, &said));
        be->ops = be_ops;
        be->ops_size = (uint32_t)sizeof *be_ops;
    }
    c->desc_size = (uint32_t)sizeof *c;
    c->ops_size = (uint32_t)k->ops_size;
    c->ops = ops;
    *out = c;
    return MOE_OK;
}

/* --------------------------------------------------------------- registry */

/* desc is the registry's copy, at this core's sizes, and so are desc->ops
 * and (a backend) its moe_ops: all three freed with the registry. */
typedef struct loaded_plugin {
    moe_plugin_kind kind;
    char *name;
    char *path;
    void *handle;
    moe_plugin_desc *desc;
} loaded_plugin;

struct moe_registry {
    char **dirs; /* search path, in order */
    int n_dirs;
    loaded_plugin *plugins;
    int n_plugins, cap_plugins;
};

static char *dup_string(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static char *dup_range(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

static moe_status add_dir(moe_registry *r, const char *dir, size_t len)
{
    if (len == 0)
        return MOE_OK;
    char **dirs = realloc(r->dirs, (size_t)(r->n_dirs + 1) * sizeof *dirs);
    if (!dirs)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory building the plugin search path");
    r->dirs = dirs;
    r->dirs[r->n_dirs] = dup_range(dir, len);
    if (!r->dirs[r->n_dirs])
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory building the plugin search path");
    r->n_dirs++;
    return MOE_OK;
}

moe_status moe_registry_create(const char *user_dir, moe_registry **out)
{
    *out = NULL;
    moe_status st;
    moe_registry *r = calloc(1, sizeof *r);
    if (!r)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory creating the plugin registry");

    if (user_dir && user_dir[0]) {
        struct stat sb;
        int found = stat(user_dir, &sb) == 0;
        if (!found || !S_ISDIR(sb.st_mode)) {
            st = moe_error_set(MOE_ERR_INVALID_ARG,
                               "--user-dir '%s': expected a directory of plugins (" FILE_PREFIX
                               "<kind>-<name>" FILE_SUFFIX "), found %s%s%s; pass an existing directory",
                               user_dir, found ? "a file that is not a directory" : "nothing (",
                               found ? "" : strerror(errno), found ? "" : ")");
            goto fail;
        }
        MOE_TRY_GOTO(st, add_dir(r, user_dir, strlen(user_dir)), fail);
    }
    const char *path = getenv("MOE_PLUGIN_PATH");
    while (path && *path) {
        const char *colon = strchr(path, ':');
        size_t len = colon ? (size_t)(colon - path) : strlen(path);
        MOE_TRY_GOTO(st, add_dir(r, path, len), fail);
        path = colon ? colon + 1 : NULL;
    }
    MOE_TRY_GOTO(st, add_dir(r, MOE_PLUGIN_INSTALL_DIR, strlen(MOE_PLUGIN_INSTALL_DIR)), fail);
    MOE_TRY_GOTO(st, add_dir(r, MOE_PLUGIN_BUILD_DIR, strlen(MOE_PLUGIN_BUILD_DIR)), fail);
    *out = r;
    return MOE_OK;
fail:
    moe_registry_destroy(r);
    return st;
}

/* Under AddressSanitizer plugins stay mapped: a leak in one (or in a
 * library it brought in, such as MPI) is then reported with its file and
 * function, which the leak checker at exit cannot do for unloaded code. */
#if defined(__SANITIZE_ADDRESS__)
#define MOE_KEEP_PLUGINS_MAPPED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOE_KEEP_PLUGINS_MAPPED 1
#endif
#endif

void moe_registry_destroy(moe_registry *r)
{
    if (!r)
        return;
    for (int i = r->n_plugins - 1; i >= 0; i--) {
        loaded_plugin *p = &r->plugins[i];
#ifndef MOE_KEEP_PLUGINS_MAPPED
        dlclose(p->handle);
#endif
        free_copy(p->kind, p->desc);
        free(p->name);
        free(p->path);
    }
    free(r->plugins);
    for (int i = 0; i < r->n_dirs; i++)
        free(r->dirs[i]);
    free(r->dirs);
    free(r);
}

static loaded_plugin *find_loaded(const moe_registry *r, moe_plugin_kind kind, const char *name)
{
    for (int i = 0; i < r->n_plugins; i++)
        if (r->plugins[i].kind == kind && strcmp(r->plugins[i].name, name) == 0)
            return &r->plugins[i];
    return NULL;
}

const char *moe_registry_path(const moe_registry *r, moe_plugin_kind kind, const char *name)
{
    if (!r || !name)
        return NULL;
    const loaded_plugin *p = find_loaded(r, kind, name);
    return p ? p->path : NULL;
}

/* ---------------------------------------------------------- file search */

static char *plugin_path(const char *dir, moe_plugin_kind kind, const char *name)
{
    size_t n = strlen(dir) + 1 + strlen(FILE_PREFIX) + strlen(kinds[kind].name) + 1 + strlen(name) +
               strlen(FILE_SUFFIX) + 1;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/" FILE_PREFIX "%s-%s" FILE_SUFFIX, dir, kinds[kind].name, name);
    return p;
}

/* The first file for kind/name on the search path: MOE_OK with *path set,
 * MOE_OK with *path NULL when there is none, MOE_ERR_PLUGIN when the first
 * entry of that name is not a regular file, or MOE_ERR_NOMEM. */
static moe_status find_file(const moe_registry *r, moe_plugin_kind kind, const char *name, char **path)
{
    *path = NULL;
    for (int i = 0; i < r->n_dirs; i++) {
        char *p = plugin_path(r->dirs[i], kind, name);
        if (!p)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory searching for a plugin");
        struct stat sb;
        if (stat(p, &sb) == 0 && S_ISREG(sb.st_mode)) {
            *path = p;
            return MOE_OK;
        }
        /* something else under the plugin's name (a directory, a symlink
         * loop or to nowhere, a fifo) shadows the rest of the path: say what
         * it is rather than call the name unknown */
        int err = errno;
        if (lstat(p, &sb) == 0) {
            moe_status st;
            if (S_ISDIR(sb.st_mode))
                st = moe_error_set(MOE_ERR_PLUGIN,
                                   "plugin %s: expected a shared object file, found a directory; remove or rename it "
                                   "(it hides the %s '%s' of the later search directories)",
                                   p, kinds[kind].name, name);
            else if (S_ISLNK(sb.st_mode))
                st = moe_error_set(MOE_ERR_PLUGIN,
                                   "plugin %s: expected a shared object file, found a symbolic link that cannot be "
                                   "followed (%s); fix or remove the link",
                                   p, strerror(err));
            else
                st = moe_error_set(MOE_ERR_PLUGIN,
                                   "plugin %s: expected a shared object file, found a special file (not a regular "
                                   "file); remove or rename it",
                                   p);
            free(p);
            return st;
        }
        free(p);
    }
    return MOE_OK;
}

/* The plugin name in a file name "libmoe-<kind>-<name>.so", or NULL. */
static char *name_from_file(const char *file, moe_plugin_kind kind)
{
    size_t lp = strlen(FILE_PREFIX), lk = strlen(kinds[kind].name), ls = strlen(FILE_SUFFIX);
    size_t n = strlen(file);
    if (n <= lp + lk + 1 + ls || strncmp(file, FILE_PREFIX, lp) != 0 || strncmp(file + lp, kinds[kind].name, lk) != 0 ||
        file[lp + lk] != '-' || strcmp(file + n - ls, FILE_SUFFIX) != 0)
        return NULL;
    return dup_range(file + lp + lk + 1, n - lp - lk - 1 - ls);
}

static int cmp_strings(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void moe_registry_free_names(char **names, int n)
{
    if (!names)
        return;
    for (int i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

int moe_registry_names(moe_registry *r, moe_plugin_kind kind, char ***names)
{
    *names = NULL;
    if (!r || !kind_valid(kind))
        return 0;
    char **out = NULL;
    int n = 0, cap = 0;
    for (int d = 0; d < r->n_dirs; d++) {
        DIR *dir = opendir(r->dirs[d]);
        if (!dir)
            continue; /* a missing directory on the path is not an error */
        int first = n;
        struct dirent *e;
        while ((e = readdir(dir)) != NULL) {
            char *name = name_from_file(e->d_name, kind);
            if (!name)
                continue;
            int seen = 0;
            for (int i = 0; i < n && !seen; i++)
                seen = strcmp(out[i], name) == 0;
            if (seen) {
                free(name);
                continue;
            }
            if (n == cap) {
                int ncap = cap ? 2 * cap : 16;
                char **grown = realloc(out, (size_t)ncap * sizeof *grown);
                if (!grown) {
                    free(name);
                    closedir(dir);
                    moe_registry_free_names(out, n);
                    return 0;
                }
                out = grown;
                cap = ncap;
            }
            out[n++] = name;
        }
        closedir(dir);
        /* readdir order is arbitrary: sort within one directory (qsort
         * wants a valid pointer even for no elements; out is NULL until the
         * first name) */
        if (n - first > 1)
            qsort(out + first, (size_t)(n - first), sizeof *out, cmp_strings);
    }
    *names = out;
    return n;
}

/* "unknown criterion 'x'; installed: a, b (searched: d1:d2)", closest first. */
static moe_status unknown_name_error(moe_registry *r, moe_plugin_kind kind, const char *name)
{
    char **names;
    int n = moe_registry_names(r, kind, &names);
    int *dist = n > 0 ? malloc((size_t)n * sizeof *dist) : NULL;
    if (n > 0 && !dist) {
        moe_registry_free_names(names, n);
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory listing installed plugins");
    }
    for (int i = 0; i < n; i++)
        dist[i] = moe_edit_distance(name, names[i]);
    /* insertion sort: stable, so equal distances keep search-path order */
    for (int i = 1; i < n; i++) {
        char *s = names[i];
        int dd = dist[i], j = i - 1;
        for (; j >= 0 && dist[j] > dd; j--) {
            names[j + 1] = names[j];
            dist[j + 1] = dist[j];
        }
        names[j + 1] = s;
        dist[j + 1] = dd;
    }
    size_t cap = 64;
    for (int i = 0; i < n; i++)
        cap += strlen(names[i]) + 2;
    for (int i = 0; i < r->n_dirs; i++)
        cap += strlen(r->dirs[i]) + 1;
    char *installed = malloc(cap), *searched = malloc(cap);
    moe_status st;
    if (!installed || !searched) {
        st = moe_error_set(MOE_ERR_NOMEM, "out of host memory listing installed plugins");
        goto done;
    }
    installed[0] = searched[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (i)
            strcat(installed, ", ");
        strcat(installed, names[i]);
    }
    for (int i = 0; i < r->n_dirs; i++) {
        if (i)
            strcat(searched, ":");
        strcat(searched, r->dirs[i]);
    }
    if (n > 0)
        st = moe_error_set(MOE_ERR_PLUGIN, "unknown %s '%s'; installed: %s (searched: %s)", kinds[kind].name, name,
                           installed, searched);
    else
        st = moe_error_set(MOE_ERR_PLUGIN,
                           "unknown %s '%s'; no %s is installed (searched " FILE_PREFIX "%s-*" FILE_SUFFIX
                           " in: %s); pass --user-dir DIR or set MOE_PLUGIN_PATH",
                           kinds[kind].name, name, kinds[kind].name, kinds[kind].name, searched);
done:
    free(installed);
    free(searched);
    free(dist);
    moe_registry_free_names(names, n);
    return st;
}

/* ------------------------------------------------------------------ checks */

/* A size the plugin recorded (`what`, of type `type`) between the end of the
 * major's first minor and this core's size. */
static moe_status check_size(const char *path, const moe_plugin_desc *d, const char *what, const char *type,
                             size_t found, size_t min, size_t max)
{
    if (found > max)
        return moe_error_set(MOE_ERR_PLUGIN,
                             "plugin %s: expected %s of at most %zu bytes (%s of moelm ABI %d.%d), found %zu: the "
                             "plugin (ABI %u.%u) was built against newer headers than this moelm's; rebuild it "
                             "against this moelm's headers or update moelm",
                             path, what, max, type, MOE_ABI_MAJOR, MOE_ABI_MINOR, found, (unsigned)d->abi_major,
                             (unsigned)d->abi_minor);
    if (found < min)
        return moe_error_set(MOE_ERR_PLUGIN,
                             "plugin %s: expected %s of at least %zu bytes (the members of %s in ABI %d.0), found "
                             "%zu: rebuild the plugin against this moelm's headers",
                             path, what, min, type, MOE_ABI_MAJOR, found);
    return MOE_OK;
}

/* Everything after dlsym: the descriptor against this core's ABI and the
 * file's kind and name. */
moe_status moe_registry_check_descriptor(const char *path, moe_plugin_kind kind, const char *name,
                                         const moe_plugin_desc *d)
{
    if (!d)
        return moe_error_set(MOE_ERR_PLUGIN,
                             "plugin %s: expected " MOE_PLUGIN_SYMBOL "() to return a descriptor, found NULL; "
                             "return the plugin's static descriptor (MOE_PLUGIN_DEFINE)",
                             path);
    if (d->abi_major != MOE_ABI_MAJOR || d->abi_minor > MOE_ABI_MINOR)
        return moe_error_set(MOE_ERR_PLUGIN,
                             "plugin %s: built against moelm ABI %u.%u, this moelm is %d.%d: rebuild the plugin "
                             "against this moelm's headers",
                             path, (unsigned)d->abi_major, (unsigned)d->abi_minor, MOE_ABI_MAJOR, MOE_ABI_MINOR);
    MOE_TRY(check_size(path, d, "a descriptor", "moe_plugin_desc", d->desc_size, DESC_1_0_END,
                       sizeof(moe_plugin_desc)));
    MOE_TRY(check_size(path, d, "host services", "moe_host", d->host_size, HOST_1_0_END, sizeof(moe_host)));
    if (d->kind != kind) {
        if (kind_valid(d->kind))
            return moe_error_set(MOE_ERR_PLUGIN,
                                 "plugin %s: expected kind %s (from the file name), found %s in its descriptor; "
                                 "rename the file to " FILE_PREFIX "%s-%s" FILE_SUFFIX " or fix the descriptor",
                                 path, kinds[kind].name, kinds[d->kind].name, kinds[d->kind].name,
                                 d->name ? d->name : name);
        return moe_error_set(MOE_ERR_PLUGIN,
                             "plugin %s: expected kind %s (from the file name), found unknown kind %d in its "
                             "descriptor; fix the descriptor",
                             path, kinds[kind].name, (int)d->kind);
    }
    if (!d->name || strcmp(d->name, name) != 0)
        return moe_error_set(MOE_ERR_PLUGIN,
                             "plugin %s: expected name '%s' (from the file name), found %s%s%s in its "
                             "descriptor; rename the file or fix the descriptor",
                             path, name, d->name ? "'" : "", d->name ? d->name : "NULL", d->name ? "'" : "");
    MOE_TRY(check_size(path, d, "an ops table", kinds[kind].ops_type, d->ops_size, kinds[kind].ops_1_0_end,
                       kinds[kind].ops_size));
    if (d->n_options < 0 || (d->n_options > 0 && !d->options))
        return moe_error_set(MOE_ERR_PLUGIN,
                             "plugin %s: expected an option table of n_options = %d entries, found %s; fix the "
                             "descriptor",
                             path, d->n_options, d->n_options < 0 ? "a negative count" : "options = NULL");
    for (int i = 0; i < d->n_options; i++)
        if (!d->options[i].name || !d->options[i].name[0])
            return moe_error_set(MOE_ERR_PLUGIN,
                                 "plugin %s: expected option %d of %d to have a name, found none; fix the "
                                 "option table",
                                 path, i + 1, d->n_options);
    if (!d->ops)
        return moe_error_set(MOE_ERR_PLUGIN,
                             "plugin %s: expected a %s table, found ops = NULL in its descriptor; point the "
                             "descriptor at the plugin's table",
                             path, kinds[kind].ops_type);
    const kind_info *k = &kinds[kind];
    for (int i = 0; i < k->n_required; i++) {
        const char *slot = (const char *)d->ops + k->required[i].offset;
        int missing;
        if (k->required[i].is_data) {
            const void *p;
            memcpy(&p, slot, sizeof p);
            missing = p == NULL;
        } else {
            void (*fn)(void);
            memcpy(&fn, slot, sizeof fn);
            missing = fn == NULL;
        }
        if (missing)
            return moe_error_set(MOE_ERR_PLUGIN,
                                 "plugin %s: expected %s.%s to be set (every %s needs it), found NULL; implement "
                                 "it in the plugin",
                                 path, k->ops_type, k->required[i].name, k->name);
    }
    if (kind == MOE_KIND_COMMUNICATOR) {
        moe_comm_ops c;
        memset(&c, 0, sizeof c);
        memcpy(&c, d->ops, d->ops_size);
        if ((c.all_gather_start || c.reduce_scatter_start) && !c.wait)
            return moe_error_set(MOE_ERR_PLUGIN,
                                 "plugin %s: expected moe_comm_ops.wait to be set (its %s needs it), found NULL; "
                                 "implement wait or leave both start ops NULL",
                                 path, c.all_gather_start ? "all_gather_start" : "reduce_scatter_start");
    }
    if (kind == MOE_KIND_BACKEND) {
        int said;
        size_t n = backend_ops_table_size(d, &said);
        if (said && n == 0)
            return moe_error_set(MOE_ERR_PLUGIN,
                                 "plugin %s: expected moe_backend_ops.ops_size to be sizeof(moe_ops), found 0; set "
                                 "it in the backend's table",
                                 path);
        MOE_TRY(check_size(path, d, "a compute ops table", "moe_ops", n, MOE_OPS_1_0_END, sizeof(moe_ops)));
    }
    return MOE_OK;
}

static moe_status remember(moe_registry *r, moe_plugin_kind kind, const char *name, char *path, void *handle,
                           moe_plugin_desc *d)
{
    if (r->n_plugins == r->cap_plugins) {
        int ncap = r->cap_plugins ? 2 * r->cap_plugins : 8;
        loaded_plugin *grown = realloc(r->plugins, (size_t)ncap * sizeof *grown);
        if (!grown)
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory recording a loaded plugin");
        r->plugins = grown;
        r->cap_plugins = ncap;
    }
    char *n = dup_string(name);
    if (!n)
        return moe_error_set(MOE_ERR_NOMEM, "out of host memory recording a loaded plugin");
    r->plugins[r->n_plugins++] = (loaded_plugin){kind, n, path, handle, d};
    return MOE_OK;
}

/* A valid plugin name is one file-name component. */
static int name_valid(const char *name)
{
    if (!name || !name[0])
        return 0;
    for (const char *c = name; *c; c++)
        if (*c == '/' || *c == ':')
            return 0;
    return strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

moe_status moe_registry_load(moe_registry *r, moe_plugin_kind kind, const char *name, const moe_plugin_desc **out)
{
    *out = NULL;
    if (!kind_valid(kind))
        return moe_error_set(MOE_ERR_INTERNAL, "registry: expected a plugin kind in 0..%d, found %d",
                             MOE_KIND_COUNT - 1, (int)kind);
    if (!name_valid(name))
        return moe_error_set(MOE_ERR_INVALID_ARG,
                             "expected a %s name (a plain word such as the CLI value), found '%s'; pick one from "
                             "--list-plugins",
                             kinds[kind].name, name ? name : "(null)");
    const loaded_plugin *have = find_loaded(r, kind, name);
    if (have) {
        *out = have->desc;
        return MOE_OK;
    }

    char *path;
    MOE_TRY(find_file(r, kind, name, &path));
    if (!path)
        return unknown_name_error(r, kind, name);

    moe_status st;
    moe_plugin_desc *copy = NULL;
    dlerror();
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        const char *why = dlerror();
        st = moe_error_set(MOE_ERR_PLUGIN,
                           "plugin %s: expected a shared object whose symbols all resolve, dlopen failed: %s; "
                           "rebuild it against this moelm or remove the file",
                           path, why ? why : "unknown reason");
        free(path);
        return st;
    }
    for (int i = 0; i < r->n_plugins; i++) {
        if (r->plugins[i].handle == handle) {
            st = moe_error_set(MOE_ERR_PLUGIN,
                               "plugin %s: expected a plugin of its own, found the same shared object as %s '%s' "
                               "(%s), already loaded; remove the duplicate file or link",
                               path, kinds[r->plugins[i].kind].name, r->plugins[i].name, r->plugins[i].path);
            goto fail;
        }
    }

    dlerror();
    void *sym = dlsym(handle, MOE_PLUGIN_SYMBOL);
    if (!sym) {
        st = moe_error_set(MOE_ERR_PLUGIN,
                           "plugin %s: expected the exported entry point " MOE_PLUGIN_SYMBOL "(), found no such "
                           "symbol; define it with MOE_PLUGIN_DEFINE (it is the only symbol a plugin exports)",
                           path);
        goto fail;
    }
    moe_plugin_entry_fn entry;
    memcpy(&entry, &sym, sizeof entry); /* POSIX: data and function pointers interconvert */
    const moe_plugin_desc *d = entry();
    MOE_TRY_GOTO(st, moe_registry_check_descriptor(path, kind, name, d), fail);
    MOE_TRY_GOTO(st, copy_plugin(kind, d, &copy), fail);
    MOE_TRY_GOTO(st, remember(r, kind, name, path, handle, copy), fail);
    *out = copy;
    return MOE_OK;
fail:
    free_copy(kind, copy);
    dlclose(handle);
    free(path);
    return st;
}

moe_status moe_registry_hook_error(const moe_registry *r, const moe_plugin_desc *d, const char *hook, moe_status st)
{
    const char *path = NULL;
    for (int i = 0; r && i < r->n_plugins && !path; i++)
        if (r->plugins[i].desc == d)
            path = r->plugins[i].path;
    char own[900];
    snprintf(own, sizeof own, "%s", moe_error_message());
    moe_error_clear();
    if (st == MOE_OK)
        st = MOE_ERR_PLUGIN;
    return moe_error_set(st, "plugin %s (%s '%s'): its %s hook failed with %s: %s", path ? path : "(not loaded here)",
                         d && kind_valid(d->kind) ? kinds[d->kind].name : "plugin", d && d->name ? d->name : "?",
                         hook ? hook : "load", moe_status_name(st),
                         own[0] ? own : "the plugin gave no message (it returned the status without calling "
                                        "host->error); see its documentation");
}

/* ------------------------------------------------------------------ listing */

moe_status moe_registry_print(moe_registry *r, FILE *out)
{
    fprintf(out, "plugin search path (first match wins):\n");
    for (int i = 0; i < r->n_dirs; i++)
        fprintf(out, "  %s\n", r->dirs[i]);
    for (int k = 0; k < MOE_KIND_COUNT; k++) {
        char **names;
        int n = moe_registry_names(r, (moe_plugin_kind)k, &names);
        fprintf(out, "%s:\n", kinds[k].name);
        if (n == 0)
            fprintf(out, "  (none installed)\n");
        int wname = 0, wversion = 0;
        for (int i = 0; i < n; i++) {
            int l = (int)strlen(names[i]);
            wname = l > wname ? l : wname;
        }
        /* load everything first so the version column can be aligned */
        const moe_plugin_desc **descs = n > 0 ? calloc((size_t)n, sizeof *descs) : NULL;
        char **errors = n > 0 ? calloc((size_t)n, sizeof *errors) : NULL;
        if (n > 0 && (!descs || !errors)) {
            free(descs);
            free(errors);
            moe_registry_free_names(names, n);
            return moe_error_set(MOE_ERR_NOMEM, "out of host memory listing plugins");
        }
        for (int i = 0; i < n; i++) {
            if (moe_registry_load(r, (moe_plugin_kind)k, names[i], &descs[i]) != MOE_OK) {
                errors[i] = dup_string(moe_error_message());
                moe_error_clear();
                continue;
            }
            int l = descs[i]->version ? (int)strlen(descs[i]->version) : 1;
            wversion = l > wversion ? l : wversion;
        }
        for (int i = 0; i < n; i++) {
            if (descs[i])
                fprintf(out, "  %-*s  %-*s  %s  %s\n", wname, names[i], wversion,
                        descs[i]->version ? descs[i]->version : "-",
                        moe_registry_path(r, (moe_plugin_kind)k, names[i]),
                        descs[i]->description ? descs[i]->description : "");
            else
                fprintf(out, "  %-*s  (not loadable: %s)\n", wname, names[i],
                        errors[i] ? errors[i] : "out of host memory");
            free(errors[i]);
        }
        free(descs);
        free(errors);
        moe_registry_free_names(names, n);
    }
    return MOE_OK;
}

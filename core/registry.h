/* registry.h: finds, loads and checks plugins; lists what is installed.
 *
 * A component of kind K named N lives in libmoe-<K>-<N>.so, where <K> is
 * moe_kind_name(K) ("arch", "task", "criterion", "optimizer", "lr_scheduler",
 * "gate", "normalizer", "backend", "communicator"). Search order: --user-dir,
 * each directory of MOE_PLUGIN_PATH (colon-separated), the install directory,
 * the build tree. The first file found wins. Plugins are never unloaded while
 * the registry lives.
 */
#ifndef MOE_CORE_REGISTRY_H
#define MOE_CORE_REGISTRY_H

#include <stdio.h>

#include "moe/plugin.h"

typedef struct moe_registry moe_registry;

/* user_dir may be NULL. */
moe_status moe_registry_create(const char *user_dir, moe_registry **r);
void moe_registry_destroy(moe_registry *r);

/* Load (or return the already loaded) plugin kind/name and check it: file
 * found, dlopen(RTLD_NOW|RTLD_LOCAL), symbol present, ABI major equal and
 * minor not newer, struct sizes within the major's, kind and name match, required functions
 * non-NULL. Each failure sets one clear error (file, expected, found); an
 * unknown name lists the installed names of that kind, closest first.
 * *out is the registry's copy of the descriptor at this core's struct sizes
 * (its ops, and a backend's moe_ops, too): members a plugin of an older
 * minor lacks are NULL/0. It lives as long as the registry. */
moe_status moe_registry_load(moe_registry *r, moe_plugin_kind kind, const char *name,
                             const moe_plugin_desc **out);

/* A plugin's lifecycle hook (`hook`: "load") returned `st`: replaces the
 * pending error with one naming the file, the hook and the plugin's own
 * message, and returns `st` (MOE_ERR_PLUGIN for MOE_OK). The registry calls
 * no hook itself; their callers report through this. */
moe_status moe_registry_hook_error(const moe_registry *r, const moe_plugin_desc *d, const char *hook,
                                   moe_status st);

/* The checks moe_registry_load makes of a descriptor once its entry point
 * returned it (ABI, sizes, kind and name against the file's, options, ops
 * and the kind's required functions); `path` only names the file in the
 * message. Exposed for the fuzz harness (fuzz/descriptor.c). */
moe_status moe_registry_check_descriptor(const char *path, moe_plugin_kind kind, const char *name,
                                         const moe_plugin_desc *d);

/* Path of the file a loaded plugin came from, or NULL. */
const char *moe_registry_path(const moe_registry *r, moe_plugin_kind kind, const char *name);

/* Names installed for a kind, in search-path order, duplicates removed.
 * Returns a count; *names is a malloc'd array of malloc'd strings (free with
 * moe_registry_free_names). */
int moe_registry_names(moe_registry *r, moe_plugin_kind kind, char ***names);
void moe_registry_free_names(char **names, int n);

/* --list-plugins: every installed plugin by kind with version and file. */
moe_status moe_registry_print(moe_registry *r, FILE *out);

const char *moe_kind_name(moe_plugin_kind kind);

#endif

/* keep_modules.c: linked into moelm-train only by scripts/test.sh --sanitize
 * (MOE_SANITIZE): a dlclose that keeps every shared object mapped. Open MPI
 * unloads its components (and the libraries they brought in) at
 * MPI_Finalize; the leak checker, which runs later at exit, can then neither
 * name them nor match them against tests/sanitizers/lsan.supp. Exported from
 * the executable, it takes the place of libc's for every library.
 */
#include <dlfcn.h>

__attribute__((visibility("default"))) int dlclose(void *handle);

int dlclose(void *handle)
{
    (void)handle;
    return 0;
}

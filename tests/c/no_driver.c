/* With the default configuration (backend:cuda) on a machine without the
 * NVIDIA driver, allocation fails with a clear message, not a crash; the
 * process goes on. Where libcuda is present, the allocation must work. */
#include "tessera.h"
#include <stdio.h>
#include <string.h>
#include <dlfcn.h>

int main(void) {
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    /* The check says whether the backend can start, before any allocation. */
    int checked = tessera_check_config();
    if (cuda == NULL && (checked != -1 || strstr(tessera_last_error(), "libcuda.so was not found") == NULL)) {
        printf("FAIL: check_config said %d (%s) with no driver\n", checked, tessera_last_error());
        return 5;
    }
    void *p = tessera_try_malloc(1 << 20, 0, NULL);
    if (cuda == NULL) {
        if (p != NULL) { puts("FAIL: allocated with no driver"); return 1; }
        if (strstr(tessera_last_error(), "libcuda.so was not found") == NULL) {
            printf("FAIL: unclear message: %s\n", tessera_last_error());
            return 2;
        }
        /* Every later call says the same, calmly. */
        TesseraStats s;
        if (tessera_get_stats(0, &s) != -1 || strstr(tessera_last_error(), "libcuda") == NULL) return 3;
        tessera_free(NULL, 0, 0, NULL);
        tessera_empty_cache();
        printf("NO DRIVER OK: %s\n", tessera_last_error());
    } else {
        if (p == NULL) { printf("FAIL: driver present but: %s\n", tessera_last_error()); return 4; }
        tessera_free(p, 1 << 20, 0, NULL);
        puts("NO DRIVER OK: driver present, allocation worked");
    }
    return 0;
}

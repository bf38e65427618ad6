/* A child forked after tessera started gets a clear error (as PyTorch's
 * "Cannot re-initialize CUDA in forked subprocess"), not a crash; frees of
 * inherited pointers are calm; the parent goes on. */
#include "tessera.h"
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    if (tessera_configure("backend:host,page_size:64K,device_capacity:16M,va_size:1G") != 0) return 1;
    void *p = tessera_try_malloc(4096, 0, NULL);
    if (!p) return 2;
    pid_t pid = fork();
    if (pid == 0) {
        void *q = tessera_try_malloc(4096, 0, NULL);
        if (q != NULL) _exit(10);
        if (strstr(tessera_last_error(), "forked") == NULL) _exit(11);
        tessera_free(p, 4096, 0, NULL); /* an inherited pointer */
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) { printf("child failed: %d\n", status); return 3; }
    tessera_free(p, 4096, 0, NULL);
    TesseraStats s;
    if (tessera_get_stats(0, &s) != 0 || s.gauges[TESSERA_GAUGE_ALLOCATED_BYTES].current != 0) return 4;
    puts("FORK OK");
    return 0;
}

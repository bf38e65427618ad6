/* Loads and unloads the library (argv[1]) argv[2] times, with allocations
 * in between (some freed into the caches, all freed by the end), and checks
 * that address space, resident memory and file descriptors stay flat: on
 * dlclose tessera gives back what it holds. Then one cycle that leaves a
 * block live: tessera says so at unload and keeps only that; cycles with
 * the status thread running (it must be gone before the code is); and last
 * a copy left loaded with a live block at exit, where tessera does nothing
 * (and says nothing). Prints "UNLOAD OK" and the numbers on success. */
#include <dirent.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

typedef int32_t (*configure_fn)(const char *);
typedef void *(*malloc_fn)(ssize_t, int, void *);
typedef void (*free_fn)(void *, ssize_t, int, void *);
typedef const char *(*error_fn)(void);

static long status_kib(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, strlen(key)) == 0) v = strtol(line + strlen(key), NULL, 10);
    if (f) fclose(f);
    return v;
}

static int open_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    while (d && readdir(d)) n++;
    if (d) closedir(d);
    return n;
}

/* The configuration of every cycle: the host backend, or argv[3] (say
   "backend:cuda" on a GPU machine). */
static const char *CONF = "backend:host,page_size:64K,device_capacity:256M,va_size:64G";

/* One cycle under `conf`; `keep_one` leaves a block live at dlclose, and
   `close` 0 leaves the library loaded. 0 on success. */
static int cycle_with(const char *path, const char *conf, int keep_one, int close) {
    if (getenv("UNLOAD_TRACE")) fprintf(stderr, "cycle: open (%s)\n", conf);
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 1; }
    configure_fn configure = (configure_fn)dlsym(lib, "tessera_configure");
    malloc_fn try_malloc = (malloc_fn)dlsym(lib, "tessera_try_malloc");
    free_fn tfree = (free_fn)dlsym(lib, "tessera_free");
    error_fn last_error = (error_fn)dlsym(lib, "tessera_last_error");
    if (!configure || !try_malloc || !tfree || !last_error) return 2;
    /* A fresh instance each time: configuring works only before the first use. */
    if (configure(conf) != 0) {
        fprintf(stderr, "configure: %s (was the library really unloaded?)\n", last_error());
        return 3;
    }
    void *p[16];
    for (int i = 0; i < 16; i++) {
        size_t n = (size_t)(i + 1) << 16; /* 64 KiB .. 1 MiB */
        p[i] = try_malloc((ssize_t)n, 0, (void *)(uintptr_t)(i % 3));
        if (!p[i]) { fprintf(stderr, "malloc: %s\n", last_error()); return 4; }
        if (strstr(conf, "backend:host")) memset(p[i], i, n); /* device memory is not the CPU's to write */
    }
    for (int i = keep_one; i < 16; i++) tfree(p[i], (ssize_t)(i + 1) << 16, 0, (void *)(uintptr_t)(i % 3));
    /* Freed blocks sit in the caches (front caches included) at dlclose. */
    void *again = try_malloc(1 << 16, 0, (void *)1);
    if (!again) return 5;
    tfree(again, 1 << 16, 0, (void *)1);
    if (strstr(conf, "status_interval")) usleep(1200 * 1000); /* the status thread prints once */
    if (getenv("UNLOAD_TRACE")) fprintf(stderr, "cycle: close\n");
    if (close && dlclose(lib) != 0) { fprintf(stderr, "dlclose: %s\n", dlerror()); return 6; }
    return 0;
}

static int cycle(const char *path, int keep_one) {
    return cycle_with(path, CONF, keep_one, 1);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 3) return 10;
    if (argc > 3) CONF = argv[3];
    char status_conf[512];
    snprintf(status_conf, sizeof status_conf, "%s,status_interval:1", CONF);
    const char *path = argv[1];
    int n = atoi(argv[2]);
    for (int i = 0; i < 10; i++)
        if (cycle(path, 0)) return 11;
    long vm0 = status_kib("VmSize:"), rss0 = status_kib("VmRSS:");
    int fd0 = open_fds();
    for (int i = 0; i < n; i++)
        if (cycle(path, 0)) { fprintf(stderr, "cycle %d failed\n", i); return 12; }
    long vm1 = status_kib("VmSize:"), rss1 = status_kib("VmRSS:");
    int fd1 = open_fds();
    printf("after 10 cycles: VmSize %ld KiB, VmRSS %ld KiB, %d fds; after %d more: %ld KiB, %ld KiB, %d fds\n",
           vm0, rss0, fd0, n, vm1, rss1, fd1);
    /* Each cycle reserves 80 GiB of address space and maps 8.5 MiB: a leak
       of either would show at once. */
    if (vm1 - vm0 > 64 * 1024 || rss1 - rss0 > 16 * 1024 || fd1 != fd0) { puts("FAIL: not flat"); return 13; }
    if (cycle(path, 1)) return 14; /* stderr says what stays */
    long vm2 = status_kib("VmSize:");
    printf("a live block kept: VmSize +%ld KiB\n", vm2 - vm1);
    if (vm2 - vm1 < 1024) { puts("FAIL: the live block's memory was unmapped"); return 15; }
    /* The status thread wakes every second: unloaded under it, the process
       would crash at its next wake-up. */
    for (int i = 0; i < 3; i++)
        if (cycle_with(path, status_conf, 0, 1)) return 16;
    usleep(1500 * 1000);
    /* Left loaded, with a live block, at exit: nothing to do, nothing said. */
    if (cycle_with(path, CONF, 1, 0)) return 17;
    puts("UNLOAD OK");
    return 0;
}

/* Two copies of the library in one process (argv[1], argv[2]: two paths of
 * libtessera.so) are two independent allocators: each serves and frees its
 * own pointers; a pointer of one freed in the other is reported and
 * counted there, and changes nothing. */
#include "tessera.h"
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

typedef int32_t (*configure_fn)(const char *);
typedef void *(*malloc_fn)(ssize_t, int, cudaStream_t);
typedef void (*free_fn)(void *, ssize_t, int, cudaStream_t);
typedef int32_t (*stats_fn)(int, TesseraStats *);
typedef const char *(*err_fn)(void);

struct lib { configure_fn configure; malloc_fn malloc; free_fn free; stats_fn stats; err_fn err; };

static int load(const char *path, struct lib *l) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) { printf("dlopen %s: %s\n", path, dlerror()); return -1; }
    l->configure = (configure_fn)dlsym(h, "tessera_configure");
    l->malloc = (malloc_fn)dlsym(h, "tessera_try_malloc");
    l->free = (free_fn)dlsym(h, "tessera_free");
    l->stats = (stats_fn)dlsym(h, "tessera_get_stats");
    l->err = (err_fn)dlsym(h, "tessera_last_error");
    return (l->configure && l->malloc && l->free && l->stats && l->err) ? 0 : -1;
}

int main(int argc, char **argv) {
    struct lib a, b;
    if (argc != 3 || load(argv[1], &a) || load(argv[2], &b)) return 1;
    const char *conf = "backend:host,page_size:64K,device_capacity:16M,va_size:1G";
    if (a.configure(conf) || b.configure(conf)) return 2;
    char *pa = a.malloc(4096, 0, NULL), *pb = b.malloc(4096, 0, NULL);
    if (!pa || !pb || pa == pb) return 3;
    memset(pa, 1, 4096);
    memset(pb, 2, 4096);
    b.free(pa, 4096, 0, NULL); /* the wrong library */
    if (strstr(b.err(), "not a live tessera allocation") == NULL) { printf("FAIL: %s\n", b.err()); return 4; }
    TesseraStats s;
    b.stats(0, &s);
    if (s.counters[TESSERA_COUNTER_INVALID_FREES] != 1) return 5;
    if (pa[4095] != 1 || pb[0] != 2) return 6;
    a.free(pa, 4096, 0, NULL);
    b.free(pb, 4096, 0, NULL);
    a.stats(0, &s);
    if (s.gauges[TESSERA_GAUGE_ALLOCATED_BYTES].current != 0) return 7;
    puts("LOADED TWICE OK");
    return 0;
}

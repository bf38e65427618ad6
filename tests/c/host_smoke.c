/* A plain C program against include/tessera.h: configure the host backend,
 * allocate, write and read every byte, free, read the statistics, and check
 * that bad input is reported, not fatal. Exit 0 and "C ABI OK" on success. */
#include "tessera.h"
#include <stdio.h>
#include <string.h>

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL line %d: ", __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); return 1; } } while (0)

/* An OOM callback, as C declares one: counts its calls in *user_data. */
static uint64_t oom_asked;
static void on_oom(int device, uint64_t size, void *user_data) {
    if (device == 0) oom_asked = size;
    ++*(int *)user_data;
}

/* An OOM callback that allocates: its allocation, out of memory too, must
 * fail with its own error (no callback runs inside a callback). */
static int inner_failed_cleanly = -1;
static void on_oom_allocate(int device, uint64_t size, void *user_data) {
    (void)device; (void)user_data;
    void *p = tessera_try_malloc((ssize_t)size, 0, NULL);
    inner_failed_cleanly = p == NULL && strncmp(tessera_last_error(), "CUDA out of memory", 18) == 0;
}

static int find(const char *(*name)(int32_t), int32_t count, const char *wanted) {
    for (int32_t i = 0; i < count; i++)
        if (name(i) && strcmp(name(i), wanted) == 0) return i;
    return -1;
}

int main(void) {
    CHECK(strlen(tessera_version()) > 0, "empty version");
    CHECK(tessera_configure("no_such_key:1") == -1, "bad key accepted");
    CHECK(strstr(tessera_last_error(), "no_such_key") != NULL, "error does not name the key: %s", tessera_last_error());
    CHECK(tessera_configure("backend:host,page_size:64K,device_capacity:64M,va_size:1G") == 0, "%s", tessera_last_error());
    CHECK(tessera_check_config() == 0, "%s", tessera_last_error());

    const size_t sizes[] = {1, 511, 512, 4096, 100000, 1 << 20, 5 << 20};
    unsigned char *ptrs[7];
    for (int i = 0; i < 7; i++) {
        ptrs[i] = tessera_try_malloc((ssize_t)sizes[i], 0, NULL);
        CHECK(ptrs[i] != NULL, "malloc(%zu): %s", sizes[i], tessera_last_error());
        memset(ptrs[i], 0x40 + i, sizes[i]);
    }
    for (int i = 0; i < 7; i++)
        for (size_t k = 0; k < sizes[i]; k++)
            CHECK(ptrs[i][k] == 0x40 + i, "block %d byte %zu overwritten", i, k);

    TesseraStats s;
    CHECK(tessera_get_stats(0, &s) == 0, "%s", tessera_last_error());
    int alloc = find(tessera_gauge_name, tessera_gauge_count(), "allocated_bytes");
    int req = find(tessera_gauge_name, tessera_gauge_count(), "requested_bytes");
    int invalid = find(tessera_counter_name, tessera_counter_count(), "invalid_frees");
    CHECK(alloc == TESSERA_GAUGE_ALLOCATED_BYTES && req >= 0 && invalid >= 0, "stat names");
    size_t total = 0;
    for (int i = 0; i < 7; i++) total += sizes[i];
    CHECK(s.gauges[req].current == (int64_t)total, "requested %lld != %zu", (long long)s.gauges[req].current, total);

    char line[256];
    int64_t needed = tessera_status_line(0, NULL, 0);
    CHECK(needed > 1 && needed <= (int64_t)sizeof line && tessera_status_line(0, line, sizeof line) == needed,
          "status line: %s", tessera_last_error());
    CHECK(strncmp(line, "tessera: dev0 allocated ", 24) == 0, "status line: %s", line);
    CHECK(tessera_status_line(5, line, sizeof line) == -1, "status of device 5");

    for (int i = 0; i < 7; i++) tessera_free(ptrs[i], (ssize_t)sizes[i], 0, NULL);
    uint64_t largest = 0;
    CHECK(tessera_cache_info(0, &largest) == 0 && largest > 0, "largest cached block %llu",
          (unsigned long long)largest);
    CHECK(tessera_cache_info(0, NULL) == -1, "NULL cache_info output accepted");
    CHECK(tessera_get_stats(0, &s) == 0, "stats");
    CHECK(s.gauges[alloc].current == 0, "allocated not back to 0");

    /* Bad input: reported and counted, never fatal. */
    tessera_free(ptrs[0], 1, 0, NULL); /* double free */
    CHECK(strstr(tessera_last_error(), "not a live tessera allocation") != NULL, "%s", tessera_last_error());
    /* The last error is this call's: a call that succeeds clears it, void ones too. */
    void *ok = tessera_try_malloc(4096, 0, NULL);
    CHECK(ok != NULL && tessera_last_error()[0] == 0, "a successful malloc left '%s'", tessera_last_error());
    tessera_free(ok, -4096, 0, NULL); /* a negative size: freed as allocated, reported, counted */
    CHECK(strstr(tessera_last_error(), "negative size") != NULL, "negative size: '%s'", tessera_last_error());
    CHECK(tessera_get_stats(0, &s) == 0 && s.counters[TESSERA_COUNTER_MISMATCHED_FREES] == 1, "negative size not counted");
    CHECK(tessera_get_stats(0, &s) == 0 && s.gauges[alloc].current == 0, "the negatively sized free did not free");
    tessera_free(ptrs[1], 1, 0, NULL); /* double free again: an error... */
    tessera_empty_cache();               /* ...that the next call, which succeeds, clears */
    CHECK(tessera_last_error()[0] == 0, "empty_cache left '%s'", tessera_last_error());
    CHECK(tessera_try_malloc(-5, 0, NULL) == NULL, "negative size served");
    CHECK(tessera_try_malloc(100, 9, NULL) == NULL, "device 9 served");
    int oom_calls = 0;
    CHECK(tessera_register_oom_callback(NULL, NULL) == -1, "a NULL callback accepted");
    CHECK(tessera_register_oom_callback(on_oom, &oom_calls) == 0, "%s", tessera_last_error());
    CHECK(tessera_register_oom_callback(on_oom_allocate, NULL) == 0, "%s", tessera_last_error());
    CHECK(tessera_try_malloc(1LL << 40, 0, NULL) == NULL, "1 TiB served on a 64 MiB device");
    CHECK(oom_calls == 1 && oom_asked == 1ULL << 40, "OOM callback ran %d times for %llu bytes", oom_calls,
          (unsigned long long)oom_asked);
    CHECK(inner_failed_cleanly == 1, "the allocation inside the OOM callback: %d", inner_failed_cleanly);
    CHECK(strncmp(tessera_last_error(), "CUDA out of memory. Tried to allocate", 37) == 0, "%s", tessera_last_error());
    CHECK(tessera_try_malloc(0, 0, NULL) == NULL, "size 0 gives NULL");
    CHECK(tessera_get_stats(0, NULL) == -1, "NULL stats accepted");
    CHECK(tessera_get_stats(0, &s) == 0 && s.counters[invalid] == 2, "invalid_frees not counted");
    tessera_empty_cache();
    CHECK(tessera_get_stats(0, &s) == 0 && s.gauges[TESSERA_GAUGE_RESERVED_BYTES].current == 0, "reserved after empty_cache");
    printf("C ABI OK\n");
    return 0;
}

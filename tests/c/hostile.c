/* Every function of include/tessera.h with hostile arguments, then from
 * eight threads at once among valid allocations whose bytes are checked.
 * Nothing may crash, every bad call must fail with a message, the valid
 * blocks must keep their bytes, and the statistics must add up at the end.
 * (No double free among the threads: another thread may hold the address
 * again by then, in any allocator; host_smoke.c tests it on one thread.)
 * Prints "HOSTILE OK" on success. */
#include "tessera.h"
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL line %d: ", __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); exit(1); } } while (0)
/* A call that must fail: its last error says something. */
#define FAILS(call) do { call; CHECK(tessera_last_error()[0] != 0, "%s succeeded", #call); } while (0)
#define FAILS_RC(call) do { CHECK((call) == -1, "%s did not return -1", #call); \
    CHECK(tessera_last_error()[0] != 0, "%s: no message", #call); } while (0)

static void hostile_calls(unsigned seed) {
    TesseraStats s;
    uint64_t u;
    char small[4] = {'x', 'x', 'x', 'x'};
    void *junk = (void *)(uintptr_t)(0xdead0000u + (seed & 0xff) * 512);
    FAILS(tessera_free(junk, 512, 0, NULL));
    FAILS(tessera_free(junk, -1, 0, NULL));
    FAILS(tessera_free(junk, 512, -3, NULL));
    FAILS(tessera_record_stream(junk, NULL));
    FAILS(tessera_record_stream(NULL, (cudaStream_t)(uintptr_t)seed));
    FAILS(tessera_set_memory_fraction(-1.0, 0));
    FAILS(tessera_set_memory_fraction(NAN, 0));
    FAILS(tessera_set_memory_fraction(2.0, 0));
    FAILS(tessera_set_memory_fraction(0.5, 99));
    CHECK(tessera_try_malloc(-1, 0, NULL) == NULL && tessera_last_error()[0], "negative size");
    CHECK(tessera_try_malloc((ssize_t)(((uint64_t)1 << 63) - 1), 0, NULL) == NULL && tessera_last_error()[0], "2^63 - 1");
    CHECK(tessera_try_malloc(512, -1, NULL) == NULL && tessera_last_error()[0], "device -1");
    CHECK(tessera_try_malloc(512, 1 << 30, NULL) == NULL && tessera_last_error()[0], "device 2^30");
    FAILS_RC(tessera_get_stats(-1, &s));
    FAILS_RC(tessera_get_stats(64, &s));
    FAILS_RC(tessera_get_stats(0, NULL));
    FAILS_RC(tessera_get_arena_stats(0, 2, &s));
    FAILS_RC(tessera_get_arena_stats(0, -1, &s));
    FAILS_RC(tessera_get_arena_stats(0, 0, NULL));
    FAILS_RC(tessera_reset_peak_stats(-7));
    FAILS_RC(tessera_cache_info(5, &u));
    FAILS_RC(tessera_cache_info(0, NULL));
    FAILS_RC(tessera_history_trace(9, NULL, 0));
    FAILS_RC(tessera_status_line(-2, NULL, 0));
    FAILS_RC(tessera_register_oom_callback(NULL, NULL));
    FAILS_RC(tessera_blocks(0, NULL, 5));
    FAILS_RC(tessera_blocks(77, NULL, 0));
    FAILS_RC(tessera_release_pool(0, 0));
    FAILS_RC(tessera_pool_blocks(0, 0, NULL, 0));
    FAILS_RC(tessera_pool_blocks(0, (uint64_t)1 << 62, NULL, 0));
    FAILS_RC(tessera_reset_accumulated_stats(-1));
    CHECK(tessera_try_malloc_in_pool(512, 0, NULL, 0) == NULL && tessera_last_error()[0], "pool 0 served");
    CHECK(tessera_claim_in_pool(0, 3, junk, 512, 512, NULL) == NULL && tessera_last_error()[0], "junk claimed");
    /* Buffers too small: the bytes needed, nothing written past them. */
    CHECK(tessera_snapshot_json(small, 3) > 3 && memcmp(small, "xxxx", 4) == 0, "snapshot wrote into a short buffer");
    CHECK(tessera_options_json(small, 2) > 2 && memcmp(small, "xxxx", 4) == 0, "options wrote into a short buffer");
    CHECK(tessera_history_trace(0, small, 1) > 1 && memcmp(small, "xxxx", 4) == 0, "trace wrote into a short buffer");
    CHECK(tessera_status_line(0, small, 0) > 1 && memcmp(small, "xxxx", 4) == 0, "status wrote into a zero buffer");
    CHECK(tessera_config_warnings(small, 0) == 1, "config warnings");
    CHECK(tessera_gauge_name(-1) == NULL && tessera_gauge_name(1 << 20) == NULL, "gauge name out of range");
    CHECK(tessera_counter_name(-1) == NULL && tessera_counter_name(tessera_counter_count()) == NULL, "counter name");
    tessera_init(-5); /* a count that is not tessera's: warned, not fatal */
    CHECK(tessera_last_error()[0] == 0, "init: %s", tessera_last_error());
}

struct worker { unsigned seed; int failures; };

static void *work(void *arg) {
    struct worker *w = arg;
    unsigned r = w->seed;
    void *blocks[32] = {0};
    size_t sizes[32] = {0};
    cudaStream_t stream = (cudaStream_t)(uintptr_t)(w->seed % 4);
    for (int i = 0; i < 4000; i++) {
        r = r * 1103515245u + 12345u;
        int k = (int)((r >> 8) % 32);
        if (blocks[k]) {
            unsigned char *b = blocks[k];
            for (size_t j = 0; j < sizes[k]; j += 509)
                if (b[j] != (unsigned char)(k ^ w->seed)) w->failures++;
            if (sizes[k] > 4096 && (r >> 20) % 8 == 0) {
                tessera_free(b + 512, 512, 0, stream); /* inside the block: refused */
                if (!tessera_last_error()[0]) w->failures++;
            }
            tessera_free(b, (ssize_t)sizes[k], 0, stream);
            if (tessera_last_error()[0]) w->failures++;
            blocks[k] = NULL;
        } else {
            sizes[k] = 1 + (r >> 12) % (3 << 20);
            blocks[k] = tessera_try_malloc((ssize_t)sizes[k], 0, stream);
            if (!blocks[k]) continue; /* out of memory under the cap: fine */
            memset(blocks[k], k ^ w->seed, sizes[k]);
            if ((r >> 16) % 16 == 0) tessera_record_stream(blocks[k], (cudaStream_t)(uintptr_t)7);
        }
        if (i % 97 == 0) hostile_calls(r);
        if (i % 501 == 0) tessera_empty_cache();
    }
    for (int k = 0; k < 32; k++)
        if (blocks[k]) tessera_free(blocks[k], (ssize_t)sizes[k], 0, stream);
    return NULL;
}

int main(void) {
    /* Before configuring: hostile configurations are refused. */
    FAILS_RC(tessera_configure(NULL));
    FAILS_RC(tessera_configure("page_size:3,"));
    FAILS_RC(tessera_configure("\xff\xfe:1"));
    FAILS_RC(tessera_configure(",,,:::"));
    CHECK(tessera_configure("backend:host,page_size:64K,device_capacity:96M,va_size:4G") == 0, "%s", tessera_last_error());
    CHECK(tessera_check_config() == 0, "%s", tessera_last_error());
    hostile_calls(1);
    CHECK(tessera_record_history(1, 100) == 0 && tessera_record_history(1, (size_t)-1) == 0 &&
          tessera_record_history(0, 0) == 0, "record_history");
    CHECK(tessera_watch_graphs() == 0 && tessera_release_graph_pools() >= 0, "graph calls");
    FAILS_RC(tessera_configure("backend:host")); /* too late: already initialised */

    /* A private pool: its block is listed, freed into it, claimed back, released. */
    void *in_pool = tessera_try_malloc_in_pool(1 << 20, 0, NULL, 42);
    CHECK(in_pool != NULL, "%s", tessera_last_error());
    TesseraBlock listed[4];
    CHECK(tessera_pool_blocks(0, 42, listed, 4) == 1 && listed[0].addr == (uintptr_t)in_pool && listed[0].pool == 42,
          "pool blocks");
    int64_t all = tessera_blocks(0, NULL, 0);
    CHECK(all >= 1, "blocks: %s", tessera_last_error());
    tessera_free(in_pool, 1 << 20, 0, NULL);
    CHECK(tessera_pool_blocks(0, 42, listed, 4) == 0, "a freed block still listed");
    CHECK(tessera_claim_in_pool(0, 42, in_pool, 1 << 20, 1 << 20, NULL) == in_pool, "claim: %s", tessera_last_error());
    tessera_free(in_pool, 1 << 20, 0, NULL);
    CHECK(tessera_release_pool(0, 42) >= (1 << 20), "release_pool: %s", tessera_last_error());
    CHECK(tessera_reset_accumulated_stats(0) == 0, "%s", tessera_last_error());

    pthread_t threads[8];
    struct worker workers[8];
    for (int t = 0; t < 8; t++) {
        workers[t] = (struct worker){.seed = 1000u + (unsigned)t, .failures = 0};
        CHECK(pthread_create(&threads[t], NULL, work, &workers[t]) == 0, "pthread_create");
    }
    int failures = 0;
    for (int t = 0; t < 8; t++) {
        pthread_join(threads[t], NULL);
        failures += workers[t].failures;
    }
    CHECK(failures == 0, "%d bytes lost or calls misreported", failures);

    TesseraStats s;
    CHECK(tessera_get_stats(0, &s) == 0, "%s", tessera_last_error());
    CHECK(s.gauges[TESSERA_GAUGE_ALLOCATED_BYTES].current == 0, "allocated %lld at the end",
          (long long)s.gauges[TESSERA_GAUGE_ALLOCATED_BYTES].current);
    CHECK(s.counters[TESSERA_COUNTER_INVALID_FREES] > 0 && s.counters[TESSERA_COUNTER_INVALID_REQUESTS] > 0,
          "bad calls not counted");
    tessera_empty_cache();
    CHECK(tessera_get_stats(0, &s) == 0 && s.gauges[TESSERA_GAUGE_RESERVED_BYTES].current == 0,
          "reserved %lld after empty_cache", (long long)s.gauges[TESSERA_GAUGE_RESERVED_BYTES].current);
    printf("HOSTILE OK: %llu invalid frees, %llu invalid requests, %llu mismatched frees\n",
           (unsigned long long)s.counters[TESSERA_COUNTER_INVALID_FREES],
           (unsigned long long)s.counters[TESSERA_COUNTER_INVALID_REQUESTS],
           (unsigned long long)s.counters[TESSERA_COUNTER_MISMATCHED_FREES]);
    return 0;
}

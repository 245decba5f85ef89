/*
 * Offloads a few buffers to storage and fetches them back through spillway's C ABI, on
 * host memory (no GPU needed).
 *
 *   offload DIRECTORY
 *
 * The engine keeps its data in an anonymous file in DIRECTORY (nothing is left there).
 * Exits 0 when every buffer comes back intact and every call behaves as documented.
 * crates/capi/run-example.sh builds and runs it.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spillway.h"

#define N_BUFFERS 4

/* Reports a failed call and leaves with status 1. */
#define CHECK(call)                                                                        \
    do {                                                                                   \
        int status_ = (call);                                                              \
        if (status_ != SPILLWAY_OK) {                                                      \
            fprintf(stderr, "offload: %s failed with %s: %s\n", #call,                     \
                    spillway_status_name(status_), spillway_last_error());                 \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static void fail(const char *what) {
    fprintf(stderr, "offload: %s\n", what);
    exit(1);
}

/* A byte pattern that differs per buffer and per position. */
static void fill(unsigned char *buf, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) {
        buf[i] = (unsigned char)(i * 31u + seed * 7u + (i >> 12));
    }
}

/* A bad setting is refused with a message naming it. */
static void refuses_a_bad_setting(void) {
    spillway_settings *settings = NULL;
    CHECK(spillway_settings_new(&settings));
    int status = spillway_settings_set(settings, "staging_bytes", "lots");
    const char *message = spillway_last_error();
    if (status != SPILLWAY_ERROR_INVALID_ARGUMENT || strstr(message, "staging_bytes=\"lots\"") == NULL) {
        fprintf(stderr, "offload: staging_bytes=lots gave %s: %s\n", spillway_status_name(status), message);
        exit(1);
    }
    printf("a bad setting is refused as expected: %s\n", message);
    spillway_settings_free(settings);
}

/* Prints the storage the engine holds now. */
static void print_storage_usage(const spillway_engine *engine) {
    spillway_storage_usage usage;
    CHECK(spillway_engine_storage_usage(engine, &usage, sizeof usage));
    printf("storage: %" PRIu64 " of %" PRIu64 " bytes used in %" PRIu64 " extents; fragmentation %.2f\n",
           usage.used, usage.capacity, usage.live_extents, usage.fragmentation);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIRECTORY\n", argv[0]);
        return 2;
    }
    printf("spillway %s\n", spillway_version());
    refuses_a_bad_setting();

    /* Host memory and a small staging area; everything else from the defaults, the file
     * named by SPILLWAY_CONFIG and the SPILLWAY_* environment variables. */
    spillway_settings *settings = NULL;
    CHECK(spillway_settings_new(&settings));
    CHECK(spillway_settings_set(settings, "device", "host"));
    CHECK(spillway_settings_set(settings, "staging_bytes", "8MiB"));
    CHECK(spillway_settings_set(settings, "prefetch_bytes", "4MiB"));
    CHECK(spillway_settings_set(settings, "pack_extent_bytes", "1MiB"));
    CHECK(spillway_settings_set(settings, "pack_threshold", "256KiB"));

    const char *paths[] = {argv[1]};
    spillway_engine *engine = NULL;
    CHECK(spillway_engine_open(paths, 1, 64u << 20, settings, &engine));
    spillway_settings_free(settings); /* the engine keeps its own copy */

    char *info = NULL;
    CHECK(spillway_engine_info_json(engine, &info));
    printf("engine: %s\n", info);
    spillway_string_free(info);

    /* Offload buffers of different sizes: small ones are packed together, large ones
     * written on their own. */
    const size_t sizes[N_BUFFERS] = {100, 4096, 300000, 3u << 20};
    unsigned char *sources[N_BUFFERS];
    spillway_handle handles[N_BUFFERS];
    for (unsigned i = 0; i < N_BUFFERS; i++) {
        sources[i] = malloc(sizes[i]);
        if (sources[i] == NULL) fail("out of memory");
        fill(sources[i], sizes[i], i);
        spillway_region region = {.address = sources[i], .length = sizes[i]};
        CHECK(spillway_engine_offload(engine, /*storage*/ i, /*version*/ 0, &region, 1, NULL, &handles[i]));
    }
    CHECK(spillway_engine_drain(engine));
    print_storage_usage(engine);

    for (unsigned i = 0; i < N_BUFFERS; i++) {
        /* Once the engine no longer reads a source, its owner may reuse it. */
        bool released = false;
        CHECK(spillway_engine_source_released(engine, handles[i], &released));
        if (!released) fail("a source is still in use after drain");

        unsigned char *back = calloc(1, sizes[i]);
        if (back == NULL) fail("out of memory");
        spillway_region region = {.address = back, .length = sizes[i]};
        CHECK(spillway_engine_fetch(engine, handles[i], &region, 1, NULL));
        if (memcmp(back, sources[i], sizes[i]) != 0) {
            fprintf(stderr, "offload: buffer %u (%zu bytes) came back different\n", i, sizes[i]);
            return 1;
        }
        printf("buffer %u: %zu bytes offloaded and fetched back intact\n", i, sizes[i]);
        CHECK(spillway_engine_release(engine, handles[i]));
        free(back);
        free(sources[i]);
    }

    /* A released handle is refused, with the reason. */
    int status = spillway_engine_release(engine, handles[0]);
    if (status != SPILLWAY_ERROR_INVALID_ARGUMENT) fail("releasing a handle twice was not refused");
    printf("a released handle is refused as expected: %s\n", spillway_last_error());

    print_storage_usage(engine); /* nothing held any more */

    /* What the engine did: the main counters and latencies as a struct, everything as JSON. */
    spillway_stats stats;
    CHECK(spillway_engine_stats(engine, &stats, sizeof stats));
    printf("stats: %" PRIu64 " offloads (%" PRIu64 " packed, %" PRIu64 " on their own), %" PRIu64
           " bytes written, %" PRIu64 " read; fetch latency p50 %" PRIu64 " us, p99 %" PRIu64 " us\n",
           stats.offloads, stats.packed_tensors, stats.direct_tensors, stats.bytes_written,
           stats.bytes_read, stats.fetch_latency.p50_us, stats.fetch_latency.p99_us);
    if (stats.offloads != N_BUFFERS || stats.fetches != N_BUFFERS) fail("the stats miss calls");
    char *json = NULL;
    CHECK(spillway_engine_stats_json(engine, &json));
    printf("stats as JSON: %s\n", json);
    spillway_string_free(json);

    CHECK(spillway_engine_close(engine));
    printf("ok\n");
    return 0;
}

/* psv_clock.h: seconds of the monotonic clock, time.perf_counter's clock on
 * Linux (declared in psv_clock.pxd). */
#ifndef PSV_CLOCK_H
#define PSV_CLOCK_H

#include <time.h>

static inline double psv_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif

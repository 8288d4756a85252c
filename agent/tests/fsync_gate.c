/* A disk whose fsync hangs, for one process: loaded with LD_PRELOAD by the agent's service
 * test `a_spool_stuck_in_fsync_stops_neither_the_loop_nor_the_watchdog`.
 *
 * While the file named by MAMORI_TEST_FSYNC_GATE exists, fsync() and fdatasync() wait (as on
 * a worn SD card that takes seconds to commit); the first one to wait creates the file named
 * by MAMORI_TEST_FSYNC_STALLED, so the test knows a sync is held. Without the gate variable
 * they are the C library's own.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void wait_at_gate(void) {
    const char *gate = getenv("MAMORI_TEST_FSYNC_GATE");
    const char *stalled = getenv("MAMORI_TEST_FSYNC_STALLED");
    struct timespec five_ms = {0, 5000000};
    int told = 0;
    if (gate == NULL) {
        return;
    }
    while (access(gate, F_OK) == 0) {
        if (!told && stalled != NULL) {
            int fd = open(stalled, O_CREAT | O_WRONLY, 0600);
            if (fd >= 0) {
                close(fd);
            }
            told = 1;
        }
        nanosleep(&five_ms, NULL);
    }
}

int fsync(int fd) {
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    wait_at_gate();
    return real(fd);
}

int fdatasync(int fd) {
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    wait_at_gate();
    return real(fd);
}

// Two O_DIRECT writes in flight together (the replica journal's record and the block's
// in-place copy), through the kernel's native AIO: raw syscalls, no libaio.

#define _GNU_SOURCE
#include "cdirectio.h"

#include <errno.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static pthread_key_t ctx_key;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;
/// A second per-thread context, for `cdio_write_many`'s larger batches.
static pthread_key_t many_key;
static pthread_once_t many_once = PTHREAD_ONCE_INIT;
#define CDIO_MANY_BATCH 128

static void ctx_destroy(void *p) {
    aio_context_t ctx = (aio_context_t)(uintptr_t)p;
    if (ctx != 0 && ctx != (aio_context_t)-1) syscall(SYS_io_destroy, ctx);
}

static void ctx_make_key(void) { pthread_key_create(&ctx_key, ctx_destroy); }
static void many_make_key(void) { pthread_key_create(&many_key, ctx_destroy); }

/// The calling thread's context for batches of up to CDIO_MANY_BATCH; 0 when AIO cannot be used.
static aio_context_t thread_many_ctx(void) {
    pthread_once(&many_once, many_make_key);
    void *p = pthread_getspecific(many_key);
    if (p == NULL) {
        aio_context_t ctx = 0;
        if (syscall(SYS_io_setup, CDIO_MANY_BATCH, &ctx) != 0) ctx = (aio_context_t)-1;
        pthread_setspecific(many_key, (void *)(uintptr_t)ctx);
        p = (void *)(uintptr_t)ctx;
    }
    aio_context_t ctx = (aio_context_t)(uintptr_t)p;
    return ctx == (aio_context_t)-1 ? 0 : ctx;
}

/// The calling thread's context; 0 when AIO cannot be used here (then never tried again on this thread).
static aio_context_t thread_ctx(void) {
    pthread_once(&ctx_once, ctx_make_key);
    void *p = pthread_getspecific(ctx_key);
    if (p == NULL) {
        aio_context_t ctx = 0;
        if (syscall(SYS_io_setup, 4, &ctx) != 0) ctx = (aio_context_t)-1;
        pthread_setspecific(ctx_key, (void *)(uintptr_t)ctx);
        p = (void *)(uintptr_t)ctx;
    }
    aio_context_t ctx = (aio_context_t)(uintptr_t)p;
    return ctx == (aio_context_t)-1 ? 0 : ctx;
}

/// Plain writes of what is left after `done` bytes of the request went.
static int finish(int fd, const struct iovec *iov, int cnt, int64_t off, size_t done) {
    for (int i = 0; i < cnt; i++) {
        const char *base = iov[i].iov_base;
        size_t len = iov[i].iov_len;
        if (done >= len) { done -= len; off += len; continue; }
        base += done; off += done; len -= done; done = 0;
        while (len > 0) {
            ssize_t n = pwrite(fd, base, len, off);
            if (n < 0) { if (errno == EINTR) continue; return -errno; }
            base += n; off += n; len -= (size_t)n;
        }
    }
    return 0;
}

int cdio_write_pair(int fd_a, const void *a1, size_t a_len1, const void *a2, size_t a_len2, int64_t off_a,
                    int fd_b, const void *b_buf, size_t b_len, int64_t off_b) {
    struct iovec va[2] = {{(void *)a1, a_len1}, {(void *)a2, a_len2}};
    int va_cnt = a_len2 > 0 ? 2 : 1;
    struct iovec vb[1] = {{(void *)b_buf, b_len}};
    aio_context_t ctx = thread_ctx();
    if (ctx != 0) {
        struct iocb cb[2];
        memset(cb, 0, sizeof cb);
        cb[0].aio_lio_opcode = IOCB_CMD_PWRITEV;
        cb[0].aio_fildes = (uint32_t)fd_a;
        cb[0].aio_buf = (uint64_t)(uintptr_t)va;
        cb[0].aio_nbytes = (uint64_t)va_cnt;
        cb[0].aio_offset = off_a;
        cb[0].aio_data = 0;
        cb[1].aio_lio_opcode = IOCB_CMD_PWRITE;
        cb[1].aio_fildes = (uint32_t)fd_b;
        cb[1].aio_buf = (uint64_t)(uintptr_t)b_buf;
        cb[1].aio_nbytes = b_len;
        cb[1].aio_offset = off_b;
        cb[1].aio_data = 1;
        struct iocb *list[2] = {&cb[0], &cb[1]};
        long submitted;
        do { submitted = syscall(SYS_io_submit, ctx, 2, list); } while (submitted < 0 && errno == EINTR);
        if (submitted < 0) submitted = 0;
        long results[2] = {0, 0};
        int done = 0;
        // What was not submitted is written below; what was must be reaped before returning
        // (the buffers belong to the caller).
        while (done < submitted) {
            struct io_event ev[2];
            long n = syscall(SYS_io_getevents, ctx, 1, submitted - done, ev, NULL);
            if (n < 0) { if (errno == EINTR) continue; return -errno; }
            for (long i = 0; i < n; i++) results[ev[i].data] = ev[i].res, done++;
        }
        int rc = 0;
        size_t a_total = a_len1 + a_len2;
        if (submitted >= 1) {
            if (results[0] < 0) rc = (int)results[0];
            else if ((size_t)results[0] < a_total) rc = finish(fd_a, va, va_cnt, off_a, (size_t)results[0]);
        } else {
            rc = finish(fd_a, va, va_cnt, off_a, 0);
        }
        int rb;
        if (submitted >= 2) {
            rb = results[1] < 0 ? (int)results[1] : ((size_t)results[1] < b_len ? finish(fd_b, vb, 1, off_b, (size_t)results[1]) : 0);
        } else {
            rb = finish(fd_b, vb, 1, off_b, 0);
        }
        return rc != 0 ? rc : rb;
    }
    int rc = finish(fd_a, va, va_cnt, off_a, 0);
    int rb = finish(fd_b, vb, 1, off_b, 0);
    return rc != 0 ? rc : rb;
}

static void write_plain(struct cdio_write *w, size_t done) {
    struct iovec v[2] = {{(void *)w->base1, w->len1}, {(void *)w->base2, w->len2}};
    w->result = finish(w->fd, v, w->len2 > 0 ? 2 : 1, w->offset, done);
}

void cdio_write_many(struct cdio_write *writes, int count) {
    aio_context_t ctx = thread_many_ctx();
    for (int start = 0; start < count; start += CDIO_MANY_BATCH) {
        int n = count - start < CDIO_MANY_BATCH ? count - start : CDIO_MANY_BATCH;
        struct cdio_write *w = writes + start;
        if (ctx == 0) {
            for (int i = 0; i < n; i++) write_plain(&w[i], 0);
            continue;
        }
        struct iovec iov[CDIO_MANY_BATCH][2];
        struct iocb cb[CDIO_MANY_BATCH];
        struct iocb *list[CDIO_MANY_BATCH];
        memset(cb, 0, sizeof(struct iocb) * (size_t)n);
        for (int i = 0; i < n; i++) {
            iov[i][0].iov_base = (void *)w[i].base1;
            iov[i][0].iov_len = w[i].len1;
            iov[i][1].iov_base = (void *)w[i].base2;
            iov[i][1].iov_len = w[i].len2;
            cb[i].aio_lio_opcode = IOCB_CMD_PWRITEV;
            cb[i].aio_fildes = (uint32_t)w[i].fd;
            cb[i].aio_buf = (uint64_t)(uintptr_t)iov[i];
            cb[i].aio_nbytes = w[i].len2 > 0 ? 2 : 1;
            cb[i].aio_offset = w[i].offset;
            cb[i].aio_data = (uint64_t)i;
            list[i] = &cb[i];
            w[i].result = 0;
        }
        long submitted = 0;
        while (submitted < n) {
            long rc = syscall(SYS_io_submit, ctx, n - submitted, list + submitted);
            if (rc < 0) { if (errno == EINTR) continue; break; }
            if (rc == 0) break;
            submitted += rc;
        }
        // What was submitted must be reaped before returning (the buffers are the caller's).
        long reaped = 0;
        long results[CDIO_MANY_BATCH];
        char done[CDIO_MANY_BATCH];
        memset(done, 0, (size_t)n);
        while (reaped < submitted) {
            struct io_event ev[CDIO_MANY_BATCH];
            long got = syscall(SYS_io_getevents, ctx, 1, submitted - reaped, ev, NULL);
            if (got < 0) { if (errno == EINTR) continue; break; }
            for (long k = 0; k < got; k++) { results[ev[k].data] = ev[k].res; done[ev[k].data] = 1; }
            reaped += got;
        }
        for (int i = 0; i < n; i++) {
            if (i >= submitted) { write_plain(&w[i], 0); continue; }
            if (!done[i]) { w[i].result = -EIO; continue; }
            long r = results[i];
            size_t total = w[i].len1 + w[i].len2;
            if (r < 0) w[i].result = (int)r;
            else if ((size_t)r < total) write_plain(&w[i], (size_t)r);
        }
    }
}

#include <sys/prctl.h>
#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

int cdio_mark_io_flusher(void) {
    return prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0 ? 0 : -errno;
}

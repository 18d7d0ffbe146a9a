// libfuse3 (3.14) low-level filesystem with one file; see include/CFUSEShim.h.
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>
#include <linux/fuse.h>
#include <liburing.h>

#include "CFUSEShim.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/prctl.h>
#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif
#include <semaphore.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define VOLUME_INO 2
#define VOLUME_NAME "volume"
#define ATTR_TIMEOUT 3600.0

struct read_ring;
struct cfuse_session;
struct worker_pool;

// One FUSE worker: its thread and its buffers — one anonymous mapping holding the request
// buffer (WORKER_BUFFER) and then the read buffer (CFUSE_MAX_WRITE) — set by the worker as it
// starts and unchanged until it ends.
struct worker_slot {
    struct worker_pool *pool;
    pthread_t thread;
    char *area;
};

struct worker_pool {
    struct cfuse_session *s;
    pthread_mutex_t lock;
    // Under `lock`: the workers started, and whether the loop is ending (no more start then).
    struct worker_slot slots[CFUSE_MAX_THREADS];
    int started;
    int ending;
    // Workers waiting for a request now (atomic).
    int idle;
    // Posted by each worker as it ends: the first one ends the loop (below).
    sem_t finished;
    // Requests received (atomic): the idle trim's measure of activity.
    uint64_t received;
    // Moved by each idle trim (atomic): a worker that sees it move drops its buffers.
    unsigned trim_gen;
    // Writes deferred and not answered yet (under `lock`); the loop's end waits for them
    // (`answered`) after the workers are gone.
    int deferred;
    pthread_cond_t answered;
};

struct cfuse_session {
    struct fuse_session *se;
    // The asynchronous reads' io_uring (NULL: every read is synchronous; `ring_reason` says why).
    struct read_ring *ring;
    char ring_reason[160];
    pthread_t thread;
    int thread_started;
    uint64_t size;
    cfuse_callbacks callbacks;
    void *context;
    unsigned connection;
    unsigned proto_minor;
    int resumed;
    char *mountpoint;
    struct worker_pool pool;
    // Idle trim (atomics): the idle time that triggers one (ms, 0: never), trims so far and
    // the bytes they gave back.
    unsigned idle_trim_ms;
    uint64_t trims;
    uint64_t released;
};

// A worker's read buffer (in its slot's mapping, CFUSE_MAX_WRITE bytes: no FUSE read is
// larger); NULL on any other thread.
static __thread char *worker_read_buffer;

static void fill_attr(const struct cfuse_session *s, fuse_ino_t ino, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_uid = 0;
    st->st_gid = 0;
    st->st_blksize = 4096;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0700;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0600;
        st->st_nlink = 1;
        st->st_size = (off_t)s->size;
        st->st_blocks = (blkcnt_t)(s->size / 512);
    }
}

static struct cfuse_session *session_of(fuse_req_t req) { return fuse_req_userdata(req); }

static void op_init(void *userdata, struct fuse_conn_info *conn) {
    struct cfuse_session *s = userdata;
    // The kernel's protocol minor: >= 40 means it can resend the requests a dead daemon had
    // read (FUSE_NOTIFY_RESEND). On a resumed session this is the synthetic INIT's (below).
    if (s) s->proto_minor = conn->proto_minor;
    conn->max_write = CFUSE_MAX_WRITE;
    conn->max_background = 128;
    conn->congestion_threshold = 96;
    if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
    conn->want &= ~(unsigned)FUSE_CAP_WRITEBACK_CACHE;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    if (parent != FUSE_ROOT_ID || strcmp(name, VOLUME_NAME) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.ino = VOLUME_INO;
    e.generation = 1;
    e.attr_timeout = ATTR_TIMEOUT;
    e.entry_timeout = ATTR_TIMEOUT;
    fill_attr(session_of(req), VOLUME_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    if (ino != FUSE_ROOT_ID && ino != VOLUME_INO) { fuse_reply_err(req, ENOENT); return; }
    struct stat st;
    fill_attr(session_of(req), ino, &st);
    fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

// The file's size is the volume's: truncating it to another size is refused. Owner, mode and
// times are fixed too; a request that changes only those is answered with the fixed attributes
// (touch, cp -p and the like do not fail).
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
    (void)fi;
    struct cfuse_session *s = session_of(req);
    if (ino != FUSE_ROOT_ID && ino != VOLUME_INO) { fuse_reply_err(req, ENOENT); return; }
    if (to_set & FUSE_SET_ATTR_SIZE) {
        if (ino != VOLUME_INO || (uint64_t)attr->st_size != s->size) { fuse_reply_err(req, EPERM); return; }
    }
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) { fuse_reply_err(req, EPERM); return; }
    struct stat st;
    fill_attr(s, ino, &st);
    fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    if (ino != VOLUME_INO) { fuse_reply_err(req, EISDIR); return; }
    if (fi->flags & O_TRUNC) {
        // O_TRUNC on a fixed-size volume would mean "erase it": refuse rather than pretend.
        fuse_reply_err(req, EPERM);
        return;
    }
    // libfuse 3.14's fuse_file_info cannot say FOPEN_PARALLEL_DIRECT_WRITES (kernel >= 6.2):
    // without it the kernel holds the inode lock across every direct write, so the loop
    // device's writes reach us one at a time. The open reply is just a fuse_open_out, so it is
    // built here and sent as is (what fuse_reply_open would send, plus that flag).
    //   FOPEN_DIRECT_IO: no page cache between the loop device and the replicas.
    //   FOPEN_PARALLEL_DIRECT_WRITES: concurrent direct writes to the file (the engine orders
    //   nothing by arrival; partial-block read-modify-write takes its own lock).
    struct fuse_open_out out;
    memset(&out, 0, sizeof out);
    out.fh = fi->fh;
    out.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
    fuse_reply_buf(req, (const char *)&out, sizeof out);
}

// Asynchronous reads (docs/engine.md, "Asynchronous reads"). A worker that takes a read of
// whole blocks asks the engine for a plan (which file range holds them), queues it, wakes the
// ring's thread if it sleeps, and goes back to /dev/fuse. The ring's thread is the ring's only
// submitter (IORING_SETUP_SINGLE_ISSUER): it submits every read queued by then in one
// io_uring_enter (one plug of the block layer, one doorbell), and the kernel completes them in
// that same thread, which hands each back to the engine (which checks it) and answers the
// kernel. It sleeps in the ring itself, on a read of an eventfd the workers write to.
#define RING_ENTRIES 256
// Reads in flight at most (queued or submitted); more go synchronously. The kernel keeps at
// most max_background (128) asynchronous requests outstanding, plus the workers' own.
#define RING_MAX_INFLIGHT 224
// Finished reads kept for reuse (each with a buffer of CFUSE_ASYNC_READ_MAX_BLOCKS blocks).
#define RING_KEEP 64
#define RING_BUFFER ((size_t)CFUSE_ASYNC_READ_MAX_BLOCKS * 4096)
// The user_data of the ring's own read of its eventfd.
#define RING_WAKE ((void *)1)

struct ring_read {
    cfuse_read_plan plan;
    uint32_t crc[CFUSE_ASYNC_READ_MAX_BLOCKS];
    fuse_req_t req;
    uint64_t offset;
    size_t size;
    void *buf;
    struct ring_read *next;
};

struct read_ring {
    struct io_uring ring;
    struct cfuse_session *s;
    int wake_fd;
    uint64_t wake_value;
    pthread_mutex_t lock;
    // Under `lock`: queued reads not yet submitted, whether the ring's thread is (about to be)
    // asleep, kept reads, reads in flight, and whether the session is ending.
    struct ring_read *queued, *queued_tail;
    int sleeping;
    struct ring_read *kept;
    int kept_count;
    int inflight;
    int stopping;
    // Whether a worker reads a planned read itself when it is the only one in flight (atomic;
    // on unless the engine turns it off).
    int inline_alone;
    pthread_t thread;
    // Reads to do again the ordinary way (`read_again`), on a thread of their own, started at
    // the first: it may wait for the replica's locks, and a replica closing a file holds its
    // lock until every planned read has ended — which this ring's thread does. Under `lock`.
    struct ring_read *redo, *redo_tail;
    pthread_cond_t redo_ready;
    pthread_t redo_thread;
    int redo_started;
    int redo_stopping;
    // Start-up: the thread sets up the ring (a single issuer's ring belongs to its creator) and
    // posts `started` with `start_error` (0 or -errno).
    sem_t started;
    int start_error;
};

// A read slot, counted in `inflight` until ring_give. `alone`: it is the only read in flight
// (nothing queued, submitted or being redone, so the ring's thread is asleep or about to be)
// and the engine lets a worker read such a read itself.
static struct ring_read *ring_take(struct read_ring *r, int *alone) {
    pthread_mutex_lock(&r->lock);
    if (r->inflight >= RING_MAX_INFLIGHT) { pthread_mutex_unlock(&r->lock); return NULL; }
    struct ring_read *rd = r->kept;
    if (rd) { r->kept = rd->next; r->kept_count--; }
    r->inflight++;
    *alone = r->inflight == 1 && !r->stopping && __atomic_load_n(&r->inline_alone, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&r->lock);
    if (!rd) {
        rd = calloc(1, sizeof *rd);
        if (rd && posix_memalign(&rd->buf, 4096, RING_BUFFER) != 0) { free(rd); rd = NULL; }
        if (!rd) {
            pthread_mutex_lock(&r->lock);
            r->inflight--;
            pthread_mutex_unlock(&r->lock);
            return NULL;
        }
    }
    memset(&rd->plan, 0, sizeof rd->plan);
    rd->plan.fd = -1;
    rd->plan.crc = rd->crc;
    rd->next = NULL;
    return rd;
}

static void ring_wake(struct read_ring *r) {
    uint64_t one = 1;
    while (write(r->wake_fd, &one, sizeof one) < 0 && errno == EINTR) {}
}

static void ring_give(struct read_ring *r, struct ring_read *rd) {
    pthread_mutex_lock(&r->lock);
    r->inflight--;
    // The last read of an ending session (one redone on the redo thread): the ring's thread
    // may be asleep waiting for it.
    int last = r->stopping && r->inflight == 0;
    if (r->kept_count < RING_KEEP) {
        rd->next = r->kept;
        r->kept = rd;
        r->kept_count++;
        rd = NULL;
    }
    pthread_mutex_unlock(&r->lock);
    if (rd) { free(rd->buf); free(rd); }
    if (last) ring_wake(r);
}

// Queues a planned read for the ring's thread.
static void ring_queue(struct read_ring *r, struct ring_read *rd) {
    pthread_mutex_lock(&r->lock);
    if (r->queued_tail) r->queued_tail->next = rd; else r->queued = rd;
    r->queued_tail = rd;
    int wake = r->sleeping;
    r->sleeping = 0;
    pthread_mutex_unlock(&r->lock);
    if (wake) ring_wake(r);
}

static void *redo_thread(void *arg) {
    struct read_ring *r = arg;
    struct cfuse_session *s = r->s;
    pthread_setname_np(pthread_self(), "cairn-fuse-redo");
    prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
    pthread_mutex_lock(&r->lock);
    for (;;) {
        while (!r->redo && !r->redo_stopping) pthread_cond_wait(&r->redo_ready, &r->lock);
        struct ring_read *rd = r->redo;
        if (!rd) break;
        r->redo = rd->next;
        if (!r->redo) r->redo_tail = NULL;
        pthread_mutex_unlock(&r->lock);
        ssize_t n = s->callbacks.read_again(s->context, rd->offset, rd->size, rd->buf, &rd->plan);
        if (n < 0) fuse_reply_err(rd->req, (int)-n);
        else fuse_reply_buf(rd->req, rd->buf, (size_t)n);
        ring_give(r, rd);
        pthread_mutex_lock(&r->lock);
    }
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

// Hands a read to the redo thread (started at the first). 0, or an errno when the thread
// cannot be started.
static int ring_redo(struct read_ring *r, struct ring_read *rd) {
    int rc = 0;
    pthread_mutex_lock(&r->lock);
    if (!r->redo_started) {
        rc = pthread_create(&r->redo_thread, NULL, redo_thread, r);
        if (rc == 0) r->redo_started = 1;
    }
    if (rc == 0) {
        rd->next = NULL;
        if (r->redo_tail) r->redo_tail->next = rd; else r->redo = rd;
        r->redo_tail = rd;
        pthread_cond_signal(&r->redo_ready);
    }
    pthread_mutex_unlock(&r->lock);
    return rc;
}

static void ring_finish(struct read_ring *r, struct ring_read *rd, ssize_t result) {
    struct cfuse_session *s = r->s;
    ssize_t n = s->callbacks.read_end(s->context, rd->offset, rd->size, rd->buf, result, &rd->plan);
    if (n == CFUSE_READ_AGAIN) {
        int rc = ring_redo(r, rd);
        if (rc == 0) return;
        // No thread for it: done here (it may wait for the replica's lock).
        static int logged;
        if (!__atomic_exchange_n(&logged, 1, __ATOMIC_RELAXED))
            fprintf(stderr, "cairn fuse: cannot start the redo thread (%s); redoing reads on the ring's thread\n", strerror(rc));
        n = s->callbacks.read_again(s->context, rd->offset, rd->size, rd->buf, &rd->plan);
    }
    if (n < 0) fuse_reply_err(rd->req, (int)-n);
    else fuse_reply_buf(rd->req, rd->buf, (size_t)n);
    ring_give(r, rd);
}

static struct io_uring_sqe *ring_sqe(struct read_ring *r) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    // Full (never, with RING_MAX_INFLIGHT below RING_ENTRIES): submit what is there first.
    while (!sqe) { io_uring_submit(&r->ring); sqe = io_uring_get_sqe(&r->ring); }
    return sqe;
}

static void ring_arm_wake(struct read_ring *r) {
    struct io_uring_sqe *sqe = ring_sqe(r);
    io_uring_prep_read(sqe, r->wake_fd, &r->wake_value, sizeof r->wake_value, 0);
    io_uring_sqe_set_data(sqe, RING_WAKE);
}

// Takes the queued reads into the submission queue; 1 if there were any. With `sleep`, marks
// the thread as about to sleep when there were none (a worker then wakes it).
static int ring_take_queued(struct read_ring *r, int sleep, int *done) {
    pthread_mutex_lock(&r->lock);
    struct ring_read *batch = r->queued;
    r->queued = r->queued_tail = NULL;
    if (!batch && done) *done = r->stopping && r->inflight == 0;
    // About to sleep only when nothing was queued; with reads to submit it is awake.
    if (sleep) r->sleeping = !batch;
    pthread_mutex_unlock(&r->lock);
    for (struct ring_read *rd = batch; rd; rd = rd->next) {
        struct io_uring_sqe *sqe = ring_sqe(r);
        io_uring_prep_read(sqe, rd->plan.fd, rd->buf, (unsigned)rd->size, rd->plan.file_offset);
        io_uring_sqe_set_data(sqe, rd);
    }
    return batch != NULL;
}

static void ring_submit_failed(int rc) {
    // EAGAIN/EBUSY (short of memory, completions not yet taken): the reads stay in the
    // submission queue for the next round.
    static int logged;
    if (!__atomic_exchange_n(&logged, 1, __ATOMIC_RELAXED))
        fprintf(stderr, "cairn fuse: io_uring submission failed (%s); retrying\n", strerror(-rc));
    usleep(100);
}

// The ring's thread: sets the ring up, then submits what the workers queue and answers what
// completes, until the session ends and nothing is in flight. Reads queued while it answers
// completions are submitted between two answers, not after the last: the device is kept busy
// while the answers go out, instead of every read moving through it in one convoy.
static void *ring_thread(void *arg) {
    struct read_ring *r = arg;
    pthread_setname_np(pthread_self(), "cairn-fuse-io");
    // A FUSE daemon's thread under its own volume: its allocations must not wait for writeback.
    prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
    // What older kernels refuse (EINVAL) is dropped in turn: deferred task running (6.1),
    // then single issuer (6.0); this thread is the only issuer either way.
    static const unsigned setups[] = {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
                                      IORING_SETUP_SINGLE_ISSUER, 0};
    int rc = -EINVAL;
    for (size_t i = 0; i < sizeof setups / sizeof setups[0] && rc == -EINVAL; i++) {
        struct io_uring_params params;
        memset(&params, 0, sizeof params);
        params.flags = setups[i];
        rc = io_uring_queue_init_params(RING_ENTRIES, &r->ring, &params);
    }
    r->start_error = rc < 0 ? rc : 0;
    sem_post(&r->started);
    if (rc < 0) return NULL;
    ring_arm_wake(r);
    for (;;) {
        int done = 0;
        int some = ring_take_queued(r, 1, &done);
        if (done) break;
        // With reads to submit: submit them and take what has completed, without waiting.
        // Without: wait for a completion or a worker's wake-up.
        rc = some ? io_uring_submit_and_get_events(&r->ring) : io_uring_submit_and_wait(&r->ring, 1);
        if (rc < 0 && rc != -EINTR && rc != -ETIME) ring_submit_failed(rc);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        int rearm = 0;
        io_uring_for_each_cqe(&r->ring, head, cqe) {
            void *data = io_uring_cqe_get_data(cqe);
            ssize_t res = cqe->res;
            seen++;
            if (data == RING_WAKE) { rearm = 1; continue; }
            ring_finish(r, data, res);
            if (__atomic_load_n(&r->queued, __ATOMIC_RELAXED) && ring_take_queued(r, 0, NULL)) {
                rc = io_uring_submit(&r->ring);
                if (rc < 0 && rc != -EINTR) ring_submit_failed(rc);
            }
        }
        io_uring_cq_advance(&r->ring, seen);
        if (rearm) ring_arm_wake(r);
    }
    io_uring_queue_exit(&r->ring);
    return NULL;
}

// Starts the session's ring, or says in ring_reason why reads stay synchronous.
static void ring_start(struct cfuse_session *s) {
    if (!s->callbacks.read_begin || !s->callbacks.read_end || !s->callbacks.read_again) {
        snprintf(s->ring_reason, sizeof s->ring_reason, "turned off (the engine reads synchronously)");
        return;
    }
    struct read_ring *r = calloc(1, sizeof *r);
    if (!r) { snprintf(s->ring_reason, sizeof s->ring_reason, "out of memory"); return; }
    r->inline_alone = 1;
    r->s = s;
    r->wake_fd = eventfd(0, EFD_CLOEXEC);
    if (r->wake_fd < 0) {
        snprintf(s->ring_reason, sizeof s->ring_reason, "cannot create an eventfd: %s", strerror(errno));
        free(r);
        return;
    }
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->redo_ready, NULL);
    sem_init(&r->started, 0, 0);
    int rc = pthread_create(&r->thread, NULL, ring_thread, r);
    if (rc == 0) {
        while (sem_wait(&r->started) != 0 && errno == EINTR) {}
        if (r->start_error == 0) { s->ring = r; return; }
        pthread_join(r->thread, NULL);
        snprintf(s->ring_reason, sizeof s->ring_reason,
                 "the kernel refused an io_uring (%s; kernel.io_uring_disabled, or a seccomp profile?)", strerror(-r->start_error));
    } else {
        snprintf(s->ring_reason, sizeof s->ring_reason, "cannot start the ring's thread: %s", strerror(rc));
    }
    sem_destroy(&r->started);
    pthread_cond_destroy(&r->redo_ready);
    pthread_mutex_destroy(&r->lock);
    close(r->wake_fd);
    free(r);
}

// After every worker has ended (nobody queues any more): lets every read in flight finish and
// be answered, then frees the ring.
static void ring_stop(struct cfuse_session *s) {
    struct read_ring *r = s->ring;
    if (!r) return;
    pthread_mutex_lock(&r->lock);
    r->stopping = 1;
    pthread_mutex_unlock(&r->lock);
    ring_wake(r);
    // It ends once every read is answered, those on the redo thread included.
    pthread_join(r->thread, NULL);
    pthread_mutex_lock(&r->lock);
    r->redo_stopping = 1;
    pthread_cond_signal(&r->redo_ready);
    int redo = r->redo_started;
    pthread_mutex_unlock(&r->lock);
    if (redo) pthread_join(r->redo_thread, NULL);
    while (r->kept) { struct ring_read *rd = r->kept; r->kept = rd->next; free(rd->buf); free(rd); }
    sem_destroy(&r->started);
    pthread_cond_destroy(&r->redo_ready);
    pthread_mutex_destroy(&r->lock);
    close(r->wake_fd);
    free(r);
    s->ring = NULL;
}

void cfuse_set_inline_reads(cfuse_session *s, int on) {
    if (s && s->ring) __atomic_store_n(&s->ring->inline_alone, on ? 1 : 0, __ATOMIC_RELAXED);
}

int cfuse_async_reads(const cfuse_session *s, char *reason, size_t reason_size) {
    if (!s) return 0;
    if (s->ring) return 1;
    if (reason && reason_size) snprintf(reason, reason_size, "%s", s->ring_reason);
    return 0;
}

// A read of whole blocks through the ring, if the engine plans one. 1 if answered or handed on.
static int read_async(struct cfuse_session *s, fuse_req_t req, uint64_t offset, size_t size) {
    struct read_ring *r = s->ring;
    if (!r || offset % 4096 != 0 || size % 4096 != 0 || size > RING_BUFFER) return 0;
    int alone = 0;
    struct ring_read *rd = ring_take(r, &alone);
    if (!rd) return 0;
    rd->req = req;
    rd->offset = offset;
    rd->size = size;
    ssize_t n = s->callbacks.read_begin(s->context, offset, size, rd->buf, &rd->plan);
    if (n == CFUSE_READ_PLANNED) {
        if (alone) {
            // The only read in flight when it took its slot: handing it to the ring's thread
            // would add a wake-up (about a tenth of a read at queue depth 1) for no batch to
            // share; read it here. It stays counted in `inflight`, so reads that come meanwhile
            // go to the ring.
            ssize_t got = pread(rd->plan.fd, rd->buf, rd->size, (off_t)rd->plan.file_offset);
            if (got < 0) got = -errno;
            rd->plan.inline_read = 1;
            ring_finish(r, rd, got);
            return 1;
        }
        ring_queue(r, rd);
        return 1;
    }
    if (n < 0) fuse_reply_err(req, (int)-n);
    else fuse_reply_buf(req, rd->buf, (size_t)n);
    ring_give(r, rd);
    return 1;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    struct cfuse_session *s = session_of(req);
    if (ino != VOLUME_INO) { fuse_reply_err(req, EISDIR); return; }
    if (off < 0) { fuse_reply_err(req, EINVAL); return; }
    uint64_t offset = (uint64_t)off;
    if (offset >= s->size || size == 0) { fuse_reply_buf(req, NULL, 0); return; }
    if (size > s->size - offset) size = (size_t)(s->size - offset);
    if (read_async(s, req, offset, size)) return;
    void *buf = worker_read_buffer, *own = NULL;
    if (!buf || size > CFUSE_MAX_WRITE) {
        if (posix_memalign(&own, 4096, size) != 0) { fuse_reply_err(req, ENOMEM); return; }
        buf = own;
    }
    ssize_t n = s->callbacks.read(s->context, offset, size, buf);
    if (n < 0) fuse_reply_err(req, (int)-n);
    else fuse_reply_buf(req, buf, (size_t)n);
    free(own);
}

struct cfuse_deferred_write {
    fuse_req_t req;
    size_t size;
    struct worker_pool *pool;
};

// The write whose callback runs on this thread and has not deferred its answer (NULL outside
// a write callback, and once `cfuse_defer_write` took it).
static __thread struct cfuse_deferred_write *current_write;

cfuse_deferred_write *cfuse_defer_write(void) {
    struct cfuse_deferred_write *w = current_write;
    if (!w) return NULL;
    struct cfuse_deferred_write *copy = malloc(sizeof *copy);
    if (!copy) return NULL;
    *copy = *w;
    pthread_mutex_lock(&w->pool->lock);
    w->pool->deferred++;
    pthread_mutex_unlock(&w->pool->lock);
    current_write = NULL;
    return copy;
}

void cfuse_answer_write(cfuse_deferred_write *w, int result) {
    if (!w) return;
    if (result < 0) fuse_reply_err(w->req, -result);
    else fuse_reply_write(w->req, w->size);
    struct worker_pool *pool = w->pool;
    free(w);
    pthread_mutex_lock(&pool->lock);
    if (--pool->deferred == 0) pthread_cond_broadcast(&pool->answered);
    pthread_mutex_unlock(&pool->lock);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    struct cfuse_session *s = session_of(req);
    if (ino != VOLUME_INO) { fuse_reply_err(req, EISDIR); return; }
    if (off < 0) { fuse_reply_err(req, EINVAL); return; }
    uint64_t offset = (uint64_t)off;
    if (size == 0) { fuse_reply_write(req, 0); return; }
    if (offset >= s->size || size > s->size - offset) { fuse_reply_err(req, ENOSPC); return; }
    struct cfuse_deferred_write me = {req, size, &s->pool};
    current_write = &me;
    int r = s->callbacks.write(s->context, offset, buf, size);
    // Taken by the callback (cfuse_defer_write cleared it): answered by cfuse_answer_write.
    int deferred = current_write == NULL;
    current_write = NULL;
    if (deferred) return;
    if (r < 0) { fuse_reply_err(req, -r); return; }
    fuse_reply_write(req, size);
}

static void reply_flush(fuse_req_t req, fuse_ino_t ino) {
    struct cfuse_session *s = session_of(req);
    if (ino != VOLUME_INO) { fuse_reply_err(req, 0); return; }
    int r = s->callbacks.flush(s->context);
    fuse_reply_err(req, r < 0 ? -r : 0);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    reply_flush(req, ino);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
    (void)datasync; (void)fi;
    reply_flush(req, ino);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    if (ino != FUSE_ROOT_ID) { fuse_reply_err(req, ENOTDIR); return; }
    fuse_reply_open(req, fi);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)fi;
    if (ino != FUSE_ROOT_ID) { fuse_reply_err(req, ENOTDIR); return; }
    static const struct { const char *name; fuse_ino_t ino; mode_t mode; } entries[] = {
        {".", FUSE_ROOT_ID, S_IFDIR}, {"..", FUSE_ROOT_ID, S_IFDIR}, {VOLUME_NAME, VOLUME_INO, S_IFREG},
    };
    char buf[512];
    size_t used = 0;
    if (size > sizeof buf) size = sizeof buf;
    for (off_t i = off; i < 3; i++) {
        struct stat st;
        memset(&st, 0, sizeof st);
        st.st_ino = entries[i].ino;
        st.st_mode = entries[i].mode;
        size_t need = fuse_add_direntry(req, buf + used, size - used, entries[i].name, &st, i + 1);
        if (need > size - used) break;
        used += need;
    }
    fuse_reply_buf(req, buf, used);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
    (void)ino;
    struct cfuse_session *s = session_of(req);
    struct statvfs sv;
    memset(&sv, 0, sizeof sv);
    sv.f_bsize = 4096;
    sv.f_frsize = 4096;
    sv.f_blocks = s->size / 4096;
    sv.f_files = 2;
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
}

// The loop device turns discard into PUNCH_HOLE and write-zeroes into ZERO_RANGE (or
// PUNCH_HOLE); both read back as zeros, which is what a trim gives. Plain preallocation
// is meaningless for replicas that allocate on write: refused, so nobody counts on it.
static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t length, struct fuse_file_info *fi) {
    (void)fi;
    struct cfuse_session *s = session_of(req);
    if (ino != VOLUME_INO) { fuse_reply_err(req, EISDIR); return; }
    int zeroing = mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE);
    if (!zeroing || (mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    if (off < 0 || length <= 0) { fuse_reply_err(req, EINVAL); return; }
    uint64_t offset = (uint64_t)off, len = (uint64_t)length;
    if (offset >= s->size) { fuse_reply_err(req, 0); return; }
    if (len > s->size - offset) len = s->size - offset;
    int r = s->callbacks.trim(s->context, offset, len);
    fuse_reply_err(req, r < 0 ? -r : 0);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .fsync = op_fsync,
    .release = op_release,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .statfs = op_statfs,
    .fallocate = op_fallocate,
};

// The session's workers: up to CFUSE_MAX_THREADS threads, each reading requests from
// /dev/fuse into a buffer of its own and running them (fuse_session_receive_buf +
// fuse_session_process_buf, the loop libfuse documents for an event loop of one's own).
// libfuse's fuse_session_loop_mt does the same with buffers from malloc, where a write's data
// lands 80 bytes past the start: not 4 KiB-aligned, so the engine had to copy every write
// before an O_DIRECT write of it. Here the buffer is placed so that a write's data (after the
// fuse_in_header and fuse_write_in) starts on a page: the engine writes the local replica from
// it and sends it to the others as it is. libfuse 3.14 reads at most its bufsize
// (FUSE_MAX_MAX_PAGES = 256 pages + one page of header, 1 MiB + 4 KiB) into a buffer it is
// given; WORKER_BUFFER leaves room for twice that.
//
// Workers are started as load needs them, as libfuse's loop does: one at first, and another
// whenever a worker takes a request while none is left waiting for the next, up to the limit.
// Once started a worker stays (an idle volume keeps the few it ever needed: a node with many
// staged volumes does not hold 32 threads for each).
#define WORKER_BUFFER ((size_t)(2u << 20) + 8192)
#define WORKER_AREA (WORKER_BUFFER + CFUSE_MAX_WRITE)
#define WRITE_HEADER (sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in))

// Idle trim (docs/engine.md, "Idle volumes give their buffers back"). A volume that served
// large requests keeps every worker's buffers resident as far as they were touched — tens of
// MiB per volume, for as long as it stays staged. Once no request has come for the idle time,
// the loop thread drops the ring's kept buffers and wakes every worker with a signal; a worker
// drops its own buffers (MADV_DONTNEED) before it reads the next request. The signal is
// unblocked only while a worker waits in /dev/fuse, where it ends the read with EINTR and
// nothing else: a worker running a request (its system calls, the engine's) never sees it, and
// one that gets it late drops its buffers between two requests all the same.
static int trim_signal;
static char trim_signal_reason[128];
static pthread_once_t trim_signal_once = PTHREAD_ONCE_INIT;

static void trim_signal_handler(int sig) { (void)sig; }

static void trim_signal_init(void) {
    for (int sig = SIGRTMIN + 6; sig <= SIGRTMAX - 2; sig++) {
        struct sigaction old;
        if (sigaction(sig, NULL, &old) != 0) continue;
        if ((old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = trim_signal_handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0; // no SA_RESTART: the worker's read of /dev/fuse must end with EINTR
        if (sigaction(sig, &sa, NULL) == 0) { trim_signal = sig; return; }
    }
    snprintf(trim_signal_reason, sizeof trim_signal_reason,
             "every real-time signal from SIGRTMIN+6 has a handler already");
}

int cfuse_idle_trim_signal(char *reason, size_t reason_size) {
    pthread_once(&trim_signal_once, trim_signal_init);
    if (!trim_signal && reason && reason_size) snprintf(reason, reason_size, "%s", trim_signal_reason);
    return trim_signal;
}

// Resident bytes of [p, p+size) (page-aligned), by mincore.
static uint64_t resident_bytes(const void *p, size_t size) {
    size_t pages = size / 4096;
    unsigned char vec[1024];
    uint64_t total = 0;
    for (size_t done = 0; done < pages; ) {
        size_t n = pages - done < sizeof vec ? pages - done : sizeof vec;
        if (mincore((char *)p + done * 4096, n * 4096, vec) != 0) return total;
        for (size_t i = 0; i < n; i++) if (vec[i] & 1) total += 4096;
        done += n;
    }
    return total;
}

static void note_released(struct cfuse_session *s, uint64_t bytes) {
    if (bytes == 0) return;
    __atomic_add_fetch(&s->released, bytes, __ATOMIC_RELAXED);
    if (s->callbacks.buffers_released) s->callbacks.buffers_released(s->context, bytes);
}

// On the worker's own thread, between two requests: nothing in its buffers is in use.
static void worker_trim(struct worker_slot *slot) {
    uint64_t resident = resident_bytes(slot->area, WORKER_AREA);
    if (resident == 0) return;
    if (madvise(slot->area, WORKER_AREA, MADV_DONTNEED) != 0) return;
    note_released(slot->pool->s, resident);
}

// The resident bytes of the ring's kept buffers; with `drop`, dropped (none of them is in use:
// a read takes one under the lock) and the bytes given back.
static uint64_t ring_kept(struct read_ring *r, int drop) {
    if (!r) return 0;
    uint64_t total = 0;
    pthread_mutex_lock(&r->lock);
    for (struct ring_read *rd = r->kept; rd; rd = rd->next) {
        uint64_t resident = resident_bytes(rd->buf, RING_BUFFER);
        if (resident && (!drop || madvise(rd->buf, RING_BUFFER, MADV_DONTNEED) == 0)) total += resident;
    }
    pthread_mutex_unlock(&r->lock);
    return total;
}

void cfuse_set_idle_trim(cfuse_session *s, unsigned milliseconds) {
    if (s) __atomic_store_n(&s->idle_trim_ms, milliseconds, __ATOMIC_RELAXED);
}

void cfuse_buffer_stats(cfuse_session *s, uint64_t *trims, uint64_t *released, uint64_t *resident) {
    if (!s) return;
    if (trims) *trims = __atomic_load_n(&s->trims, __ATOMIC_RELAXED);
    if (released) *released = __atomic_load_n(&s->released, __ATOMIC_RELAXED);
    if (!resident) return;
    uint64_t total = 0;
    pthread_mutex_lock(&s->pool.lock);
    for (int i = 0; i < s->pool.started; i++)
        if (s->pool.slots[i].area) total += resident_bytes(s->pool.slots[i].area, WORKER_AREA);
    pthread_mutex_unlock(&s->pool.lock);
    *resident = total + ring_kept(s->ring, 0);
}

static void *worker_thread(void *arg);

// Starts one more worker unless the limit is reached or the loop is ending. 0 or an errno.
static int start_worker(struct worker_pool *pool) {
    int rc = 0;
    pthread_mutex_lock(&pool->lock);
    if (!pool->ending && pool->started < CFUSE_MAX_THREADS) {
        struct worker_slot *slot = &pool->slots[pool->started];
        slot->pool = pool;
        slot->area = NULL;
        rc = pthread_create(&slot->thread, NULL, worker_thread, slot);
        if (rc == 0) pool->started++;
    }
    pthread_mutex_unlock(&pool->lock);
    return rc;
}

static void worker_unmap(void *p) {
    struct worker_slot *slot = p;
    pthread_mutex_lock(&slot->pool->lock);
    char *area = slot->area;
    slot->area = NULL;
    pthread_mutex_unlock(&slot->pool->lock);
    worker_read_buffer = NULL;
    if (area) munmap(area, WORKER_AREA);
}

static void *worker_thread(void *arg) {
    struct worker_slot *slot = arg;
    struct worker_pool *pool = slot->pool;
    struct fuse_session *se = pool->s->se;
    // Named for top -H, perf and gdb: the threads that run the volume's I/O callbacks.
    pthread_setname_np(pthread_self(), "cairn-fuse");
    // A FUSE daemon under its own volume: memory allocations here must never wait for
    // writeback to the volume (its loop device and filesystem), which waits for this thread.
    prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
    // Cancellation (by the loop, once another worker ended) only while waiting for a request,
    // never in the middle of one.
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
    // The idle trim's signal, blocked except while waiting for a request.
    sigset_t trim_set;
    sigemptyset(&trim_set);
    int sig = cfuse_idle_trim_signal(NULL, 0);
    if (sig) {
        sigaddset(&trim_set, sig);
        pthread_sigmask(SIG_BLOCK, &trim_set, NULL);
    }
    char *area = mmap(NULL, WORKER_AREA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) {
        fprintf(stderr, "cairn fuse: cannot allocate a worker's request buffer: %s\n", strerror(errno));
        fuse_session_exit(se);
        sem_post(&pool->finished);
        return NULL;
    }
    pthread_mutex_lock(&pool->lock);
    slot->area = area;
    pthread_mutex_unlock(&pool->lock);
    worker_read_buffer = area + WORKER_BUFFER;
    pthread_cleanup_push(worker_unmap, slot);
    char *mem = area + 4096 - WRITE_HEADER;
    unsigned trimmed = __atomic_load_n(&pool->trim_gen, __ATOMIC_RELAXED);
    while (!fuse_session_exited(se)) {
        unsigned gen = __atomic_load_n(&pool->trim_gen, __ATOMIC_RELAXED);
        if (gen != trimmed) { trimmed = gen; worker_trim(slot); }
        struct fuse_buf fbuf;
        memset(&fbuf, 0, sizeof fbuf);
        fbuf.mem = mem;
        fbuf.fd = -1;
        __atomic_add_fetch(&pool->idle, 1, __ATOMIC_SEQ_CST);
        pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, NULL);
        if (sig) pthread_sigmask(SIG_UNBLOCK, &trim_set, NULL);
        int res = fuse_session_receive_buf(se, &fbuf);
        if (sig) pthread_sigmask(SIG_BLOCK, &trim_set, NULL);
        pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
        int waiting = __atomic_sub_fetch(&pool->idle, 1, __ATOMIC_SEQ_CST);
        if (res == -EINTR || res == -EAGAIN) continue;
        if (res <= 0) {
            // 0: the connection ended (unmounted or aborted); < 0: a read error.
            if (res < 0) fprintf(stderr, "cairn fuse: reading /dev/fuse failed: %s\n", strerror(-res));
            fuse_session_exit(se);
            break;
        }
        __atomic_add_fetch(&pool->received, 1, __ATOMIC_RELAXED);
        // Nobody left waiting for the next request: one more worker (a failure to start one
        // only leaves fewer in flight).
        if (waiting == 0) {
            int rc = start_worker(pool);
            if (rc != 0) fprintf(stderr, "cairn fuse: cannot start another worker thread: %s\n", strerror(rc));
        }
        // libfuse replaces fbuf.mem only when it had to allocate one (never: it was given).
        fuse_session_process_buf(se, &fbuf);
    }
    pthread_cleanup_pop(1);
    sem_post(&pool->finished);
    return NULL;
}

static uint64_t monotonic_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

// One idle trim: the ring's kept buffers here, every worker's by itself (woken by the signal).
static void trim_now(struct cfuse_session *s) {
    struct worker_pool *pool = &s->pool;
    __atomic_add_fetch(&s->trims, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&pool->trim_gen, 1, __ATOMIC_SEQ_CST);
    int sig = cfuse_idle_trim_signal(NULL, 0);
    pthread_mutex_lock(&pool->lock);
    if (sig && !pool->ending)
        for (int i = 0; i < pool->started; i++) pthread_kill(pool->slots[i].thread, sig);
    pthread_mutex_unlock(&pool->lock);
    note_released(s, ring_kept(s->ring, 1));
}

static void *loop_thread(void *arg) {
    struct cfuse_session *s = arg;
    struct worker_pool *pool = &s->pool;
    ring_start(s);
    int rc = start_worker(pool);
    if (rc != 0) {
        fprintf(stderr, "cairn fuse: cannot start a worker thread: %s\n", strerror(rc));
        fuse_session_exit(s->se);
    } else {
        // Every worker ends once the connection ends (each read then fails). When one ends
        // for another reason, the rest would serve on alone: as libfuse's loop does, the first
        // to end ends them all (those waiting for a request are cancelled; one running a
        // request finishes it first). Meanwhile this thread watches for an idle spell.
        uint64_t seen = 0, trimmed_at = 0, changed = monotonic_ns();
        for (;;) {
            unsigned idle_ms = __atomic_load_n(&s->idle_trim_ms, __ATOMIC_RELAXED);
            unsigned tick_ms = idle_ms == 0 ? 1000 : idle_ms / 4 < 5 ? 5 : idle_ms / 4 > 1000 ? 1000 : idle_ms / 4;
            struct timespec deadline;
            clock_gettime(CLOCK_REALTIME, &deadline);
            deadline.tv_nsec += (long)tick_ms * 1000000L;
            deadline.tv_sec += deadline.tv_nsec / 1000000000L;
            deadline.tv_nsec %= 1000000000L;
            if (sem_timedwait(&pool->finished, &deadline) == 0) break;
            if (errno != ETIMEDOUT && errno != EINTR) {
                while (sem_wait(&pool->finished) != 0 && errno == EINTR) {}
                break;
            }
            uint64_t received = __atomic_load_n(&pool->received, __ATOMIC_RELAXED);
            uint64_t now = monotonic_ns();
            if (received != seen) {
                seen = received;
                changed = now;
            } else if (idle_ms != 0 && received != trimmed_at && now - changed >= (uint64_t)idle_ms * 1000000u) {
                trim_now(s);
                trimmed_at = received;
            }
        }
        fuse_session_exit(s->se);
    }
    pthread_mutex_lock(&pool->lock);
    pool->ending = 1;
    int started = pool->started;
    pthread_mutex_unlock(&pool->lock);
    for (int i = 0; i < started; i++) pthread_cancel(pool->slots[i].thread);
    for (int i = 0; i < started; i++) pthread_join(pool->slots[i].thread, NULL);
    // Writes the engine answers later are answered before the session goes (no callback, and
    // no answer, after stop).
    pthread_mutex_lock(&pool->lock);
    while (pool->deferred > 0) pthread_cond_wait(&pool->answered, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
    // Reads still on the ring are answered before the session goes (no callback after stop).
    ring_stop(s);
    return NULL;
}

static void set_error(char *error, size_t error_size, const char *format, ...) {
    if (!error || error_size == 0) return;
    va_list ap;
    va_start(ap, format);
    vsnprintf(error, error_size, format, ap);
    va_end(ap);
}

// libfuse logs through fuse_log to stderr by default; the engine reports failures itself.
static void quiet_log(enum fuse_log_level level, const char *fmt, va_list ap) {
    if (level > FUSE_LOG_ERR) return;
    fprintf(stderr, "cairn fuse: ");
    vfprintf(stderr, fmt, ap);
}

// A session over libfuse with Cairn's options, not mounted yet; shared by mount and resume.
static struct cfuse_session *new_cfuse(const char *mountpoint, const char *name, uint64_t size,
                                       const cfuse_callbacks *callbacks, void *context,
                                       char *error, size_t error_size) {
    struct cfuse_session *s = calloc(1, sizeof *s);
    if (!s) { set_error(error, error_size, "out of memory"); return NULL; }
    s->size = size;
    s->callbacks = *callbacks;
    s->context = context;
    s->mountpoint = strdup(mountpoint);
    s->pool.s = s;
    pthread_mutex_init(&s->pool.lock, NULL);
    pthread_cond_init(&s->pool.answered, NULL);
    sem_init(&s->pool.finished, 0, 0);
    char options[512];
    snprintf(options, sizeof options, "default_permissions,fsname=cairn:%s,subtype=cairn", name);
    char *argv[] = {"cairn", "-o", options, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);
    s->se = fuse_session_new(&args, &ops, sizeof ops, s);
    if (!s->se) {
        set_error(error, error_size, "cannot create the FUSE session (is /dev/fuse present? options: %s)", options);
        free(s->mountpoint);
        free(s);
        return NULL;
    }
    return s;
}

cfuse_session *cfuse_mount(const char *mountpoint, const char *name, uint64_t size,
                           const cfuse_callbacks *callbacks, void *context,
                           char *error, size_t error_size) {
    // Dead FUSE mounts at the mount point (a killed process's) are the caller's to detach first
    // (`DeadFUSEMounts`): stat() on one still succeeds, so it cannot be told from here.
    struct stat st;
    if (stat(mountpoint, &st) != 0) {
        if (errno == ENOTCONN) {
            umount2(mountpoint, MNT_DETACH);
        } else {
            set_error(error, error_size, "mount point %s: %s", mountpoint, strerror(errno));
            return NULL;
        }
    }
    fuse_set_log_func(quiet_log);

    struct cfuse_session *s = new_cfuse(mountpoint, name, size, callbacks, context, error, error_size);
    if (!s) return NULL;
    if (fuse_session_mount(s->se, mountpoint) != 0) {
        set_error(error, error_size, "cannot mount FUSE at %s (needs root and /dev/fuse; see the log for libfuse's reason)", mountpoint);
        fuse_session_destroy(s->se);
        free(s->mountpoint);
        free(s);
        return NULL;
    }
    int rc = pthread_create(&s->thread, NULL, loop_thread, s);
    if (rc != 0) {
        set_error(error, error_size, "cannot start the FUSE loop thread: %s", strerror(rc));
        fuse_session_unmount(s->se);
        fuse_session_destroy(s->se);
        free(s->mountpoint);
        free(s);
        return NULL;
    }
    s->thread_started = 1;
    // Served by the loop just started: the root's st_dev names the kernel connection.
    if (stat(mountpoint, &st) == 0) s->connection = minor(st.st_dev);
    return s;
}

unsigned cfuse_connection_id(const cfuse_session *session) { return session ? session->connection : 0; }

// Writes "1" to the connection's abort file: every pending and future request fails with
// ENOTCONN and the workers' reads of /dev/fuse return. When fusectl is not mounted, mounts it
// for the write and unmounts it again, leaving the machine as it was.
void cfuse_abort_connection(unsigned connection) {
    if (connection == 0) return;
    char path[128];
    snprintf(path, sizeof path, "/sys/fs/fuse/connections/%u/abort", connection);
    int mounted_here = 0;
    if (access(path, F_OK) != 0
        && mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, NULL) == 0) mounted_here = 1;
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t ignored = write(fd, "1", 1);
        (void)ignored;
        close(fd);
    }
    if (mounted_here) umount2("/sys/fs/fuse/connections", MNT_DETACH);
}

int cfuse_unmount(cfuse_session *s) {
    if (!s) return 0;
    int aborted = 0;
    fuse_session_exit(s->se);
    // Lazy (MNT_DETACH): the mount leaves the namespace at once; the connection ends when the
    // last user (a loop device) lets go of the file. A resumed session's libfuse never mounted
    // (it was handed the descriptor), so it would not unmount: done here.
    if (s->resumed) umount2(s->mountpoint, MNT_DETACH);
    else fuse_session_unmount(s->se);
    if (s->thread_started) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 2;
        if (pthread_timedjoin_np(s->thread, NULL, &deadline) != 0) {
            // Still in use (a loop device on the file, or a mount detached lazily by someone
            // else): abort the connection so the loop ends and no callback runs after this.
            cfuse_abort_connection(s->connection);
            aborted = 1;
            pthread_join(s->thread, NULL);
        }
    }
    fuse_session_destroy(s->se);
    sem_destroy(&s->pool.finished);
    pthread_mutex_destroy(&s->pool.lock);
    pthread_cond_destroy(&s->pool.answered);
    free(s->mountpoint);
    free(s);
    return aborted;
}

int cfuse_set_size(cfuse_session *s, uint64_t size) {
    if (size < __atomic_load_n(&s->size, __ATOMIC_ACQUIRE)) return -EINVAL;
    __atomic_store_n(&s->size, size, __ATOMIC_RELEASE);
    int r = fuse_lowlevel_notify_inval_inode(s->se, VOLUME_INO, 0, 0);
    // ENOENT: the kernel holds no inode for the file yet (never looked up): nothing is cached.
    return r == -ENOENT ? 0 : r;
}

unsigned cfuse_protocol_minor(const cfuse_session *session) { return session ? session->proto_minor : 0; }

int cfuse_device_fd(const cfuse_session *session) { return session ? fuse_session_fd(session->se) : -1; }

cfuse_session *cfuse_resume(int device_fd, const char *mountpoint, const char *name, uint64_t size,
                            unsigned proto_minor, const cfuse_callbacks *callbacks, void *context,
                            char *error, size_t error_size) {
    fuse_set_log_func(quiet_log);
    if (proto_minor < 40) {
        set_error(error, error_size, "the kernel's FUSE protocol is 7.%u: resending requests in flight needs 7.40 (Linux 6.9)", proto_minor);
        return NULL;
    }
    struct cfuse_session *s = new_cfuse(mountpoint, name, size, callbacks, context, error, error_size);
    if (!s) return NULL;
    s->resumed = 1;
    // libfuse takes a descriptor named /dev/fd/N as already mounted (and closes it on destroy):
    // it gets its own duplicate, the caller keeps `device_fd`.
    int fd = fcntl(device_fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) {
        set_error(error, error_size, "cannot duplicate the kept FUSE descriptor: %s", strerror(errno));
        fuse_session_destroy(s->se); free(s->mountpoint); free(s);
        return NULL;
    }
    char fdpath[64];
    snprintf(fdpath, sizeof fdpath, "/dev/fd/%d", fd);
    if (fuse_session_mount(s->se, fdpath) != 0) {
        set_error(error, error_size, "libfuse refused the kept FUSE descriptor %d", fd);
        close(fd);
        fuse_session_destroy(s->se); free(s->mountpoint); free(s);
        return NULL;
    }
    // The kernel negotiated INIT with the dead daemon and will not send it again; libfuse
    // answers nothing before it has seen one. It is given the INIT the kernel would send (the
    // same protocol minor; FUSE_MAX_PAGES keeps its read buffer at 1 MiB + header, what
    // max_write was negotiated at). Its reply goes to the kernel under unique 1, which names no
    // request (the kernel numbers requests with even uniques): the kernel answers ENOENT, which
    // libfuse ignores as "interrupted".
    struct {
        struct fuse_in_header h;
        struct fuse_init_in in;
    } init;
    memset(&init, 0, sizeof init);
    init.h.len = sizeof init;
    init.h.opcode = FUSE_INIT;
    init.h.unique = 1;
    init.in.major = FUSE_KERNEL_VERSION;
    init.in.minor = proto_minor;
    init.in.max_readahead = 128 * 1024;
    init.in.flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_ATOMIC_O_TRUNC
                  | FUSE_PARALLEL_DIROPS | FUSE_ASYNC_DIO;
    struct fuse_buf buf = {.size = sizeof init, .flags = 0, .mem = &init, .fd = -1, .pos = 0};
    fuse_session_process_buf(s->se, &buf);
    int rc = pthread_create(&s->thread, NULL, loop_thread, s);
    if (rc != 0) {
        set_error(error, error_size, "cannot start the FUSE loop thread: %s", strerror(rc));
        fuse_session_destroy(s->se); free(s->mountpoint); free(s);
        return NULL;
    }
    s->thread_started = 1;
    struct stat st;
    if (stat(mountpoint, &st) == 0) s->connection = minor(st.st_dev);
    return s;
}

int cfuse_resend(cfuse_session *s) {
    if (!s) return -EINVAL;
    // FUSE_NOTIFY_RESEND (7.40): every request the kernel had handed to a reader and not seen
    // answered goes back to the pending queue, to be read again (unique | FUSE_UNIQUE_RESEND).
    struct fuse_out_header out = {.len = sizeof out, .error = 7 /* FUSE_NOTIFY_RESEND */, .unique = 0};
    ssize_t n = write(fuse_session_fd(s->se), &out, sizeof out);
    if (n < 0) return -errno;
    return 0;
}

// SCM_RIGHTS over a unix socket: one message, at most one descriptor.
ssize_t cfuse_send_with_fd(int socket_fd, const void *data, size_t length, int fd) {
    struct iovec iov = {.iov_base = (void *)data, .iov_len = length};
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t n;
    do { n = sendmsg(socket_fd, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

ssize_t cfuse_receive_with_fd(int socket_fd, void *data, size_t capacity, int *fd) {
    *fd = -1;
    struct iovec iov = {.iov_base = data, .iov_len = capacity};
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    ssize_t n;
    do { n = recvmsg(socket_fd, &msg, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
            memcpy(fd, CMSG_DATA(c), sizeof(int));
        }
    }
    return n;
}


int cfuse_spawn_close_from(posix_spawn_file_actions_t *actions, int first) {
    return posix_spawn_file_actions_addclosefrom_np(actions, first);
}

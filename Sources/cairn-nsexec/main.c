/*
 * cairn-nsexec: puts mounts into a running container's mount namespace, named by a PID.
 *
 * Why it exists: the node agent is a multithreaded Swift process, and the kernel refuses
 * setns(CLONE_NEWNS) to a thread that shares its fs_struct with others. This helper is
 * single-threaded, does one operation per run and exits. It takes the mount source from the
 * caller's namespace (open_tree before setns), then enters the container (setns + chroot into
 * the container's root) so every PATH is seen exactly as the container sees it, and resolves
 * PATH with openat2(RESOLVE_BENEATH) so a symlink planted in the container cannot redirect us.
 *
 *   cairn-nsexec identify  --pid PID                                   -> start-time=TICKS
 *   cairn-nsexec inspect   --pid PID --start-time TICKS PATH           -> kind=... mounted=0|1
 *   cairn-nsexec mkdir     --pid PID --start-time TICKS PATH           -> created=0|1
 *   cairn-nsexec mkfile    --pid PID --start-time TICKS PATH           -> created=0|1
 *   cairn-nsexec remove    --pid PID --start-time TICKS PATH           -> removed=0|1
 *   cairn-nsexec bind      --pid PID --start-time TICKS --source HOSTPATH [--read-only] PATH
 *                                                                      -> mounted=0|1
 *   cairn-nsexec unmount   --pid PID --start-time TICKS [--lazy] PATH  -> unmounted=0|1
 *   cairn-nsexec mountinfo --pid PID --start-time TICKS                -> /proc/PID/mountinfo
 *
 * TICKS is field 22 of /proc/PID/stat when the namespace was first named (0 skips the check).
 * bind clones HOSTPATH (a directory, block device or file) recursively, like mount --rbind;
 * --read-only makes the whole clone read-only before it is attached.
 * Exit: 0 ok, 1 usage, 2 PATH invalid or leaves the container root, 3 process gone or PID
 * reused, 4 parent (or bind target/source) missing, 5 wrong kind, 6 busy, 7 other system error.
 * Errors are one stderr line: "cairn-nsexec: <what failed>: <strerror> (<hint>)".
 * Needs Linux >= 5.12 (openat2, open_tree, move_mount, mount_setattr) and root.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Our own copies of the new-mount-API and openat2 ABI, so no header version can conflict. */
struct cairn_open_how { uint64_t flags, mode, resolve; };
struct cairn_mount_attr { uint64_t attr_set, attr_clr, propagation, userns_fd; };
#ifndef RESOLVE_NO_MAGICLINKS
#define RESOLVE_NO_MAGICLINKS 0x02
#endif
#ifndef RESOLVE_BENEATH
#define RESOLVE_BENEATH 0x08
#endif
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef OPEN_TREE_CLOEXEC
#define OPEN_TREE_CLOEXEC O_CLOEXEC
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x04
#endif
#ifndef MOVE_MOUNT_T_EMPTY_PATH
#define MOVE_MOUNT_T_EMPTY_PATH 0x40
#endif
#ifndef MOUNT_ATTR_RDONLY
#define MOUNT_ATTR_RDONLY 0x01
#endif
#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x1000U
#endif
#ifndef STATX_ATTR_MOUNT_ROOT
#define STATX_ATTR_MOUNT_ROOT 0x2000
#endif

enum { EXIT_USAGE = 1, EXIT_ESCAPES, EXIT_GONE, EXIT_MISSING, EXIT_KIND, EXIT_BUSY, EXIT_SYSTEM };

#define USAGE "usage: cairn-nsexec inspect|mkdir|mkfile|remove|bind|unmount|mountinfo --pid PID " \
    "--start-time TICKS [--source HOSTPATH] [--read-only] [--lazy] PATH, or identify --pid PID"

struct opts {
    const char *cmd, *source, *path;
    long pid;
    unsigned long long start_time;
    int have_start, read_only, lazy;
};

/* The one way out on error: one line an operator can act on, control characters (which a
 * container can put in a symlink) replaced so the line stays one line. */
__attribute__((noreturn, format(printf, 4, 5)))
static void fail(int code, int err, const char *hint, const char *fmt, ...)
{
    char what[3 * PATH_MAX], line[4 * PATH_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(line, sizeof line, "cairn-nsexec: %s: %s (%s)", what, strerror(err), hint);
    for (char *c = line; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = '?';
    fprintf(stderr, "%s\n", line);
    exit(code);
}

/* Prints the single result line the Swift side parses and ends the run with exit 0; a lost
 * stdout is a failure, not success. */
__attribute__((noreturn, format(printf, 1, 2)))
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    if (putchar('\n') == EOF || fflush(stdout) != 0)
        fail(EXIT_SYSTEM, errno, "the caller closed our stdout", "writing the result");
    exit(0);
}

/* Decimal only, whole string, no sign: a PID or tick count that is half a number is a bug. */
static unsigned long long number(const char *s, const char *name)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*s < '0' || *s > '9' || *end || errno)
        fail(EXIT_USAGE, EINVAL, USAGE, "%s %s is not a decimal number", name, s);
    return v;
}

/* Reads argv into opts and rejects what does not belong to the command, so a typo in the Swift
 * caller shows up as exit 1 rather than as a silently ignored flag. */
static void parse(int argc, char **argv, struct opts *o)
{
    if (argc < 2) fail(EXIT_USAGE, EINVAL, USAGE, "no command");
    o->cmd = argv[1];
    int is_bind = !strcmp(o->cmd, "bind"), is_unmount = !strcmp(o->cmd, "unmount");
    int is_identify = !strcmp(o->cmd, "identify"), is_info = !strcmp(o->cmd, "mountinfo");
    if (!is_bind && !is_unmount && !is_identify && !is_info && strcmp(o->cmd, "inspect") &&
        strcmp(o->cmd, "mkdir") && strcmp(o->cmd, "mkfile") && strcmp(o->cmd, "remove"))
        fail(EXIT_USAGE, EINVAL, USAGE, "unknown command %s", o->cmd);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
        if (!strcmp(a, "--pid") && has_value) {
            unsigned long long pid = number(argv[++i], a);
            if (pid == 0 || pid > INT_MAX) fail(EXIT_USAGE, EINVAL, USAGE, "--pid %llu out of range", pid);
            o->pid = (long)pid;
        } else if (!strcmp(a, "--start-time") && has_value && !is_identify) {
            o->start_time = number(argv[++i], a);
            o->have_start = 1;
        } else if (!strcmp(a, "--source") && has_value && is_bind) {
            o->source = argv[++i];
        } else if (!strcmp(a, "--read-only") && is_bind) {
            o->read_only = 1;
        } else if (!strcmp(a, "--lazy") && is_unmount) {
            o->lazy = 1;
        } else if (a[0] == '-' || o->path || is_identify || is_info) {
            fail(EXIT_USAGE, EINVAL, USAGE, "unexpected argument %s for %s", a, o->cmd);
        } else {
            o->path = a;
        }
    }
    if (!o->pid) fail(EXIT_USAGE, EINVAL, USAGE, "%s needs --pid", o->cmd);
    if (!is_identify && !o->have_start)
        fail(EXIT_USAGE, EINVAL, USAGE, "%s needs --start-time (0 skips the check)", o->cmd);
    if (!is_identify && !is_info && !o->path) fail(EXIT_USAGE, EINVAL, USAGE, "%s needs a PATH", o->cmd);
    if (is_bind && !o->source) fail(EXIT_USAGE, EINVAL, USAGE, "bind needs --source");
}

#define GONE_HINT "the process has exited; name the container's namespace again"

/* Lookups under /proc/PID fail with ENOENT or ESRCH once the process is gone: that is exit 3. */
static int gone_or_system(int err)
{
    return err == ENOENT || err == ESRCH ? EXIT_GONE : EXIT_SYSTEM;
}

/* Opens /proc/PID once and checks state and starttime through that directory fd: if the PID is
 * reaped and reused later, lookups through the old fd fail instead of reaching the new process. */
static int open_process(const struct opts *o, unsigned long long *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld", o->pid);
    int proc = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (proc < 0) fail(gone_or_system(errno), errno, GONE_HINT, "opening %s", path);
    int fd = openat(proc, "stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(gone_or_system(errno), errno, GONE_HINT, "reading %s/stat", path);
    /* procfs may hand a file out in pieces: read to EOF (the line is far shorter than buf). */
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fail(gone_or_system(errno), errno, GONE_HINT, "reading %s/stat", path);
        if (r == 0 || (n += (size_t)r) == sizeof buf - 1) break;
    }
    close(fd);
    buf[n] = 0;
    char *comm_end = strrchr(buf, ')'); /* comm may hold spaces and ')'; the last ')' ends it */
    char *p = comm_end ? comm_end + 1 : NULL; /* the space before field 3 (state) */
    for (int field = 3; p && field < 22; field++) p = strchr(p + 1, ' ');
    if (!p) fail(EXIT_SYSTEM, EPROTO, "unexpected /proc format", "parsing %s/stat", path);
    char state = comm_end[2];
    *start = strtoull(p + 1, NULL, 10);
    if (state == 'Z' || state == 'X')
        fail(EXIT_GONE, ESRCH, "the process is a zombie; its namespaces are gone", "process %ld", o->pid);
    if (o->have_start && o->start_time && *start != o->start_time)
        fail(EXIT_GONE, ESRCH, "the PID was reused: the container has exited; name its namespace again",
             "process %ld has start-time %llu, expected %llu", o->pid, *start, o->start_time);
    return proc;
}

/* Moves this single-threaded process into the container: its mount namespace, then its root,
 * so later lookups see what the container sees. Both fds come from the /proc/PID fd whose start
 * time was checked, and are opened before setns (for bind, after open_tree took the source). */
static int enter(int proc, long pid)
{
    int ns = openat(proc, "ns/mnt", O_RDONLY | O_CLOEXEC);
    if (ns < 0) fail(gone_or_system(errno), errno, GONE_HINT, "opening /proc/%ld/ns/mnt", pid);
    int root = openat(proc, "root", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) fail(gone_or_system(errno), errno, GONE_HINT, "opening /proc/%ld/root", pid);
    if (setns(ns, CLONE_NEWNS) < 0)
        fail(EXIT_SYSTEM, errno, "needs CAP_SYS_ADMIN and CAP_SYS_CHROOT: run as root",
             "setns into /proc/%ld/ns/mnt", pid);
    if (fchdir(root) < 0 || chroot(".") < 0)
        fail(EXIT_SYSTEM, errno, "needs CAP_SYS_CHROOT: run as root", "entering the root of process %ld", pid);
    close(ns);
    close(root);
    int croot = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (croot < 0) fail(EXIT_SYSTEM, errno, "the container root vanished", "opening the container root");
    return croot;
}

/* Checks PATH's spelling before any lookup: absolute, no "." or ".." component, not the root.
 * Writes it relative to the root with repeated slashes collapsed, as openat2 wants it. */
static void relative_path(const char *path, char *rel)
{
    const char *hint = "PATH must be absolute in the container's view, without '.' or '..' components";
    if (path[0] != '/') fail(EXIT_ESCAPES, EINVAL, hint, "%s is not absolute", path);
    if (strlen(path) >= PATH_MAX) fail(EXIT_ESCAPES, ENAMETOOLONG, hint, "%.64s...", path);
    char *out = rel;
    for (const char *p = path; *p;) {
        while (*p == '/') p++;
        size_t len = strcspn(p, "/");
        if (!len) break;
        if ((len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.'))
            fail(EXIT_ESCAPES, EINVAL, hint, "%s escapes: component '%.*s'", path, (int)len, p);
        if (out != rel) *out++ = '/';
        memcpy(out, p, len);
        out += len;
        p += len;
    }
    *out = 0;
    if (!*rel) fail(EXIT_ESCAPES, EINVAL, hint, "%s is the container root itself", path);
}

/* openat2 beneath the container root: symlinks are followed only while they stay inside and
 * /proc magic links never; the kernel checks every step, so there is no race to lose. */
static int beneath(int root, const char *rel, int flags)
{
    struct cairn_open_how how = { .flags = (uint64_t)(flags | O_CLOEXEC),
                                  .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS };
    for (int tries = 0;; tries++) {
        int fd = (int)syscall(SYS_openat2, root, rel, &how, sizeof how);
        if (fd >= 0 || (errno != EAGAIN && errno != EINTR) || tries == 16) return fd;
    }
}

/* Turns a failed resolution of PATH into the exit code the caller acts on. For an escape it
 * finds the first component that leaves the root, so the operator sees which symlink to blame. */
__attribute__((noreturn))
static void resolve_failed(int root, const char *rel, const char *path, const char *what)
{
    int err = errno;
    char prefix[PATH_MAX], target[PATH_MAX] = "", hint[3 * PATH_MAX];
    if (err == EXDEV || err == ELOOP) {
        for (size_t i = 0, parent = 0;; i++) {
            if (rel[i] && rel[i] != '/') continue;
            memcpy(prefix, rel, i);
            prefix[i] = 0;
            int fd = beneath(root, prefix, O_PATH);
            if (fd < 0 && (errno == EXDEV || errno == ELOOP)) {
                prefix[parent ? parent - 1 : 0] = 0;
                int dir = beneath(root, parent ? prefix : ".", O_PATH | O_DIRECTORY);
                memcpy(prefix, rel + parent, i - parent); /* now the offending component alone */
                prefix[i - parent] = 0;
                ssize_t n = dir < 0 ? -1 : readlinkat(dir, prefix, target, sizeof target - 1);
                target[n > 0 ? n : 0] = 0;
                snprintf(hint, sizeof hint, "component '%.*s' is a symlink to '%s'; absolute symlinks, "
                         "'..' above the container root and /proc magic links are refused",
                         (int)(i - parent), rel + parent, target);
                fail(EXIT_ESCAPES, err, hint, "%s %s escapes the container root", what, path);
            }
            if (fd >= 0) close(fd);
            if (fd < 0 || !rel[i]) break;
            parent = i + 1;
        }
        fail(EXIT_ESCAPES, err, "a symlink in PATH leaves the container root", "%s %s escapes", what, path);
    }
    if (err == ENOENT)
        fail(EXIT_MISSING, err, "create the parent, or for bind the target (mkdir/mkfile), first", "%s %s", what, path);
    if (err == ENOTDIR) fail(EXIT_KIND, err, "a component of PATH is not a directory", "%s %s", what, path);
    fail(EXIT_SYSTEM, err, "unexpected error resolving a path in the container", "%s %s", what, path);
}

/* Type, size and whether the fd (or name under it) is the root of a mount, in one call. */
static void stat_at(int dir, const char *name, struct statx *st, const char *path)
{
    int flags = AT_SYMLINK_NOFOLLOW | (*name ? 0 : AT_EMPTY_PATH);
    if (statx(dir, name, flags, STATX_TYPE | STATX_SIZE | STATX_MNT_ID, st) < 0)
        fail(EXIT_SYSTEM, errno, "unexpected error inspecting a path in the container", "statx %s", path);
    if (!(st->stx_attributes_mask & STATX_ATTR_MOUNT_ROOT))
        fail(EXIT_SYSTEM, ENOSYS, "needs Linux >= 5.8", "statx %s does not report mount roots", path);
}
#define IS_MOUNT_ROOT(st) (((st).stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0)

/* Opens the directory PATH's last component lives in; *name points at that component. */
static int open_parent(int root, char *rel, const char **name, const char *path)
{
    char *slash = strrchr(rel, '/');
    *name = slash ? slash + 1 : rel;
    if (slash) *slash = 0;
    int dir = beneath(root, slash ? rel : ".", O_PATH | O_DIRECTORY);
    int err = errno;
    if (slash) *slash = '/';
    errno = err;
    if (dir < 0 && errno == ENOENT)
        fail(EXIT_MISSING, errno, "create the parent directory first", "parent of %s missing", path);
    if (dir < 0) resolve_failed(root, rel, path, "parent of");
    return dir;
}

/* Reports what PATH is and whether something is mounted on it; a missing PATH is an answer. */
static void cmd_inspect(int root, const char *rel, const char *path)
{
    int fd = beneath(root, rel, O_PATH);
    if (fd < 0 && (errno == ENOENT || errno == ENOTDIR)) say("kind=missing mounted=0");
    if (fd < 0) resolve_failed(root, rel, path, "inspect");
    struct statx st;
    stat_at(fd, "", &st, path);
    mode_t t = st.stx_mode & S_IFMT;
    const char *kind = t == S_IFDIR ? "directory" : t == S_IFBLK ? "blockdevice" : t != S_IFREG ? "other"
                     : st.stx_size ? "file" : "emptyfile";
    say("kind=%s mounted=%d", kind, IS_MOUNT_ROOT(st));
}

/* After EEXIST: an existing PATH of the wanted type is success (created=0), anything else exit 5. */
static void exists_as(int root, const char *rel, const char *path, mode_t type, const char *wanted)
{
    int fd = beneath(root, rel, O_PATH);
    if (fd < 0 && errno != ENOENT) resolve_failed(root, rel, path, "existing");
    struct statx st;
    if (fd >= 0) stat_at(fd, "", &st, path);
    if (fd < 0 || (st.stx_mode & S_IFMT) != type)
        fail(EXIT_KIND, EEXIST, "remove it, or pick another path", "%s exists and is not %s", path, wanted);
    say("created=0");
}

/* Creates the mount point for a filesystem volume; an existing directory is fine. */
static void cmd_mkdir(int root, char *rel, const char *path)
{
    const char *name;
    int dir = open_parent(root, rel, &name, path);
    if (mkdirat(dir, name, 0750) == 0) say("created=1");
    if (errno != EEXIST) fail(EXIT_SYSTEM, errno, "check the container's filesystem", "mkdir %s", path);
    exists_as(root, rel, path, S_IFDIR, "a directory");
}

/* Creates the empty file a block device is bind-mounted onto; an existing regular file is fine. */
static void cmd_mkfile(int root, char *rel, const char *path)
{
    const char *name;
    int dir = open_parent(root, rel, &name, path);
    int fd = openat(dir, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC, 0640);
    if (fd >= 0) {
        close(fd);
        say("created=1");
    }
    if (errno != EEXIST) fail(EXIT_SYSTEM, errno, "check the container's filesystem", "creating %s", path);
    exists_as(root, rel, path, S_IFREG, "a regular file");
}

/* Removes a mount point we created: only an empty directory or empty file, never a mount root. */
static void cmd_remove(int root, char *rel, const char *path)
{
    const char *name;
    char *slash = strrchr(rel, '/');
    if (slash) *slash = 0;
    int dir = beneath(root, slash ? rel : ".", O_PATH | O_DIRECTORY);
    if (slash) *slash = '/';
    if (dir < 0 && (errno == ENOENT || errno == ENOTDIR)) say("removed=0");
    if (dir < 0) resolve_failed(root, rel, path, "parent of");
    name = slash ? slash + 1 : rel;
    struct statx st;
    if (statx(dir, name, AT_SYMLINK_NOFOLLOW, STATX_TYPE | STATX_SIZE, &st) < 0 && errno == ENOENT)
        say("removed=0");
    stat_at(dir, name, &st, path);
    mode_t t = st.stx_mode & S_IFMT;
    if (IS_MOUNT_ROOT(st)) fail(EXIT_KIND, EBUSY, "unmount it first", "%s is a mount point", path);
    if (t == S_IFREG && st.stx_size)
        fail(EXIT_KIND, EEXIST, "it holds data; only empty files are removed", "%s is not empty", path);
    if (t != S_IFREG && t != S_IFDIR)
        fail(EXIT_KIND, EINVAL, "only an empty directory or empty file is removed", "%s is neither", path);
    if (unlinkat(dir, name, t == S_IFDIR ? AT_REMOVEDIR : 0) < 0)
        fail(errno == ENOTEMPTY || errno == EEXIST || errno == EBUSY ? EXIT_KIND : EXIT_SYSTEM, errno,
             "only an empty directory or empty file that is not a mount point is removed", "removing %s", path);
    say("removed=1");
}

/* Clones SOURCE in the caller's namespace (made read-only while still detached, so it is never
 * visible writable), enters the container and attaches the clone on PATH. If anything fails
 * before move_mount, closing the tree fd dissolves the clone: nothing is left behind. */
static void cmd_bind(const struct opts *o, const char *rel, int proc)
{
    int tree = (int)syscall(SYS_open_tree, AT_FDCWD, o->source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
    if (tree < 0)
        fail(errno == ENOENT ? EXIT_MISSING : EXIT_SYSTEM, errno, "the source must exist in the caller's "
             "namespace: is the volume staged?", "open_tree %s", o->source);
    struct cairn_mount_attr attr = { .attr_set = MOUNT_ATTR_RDONLY };
    if (o->read_only && syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr, sizeof attr) < 0)
        fail(EXIT_SYSTEM, errno, "needs Linux >= 5.12", "making the clone of %s read-only", o->source);
    struct statx src, dst;
    stat_at(tree, "", &src, o->source);
    mode_t st = src.stx_mode & S_IFMT;
    if (st != S_IFDIR && st != S_IFBLK && st != S_IFREG)
        fail(EXIT_KIND, EINVAL, "the source is a directory or a block device", "%s", o->source);
    int root = enter(proc, o->pid);
    int target = beneath(root, rel, O_PATH);
    if (target < 0 && errno == ENOENT)
        fail(EXIT_MISSING, errno, "create it with mkdir or mkfile first", "bind target %s missing", o->path);
    if (target < 0) resolve_failed(root, rel, o->path, "bind target");
    stat_at(target, "", &dst, o->path);
    if (IS_MOUNT_ROOT(dst)) say("mounted=0");
    if ((st == S_IFDIR) != ((dst.stx_mode & S_IFMT) == S_IFDIR))
        fail(EXIT_KIND, st == S_IFDIR ? ENOTDIR : EISDIR, "a directory source needs a directory target "
             "(mkdir), a device needs a file (mkfile)", "bind %s onto %s", o->source, o->path);
    if (syscall(SYS_move_mount, tree, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0)
        fail(EXIT_SYSTEM, errno, "the kernel refused to attach the clone", "move_mount %s onto %s", o->source, o->path);
    say("mounted=1");
}

/* Unmounts the topmost mount on PATH. umount2 takes a path, not an fd, and an open fd on the
 * mount would make it busy; so we take the canonical path of the resolved fd (readlink of our
 * own /proc/self/fd entry, relative to the chroot), close the fd, and check it still names the
 * same mount just before umount2 with UMOUNT_NOFOLLOW. */
static void cmd_unmount(const struct opts *o, const char *rel, int proc)
{
    char canon[PATH_MAX], fdname[32];
    int self = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC); /* before /proc goes away */
    if (self < 0) fail(EXIT_SYSTEM, errno, "is /proc mounted?", "opening /proc/self/fd");
    int root = enter(proc, o->pid);
    int fd = beneath(root, rel, O_PATH);
    if (fd < 0 && (errno == ENOENT || errno == ENOTDIR)) say("unmounted=0");
    if (fd < 0) resolve_failed(root, rel, o->path, "unmount");
    struct statx st, again;
    stat_at(fd, "", &st, o->path);
    if (!IS_MOUNT_ROOT(st)) say("unmounted=0");
    snprintf(fdname, sizeof fdname, "%d", fd);
    ssize_t n = readlinkat(self, fdname, canon, sizeof canon - 1);
    if (n <= 0) fail(EXIT_SYSTEM, errno, "cannot name the mount point", "readlink of %s", o->path);
    canon[n] = 0;
    close(fd);
    fd = canon[0] == '/' ? beneath(root, canon + 1, O_PATH | O_NOFOLLOW) : -1;
    if (fd >= 0) stat_at(fd, "", &again, o->path);
    if (fd < 0 || again.stx_mnt_id != st.stx_mnt_id)
        fail(EXIT_BUSY, EAGAIN, "the container changed the path while we looked; retry", "unmount %s", o->path);
    close(fd);
    if (umount2(canon, UMOUNT_NOFOLLOW) == 0) say("unmounted=1");
    if (errno == EINVAL) say("unmounted=0");
    if (errno == EBUSY && o->lazy && umount2(canon, UMOUNT_NOFOLLOW | MNT_DETACH) == 0) say("unmounted=1");
    if (errno == EBUSY)
        fail(EXIT_BUSY, errno, o->lazy ? "even a lazy unmount was refused" : "something in the container still "
             "uses it; retry, or pass --lazy to detach it", "unmount %s", o->path);
    fail(EXIT_SYSTEM, errno, "unexpected umount2 failure", "unmount %s", o->path);
}

/* Copies the container's mountinfo. The kernel prints /proc/PID/mountinfo relative to PID's
 * root and skips mounts outside it, so the mount points match the PATHs the other commands take. */
static void cmd_mountinfo(int proc, long pid)
{
    char buf[65536];
    int fd = openat(proc, "mountinfo", O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(gone_or_system(errno), errno, GONE_HINT, "opening /proc/%ld/mountinfo", pid);
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail(EXIT_SYSTEM, errno, "the process may have exited", "reading /proc/%ld/mountinfo", pid);
        if (n == 0) break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(STDOUT_FILENO, buf + off, (size_t)(n - off));
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) fail(EXIT_SYSTEM, errno, "the caller closed our stdout", "writing mountinfo");
            off += w;
        }
    }
}

int main(int argc, char **argv)
{
    struct opts o = { 0 };
    unsigned long long start;
    char rel[PATH_MAX];
    parse(argc, argv, &o);
    if (o.path) relative_path(o.path, rel); /* a bad PATH is refused before anything is opened */
    umask(0); /* modes below are meant exactly */
    int proc = open_process(&o, &start);
    if (!strcmp(o.cmd, "identify")) say("start-time=%llu", start);
    else if (!strcmp(o.cmd, "mountinfo")) cmd_mountinfo(proc, o.pid);
    else if (!strcmp(o.cmd, "bind")) cmd_bind(&o, rel, proc);
    else if (!strcmp(o.cmd, "unmount")) cmd_unmount(&o, rel, proc);
    else {
        int root = enter(proc, o.pid);
        if (!strcmp(o.cmd, "inspect")) cmd_inspect(root, rel, o.path);
        else if (!strcmp(o.cmd, "mkdir")) cmd_mkdir(root, rel, o.path);
        else if (!strcmp(o.cmd, "mkfile")) cmd_mkfile(root, rel, o.path);
        else cmd_remove(root, rel, o.path);
    }
    return 0;
}

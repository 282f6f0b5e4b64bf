/* ak-enter: join cgroups and a user namespace, then exec a program.
 *
 * What a Python preexec function did for the namespaces backend (cgroups.join_fn,
 * idmap.enter_fn), without forking the whole daemon to run it: the daemon starts this
 * small static binary through vfork/exec, and it does the same steps in the same order.
 *
 *   ak-enter [--keep FD[,FD]...] [--cgroup PROCS_FILE]... [--userns FD] -- PROGRAM [ARG]...
 *   ak-enter --new-userns [--owner UID:GID]
 *   ak-enter --userns-server
 *
 * Each --cgroup writes "0" (this process) to a cgroup.procs file, as the caller (host
 * root); --userns then enters that user namespace (the fd is closed before exec) as its
 * uid and gid 0 with no supplementary groups. Any failure exits 127 before PROGRAM runs:
 * nothing starts outside its limits or in the caller's own namespace.
 *
 * --new-userns makes a new user namespace for the caller to map and keep (idmap.new_userns):
 * it writes "u" on stdout once it is in it, then waits until stdin closes. One exec of
 * this binary and a read, instead of `unshare --user -- cat` and polling for the switch.
 * With --owner it first becomes that host user (see become_owner).
 *
 * --userns-server does the same for every request on stdin, with no exec each: a
 * line "n UID GID" (or "n -": no owner) forks a child that makes the namespace as
 * --new-userns does and then waits; the answer on stdout is its pid ("-" if it
 * failed), whose maps the caller writes and whose namespace it opens; "k PID" then
 * kills and reaps that child. A daemon keeps one for its life (idmap.new_userns):
 * an exec of this binary was most of the namespace's ~0.5 ms of CPU per sandbox. At
 * most MAX_HELD children at once; at EOF every child is killed and the server exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "ak-enter: %s: %s\n", what, strerror(errno));
    _exit(127);
}

static void usage(const char *why) {
    fprintf(stderr, "ak-enter: %s\nusage: ak-enter [--keep FD,...] [--cgroup FILE]... [--userns FD] -- "
            "PROGRAM [ARG]...\n", why);
    _exit(127);
}

static void join_cgroup(const char *procs) {
    int fd = open(procs, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        die(procs);
    if (write(fd, "0", 1) != 1)
        die(procs);
    close(fd);
}

static int parse_fd(const char *text) {
    char *end = NULL;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < 0 || v > INT_MAX)
        usage("--userns needs a file descriptor number");
    return (int)v;
}

/* Every descriptor above stderr closed: the daemon starts --new-userns by posix_spawn,
 * which has no close_fds, and nothing of its (another sandbox's channel or namespace)
 * may be held in the new namespace, however briefly. */
static void close_inherited(void) {
    if (syscall(SYS_close_range, 3U, ~0U, 0U) == 0)
        return;
    long max = sysconf(_SC_OPEN_MAX);
    for (long fd = 3; fd < (max > 0 ? max : 1024); fd++)
        close((int)fd);
}

/* Descriptors lo..hi (inclusive) closed. */
static void close_span(unsigned int lo, unsigned int hi) {
    if (syscall(SYS_close_range, lo, hi, 0U) == 0)
        return;
    long max = sysconf(_SC_OPEN_MAX);
    for (long fd = lo; fd <= (long)hi && fd < (max > 0 ? max : 1024); fd++)
        close((int)fd);
}

#define AK_KEEP_MAX 64

/* --keep FD,...: every descriptor above stderr but these closed, first of all (as host
 * root, before any cgroup or namespace is joined). The daemon's posix_spawn then closes
 * only those above the highest kept one (one file action each below it cost the daemon
 * ~1 us apiece, ~0.3 ms a start with a few hundred open). */
static void close_except(const char *list) {
    int keep[AK_KEEP_MAX];
    int n = 0;
    const char *p = list;
    while (*p) {
        char *end = NULL;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || (*end && *end != ',') || v < 3 || v > INT_MAX ||
            n == AK_KEEP_MAX)
            usage("--keep needs descriptor numbers above stderr, comma-separated");
        int j = n++;
        for (; j > 0 && keep[j - 1] > (int)v; j--)
            keep[j] = keep[j - 1];
        keep[j] = (int)v;
        p = *end ? end + 1 : end;
        if (*end && !*p)
            usage("--keep needs descriptor numbers above stderr, comma-separated");
    }
    unsigned int lo = 3;
    for (int j = 0; j < n; j++) {
        if ((unsigned int)keep[j] > lo)
            close_span(lo, (unsigned int)keep[j] - 1);
        if ((unsigned int)keep[j] + 1 > lo)
            lo = (unsigned int)keep[j] + 1;
    }
    close_span(lo, ~0U);
}

/* capset(2) without libcap (musl has no <sys/capability.h>): version 3, two words. */
#define AK_CAP_VERSION_3 0x20080522
#define AK_CAP_SYS_ADMIN 21
struct ak_cap_header { unsigned int version; int pid; };
struct ak_cap_data { unsigned int effective, permitted, inheritable; };

static void set_caps(unsigned int word0, const char *what) {
    struct ak_cap_header hdr = { AK_CAP_VERSION_3, 0 };
    struct ak_cap_data data[2] = { { word0, word0, 0 }, { 0, 0, 0 } };
    if (syscall(SYS_capset, &hdr, data) != 0)
        die(what);
}

/* --owner UID:GID: made as that host user, who then owns the namespace. The kernel
 * charges what the sandbox holds (inotify instances and watches, queued signals, message
 * queues) to its namespace and to each owner up the chain: owned by root, a sandbox used
 * up host root's own share (128 inotify instances for every root process on the host).
 * CAP_SYS_ADMIN alone is kept across the switch, for the unshare: a host that lets only
 * privileged processes make user namespaces (Ubuntu's AppArmor restriction,
 * unprivileged_userns_clone=0) would refuse that user; hold_new_userns drops it after. */
static void become_owner(const char *ids) {
    char *end = NULL;
    errno = 0;
    unsigned long uid = strtoul(ids, &end, 10);
    if (errno || end == ids || *end != ':' || uid == 0 || uid >= 0xFFFFFFFFUL)
        usage("--owner needs UID:GID, neither 0");
    const char *g = end + 1;
    unsigned long gid = strtoul(g, &end, 10);
    if (errno || end == g || *end || gid == 0 || gid >= 0xFFFFFFFFUL)
        usage("--owner needs UID:GID, neither 0");
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0)
        die("keepcaps");
    if (setgroups(0, NULL) != 0)
        die("setgroups");
    if (setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0)
        die("setresgid");
    if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0)
        die("setresuid");
    if (prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0)
        die("keepcaps");
    set_caps(1U << AK_CAP_SYS_ADMIN, "capset(CAP_SYS_ADMIN)");
}

static int hold_new_userns(const char *owner) {
    char buf[64];
    close_inherited();
    if (owner)
        become_owner(owner);
    if (unshare(CLONE_NEWUSER) != 0)
        die("unshare(user)");
    set_caps(0, "capset(none)");  /* (the new namespace's, and nothing of the host's) */
    if (write(STDOUT_FILENO, "u", 1) != 1)
        die("write");
    while (read(STDIN_FILENO, buf, sizeof buf) > 0) {
    }
    return 0;
}

#define MAX_HELD 64

static void server_child(unsigned long uid, unsigned long gid, int ready, pid_t server) {
    char ids[48];
    close(STDIN_FILENO);
    close(STDOUT_FILENO);
    if (uid || gid) {
        snprintf(ids, sizeof ids, "%lu:%lu", uid, gid);
        become_owner(ids);
    }
    if (unshare(CLONE_NEWUSER) != 0)
        _exit(127);
    set_caps(0, "capset(none)");
    /* Gone with the server, however it ends (SIGKILL too): never an orphan holding a
     * namespace. Set last: a change of ids (become_owner) clears it. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != server)
        _exit(127);
    if (write(ready, "u", 1) != 1)
        _exit(127);
    close(ready);
    for (;;)
        pause();
}

/* One request: a held child's pid, or -1. */
static pid_t server_make(unsigned long uid, unsigned long gid) {
    int p[2];
    char c;
    if (pipe2(p, O_CLOEXEC) != 0)
        return -1;
    pid_t server = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        close(p[0]);
        server_child(uid, gid, p[1], server);
    }
    close(p[1]);
    ssize_t got = pid > 0 ? read(p[0], &c, 1) : -1;
    close(p[0]);
    if (pid > 0 && got != 1) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return -1;
    }
    return pid;
}

static int userns_server(void) {
    pid_t held[MAX_HELD];
    int nheld = 0;
    char line[128];
    FILE *in, *out;
    close_inherited();
    /* A host-side helper, never the sandbox's: named so (and so are its children). */
    prctl(PR_SET_NAME, "ak-userns-forks", 0, 0, 0);
    in = fdopen(STDIN_FILENO, "r");
    out = fdopen(STDOUT_FILENO, "w");
    if (!in || !out)
        die("fdopen");
    while (fgets(line, sizeof line, in)) {
        unsigned long a = 0, b = 0;
        long victim = 0;
        int anyone = strcmp(line, "n -\n") == 0;
        if (anyone || sscanf(line, "n %lu %lu", &a, &b) == 2) {
            pid_t pid = -1;  /* (an owner is never root: become_owner) */
            if (nheld < MAX_HELD && (anyone || (a && b && a < 0xFFFFFFFFUL && b < 0xFFFFFFFFUL)))
                pid = server_make(a, b);
            if (pid > 0)
                held[nheld++] = pid;
            if (pid > 0)
                fprintf(out, "%ld\n", (long)pid);
            else
                fputs("-\n", out);
            fflush(out);
        } else if (sscanf(line, "k %ld", &victim) == 1) {
            for (int i = 0; i < nheld; i++)  /* only a child of ours, still held */
                if (held[i] == (pid_t)victim) {
                    kill(held[i], SIGKILL);
                    waitpid(held[i], NULL, 0);
                    held[i] = held[--nheld];
                    break;
                }
        } else {
            break;
        }
    }
    for (int i = 0; i < nheld; i++) {
        kill(held[i], SIGKILL);
        waitpid(held[i], NULL, 0);
    }
    return 0;
}

int main(int argc, char **argv) {
    int userns = -1;
    if (argc == 2 && strcmp(argv[1], "--new-userns") == 0)
        return hold_new_userns(NULL);
    if (argc == 2 && strcmp(argv[1], "--userns-server") == 0)
        return userns_server();
    if (argc == 4 && strcmp(argv[1], "--new-userns") == 0 && strcmp(argv[2], "--owner") == 0)
        return hold_new_userns(argv[3]);
    int i = 1;
    if (argc > 2 && strcmp(argv[1], "--keep") == 0) {
        close_except(argv[2]);
        i = 3;
    }
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        }
        if (i + 1 >= argc)
            usage("missing value or --");
        if (strcmp(argv[i], "--cgroup") == 0)
            join_cgroup(argv[++i]);
        else if (strcmp(argv[i], "--userns") == 0)
            userns = parse_fd(argv[++i]);
        else
            usage("unknown option");
    }
    if (i >= argc || argv[i][0] != '/')
        usage("PROGRAM must be an absolute path");
    if (userns >= 0) {
        if (setns(userns, CLONE_NEWUSER) != 0)
            die("setns(user)");
        close(userns);
        if (setgroups(0, NULL) != 0)
            die("setgroups");
        if (setresgid(0, 0, 0) != 0)
            die("setresgid");
        if (setresuid(0, 0, 0) != 0)
            die("setresuid");
    }
    execv(argv[i], &argv[i]);
    die(argv[i]);
    return 127;
}

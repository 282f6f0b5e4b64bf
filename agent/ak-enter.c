/* ak-enter: join cgroups and a user namespace, then exec a program.
 *
 * What a Python preexec function did for the namespaces backend (cgroups.join_fn,
 * idmap.enter_fn), without forking the whole daemon to run it: the daemon starts this
 * small static binary through vfork/exec, and it does the same steps in the same order.
 *
 *   ak-enter [--cgroup PROCS_FILE]... [--userns FD] -- PROGRAM [ARG]...
 *   ak-enter --new-userns
 *
 * Each --cgroup writes "0" (this process) to a cgroup.procs file, as the caller (host
 * root); --userns then enters that user namespace (the fd is closed before exec) as its
 * uid and gid 0 with no supplementary groups. Any failure exits 127 before PROGRAM runs:
 * nothing starts outside its limits or in the caller's own namespace.
 *
 * --new-userns makes a new user namespace for the caller to map and keep (idmap.new_userns):
 * it writes "u" on stdout once it is in it, then waits until stdin closes. One exec of
 * this binary and a read, instead of `unshare --user -- cat` and polling for the switch.
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
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "ak-enter: %s: %s\n", what, strerror(errno));
    _exit(127);
}

static void usage(const char *why) {
    fprintf(stderr, "ak-enter: %s\nusage: ak-enter [--cgroup FILE]... [--userns FD] -- "
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

static int hold_new_userns(void) {
    char buf[64];
    if (unshare(CLONE_NEWUSER) != 0)
        die("unshare(user)");
    if (write(STDOUT_FILENO, "u", 1) != 1)
        die("write");
    while (read(STDIN_FILENO, buf, sizeof buf) > 0) {
    }
    return 0;
}

int main(int argc, char **argv) {
    int userns = -1;
    if (argc == 2 && strcmp(argv[1], "--new-userns") == 0)
        return hold_new_userns();
    int i = 1;
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

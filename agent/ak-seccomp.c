/* ak-seccomp: compile agentkernel's deny-list seccomp policy into a raw classic BPF program.
 *
 * The BPF is what `bwrap --seccomp FD` loads. Only the native architecture is allowed: any
 * other ABI (i386 via int 0x80, x32 on x86_64) hits the bad-arch action and kills the
 * process, so a second syscall table can't be used to get around the rules.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sched.h>
#include <seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <unistd.h>

#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif
#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif
#ifndef TIOCLINUX
#define TIOCLINUX 0x541C
#endif

/* clone() takes its flags in the second argument on s390 only. */
#if defined(__s390__) || defined(__s390x__)
#define CLONE_FLAGS_ARG 1
#else
#define CLONE_FLAGS_ARG 0
#endif

static void usage(void) {
    fprintf(stderr,
            "usage: ak-seccomp --default allow [--errno NAME...] [--enosys NAME...]\n"
            "                  [--kill NAME...]\n"
            "                  [--block-tiocsti] [--block-newns] [--block-setid-modes]\n"
            "                  [--block-socket-filters] [--pin-core-limit]\n"
            "                  [--deny-family N]... -o OUT\n");
    exit(2);
}

static void die(const char *what, int rc) {
    fprintf(stderr, "ak-seccomp: %s: %s\n", what, strerror(rc < 0 ? -rc : rc));
    exit(1);
}

/* Add an unconditional rule; names this arch doesn't have are noted and skipped. */
static void add_named(scmp_filter_ctx ctx, uint32_t action, const char *name) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR || nr < 0) {
        fprintf(stderr, "ak-seccomp: note: syscall %s does not exist on this arch, skipped\n",
                name);
        return;
    }
    int rc = seccomp_rule_add_exact(ctx, action, nr, 0);
    if (rc < 0) {
        fprintf(stderr, "ak-seccomp: rule for %s: %s\n", name, strerror(-rc));
        exit(1);
    }
}

/* EPERM when (arg & bit) == bit; one rule per bit because rules on one syscall are ORed. */
static void deny_flag_bits(scmp_filter_ctx ctx, int nr, unsigned arg, const uint64_t *bits,
                           size_t n) {
    for (size_t i = 0; i < n; i++) {
        int rc = seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(EPERM), nr, 1,
                                        SCMP_CMP(arg, SCMP_CMP_MASKED_EQ, bits[i], bits[i]));
        if (rc < 0)
            die("namespace flag rule", rc);
    }
}

/* socket() of address family `fam` refused with EAFNOSUPPORT, the kernel's own answer for
 * a family it lacks (what a program that probes one, vsock say, takes for "none here"). The
 * kernel reads the family as an int: only the low half is compared, so junk in the upper
 * bits cannot slip past the rule. */
static void deny_family(scmp_filter_ctx ctx, uint64_t fam) {
    int rc = seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1,
                                    SCMP_A0(SCMP_CMP_MASKED_EQ, 0xffffffffULL, fam));
    if (rc < 0)
        die("socket family rule", rc);
}

/* A family number of --deny-family: decimal, below AF_MAX's order (255), else usage. */
static uint64_t family_arg(const char *s) {
    char *end = NULL;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || !end || *end || end == s || v > 255)
        usage();
    return v;
}

int main(int argc, char **argv) {
    const char *out = NULL;
    uint64_t families[16];
    size_t nfamilies = 0;
    int block_tiocsti = 0, block_newns = 0, block_setid = 0, block_sockfilter = 0;
    int pin_core = 0;
    int have_default = 0;
    /* 1 = --errno, 2 = --kill, 3 = --enosys: which list bare names belong to */
    uint32_t mode = 0;

    /* First pass validates flags; names are added once the context exists. */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--default") == 0) {
            if (++i >= argc || strcmp(argv[i], "allow") != 0) {
                fprintf(stderr, "ak-seccomp: only --default allow is supported\n");
                return 2;
            }
            have_default = 1;
            mode = 0;
        } else if (strcmp(a, "-o") == 0) {
            if (++i >= argc)
                usage();
            out = argv[i];
            mode = 0;
        } else if (strcmp(a, "--errno") == 0) {
            mode = 1;
        } else if (strcmp(a, "--kill") == 0) {
            mode = 2;
        } else if (strcmp(a, "--enosys") == 0) {
            mode = 3;
        } else if (strcmp(a, "--block-tiocsti") == 0) {
            block_tiocsti = 1;
            mode = 0;
        } else if (strcmp(a, "--block-newns") == 0) {
            block_newns = 1;
            mode = 0;
        } else if (strcmp(a, "--block-setid-modes") == 0) {
            block_setid = 1;
            mode = 0;
        } else if (strcmp(a, "--block-socket-filters") == 0) {
            block_sockfilter = 1;
            mode = 0;
        } else if (strcmp(a, "--deny-family") == 0) {
            if (++i >= argc || nfamilies == sizeof(families) / sizeof(families[0]))
                usage();
            families[nfamilies++] = family_arg(argv[i]);
            mode = 0;
        } else if (strcmp(a, "--pin-core-limit") == 0) {
            pin_core = 1;
            mode = 0;
        } else if (a[0] == '-' || mode == 0) {
            usage();
        }
    }
    if (!out || !have_default)
        usage();

    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (!ctx) {
        fprintf(stderr, "ak-seccomp: seccomp_init failed\n");
        return 1;
    }
    int rc = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS);
    if (rc < 0)
        die("set bad-arch action", rc);

    mode = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--default") == 0 || strcmp(a, "-o") == 0 ||
            strcmp(a, "--deny-family") == 0) {
            i++;
            mode = 0;
        } else if (strcmp(a, "--errno") == 0) {
            mode = 1;
        } else if (strcmp(a, "--kill") == 0) {
            mode = 2;
        } else if (strcmp(a, "--enosys") == 0) {
            mode = 3;
        } else if (a[0] == '-') {
            mode = 0;
        } else {
            /* ENOSYS: as on a kernel built without the call, which its users fall back from
             * (libaio's users to threads) where EPERM reads as a failure */
            add_named(ctx, mode == 1   ? SCMP_ACT_ERRNO(EPERM)
                           : mode == 3 ? SCMP_ACT_ERRNO(ENOSYS)
                                       : SCMP_ACT_KILL_PROCESS, a);
        }
    }

    for (size_t i = 0; i < nfamilies; i++)
        deny_family(ctx, families[i]);

    if (block_tiocsti) {
        /* The kernel reads cmd as a 32-bit int: compare only the low half so junk in the
         * upper bits can't slip past the rule (the CVE-2019-10063 bypass). */
        static const uint64_t cmds[] = {TIOCSTI, TIOCLINUX};
        for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
            rc = seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(ioctl), 1,
                                        SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffULL, cmds[i]));
            if (rc < 0)
                die("ioctl rule", rc);
        }
    }

    if (block_newns) {
        static const uint64_t ns[] = {CLONE_NEWUSER, CLONE_NEWNS,  CLONE_NEWNET,
                                      CLONE_NEWPID,  CLONE_NEWIPC, CLONE_NEWUTS,
                                      CLONE_NEWCGROUP, CLONE_NEWTIME};
        size_t n = sizeof(ns) / sizeof(ns[0]);
        /* clone() can't carry CLONE_NEWTIME: that bit is part of the exit-signal byte. */
        deny_flag_bits(ctx, SCMP_SYS(clone), CLONE_FLAGS_ARG, ns, n - 1);
        deny_flag_bits(ctx, SCMP_SYS(unshare), 0, ns, n);
        /* clone3 passes flags in memory seccomp can't read; ENOSYS makes libc use clone. */
        int nr = seccomp_syscall_resolve_name("clone3");
        if (nr >= 0) {
            rc = seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(ENOSYS), nr, 0);
            if (rc < 0)
                die("clone3 rule", rc);
        }
    }

    if (block_sockfilter) {
        /* Every classic BPF socket filter is JIT-compiled into memory the kernel counts
         * host-wide against net.core.bpf_jit_limit, for every process without CAP_BPF in
         * the host's user namespace, and no cgroup bounds it: one sandbox held 200 MiB of
         * the 504 MiB with 4000 filters, and past the limit every unprivileged seccomp or
         * socket filter on the host fails to load (JIT_ALWAYS_ON: no interpreter), bwrap's
         * and our agent's too. SO_ATTACH_BPF needs bpf(), refused already. Level and name
         * are ints: compare the low halves only. */
        static const uint64_t names[] = {26 /* SO_ATTACH_FILTER */,
                                         51 /* SO_ATTACH_REUSEPORT_CBPF */};
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
            rc = seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(setsockopt), 2,
                                        SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffULL,
                                                1 /* SOL_SOCKET */),
                                        SCMP_A2(SCMP_CMP_MASKED_EQ, 0xffffffffULL, names[i]));
            if (rc < 0)
                die("setsockopt rule", rc);
        }
    }

    if (pin_core) {
        /* RLIMIT_CORE stays what the agent set before this filter, 1: the one value for
         * which the kernel skips a pipe core_pattern (apport, systemd-coredump), run as
         * host root in the host's namespaces with the crashed process's memory as input;
         * 0 does not stop it. 1 is below every binary format's minimum dump, so no core
         * file is written either. A change is answered with success and no effect
         * (SECCOMP_RET_ERRNO with errno 0 skips the call and returns 0): programs that
         * turn core dumps off (ssh-agent exits when that fails) get what they asked for.
         * prlimit64 that also asks for the old limit fails with EPERM instead: a success
         * would leave its old-limit buffer unwritten. Resource is an unsigned int: compare
         * the low halves only. */
        const uint64_t low = 0xffffffffULL;
        rc = seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(0), SCMP_SYS(setrlimit), 1,
                                    SCMP_A0(SCMP_CMP_MASKED_EQ, low, RLIMIT_CORE));
        if (rc >= 0)
            rc = seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(0), SCMP_SYS(prlimit64), 3,
                                        SCMP_A1(SCMP_CMP_MASKED_EQ, low, RLIMIT_CORE),
                                        SCMP_A2(SCMP_CMP_NE, 0), SCMP_A3(SCMP_CMP_EQ, 0));
        if (rc >= 0)
            rc = seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(prlimit64), 3,
                                        SCMP_A1(SCMP_CMP_MASKED_EQ, low, RLIMIT_CORE),
                                        SCMP_A2(SCMP_CMP_NE, 0), SCMP_A3(SCMP_CMP_NE, 0));
        if (rc < 0)
            die("rlimit rule", rc);
    }

    if (block_setid) {
        /* A sandbox whose project dir is the host's, read-write and id-mapped: a set-uid or
         * set-gid file it made there would be host root's. Refuse those mode bits wherever
         * a mode is given: chmod family, file creation (open/openat/creat with O_CREAT,
         * mknod of a regular file). openat2 and fchmodat2 carry them where seccomp cannot
         * look: ENOSYS, and libc falls back to the calls checked here. */
        static const uint64_t setid[] = {S_ISUID, S_ISGID};
        static const struct { const char *name; unsigned arg; } calls[] = {
            {"chmod", 1}, {"fchmod", 1}, {"fchmodat", 2}, {"open", 2}, {"openat", 3},
            {"creat", 1}, {"mknod", 1}, {"mknodat", 2},
        };
        for (size_t i = 0; i < sizeof(calls) / sizeof(calls[0]); i++) {
            int nr = seccomp_syscall_resolve_name(calls[i].name);
            if (nr >= 0)
                deny_flag_bits(ctx, nr, calls[i].arg, setid, 2);
        }
        static const char *const hidden[] = {"openat2", "fchmodat2"};
        for (size_t i = 0; i < sizeof(hidden) / sizeof(hidden[0]); i++) {
            int nr = seccomp_syscall_resolve_name(hidden[i]);
            if (nr < 0 && strcmp(hidden[i], "fchmodat2") == 0)
                nr = 452; /* Linux 6.6+, the same number on x86_64 and aarch64; newer than
                           * this libseccomp's tables */
            if (nr >= 0) {
                rc = seccomp_rule_add_exact(ctx, SCMP_ACT_ERRNO(ENOSYS), nr, 0);
                if (rc < 0)
                    die(hidden[i], rc);
            }
        }
    }

    int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die(out, errno);
    rc = seccomp_export_bpf(ctx, fd);
    if (rc < 0)
        die("export", rc);
    if (fsync(fd) < 0 || close(fd) < 0)
        die(out, errno);
    seccomp_release(ctx);
    return 0;
}

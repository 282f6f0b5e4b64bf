/*
 * ak-agent: the first process inside every agentkernel sandbox.
 *
 * It serves protocol v1 (see docs/protocol.md) on one channel with a single-threaded poll
 * loop: it runs commands, streams their output, moves files and, when it is init, reaps
 * orphans and forwards signals. Everything read from the channel is treated as hostile.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/reboot.h>

#include "proto.h"

/* musl ships no kernel headers, so the few kernel ABI bits we need are spelled out here. */
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#endif
#ifndef PR_CAP_AMBIENT_CLEAR_ALL
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif
#define AK_CAP_VERSION_3 0x20080522
#define AK_SECCOMP_SET_MODE_FILTER 1
#define AK_SECCOMP_MODE_FILTER 2
#define AK_MAX_BPF 4096

struct ak_sock_filter {
	uint16_t code;
	uint8_t jt, jf;
	uint32_t k;
};
struct ak_sock_fprog {
	unsigned short len;
	struct ak_sock_filter *filter;
};
struct ak_cap_header {
	uint32_t version;
	int pid;
};
struct ak_cap_data {
	uint32_t effective, permitted, inheritable;
};

#define AGENT_NAME "ak-agent 0.1.0"
#define MAX_PROCS 256
#define MAX_XFERS 64
#define OUT_CHUNK (64 * 1024)
#define FILE_CHUNK (256 * 1024)
#define EXIT_GRACE_MS 100
#define STDIN_HIGH_WATER (8u * 1024 * 1024)
#define RECONNECT_POLL_MS 25 /* --reconnect: how often a host-less port is checked */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

struct chunk {
	struct chunk *next;
	size_t len, off;
	uint8_t data[];
};

struct proc {
	int used;
	uint32_t id;
	pid_t pid;
	int out_fd, err_fd, in_fd, pty_fd; /* pty_fd: master, used for resize only */
	int pty, in_close_pending, exited, status, timed_out;
	int paused; /* PAUSE: its output pipes are not read until RESUME (the host's back-pressure) */
	struct chunk *in_head, *in_tail;
	size_t in_queued;
	int64_t deadline, exit_at;
	int pi_out, pi_err, pi_in; /* index into this loop iteration's pollfd array, or -1 */
};

struct xfer {
	int used, writing, err, append, has_limit, paused;
	uint32_t id, mode;
	int fd;
	uint64_t remaining, done;
	char *tmp, *final;
};

static struct proc procs[MAX_PROCS];
static struct exit_memory exits; /* QUERY: how the last commands ended (proto.h) */
static struct xfer xfers[MAX_XFERS];
static int nprocs, nxfers, nreading;

static int rfd = -1, wfd = -1, listen_fd = -1, sig_fd = -1;
/* --peers-outside: the listen socket serves only peers outside our pid namespace. */
static int peers_outside;

/* Whether the peer of connection `fd` is a process of our own pid namespace (or one below
 * it): the kernel reports pid 0 for a peer it cannot name here, as the daemon outside. A
 * sandbox's command sees the listen socket, and connect() ignores read-only mounts. */
static int peer_inside(int fd)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || len != sizeof(cred))
		return 1; /* unknown: refuse */
	return cred.pid != 0;
}

/* --give: a descriptor the host handed in for one command's stdin and stdout (EXEC with
 * GIVEN_STDIO; the wasm backend's worker talks to the host over it, not through us).
 * Close-on-exec while we hold it, and ours no more once handed out. */
static int given_fd = -1;
static int conn_dead, is_init;
/* --reconnect (with --vport): the host may hang up and come back; host_away while it is
 * gone. virtio_console reports a host-less port as POLLHUP (and read() as 0) continuously,
 * so its return is noticed by polling every RECONNECT_POLL_MS, not by waiting on the fd. */
static int vport_reconnect, host_away;
static int vm_poweroff; /* --poweroff: as PID 1, end the VM instead of panicking the kernel */
static uint8_t ibuf[AK_HDR + AK_MAX_PAYLOAD + 65536];
static size_t ilen;
static uint8_t obuf[AK_HDR + AK_MAX_PAYLOAD];
static size_t olen; /* payload bytes in obuf after the header slot */
static uint8_t rbuf[FILE_CHUNK];

static const int fwd_signals[] = { SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 };

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("ak-agent: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(125);
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0)
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void xclose(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* ---------- channel output ---------- */

static void chan_write(const struct iovec *iov_in, int n)
{
	struct iovec iov[2];
	if (host_away)
		return; /* nobody to tell: the next session starts afresh */
	memcpy(iov, iov_in, sizeof(struct iovec) * (size_t)n);
	int i = 0;
	while (!conn_dead && i < n) {
		ssize_t w = writev(wfd, iov + i, n - i);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) { /* the fd we were handed may be non-blocking */
				struct pollfd p = { .fd = wfd, .events = POLLOUT };
				if (poll(&p, 1, -1) > 0 && (p.revents & (POLLHUP | POLLERR)) &&
				    !(p.revents & POLLOUT)) {
					conn_dead = 1; /* the host hung up (a virtio port never says EPIPE) */
					return;
				}
				continue;
			}
			conn_dead = 1;
			return;
		}
		size_t left = (size_t)w;
		while (i < n && left >= iov[i].iov_len)
			left -= iov[i++].iov_len;
		if (i < n) {
			iov[i].iov_base = (uint8_t *)iov[i].iov_base + left;
			iov[i].iov_len -= left;
		}
	}
}

static void send_frame(uint16_t type, uint32_t chan, const void *payload, size_t len)
{
	uint8_t h[AK_HDR];
	wr32(h, (uint32_t)len);
	wr16(h + 4, type);
	wr16(h + 6, 0);
	wr32(h + 8, chan);
	struct iovec iov[2] = { { h, AK_HDR }, { (void *)payload, len } };
	chan_write(iov, len ? 2 : 1);
}

/* obuf is a TLV builder for the one structured reply being assembled at a time. */
static void ob_reset(void) { olen = 0; }
static void ob_tlv(uint16_t tag, const void *v, size_t len)
{
	if (olen + 6 + len > AK_MAX_PAYLOAD)
		return; /* cannot happen with our bounded inputs; never overflow */
	uint8_t *p = obuf + AK_HDR + olen;
	wr16(p, tag);
	wr32(p + 2, (uint32_t)len);
	memcpy(p + 6, v, len);
	olen += 6 + len;
}
static void ob_u8(uint16_t tag, uint8_t v) { ob_tlv(tag, &v, 1); }
static void ob_u32(uint16_t tag, uint32_t v)
{
	uint8_t b[4];
	wr32(b, v);
	ob_tlv(tag, b, 4);
}
static void ob_u64(uint16_t tag, uint64_t v)
{
	uint8_t b[8];
	wr64(b, v);
	ob_tlv(tag, b, 8);
}
static void ob_str(uint16_t tag, const char *s) { ob_tlv(tag, s, strlen(s)); }
static void ob_send(uint16_t type, uint32_t chan) { send_frame(type, chan, obuf + AK_HDR, olen); }

/* Errors use their own small buffer so they can be sent while obuf is half built. */
static void send_error_stage(uint32_t chan, int err, const char *stage, const char *fmt, ...)
{
	uint8_t b[6 + 4 + 6 + 512 + 6 + 32];
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	size_t ml = m < 0 ? 0 : (size_t)m >= sizeof(msg) ? sizeof(msg) - 1 : (size_t)m;
	size_t n = 0;
	wr16(b, G_ERRNO);
	wr32(b + 2, 4);
	wr32(b + 6, (uint32_t)err);
	n = 10;
	wr16(b + n, G_MESSAGE);
	wr32(b + n + 2, (uint32_t)ml);
	memcpy(b + n + 6, msg, ml);
	n += 6 + ml;
	if (stage) {
		size_t sl = strlen(stage);
		wr16(b + n, 62);
		wr32(b + n + 2, (uint32_t)sl);
		memcpy(b + n + 6, stage, sl);
		n += 6 + sl;
	}
	send_frame(T_ERROR, chan, b, n);
}
#define send_error(chan, err, ...) send_error_stage(chan, err, NULL, __VA_ARGS__)

static void send_ok(uint32_t chan) { send_frame(T_OK, chan, NULL, 0); }

static void send_hello(void)
{
	ob_reset();
	ob_u32(G_VERSION, AK_VERSION);
	ob_u32(G_PID, (uint32_t)getpid());
	ob_str(G_AGENT_NAME, AGENT_NAME);
	ob_u32(G_AGENT_UID, (uint32_t)getuid());
	ob_u32(G_FEATURES, AK_FEAT_QUERY);
	ob_send(T_HELLO, 0);
}

/* ---------- processes ---------- */

static struct proc *find_proc(uint32_t id)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (procs[i].used && procs[i].id == id)
			return &procs[i];
	return NULL;
}

static struct xfer *find_xfer(uint32_t id)
{
	for (int i = 0; i < MAX_XFERS; i++)
		if (xfers[i].used && xfers[i].id == id)
			return &xfers[i];
	return NULL;
}

static void stdin_drop(struct proc *p)
{
	while (p->in_head) {
		struct chunk *c = p->in_head;
		p->in_head = c->next;
		free(c);
	}
	p->in_tail = NULL;
	p->in_queued = 0;
	xclose(&p->in_fd);
}

static void kill_all(int sig)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (procs[i].used && procs[i].pid > 0 && (!procs[i].exited || sig == SIGKILL))
			kill(-procs[i].pid, sig); /* after exit this still reaches leftover grandchildren */
}

static void vm_exit(void);

static void terminate(int code)
{
	kill_all(SIGKILL);
	if (getpid() == 1)
		kill(-1, SIGKILL);
	vm_exit();
	exit(code);
}

static void child_fail(int pipefd, uint32_t stage)
{
	uint8_t b[8];
	wr32(b, stage);
	wr32(b + 4, (uint32_t)errno);
	ssize_t r = write(pipefd, b, sizeof(b));
	(void)r;
	_exit(127);
}

/* execvpe-like search that uses PATH from the command's own environment. */
static void exec_search(char **argv, char **envp)
{
	const char *file = argv[0];
	if (!*file) {
		errno = ENOENT;
		return;
	}
	if (strchr(file, '/')) {
		execve(file, argv, envp);
		return;
	}
	const char *path = DEFAULT_PATH;
	for (char **e = envp; *e; e++)
		if (!strncmp(*e, "PATH=", 5))
			path = *e + 5;
	size_t fl = strlen(file);
	if (fl > NAME_MAX) {
		errno = ENAMETOOLONG;
		return;
	}
	int seen_eacces = 0;
	char buf[PATH_MAX];
	for (const char *p = path;; p++) {
		const char *end = strchrnul(p, ':');
		size_t dl = (size_t)(end - p);
		if (dl + 1 + fl < sizeof(buf)) {
			if (dl) {
				memcpy(buf, p, dl);
				buf[dl] = '/';
				memcpy(buf + dl + 1, file, fl + 1);
			} else {
				memcpy(buf, file, fl + 1); /* empty element = current directory */
			}
			execve(buf, argv, envp);
			switch (errno) {
			case EACCES:
				seen_eacces = 1;
				break;
			case ENOENT: case ENOTDIR: case ESTALE: case ENODEV: case ETIMEDOUT: case ELOOP:
			case ENAMETOOLONG:
				break;
			default:
				return;
			}
		}
		if (!*end)
			break;
		p = end;
	}
	errno = seen_eacces ? EACCES : ENOENT;
}

enum { ST_SETUP = 1, ST_RLIMIT, ST_CRED, ST_CHDIR, ST_EXEC };
static const char *stage_names[] = { "setup", "setup", "rlimit", "credentials", "chdir", "exec" };

/* A command gets stdin, stdout and stderr, nothing else of ours: whatever the sandbox's
 * start left open in its init (bwrap's --sync-fd lifeline, a runtime's descriptors) is
 * closed at the exec. Close-on-exec rather than closed: errp reports a failed exec. */
#ifndef SYS_close_range
#define SYS_close_range 436 /* the same number on every architecture */
#endif
#define AK_CLOSE_RANGE_CLOEXEC (1U << 2)
static int keep_only_stdio(void)
{
	if (syscall(SYS_close_range, 3U, ~0U, AK_CLOSE_RANGE_CLOEXEC) == 0)
		return 0;
	DIR *d = opendir("/proc/self/fd"); /* (a kernel or gVisor without close_range) */
	if (!d)
		return -1; /* no way to know what is open: the command does not start */
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		int fd = atoi(e->d_name);
		if (fd > 2 && fd != dirfd(d))
			fcntl(fd, F_SETFD, FD_CLOEXEC);
	}
	closedir(d);
	return 0;
}

static void child_main(struct exec_req *r, int errp, int in_r, int out_w, int err_w, int slave)
{
	sigset_t none;
	sigemptyset(&none);
	for (int s = 1; s < NSIG; s++)
		signal(s, SIG_DFL);
	sigprocmask(SIG_SETMASK, &none, NULL);
	if (slave >= 0) {
		if (setsid() < 0 || ioctl(slave, TIOCSCTTY, 0) < 0)
			child_fail(errp, ST_SETUP);
		if (dup2(slave, 0) < 0 || dup2(slave, 1) < 0 || dup2(slave, 2) < 0)
			child_fail(errp, ST_SETUP);
	} else {
		if (setpgid(0, 0) < 0)
			child_fail(errp, ST_SETUP);
		if (dup2(in_r, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0)
			child_fail(errp, ST_SETUP);
	}
	if (keep_only_stdio() < 0)
		child_fail(errp, ST_SETUP);
	for (uint32_t i = 0; i < r->nrlimits; i++) {
		struct rlimit rl = { (rlim_t)r->rlimits[i].soft, (rlim_t)r->rlimits[i].hard };
		if (setrlimit((int)r->rlimits[i].resource, &rl) < 0)
			child_fail(errp, ST_RLIMIT);
	}
	umask(r->has_umask ? (mode_t)r->umask : 022);
	if (r->has_uid || r->has_gid) {
		if (setgroups(0, NULL) < 0) {
			/* Without CAP_SETGID (e.g. rootless) this fails; fine if nothing changes. */
			int same = (!r->has_uid || r->uid == getuid()) && (!r->has_gid || r->gid == getgid());
			if (errno != EPERM || !same)
				child_fail(errp, ST_CRED);
		}
		if (r->has_gid && setgid(r->gid) < 0)
			child_fail(errp, ST_CRED);
		if (r->has_uid && setuid(r->uid) < 0)
			child_fail(errp, ST_CRED);
	}
	if (r->cwd && chdir(r->cwd) < 0)
		child_fail(errp, ST_CHDIR);
	exec_search(r->argv, r->envp);
	child_fail(errp, ST_EXEC);
}

static int open_devnull(int flags)
{
	int fd = open("/dev/null", flags | O_CLOEXEC);
	if (fd >= 0)
		return fd;
	/* No /dev yet (early init): an empty pipe with its write end closed reads as EOF. */
	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0)
		return -1;
	if (flags == O_RDONLY) {
		close(p[1]);
		return p[0];
	}
	close(p[0]);
	return p[1];
}

static void do_exec(uint32_t chan, const uint8_t *pl, size_t n)
{
	struct exec_req r;
	char err[256];
	int e;

	if (chan == 0 || find_proc(chan) || find_xfer(chan)) {
		send_error(chan, EBUSY, "exec: channel %u is in use", chan);
		return;
	}
	exits_forget(&exits, chan); /* the channel's new command: no answer of an old one */
	struct proc *slot = NULL;
	for (int i = 0; i < MAX_PROCS && !slot; i++)
		if (!procs[i].used)
			slot = &procs[i];
	if (!slot) {
		send_error(chan, EAGAIN, "exec: too many concurrent processes (max %d)", MAX_PROCS);
		return;
	}
	if ((e = parse_exec(pl, n, &r, err, sizeof(err))) != 0) {
		send_error(chan, e, "%s", err);
		return;
	}
	int errp[2] = { -1, -1 }, inp[2] = { -1, -1 }, outp[2] = { -1, -1 }, errpp[2] = { -1, -1 };
	int master = -1, slave = -1, in_w = -1;
	int giving = r.given_stdio; /* stdin and stdout: the --give descriptor */
	if (giving && (r.has_pty || given_fd < 0)) {
		const char *why = r.has_pty ? "GIVEN_STDIO and PTY exclude each other"
					    : "no given descriptor to hand over";
		e = r.has_pty ? EINVAL : EBADF;
		exec_req_free(&r);
		send_error_stage(chan, e, "setup", "exec setup: %s", why);
		return;
	}
	if (pipe2(errp, O_CLOEXEC) < 0)
		goto sysfail;
	if (giving) {
		if (pipe2(errpp, O_CLOEXEC) < 0)
			goto sysfail;
		inp[0] = given_fd; /* its stdin and stdout: the child's dup2s clear close-on-exec */
		outp[1] = given_fd;
	} else if (r.has_pty) {
		char name[64];
		struct winsize ws = { .ws_row = r.rows, .ws_col = r.cols };
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
		    ptsname_r(master, name, sizeof(name)) != 0)
			goto sysfail;
		slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (slave < 0 || ioctl(master, TIOCSWINSZ, &ws) < 0)
			goto sysfail;
		outp[0] = fcntl(master, F_DUPFD_CLOEXEC, 3);
		in_w = fcntl(master, F_DUPFD_CLOEXEC, 3);
		if (outp[0] < 0 || in_w < 0)
			goto sysfail;
	} else {
		if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errpp, O_CLOEXEC) < 0)
			goto sysfail;
		if (r.want_stdin) {
			if (pipe2(inp, O_CLOEXEC) < 0)
				goto sysfail;
			in_w = inp[1];
			inp[1] = -1;
		} else if ((inp[0] = open_devnull(O_RDONLY)) < 0) {
			goto sysfail;
		}
	}
	pid_t pid = fork();
	if (pid < 0)
		goto sysfail;
	if (pid == 0)
		child_main(&r, errp[1], inp[0], outp[1], errpp[1], slave);
	exec_req_free(&r);
	if (giving) { /* handed over: the child's alone now */
		xclose(&given_fd);
		inp[0] = outp[1] = -1;
	}
	xclose(&errp[1]);
	xclose(&inp[0]);
	xclose(&outp[1]);
	xclose(&errpp[1]);
	xclose(&slave);
	/* Block until the child has exec'd (pipe closes) or reported why it could not. */
	uint8_t rep[8];
	size_t got = 0;
	while (got < sizeof(rep)) {
		ssize_t k = read(errp[0], rep + got, sizeof(rep) - got);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			break;
		got += (size_t)k;
	}
	xclose(&errp[0]);
	if (got == sizeof(rep)) {
		uint32_t stage = rd32(rep), cerr = rd32(rep + 4);
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
		xclose(&outp[0]);
		xclose(&errpp[0]);
		xclose(&in_w);
		xclose(&master);
		const char *sn = stage < 6 ? stage_names[stage] : "setup";
		send_error_stage(chan, (int)cerr, sn, "%s: %s", sn, strerror((int)cerr));
		return;
	}
	struct proc *p = slot;
	memset(p, 0, sizeof(*p));
	p->used = 1;
	p->id = chan;
	p->pid = pid;
	p->out_fd = outp[0];
	p->err_fd = errpp[0];
	p->in_fd = in_w;
	p->pty_fd = master;
	p->pty = master >= 0;
	p->deadline = r.timeout_ms ? now_ms() + r.timeout_ms : 0;
	p->pi_out = p->pi_err = p->pi_in = -1;
	if (p->out_fd >= 0)
		set_nonblock(p->out_fd);
	if (p->err_fd >= 0)
		set_nonblock(p->err_fd);
	if (p->in_fd >= 0)
		set_nonblock(p->in_fd);
	nprocs++;
	uint8_t b[4];
	wr32(b, (uint32_t)pid);
	send_frame(T_STARTED, chan, b, 4);
	return;
sysfail:
	e = errno;
	exec_req_free(&r);
	if (giving) /* not handed over: still ours to give */
		inp[0] = outp[1] = -1;
	xclose(&errp[0]);
	xclose(&errp[1]);
	xclose(&inp[0]);
	xclose(&inp[1]);
	xclose(&outp[0]);
	xclose(&outp[1]);
	xclose(&errpp[0]);
	xclose(&errpp[1]);
	xclose(&master);
	xclose(&slave);
	xclose(&in_w);
	send_error_stage(chan, e, "setup", "exec setup: %s", strerror(e));
}

static void free_proc(struct proc *p)
{
	stdin_drop(p);
	xclose(&p->out_fd);
	xclose(&p->err_fd);
	xclose(&p->pty_fd);
	p->used = 0;
	nprocs--;
}

/* Pump queued stdin into the child's pipe without ever blocking the loop. */
static void stdin_flush(struct proc *p)
{
	while (p->in_fd >= 0 && p->in_head) {
		struct chunk *c = p->in_head;
		ssize_t w = write(p->in_fd, c->data + c->off, c->len - c->off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return;
			stdin_drop(p); /* EPIPE: the child closed its stdin */
			return;
		}
		c->off += (size_t)w;
		p->in_queued -= (size_t)w;
		if (c->off == c->len) {
			p->in_head = c->next;
			if (!p->in_head)
				p->in_tail = NULL;
			free(c);
		}
	}
	if (p->in_fd >= 0 && !p->in_head && p->in_close_pending) {
		if (p->pty) {
			const char eof = 4; /* ^D: the terminal's end-of-file in canonical mode */
			ssize_t w = write(p->in_fd, &eof, 1);
			(void)w;
		}
		xclose(&p->in_fd);
	}
}

static void do_stdin(uint32_t chan, const uint8_t *pl, size_t n)
{
	struct proc *p = find_proc(chan);
	if (!p || p->exited || p->in_fd < 0)
		return; /* late or pointless input is dropped: the process cannot read it */
	if (n == 0) {
		p->in_close_pending = 1;
	} else {
		struct chunk *c = malloc(sizeof(*c) + n);
		if (!c) {
			send_error(chan, ENOMEM, "stdin: out of memory");
			return;
		}
		c->next = NULL;
		c->len = n;
		c->off = 0;
		memcpy(c->data, pl, n);
		if (p->in_tail)
			p->in_tail->next = c;
		else
			p->in_head = c;
		p->in_tail = c;
		p->in_queued += n;
	}
	stdin_flush(p);
}

static void do_signal(uint32_t chan, const uint8_t *pl, size_t n)
{
	if (n != 4) {
		send_error(chan, EINVAL, "signal: payload must be u32");
		return;
	}
	uint32_t sig = rd32(pl);
	if (sig == 0 || sig >= NSIG) {
		send_error(chan, EINVAL, "signal: bad signal number %u", sig);
		return;
	}
	struct proc *p = find_proc(chan);
	if (p && !p->exited)
		kill(-p->pid, (int)sig);
}

static void do_resize(uint32_t chan, const uint8_t *pl, size_t n)
{
	if (n != 4) {
		send_error(chan, EINVAL, "resize: payload must be u16 rows + u16 cols");
		return;
	}
	struct proc *p = find_proc(chan);
	if (!p || !p->pty || p->pty_fd < 0)
		return;
	struct winsize ws = { .ws_row = rd16(pl), .ws_col = rd16(pl + 2) };
	ioctl(p->pty_fd, TIOCSWINSZ, &ws);
}

/* Read what is available from a child's output; returns 0 on EOF/error (fd closed). */
static int pump_output(struct proc *p, int *fd, uint16_t type, int until_empty)
{
	do {
		ssize_t k = read(*fd, rbuf, OUT_CHUNK);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && errno == EAGAIN)
			return 1;
		if (k <= 0) { /* EOF, or EIO from a pty master whose slave is gone */
			xclose(fd);
			return 0;
		}
		send_frame(type, p->id, rbuf, (size_t)k);
	} while (until_empty && !conn_dead);
	return 1;
}

static void send_exit_of(uint32_t chan, uint32_t pid, int status, int timed_out)
{
	ob_reset();
	if (WIFEXITED(status))
		ob_u32(G_CODE, (uint32_t)WEXITSTATUS(status));
	if (WIFSIGNALED(status)) {
		ob_u32(G_SIGNAL, (uint32_t)WTERMSIG(status));
		ob_u8(G_CORE, WCOREDUMP(status) ? 1 : 0);
	}
	ob_u8(G_TIMED_OUT, (uint8_t)timed_out);
	ob_u32(G_PID, pid);
	ob_send(T_EXIT, chan);
}

static void send_exit(struct proc *p)
{
	send_exit_of(p->id, (uint32_t)p->pid, p->status, p->timed_out);
	exits_record(&exits, p->id, (uint32_t)p->pid, (int32_t)p->status, (uint8_t)p->timed_out);
	/* A write that failed leaves the command to the next connection (--listen,
	 * --reconnect), which gets its EXIT like that of any command that ended meanwhile. */
	if (!conn_dead)
		free_proc(p);
}

/* QUERY (1.3): has the command on `chan` ended, and how? A live one: STARTED with its pid
 * (its EXIT follows in due course); a remembered one: its EXIT again; else ESRCH. */
static void do_query(uint32_t chan, size_t n)
{
	if (n != 0 || chan == 0) {
		send_error(chan, EINVAL, "query: wants an empty payload on a command's channel");
		return;
	}
	struct proc *p = find_proc(chan);
	const struct exit_rec *r = exits_find(&exits, chan);
	if (p) {
		uint8_t b[4];
		wr32(b, (uint32_t)p->pid);
		send_frame(T_STARTED, chan, b, sizeof(b));
	} else if (r) {
		send_exit_of(chan, r->pid, r->status, r->timed_out);
	} else {
		send_error(chan, ESRCH, "query: no command on channel %u, nor one that ended lately",
			   chan);
	}
}

static void reap(void)
{
	int st;
	pid_t pid;
	while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			if (p->used && !p->exited && p->pid == pid) {
				p->exited = 1;
				p->status = st;
				p->exit_at = now_ms();
				stdin_drop(p);
				break;
			}
		}
		/* Anything else is an orphan we inherited as init/subreaper: reaped, forgotten. */
	}
}

/* ---------- file transfers and file-system requests ---------- */

static struct xfer *new_xfer(uint32_t chan)
{
	if (chan == 0 || find_xfer(chan) || find_proc(chan)) {
		send_error(chan, EBUSY, "transfer: channel %u is in use", chan);
		return NULL;
	}
	if (nxfers >= MAX_XFERS) {
		send_error(chan, EAGAIN, "transfer: too many concurrent transfers (max %d)", MAX_XFERS);
		return NULL;
	}
	for (int i = 0; i < MAX_XFERS; i++)
		if (!xfers[i].used) {
			memset(&xfers[i], 0, sizeof(xfers[i]));
			xfers[i].used = 1;
			xfers[i].id = chan;
			xfers[i].fd = -1;
			nxfers++;
			return &xfers[i];
		}
	return NULL;
}

static void free_xfer(struct xfer *x, int unlink_tmp)
{
	xclose(&x->fd);
	if (x->tmp && unlink_tmp)
		unlink(x->tmp);
	free(x->tmp);
	free(x->final);
	if (!x->writing)
		nreading--;
	x->used = 0;
	nxfers--;
}

static int mkdir_p(const char *path, mode_t mode)
{
	char buf[AK_MAX_PATH + 1];
	size_t n = strlen(path);
	if (n > AK_MAX_PATH)
		return ENAMETOOLONG;
	memcpy(buf, path, n + 1);
	for (size_t i = 1; i <= n; i++) {
		if (buf[i] != '/' && buf[i] != 0)
			continue;
		char c = buf[i];
		buf[i] = 0;
		if (mkdir(buf, mode) < 0) {
			struct stat st;
			int e = errno;
			if (e != EEXIST || stat(buf, &st) < 0 || !S_ISDIR(st.st_mode))
				return e == EEXIST ? ENOTDIR : e;
		}
		buf[i] = c;
	}
	return 0;
}

static void do_file_read(uint32_t chan, const uint8_t *pl, size_t n)
{
	struct path_req q;
	char err[256];
	int e;
	if ((e = parse_path_req(pl, n, &q, err, sizeof(err))) != 0) {
		send_error(chan, e, "file_read: %s", err);
		return;
	}
	struct xfer *x = new_xfer(chan);
	if (!x)
		return;
	nreading++; /* x->writing == 0 */
	struct stat st;
	x->fd = open(q.path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (x->fd < 0 || fstat(x->fd, &st) < 0) {
		e = errno;
		goto fail;
	}
	if (S_ISDIR(st.st_mode)) {
		e = EISDIR;
		goto fail;
	}
	/* Regular files only: a FIFO or socket could block the single-threaded agent forever,
	 * and a device (a symlink to /dev/zero, a disk) has no end. fstat of the opened fd: what
	 * was checked is what is read. */
	if (!S_ISREG(st.st_mode)) {
		send_error(chan, EINVAL, "read %s: not a regular file (%s)", q.path, strerror(EINVAL));
		free_xfer(x, 0);
		return;
	}
	fcntl(x->fd, F_SETFL, 0);
	if (q.has_offset && lseek(x->fd, (off_t)q.offset, SEEK_SET) < 0) {
		e = errno;
		goto fail;
	}
	x->has_limit = q.has_length;
	x->remaining = q.length;
	return;
fail:
	send_error(chan, e, "read %s: %s", q.path, strerror(e));
	free_xfer(x, 0);
}

/* Read transfers that may send now (not paused by the host). */
static int reads_due(void)
{
	int n = 0;
	for (int i = 0; i < MAX_XFERS && nreading; i++)
		n += xfers[i].used && !xfers[i].writing && !xfers[i].paused;
	return n;
}

/* Send one chunk for every active read transfer (round-robin keeps everything moving). */
static void pump_reads(void)
{
	for (int i = 0; i < MAX_XFERS && !conn_dead; i++) {
		struct xfer *x = &xfers[i];
		if (!x->used || x->writing || x->paused)
			continue;
		size_t want = FILE_CHUNK;
		if (x->has_limit && x->remaining < want)
			want = (size_t)x->remaining;
		ssize_t k = want ? read(x->fd, rbuf, want) : 0;
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0) {
			int e = errno;
			send_error(x->id, e, "read: %s", strerror(e));
			free_xfer(x, 0);
		} else if (k == 0) {
			ob_reset();
			ob_u64(G_SIZE, x->done);
			ob_send(T_FILE_END, x->id);
			free_xfer(x, 0);
		} else {
			send_frame(T_FILE_DATA, x->id, rbuf, (size_t)k);
			x->done += (uint64_t)k;
			x->remaining -= x->has_limit ? (uint64_t)k : 0;
		}
	}
}

static void do_file_write(uint32_t chan, const uint8_t *pl, size_t n)
{
	struct path_req q;
	char err[256];
	int e;
	if ((e = parse_path_req(pl, n, &q, err, sizeof(err))) != 0) {
		send_error(chan, e, "file_write: %s", err);
		return;
	}
	struct xfer *x = new_xfer(chan);
	if (!x)
		return;
	x->writing = 1;
	x->append = q.append;
	x->mode = q.has_mode ? q.mode : 0644;
	char dir[AK_MAX_PATH + 1];
	strcpy(dir, q.path);
	char *slash = strrchr(dir, '/');
	const char *base = slash + 1;
	if (!*base) {
		e = EISDIR;
		goto fail;
	}
	*slash = 0;
	if (q.mkdirs && dir[0] && (e = mkdir_p(dir, 0755)) != 0)
		goto fail;
	struct stat st;
	if (lstat(q.path, &st) == 0 && S_ISDIR(st.st_mode)) {
		e = EISDIR;
		goto fail;
	}
	if (q.append) {
		x->fd = open(q.path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (x->fd >= 0)
			fchmod(x->fd, x->mode); /* new file: exact mode, independent of our umask */
		else if (errno == EEXIST) /* O_NONBLOCK: opening a FIFO must not block the agent */
			x->fd = open(q.path, O_WRONLY | O_APPEND | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
		if (x->fd < 0 || fstat(x->fd, &st) < 0) {
			e = errno;
			goto fail;
		}
		if (!S_ISREG(st.st_mode) && !S_ISCHR(st.st_mode)) {
			e = EINVAL;
			goto fail;
		}
		fcntl(x->fd, F_SETFL, O_APPEND);
	} else {
		/* Write beside the target and rename at close: readers never see a torn file. */
		size_t need = strlen(dir) + strlen(base) + 32;
		x->final = strdup(q.path);
		x->tmp = malloc(need);
		if (!x->final || !x->tmp) {
			e = ENOMEM;
			goto fail;
		}
		snprintf(x->tmp, need, "%s/.%.200s.ak-XXXXXX", dir, base);
		x->fd = mkostemp(x->tmp, O_CLOEXEC);
		if (x->fd < 0) {
			e = errno;
			free(x->tmp);
			x->tmp = NULL;
			goto fail;
		}
	}
	send_ok(chan);
	return;
fail:
	send_error(chan, e, "write %s: %s", q.path, strerror(e));
	free_xfer(x, 1);
}

static void do_file_chunk(uint32_t chan, const uint8_t *pl, size_t n)
{
	struct xfer *x = find_xfer(chan);
	if (!x || !x->writing) {
		send_error(chan, EBADF, "file_chunk: no open write transfer on channel %u", chan);
		return;
	}
	while (!x->err && n) {
		ssize_t w = write(x->fd, pl, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			x->err = w < 0 ? errno : EIO; /* reported at FILE_CLOSE; later chunks are dropped */
			break;
		}
		pl += w;
		n -= (size_t)w;
		x->done += (uint64_t)w;
	}
}

static void do_file_close(uint32_t chan)
{
	struct xfer *x = find_xfer(chan);
	if (!x || !x->writing) {
		send_error(chan, EBADF, "file_close: no open write transfer on channel %u", chan);
		return;
	}
	int e = x->err;
	if (!e && x->tmp && fchmod(x->fd, x->mode) < 0)
		e = errno;
	if (close(x->fd) < 0 && !e)
		e = errno;
	x->fd = -1;
	if (!e && x->tmp && rename(x->tmp, x->final) < 0)
		e = errno;
	if (e) {
		send_error(chan, e, "write: %s", strerror(e));
		free_xfer(x, 1);
		return;
	}
	ob_reset();
	ob_u64(G_SIZE, x->done);
	ob_send(T_OK, chan);
	free_xfer(x, 0);
}

static uint8_t file_type(mode_t m)
{
	return S_ISREG(m) ? 1 : S_ISDIR(m) ? 2 : S_ISLNK(m) ? 3 : 4;
}

static void do_stat(uint32_t chan, const uint8_t *pl, size_t n)
{
	struct path_req q;
	char err[256];
	int e;
	if ((e = parse_path_req(pl, n, &q, err, sizeof(err))) != 0) {
		send_error(chan, e, "stat: %s", err);
		return;
	}
	struct stat st;
	if ((q.follow ? stat(q.path, &st) : lstat(q.path, &st)) < 0) {
		e = errno;
		send_error(chan, e, "stat %s: %s", q.path, strerror(e));
		return;
	}
	ob_reset();
	ob_u8(G_TYPE, file_type(st.st_mode));
	ob_u32(G_ST_MODE, st.st_mode & 07777);
	ob_u64(G_ST_SIZE, (uint64_t)st.st_size);
	ob_u64(G_MTIME_NS, (uint64_t)st.st_mtim.tv_sec * 1000000000ull + (uint64_t)st.st_mtim.tv_nsec);
	ob_u32(G_UID_ST, st.st_uid);
	ob_u32(G_GID_ST, st.st_gid);
	if (S_ISLNK(st.st_mode)) {
		char target[AK_MAX_PATH];
		ssize_t k = readlink(q.path, target, sizeof(target));
		if (k >= 0)
			ob_tlv(G_LINK_TARGET, target, (size_t)k);
	}
	ob_send(T_STAT_RESULT, chan);
}

static void do_list(uint32_t chan, const uint8_t *pl, size_t n)
{
	struct path_req q;
	char err[256];
	int e;
	if ((e = parse_path_req(pl, n, &q, err, sizeof(err))) != 0) {
		send_error(chan, e, "list: %s", err);
		return;
	}
	int fd = open(q.path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		e = errno;
		if (fd >= 0)
			close(fd);
		send_error(chan, e, "list %s: %s", q.path, strerror(e));
		return;
	}
	struct dirent *de;
	ob_reset();
	while ((de = readdir(d)) != NULL) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		struct stat st;
		if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue; /* vanished while listing */
		if (olen > 60 * 1024) { /* keep frames modest; the host concatenates them */
			ob_send(T_LIST_RESULT, chan);
			ob_reset();
		}
		ob_str(G_NAME, de->d_name);
		ob_u8(G_TYPE, file_type(st.st_mode));
		ob_u64(G_ST_SIZE, (uint64_t)st.st_size);
		ob_u32(G_ST_MODE, st.st_mode & 07777);
	}
	closedir(d);
	if (olen)
		ob_send(T_LIST_RESULT, chan);
	send_ok(chan);
}

static void do_mkdir(uint32_t chan, const uint8_t *pl, size_t n)
{
	struct path_req q;
	char err[256];
	int e;
	if ((e = parse_path_req(pl, n, &q, err, sizeof(err))) != 0) {
		send_error(chan, e, "mkdir: %s", err);
		return;
	}
	mode_t mode = q.has_mode ? q.mode : 0755;
	e = q.parents ? mkdir_p(q.path, mode) : (mkdir(q.path, mode) < 0 ? errno : 0);
	if (e)
		send_error(chan, e, "mkdir %s: %s", q.path, strerror(e));
	else
		send_ok(chan);
}

/* Empty the directory open at fd; never follows symlinks (they are unlinked as entries). */
static int rm_tree(int fd, int depth)
{
	if (depth > 256)
		return ELOOP;
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return errno;
	}
	int e = 0;
	struct dirent *de;
	while ((de = readdir(d)) != NULL) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		struct stat st;
		if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue;
		if (S_ISDIR(st.st_mode)) {
			int sub = openat(dirfd(d), de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			int se = sub < 0 ? errno : rm_tree(sub, depth + 1);
			if (!se && unlinkat(dirfd(d), de->d_name, AT_REMOVEDIR) < 0)
				se = errno;
			if (se && !e)
				e = se;
		} else if (unlinkat(dirfd(d), de->d_name, 0) < 0 && !e) {
			e = errno;
		}
	}
	closedir(d);
	return e;
}

static void do_remove(uint32_t chan, const uint8_t *pl, size_t n)
{
	struct path_req q;
	char err[256];
	int e = 0;
	if ((e = parse_path_req(pl, n, &q, err, sizeof(err))) != 0) {
		send_error(chan, e, "remove: %s", err);
		return;
	}
	struct stat st;
	if (lstat(q.path, &st) < 0) {
		e = errno;
	} else if (S_ISDIR(st.st_mode)) {
		if (q.recursive) {
			int fd = open(q.path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			e = fd < 0 ? errno : rm_tree(fd, 0);
		}
		if (!e && rmdir(q.path) < 0)
			e = errno;
	} else if (unlink(q.path) < 0) {
		e = errno;
	}
	if (e)
		send_error(chan, e, "remove %s: %s", q.path, strerror(e));
	else
		send_ok(chan);
}

/* ---------- CLONE: a VM restored from a snapshot becomes its own machine ---------- */

/* One scan of sysfs class dir CLASS for an entry whose ATTR file reads WANT: 0 and its
 * /dev path in DEV, or ENODEV. */
static int find_sysfs_device(const char *class, const char *attr, const char *want,
			     char *dev, size_t dev_size)
{
	DIR *d = opendir(class);
	struct dirent *de;
	int e = ENODEV;
	while (d && (de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		char p[512], buf[256];
		snprintf(p, sizeof(p), "%s/%s/%s", class, de->d_name, attr);
		int fd = open(p, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t k = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (k <= 0)
			continue;
		buf[k] = 0;
		buf[strcspn(buf, "\n")] = 0;
		if (!strcmp(buf, want)) {
			snprintf(dev, dev_size, "/dev/%s", de->d_name);
			e = 0;
			break;
		}
	}
	if (d)
		closedir(d);
	return e;
}

/* The block device whose virtio serial is SERIAL, now (a restored VM probed its disks
 * before the snapshot was taken): 0 and the /dev path, or an errno. */
static int clone_find_disk(const char *serial, char *dev, size_t size)
{
	return find_sysfs_device("/sys/block", "serial", serial, dev, size);
}

/* <linux/random.h>, which musl's headers lack. */
#define AK_RNDADDENTROPY _IOW('R', 0x03, int[2])
#define AK_RNDRESEEDCRNG _IO('R', 0x07)

static void do_clone(uint32_t chan, const uint8_t *pl, size_t n)
{
	static struct clone_req q; /* 4+ KiB: not on the stack */
	char err[256];
	int e;
	if ((e = parse_clone(pl, n, &q, err, sizeof(err))) != 0) {
		send_error(chan, e, "%s", err);
		return;
	}
	/* Fresh entropy first: every clone starts with the template's pool and CRNG state. */
	int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		send_error(chan, errno, "clone: open /dev/urandom: %s", strerror(errno));
		return;
	}
	struct {
		int entropy_count, buf_size; /* struct rand_pool_info */
		uint8_t buf[AK_MAX_ENTROPY];
	} add;
	add.entropy_count = (int)(q.nentropy * 8);
	add.buf_size = (int)q.nentropy;
	memcpy(add.buf, q.entropy, q.nentropy);
	if (ioctl(fd, AK_RNDADDENTROPY, &add) < 0) {
		/* Without CAP_SYS_ADMIN the bytes are still mixed in, just not credited. */
		if (write(fd, q.entropy, q.nentropy) != (ssize_t)q.nentropy) {
			e = errno;
			close(fd);
			send_error(chan, e, "clone: add entropy: %s", strerror(e));
			return;
		}
	}
	e = ioctl(fd, AK_RNDRESEEDCRNG) < 0 ? errno : 0;
	close(fd);
	explicit_bzero(&add, sizeof(add));
	explicit_bzero(q.entropy, sizeof(q.entropy));
	if (e) {
		send_error(chan, e, "clone: reseed the CRNG: %s", strerror(e));
		return;
	}
	if (q.has_wallclock) {
		struct timespec ts = { .tv_sec = (time_t)(q.wallclock_ns / 1000000000u),
				       .tv_nsec = (long)(q.wallclock_ns % 1000000000u) };
		if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
			send_error(chan, errno, "clone: set the clock: %s", strerror(errno));
			return;
		}
	}
	if (q.has_hostname && sethostname(q.hostname, strlen(q.hostname)) < 0) {
		send_error(chan, errno, "clone: sethostname: %s", strerror(errno));
		return;
	}
	for (uint32_t i = 0; i < q.ndisks; i++) {
		char dev[280];
		struct clone_disk *dk = &q.disks[i];
		if ((e = clone_find_disk(dk->serial, dev, sizeof(dev))) != 0) {
			send_error(chan, e, "clone: no disk with serial %s", dk->serial);
			return;
		}
		mkdir_p(dk->target, 0755);
		if (mount(dev, dk->target, "ext4", (dk->readonly ? MS_RDONLY : 0) | MS_NOSUID | MS_NODEV,
			  "") < 0) {
			send_error(chan, errno, "clone: mount %s on %s: %s", dev, dk->target, strerror(errno));
			return;
		}
	}
	/* The host is talking to a new machine: greet it as on a new connection, then answer. */
	send_hello();
	send_ok(chan);
}

/* ---------- flow control (revision 1.2) ---------- */

/* PAUSE/RESUME: the host's queue for this channel is full (or drained again). A paused
 * command's pipes are left unread, so it blocks on write once they fill; a paused read
 * transfer sends nothing. Unknown or finished channels are ignored (they race with EXIT). */
static void do_flow(uint32_t chan, int paused)
{
	struct proc *p = find_proc(chan);
	struct xfer *x = find_xfer(chan);
	if (p)
		p->paused = paused;
	if (x && !x->writing)
		x->paused = paused;
}

/* CANCEL: the host gave up on the channel: a command's process group is killed (EXIT still
 * follows), a transfer is dropped (a write's temporary file removed). No reply. */
static void do_cancel(uint32_t chan)
{
	struct proc *p = find_proc(chan);
	struct xfer *x = find_xfer(chan);
	if (p) {
		p->paused = 0; /* let what is left drain so that EXIT comes */
		if (!p->exited)
			kill(-p->pid, SIGKILL);
	}
	if (x)
		free_xfer(x, 1);
}

/* ---------- frame dispatch ---------- */

static void dispatch(const struct frame_hdr *h, const uint8_t *pl)
{
	size_t n = h->len;
	switch (h->type) {
	case T_PING:
		if (n > AK_MAX_PING)
			send_error(h->chan, EMSGSIZE, "ping: payload over %u bytes", AK_MAX_PING);
		else
			send_frame(T_PONG, h->chan, pl, n);
		break;
	case T_EXEC: do_exec(h->chan, pl, n); break;
	case T_STDIN: do_stdin(h->chan, pl, n); break;
	case T_SIGNAL: do_signal(h->chan, pl, n); break;
	case T_RESIZE: do_resize(h->chan, pl, n); break;
	case T_FILE_READ: do_file_read(h->chan, pl, n); break;
	case T_FILE_WRITE: do_file_write(h->chan, pl, n); break;
	case T_FILE_CHUNK: do_file_chunk(h->chan, pl, n); break;
	case T_FILE_CLOSE: do_file_close(h->chan); break;
	case T_STAT: do_stat(h->chan, pl, n); break;
	case T_LIST: do_list(h->chan, pl, n); break;
	case T_MKDIR: do_mkdir(h->chan, pl, n); break;
	case T_REMOVE: do_remove(h->chan, pl, n); break;
	case T_CLONE: do_clone(h->chan, pl, n); break;
	case T_PAUSE: do_flow(h->chan, 1); break;
	case T_RESUME: do_flow(h->chan, 0); break;
	case T_CANCEL: do_cancel(h->chan); break;
	case T_QUERY: do_query(h->chan, n); break;
	case T_SHUTDOWN:
		kill_all(SIGKILL);
		if (vm_poweroff)
			sync(); /* the host may end the VMM once it has the OK: disks first */
		send_ok(h->chan);
		terminate(0);
		break;
	default:
		send_error(0, EOPNOTSUPP, "unknown frame type 0x%x on channel %u", h->type, h->chan);
		break;
	}
}

/* Parse and handle every complete frame in ibuf. */
static void process_input(void)
{
	size_t off = 0;
	while (!conn_dead && ilen - off >= AK_HDR) {
		struct frame_hdr h;
		hdr_decode(ibuf + off, &h);
		if (h.len > AK_MAX_PAYLOAD) {
			/* The stream cannot be resynchronised after a bogus length: drop the link. */
			send_error(0, EMSGSIZE, "frame length %u exceeds %u", h.len, AK_MAX_PAYLOAD);
			conn_dead = 1;
			return;
		}
		if (ilen - off < AK_HDR + (size_t)h.len)
			break;
		dispatch(&h, ibuf + off + AK_HDR);
		off += AK_HDR + h.len;
	}
	memmove(ibuf, ibuf + off, ilen - off);
	ilen -= off;
}

static void drop_connection(void)
{
	/* Anything but --listen or --reconnect: the host is gone, so nothing we run may
	 * outlive it. */
	if (listen_fd < 0 && !vport_reconnect)
		terminate(0);
	if (vport_reconnect) {
		host_away = 1; /* the port stays open: wait for the host to come back */
	} else {
		if (rfd != wfd)
			xclose(&wfd);
		xclose(&rfd);
		wfd = -1;
	}
	ilen = 0;
	for (int i = 0; i < MAX_XFERS; i++)
		if (xfers[i].used)
			free_xfer(&xfers[i], 1);
	for (int i = 0; i < MAX_PROCS; i++)
		procs[i].paused = 0; /* the next host knows nothing of this one's pauses */
	conn_dead = 0;
}

static void handle_signals(void)
{
	struct signalfd_siginfo si;
	while (read(sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		int s = (int)si.ssi_signo;
		if (s == SIGCHLD)
			reap();
		else if (is_init || s == SIGUSR1 || s == SIGUSR2)
			kill_all(s);
		else
			terminate(0); /* a plain agent asked to stop takes its processes with it */
	}
	reap(); /* SIGCHLDs coalesce; a sweep costs nothing */
}

/* --reconnect: has a host connected to the port again? (POLLHUP ends with it.) */
static int host_back(void)
{
	struct pollfd p = { .fd = rfd, .events = POLLIN };
	return poll(&p, 1, 0) >= 0 && !(p.revents & (POLLHUP | POLLERR | POLLNVAL));
}

static void serve(void)
{
	static struct pollfd pfd[3 + 3 * MAX_PROCS];
	for (;;) {
		int64_t now = now_ms();
		int timeout = -1, np = 0;
		int connected = rfd >= 0 && !host_away;
		pfd[np++] = (struct pollfd){ .fd = sig_fd, .events = POLLIN };
		int pi_listen = -1, pi_chan = -1;
		if (!connected && listen_fd >= 0) {
			pi_listen = np;
			pfd[np++] = (struct pollfd){ .fd = listen_fd, .events = POLLIN };
		}
		size_t queued = 0;
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			p->pi_out = p->pi_err = p->pi_in = -1;
			if (!p->used)
				continue;
			queued += p->in_queued;
			if (connected && p->out_fd >= 0 && !p->paused) {
				p->pi_out = np;
				pfd[np++] = (struct pollfd){ .fd = p->out_fd, .events = POLLIN };
			}
			if (connected && p->err_fd >= 0 && !p->paused) {
				p->pi_err = np;
				pfd[np++] = (struct pollfd){ .fd = p->err_fd, .events = POLLIN };
			}
			if (p->in_fd >= 0 && p->in_head) {
				p->pi_in = np;
				pfd[np++] = (struct pollfd){ .fd = p->in_fd, .events = POLLOUT };
			}
			int64_t due = p->exited ? p->exit_at + EXIT_GRACE_MS : p->deadline;
			if (p->exited && p->out_fd < 0 && p->err_fd < 0)
				due = now;
			if (due && (!p->exited || connected)) {
				int64_t d = due - now;
				d = d < 0 ? 0 : d;
				if (timeout < 0 || d < timeout)
					timeout = (int)d;
			}
		}
		/* Stop reading requests while a child is not draining a large stdin backlog. */
		if (connected && queued < STDIN_HIGH_WATER) {
			pi_chan = np;
			pfd[np++] = (struct pollfd){ .fd = rfd, .events = POLLIN };
		}
		if (connected && reads_due())
			timeout = 0;
		if (host_away && (timeout < 0 || timeout > RECONNECT_POLL_MS))
			timeout = RECONNECT_POLL_MS;
		if (poll(pfd, (nfds_t)np, timeout) < 0 && errno != EINTR)
			die("poll: %s", strerror(errno));

		if (pfd[0].revents)
			handle_signals();
		if (pi_listen >= 0 && pfd[pi_listen].revents) {
			int c = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
			if (c >= 0 && peers_outside && peer_inside(c)) {
				close(c); /* the sandbox's own process: never its control channel */
			} else if (c >= 0) {
				rfd = wfd = c;
				send_hello();
			}
		}
		if (pi_chan >= 0 && pfd[pi_chan].revents) {
			ssize_t k = read(rfd, ibuf + ilen, sizeof(ibuf) - ilen);
			if (k > 0) {
				ilen += (size_t)k;
				process_input();
			} else if (k == 0 || (errno != EINTR && errno != EAGAIN)) {
				conn_dead = 1;
			}
		}
		/* Slots may have been reused while dispatching; stale indices were reset to -1. */
		for (int i = 0; i < MAX_PROCS && !conn_dead; i++) {
			struct proc *p = &procs[i];
			if (!p->used)
				continue;
			if (p->pi_out >= 0 && pfd[p->pi_out].revents && p->out_fd == pfd[p->pi_out].fd)
				pump_output(p, &p->out_fd, T_STDOUT, 0);
			if (p->pi_err >= 0 && pfd[p->pi_err].revents && p->err_fd == pfd[p->pi_err].fd)
				pump_output(p, &p->err_fd, T_STDERR, 0);
			if (p->pi_in >= 0 && pfd[p->pi_in].revents)
				stdin_flush(p);
		}
		now = now_ms();
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			if (p->used && !p->exited && p->deadline && now >= p->deadline && !p->timed_out) {
				p->timed_out = 1;
				kill(-p->pid, SIGKILL);
			}
		}
		for (int i = 0; i < MAX_PROCS && rfd >= 0 && !host_away && !conn_dead; i++) {
			struct proc *p = &procs[i];
			if (!p->used || !p->exited)
				continue;
			if ((p->out_fd >= 0 || p->err_fd >= 0) && now >= p->exit_at + EXIT_GRACE_MS) {
				/* A background grandchild still holds the pipes: take what is there, stop. */
				if (p->out_fd >= 0 && pump_output(p, &p->out_fd, T_STDOUT, 1))
					xclose(&p->out_fd);
				if (p->err_fd >= 0 && pump_output(p, &p->err_fd, T_STDERR, 1))
					xclose(&p->err_fd);
			}
			if (p->out_fd < 0 && p->err_fd < 0)
				send_exit(p);
		}
		if (rfd >= 0 && !host_away && !conn_dead && reads_due())
			pump_reads();
		if (conn_dead)
			drop_connection();
		if (host_away && host_back()) {
			/* A new session: like a fresh connection, it starts with HELLO. */
			host_away = 0;
			send_hello();
		}
	}
}

/* ---------- setup ---------- */

static void mkdir_or_die(const char *path)
{
	int e = mkdir_p(path, 0755);
	if (e)
		die("mkdir %s: %s", path, strerror(e));
}

static void do_mount(const char *src, const char *target, const char *fs, unsigned long fl,
		     const char *data)
{
	mkdir_or_die(target);
	if (mount(src, target, fs, fl, data) < 0)
		die("mount %s on %s: %s", fs, target, strerror(errno));
}

static void mount_dev(void)
{
	mkdir_or_die("/dev");
	/* EBUSY: the kernel (CONFIG_DEVTMPFS_MOUNT) or our parent already put devtmpfs there. */
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY) {
		if (mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=0755") < 0)
			die("mount /dev: %s", strerror(errno));
		/* Without devtmpfs, make the few nodes every program expects (best effort). */
		static const struct { const char *name; unsigned maj, min; } nodes[] = {
			{ "/dev/null", 1, 3 }, { "/dev/zero", 1, 5 }, { "/dev/full", 1, 7 },
			{ "/dev/random", 1, 8 }, { "/dev/urandom", 1, 9 }, { "/dev/tty", 5, 0 },
		};
		for (size_t i = 0; i < sizeof(nodes) / sizeof(nodes[0]); i++)
			if (mknod(nodes[i].name, S_IFCHR | 0666, makedev(nodes[i].maj, nodes[i].min)) == 0)
				chmod(nodes[i].name, 0666);
		if (symlink("/proc/self/fd", "/dev/fd") < 0) { /* best effort */
		}
	}
	/* A private devpts for PTY execs; /dev/ptmx resolves to the sibling pts instance. */
	mkdir("/dev/pts", 0755);
	if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		  "newinstance,ptmxmode=0666,mode=620") == 0 && access("/dev/ptmx", F_OK) < 0) {
		if (symlink("pts/ptmx", "/dev/ptmx") < 0) { /* best effort */
		}
	}
}

/* bwrap's /dev/pts is a devpts instance of the sandbox's own with no `max`: one sandbox
 * took every pty the kernel gives instances other than the host's (kernel.pty.max less
 * pty.reserve: 3072 by default), and then no other sandbox or container could open one. */
static void limit_ptys(const char *max)
{
	char *end;
	long v = strtol(max, &end, 10);
	if (*end || v < 1 || v > 65536)
		die("--pty-max wants a number of ptys, 1..65536");
	char opts[96];
	snprintf(opts, sizeof(opts), "newinstance,ptmxmode=0666,mode=620,max=%ld", v);
	if (mount("devpts", "/dev/pts", "devpts", MS_REMOUNT | MS_NOSUID | MS_NOEXEC, opts) < 0)
		die("--pty-max: remount /dev/pts: %s", strerror(errno));
}

/* --make-dev SHM_BYTES: the sandbox's /dev as bwrap's --dev made it, by us instead (the
 * namespaces backend started by root): bwrap re-read the whole mount table for each of
 * its six device binds and for its remount. A small tmpfs (read-only once the device
 * nodes, which the host hands in as detached mounts through --attach, are on it), the
 * usual links, a private devpts capped at --pty-max ptys, and a /dev/shm of SHM_BYTES
 * (0: unsized). dev_read_only() ends it, after the attaches. */
static void make_dev(const char *shm_bytes, const char *pty_max)
{
	char *end;
	unsigned long long shm = strtoull(shm_bytes, &end, 10);
	if (*end || !*shm_bytes || shm_bytes[0] == '-')
		die("--make-dev wants the size of /dev/shm in bytes (0: unsized)");
	long ptys = pty_max ? strtol(pty_max, &end, 10) : 0;
	if (pty_max && (*end || ptys < 1 || ptys > 65536))
		die("--pty-max wants a number of ptys, 1..65536");
	if (mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k,nr_inodes=64") < 0)
		die("--make-dev: mount /dev: %s", strerror(errno));
	static const char *const links[][2] = {
		{ "/proc/self/fd", "/dev/fd" }, { "/proc/self/fd/0", "/dev/stdin" },
		{ "/proc/self/fd/1", "/dev/stdout" }, { "/proc/self/fd/2", "/dev/stderr" },
		{ "/proc/kcore", "/dev/core" }, { "pts/ptmx", "/dev/ptmx" },
	};
	for (size_t i = 0; i < sizeof(links) / sizeof(links[0]); i++)
		if (symlink(links[i][0], links[i][1]) < 0)
			die("--make-dev: %s: %s", links[i][1], strerror(errno));
	char opts[96];
	if (shm)
		snprintf(opts, sizeof(opts), "mode=1777,size=%llu", shm);
	else
		snprintf(opts, sizeof(opts), "mode=1777");
	if (mkdir("/dev/shm", 0755) < 0 || mkdir("/dev/pts", 0755) < 0 ||
	    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, opts) < 0)
		die("--make-dev: /dev/shm: %s", strerror(errno));
	/* (limit_ptys' cap, given at the mount) */
	if (ptys)
		snprintf(opts, sizeof(opts), "newinstance,ptmxmode=0666,mode=620,max=%ld", ptys);
	else
		snprintf(opts, sizeof(opts), "newinstance,ptmxmode=0666,mode=620");
	if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, opts) < 0)
		die("--make-dev: /dev/pts: %s", strerror(errno));
}

/* make_dev's /dev read-only (the device nodes still open for writing): nothing of the
 * sandbox's can make files there, whose pages no size of ours would bound. */
static void dev_read_only(void)
{
	if (mount(NULL, "/dev", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
		  NULL) < 0)
		die("--make-dev: read-only /dev: %s", strerror(errno));
}

static void do_overlay(char *spec)
{
	char *parts[4];
	char *s = spec;
	for (int i = 0; i < 4; i++) {
		parts[i] = s;
		s = i < 3 ? strchr(s, ':') : NULL;
		if (i < 3 && !s)
			die("--overlay wants TARGET:LOWERS:UPPER:WORK, got %s", spec);
		if (s)
			*s++ = 0;
	}
	if (strchr(parts[3], ':'))
		die("--overlay: too many ':' fields");
	for (int i = 0; i < 4; i++)
		if (!*parts[i] || strchr(parts[i], ','))
			die("--overlay: empty field or ',' in a path");
	for (char *p = parts[1]; *p; p++)
		if (*p == '+')
			*p = ':';
	char opts[3 * AK_MAX_PATH + 64];
	int m = snprintf(opts, sizeof(opts), "lowerdir=%s,upperdir=%s,workdir=%s", parts[1], parts[2], parts[3]);
	if (m < 0 || (size_t)m >= sizeof(opts))
		die("--overlay: option string too long");
	mkdir_or_die(parts[2]);
	mkdir_or_die(parts[3]);
	mkdir_or_die(parts[0]);
	if (mount("overlay", parts[0], "overlay", 0, opts) < 0) {
		/* In a user namespace not owned by the host's root, overlayfs wants its
		 * whiteouts and metadata in user.* xattrs (Linux >= 5.11). */
		int first = errno;
		size_t len = strlen(opts);
		if (len + sizeof(",userxattr") > sizeof(opts))
			die("--overlay: option string too long");
		memcpy(opts + len, ",userxattr", sizeof(",userxattr"));
		if (mount("overlay", parts[0], "overlay", 0, opts) < 0)
			die("overlay on %s (%s): %s", parts[0], opts, strerror(first));
	}
}

/* Bind SRC read-only onto DST (created as an empty file or dir if missing). Runs after
 * the overlays so that it lands on top of them (e.g. the sandbox's resolv.conf). */
static void do_bind(char *spec)
{
	char *dst = strchr(spec, ':');
	if (!dst || dst == spec || !dst[1] || strchr(dst + 1, ':'))
		die("--bind wants SRC:DST, got %s", spec);
	*dst++ = 0;
	struct stat st;
	if (stat(spec, &st) < 0)
		die("--bind %s: %s", spec, strerror(errno));
	if (access(dst, F_OK) < 0) {
		int rc = S_ISDIR(st.st_mode) ? mkdir(dst, 0755)
					     : close(open(dst, O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
		if (rc < 0)
			die("--bind: create %s: %s", dst, strerror(errno));
	}
	if (mount(spec, dst, NULL, MS_BIND, NULL) < 0 ||
	    mount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
		die("--bind %s:%s: %s", spec, dst, strerror(errno));
}

/* Attach a detached mount the host prepared (open_tree + an id-mapping) at TARGET:
 * "FD:TARGET". Started by root, the sandbox's ids are an unprivileged host range; the
 * host's files reach it through id-mapped mounts, so its root owns what host root owns
 * there without being host root anywhere else. A missing TARGET is created. */
#ifndef SYS_move_mount
#define SYS_move_mount 429 /* the same number on every architecture */
#endif
#define AK_MOVE_MOUNT_F_EMPTY_PATH 0x00000004
static void do_attach(const char *spec)
{
	char *end;
	long fd = strtol(spec, &end, 10);
	if (end == spec || *end != ':' || fd < 3 || fd > INT_MAX || end[1] != '/')
		die("--attach wants FD:/TARGET, got %s", spec);
	const char *target = end + 1;
	struct stat st;
	if (access(target, F_OK) < 0) { /* a file the backend could not pre-create */
		if (fstat((int)fd, &st) < 0)
			die("--attach %s: %s", spec, strerror(errno));
		int rc = S_ISDIR(st.st_mode) ? mkdir(target, 0755)
					     : close(open(target, O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
		if (rc < 0)
			die("--attach: create %s: %s", target, strerror(errno));
	}
	if (syscall(SYS_move_mount, (int)fd, "", AT_FDCWD, target, AK_MOVE_MOUNT_F_EMPTY_PATH) < 0)
		die("--attach %s: %s", spec, strerror(errno));
	close((int)fd);
}

/* What runc hides of /proc by default, and what it makes read-only: kernel memory and
 * keys, timers and scheduler internals, and every global knob (sysctls, sysrq, irqs).
 * The sandbox's root is not host root, so the kernel already refuses most writes; this
 * is the second wall, the same on every backend. */
static const char *const proc_masked[] = {
	"/proc/kcore", "/proc/keys", "/proc/key-users", "/proc/timer_list", "/proc/sched_debug",
	"/proc/latency_stats", "/proc/kallsyms", "/proc/kmsg", "/proc/acpi", "/proc/scsi",
	"/proc/asound", "/proc/sysrq-trigger", "/proc/config.gz", "/proc/kpagecount",
	"/proc/kpageflags", "/proc/kpagecgroup", "/proc/pagetypeinfo", "/proc/slabinfo",
	"/proc/vmallocinfo", "/sys/firmware", "/sys/kernel/debug", "/sys/kernel/security",
};
static const char *const proc_readonly[] = {
	"/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs", "/proc/fb", "/proc/driver",
	"/proc/tty/driver", "/proc/pressure", "/sys",
};

static void do_mask(const char *path);

static void cover_proc(void)
{
	for (size_t i = 0; i < sizeof(proc_masked) / sizeof(proc_masked[0]); i++)
		do_mask(proc_masked[i]);
	for (size_t i = 0; i < sizeof(proc_readonly) / sizeof(proc_readonly[0]); i++) {
		const char *path = proc_readonly[i];
		struct stat st;
		if (lstat(path, &st) < 0 || !S_ISDIR(st.st_mode))
			continue;
		if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0)
			die("--cover-proc %s: %s", path, strerror(errno));
		/* proc and sysfs mounted in a user namespace carry locked nosuid/nodev/noexec:
		 * a remount must keep them. gVisor (2022) refuses read-only remounts of binds
		 * (EINVAL); its /proc/sys is its own emulation, not the host's. */
		if (mount(NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV |
			  MS_NOEXEC, NULL) < 0 && errno != EINVAL)
			die("--cover-proc %s: %s", path, strerror(errno));
	}
}

/* Hide a host path: an empty read-only tmpfs over a directory, /dev/null over anything
 * else. Runs after the overlays, so a path re-exposed through an overlay is masked too. */
static void do_mask(const char *path)
{
	struct stat st;
	if (lstat(path, &st) < 0) {
		if (errno == ENOENT)
			return;
		die("--mask %s: %s", path, strerror(errno));
	}
	if (S_ISLNK(st.st_mode))
		die("--mask %s: refusing to mask through a symlink", path);
	if (S_ISDIR(st.st_mode)) {
		if (mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
			  "size=4k,mode=555") < 0)
			die("--mask %s: %s", path, strerror(errno));
		return;
	}
	if (mount("/dev/null", path, NULL, MS_BIND, NULL) < 0)
		die("--mask %s: %s", path, strerror(errno));
	/* gVisor (2022 builds) answers EINVAL to read-only remounts of binds. The mask holds
	 * without it: the path now is /dev/null, which reads empty and discards writes. */
	if (mount(NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC,
		  NULL) < 0 && errno != EINVAL)
		die("--mask %s: %s", path, strerror(errno));
}

/* Cap the number of tasks from inside the sandbox: a pids cgroup of our own that the
 * agent joins (children inherit it), then the hierarchy is covered by an empty read-only
 * tmpfs so nothing inside can raise the limit (unmounting it would drop the limit in
 * gVisor). Used where the host's cgroup cannot count tasks one-to-one (gVisor's
 * sentry runs its own threads in the host cgroup). */
static void do_pids_max(const char *value)
{
	char *end;
	long n = strtol(value, &end, 10);
	if (*end || n < 1 || n > 4194304)
		die("--pids-max wants a positive number, got %s", value);
	const char *dir = "/run/.ak-pids";
	char path[128], buf[32];
	mkdir_or_die(dir);
	if (mount("none", dir, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, "pids") < 0)
		die("--pids-max: mount pids cgroup: %s", strerror(errno));
	snprintf(path, sizeof(path), "%s/agentkernel", dir);
	if (mkdir(path, 0755) < 0 && errno != EEXIST)
		die("--pids-max: mkdir %s: %s", path, strerror(errno));
	const char *files[2] = {"pids.max", "cgroup.procs"};
	long values[2] = {n, (long)getpid()};
	for (int i = 0; i < 2; i++) {
		snprintf(path, sizeof(path), "%s/agentkernel/%s", dir, files[i]);
		int fd = open(path, O_WRONLY | O_CLOEXEC);
		int len = snprintf(buf, sizeof(buf), "%ld", values[i]);
		if (fd < 0 || write(fd, buf, (size_t)len) != len)
			die("--pids-max: write %s: %s", path, strerror(errno));
		close(fd);
	}
	if (mount("tmpfs", dir, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
		  "size=4k,mode=555") < 0)
		die("--pids-max: hide the pids cgroup: %s", strerror(errno));
}

/* Mask everything under DIR that the host does not let everyone read. Inside the sandbox
 * the command may hold the caller's uid (root in CI), for whom modes protect nothing, so
 * root-only files (shadow, private keys, …) must not be visible at all.
 *
 * In two steps. The walk (find_private) runs before the overlays: it sees the host's tree
 * as bound in (the id-mapped or bwrap's bind), which is every overlay's lower layer, and
 * a stat there is a cached ext4 lookup; through an overlay each entry would first become
 * an overlay inode (~5 us each, the largest part of a sandbox's mount work). It walks by
 * directory fd (one path component per lookup, never following a symlink). The masks go
 * on afterwards (mask_found), over the final view: an entry is masked where it is still
 * there and still not readable by everyone (a persistent sandbox's own upper layer may
 * have replaced it: its own file, or a symlink that no longer leads to the host's). */
struct private_list {
	char **paths;
	int n, cap;
};

static void private_add(struct private_list *l, const char *path)
{
	if (l->n == l->cap) {
		int cap = l->cap ? 2 * l->cap : 64;
		char **grown = realloc(l->paths, (size_t)cap * sizeof(char *));
		if (!grown)
			die("--mask-private: out of memory");
		l->paths = grown;
		l->cap = cap;
	}
	if (!(l->paths[l->n++] = strdup(path)))
		die("--mask-private: out of memory");
}

static int world_readable(mode_t mode)
{
	mode_t need = S_ISDIR(mode) ? 05 : 04;
	return (mode & need) == need;
}

/* Takes DFD (closes it). PATH[0..len) names it; budget bounds the entries found. */
static int find_private(int dfd, char *path, size_t len, int depth, int budget,
			struct private_list *out)
{
	DIR *d = fdopendir(dfd);
	if (!d) {
		close(dfd);
		return budget;
	}
	struct dirent *e;
	while (budget > 0 && (e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || e->d_type == DT_LNK)
			continue;
		size_t n = strlen(e->d_name);
		if (len + 1 + n >= AK_MAX_PATH)
			continue;
		struct stat st;
		if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || S_ISLNK(st.st_mode))
			continue;
		path[len] = '/';
		memcpy(path + len + 1, e->d_name, n + 1);
		if (!world_readable(st.st_mode)) {
			private_add(out, path);
			budget--;
		} else if (S_ISDIR(st.st_mode) && depth < 32) {
			int sub = openat(dirfd(d), e->d_name,
					 O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			if (sub >= 0)
				budget = find_private(sub, path, len + 1 + n, depth + 1, budget, out);
		}
		path[len] = 0;
	}
	closedir(d);
	return budget;
}

static void do_find_private(const char *dir, struct private_list *out)
{
	char path[AK_MAX_PATH];
	size_t len = strlen(dir);
	if (len == 0 || len >= sizeof(path) || dir[0] != '/')
		die("--mask-private wants an absolute directory, got %s", dir);
	memcpy(path, dir, len + 1);
	while (len > 1 && path[len - 1] == '/')
		path[--len] = 0;
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return;
	if (find_private(fd, path, len, 0, 4096, out) <= 0)
		die("--mask-private %s: too many private entries", dir);
}

/* --user UID:GID:HOME: commands run as this uid and gid (an AI agent is not uid 0 inside),
 * HOME a dir of theirs. Switched to after every mount, between emptying the bounding set
 * (which needs CAP_SETPCAP) and clearing the rest (a command could not switch itself). */
static const char *run_as;
/* --user-ns: reach the user only through a user namespace of our own (below), even where
 * the sandbox maps its ids: gVisor started by an ordinary user maps every id inside, but
 * its host files are all its root's (rootless runsc maps one host id), so the project
 * shows as the user's only there. */
static int user_ns_only;

static void write_proc(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	size_t len = strlen(text);
	if (fd < 0 || write(fd, text, len) != (ssize_t)len)
		die("--user: %s: %s", path, strerror(errno));
	close(fd);
}

static void become_user(void)
{
	unsigned long uid, gid;
	char home[256];
	int n = 0;
	if (sscanf(run_as, "%lu:%lu:%255[^\n]%n", &uid, &gid, home, &n) != 3 || run_as[n] ||
	    uid == 0 || uid > 65535 || gid == 0 || gid > 65535 || home[0] != '/')
		die("--user wants UID:GID:HOME (ids 1..65535, HOME absolute)");
	if (mkdir(home, 0700) < 0 && errno != EEXIST)
		die("--user: mkdir %s: %s", home, strerror(errno));
	if (getuid() == (uid_t)uid && getgid() == (gid_t)gid)
		return;
	if (!user_ns_only && chown(home, (uid_t)uid, (gid_t)gid) == 0) {
		if (setgroups(0, NULL) < 0 || setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) < 0 ||
		    setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) < 0)
			die("--user %lu:%lu: %s", uid, gid, strerror(errno));
		/* Linux makes us not dumpable at that switch; gVisor does not: say it, so that
		 * our commands (of our uid) can neither trace us nor read our memory. */
		if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
			die("--user: dumpable: %s", strerror(errno));
		return;
	}
	if (!user_ns_only && errno != EINVAL)
		die("--user: chown %s: %s", home, strerror(errno));
	/* The id is not mapped here (an ordinary user's sandbox maps one id: its root), or
	 * --user-ns asks for this way. A user namespace of our own, below the sandbox's,
	 * shows our one id as UID/GID: the mounts are made, and they stay the sandbox's
	 * (nothing can be mounted from here). */
	char map[64];
	unsigned int ou = (unsigned int)getuid(), og = (unsigned int)getgid();
	if (unshare(CLONE_NEWUSER) < 0)
		die("--user: unshare: %s", strerror(errno));
	/* Its new capabilities made us not dumpable, and our /proc/self files root's. */
	if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) < 0)
		die("--user: dumpable: %s", strerror(errno));
	/* gVisor has no setgroups file (nor a setgroups(2) that would undo the map). */
	if (access("/proc/self/setgroups", F_OK) == 0 || errno != ENOENT)
		write_proc("/proc/self/setgroups", "deny");
	snprintf(map, sizeof(map), "%lu %u 1", uid, ou);
	write_proc("/proc/self/uid_map", map);
	snprintf(map, sizeof(map), "%lu %u 1", gid, og);
	write_proc("/proc/self/gid_map", map);
	/* Not dumpable again, as a switch of ids leaves the root-started agent: its commands
	 * share its uid, and must not read or write its memory through /proc. */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		die("--user: dumpable: %s", strerror(errno));
}

static void drop_bounding(int last)
{
	for (int c = 0; c <= last; c++)
		if (prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1 && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 &&
		    errno != EINVAL)
			die("drop bounding capability %d: %s", c, strerror(errno));
}

static void mask_found(struct private_list *l)
{
	for (int i = 0; i < l->n; i++) {
		struct stat st;
		if (lstat(l->paths[i], &st) == 0 && !S_ISLNK(st.st_mode) &&
		    !world_readable(st.st_mode))
			do_mask(l->paths[i]);
		free(l->paths[i]);
	}
	free(l->paths);
	l->paths = NULL;
	l->n = l->cap = 0;
}

static void drop_caps(void)
{
	int last = 63;
	FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
	if (f) {
		if (fscanf(f, "%d", &last) != 1)
			last = 63;
		fclose(f);
	}
	drop_bounding(last);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
		die("clear ambient capabilities: %s", strerror(errno));
	if (run_as) {
		become_user();
		drop_bounding(last); /* a user namespace of our own starts with a full set */
	}
	struct ak_cap_header hdr = { AK_CAP_VERSION_3, 0 };
	struct ak_cap_data data[2];
	memset(data, 0, sizeof(data));
	if (syscall(SYS_capset, &hdr, data) < 0)
		die("capset: %s", strerror(errno));
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		die("no_new_privs: %s", strerror(errno));
}

/* The raw BPF program from FILE, or (FILE NULL) from descriptor FD, which is closed: the
 * namespaces backend hands it in (--seccomp-fd) rather than have bwrap copy it into the
 * sandbox's tmpfs and bind it there (two mount-table re-reads of bwrap's per start). */
static void install_seccomp(const char *file, int from)
{
	static struct ak_sock_filter prog[AK_MAX_BPF + 1];
	const char *what = file ? file : "(--seccomp-fd)";
	int fd = file ? open(file, O_RDONLY | O_CLOEXEC) : from;
	if (fd < 0)
		die("seccomp %s: %s", what, strerror(errno));
	size_t got = 0;
	for (;;) {
		ssize_t k = pread(fd, (uint8_t *)prog + got, sizeof(prog) - got, (off_t)got);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0)
			die("seccomp %s: %s", what, strerror(errno));
		if (k == 0)
			break;
		got += (size_t)k;
		if (got == sizeof(prog))
			break;
	}
	close(fd);
	if (got == 0 || got % sizeof(struct ak_sock_filter) || got > AK_MAX_BPF * sizeof(struct ak_sock_filter))
		die("seccomp %s: want 1..%d 8-byte BPF instructions, got %zu bytes", what, AK_MAX_BPF, got);
	struct ak_sock_fprog fp = { (unsigned short)(got / sizeof(struct ak_sock_filter)), prog };
	/* RLIMIT_CORE 1, soft and hard, for us and every command after us: the kernel runs a
	 * pipe core_pattern (apport, systemd-coredump: host root, the host's namespaces, the
	 * crashed process's memory as input) whatever the limit, but for 1. The filter
	 * (ak-seccomp --pin-core-limit) keeps commands from changing it, so set it first.
	 * Where the host's hard limit is 0 this fails (raising needs CAP_SYS_RESOURCE in the
	 * host's namespace) and the limit stays 0: nothing better can be had here. */
	struct rlimit core = { 1, 1 };
	(void)setrlimit(RLIMIT_CORE, &core);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		die("no_new_privs: %s", strerror(errno));
	if (syscall(SYS_seccomp, AK_SECCOMP_SET_MODE_FILTER, 0, &fp) < 0 &&
	    prctl(PR_SET_SECCOMP, AK_SECCOMP_MODE_FILTER, &fp, 0, 0) < 0)
		die("seccomp: %s", strerror(errno));
}

/* ---------- the unix-socket guard ----------
 *
 * A pathname unix socket in a dir bound from the host (a permissive $HOME, a project) is
 * the host's: its server takes the sandbox's connect() as it would the user's. No LSM on
 * our kernels can tell connect() apart by target (Landlock's ABI <= 7 covers only
 * abstract sockets), so every connect() of the commands is a seccomp user notification,
 * answered here by a thread that performs it itself on a copy of the caller's socket:
 * the address is read once (the caller may change its memory, never our copy), a pathname
 * is resolved once in the caller's root or cwd to an O_PATH fd, that inode's mount is
 * checked against the mounts the sandbox made itself (its tmpfs and overlays: an overlay
 * never passes a connect() on to a socket of its layers), and the connect() goes to that
 * very inode through /proc/self/fd. Other families are connected as asked, from our copy,
 * so that swapping the fd or the address after the check gains nothing. */
#define AK_FILTER_FLAG_NEW_LISTENER (1UL << 3)
#define AK_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#define AK_RET_USER_NOTIF 0x7fc00000U
#define AK_RET_ALLOW 0x7fff0000U
#define AK_RET_ERRNO 0x00050000U
#define AK_MAX_GUARD_MOUNTS 128
#define AK_GUARD_WORKERS 16        /* threads for the calls that may wait */
#define AK_GUARD_QUEUE 64          /* calls waiting for one; past that: EAGAIN */
#define AK_GUARD_SEND_MAX (256 * 1024) /* one send's bytes we copy */
#define AK_GUARD_MAX_IOV 1024      /* UIO_MAXIOV */
#define AK_GUARD_MAX_CTL 4096      /* a send's control messages */
#define AK_GUARD_MAX_FDS 253       /* SCM_MAX_FD */
#define AK_GUARD_SIG (SIGRTMIN + 3) /* ends a worker's wait for a caller that is gone */
#ifndef SO_DOMAIN
#define SO_DOMAIN 39
#endif
#if defined(__x86_64__)
#define AK_AUDIT_ARCH 0xc000003eU
#elif defined(__aarch64__)
#define AK_AUDIT_ARCH 0xc00000b7U
#endif
struct ak_seccomp_data {
	int32_t nr;
	uint32_t arch;
	uint64_t ip;
	uint64_t args[6];
};
struct ak_notif {
	uint64_t id;
	uint32_t pid;
	uint32_t flags;
	struct ak_seccomp_data data;
};
struct ak_notif_resp {
	uint64_t id;
	int64_t val;
	int32_t error;
	uint32_t flags;
};
struct ak_open_how {
	uint64_t flags, mode, resolve;
};
#define AK_NOTIF_RECV _IOWR('!', 0, struct ak_notif)
#define AK_NOTIF_SEND _IOWR('!', 1, struct ak_notif_resp)
#define AK_NOTIF_ID_VALID _IOW('!', 2, uint64_t)
#define AK_NOTIF_SET_FLAGS _IOW('!', 4, uint64_t)
#define AK_STATX_MNT_ID 0x1000U

static char *guard_spec;                  /* --guard-unix MNT[:MNT...]: the sandbox's own mounts */
static uint64_t guard_mnts[AK_MAX_GUARD_MOUNTS];
static int nguard_mnts, guard_listener = -1;
static int guard_pipe[2] = { -1, -1 };
static const char *guard_abstract = "off"; /* why abstract sockets are not scoped, or NULL */

/* statx(2)'s mount id (musl has no statx: the struct's layout is the kernel's ABI). */
static int mount_id(int fd, const char *path, int flags, uint64_t *out)
{
	uint64_t sx[32]; /* struct statx: 256 bytes; stx_mask at 0, stx_mnt_id at 144 */
	uint32_t mask;
	memset(sx, 0, sizeof(sx));
	if (syscall(SYS_statx, fd, path, flags, AK_STATX_MNT_ID, sx) < 0)
		return -1;
	memcpy(&mask, sx, sizeof(mask));
	if (!(mask & AK_STATX_MNT_ID)) {
		errno = ENOSYS;
		return -1;
	}
	memcpy(out, (uint8_t *)sx + 144, sizeof(*out));
	return 0;
}

static int guard_own_mount(int fd)
{
	uint64_t id;
	if (mount_id(fd, "", AT_EMPTY_PATH, &id) < 0)
		return 0;
	for (int i = 0; i < nguard_mnts; i++)
		if (guard_mnts[i] == id)
			return 1;
	return 0;
}

static int guard_valid(uint64_t id)
{
	return ioctl(guard_listener, AK_NOTIF_ID_VALID, &id) == 0;
}

/* The caller's view of `path` as an O_PATH fd, or -1 with errno. "/proc/self" would be
 * ours here, so it is spelled as the caller's. */
static int guard_resolve(pid_t pid, const char *path)
{
	char buf[AK_MAX_PATH + 64], base[64];
	const char *rest = path;
	if (!strncmp(path, "/proc/self/", 11) || !strcmp(path, "/proc/self"))
		rest = path + 10;
	else if (!strncmp(path, "/proc/thread-self/", 18) || !strcmp(path, "/proc/thread-self"))
		rest = path + 17;
	if (rest != path) {
		snprintf(buf, sizeof(buf), "/proc/%d%s", (int)pid, rest);
		path = buf;
	}
	snprintf(base, sizeof(base), "/proc/%d/%s", (int)pid, path[0] == '/' ? "root" : "cwd");
	int dfd = open(base, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return -1;
	while (*path == '/')
		path++;
	int fd = openat(dfd, *path ? path : ".", O_PATH | O_CLOEXEC);
	int saved = errno;
	close(dfd);
	errno = saved;
	return fd;
}

/* A pidfd for the caller, which may be any thread: PIDFD_THREAD (Linux 6.9), else its
 * thread group's leader (same fd table unless it unshared it: then the sandbox's own). */
static int guard_pidfd(pid_t tid)
{
	int fd = (int)syscall(SYS_pidfd_open, tid, O_EXCL /* PIDFD_THREAD */);
	if (fd >= 0 || errno != EINVAL)
		return fd;
	char path[64], line[128];
	snprintf(path, sizeof(path), "/proc/%d/status", (int)tid);
	FILE *f = fopen(path, "re");
	long tgid = -1;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "Tgid: %ld", &tgid) == 1)
			break;
	if (f)
		fclose(f);
	return tgid > 0 ? (int)syscall(SYS_pidfd_open, (pid_t)tgid, 0) : -1;
}

/* One call held: the caller's notification and our copies of what it asked for. Every
 * field is ours: the caller may change its memory or its fd table meanwhile, never these. */
struct guard_job {
	struct ak_notif n;
	struct sockaddr_storage ss; /* the caller's address, read once */
	uint32_t alen;
	int sock;                   /* our copy of the caller's socket */
	int dom, type, fl;          /* its family, type and file flags */
	int target;                 /* the checked unix socket's O_PATH fd, or -1 */
	struct sockaddr_storage to; /* where the call goes (a checked socket: its fd's name) */
	socklen_t tolen;
	int flags;                  /* a send's MSG_ flags */
	struct iovec data;          /* a send's bytes */
	size_t done;                /* a stream send's bytes already sent (the first try's) */
	void *ctl;                  /* a send's control messages, SCM_RIGHTS' fds ours */
	size_t ctllen;
	uint64_t mmsg_len;          /* sendmmsg: where the caller's first msg_len is */
	int none;                   /* sendmmsg of no message: nothing to send */
	int fds[AK_GUARD_MAX_FDS], nfds;
};

static int guard_read(pid_t pid, void *to, uint64_t from, size_t len)
{
	if (len == 0)
		return 0;
	struct iovec l = { to, len }, r = { (void *)(uintptr_t)from, len };
	return process_vm_readv(pid, &l, 1, &r, 1, 0) == (ssize_t)len ? 0 : EFAULT;
}

/* The caller's address of `len` bytes at `addr`, into j->ss. Too long: EINVAL, or
 * (`clamp`, sendmsg()'s way) cut to the largest address. */
static int guard_take_addr(struct guard_job *j, uint64_t addr, uint64_t len, int clamp)
{
	j->alen = 0;
	if (addr == 0)
		return 0;
	uint32_t n = (uint32_t)len; /* (socklen_t: the kernel reads the low 32 bits) */
	if ((int)n < 0 || (n > sizeof(j->ss) && !clamp))
		return EINVAL;
	j->alen = n > sizeof(j->ss) ? (uint32_t)sizeof(j->ss) : n;
	return guard_read((pid_t)j->n.pid, &j->ss, addr, j->alen);
}

/* A send's bytes, read once from the caller's iovecs (`niov` of them at `iov`, or one
 * plain buffer when `iov` is 0). Bounded: a datagram past the bound is EMSGSIZE (the
 * kernel's own limit, the send buffer, is below it by default); a stream send past it
 * is sent in part, as a send may be. */
static int guard_take_data(struct guard_job *j, uint64_t iov, uint64_t niov, uint64_t buf,
			   uint64_t len)
{
	struct iovec one = { (void *)(uintptr_t)buf, (size_t)len }, *rv = &one;
	size_t total = (size_t)len;
	if (iov) {
		if (niov > AK_GUARD_MAX_IOV)
			return EMSGSIZE;
		if (niov == 0)
			return 0;
		rv = calloc((size_t)niov, sizeof(*rv));
		if (!rv)
			return ENOMEM;
		int err = guard_read((pid_t)j->n.pid, rv, iov, (size_t)niov * sizeof(*rv));
		total = 0;
		for (uint64_t i = 0; !err && i < niov; i++) {
			if (rv[i].iov_len > SSIZE_MAX - total)
				err = EINVAL;
			else
				total += rv[i].iov_len;
		}
		if (err) {
			free(rv);
			return err;
		}
	} else {
		niov = 1;
	}
	int err = 0;
	if (total > AK_GUARD_SEND_MAX && j->type != SOCK_STREAM)
		err = EMSGSIZE;
	else if (total > AK_GUARD_SEND_MAX)
		total = AK_GUARD_SEND_MAX;
	if (!err && total) {
		j->data.iov_base = malloc(total);
		j->data.iov_len = total;
		struct iovec l = j->data;
		if (!j->data.iov_base)
			err = ENOMEM;
		else if (process_vm_readv((pid_t)j->n.pid, &l, 1, rv, (unsigned long)niov, 0) !=
			 (ssize_t)total)
			err = EFAULT;
	}
	if (rv != &one)
		free(rv);
	return err;
}

/* A control message header as the kernel reads it (include/linux/socket.h): cmsg_len is
 * a __kernel_size_t, and its walk is __cmsg_nxthdr's. Ours, not the libc's: musl's
 * cmsg_len is 32 bits and glibc before 2.36 ended its walk early at a last message whose
 * aligned length passed the end (a second SCM_RIGHTS then went unseen, its numbers
 * resolved in our fd table). The kernel's walk is the one that counts, and only what it
 * walked and we checked is sent: a fresh buffer, never the caller's. */
struct ak_cmsg {
	unsigned long len; /* __kernel_size_t */
	int level, type;
};
#define AK_CMSG_HDR sizeof(struct ak_cmsg)
#define AK_CMSG_ALIGN(n) (((n) + sizeof(unsigned long) - 1) & ~(sizeof(unsigned long) - 1))
#define AK_SO_PRIORITY 12
#define AK_SO_MARK 36
#define AK_SO_TIMESTAMPING_OLD 37
#define AK_SCM_TXTIME 61
#define AK_SOL_IPV6 41
#define AK_SOL_UDP 17
#define AK_SOL_ALG 279
#define AK_SOL_TLS 282

/* Whether a message passes as its bytes: values the kernel checks against our own
 * credentials (which are the commands'), never a number in the sender's fd table or a
 * pointer into its memory (RDS's RDMA messages are: refused, as is anything unknown). */
static int guard_ctl_plain(const struct ak_cmsg *h)
{
	if (h->level == SOL_SOCKET)
		return h->type == SCM_CREDENTIALS || h->type == AK_SO_PRIORITY ||
		       h->type == AK_SO_MARK || h->type == AK_SO_TIMESTAMPING_OLD ||
		       h->type == AK_SCM_TXTIME;
	return h->level == IPPROTO_IP || h->level == AK_SOL_IPV6 || h->level == AK_SOL_UDP ||
	       h->level == AK_SOL_ALG || h->level == AK_SOL_TLS;
}

/* One message `h` with its `plen` bytes at `p` onto `out` at *olen: an SCM_RIGHTS with our
 * copies of the caller's files (a trailing part of an int is dropped, as the kernel does),
 * a plain one as it is, anything else EINVAL. 0 or an errno. */
static int guard_ctl_one(struct guard_job *j, int pidfd, const struct ak_cmsg *h,
			 const unsigned char *p, size_t plen, unsigned char *out, size_t *olen)
{
	struct ak_cmsg o = *h;
	unsigned char *op = out + *olen + AK_CMSG_HDR;
	if (h->level == SOL_SOCKET && h->type == SCM_RIGHTS) {
		size_t n = plen / sizeof(int);
		for (size_t i = 0; i < n; i++) {
			int fd;
			memcpy(&fd, p + i * sizeof(int), sizeof(fd));
			if (j->nfds == AK_GUARD_MAX_FDS)
				return ETOOMANYREFS;
			fd = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
			if (fd < 0)
				return EBADF;
			j->fds[j->nfds++] = fd;
			memcpy(op + i * sizeof(int), &fd, sizeof(fd));
		}
		plen = n * sizeof(int);
	} else if (guard_ctl_plain(h)) {
		memcpy(op, p, plen);
	} else {
		return EINVAL;
	}
	o.len = AK_CMSG_HDR + plen;
	memcpy(out + *olen, &o, AK_CMSG_HDR);
	*olen += AK_CMSG_ALIGN(o.len);
	return 0;
}

/* A send's control messages (`len` bytes at the caller's `ctl`), walked as the kernel
 * walks them, into a fresh buffer (j->ctl) of what guard_ctl_one accepts. A header whose
 * length is below a header or past the buffer is EINVAL (the kernel's CMSG_OK), and so
 * are bytes left after the last message that make no whole one (the kernel would ignore
 * them; nothing a caller means is there). */
static int guard_take_ctl(struct guard_job *j, int pidfd, uint64_t ctl, uint64_t len)
{
	if (ctl == 0 || len == 0)
		return 0;
	if (len > AK_GUARD_MAX_CTL)
		return ENOBUFS;
	size_t size = (size_t)len, off = 0, olen = 0;
	unsigned char *in = malloc(size);
	/* each message out is at most its aligned length in: the last one's pad the most */
	j->ctl = calloc(1, size + sizeof(unsigned long));
	int err = in && j->ctl ? guard_read((pid_t)j->n.pid, in, ctl, size) : ENOMEM;
	while (!err && size - off >= AK_CMSG_HDR) {
		struct ak_cmsg h;
		memcpy(&h, in + off, AK_CMSG_HDR);
		if (h.len < AK_CMSG_HDR || h.len > size - off) {
			err = EINVAL;
			break;
		}
		err = guard_ctl_one(j, pidfd, &h, in + off + AK_CMSG_HDR, h.len - AK_CMSG_HDR,
				    j->ctl, &olen);
		/* the kernel's next header: at the aligned end, if a whole header fits there
		 * (h.len <= size <= AK_GUARD_MAX_CTL: no overflow) */
		off += AK_CMSG_ALIGN(h.len);
		if (off >= size)
			off = size;
	}
	if (!err && off < size)
		err = EINVAL;
	free(in);
	j->ctllen = olen;
	return err;
}

/* A sendmsg()/sendmmsg()'s message header at `at`: its name, data and control. */
static int guard_take_msg(struct guard_job *j, int pidfd, uint64_t at)
{
	struct msghdr m;
	int err = guard_read((pid_t)j->n.pid, &m, at, sizeof(m));
	if (!err)
		err = guard_take_addr(j, (uintptr_t)m.msg_name, m.msg_namelen, 1);
	if (!err)
		err = guard_take_data(j, (uintptr_t)m.msg_iov, m.msg_iovlen, 0, 0);
	if (!err)
		err = guard_take_ctl(j, pidfd, (uintptr_t)m.msg_control, m.msg_controllen);
	return err;
}

/* Copies what the caller asked for: 0, or the errno to answer (-1: answer nothing). */
static int guard_take(struct guard_job *j)
{
	const uint64_t *a = j->n.data.args;
	j->sock = j->target = -1;
	int pidfd = guard_pidfd((pid_t)j->n.pid);
	if (pidfd < 0)
		return ESRCH;
	j->sock = (int)syscall(SYS_pidfd_getfd, pidfd, (int)a[0], 0);
	int err = j->sock < 0 ? (errno == EBADF ? EBADF : EACCES) : 0;
	socklen_t ol = sizeof(int);
	if (!err && (getsockopt(j->sock, SOL_SOCKET, SO_DOMAIN, &j->dom, &ol) < 0 ||
		     getsockopt(j->sock, SOL_SOCKET, SO_TYPE, &j->type, &ol) < 0 ||
		     (j->fl = fcntl(j->sock, F_GETFL)) < 0))
		err = errno == ENOTSOCK ? ENOTSOCK : EBADF;
	if (!err && j->n.data.nr == SYS_connect) {
		err = guard_take_addr(j, a[1], a[2], 0);
	} else if (!err && j->n.data.nr == SYS_sendto) {
		j->flags = (int)a[3];
		err = guard_take_addr(j, a[4], a[5], 0);
		if (!err)
			err = guard_take_data(j, 0, 0, a[1], a[2]);
	} else if (!err && j->n.data.nr == SYS_sendmsg) {
		j->flags = (int)a[2];
		err = guard_take_msg(j, pidfd, a[1]);
	} else if (!err) { /* sendmmsg: the first message only (a short count is the API's) */
		j->flags = (int)a[3];
		j->mmsg_len = a[1] + offsetof(struct mmsghdr, msg_len);
		j->none = (uint32_t)a[2] == 0;
		err = j->none ? 0 : guard_take_msg(j, pidfd, a[1]);
	}
	close(pidfd);
	if (err)
		return err;
	/* the pid may be another's by now: then nothing read was the caller's */
	return guard_valid(j->n.id) ? 0 : -1;
}

/* Where the call goes, into j->to: a unix pathname is resolved once in the caller's root
 * or cwd, and only a socket on one of the sandbox's own mounts passes (as its O_PATH fd's
 * /proc/self/fd name); any other address goes as asked. 0 or an errno. */
static int guard_check(struct guard_job *j)
{
	struct sockaddr_un *su = (struct sockaddr_un *)&j->ss;
	size_t off = offsetof(struct sockaddr_un, sun_path);
	memcpy(&j->to, &j->ss, sizeof(j->to));
	j->tolen = j->alen;
	if (j->dom != AF_UNIX || j->alen <= off || su->sun_family != AF_UNIX || su->sun_path[0] == 0)
		return 0;
	char path[sizeof(su->sun_path) + 1];
	size_t plen = j->alen - off;
	/* (an address may be up to sizeof(sockaddr_storage) long: past sockaddr_un's it is
	 * no unix address, EINVAL as the kernel's unix_validate_addr says) */
	if (plen > sizeof(su->sun_path))
		return EINVAL;
	memcpy(path, su->sun_path, plen);
	path[plen] = 0;
	j->target = guard_resolve((pid_t)j->n.pid, path);
	if (j->target < 0)
		return errno == ELOOP || errno == ENOENT || errno == ENOTDIR || errno == EACCES ?
			       errno : ECONNREFUSED;
	struct stat st;
	if (fstat(j->target, &st) < 0 || !S_ISSOCK(st.st_mode))
		return ECONNREFUSED;
	if (!guard_own_mount(j->target))
		return EACCES; /* a socket of the host's, in a dir bound from it */
	struct sockaddr_un *to = (struct sockaddr_un *)&j->to;
	memset(to, 0, sizeof(*to));
	to->sun_family = AF_UNIX;
	int k = snprintf(to->sun_path, sizeof(to->sun_path), "/proc/self/fd/%d", j->target);
	j->tolen = (socklen_t)(off + (size_t)k + 1);
	return 0;
}

/* Whether the call may wait: a blocking socket, and for a send no MSG_DONTWAIT. */
static int guard_blocking(const struct guard_job *j)
{
	return !(j->fl & O_NONBLOCK) && (j->n.data.nr == SYS_connect || !(j->flags & MSG_DONTWAIT));
}

/* The call itself, on our copies: its result (>= 0: for a send, the bytes sent) or
 * -errno. `nowait` (the main thread's, always): a send fails with -EAGAIN where it would
 * wait (MSG_DONTWAIT: per call, whatever the file's O_NONBLOCK is by now). A connect()
 * has no such flag: O_NONBLOCK is the caller's open file's, which another of its threads
 * or processes may flip between any look of ours and the call, so a connect() that may
 * wait (a stream's) is only ever a worker's (guard_main). */
static long guard_perform(struct guard_job *j, int nowait)
{
	long rc;
	if (j->n.data.nr == SYS_connect)
		return connect(j->sock, (struct sockaddr *)&j->to, j->tolen) < 0 ? -errno : 0;
	if (j->none)
		return 0;
	/* the rest of a stream send the main thread began (its control messages went with
	 * its first bytes) */
	struct iovec rest = { (char *)j->data.iov_base + j->done, j->data.iov_len - j->done };
	struct msghdr m = { .msg_name = j->tolen ? &j->to : NULL, .msg_namelen = j->tolen,
			    .msg_iov = &rest, .msg_iovlen = 1,
			    .msg_control = j->done ? NULL : j->ctl,
			    .msg_controllen = j->done ? 0 : j->ctllen };
	/* (SIGPIPE would be ours, ignored: the caller sees EPIPE without it) */
	int flags = (j->flags | MSG_NOSIGNAL | (nowait ? MSG_DONTWAIT : 0));
	rc = sendmsg(j->sock, &m, flags);
	if (rc < 0) /* after some bytes: their count, as a blocking send that fails says */
		return j->done ? (long)j->done : -errno;
	return (long)j->done + rc;
}

/* Whether the main thread's try of a call that may wait is to be finished by a worker:
 * it would have waited (EAGAIN), or it is a stream send that went in part (a blocking
 * send says all its bytes, or an error, or is interrupted). */
static int guard_unfinished(struct guard_job *j, long rc)
{
	if (rc == -EAGAIN)
		return 1;
	if (j->n.data.nr == SYS_connect || j->none || j->type != SOCK_STREAM || rc < 0 ||
	    (size_t)rc >= j->data.iov_len)
		return 0;
	j->done = (size_t)rc;
	return 1;
}

/* Answers the caller (`rc`: a result or -errno) and lets the job go. */
#define GUARD_GONE LONG_MIN /* answer nothing: the caller is gone */

/* sendmmsg: the first message's bytes into its msg_len, and one message sent (1), or
 * GUARD_GONE. Only into the caller: its pid is a number that, once it is killed, may be
 * another process of the sandbox's. Its memory is opened by that number first, and the
 * call still waiting afterwards (ID_VALID) says the process opened was the caller
 * (seccomp_unotify(2)'s way); a write by pid alone would have no such proof. */
static long guard_mmsg_count(struct guard_job *j, uint32_t sent)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%u/mem", j->n.pid);
	int fd = open(path, O_RDWR | O_CLOEXEC);
	int valid = guard_valid(j->n.id);
	if (fd >= 0 && valid) {
		/* (msg_len unwritable: the kernel too answers the count of messages sent) */
		ssize_t w = pwrite(fd, &sent, sizeof(sent), (off_t)j->mmsg_len);
		(void)w;
	}
	if (fd >= 0)
		close(fd);
	return valid ? 1 : GUARD_GONE;
}

static void guard_answer(struct guard_job *j, long rc)
{
	if (rc >= 0 && j->n.data.nr == SYS_sendmmsg && !j->none)
		rc = guard_mmsg_count(j, (uint32_t)rc);
	struct ak_notif_resp r = { .id = j->n.id, .val = rc < 0 ? 0 : rc,
				   .error = rc < 0 ? (int32_t)rc : 0 };
	if (rc != GUARD_GONE)
		ioctl(guard_listener, AK_NOTIF_SEND, &r);
	if (j->sock >= 0)
		close(j->sock);
	if (j->target >= 0)
		close(j->target);
	for (int i = 0; i < j->nfds; i++)
		close(j->fds[i]);
	free(j->data.iov_base);
	free(j->ctl);
	free(j);
}

/* ---- the workers: every call that may wait runs on one, so that one connect() to a
 * server that never accepts stalls none but its caller. A few threads, made as needed,
 * and a bounded queue before them: past it a call fails (EAGAIN) rather than waits. A
 * worker whose caller is gone (killed while it waited) is interrupted by a signal. */
struct guard_worker {
	pthread_t t;
	struct guard_job *job; /* the call it performs, under guard_mu */
};
static struct guard_worker guard_workers[AK_GUARD_WORKERS];
static struct guard_job *guard_queue[AK_GUARD_QUEUE];
static int guard_qhead, guard_qlen, guard_nworkers, guard_idle, guard_running;
static pthread_mutex_t guard_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t guard_cv = PTHREAD_COND_INITIALIZER;       /* a job queued */
static pthread_cond_t guard_reap_cv = PTHREAD_COND_INITIALIZER;  /* a worker busy */

static void guard_interrupted(int sig)
{
	(void)sig; /* only ends a worker's wait: installed without SA_RESTART */
}

static void *guard_worker_main(void *arg)
{
	struct guard_worker *w = arg;
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, AK_GUARD_SIG);
	pthread_sigmask(SIG_UNBLOCK, &s, NULL);
	pthread_mutex_lock(&guard_mu);
	for (;;) {
		while (guard_qlen == 0) {
			guard_idle++;
			pthread_cond_wait(&guard_cv, &guard_mu);
			guard_idle--;
		}
		struct guard_job *j = guard_queue[guard_qhead];
		guard_qhead = (guard_qhead + 1) % AK_GUARD_QUEUE;
		guard_qlen--;
		w->job = j;
		if (guard_running++ == 0)
			pthread_cond_signal(&guard_reap_cv);
		pthread_mutex_unlock(&guard_mu);
		long rc = guard_valid(j->n.id) ? guard_perform(j, 0) : -EINTR;
		pthread_mutex_lock(&guard_mu);
		w->job = NULL;
		guard_running--;
		pthread_mutex_unlock(&guard_mu);
		guard_answer(j, rc);
		pthread_mutex_lock(&guard_mu);
	}
	return NULL;
}

/* Every 250 ms while a worker is busy: a worker whose caller is gone stops waiting. */
static void *guard_reaper(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&guard_mu);
	for (;;) {
		while (guard_running == 0)
			pthread_cond_wait(&guard_reap_cv, &guard_mu);
		pthread_mutex_unlock(&guard_mu);
		nanosleep(&(struct timespec){ 0, 250 * 1000 * 1000 }, NULL);
		pthread_mutex_lock(&guard_mu);
		for (int i = 0; i < guard_nworkers; i++)
			if (guard_workers[i].job && !guard_valid(guard_workers[i].job->n.id))
				pthread_kill(guard_workers[i].t, AK_GUARD_SIG);
	}
	return NULL;
}

/* Queues a call that may wait: 0, or an errno when the queue is full. */
static int guard_enqueue(struct guard_job *j, const pthread_attr_t *attr)
{
	pthread_mutex_lock(&guard_mu);
	int err = 0;
	if (guard_qlen == AK_GUARD_QUEUE) {
		err = EAGAIN;
	} else {
		guard_queue[(guard_qhead + guard_qlen++) % AK_GUARD_QUEUE] = j;
		static int reaping;
		pthread_t t;
		if (!reaping && pthread_create(&t, attr, guard_reaper, NULL) == 0)
			reaping = 1;
		if (guard_idle < guard_qlen && guard_nworkers < AK_GUARD_WORKERS) {
			struct guard_worker *w = &guard_workers[guard_nworkers];
			if (pthread_create(&w->t, attr, guard_worker_main, w) == 0)
				guard_nworkers++;
		}
		if (guard_nworkers == 0) { /* no thread at all: it cannot be done */
			guard_qlen--;
			err = EAGAIN;
		}
		pthread_cond_signal(&guard_cv);
	}
	pthread_mutex_unlock(&guard_mu);
	return err;
}

/* Answered here, at once, unless the call would wait: that goes to a worker. A caller's
 * wait ends at any signal until we receive it: a slow answer starves a caller
 * interrupted often (a profiler's timer). */
static void *guard_main(void *arg)
{
	(void)arg;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 64 * 1024);
	int lfd = -1;
	if (read(guard_pipe[0], &lfd, sizeof(lfd)) != (ssize_t)sizeof(lfd) || lfd < 0)
		return NULL;
	close(guard_pipe[0]);
	guard_listener = lfd;
	/* The caller's wait ends at any signal until we receive its call (a handler without
	 * SA_RESTART then sees EINTR for a connect() that never began): the caller hands its
	 * CPU straight to us (Linux 6.6), which keeps that window short. */
	uint64_t sync_wake = 1; /* SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP */
	ioctl(guard_listener, AK_NOTIF_SET_FLAGS, sync_wake);
	for (;;) {
		struct guard_job *j = calloc(1, sizeof(*j));
		if (!j)
			_exit(1);
		if (ioctl(guard_listener, AK_NOTIF_RECV, &j->n) < 0) {
			free(j);
			if (errno == EINTR || errno == ENOENT)
				continue;
			return NULL;
		}
		int err = guard_take(j);
		if (err < 0) { /* the caller is gone */
			guard_answer(j, GUARD_GONE);
			continue;
		}
		if (!err)
			err = guard_check(j);
		long rc = -err;
		if (!err) {
			/* This thread never waits (every guarded call of the sandbox waits on
			 * it). A send is tried here at once with MSG_DONTWAIT; one that may wait
			 * and would have (EAGAIN, or a stream send that went in part) is finished
			 * by a worker. A datagram socket's connect() never waits: done here. Any
			 * other connect() is a worker's: whether it waits is the file's
			 * O_NONBLOCK at that very moment, which the caller may flip after any
			 * look of ours (measured: a blocking TCP handshake here stalled all). */
			int conn = j->n.data.nr == SYS_connect;
			int wait = guard_blocking(j) || (conn && j->type != SOCK_DGRAM);
			rc = conn && j->type != SOCK_DGRAM ? -EAGAIN : guard_perform(j, 1);
			if (wait && guard_unfinished(j, rc)) {
				err = guard_enqueue(j, &attr);
				if (!err)
					continue;
				rc = j->done ? (long)j->done : -err; /* (no worker: the part sent) */
			}
		}
		guard_answer(j, rc);
	}
}

/* Abstract sockets have no inode to judge: where the sandbox shares the host's network
 * namespace (permissive's "host") the host's (an X server's, a session bus's) answer any
 * connect(). Landlock's scope (ABI 6, Linux 6.12) refuses those made outside our domain.
 * Before the guard's thread starts, so that it connects from inside the domain too.
 * An older kernel has none: its abstract sockets are then the netns's to isolate. */
static const char *guard_scope_abstract(void)
{
	struct {
		uint64_t handled_access_fs, handled_access_net, scoped;
	} attr = { 0, 0, 1 /* LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET */ };
	long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, 1 /* _VERSION */);
	if (abi < 6)
		return "no Landlock scopes (ABI < 6)";
	long fd = syscall(SYS_landlock_create_ruleset, &attr, sizeof(attr), 0);
	if (fd < 0)
		return strerror(errno);
	long rc = syscall(SYS_landlock_restrict_self, (int)fd, 0);
	int saved = errno;
	close((int)fd);
	return rc < 0 ? strerror(saved) : NULL;
}

/* Records the sandbox's own mounts, starts the thread and, for this thread only (so not
 * the guard's), the filter that sends every connect() and every send with an address to
 * it. Called after drop_caps and before the deny list, which takes pidfd_getfd and
 * process_vm_readv from the commands. Returns why it cannot, or NULL: main() then dies
 * with that reason, before any command runs (commands never run unguarded; the host's
 * `doctor` says beforehand whether the guard can start here). */
static const char *guard_start(void)
{
	char *save = NULL;
	for (char *m = strtok_r(guard_spec, ":", &save); m; m = strtok_r(NULL, ":", &save)) {
		if (nguard_mnts == AK_MAX_GUARD_MOUNTS)
			return "too many mounts";
		if (mount_id(AT_FDCWD, m, AT_SYMLINK_NOFOLLOW, &guard_mnts[nguard_mnts]) == 0)
			nguard_mnts++;
	}
#ifndef AK_AUDIT_ARCH
	return "no seccomp filter for this architecture";
#else
	/* io_uring's IORING_OP_CONNECT is no syscall of its own: with io_uring, connect()
	 * would pass by the guard (permissive's deny list leaves io_uring open). A datagram
	 * sent with an address reaches a host socket as a connect() would: sendto() with one
	 * (send() is sendto() without), and sendmsg()/sendmmsg() (whose address a filter
	 * cannot see) are the guard's too. */
	struct ak_sock_filter prog[] = {
		{ 0x20, 0, 0, 4 },                     /* 0: ld arch */
		{ 0x15, 0, 12, AK_AUDIT_ARCH },        /* 1: else allow (the deny list judges) */
		{ 0x20, 0, 0, 0 },                     /* 2: ld nr */
		{ 0x15, 12, 0, SYS_connect },          /* 3 */
		{ 0x15, 11, 0, SYS_sendmsg },          /* 4 */
		{ 0x15, 10, 0, SYS_sendmmsg },         /* 5 */
		{ 0x15, 8, 0, SYS_io_uring_setup },    /* 6 */
		{ 0x15, 7, 0, SYS_io_uring_enter },    /* 7 */
		{ 0x15, 6, 0, SYS_io_uring_register }, /* 8 */
		{ 0x15, 0, 4, SYS_sendto },            /* 9: else allow */
		{ 0x20, 0, 0, 48 },                    /* 10: ld args[4] (its address), low half */
		{ 0x15, 0, 4, 0 },                     /* 11: non-zero: notify */
		{ 0x20, 0, 0, 52 },                    /* 12: high half */
		{ 0x15, 0, 2, 0 },                     /* 13: non-zero: notify */
		{ 0x06, 0, 0, AK_RET_ALLOW },          /* 14 */
		{ 0x06, 0, 0, AK_RET_ERRNO | EPERM },  /* 15 */
		{ 0x06, 0, 0, AK_RET_USER_NOTIF },     /* 16 */
	};
	struct ak_sock_fprog fp = { (unsigned short)(sizeof(prog) / sizeof(prog[0])), prog };
	/* The probe a denied pidfd_getfd would fail (a runtime's own seccomp profile). */
	int self = (int)syscall(SYS_pidfd_open, getpid(), 0);
	int probe = self < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, self, 0, 0);
	int perr = errno;
	if (self >= 0)
		close(self);
	if (probe < 0)
		return perr == ENOSYS ? "no pidfd_getfd" : strerror(perr);
	close(probe);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return strerror(errno);
	/* Our commands share our uid: dumpable, we were theirs to trace and to write through
	 * /proc/1/mem (measured: permissive leaves ptrace open), and the guard with us. Not
	 * dumpable, that takes a CAP_SYS_PTRACE they lack. (Their exec makes them dumpable
	 * again, as the guard needs: pidfd_getfd and process_vm_readv check that.) */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		return strerror(errno);
	guard_abstract = guard_scope_abstract();
	/* The workers' signal: blocked everywhere but in them (one sent to us by the
	 * commands then interrupts a worker's call at worst: the sandbox's own) */
	struct sigaction sa = { .sa_handler = guard_interrupted };
	sigset_t gs;
	sigemptyset(&gs);
	sigaddset(&gs, AK_GUARD_SIG);
	if (sigaction(AK_GUARD_SIG, &sa, NULL) < 0 || sigprocmask(SIG_BLOCK, &gs, NULL) < 0)
		return strerror(errno);
	/* The thread first: one made after the filter would have it, and notify itself. */
	if (pipe2(guard_pipe, O_CLOEXEC) < 0)
		return strerror(errno);
	pthread_t t;
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay the main loop's */
	int rc = pthread_create(&t, NULL, guard_main, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0)
		return strerror(rc);
	/* Once we hold a connect(), only a fatal signal may end its wait (5.19): one that
	 * restarted it after ours connected would read EISCONN. */
	long fd = syscall(SYS_seccomp, AK_SECCOMP_SET_MODE_FILTER,
			  AK_FILTER_FLAG_NEW_LISTENER | AK_FILTER_FLAG_WAIT_KILLABLE_RECV, &fp);
	if (fd < 0 && errno == EINVAL)
		fd = syscall(SYS_seccomp, AK_SECCOMP_SET_MODE_FILTER, AK_FILTER_FLAG_NEW_LISTENER, &fp);
	int saved = errno, lfd = (int)fd;
	if (fd >= 0 && lfd <= 2) {
		lfd = fcntl((int)fd, F_DUPFD_CLOEXEC, 3);
		close((int)fd);
	} else if (fd >= 0) {
		fcntl(lfd, F_SETFD, FD_CLOEXEC);
	}
	if (write(guard_pipe[1], &lfd, sizeof(lfd)) != (ssize_t)sizeof(lfd))
		die("unix-socket guard: %s", strerror(errno)); /* the filter is on: no way back */
	close(guard_pipe[1]);
	return fd < 0 ? strerror(saved) : NULL;
#endif
}

static int unix_socket(const char *path, struct sockaddr_un *sa)
{
	if (strlen(path) >= sizeof(sa->sun_path))
		die("socket path too long: %s", path);
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	strcpy(sa->sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	return fd;
}

/* Wait up to 10 s for an entry of sysfs class dir CLASS whose ATTR file reads WANT, then
 * open /dev/<entry> with FLAGS (virtio ports by name, disks by serial appear late). */
static int open_sysfs_device(const char *class, const char *attr, const char *want, int flags,
			     char *dev, size_t dev_size)
{
	int64_t until = now_ms() + 10000;
	for (;;) {
		if (find_sysfs_device(class, attr, want, dev, dev_size) == 0) {
			int fd = open(dev, flags | O_CLOEXEC | O_NOCTTY);
			if (fd >= 0)
				return fd;
		}
		if (now_ms() > until)
			die("%s with %s %s did not appear within 10 s", class, attr, want);
		usleep(20000);
	}
}

static int open_vport(const char *name)
{
	char dev[300];
	return open_sysfs_device("/sys/class/virtio-ports", "name", name, O_RDWR, dev, sizeof(dev));
}

/* ---------- microVM guest setup (agent as /init in our initramfs) ---------- */

static void vm_exit(void)
{
	if (!vm_poweroff || getpid() != 1)
		return;
	sync();
	/* A reset is what every VMM we use turns into its own exit (QEMU -no-reboot,
	 * Firecracker's i8042 reset); a power-off needs ACPI that a microVM may lack. */
	reboot(RB_AUTOBOOT);
}

/* --insmod FILE[,FILE..]: load modules in order (the kernel passes init at most 32
 * arguments, so a list travels as one). */
static void vm_insmod(char *list)
{
	for (char *path = strtok(list, ","); path; path = strtok(NULL, ",")) {
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			die("--insmod %s: %s", path, strerror(errno));
		if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
			die("--insmod %s: %s", path, strerror(errno));
		close(fd);
	}
}

/* The block device whose virtio serial is SERIAL (or a /dev path as given), waiting for
 * the driver to publish it. */
static void vm_find_disk(const char *serial, char *dev, size_t size)
{
	if (!strncmp(serial, "/dev/", 5)) {
		snprintf(dev, size, "%s", serial);
		return;
	}
	close(open_sysfs_device("/sys/block", "serial", serial, O_RDONLY, dev, size));
}

static void vm_move(const char *from, const char *to)
{
	if (mount(from, to, NULL, MS_MOVE, NULL) < 0)
		die("move %s to %s: %s", from, to, strerror(errno));
}

/* Mount the root disk (read-only ext4), put a writable overlay on it when RW names a
 * layer ("tmpfs" or a disk serial), move /dev /proc /sys in and make it the root. */
static void vm_switch_root(const char *root, const char *rw)
{
	char dev[280];
	const char *top = "/newroot";
	vm_find_disk(root, dev, sizeof(dev));
	if (rw) {
		char rwdev[280];
		mkdir_or_die("/ak/lower");
		mkdir_or_die("/ak/rw");
		if (mount(dev, "/ak/lower", "ext4", MS_RDONLY, "") < 0)
			die("mount root %s: %s", dev, strerror(errno));
		if (!strcmp(rw, "tmpfs")) {
			if (mount("tmpfs", "/ak/rw", "tmpfs", 0, "mode=0755") < 0)
				die("mount tmpfs layer: %s", strerror(errno));
		} else {
			vm_find_disk(rw, rwdev, sizeof(rwdev));
			if (mount(rwdev, "/ak/rw", "ext4", MS_NOATIME, "") < 0)
				die("mount writable layer %s: %s", rwdev, strerror(errno));
		}
		mkdir_or_die("/ak/rw/upper");
		mkdir_or_die("/ak/rw/work");
		mkdir_or_die(top);
		if (mount("overlay", top, "overlay", 0,
			  "lowerdir=/ak/lower,upperdir=/ak/rw/upper,workdir=/ak/rw/work") < 0)
			die("overlay root: %s", strerror(errno));
	} else {
		mkdir_or_die(top);
		if (mount(dev, top, "ext4", MS_RDONLY, "") < 0)
			die("mount root %s: %s", dev, strerror(errno));
	}
	static const char *const moved[] = { "/dev", "/proc", "/sys" };
	for (size_t i = 0; i < sizeof(moved) / sizeof(moved[0]); i++) {
		char to[64];
		snprintf(to, sizeof(to), "%s%s", top, moved[i]);
		if (rw)
			mkdir(to, 0755);
		vm_move(moved[i], to);
	}
	if (chdir(top) < 0)
		die("chdir %s: %s", top, strerror(errno));
	vm_move(".", "/");
	if (chroot(".") < 0 || chdir("/") < 0)
		die("chroot: %s", strerror(errno));
	if (access("/run", F_OK) == 0 &&
	    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0)
		die("mount /run: %s", strerror(errno));
}

/* --vsock-listen PORT (Firecracker): serve on a vsock port; the host reaches it through
 * Firecracker's unix socket with "CONNECT <port>\n". Same semantics as --listen. */
#define AK_AF_VSOCK 40
struct ak_sockaddr_vm {
	unsigned short svm_family, svm_reserved1;
	unsigned int svm_port, svm_cid;
	unsigned char svm_zero[4];
};

static int vm_vsock_listen(const char *port)
{
	char *end;
	long v = strtol(port, &end, 10);
	if (*end || v < 1 || v > 0x7fffffffL)
		die("--vsock-listen wants a port number");
	struct ak_sockaddr_vm sa = { .svm_family = AK_AF_VSOCK, .svm_port = (unsigned)v,
				     .svm_cid = 0xffffffffu };
	int fd = socket(AK_AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 4) < 0)
		die("vsock listen on port %s: %s", port, strerror(errno));
	return fd;
}

/* --disk SERIAL:TARGET:ro|rw: mount one more ext4 disk (the project copy) in the new root. */
static void vm_disk(char *spec)
{
	char *target = strchr(spec, ':');
	char *mode = target ? strchr(target + 1, ':') : NULL;
	if (!target || !mode || (strcmp(mode + 1, "ro") && strcmp(mode + 1, "rw")))
		die("--disk wants SERIAL:TARGET:ro|rw");
	*target++ = 0;
	*mode++ = 0;
	char dev[280];
	vm_find_disk(spec, dev, sizeof(dev));
	mkdir_p(target, 0755);
	if (mount(dev, target, "ext4", (!strcmp(mode, "ro") ? MS_RDONLY : 0) | MS_NOSUID | MS_NODEV, "") < 0)
		die("mount %s on %s: %s", dev, target, strerror(errno));
}

static void vm_ifup(int s, const char *name)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		die("interface %s: %s", name, strerror(errno));
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		die("bring %s up: %s", name, strerror(errno));
}

static void vm_set_addr(int s, unsigned long req, const char *name, in_addr_t addr)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = addr;
	if (ioctl(s, req, &ifr) < 0)
		die("configure %s: %s", name, strerror(errno));
}

/* --net lo | ADDR/PREFIX,GATEWAY: bring up lo, and eth0 with a static address and route. */
static void vm_net(const char *spec)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		die("socket: %s", strerror(errno));
	vm_ifup(s, "lo");
	if (strcmp(spec, "lo")) {
		char buf[64], *slash, *comma;
		snprintf(buf, sizeof(buf), "%s", spec);
		slash = strchr(buf, '/');
		comma = strchr(buf, ',');
		if (!slash || !comma || comma < slash)
			die("--net wants lo or ADDR/PREFIX,GATEWAY");
		*slash++ = 0;
		*comma++ = 0;
		int prefix = atoi(slash);
		struct in_addr addr, gw;
		if (prefix < 1 || prefix > 32 || inet_pton(AF_INET, buf, &addr) != 1 ||
		    inet_pton(AF_INET, comma, &gw) != 1)
			die("--net: bad address %s", spec);
		int64_t until = now_ms() + 5000;
		while (if_nametoindex("eth0") == 0) {
			if (now_ms() > until)
				die("eth0 did not appear");
			usleep(20000);
		}
		vm_set_addr(s, SIOCSIFADDR, "eth0", addr.s_addr);
		vm_set_addr(s, SIOCSIFNETMASK, "eth0", htonl(prefix == 32 ? 0xffffffffu : ~(0xffffffffu >> prefix)));
		vm_ifup(s, "eth0");
		struct rtentry rt;
		memset(&rt, 0, sizeof(rt));
		struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst;
		struct sockaddr_in *mask = (struct sockaddr_in *)&rt.rt_genmask;
		struct sockaddr_in *via = (struct sockaddr_in *)&rt.rt_gateway;
		dst->sin_family = mask->sin_family = via->sin_family = AF_INET;
		via->sin_addr = gw;
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
			die("default route: %s", strerror(errno));
	}
	close(s);
}

static void usage(void)
{
	die("usage: ak-agent [--init] [--mount-proc|--mount-sys|--mount-dev|--mount-tmp|--mount-basics]\n"
	    "  [--hold FD] [--give FD] [--attach FD:TARGET].. [--overlay TARGET:LOWER[+LOWER..]:UPPER:WORK].. [--bind SRC:DST]..\n"
	    "  [--mask PATH].. [--mask-private DIR].. [--cover-proc] [--root-ro] [--drop-caps [--user UID:GID:HOME [--user-ns]]]\n"
	    "  [--lock-listen-dir] [--peers-outside]\n"
	    "  [--pids-max N] [--pty-max N] [--make-dev SHM_BYTES] [--seccomp FILE | --seccomp-fd FD]\n"
	    "  [--exec-fd FD]\n"
	    "  [--guard-unix MOUNT[:MOUNT..]]\n"
	    "  [--insmod FILE[,FILE..]].. [--root SERIAL [--rw tmpfs|SERIAL]] [--disk SERIAL:DIR:ro|rw]..\n"
	    "  [--net lo|ADDR/PREFIX,GW] [--hostname NAME] [--poweroff] [--vsock-listen PORT]\n"
	    "  [--fd N | --listen PATH | --connect PATH | --vport NAME [--reconnect]]");
}

int main(int argc, char **argv)
{
	int m_proc = 0, m_sys = 0, m_dev = 0, m_tmp = 0, caps = 0, nov = 0, nmask = 0, nbind = 0;
	int chfd = -1, seccomp_fd = -1;
	const char *seccomp = NULL, *pids_max = NULL, *listen_path = NULL, *connect_path = NULL, *vport = NULL;
	const char *pty_max = NULL, *dev_shm = NULL;
	char **overlays = calloc((size_t)argc, sizeof(char *));
	char **masks = calloc((size_t)argc, sizeof(char *));
	char **binds = calloc((size_t)argc, sizeof(char *));
	char **insmods = calloc((size_t)argc, sizeof(char *));
	char **disks = calloc((size_t)argc, sizeof(char *));
	char **privs = calloc((size_t)argc, sizeof(char *));
	char **attaches = calloc((size_t)argc, sizeof(char *));
	int ninsmod = 0, ndisk = 0, npriv = 0, lock_listen_dir = 0, nattach = 0, proc_cover = 0;
	int root_ro = 0;
	const char *vm_root = NULL, *vm_rw = NULL, *vm_netspec = NULL, *hostname = NULL;
	const char *vsock_port = NULL;

	if (!overlays || !masks || !binds || !insmods || !disks || !privs || !attaches)
		die("out of memory");
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;
		int takes = 1;
		if (!strcmp(a, "--mount-proc")) m_proc = 1, takes = 0;
		else if (!strcmp(a, "--mount-sys")) m_sys = 1, takes = 0;
		else if (!strcmp(a, "--mount-dev")) m_dev = 1, takes = 0;
		else if (!strcmp(a, "--mount-tmp")) m_tmp = 1, takes = 0;
		else if (!strcmp(a, "--mount-basics")) m_proc = m_sys = m_dev = m_tmp = 1, takes = 0;
		else if (!strcmp(a, "--drop-caps")) caps = 1, takes = 0;
		else if (!strcmp(a, "--lock-listen-dir")) lock_listen_dir = 1, takes = 0;
		else if (!strcmp(a, "--peers-outside")) peers_outside = 1, takes = 0;
		else if (!strcmp(a, "--cover-proc")) proc_cover = 1, takes = 0;
		else if (!strcmp(a, "--root-ro")) root_ro = 1, takes = 0;
		else if (!strcmp(a, "--user-ns")) user_ns_only = 1, takes = 0;
		else if (!strcmp(a, "--init")) is_init = 1, takes = 0;
		else if (!strcmp(a, "--poweroff")) vm_poweroff = 1, takes = 0;
		else if (!strcmp(a, "--reconnect")) vport_reconnect = 1, takes = 0;
		else if (!val) usage();
		else if (!strcmp(a, "--attach")) attaches[nattach++] = argv[i + 1];
		else if (!strcmp(a, "--hold")) {
			/* The lock of the sandbox's host id range: held for as long as the agent (the
			 * sandbox) lives, never handed to a command (which could unlock it). */
			char *end;
			long v = strtol(val, &end, 10);
			if (!val || *end || v < 3 || v > INT_MAX || fcntl((int)v, F_SETFD, FD_CLOEXEC) < 0)
				die("--hold wants an open file descriptor above 2");
		}
		else if (!strcmp(a, "--give")) {
			/* A descriptor for one command's stdin and stdout (EXEC with GIVEN_STDIO). */
			char *end;
			long v = strtol(val, &end, 10);
			if (*end || v < 3 || v > INT_MAX || given_fd >= 0 ||
			    fcntl((int)v, F_SETFD, FD_CLOEXEC) < 0)
				die("--give wants one open file descriptor above 2");
			given_fd = (int)v;
		}
		else if (!strcmp(a, "--seccomp-fd") || !strcmp(a, "--exec-fd")) {
			/* --seccomp-fd: our BPF program, read (and closed) where --seccomp's file
			 * would be. --exec-fd: the sealed copy of this binary that bwrap exec'd us
			 * from (/proc/self/fd/FD); closed here. Close-on-exec from now on: neither
			 * ever reaches a command. */
			char *end;
			long v = strtol(val, &end, 10);
			if (*end || v < 3 || v > INT_MAX || fcntl((int)v, F_SETFD, FD_CLOEXEC) < 0)
				die("%s wants an open file descriptor above 2", a);
			if (!strcmp(a, "--exec-fd")) {
				close((int)v);
				/* (exec'd as /proc/self/fd/N, our name would be "N") */
				prctl(PR_SET_NAME, "agent", 0, 0, 0);
			}
			else if (seccomp_fd >= 0)
				die("--seccomp-fd given twice");
			else
				seccomp_fd = (int)v;
		}
		else if (!strcmp(a, "--overlay")) overlays[nov++] = argv[i + 1];
		else if (!strcmp(a, "--mask")) masks[nmask++] = argv[i + 1];
		else if (!strcmp(a, "--bind")) binds[nbind++] = argv[i + 1];
		else if (!strcmp(a, "--mask-private")) privs[npriv++] = argv[i + 1];
		else if (!strcmp(a, "--insmod")) insmods[ninsmod++] = argv[i + 1];
		else if (!strcmp(a, "--disk")) disks[ndisk++] = argv[i + 1];
		else if (!strcmp(a, "--root")) vm_root = val;
		else if (!strcmp(a, "--rw")) vm_rw = val;
		else if (!strcmp(a, "--net")) vm_netspec = val;
		else if (!strcmp(a, "--hostname")) hostname = val;
		else if (!strcmp(a, "--vsock-listen")) vsock_port = val;
		else if (!strcmp(a, "--seccomp")) seccomp = val;
		else if (!strcmp(a, "--pty-max")) pty_max = val;
		else if (!strcmp(a, "--make-dev")) dev_shm = val;
		else if (!strcmp(a, "--guard-unix")) guard_spec = argv[i + 1];
		else if (!strcmp(a, "--user")) run_as = val;
		else if (!strcmp(a, "--pids-max")) pids_max = val;
		else if (!strcmp(a, "--listen")) listen_path = val;
		else if (!strcmp(a, "--connect")) connect_path = val;
		else if (!strcmp(a, "--vport")) vport = val;
		else if (!strcmp(a, "--fd")) {
			char *end;
			long v = strtol(val, &end, 10);
			if (*end || v < 0 || v > INT_MAX)
				die("--fd wants a file descriptor number");
			chfd = (int)v;
		} else usage();
		i += takes;
	}
	if ((chfd >= 0) + !!listen_path + !!connect_path + !!vport + !!vsock_port > 1)
		die("choose at most one of --fd, --listen, --connect, --vport, --vsock-listen");
	if (vport_reconnect && !vport)
		die("--reconnect needs --vport");
	if (run_as && !caps)
		die("--user needs --drop-caps");
	if (seccomp && seccomp_fd >= 0)
		die("choose one of --seccomp and --seccomp-fd");
	if (user_ns_only && !run_as)
		die("--user-ns needs --user");

	if (getpid() == 1)
		is_init = 1;
	else if (is_init && prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
		die("PR_SET_CHILD_SUBREAPER: %s", strerror(errno));

	if (m_proc) do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	if (m_sys) do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	if (m_dev) mount_dev();
	/* microVM guest: modules, then the root disk becomes / (with /dev, /proc, /sys). */
	for (int i = 0; i < ninsmod; i++)
		vm_insmod(insmods[i]);
	free(insmods);
	if (vm_root)
		vm_switch_root(vm_root, vm_rw);
	for (int i = 0; i < ndisk; i++)
		vm_disk(disks[i]);
	free(disks);
	if (vm_netspec)
		vm_net(vm_netspec);
	if (hostname && sethostname(hostname, strlen(hostname)) < 0)
		die("sethostname: %s", strerror(errno));
	if (m_tmp) do_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	if (dev_shm) {
		make_dev(dev_shm, pty_max);
		pty_max = NULL; /* (capped at the mount) */
	}
	for (int i = 0; i < nattach; i++)
		do_attach(attaches[i]);
	free(attaches);
	if (dev_shm) /* once its device nodes are attached */
		dev_read_only();
	struct private_list private_found = { NULL, 0, 0 };
	for (int i = 0; i < npriv; i++) /* before the overlays: see find_private */
		do_find_private(privs[i], &private_found);
	free(privs);
	for (int i = 0; i < nov; i++)
		do_overlay(overlays[i]);
	free(overlays);
	for (int i = 0; i < nbind; i++)
		do_bind(binds[i]);
	free(binds);
	for (int i = 0; i < nmask; i++)
		do_mask(masks[i]);
	free(masks);
	mask_found(&private_found);
	if (pids_max)
		do_pids_max(pids_max);
	if (proc_cover)
		cover_proc();
	if (pty_max)
		limit_ptys(pty_max);
	/* --root-ro: the sandbox's root (bwrap's tmpfs, nosuid and nodev) read-only, after
	 * our own mounts and before anything of the sandbox's runs. */
	if (root_ro && mount(NULL, "/", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
			     NULL) < 0)
		die("--root-ro: %s", strerror(errno));

	/* The channel: every fd the agent keeps is close-on-exec and lives above 2. */
	struct sockaddr_un sa;
	if (listen_path) {
		listen_fd = unix_socket(listen_path, &sa);
		unlink(listen_path);
		if (bind(listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(listen_fd, 4) < 0)
			die("listen on %s: %s", listen_path, strerror(errno));
		if (listen_fd <= 2)
			listen_fd = fcntl(listen_fd, F_DUPFD_CLOEXEC, 3);
		if (lock_listen_dir) {
			/* The socket's dir is a bind from the host: once we listen, make it read-only
			 * so nothing in the sandbox can replace the socket with one of its own. */
			char dir[AK_MAX_PATH];
			snprintf(dir, sizeof(dir), "%s", listen_path);
			char *slash = strrchr(dir, '/');
			if (slash && slash != dir)
				*slash = 0;
			if (mount(NULL, dir, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV |
					  MS_NOEXEC, NULL) < 0)
				die("--lock-listen-dir %s: %s", dir, strerror(errno));
		}
	} else if (vsock_port) {
		listen_fd = vm_vsock_listen(vsock_port);
		if (listen_fd <= 2)
			listen_fd = fcntl(listen_fd, F_DUPFD_CLOEXEC, 3);
	} else if (connect_path) {
		int fd = unix_socket(connect_path, &sa);
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
			die("connect to %s: %s", connect_path, strerror(errno));
		rfd = wfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
		if (fd != rfd)
			close(fd);
	} else if (vport) {
		int fd = open_vport(vport);
		rfd = wfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
		if (fd != rfd)
			close(fd);
		if (vport_reconnect) {
			/* A write to a host-less port blocks until a host connects: never block,
			 * and speak (HELLO) only once a host is there. */
			set_nonblock(rfd);
			host_away = 1;
		}
	} else if (chfd >= 0) {
		rfd = wfd = fcntl(chfd, F_DUPFD_CLOEXEC, 3);
		if (rfd < 0)
			die("--fd %d: %s", chfd, strerror(errno));
		if (chfd > 2)
			close(chfd);
	} else {
		rfd = fcntl(0, F_DUPFD_CLOEXEC, 3);
		wfd = fcntl(1, F_DUPFD_CLOEXEC, 3);
		if (rfd < 0 || wfd < 0)
			die("stdin/stdout: %s", strerror(errno));
	}
	if (listen_fd < 0 && rfd < 0)
		die("channel setup failed: %s", strerror(errno));
	/* 0 and 1 stop being the host's pipes; fd 2 stays for fatal diagnostics only. */
	int nul = open_devnull(O_RDWR);
	if (nul >= 0) {
		dup2(nul, 0);
		dup2(nul, 1);
		if (nul > 2)
			close(nul);
	}

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	for (size_t i = 0; i < sizeof(fwd_signals) / sizeof(fwd_signals[0]); i++)
		sigaddset(&mask, fwd_signals[i]);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0 ||
	    (sig_fd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK)) < 0)
		die("signalfd: %s", strerror(errno));
	signal(SIGPIPE, SIG_IGN); /* a vanished host shows up as EPIPE, handled as EOF */

	if (caps)
		drop_caps();
	if (guard_spec) { /* after drop_caps (its user namespace), before the deny list */
		const char *why = guard_start();
		if (why)
			die("--guard-unix: %s", why);
	}
	if (seccomp || seccomp_fd >= 0)
		install_seccomp(seccomp, seccomp_fd);
	if (rfd >= 0 && !host_away)
		send_hello();
	serve();
	return 0;
}

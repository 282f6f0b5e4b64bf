/* ak-agent protocol v1 (revision 1.3): constants and pure, bounds-checked parsers (shared with the fuzzer). */
#ifndef AK_PROTO_H
#define AK_PROTO_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define AK_VERSION 1u
#define AK_HDR 12u
#define AK_MAX_PAYLOAD (1024u * 1024u)
#define AK_MAX_ARGV 4096u
#define AK_MAX_ENV 4096u
#define AK_MAX_PATH 4096u
#define AK_MAX_RLIMITS 64u
#define AK_MAX_PING 1024u
#define AK_MAX_ENTROPY 4096u   /* CLONE: random bytes per request */
#define AK_MIN_ENTROPY 16u
#define AK_MAX_HOSTNAME 64u    /* HOST_NAME_MAX */
#define AK_MAX_CLONE_DISKS 8u
#define AK_MAX_DISK_SERIAL 20u /* virtio-blk serials are at most 20 bytes */
#define AK_MAX_DISK_TARGET 255u
#define AK_EXIT_MEMORY 256u    /* QUERY: ended commands remembered (= MAX_PROCS, see below) */
#define AK_FEAT_QUERY 1u       /* HELLO FEATURES bit: QUERY is served (revision 1.3) */

enum {
	T_PING = 0x01, T_EXEC = 0x02, T_STDIN = 0x03, T_SIGNAL = 0x04, T_RESIZE = 0x05,
	T_FILE_READ = 0x06, T_FILE_WRITE = 0x07, T_FILE_CHUNK = 0x08, T_FILE_CLOSE = 0x09,
	T_STAT = 0x0A, T_LIST = 0x0B, T_MKDIR = 0x0C, T_REMOVE = 0x0D, T_SHUTDOWN = 0x0E,
	T_CLONE = 0x0F, T_PAUSE = 0x10, T_RESUME = 0x11, T_CANCEL = 0x12, /* 1.1, 1.2 */
	T_QUERY = 0x13, /* 1.3 */
	T_HELLO = 0x41, T_PONG = 0x42, T_STARTED = 0x43, T_STDOUT = 0x44, T_STDERR = 0x45,
	T_EXIT = 0x46, T_OK = 0x47, T_ERROR = 0x48, T_FILE_DATA = 0x49, T_FILE_END = 0x4A,
	T_STAT_RESULT = 0x4B, T_LIST_RESULT = 0x4C,
};

enum {
	G_ARGV = 1, G_ENV = 2, G_CWD = 3, G_UID = 4, G_GID = 5, G_TIMEOUT_MS = 6, G_STDIN = 7,
	G_PTY = 8, G_RLIMIT = 9, G_UMASK = 10, G_GIVEN_STDIO = 11,
	G_PATH = 20, G_OFFSET = 21, G_LENGTH = 22, G_MODE = 23, G_APPEND = 24, G_MKDIRS = 25,
	G_SIZE = 26, G_FOLLOW = 27, G_PARENTS = 28, G_RECURSIVE = 29,
	G_VERSION = 40, G_PID = 41, G_AGENT_NAME = 42, G_AGENT_UID = 43, G_FEATURES = 44,
	G_CODE = 50, G_SIGNAL = 51, G_TIMED_OUT = 52, G_CORE = 53,
	G_ERRNO = 60, G_MESSAGE = 61,
	G_TYPE = 70, G_ST_MODE = 71, G_ST_SIZE = 72, G_MTIME_NS = 73, G_UID_ST = 74, G_GID_ST = 75,
	G_LINK_TARGET = 76, G_NAME = 80,
	G_ENTROPY = 90, G_HOSTNAME = 91, G_WALLCLOCK_NS = 92, G_DISK = 93,
};

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t rd32(const uint8_t *p)
{
	return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }
static inline void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void wr32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static inline void wr64(uint8_t *p, uint64_t v)
{
	wr32(p, (uint32_t)v);
	wr32(p + 4, (uint32_t)(v >> 32));
}

struct frame_hdr {
	uint32_t len;
	uint16_t type, flags;
	uint32_t chan;
};

static inline void hdr_decode(const uint8_t *b, struct frame_hdr *h)
{
	h->len = rd32(b);
	h->type = rd16(b + 4);
	h->flags = rd16(b + 6);
	h->chan = rd32(b + 8);
}

struct tlv_iter {
	const uint8_t *p;
	size_t left;
};

/* 1 = got one, 0 = clean end, -1 = truncated/overlong (the whole payload is malformed). */
static inline int tlv_next(struct tlv_iter *it, uint16_t *tag, const uint8_t **val, uint32_t *len)
{
	if (it->left == 0)
		return 0;
	if (it->left < 6)
		return -1;
	*tag = rd16(it->p);
	*len = rd32(it->p + 2);
	if ((size_t)*len > it->left - 6)
		return -1;
	*val = it->p + 6;
	it->p += 6 + (size_t)*len;
	it->left -= 6 + (size_t)*len;
	return 1;
}

/* A string value is acceptable if short enough and free of NUL bytes. */
static inline int str_ok(const uint8_t *v, uint32_t len, uint32_t max)
{
	return len <= max && memchr(v, 0, len) == NULL;
}

#define PERR(...) (snprintf(err, errlen, __VA_ARGS__), EINVAL)

struct rlim_req {
	uint32_t resource;
	uint64_t soft, hard;
};

struct exec_req {
	char **argv;     /* NULL-terminated */
	char **envp;     /* NULL-terminated */
	char *cwd;       /* NULL = inherit */
	char *arena;     /* owns every string above */
	uint32_t argc, envc;
	int has_uid, has_gid, want_stdin, has_pty, has_umask, given_stdio;
	uint32_t uid, gid, timeout_ms, umask;
	uint16_t rows, cols;
	uint32_t nrlimits;
	struct rlim_req rlimits[AK_MAX_RLIMITS];
};

static inline void exec_req_free(struct exec_req *r)
{
	free(r->argv);
	free(r->envp);
	free(r->arena);
	r->argv = r->envp = NULL;
	r->arena = r->cwd = NULL;
}

/* Parse an EXEC payload. Returns 0, or an errno with a message in err. */
static inline int parse_exec(const uint8_t *pl, size_t n, struct exec_req *r, char *err, size_t errlen)
{
	struct tlv_iter it = { pl, n };
	uint16_t tag;
	const uint8_t *v;
	uint32_t len;
	int rc;
	size_t nargv = 0, nenv = 0, strbytes = 0;
	int has_cwd = 0;

	memset(r, 0, sizeof(*r));
	/* Pass 1: validate and count so the allocation is exact. */
	while ((rc = tlv_next(&it, &tag, &v, &len)) == 1) {
		switch (tag) {
		case G_ARGV:
		case G_ENV:
		case G_CWD:
			if (!str_ok(v, len, tag == G_CWD ? AK_MAX_PATH : AK_MAX_PAYLOAD))
				return PERR("exec: tag %u: string contains NUL or is too long", tag);
			if (tag == G_ARGV && ++nargv > AK_MAX_ARGV)
				return PERR("exec: too many argv entries");
			if (tag == G_ENV && ++nenv > AK_MAX_ENV)
				return PERR("exec: too many env entries");
			if (tag == G_ENV && !memchr(v, '=', len))
				return PERR("exec: env entry without '='");
			if (tag == G_CWD && (len == 0 || has_cwd++))
				return PERR("exec: bad or repeated CWD");
			strbytes += (size_t)len + 1;
			break;
		case G_UID: case G_GID: case G_TIMEOUT_MS: case G_UMASK:
			if (len != 4)
				return PERR("exec: tag %u must be u32", tag);
			break;
		case G_STDIN:
		case G_GIVEN_STDIO:
			if (len != 1)
				return PERR("exec: tag %u must be u8", tag);
			break;
		case G_PTY:
			if (len != 4)
				return PERR("exec: PTY must be u16 rows + u16 cols");
			break;
		case G_RLIMIT:
			if (len != 20)
				return PERR("exec: RLIMIT must be u32 + u64 + u64");
			if (r->nrlimits >= AK_MAX_RLIMITS)
				return PERR("exec: too many rlimits");
			r->nrlimits++;
			break;
		default:
			break; /* unknown tags are ignored for forward compatibility */
		}
	}
	if (rc < 0)
		return PERR("exec: malformed TLV");
	if (nargv == 0)
		return PERR("exec: ARGV is required");
	r->nrlimits = 0;
	r->argv = calloc(nargv + 1, sizeof(char *));
	r->envp = calloc(nenv + 1, sizeof(char *));
	r->arena = malloc(strbytes + 1);
	if (!r->argv || !r->envp || !r->arena) {
		exec_req_free(r);
		snprintf(err, errlen, "exec: out of memory");
		return ENOMEM;
	}
	char *a = r->arena;
	it.p = pl;
	it.left = n;
	while (tlv_next(&it, &tag, &v, &len) == 1) {
		char *s = a;
		switch (tag) {
		case G_ARGV: case G_ENV: case G_CWD:
			memcpy(a, v, len);
			a[len] = 0;
			a += (size_t)len + 1;
			if (tag == G_ARGV)
				r->argv[r->argc++] = s;
			else if (tag == G_ENV)
				r->envp[r->envc++] = s;
			else
				r->cwd = s;
			break;
		case G_UID: r->has_uid = 1; r->uid = rd32(v); break;
		case G_GID: r->has_gid = 1; r->gid = rd32(v); break;
		case G_TIMEOUT_MS: r->timeout_ms = rd32(v); break;
		case G_UMASK: r->has_umask = 1; r->umask = rd32(v) & 0777; break;
		case G_STDIN: r->want_stdin = v[0] == 1; break;
		case G_GIVEN_STDIO: r->given_stdio = v[0] == 1; break;
		case G_PTY: r->has_pty = 1; r->rows = rd16(v); r->cols = rd16(v + 2); break;
		case G_RLIMIT: {
			struct rlim_req *q = &r->rlimits[r->nrlimits++];
			q->resource = rd32(v);
			q->soft = rd64(v + 4);
			q->hard = rd64(v + 12);
			if (q->resource >= 16) {
				exec_req_free(r);
				return PERR("exec: unknown rlimit resource");
			}
			break;
		}
		default:
			break;
		}
	}
	return 0;
}

/* Request fields shared by the path-based operations (FILE_READ/WRITE, STAT, LIST, MKDIR, REMOVE). */
struct path_req {
	char path[AK_MAX_PATH + 1];
	int has_path, has_offset, has_length, has_mode;
	uint64_t offset, length;
	uint32_t mode;
	int append, mkdirs, follow, parents, recursive;
};

static inline int parse_path_req(const uint8_t *pl, size_t n, struct path_req *r, char *err, size_t errlen)
{
	struct tlv_iter it = { pl, n };
	uint16_t tag;
	const uint8_t *v;
	uint32_t len;
	int rc;

	memset(r, 0, sizeof(*r));
	r->follow = 1;
	while ((rc = tlv_next(&it, &tag, &v, &len)) == 1) {
		switch (tag) {
		case G_PATH:
			if (len == 0 || !str_ok(v, len, AK_MAX_PATH))
				return PERR("path is empty, too long or contains NUL");
			if (v[0] != '/')
				return PERR("path must be absolute");
			memcpy(r->path, v, len);
			r->path[len] = 0;
			r->has_path = 1;
			break;
		case G_OFFSET: case G_LENGTH:
			if (len != 8)
				return PERR("tag %u must be u64", tag);
			if (tag == G_OFFSET) {
				r->has_offset = 1;
				r->offset = rd64(v);
			} else {
				r->has_length = 1;
				r->length = rd64(v);
			}
			break;
		case G_MODE:
			if (len != 4)
				return PERR("MODE must be u32");
			r->has_mode = 1;
			r->mode = rd32(v) & 07777;
			break;
		case G_APPEND: case G_MKDIRS: case G_FOLLOW: case G_PARENTS: case G_RECURSIVE:
			if (len != 1)
				return PERR("tag %u must be u8", tag);
			if (tag == G_APPEND) r->append = v[0] != 0;
			if (tag == G_MKDIRS) r->mkdirs = v[0] != 0;
			if (tag == G_FOLLOW) r->follow = v[0] != 0;
			if (tag == G_PARENTS) r->parents = v[0] != 0;
			if (tag == G_RECURSIVE) r->recursive = v[0] != 0;
			break;
		default:
			break;
		}
	}
	if (rc < 0)
		return PERR("malformed TLV");
	if (!r->has_path)
		return PERR("PATH is required");
	return 0;
}

/* CLONE (protocol 1.1): what makes a VM restored from a snapshot its own machine. */
struct clone_disk {
	char serial[AK_MAX_DISK_SERIAL + 1];
	char target[AK_MAX_DISK_TARGET + 1];
	int readonly;
};

struct clone_req {
	uint8_t entropy[AK_MAX_ENTROPY];
	uint32_t nentropy;
	char hostname[AK_MAX_HOSTNAME + 1];
	int has_hostname, has_wallclock;
	uint64_t wallclock_ns;
	uint32_t ndisks;
	struct clone_disk disks[AK_MAX_CLONE_DISKS];
};

/* RFC 1123 labels joined by dots: letters, digits, '-' inside a label, '.' between labels. */
static inline int hostname_ok(const uint8_t *v, uint32_t len)
{
	if (len == 0 || len > AK_MAX_HOSTNAME || v[0] == '.' || v[0] == '-' || v[len - 1] == '.' ||
	    v[len - 1] == '-')
		return 0;
	for (uint32_t i = 0; i < len; i++) {
		uint8_t c = v[i];
		int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
		if (!alnum && c != '-' && c != '.')
			return 0;
		if (c == '.' && (v[i + 1] == '.' || v[i + 1] == '-' || v[i - 1] == '-'))
			return 0;
	}
	return 1;
}

/* DISK value: SERIAL:TARGET:ro|rw, SERIAL [A-Za-z0-9_-]{1,20}, TARGET absolute, no ':' or
 * ',' or "..", no NUL. */
static inline int parse_clone_disk(const uint8_t *v, uint32_t len, struct clone_disk *d)
{
	uint32_t i = 0, s0, t0, tl;
	if (len < 6 || len > AK_MAX_DISK_SERIAL + AK_MAX_DISK_TARGET + 4)
		return 0;
	for (s0 = 0; i < len && v[i] != ':'; i++) {
		uint8_t c = v[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '_' || c == '-'))
			return 0;
	}
	if (i == s0 || i > AK_MAX_DISK_SERIAL || i >= len)
		return 0;
	memcpy(d->serial, v, i);
	d->serial[i] = 0;
	t0 = ++i;
	while (i < len && v[i] != ':') {
		if (v[i] == 0 || v[i] == ',')
			return 0;
		i++;
	}
	tl = i - t0;
	if (tl == 0 || tl > AK_MAX_DISK_TARGET || i >= len || v[t0] != '/')
		return 0;
	memcpy(d->target, v + t0, tl);
	d->target[tl] = 0;
	if (strstr(d->target, "/../") || (tl >= 3 && !strcmp(d->target + tl - 3, "/..")))
		return 0;
	i++;
	if (len - i != 2)
		return 0;
	if (!memcmp(v + i, "ro", 2))
		d->readonly = 1;
	else if (!memcmp(v + i, "rw", 2))
		d->readonly = 0;
	else
		return 0;
	return 1;
}

/* Parse a CLONE payload. Returns 0, or an errno with a message in err. */
static inline int parse_clone(const uint8_t *pl, size_t n, struct clone_req *r, char *err, size_t errlen)
{
	struct tlv_iter it = { pl, n };
	uint16_t tag;
	const uint8_t *v;
	uint32_t len;
	int rc;

	memset(r, 0, sizeof(*r));
	while ((rc = tlv_next(&it, &tag, &v, &len)) == 1) {
		switch (tag) {
		case G_ENTROPY:
			if (len < AK_MIN_ENTROPY || len > AK_MAX_ENTROPY)
				return PERR("clone: ENTROPY must be %u..%u bytes", AK_MIN_ENTROPY, AK_MAX_ENTROPY);
			memcpy(r->entropy, v, len);
			r->nentropy = len;
			break;
		case G_HOSTNAME:
			if (!hostname_ok(v, len))
				return PERR("clone: HOSTNAME is not a valid host name");
			memcpy(r->hostname, v, len);
			r->hostname[len] = 0;
			r->has_hostname = 1;
			break;
		case G_WALLCLOCK_NS:
			if (len != 8)
				return PERR("clone: WALLCLOCK_NS must be u64");
			r->wallclock_ns = rd64(v);
			r->has_wallclock = 1;
			break;
		case G_DISK:
			if (r->ndisks >= AK_MAX_CLONE_DISKS)
				return PERR("clone: more than %u disks", AK_MAX_CLONE_DISKS);
			if (!parse_clone_disk(v, len, &r->disks[r->ndisks]))
				return PERR("clone: DISK must be SERIAL:/TARGET:ro|rw");
			r->ndisks++;
			break;
		default:
			break;
		}
	}
	if (rc < 0)
		return PERR("clone: malformed TLV");
	if (r->nentropy == 0)
		return PERR("clone: ENTROPY is required");
	return 0;
}

/*
 * QUERY (revision 1.3): the last AK_EXIT_MEMORY commands that ended, by channel, so that a
 * host which lost an EXIT (it died before reading or recording it) can ask again. A fixed
 * ring, no allocation; only the agent's own reaping writes it (a peer's frames only read it,
 * or clear a channel by starting a command on it). AK_EXIT_MEMORY = MAX_PROCS: every
 * command that can end while no host is connected (none starts then) is still here when
 * the next host asks.
 */
struct exit_rec {
	uint32_t chan; /* 0 = empty slot (channel 0 never carries a command) */
	uint32_t pid;
	int32_t status; /* waitpid's */
	uint8_t timed_out;
};

struct exit_memory {
	struct exit_rec rec[AK_EXIT_MEMORY];
	uint32_t next; /* the slot written next (the oldest) */
};

static inline void exits_forget(struct exit_memory *m, uint32_t chan)
{
	for (uint32_t i = 0; i < AK_EXIT_MEMORY; i++)
		if (m->rec[i].chan == chan)
			m->rec[i].chan = 0;
}

/* At most one record per channel: a channel's earlier record is dropped first. */
static inline void exits_record(struct exit_memory *m, uint32_t chan, uint32_t pid, int32_t status,
				uint8_t timed_out)
{
	if (chan == 0)
		return;
	exits_forget(m, chan);
	struct exit_rec *r = &m->rec[m->next % AK_EXIT_MEMORY];
	r->chan = chan;
	r->pid = pid;
	r->status = status;
	r->timed_out = timed_out;
	m->next = (m->next + 1) % AK_EXIT_MEMORY;
}

static inline const struct exit_rec *exits_find(const struct exit_memory *m, uint32_t chan)
{
	if (chan == 0)
		return NULL;
	for (uint32_t i = 0; i < AK_EXIT_MEMORY; i++)
		if (m->rec[i].chan == chan)
			return &m->rec[i];
	return NULL;
}

#endif

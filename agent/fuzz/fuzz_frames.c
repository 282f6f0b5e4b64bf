/* libFuzzer target: the agent's frame splitter and every TLV request parser, on hostile bytes. */
#include "proto.h"

#include <assert.h>

static void check_exec(const uint8_t *pl, size_t n)
{
	struct exec_req r;
	char err[256];
	if (parse_exec(pl, n, &r, err, sizeof(err)) != 0)
		return;
	/* A parsed request must be directly usable by execve. */
	assert(r.argc >= 1 && r.argc <= AK_MAX_ARGV && r.argv[r.argc] == NULL);
	assert(r.envc <= AK_MAX_ENV && r.envp[r.envc] == NULL);
	for (uint32_t i = 0; i < r.argc; i++)
		(void)strlen(r.argv[i]);
	for (uint32_t i = 0; i < r.envc; i++)
		assert(strchr(r.envp[i], '='));
	if (r.cwd)
		assert(strlen(r.cwd) <= AK_MAX_PATH && r.cwd[0]);
	assert(r.nrlimits <= AK_MAX_RLIMITS);
	for (uint32_t i = 0; i < r.nrlimits; i++)
		assert(r.rlimits[i].resource < 16);
	exec_req_free(&r);
}

static void check_path(const uint8_t *pl, size_t n)
{
	struct path_req q;
	char err[256];
	if (parse_path_req(pl, n, &q, err, sizeof(err)) != 0)
		return;
	size_t len = strlen(q.path);
	assert(q.has_path && len >= 1 && len <= AK_MAX_PATH && q.path[0] == '/');
	assert(q.mode <= 07777);
}

static void check_clone(const uint8_t *pl, size_t n)
{
	static struct clone_req q;
	char err[256];
	if (parse_clone(pl, n, &q, err, sizeof(err)) != 0)
		return;
	assert(q.nentropy >= AK_MIN_ENTROPY && q.nentropy <= AK_MAX_ENTROPY);
	if (q.has_hostname) {
		size_t len = strlen(q.hostname);
		assert(len >= 1 && len <= AK_MAX_HOSTNAME);
		assert(hostname_ok((const uint8_t *)q.hostname, (uint32_t)len));
	}
	assert(q.ndisks <= AK_MAX_CLONE_DISKS);
	for (uint32_t i = 0; i < q.ndisks; i++) {
		size_t sl = strlen(q.disks[i].serial), tl = strlen(q.disks[i].target);
		assert(sl >= 1 && sl <= AK_MAX_DISK_SERIAL && !strchr(q.disks[i].serial, ':'));
		assert(tl >= 1 && tl <= AK_MAX_DISK_TARGET && q.disks[i].target[0] == '/');
		assert(!strchr(q.disks[i].target, ':') && !strchr(q.disks[i].target, ','));
	}
}

/* QUERY's memory of ended commands, driven by the frames: a QUERY frame records an exit on
 * its channel, an EXEC forgets its channel; each step keeps one record per channel. */
static void check_exits(struct exit_memory *m, const struct frame_hdr *h)
{
	if (h->type == T_QUERY)
		exits_record(m, h->chan, h->len, (int32_t)h->flags, (uint8_t)h->flags);
	else if (h->type == T_EXEC)
		exits_forget(m, h->chan);
	const struct exit_rec *r = exits_find(m, h->chan);
	if (h->chan == 0 || h->type == T_EXEC)
		assert(r == NULL);
	else if (h->type == T_QUERY)
		assert(r && r->chan == h->chan && r->pid == h->len && r->status == (int32_t)h->flags);
	assert(m->next < AK_EXIT_MEMORY);
	unsigned same = 0;
	for (uint32_t i = 0; i < AK_EXIT_MEMORY; i++)
		same += h->chan != 0 && m->rec[i].chan == h->chan;
	assert(same <= 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct exit_memory exits;
	size_t off = 0;
	memset(&exits, 0, sizeof(exits));
	while (size - off >= AK_HDR) {
		struct frame_hdr h;
		hdr_decode(data + off, &h);
		if (h.len > AK_MAX_PAYLOAD || size - off - AK_HDR < h.len)
			break; /* the agent drops the link (oversize) or waits for more bytes */
		const uint8_t *pl = data + off + AK_HDR;
		check_exits(&exits, &h);
		switch (h.type) {
		case T_EXEC:
			check_exec(pl, h.len);
			break;
		case T_FILE_READ: case T_FILE_WRITE: case T_STAT: case T_LIST: case T_MKDIR: case T_REMOVE:
			check_path(pl, h.len);
			break;
		case T_CLONE:
			check_clone(pl, h.len);
			break;
		default: {
			/* Any other payload still goes through the generic TLV walker. */
			struct tlv_iter it = { pl, h.len };
			uint16_t tag;
			const uint8_t *v;
			uint32_t len;
			while (tlv_next(&it, &tag, &v, &len) == 1)
				assert(v >= pl && v + len <= pl + h.len);
			break;
		}
		}
		off += AK_HDR + h.len;
	}
	return 0;
}

/* The `agentkernel` command's native front: `run` and `exec` through a running daemon
 * without starting Python; everything else (and any doubt) execs the Python CLI.
 *
 * It handles exactly the plain command lines the Python fast path (cli/fast.py) handles
 * through the daemon, sends the same request the Python client sends, prints the same
 * messages and exits with the same code. Whatever it is unsure of -- an option it does not
 * know, --json, --memory/--pids, no daemon, a
 * value Python would reject -- it hands the unchanged argv and environment to the Python
 * CLI before it has sent any request that could run something, so a command never runs
 * twice or half. The Python CLI is `agentkernel-py` beside this binary, or
 * `$AGENTKERNEL_PYTHON -P -m agentkernel` when that variable names an interpreter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/ioctl.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#include "json.h"
#include "tables.h"

#define SUN_PATH_MAX 107 /* paths.SUN_PATH_MAX: the Python client cannot connect beyond */
#define MAX_TOKENS 65536 /* per daemon line: an `out` line has 4, `started` a few dozen */
#define READ_CHUNK 65536 /* os.read(stdin_fd, 65536) in ipc/client.py pump */
#define MAX_ENV 1024

static char **g_argv;
static int g_argc;

/* ------------------------------------------------------------ the Python CLI */

static void put_err(const char *text)
{
	size_t n = strlen(text);
	while (n) {
		ssize_t w = write(2, text, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		text += w, n -= (size_t)w;
	}
}

/* Hand this command line to the Python CLI: same arguments, same environment, untouched
 * stdin. Only ever called before a request with side effects was sent. */
static struct sigaction g_old_pipe, g_old_int;

static _Noreturn void fallback(void)
{
	sigaction(SIGPIPE, &g_old_pipe, NULL); /* the dispositions we were given, as they were */
	sigaction(SIGINT, &g_old_int, NULL);
	const char *py = getenv("AGENTKERNEL_PYTHON");
	if (py && *py) {
		/* -P: `-m` would put the current directory (a project someone else wrote) first
		 * on sys.path, and its agentkernel/ would run as us, outside any sandbox. */
		char **argv = calloc((size_t)g_argc + 4, sizeof(char *));
		if (argv) {
			argv[0] = (char *)py;
			argv[1] = "-P";
			argv[2] = "-m";
			argv[3] = "agentkernel";
			for (int i = 1; i < g_argc; i++)
				argv[i + 3] = g_argv[i];
			execvp(py, argv);
		}
		put_err("agentkernel: cannot start $AGENTKERNEL_PYTHON: ");
	} else {
		static char self[PATH_MAX];
		ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 32);
		if (n > 0) {
			self[n] = '\0';
			char *slash = strrchr(self, '/');
			if (slash) {
				strcpy(slash + 1, "agentkernel-py");
				execv(self, g_argv);
			}
		}
		put_err("agentkernel: cannot start the Python CLI (agentkernel-py beside this "
			"command): ");
	}
	put_err(strerror(errno));
	put_err("\n");
	_exit(125);
}

/* ------------------------------------------------------------ bounded buffers */

struct buf {
	char *p;
	size_t len, cap, max;
};

static int buf_room(struct buf *b, size_t more)
{
	if (b->len + more <= b->cap)
		return 0;
	if (b->len + more > b->max)
		return -1;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap < b->len + more)
		cap *= 2;
	if (cap > b->max)
		cap = b->max;
	char *p = realloc(b->p, cap);
	if (!p)
		return -1;
	b->p = p, b->cap = cap;
	return 0;
}

/* Appends; once anything failed to fit, `bad` stays set and the buffer is not used. */
static int g_bad;

static void put(struct buf *b, const char *s, size_t n)
{
	if (g_bad || buf_room(b, n) < 0) {
		g_bad = 1;
		return;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void putf(struct buf *b, const char *fmt, ...)
{
	char tmp[128];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(tmp)) {
		g_bad = 1;
		return;
	}
	put(b, tmp, (size_t)n);
}

/* ------------------------------------------------------------ JSON out (as wire.dumps) */

/* Whether s is valid UTF-8: what Python's sys.argv/os.environ give back without surrogates
 * (else the Python client fails to encode its request; it then fails as it always did). */
static int utf8_ok(const char *s)
{
	const unsigned char *u = (const unsigned char *)s;
	size_t n = strlen(s), i = 0;
	while (i < n) {
		uint32_t cp;
		size_t k = akj_utf8(u + i, n - i, &cp);
		if (k == 0)
			return 0;
		i += k;
	}
	return 1;
}

static void put_escaped(struct buf *b, unsigned char c)
{
	switch (c) {
	case '"': puts_(b, "\\\""); break;
	case '\\': puts_(b, "\\\\"); break;
	case '\n': puts_(b, "\\n"); break;
	case '\r': puts_(b, "\\r"); break;
	case '\t': puts_(b, "\\t"); break;
	case '\b': puts_(b, "\\b"); break;
	case '\f': puts_(b, "\\f"); break;
	default: putf(b, "\\u%04x", c);
	}
}

/* A JSON string of UTF-8 text (checked valid by the caller), escaped as json.dumps with
 * ensure_ascii=False does. */
static void put_str(struct buf *b, const char *s)
{
	puts_(b, "\"");
	for (const unsigned char *u = (const unsigned char *)s; *u; u++) {
		if (*u < 0x20 || *u == '"' || *u == '\\')
			put_escaped(b, *u);
		else
			put(b, (const char *)u, 1);
	}
	puts_(b, "\"");
}

/* Bytes as the latin-1 text the daemon decodes them from (`d` of stdin lines). */
static void put_latin1(struct buf *b, const unsigned char *s, size_t n)
{
	puts_(b, "\"");
	for (size_t i = 0; i < n; i++) {
		unsigned char c = s[i];
		if (c < 0x20 || c == '"' || c == '\\') {
			put_escaped(b, c);
		} else if (c < 0x80) {
			put(b, (const char *)&c, 1);
		} else {
			char two[2] = {(char)(0xC0 | (c >> 6)), (char)(0x80 | (c & 0x3F))};
			put(b, two, 2);
		}
	}
	puts_(b, "\"");
}

static void put_key(struct buf *b, int *first, const char *key)
{
	if (!*first)
		puts_(b, ",");
	*first = 0;
	put_str(b, key);
	puts_(b, ":");
}

static void put_opt_str(struct buf *b, const char *s)
{
	if (s)
		put_str(b, s);
	else
		puts_(b, "null");
}

/* Python's repr(float): the shortest digits that read back as v, in its notation. */
static void float_repr(double v, char *out, size_t cap)
{
	if (isnan(v)) {
		snprintf(out, cap, "nan");
		return;
	}
	if (isinf(v)) {
		snprintf(out, cap, v < 0 ? "-inf" : "inf");
		return;
	}
	char e[40];
	for (int p = 1; p <= 17; p++) {
		snprintf(e, sizeof(e), "%.*e", p - 1, v);
		if (strtod(e, NULL) == v)
			break;
	}
	/* e: [-]D[.DDD]e[+-]XX */
	char digits[24];
	size_t nd = 0;
	const char *q = e;
	int neg = *q == '-';
	q += neg;
	for (; *q && *q != 'e'; q++)
		if (*q != '.' && nd < sizeof(digits) - 1)
			digits[nd++] = *q;
	while (nd > 1 && digits[nd - 1] == '0')
		nd--;
	digits[nd] = '\0';
	int exp = *q == 'e' ? atoi(q + 1) : 0;
	char *o = out;
	size_t left = cap;
#define EMIT(...)                                                                    \
	do {                                                                         \
		int w_ = snprintf(o, left, __VA_ARGS__);                             \
		if (w_ < 0 || (size_t)w_ >= left)                                    \
			return;                                                      \
		o += w_, left -= (size_t)w_;                                         \
	} while (0)
	if (neg)
		EMIT("-");
	if (exp >= -4 && exp < 16) {
		if (exp < 0) {
			EMIT("0.");
			for (int z = 0; z < -exp - 1; z++)
				EMIT("0");
			EMIT("%s", digits);
		} else {
			for (int k = 0; k <= exp; k++)
				EMIT("%c", (size_t)k < nd ? digits[k] : '0');
			if ((size_t)exp + 1 < nd)
				EMIT(".%s", digits + exp + 1);
			else
				EMIT(".0");
		}
	} else {
		EMIT("%c", digits[0]);
		if (nd > 1)
			EMIT(".%s", digits + 1);
		EMIT("e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
	}
#undef EMIT
}

static void put_opt_float(struct buf *b, const double *v)
{
	if (!v) {
		puts_(b, "null");
		return;
	}
	char text[64];
	float_repr(*v, text, sizeof(text));
	puts_(b, text);
}

/* ------------------------------------------------------------ Python's str() of a value */

static void py_repr(struct buf *b, const struct akj *j, int t);

static void py_num(struct buf *b, const struct akj *j, int t)
{
	const struct akj_tok *k = &j->toks[t];
	const char *s = j->s + k->start;
	size_t n = k->end - k->start;
	if (!k->is_float) { /* int(text): the same digits, but -0 is 0 */
		if (n == 2 && s[0] == '-' && s[1] == '0')
			puts_(b, "0");
		else
			put(b, s, n);
		return;
	}
	char tmp[64], text[64];
	double v;
	if (n >= sizeof(tmp)) {
		char *big = malloc(n + 1);
		if (!big) {
			g_bad = 1;
			return;
		}
		memcpy(big, s, n);
		big[n] = '\0';
		v = strtod(big, NULL);
		free(big);
	} else {
		memcpy(tmp, s, n);
		tmp[n] = '\0';
		v = tmp[0] == 'N' ? NAN : strcmp(tmp, "Infinity") == 0 ? INFINITY
		  : strcmp(tmp, "-Infinity") == 0 ? -INFINITY : strtod(tmp, NULL);
	}
	float_repr(v, text, sizeof(text));
	puts_(b, text);
}

static void py_decoded(struct buf *b, const struct akj *j, int t, char **text, long *n)
{
	size_t cap = j->toks[t].end - j->toks[t].start + 1;
	*text = malloc(cap);
	*n = *text ? akj_decode(j, t, *text, cap, 0) : -1;
	if (*n < 0) {
		free(*text);
		*text = NULL;
		g_bad = 1;
	}
	(void)b;
}

/* str(value): strings as they are, the rest as Python prints them. */
static void py_str(struct buf *b, const struct akj *j, int t)
{
	if (t < 0) {
		puts_(b, "None"); /* data.get(key) of a missing key */
		return;
	}
	switch (j->toks[t].type) {
	case AKJ_STR: {
		char *text;
		long n;
		py_decoded(b, j, t, &text, &n);
		if (text)
			put(b, text, (size_t)n);
		free(text);
		return;
	}
	case AKJ_NUM: py_num(b, j, t); return;
	case AKJ_TRUE: puts_(b, "True"); return;
	case AKJ_FALSE: puts_(b, "False"); return;
	case AKJ_NULL: puts_(b, "None"); return;
	default: py_repr(b, j, t);
	}
}

/* repr() of containers and their strings (our daemon never sends these where we print). */
static void py_repr(struct buf *b, const struct akj *j, int t)
{
	const struct akj_tok *k = &j->toks[t];
	if (k->type == AKJ_STR) {
		char *text;
		long n;
		py_decoded(b, j, t, &text, &n);
		if (!text)
			return;
		int dq = memchr(text, '\'', (size_t)n) && !memchr(text, '"', (size_t)n);
		char quote = dq ? '"' : '\'';
		put(b, &quote, 1);
		for (long i = 0; i < n; i++) {
			unsigned char c = (unsigned char)text[i];
			if (c == '\\' || c == (unsigned char)quote)
				putf(b, "\\%c", c);
			else if (c == '\n')
				puts_(b, "\\n");
			else if (c == '\r')
				puts_(b, "\\r");
			else if (c == '\t')
				puts_(b, "\\t");
			else if (c < 0x20 || c == 0x7f)
				putf(b, "\\x%02x", c);
			else
				put(b, (const char *)&c, 1);
		}
		put(b, &quote, 1);
		free(text);
		return;
	}
	if (k->type != AKJ_OBJ && k->type != AKJ_ARR) {
		py_str(b, j, t);
		return;
	}
	int obj = k->type == AKJ_OBJ;
	puts_(b, obj ? "{" : "[");
	uint32_t i = (uint32_t)t + 1;
	for (uint32_t m = 0; m < k->size; m++) {
		if (m)
			puts_(b, ", ");
		if (obj) {
			py_repr(b, j, (int)i);
			puts_(b, ": ");
			i++;
		}
		py_repr(b, j, (int)i);
		i = j->toks[i].next;
	}
	puts_(b, obj ? "}" : "]");
}

/* Python's truth value of a JSON value (missing: false). */
static int py_truthy(const struct akj *j, int t)
{
	if (t < 0)
		return 0;
	const struct akj_tok *k = &j->toks[t];
	switch (k->type) {
	case AKJ_STR: return k->end > k->start;
	case AKJ_OBJ:
	case AKJ_ARR: return k->size > 0;
	case AKJ_TRUE: return 1;
	case AKJ_FALSE:
	case AKJ_NULL: return 0;
	default: {
		char tmp[64];
		size_t n = k->end - k->start;
		if (n >= sizeof(tmp))
			return 1;
		memcpy(tmp, j->s + k->start, n);
		tmp[n] = '\0';
		return tmp[0] == 'N' || strchr(tmp, 'I') || strtod(tmp, NULL) != 0.0;
	}
	}
}

/* ------------------------------------------------------------ messages */

/* say(f"{prefix}{value}") to stderr: "agentkernel: " and a newline around it. */
static void say_value(const char *prefix, const struct akj *j, int t)
{
	struct buf b = {0};
	b.max = 8u << 20;
	int bad = g_bad;
	g_bad = 0;
	puts_(&b, "agentkernel: ");
	puts_(&b, prefix);
	if (t >= 0)
		py_str(&b, j, t);
	else
		puts_(&b, "None");
	puts_(&b, "\n");
	if (!g_bad) {
		size_t off = 0;
		while (off < b.len) {
			ssize_t w = write(2, b.p + off, b.len - off);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0)
				break;
			off += (size_t)w;
		}
	}
	g_bad = bad;
	free(b.p);
}

static void say(const char *text)
{
	put_err("agentkernel: ");
	put_err(text);
	put_err("\n");
}

/* For each element of list `t` (missing or empty: none), say(prefix + str(element)). */
static void say_each(const char *prefix, const struct akj *j, int t)
{
	if (t < 0 || j->toks[t].type != AKJ_ARR)
		return;
	uint32_t i = (uint32_t)t + 1;
	for (uint32_t m = 0; m < j->toks[t].size; m++) {
		say_value(prefix, j, (int)i);
		i = j->toks[i].next;
	}
}

/* ------------------------------------------------------------ the command line */

struct opts {
	const char *image, *profile, *backend, *workdir, *config, *agent;
	double timeout, cpus;
	int has_timeout, has_cpus;
	int no_network, quiet, verbose, json, tty, interactive;
	const char *env[MAX_ENV];
	int nenv;
};

static int is_float_dest(const char *dest)
{
	for (int i = 0; AK_FLOAT_DESTS[i]; i++)
		if (strcmp(AK_FLOAT_DESTS[i], dest) == 0)
			return 1;
	return 0;
}

/* float(text) for the plain decimals we accept (anything else: Python decides). */
static int parse_float(const char *s, double *out)
{
	size_t n = strlen(s), digits = 0, dots = 0;
	if (n == 0 || n > 32)
		return -1;
	for (size_t i = 0; i < n; i++) {
		if (s[i] >= '0' && s[i] <= '9')
			digits++;
		else if (s[i] == '.' && !dots)
			dots++;
		else
			return -1;
	}
	if (!digits)
		return -1;
	*out = strtod(s, NULL);
	return 0;
}

static int set_dest(struct opts *o, const char *dest, const char *value)
{
	if (strcmp(dest, "env") == 0) {
		if (o->nenv >= MAX_ENV)
			return -1;
		o->env[o->nenv++] = value;
		return 0;
	}
	if (is_float_dest(dest)) {
		double v;
		if (parse_float(value, &v) < 0)
			return -1;
		if (strcmp(dest, "timeout") == 0)
			o->timeout = v, o->has_timeout = 1;
		else if (strcmp(dest, "cpus") == 0)
			o->cpus = v, o->has_cpus = 1;
		else
			return -1;
		return 0;
	}
	const char **slot = strcmp(dest, "image") == 0 ? &o->image
			  : strcmp(dest, "profile") == 0 ? &o->profile
			  : strcmp(dest, "backend") == 0 ? &o->backend
			  : strcmp(dest, "workdir") == 0 ? &o->workdir
			  : strcmp(dest, "config") == 0 ? &o->config
			  : strcmp(dest, "agent") == 0 ? &o->agent : NULL;
	if (!slot)
		return -1; /* e.g. memory, pids: their parsers live in Python */
	*slot = value;
	return 0;
}

static int set_flag(struct opts *o, const char *dest)
{
	int *slot = strcmp(dest, "no_network") == 0 ? &o->no_network
		  : strcmp(dest, "quiet") == 0 ? &o->quiet
		  : strcmp(dest, "verbose") == 0 ? &o->verbose
		  : strcmp(dest, "json") == 0 ? &o->json
		  : strcmp(dest, "tty") == 0 ? &o->tty
		  : strcmp(dest, "interactive") == 0 ? &o->interactive : NULL;
	if (!slot)
		return -1;
	*slot = 1;
	return 0;
}

/* cli/fast.py _parse: options up to the first positional; its index, or -1 if unsure. */
static int parse_opts(char **tok, int n, const struct ak_opt *table, struct opts *o)
{
	int i = 0;
	while (i < n) {
		const char *t = tok[i];
		if (strcmp(t, "--") == 0 || t[0] != '-' || strcmp(t, "-") == 0)
			return i;
		size_t klen = strlen(t);
		const char *inline_value = NULL;
		if (strncmp(t, "--", 2) == 0) {
			const char *eq = strchr(t, '=');
			if (eq)
				klen = (size_t)(eq - t), inline_value = eq + 1;
		}
		const struct ak_opt *hit = NULL;
		for (const struct ak_opt *p = table; p->name; p++)
			if (strlen(p->name) == klen && strncmp(p->name, t, klen) == 0)
				hit = p;
		if (!hit)
			return -1;
		if (!hit->value) {
			if (inline_value || set_flag(o, hit->dest) < 0)
				return -1;
			i++;
			continue;
		}
		const char *value;
		if (inline_value) {
			value = inline_value;
			i++;
		} else {
			if (i + 1 >= n)
				return -1;
			value = tok[i + 1];
			i += 2;
		}
		if (set_dest(o, hit->dest, value) < 0)
			return -1;
	}
	return i;
}

/* ------------------------------------------------------------ paths (paths.py, context.py) */

/* posixpath.join(a, b) into out. */
static int join(char *out, size_t cap, const char *a, const char *b)
{
	int n;
	if (b[0] == '/')
		n = snprintf(out, cap, "%s", b);
	else if (!a[0] || a[strlen(a) - 1] == '/')
		n = snprintf(out, cap, "%s%s", a, b);
	else
		n = snprintf(out, cap, "%s/%s", a, b);
	return n < 0 || (size_t)n >= cap ? -1 : 0;
}

/* os.path.expanduser("~") with $HOME set (unset: Python asks pwd; we let it). */
static int home_dir(char *out, size_t cap)
{
	const char *home = getenv("HOME");
	if (!home)
		return -1;
	size_t n = strlen(home);
	while (n && home[n - 1] == '/')
		n--;
	if (n == 0)
		return snprintf(out, cap, "/") < (int)cap ? 0 : -1;
	if (n >= cap)
		return -1;
	memcpy(out, home, n);
	out[n] = '\0';
	return 0;
}

/* paths.data_dir_str */
static int data_dir(char *out, size_t cap)
{
	const char *env = getenv("AGENTKERNEL_HOME");
	if (env && *env)
		return snprintf(out, cap, "%s", env) < (int)cap ? 0 : -1;
	char base[PATH_MAX], home[PATH_MAX];
	const char *xdg = getenv("XDG_DATA_HOME");
	if (xdg && *xdg) {
		if (snprintf(base, sizeof(base), "%s", xdg) >= (int)sizeof(base))
			return -1;
	} else if (home_dir(home, sizeof(home)) < 0 ||
		   join(base, sizeof(base), home, ".local/share") < 0) {
		return -1;
	}
	return join(out, cap, base, "agentkernel");
}

/* context.user_config_path: the user's config file if it exists, else "" (None). */
static int user_config(char *out, size_t cap)
{
	char xdg[PATH_MAX], dir[PATH_MAX];
	const char *env = getenv("XDG_CONFIG_HOME");
	if (env && env[0] == '/') {
		if (snprintf(xdg, sizeof(xdg), "%s", env) >= (int)sizeof(xdg))
			return -1;
	} else {
		const char *home = getenv("HOME");
		char h[PATH_MAX];
		if (home && *home) {
			if (snprintf(h, sizeof(h), "%s", home) >= (int)sizeof(h))
				return -1;
		} else if (home_dir(h, sizeof(h)) < 0) {
			return -1;
		}
		if (join(xdg, sizeof(xdg), h, ".config") < 0)
			return -1;
	}
	if (join(dir, sizeof(dir), xdg, "agentkernel") < 0)
		return -1;
	static const char *const names[] = {"config.toml", "agentkernel.toml"};
	for (int i = 0; i < 2; i++) {
		struct stat st;
		if (join(out, cap, dir, names[i]) < 0)
			return -1;
		if (stat(out, &st) == 0 && S_ISREG(st.st_mode))
			return 0;
	}
	out[0] = '\0';
	return 0;
}

/* paths.runtime_dir_str, except the planted-/tmp fallback (Python handles that case). */
static int runtime_dir(char *out, size_t cap)
{
	const char *env = getenv("AGENTKERNEL_RUNTIME_DIR");
	if (env && *env)
		return snprintf(out, cap, "%s", env) < (int)cap ? 0 : -1;
	if (geteuid() == 0 && access("/run", W_OK) == 0)
		return snprintf(out, cap, "/run/agentkernel") < (int)cap ? 0 : -1;
	const char *xdg = getenv("XDG_RUNTIME_DIR");
	if (xdg && *xdg)
		return join(out, cap, xdg, "agentkernel");
	if (snprintf(out, cap, "/tmp/agentkernel-%u", (unsigned)getuid()) >= (int)cap)
		return -1;
	struct stat st;
	if (lstat(out, &st) < 0)
		return errno == ENOENT ? 0 : -1;
	if (S_ISDIR(st.st_mode) && st.st_uid == getuid() && !(st.st_mode & 077))
		return 0;
	return -1;
}

/* posixpath.normpath */
static int normpath(char *path, size_t cap)
{
	if (!path[0])
		return snprintf(path, cap, ".") < (int)cap ? 0 : -1;
	int initial = path[0] == '/';
	if (initial && path[1] == '/' && path[2] != '/')
		initial = 2;
	char *comps[PATH_MAX / 2];
	int nc = 0;
	char *copy = strdup(path);
	if (!copy)
		return -1;
	for (char *save = NULL, *c = strtok_r(copy, "/", &save); c; c = strtok_r(NULL, "/", &save)) {
		if (strcmp(c, ".") == 0)
			continue;
		if (strcmp(c, "..") != 0 || (!initial && !nc) || (nc && strcmp(comps[nc - 1], "..") == 0)) {
			if (nc >= (int)(sizeof(comps) / sizeof(comps[0]))) {
				free(copy);
				return -1;
			}
			comps[nc++] = c;
		} else if (nc) {
			nc--;
		}
	}
	char out[PATH_MAX];
	size_t o = 0;
	for (int i = 0; i < initial; i++)
		out[o++] = '/';
	for (int i = 0; i < nc; i++) {
		size_t n = strlen(comps[i]);
		if (o + n + 2 > sizeof(out)) {
			free(copy);
			return -1;
		}
		if (i)
			out[o++] = '/';
		memcpy(out + o, comps[i], n);
		o += n;
	}
	out[o] = '\0';
	free(copy);
	if (!o)
		snprintf(out, sizeof(out), ".");
	return snprintf(path, cap, "%s", out) < (int)cap ? 0 : -1;
}

/* ------------------------------------------------------------ the terminal (run --agent) */

static struct termios g_saved_tty;
static volatile sig_atomic_t g_raw;

/* Our terminal as it was (TCSADRAIN, as cli/run.py's undo); async-signal-safe. */
static void tty_restore(void)
{
	if (g_raw) {
		g_raw = 0;
		tcsetattr(0, TCSADRAIN, &g_saved_tty);
	}
}

/* tty.setraw(0), as this install's Python does it (the masks are observed at build time). */
static int tty_raw(void)
{
#if AK_RAW_KNOWN
	struct termios mode;
	if (tcgetattr(0, &g_saved_tty) < 0)
		return -1;
	mode = g_saved_tty;
	mode.c_iflag &= ~(tcflag_t)AK_RAW_IFLAG_CLEAR;
	mode.c_oflag &= ~(tcflag_t)AK_RAW_OFLAG_CLEAR;
	mode.c_cflag &= ~(tcflag_t)AK_RAW_CFLAG_CLEAR;
	mode.c_cflag |= (tcflag_t)AK_RAW_CFLAG_SET;
	mode.c_lflag &= ~(tcflag_t)AK_RAW_LFLAG_CLEAR;
	mode.c_cc[VMIN] = AK_RAW_VMIN;
	mode.c_cc[VTIME] = AK_RAW_VTIME;
	g_raw = 1;
	if (tcsetattr(0, TCSAFLUSH, &mode) < 0)
		return -1;
	return 0;
#else
	return -1;
#endif
}

/* ipc/client.py terminal_size: (rows, cols) of stdin's terminal, else stdout's, else 24x80. */
static void terminal_size(int *rows, int *cols)
{
	struct winsize ws;
	if (ioctl(0, TIOCGWINSZ, &ws) == 0 || ioctl(1, TIOCGWINSZ, &ws) == 0) {
		*rows = ws.ws_row, *cols = ws.ws_col;
		return;
	}
	*rows = 24, *cols = 80;
}

/* Leave after a failure: the terminal restored first, then the message (as Python's
 * finally runs before its error is printed). */
static _Noreturn void die(const char *msg, int code)
{
	tty_restore();
	if (msg) {
		put_err("agentkernel: ");
		put_err(msg);
		put_err("\n");
	}
	_exit(code);
}

/* ------------------------------------------------------------ the daemon socket */

struct conn {
	int fd;
	char *buf;
	size_t start, len, cap;
};

/* A connection to the daemon's socket, or -1 (no daemon, or not one of ours: our uid,
 * a socket, and the peer at the other end runs as us). */
static int dial(const char *path)
{
	struct stat st;
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) > SUN_PATH_MAX || stat(path, &st) < 0 || !S_ISSOCK(st.st_mode) ||
	    st.st_uid != geteuid())
		return -1;
	memcpy(sa.sun_path, path, strlen(path) + 1);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	while (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		if (errno == EINTR)
			continue;
		close(fd);
		return -1;
	}
	struct ucred cred;
	socklen_t len = sizeof(cred);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || len != sizeof(cred) ||
	    cred.uid != geteuid()) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Pending forwarded signals (a bit per AK_FORWARDED_SIGNALS entry) and the self-pipe that
 * wakes poll() for them. */
static volatile sig_atomic_t g_pending;
#define WINCH_BIT (1 << 30)
static int g_wake[2] = {-1, -1};
static int g_sock = -1;

static int send_all(int fd, const char *p, size_t n);

static void flush_signals(void)
{
	while (g_pending) {
		int pending = __atomic_exchange_n(&g_pending, 0, __ATOMIC_SEQ_CST);
		if (pending & WINCH_BIT) { /* ipc/client.py winch: our terminal's size now */
			int rows, cols;
			char line[96];
			terminal_size(&rows, &cols);
			int n = snprintf(line, sizeof(line), "{\"op\":\"resize\",\"rows\":%d,"
					 "\"cols\":%d}\n", rows, cols);
			(void)send_all(g_sock, line, (size_t)n);
		}
		for (size_t i = 0; i < sizeof(AK_FORWARDED_SIGNALS) / sizeof(int); i++) {
			if (!(pending & (1 << i)))
				continue;
			char line[64];
			int n = snprintf(line, sizeof(line), "{\"op\":\"signal\",\"sig\":%d}\n",
					 AK_FORWARDED_SIGNALS[i]);
			(void)send_all(g_sock, line, (size_t)n); /* a gone daemon: as Python, ignored */
		}
	}
}

/* Write all of p to fd; EINTR retried (forwarding signals meanwhile, between lines only). */
static int send_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		p += w, n -= (size_t)w;
	}
	return 0;
}

static int write_out(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR) {
			flush_signals();
			continue;
		}
		if (w < 0 && errno == EAGAIN) { /* a non-blocking stdout: wait for room */
			struct pollfd pf = {.fd = fd, .events = POLLOUT};
			if (poll(&pf, 1, -1) < 0 && errno != EINTR)
				return -1;
			flush_signals();
			continue;
		}
		if (w <= 0)
			return -1;
		p += w, n -= (size_t)w;
	}
	return 0;
}

/* The next complete line in the connection's buffer (without its newline), else NULL;
 * *over is set when a line exceeds the daemon's own line cap. */
static char *take_line(struct conn *c, size_t *n, int *over)
{
	char *s = c->buf + c->start;
	char *nl = memchr(s, '\n', c->len);
	if (!nl) {
		*over = c->len > AK_MAX_LINE;
		return NULL;
	}
	*n = (size_t)(nl - s);
	c->start += *n + 1;
	c->len -= *n + 1;
	return s;
}

/* Read more from the daemon: >0 bytes read, 0 EOF, -1 error. */
static ssize_t fill(struct conn *c)
{
	if (c->start) {
		memmove(c->buf, c->buf + c->start, c->len);
		c->start = 0;
	}
	for (;;) {
		ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
		if (r < 0 && errno == EINTR) {
			flush_signals();
			continue;
		}
		if (r > 0)
			c->len += (size_t)r;
		return r;
	}
}

static struct akj_tok *g_toks;

/* Parse a line into j; 0 when it is a JSON object (Python's `recv`; anything else reads as
 * None there), 1 valid JSON but not an object, -1 not JSON. */
static int parse_line(struct akj *j, const char *s, size_t n)
{
	if (akj_parse(j, s, n, g_toks, MAX_TOKENS) < 0)
		return -1;
	return g_toks[0].type == AKJ_OBJ ? 0 : 1;
}

/* The next line as an object (blocking); 0 ok, 1 EOF or a non-object (Python: None). */
static int recv_obj(struct conn *c, struct akj *j)
{
	for (;;) {
		size_t n;
		int over = 0;
		char *line = take_line(c, &n, &over);
		if (line) {
			int got = parse_line(j, line, n);
			if (got < 0)
				die("the daemon sent a line that is not JSON", 125);
			return got;
		}
		if (over || c->len == c->cap)
			die("the daemon sent a line over the line length cap", 125);
		ssize_t r = fill(c);
		if (r <= 0)
			return 1;
	}
}

/* int(value) & 0xFF, what the OS keeps of Python's exit code (`dflt` if it is no number). */
static int exit_code_of(const struct akj *j, int t, int dflt)
{
	if (t < 0)
		return dflt;
	if (j->toks[t].type == AKJ_TRUE || j->toks[t].type == AKJ_FALSE)
		return j->toks[t].type == AKJ_TRUE;
	if (j->toks[t].type != AKJ_NUM)
		return dflt;
	const char *s = j->s + j->toks[t].start;
	if (!j->toks[t].is_float) { /* exact for any length: the low 8 bits of the integer */
		size_t n = j->toks[t].end - j->toks[t].start;
		int neg = s[0] == '-';
		unsigned v = 0;
		for (size_t i = (size_t)neg; i < n; i++)
			v = (v * 10 + (unsigned)(s[i] - '0')) & 0xFF;
		return (int)(neg ? (256 - v) & 0xFF : v);
	}
	double v = strtod(s, NULL);
	if (!isfinite(v))
		return dflt;
	double m = fmod(trunc(v), 256.0);
	return (int)(m < 0 ? m + 256.0 : m);
}

/* The daemon's error reply: print it as the Python CLI does and leave with its code. */
static _Noreturn void daemon_error(const struct akj *j, int reply)
{
	tty_restore();
	int err = akj_get(j, reply, "error");
	int msg = akj_get(j, err, "message");
	int exit_code = exit_code_of(j, akj_get(j, err, "exit_code"), 125);
	if (msg >= 0)
		say_value("", j, msg);
	else
		say("daemon error");
	_exit(exit_code);
}

static int is_false(const struct akj *j, int t) { return t >= 0 && j->toks[t].type == AKJ_FALSE; }

static int str_is(const struct akj *j, int t, const char *s)
{
	return t >= 0 && j->toks[t].type == AKJ_STR && akj_eq(j, t, s);
}

static void on_int_early(int sig)
{
	(void)sig;
	tty_restore();
	_exit(130); /* KeyboardInterrupt (Python's default handler): fast_main's 130 */
}

static void on_forward(int sig)
{
	int saved = errno;
	if (sig == SIGWINCH)
		__atomic_fetch_or(&g_pending, WINCH_BIT, __ATOMIC_SEQ_CST);
	for (size_t i = 0; i < sizeof(AK_FORWARDED_SIGNALS) / sizeof(int); i++)
		if (AK_FORWARDED_SIGNALS[i] == sig)
			__atomic_fetch_or(&g_pending, 1 << i, __ATOMIC_SEQ_CST);
	if (g_wake[1] >= 0)
		(void)!write(g_wake[1], "x", 1);
	errno = saved;
}

/* ------------------------------------------------------------ one streaming request */

enum kind { K_RUN, K_AGENT, K_EXEC };

struct started_ctx {
	enum kind kind;
	const struct opts *o;
	int tty; /* a terminal's run: resizes forwarded, signals not (they are keystrokes) */
	int raw; /* and our terminal made raw meanwhile */
};

/* run.py _say_plan: `-v` of a run through the daemon, the lines an in-process run prints. */
static void say_plan(const struct akj *j, int info)
{
	int pooled = py_truthy(j, akj_get(j, info, "pooled"));
	say_value(pooled ? "via daemon (warm pool): sandbox "
			 : "via daemon (cold start, the pool was empty): sandbox ",
		  j, akj_get(j, info, "sandbox"));
	struct buf b = {.max = 8u << 20};
	int bad = g_bad;
	g_bad = 0;
#define VAL(key) py_str(&b, j, akj_get(j, info, key))
	puts_(&b, "agentkernel: backend ");
	VAL("backend");
	puts_(&b, ": ");
	VAL("isolation");
	puts_(&b, "\n");
	if (!g_bad)
		(void)write_out(2, b.p, b.len);
	b.len = 0;
	say_each("", j, akj_get(j, info, "skipped"));
	puts_(&b, "agentkernel: image ");
	VAL("image");
	puts_(&b, " (");
	VAL("image_reason");
	puts_(&b, "); rootfs: ");
	VAL("rootfs");
	puts_(&b, "\nagentkernel: profile ");
	VAL("profile");
	puts_(&b, ": network=");
	VAL("network");
	puts_(&b, " workspace=");
	VAL("workspace");
	static const char *const lim[] = {"memory_mb", "pids", "cpus"};
	static const char *const pre[] = {" memory=", " pids=", " cpus="};
	for (int i = 0; i < 3; i++) {
		int t = akj_get(j, info, lim[i]);
		puts_(&b, pre[i]);
		if (py_truthy(j, t)) {
			py_str(&b, j, t);
			if (i == 0)
				puts_(&b, "MiB");
		} else {
			puts_(&b, "unlimited");
		}
	}
	puts_(&b, "\n");
#undef VAL
	if (!g_bad)
		(void)write_out(2, b.p, b.len);
	g_bad = bad;
	free(b.p);
}

static void on_started(const struct started_ctx *ctx, const struct akj *j, int info)
{
	const struct opts *o = ctx->o;
	if (ctx->kind == K_EXEC)
		return;
	if (ctx->kind == K_AGENT) {
		if (!o->quiet)
			say_each("warning: ", j, akj_get(j, info, "warnings"));
		if (!o->verbose)
			return;
		say_plan(j, info); /* which backend and isolation, as in-process -v says */
		/* agents/request.py user_line */
		int user = akj_get(j, info, "user");
		if (user >= 0 && j->toks[user].type == AKJ_ARR && j->toks[user].size == 3) {
			struct buf b = {.max = 1u << 20};
			int a = user + 1, g = (int)j->toks[a].next, h = (int)j->toks[g].next;
			puts_(&b, "agent user: uid ");
			py_str(&b, j, a);
			puts_(&b, ", gid ");
			py_str(&b, j, g);
			puts_(&b, ", HOME ");
			py_str(&b, j, h);
			puts_(&b, "");
			if (!g_bad) {
				put(&b, "", 1);
				say(b.p);
			}
			free(b.p);
		} else {
			int gv = str_is(j, akj_get(j, info, "backend"), "gvisor");
			say(gv ? "agent user: the sandbox's root, without capabilities (gVisor started "
				 "by an ordinary user, or kept: rootless runsc maps one id)"
			       : "agent user: the sandbox's root, without capabilities");
		}
		return;
	}
	if (o->quiet)
		return;
	say_each("warning: ", j, akj_get(j, info, "warnings"));
	if (o->verbose)
		say_plan(j, info);
	say_each("note: ", j, akj_get(j, info, "notes"));
}

/* What the run's result asks to print after it (run_via_daemon, agent_via_daemon,
 * sandboxes.interactive), then its exit code. */
static _Noreturn void finish(const struct started_ctx *ctx, const struct akj *j, int result)
{
	tty_restore();
	const struct opts *o = ctx->o;
	if (result >= 0 && j->toks[result].type != AKJ_OBJ)
		result = -1;
	int message = akj_get(j, result, "message");
	if (ctx->kind != K_EXEC && !o->quiet) /* a one-shot run's refusals (run.py) */
		say_each("egress: ", j, akj_get(j, result, "egress"));
	if (py_truthy(j, message) && !(ctx->kind != K_EXEC && o->quiet))
		say_value("", j, message);
	_exit(exit_code_of(j, akj_get(j, result, "exit_code"), 125));
}

static void conn_close(struct conn *c)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
}

/* Send the request line; a refusal (busy) may have been answered before we sent it. */
/* What the client says before its request is answered (run --agent's missing-key note). */
static struct buf g_deferred;

static void flush_deferred(void)
{
	if (g_deferred.len)
		(void)write_out(2, g_deferred.p, g_deferred.len);
	g_deferred.len = 0;
}

static void send_request(struct conn *c, struct akj *j, const struct buf *req)
{
	if (send_all(c->fd, req->p, req->len) == 0)
		return;
	int saved = errno;
	flush_deferred();
	if (recv_obj(c, j) == 0 && is_false(j, akj_get(j, 0, "ok")))
		daemon_error(j, 0);
	fprintf(stderr, "agentkernel: the daemon closed the connection (%s)\n", strerror(saved));
	_exit(125);
}

/* ipc/client.py pump, and what its callers do with the result. */
static _Noreturn void stream(struct conn *c, const struct buf *req, int stdin_open,
			     const struct started_ctx *ctx)
{
	struct akj j;
	if (g_old_int.sa_handler == SIG_DFL) /* (Python installs KeyboardInterrupt only then) */
		signal(SIGINT, on_int_early);
	if (ctx->tty)
		flush_deferred(); /* printed before the request, on the terminal as it is */
	send_request(c, &j, req);
	if (ctx->raw && tty_raw() < 0) /* after the request, as the Python client */
		die("cannot make the terminal raw", 125);
	int answer = recv_obj(c, &j);
	if (answer == 0 && ctx->kind != K_EXEC && is_false(&j, akj_get(&j, 0, "ok")) &&
	    str_is(&j, akj_get(&j, akj_get(&j, 0, "error"), "type"), "WrongDaemon")) {
		conn_close(c); /* a daemon of another data dir: Python runs it in-process */
		tty_restore();
		fallback();
	}
	flush_deferred();
	if (answer != 0)
		die("the daemon closed the connection", 125);
	if (is_false(&j, akj_get(&j, 0, "ok")))
		daemon_error(&j, 0);
	if (str_is(&j, akj_get(&j, 0, "ev"), "exit"))
		finish(ctx, &j, akj_get(&j, 0, "result"));
	int info = akj_get(&j, 0, "info");
	on_started(ctx, &j, info >= 0 && j.toks[info].type == AKJ_OBJ ? info : -1);

	/* Forward signals from now on (on a terminal: its size changes), as the Python client
	 * installs its handlers here. */
	if (pipe2(g_wake, O_CLOEXEC | O_NONBLOCK) < 0)
		die("no pipe for signal forwarding", 125);
	g_sock = c->fd;
	struct sigaction sa = {.sa_handler = on_forward};
	sigemptyset(&sa.sa_mask);
	if (ctx->tty) {
		sigaction(SIGWINCH, &sa, NULL);
	} else {
		for (size_t i = 0; i < sizeof(AK_FORWARDED_SIGNALS) / sizeof(int); i++)
			sigaction(AK_FORWARDED_SIGNALS[i], &sa, NULL);
	}

	static char inbuf[READ_CHUNK];
	char *out = malloc(AK_MAX_LINE + 1);
	struct buf line = {.max = 6 * READ_CHUNK + 64};
	if (!out)
		die("out of memory", 125);
	int watch_stdin = stdin_open;
	for (;;) {
		flush_signals();
		size_t n;
		int over = 0;
		char *text = take_line(c, &n, &over);
		if (text) {
			int got = parse_line(&j, text, n);
			if (got < 0)
				die("the daemon sent a line that is not JSON", 125);
			if (got > 0)
				die("the daemon closed the connection mid-command", 125);
			int ev = akj_get(&j, 0, "ev");
			if (str_is(&j, ev, "out")) {
				int d = akj_get(&j, 0, "d"), s = akj_get(&j, 0, "s");
				long len = 0;
				if (d >= 0 && j.toks[d].type == AKJ_STR)
					len = akj_decode(&j, d, out, AK_MAX_LINE, 1);
				if (len < 0)
					die("the daemon sent output that is not latin-1 text", 125);
				int fd = 2;
				if (s >= 0 && (j.toks[s].type == AKJ_TRUE ||
					       (j.toks[s].type == AKJ_NUM &&
						strtod(j.s + j.toks[s].start, NULL) == 1.0)))
					fd = 1;
				if (write_out(fd, out, (size_t)len) < 0)
					die("writing the command's output failed", 1);
			} else if (str_is(&j, ev, "exit")) {
				finish(ctx, &j, akj_get(&j, 0, "result"));
			} else if (is_false(&j, akj_get(&j, 0, "ok"))) {
				daemon_error(&j, 0);
			}
			continue;
		}
		if (over || c->len == c->cap)
			die("the daemon sent a line over the line length cap", 125);
		struct pollfd pf[3] = {{.fd = c->fd, .events = POLLIN},
				       {.fd = g_wake[0], .events = POLLIN},
				       {.fd = watch_stdin ? 0 : -1, .events = POLLIN}};
		if (poll(pf, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll failed", 125);
		}
		if (pf[1].revents) {
			char drain[64];
			while (read(g_wake[0], drain, sizeof(drain)) > 0) {
			}
		}
		if (watch_stdin && pf[2].revents) {
			ssize_t r;
			do {
				r = read(0, inbuf, sizeof(inbuf));
				if (r < 0 && errno == EINTR)
					flush_signals();
			} while (r < 0 && errno == EINTR);
			line.len = 0;
			if (r > 0) {
				puts_(&line, "{\"op\":\"stdin\",\"d\":");
				put_latin1(&line, (const unsigned char *)inbuf, (size_t)r);
				puts_(&line, "}\n");
			} else {
				puts_(&line, "{\"op\":\"eof\"}\n");
			}
			if (g_bad || send_all(c->fd, line.p, line.len) < 0)
				r = 0; /* the command ended and the daemon hung up: read its end */
			if (r <= 0)
				watch_stdin = 0;
		}
		if (pf[0].revents && fill(c) <= 0)
			die("the daemon closed the connection mid-command", 125);
	}
}

/* ------------------------------------------------------------ requests */

struct common {
	char cwd[PATH_MAX];
	char data_dir[PATH_MAX];
	char user_config[PATH_MAX];
	char config_path[PATH_MAX];
	char socket[PATH_MAX];
	int stdin_valid;
};

/* `-e KEY=VALUE` and `-e KEY` (the host's value) in order; -1 when Python must say why. */
static int put_env_pairs(struct buf *b, int *first, const struct opts *o)
{
	for (int i = 0; i < o->nenv; i++) {
		const char *pair = o->env[i], *eq = strchr(pair, '=');
		char key[4096];
		const char *value;
		if (eq) {
			size_t n = (size_t)(eq - pair);
			if (n >= sizeof(key))
				return -1;
			memcpy(key, pair, n);
			key[n] = '\0';
			value = eq + 1;
		} else {
			if (strlen(pair) >= sizeof(key))
				return -1;
			strcpy(key, pair);
			value = getenv(key);
			if (!value || !utf8_ok(value))
				return -1;
		}
		put_key(b, first, key);
		put_str(b, value);
	}
	return 0;
}

/* Whether one of the `-e` pairs sets `key`. */
static int env_has(const struct opts *o, const char *key)
{
	size_t n = strlen(key);
	for (int i = 0; i < o->nenv; i++)
		if (strncmp(o->env[i], key, n) == 0 && (o->env[i][n] == '=' || !o->env[i][n]))
			return 1;
	return 0;
}

static void put_caller(struct buf *b, int *first, const struct common *cm)
{
	put_key(b, first, "caller_env");
	puts_(b, "{");
	int f = 1;
	for (int i = 0; AK_CONTEXT_ENV_KEYS[i]; i++) {
		const char *v = getenv(AK_CONTEXT_ENV_KEYS[i]);
		if (!v)
			continue;
		if (!utf8_ok(v))
			g_bad = 1;
		put_key(b, &f, AK_CONTEXT_ENV_KEYS[i]);
		put_str(b, v);
	}
	puts_(b, "}");
	put_key(b, first, "user_config");
	put_opt_str(b, cm->user_config[0] ? cm->user_config : NULL);
}

/* What every run needs from here; -1 when Python must decide. */
static int prepare(const struct opts *o, struct common *cm, int need_caller)
{
	cm->stdin_valid = fcntl(0, F_GETFD) >= 0;
	char rt[PATH_MAX];
	if (runtime_dir(rt, sizeof(rt)) < 0 || join(cm->socket, sizeof(cm->socket), rt,
						    "daemon.sock") < 0 || !utf8_ok(cm->socket))
		return -1;
	struct stat st;
	if (stat(cm->socket, &st) < 0)
		return -1; /* no daemon: Python runs it in-process (and may start one) */
	if (data_dir(cm->data_dir, sizeof(cm->data_dir)) < 0 || !utf8_ok(cm->data_dir))
		return -1; /* every request says it: a daemon of another data dir refuses */
	if (!need_caller)
		return 0;
	if (!getcwd(cm->cwd, sizeof(cm->cwd)) || !utf8_ok(cm->cwd))
		return -1;
	if (user_config(cm->user_config, sizeof(cm->user_config)) < 0 ||
	    !utf8_ok(cm->user_config))
		return -1;
	cm->config_path[0] = '\0';
	if (o->config && o->config[0]) {
		if (join(cm->config_path, sizeof(cm->config_path), cm->cwd, o->config) < 0 ||
		    normpath(cm->config_path, sizeof(cm->config_path)) < 0 ||
		    !utf8_ok(cm->config_path))
			return -1;
	}
	return 0;
}

static int args_utf8(char **argv, int n)
{
	for (int i = 0; i < n; i++)
		if (!utf8_ok(argv[i]))
			return 0;
	return 1;
}

static void put_argv(struct buf *b, char **argv, int n)
{
	puts_(b, "[");
	for (int i = 0; i < n; i++) {
		if (i)
			puts_(b, ",");
		put_str(b, argv[i]);
	}
	puts_(b, "]");
}

static void put_common_opts(struct buf *b, int *first, const struct opts *o)
{
	put_key(b, first, "image");
	put_opt_str(b, o->image);
	put_key(b, first, "profile");
	put_opt_str(b, o->profile);
	put_key(b, first, "backend");
	put_opt_str(b, o->backend);
}

static void new_conn(struct conn *c, int fd)
{
	c->fd = fd;
	c->start = c->len = 0;
	c->cap = AK_MAX_LINE + READ_CHUNK;
	c->buf = malloc(c->cap);
	if (!c->buf)
		fallback();
}

/* The whole request in `req`: sent on a connection of its own and streamed to its end.
 * Until it goes, any doubt is Python's: text Python could not send either (g_bad: too
 * long for one line, not UTF-8), or no daemon (Python starts one for `exec`). */
static _Noreturn void send_and_stream(const char *socket, const struct buf *req,
				      int stdin_open, const struct started_ctx *ctx)
{
	if (g_bad)
		fallback();
	int fd = dial(socket);
	if (fd < 0)
		fallback();
	struct conn c;
	new_conn(&c, fd);
	stream(&c, req, stdin_open, ctx);
}

/* The request's "tty" field: our terminal's size when the command gets a PTY, else null. */
static void put_tty(struct buf *b, int *first, int tty)
{
	put_key(b, first, "tty");
	if (tty) {
		int rows, cols;
		terminal_size(&rows, &cols);
		putf(b, "[%d,%d]", rows, cols);
	} else {
		puts_(b, "null");
	}
}

/* cli/run.py run_via_daemon */
static _Noreturn void do_run(const struct opts *o, char **cmd, int ncmd)
{
	struct common cm;
	if (prepare(o, &cm, 1) < 0 || !args_utf8(cmd, ncmd))
		fallback();
	int stdin_open = cm.stdin_valid && !isatty(0);
	struct buf b = {.max = AK_MAX_LINE};
	int first = 1;
	puts_(&b, "{\"op\":\"run\",\"args\":{");
	put_key(&b, &first, "argv");
	put_argv(&b, cmd, ncmd);
	put_common_opts(&b, &first, o);
	put_key(&b, &first, "env");
	puts_(&b, "{");
	int f = 1;
	if (put_env_pairs(&b, &f, o) < 0)
		fallback();
	puts_(&b, "}");
	put_key(&b, &first, "workdir");
	put_opt_str(&b, o->workdir);
	put_key(&b, &first, "timeout");
	put_opt_float(&b, o->has_timeout ? &o->timeout : NULL);
	put_key(&b, &first, "cwd");
	put_str(&b, cm.cwd);
	put_key(&b, &first, "no_network");
	puts_(&b, o->no_network ? "true" : "false");
	put_key(&b, &first, "memory_mb");
	puts_(&b, "null");
	put_key(&b, &first, "pids");
	puts_(&b, "null");
	put_key(&b, &first, "cpus");
	put_opt_float(&b, o->has_cpus ? &o->cpus : NULL);
	put_key(&b, &first, "config_path");
	put_opt_str(&b, cm.config_path[0] ? cm.config_path : NULL);
	put_caller(&b, &first, &cm);
	put_key(&b, &first, "stdin_open");
	puts_(&b, stdin_open ? "true" : "false");
	put_key(&b, &first, "data_dir");
	put_str(&b, cm.data_dir);
	puts_(&b, "},\"data_dir\":");
	put_str(&b, cm.data_dir);
	puts_(&b, "}\n");
	struct started_ctx ctx = {K_RUN, o, 0, 0};
	send_and_stream(cm.socket, &b, stdin_open, &ctx);
}

/* cli/run.py agent_key_of: the first of `names` set here (its value in *value, NULL: none),
 * or -1 (an error: Python's). */
static int agent_key_of(const char *const *names, const char **value)
{
	*value = NULL;
	for (int k = 0; names[k]; k++) {
		const char *v = getenv(names[k]);
		if (!v)
			continue;
		/* str.strip(): only ASCII here (anything else, Python's own rules decide) */
		size_t len = strlen(v);
		for (size_t q = 0; q < len; q++)
			if ((unsigned char)v[q] >= 0x80)
				return -1;
		size_t a = 0, z = len;
		while (a < z && (strchr(" \t\n\r\v\f\x1c\x1d\x1e\x1f", v[a])))
			a++;
		while (z > a && (strchr(" \t\n\r\v\f\x1c\x1d\x1e\x1f", v[z - 1])))
			z--;
		if (a == z)
			continue;
		if (z - a > 64 * 1024 || memchr(v + a, '\r', z - a) || memchr(v + a, '\n', z - a))
			return -1;
		char *copy = strndup(v + a, z - a);
		if (!copy)
			return -1;
		*value = copy;
		return k;
	}
	return 0;
}

/* The registry row's key variables (the build's table, generated from registry.toml);
 * NULL for an agent it does not name (Python says what is wrong). */
static const char *const *agent_keys(const char *agent)
{
	for (int i = 0; AK_AGENT_KEYS[i].id; i++)
		if (strcmp(AK_AGENT_KEYS[i].id, agent) == 0)
			return AK_AGENT_KEYS[i].keys;
	return NULL;
}

/* No key variable set here: ask the daemon whether a stored secret covers the agent, and
 * keep the note Python prints when none does, for when the daemon took the run (as
 * cli/fast.py _agent: no side effect; any trouble, Python). */
static void missing_key_check(const struct opts *o, const struct common *cm)
{
	int fd = dial(cm->socket);
	if (fd < 0)
		fallback();
	struct conn c;
	new_conn(&c, fd);
	struct buf ask = {.max = AK_MAX_LINE};
	puts_(&ask, "{\"op\":\"agent_keys\",\"args\":{\"agent\":");
	put_str(&ask, o->agent);
	puts_(&ask, "},\"data_dir\":");
	put_str(&ask, cm->data_dir);
	puts_(&ask, "}\n");
	struct akj j;
	if (g_bad || send_all(c.fd, ask.p, ask.len) < 0 || recv_obj(&c, &j) != 0)
		fallback();
	int ok = akj_get(&j, 0, "ok");
	int data = akj_get(&j, 0, "data");
	if (ok < 0 || j.toks[ok].type != AKJ_TRUE || data < 0 || j.toks[data].type != AKJ_OBJ)
		fallback();
	conn_close(&c);
	if (!py_truthy(&j, akj_get(&j, data, "stored")) && !o->quiet) {
		/* printed once the daemon took the run (WrongDaemon: Python prints its own) */
		g_deferred.max = 1u << 20;
		puts_(&g_deferred, "agentkernel: warning: ");
		py_str(&g_deferred, &j, akj_get(&j, data, "missing"));
		puts_(&g_deferred, "\n");
		if (g_bad)
			fallback();
	}
}

/* cli/fast.py _agent and cli/run.py agent_via_daemon (no terminal: Python does those). */
static _Noreturn void do_agent(const struct opts *o, char **cmd, int ncmd)
{
	struct common cm;
	if (fcntl(0, F_GETFD) < 0 || fcntl(1, F_GETFD) < 0)
		fallback();
	int tty = isatty(0) && isatty(1); /* agents.interactive(): the agent gets a PTY */
	if (tty && !AK_RAW_KNOWN)
		fallback();
	if (prepare(o, &cm, 1) < 0 || !args_utf8(cmd, ncmd) || !utf8_ok(o->agent))
		fallback();
	struct buf envs = {.max = AK_MAX_LINE};
	int f = 1;
	for (int i = 0; AK_TERMINAL_ENV[i]; i++) {
		const char *v = getenv(AK_TERMINAL_ENV[i]);
		if (v && *v) {
			if (!utf8_ok(v))
				fallback();
			put_key(&envs, &f, AK_TERMINAL_ENV[i]);
			put_str(&envs, v);
		}
	}
	if (put_env_pairs(&envs, &f, o) < 0 || g_bad)
		fallback();

	/* The key: the first of the row's variables set here (the table, no round trip to
	 * the daemon); only without one does the daemon say whether a stored secret covers it. */
	const char *const *names = agent_keys(o->agent);
	const char *key_value;
	int key = names ? agent_key_of(names, &key_value) : -1;
	if (key < 0)
		fallback();
	if (!key_value)
		missing_key_check(o, &cm);
	struct buf b = {.max = AK_MAX_LINE};
	int first = 1;
	puts_(&b, "{\"op\":\"run\",\"args\":{");
	put_key(&b, &first, "argv");
	put_argv(&b, cmd, ncmd);
	put_key(&b, &first, "agent");
	put_str(&b, o->agent);
	put_key(&b, &first, "agent_key");
	put_opt_str(&b, key_value ? names[key] : NULL);
	put_key(&b, &first, "agent_key_value");
	put_opt_str(&b, key_value);
	put_common_opts(&b, &first, o);
	put_key(&b, &first, "workdir");
	put_opt_str(&b, o->workdir);
	put_key(&b, &first, "no_network");
	puts_(&b, o->no_network ? "true" : "false");
	put_key(&b, &first, "env");
	puts_(&b, "{");
	put(&b, envs.p ? envs.p : "", envs.len);
	puts_(&b, "}");
	put_key(&b, &first, "timeout");
	put_opt_float(&b, o->has_timeout ? &o->timeout : NULL);
	put_key(&b, &first, "cwd");
	put_str(&b, cm.cwd);
	put_key(&b, &first, "workspace_at");
	put_str(&b, cm.cwd);
	put_key(&b, &first, "agent_settings");
	puts_(&b, "false");
	put_key(&b, &first, "memory_mb");
	puts_(&b, "null");
	put_key(&b, &first, "pids");
	puts_(&b, "null");
	put_key(&b, &first, "cpus");
	put_opt_float(&b, o->has_cpus ? &o->cpus : NULL);
	put_key(&b, &first, "config_path");
	put_opt_str(&b, cm.config_path[0] ? cm.config_path : NULL);
	static const char *const lists[] = {"allow_hosts", "deny_hosts", "add_hosts", "secrets"};
	for (int i = 0; i < 4; i++) {
		put_key(&b, &first, lists[i]);
		puts_(&b, "[]");
	}
	put_caller(&b, &first, &cm);
	put_key(&b, &first, "data_dir");
	put_str(&b, cm.data_dir);
	int stdin_open = tty || !isatty(0);
	put_key(&b, &first, "stdin_open");
	puts_(&b, stdin_open ? "true" : "false");
	put_tty(&b, &first, tty);
	puts_(&b, "},\"data_dir\":");
	put_str(&b, cm.data_dir);
	puts_(&b, "}\n");
	struct started_ctx ctx = {K_AGENT, o, tty, tty};
	send_and_stream(cm.socket, &b, stdin_open, &ctx);
}

/* names.py _is_name: alphanumeric runs joined by single '-' or '_'. */
static int is_name(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n > AK_MAX_NAME_LEN)
		return 0;
	int previous_sep = 1;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
			previous_sep = 0;
		else if ((c == '-' || c == '_') && !previous_sep)
			previous_sep = 1;
		else
			return 0;
	}
	return !previous_sep;
}

/* cli/sandboxes.py cmd_exec (no terminal: -t goes to Python). */
static _Noreturn void do_exec(const struct opts *o, const char *name, char **cmd, int ncmd)
{
	if (!is_name(name) || (o->tty && !AK_RAW_KNOWN))
		fallback();
	if (ncmd && strcmp(cmd[0], "--") == 0) {
		cmd++, ncmd--;
	} else {
		for (int i = 0; i < ncmd; i++)
			if (strcmp(cmd[i], "--") == 0)
				fallback(); /* options after NAME (_late_options): Python's parser */
	}
	if (!ncmd || (o->has_timeout && o->timeout <= 0) || !args_utf8(cmd, ncmd))
		fallback();
	struct common cm;
	if (prepare(o, &cm, 0) < 0)
		fallback();
	struct buf b = {.max = AK_MAX_LINE};
	int first = 1;
	puts_(&b, "{\"op\":\"exec\",\"args\":{");
	put_key(&b, &first, "name");
	put_str(&b, name);
	put_key(&b, &first, "argv");
	put_argv(&b, cmd, ncmd);
	put_key(&b, &first, "env");
	puts_(&b, "{");
	int f = 1;
	if (put_env_pairs(&b, &f, o) < 0)
		fallback();
	const char *term = getenv("TERM");
	if (o->tty && term && !env_has(o, "TERM")) { /* env.setdefault("TERM", $TERM) */
		if (!utf8_ok(term))
			fallback();
		put_key(&b, &f, "TERM");
		put_str(&b, term);
	}
	puts_(&b, "}");
	put_key(&b, &first, "workdir");
	put_opt_str(&b, o->workdir);
	put_key(&b, &first, "timeout");
	put_opt_float(&b, o->has_timeout ? &o->timeout : NULL);
	put_key(&b, &first, "stdin_open");
	puts_(&b, o->interactive ? "true" : "false");
	put_tty(&b, &first, o->tty);
	puts_(&b, "},\"data_dir\":"); /* ipc/client.py _send_request: another's daemon refuses */
	put_str(&b, cm.data_dir);
	puts_(&b, "}\n");
	struct started_ctx ctx = {K_EXEC, o, o->tty, o->tty && isatty(0)};
	send_and_stream(cm.socket, &b, o->interactive, &ctx);
}

static int is_yes(const char *v)
{
	if (!v)
		return 0;
	char low[8];
	size_t n = strlen(v);
	if (n >= sizeof(low))
		return 0;
	for (size_t i = 0; i <= n; i++)
		low[i] = (char)((v[i] >= 'A' && v[i] <= 'Z') ? v[i] - 'A' + 'a' : v[i]);
	for (int i = 0; AK_YES[i]; i++)
		if (strcmp(low, AK_YES[i]) == 0)
			return 1;
	return 0;
}

int main(int argc, char **argv)
{
	g_argc = argc, g_argv = argv;
	if (argc < 2 || is_yes(getenv("AGENTKERNEL_NO_DAEMON")))
		fallback();
	for (int i = 1; i < argc; i++) /* Python's surrogates could not be sent: its own error */
		if (!utf8_ok(argv[i]))
			fallback();
	int is_run = strcmp(argv[1], "run") == 0;
	if (!is_run && strcmp(argv[1], "exec") != 0)
		fallback();
	sigaction(SIGINT, NULL, &g_old_int);
	struct sigaction ign = {.sa_handler = SIG_IGN};
	sigaction(SIGPIPE, &ign, &g_old_pipe); /* as Python: a closed pipe is an error */
	g_toks = malloc(sizeof(struct akj_tok) * MAX_TOKENS);
	if (!g_toks)
		fallback();
	static struct opts o;
	char **rest = argv + 2;
	int nrest = argc - 2;
	int at = parse_opts(rest, nrest, is_run ? AK_RUN_OPTS : AK_EXEC_OPTS, &o);
	if (at < 0)
		fallback();
	if (!is_run) {
		if (at >= nrest || strcmp(rest[at], "--") == 0)
			fallback();
		do_exec(&o, rest[at], rest + at + 1, nrest - at - 1);
	}
	char **cmd = rest + at;
	int ncmd = nrest - at;
	if (ncmd && strcmp(cmd[0], "--") == 0)
		cmd++, ncmd--;
	if (o.json)
		fallback();
	if (o.agent)
		do_agent(&o, cmd, ncmd);
	if (!ncmd || (o.has_timeout && o.timeout <= 0))
		fallback();
	do_run(&o, cmd, ncmd);
}

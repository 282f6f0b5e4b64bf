/* A strict, bounded JSON reader for the daemon's answer lines (the native CLI's only parser
 * of bytes it did not make). Header-only so that the libFuzzer target includes the same code.
 *
 * One line is parsed into a caller-supplied token array (no allocation): a token count cap,
 * a nesting depth cap and exact grammar checks (UTF-8, escapes, numbers as RFC 8259 plus
 * Python's NaN/Infinity) make every input either a complete token tree or an error.
 * Strings are decoded only on demand, into a caller buffer that is never overrun: a decoded
 * string is never longer than its raw text.
 */
#ifndef AK_JSON_H
#define AK_JSON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { AKJ_OBJ = 1, AKJ_ARR, AKJ_STR, AKJ_NUM, AKJ_TRUE, AKJ_FALSE, AKJ_NULL };

#define AKJ_MAX_DEPTH 64

struct akj_tok {
	uint8_t type;
	uint8_t is_float; /* a number with a fraction, an exponent, NaN or Infinity */
	uint8_t escaped;  /* a string with a backslash in it */
	uint32_t start;   /* raw text: strings without their quotes */
	uint32_t end;
	uint32_t size; /* members of an object, elements of an array */
	uint32_t next; /* the index of the token after this one's subtree */
};

struct akj {
	const char *s;
	size_t len, pos;
	struct akj_tok *toks;
	size_t cap, n;
};

static int akj_value(struct akj *j, unsigned depth);

static void akj_ws(struct akj *j)
{
	while (j->pos < j->len) {
		char c = j->s[j->pos];
		if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
			break;
		j->pos++;
	}
}

static int akj_new(struct akj *j, uint8_t type)
{
	if (j->n >= j->cap)
		return -1;
	struct akj_tok *t = &j->toks[j->n];
	memset(t, 0, sizeof(*t));
	t->type = type;
	t->start = (uint32_t)j->pos;
	return (int)j->n++;
}

static int akj_hex(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* The length of the UTF-8 sequence at s (at most n bytes) and its code point; 0 if invalid. */
static size_t akj_utf8(const unsigned char *s, size_t n, uint32_t *cp)
{
	if (n == 0)
		return 0;
	unsigned char c = s[0];
	if (c < 0x80) {
		*cp = c;
		return 1;
	}
	size_t len;
	uint32_t v, min;
	if (c >= 0xC2 && c <= 0xDF) {
		len = 2, v = c & 0x1F, min = 0x80;
	} else if (c >= 0xE0 && c <= 0xEF) {
		len = 3, v = c & 0x0F, min = 0x800;
	} else if (c >= 0xF0 && c <= 0xF4) {
		len = 4, v = c & 0x07, min = 0x10000;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xC0) != 0x80)
			return 0;
		v = (v << 6) | (s[i] & 0x3F);
	}
	if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
		return 0;
	*cp = v;
	return len;
}

static int akj_string(struct akj *j)
{
	j->pos++; /* the opening quote */
	int t = akj_new(j, AKJ_STR);
	if (t < 0)
		return -1;
	const unsigned char *u = (const unsigned char *)j->s;
	while (j->pos < j->len) {
		unsigned char c = u[j->pos];
		if (c == '"') {
			j->toks[t].end = (uint32_t)j->pos;
			j->toks[t].next = (uint32_t)j->n;
			j->pos++;
			return t;
		}
		if (c < 0x20)
			return -1; /* strict: no raw control characters */
		if (c == '\\') {
			j->toks[t].escaped = 1;
			if (j->pos + 1 >= j->len)
				return -1;
			char e = j->s[j->pos + 1];
			if (e == 'u') {
				if (j->pos + 6 > j->len)
					return -1;
				for (size_t k = 2; k < 6; k++)
					if (akj_hex(j->s[j->pos + k]) < 0)
						return -1;
				j->pos += 6;
			} else if (strchr("\"\\/bfnrt", e) && e != '\0') {
				j->pos += 2;
			} else {
				return -1;
			}
			continue;
		}
		uint32_t cp;
		size_t n = akj_utf8(u + j->pos, j->len - j->pos, &cp);
		if (n == 0)
			return -1;
		j->pos += n;
	}
	return -1;
}

static int akj_digits(struct akj *j)
{
	size_t from = j->pos;
	while (j->pos < j->len && j->s[j->pos] >= '0' && j->s[j->pos] <= '9')
		j->pos++;
	return j->pos > from ? 0 : -1;
}

static int akj_word(struct akj *j, const char *w)
{
	size_t n = strlen(w);
	if (j->len - j->pos < n || memcmp(j->s + j->pos, w, n) != 0)
		return -1;
	j->pos += n;
	return 0;
}

static int akj_number(struct akj *j)
{
	int t = akj_new(j, AKJ_NUM);
	if (t < 0)
		return -1;
	if (j->s[j->pos] == '-')
		j->pos++;
	if (j->pos < j->len && j->s[j->pos] == 'I') { /* Python's -Infinity, Infinity */
		if (akj_word(j, "Infinity") < 0)
			return -1;
		j->toks[t].is_float = 1;
		j->toks[t].end = (uint32_t)j->pos;
		j->toks[t].next = (uint32_t)j->n;
		return t;
	}
	if (j->pos < j->len && j->s[j->pos] == '0')
		j->pos++;
	else if (akj_digits(j) < 0)
		return -1;
	if (j->pos < j->len && j->s[j->pos] == '.') {
		j->pos++;
		j->toks[t].is_float = 1;
		if (akj_digits(j) < 0)
			return -1;
	}
	if (j->pos < j->len && (j->s[j->pos] == 'e' || j->s[j->pos] == 'E')) {
		j->pos++;
		j->toks[t].is_float = 1;
		if (j->pos < j->len && (j->s[j->pos] == '+' || j->s[j->pos] == '-'))
			j->pos++;
		if (akj_digits(j) < 0)
			return -1;
	}
	j->toks[t].end = (uint32_t)j->pos;
	j->toks[t].next = (uint32_t)j->n;
	return t;
}

static int akj_container(struct akj *j, unsigned depth, int object)
{
	int t = akj_new(j, object ? AKJ_OBJ : AKJ_ARR);
	if (t < 0)
		return -1;
	j->pos++;
	akj_ws(j);
	char close = object ? '}' : ']';
	if (j->pos < j->len && j->s[j->pos] == close) {
		j->pos++;
	} else {
		for (;;) {
			akj_ws(j);
			if (object) {
				if (j->pos >= j->len || j->s[j->pos] != '"' || akj_string(j) < 0)
					return -1;
				akj_ws(j);
				if (j->pos >= j->len || j->s[j->pos] != ':')
					return -1;
				j->pos++;
			}
			if (akj_value(j, depth + 1) < 0)
				return -1;
			j->toks[t].size++;
			akj_ws(j);
			if (j->pos >= j->len)
				return -1;
			if (j->s[j->pos] == ',') {
				j->pos++;
				continue;
			}
			if (j->s[j->pos] != close)
				return -1;
			j->pos++;
			break;
		}
	}
	j->toks[t].end = (uint32_t)j->pos;
	j->toks[t].next = (uint32_t)j->n;
	return t;
}

static int akj_value(struct akj *j, unsigned depth)
{
	if (depth > AKJ_MAX_DEPTH)
		return -1;
	akj_ws(j);
	if (j->pos >= j->len)
		return -1;
	char c = j->s[j->pos];
	int t;
	switch (c) {
	case '{':
		return akj_container(j, depth, 1);
	case '[':
		return akj_container(j, depth, 0);
	case '"':
		return akj_string(j);
	case 't':
	case 'f':
	case 'n':
		t = akj_new(j, c == 't' ? AKJ_TRUE : c == 'f' ? AKJ_FALSE : AKJ_NULL);
		if (t < 0 || akj_word(j, c == 't' ? "true" : c == 'f' ? "false" : "null") < 0)
			return -1;
		j->toks[t].end = (uint32_t)j->pos;
		j->toks[t].next = (uint32_t)j->n;
		return t;
	case 'N':
		t = akj_new(j, AKJ_NUM);
		if (t < 0 || akj_word(j, "NaN") < 0)
			return -1;
		j->toks[t].is_float = 1;
		j->toks[t].end = (uint32_t)j->pos;
		j->toks[t].next = (uint32_t)j->n;
		return t;
	default:
		if (c == '-' || (c >= '0' && c <= '9') || c == 'I')
			return akj_number(j);
		return -1;
	}
}

/* Parse s[0..len) as one JSON value (whitespace around it allowed); 0, or -1 if it is not
 * exactly that or needs more than `cap` tokens. The root is token 0. */
static int akj_parse(struct akj *j, const char *s, size_t len, struct akj_tok *toks, size_t cap)
{
	j->s = s;
	j->len = len > UINT32_MAX - 1 ? 0 : len;
	j->pos = 0;
	j->toks = toks;
	j->cap = cap;
	j->n = 0;
	if (j->len == 0 || akj_value(j, 0) < 0)
		return -1;
	akj_ws(j);
	return j->pos == j->len ? 0 : -1;
}

/* Decode string token t: as UTF-8 (latin1 == 0; a lone surrogate escape becomes the text
 * `\udXXX`, as Python's backslashreplace would print it), or as bytes from code points
 * below 256 (latin1 == 1: the daemon's byte strings). Returns the length, or -1 if the
 * string does not fit `cap` (never when cap >= its raw length + 1) or is not latin-1. */
static long akj_decode(const struct akj *j, int t, char *out, size_t cap, int latin1)
{
	const struct akj_tok *k = &j->toks[t];
	const unsigned char *s = (const unsigned char *)j->s;
	size_t i = k->start, o = 0;
	while (i < k->end) {
		uint32_t cp;
		if (s[i] == '\\') {
			unsigned char e = s[i + 1];
			if (e == 'u') {
				cp = 0;
				for (size_t q = 2; q < 6; q++)
					cp = (cp << 4) | (uint32_t)akj_hex((char)s[i + q]);
				i += 6;
				if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 <= k->end && s[i] == '\\' &&
				    s[i + 1] == 'u') {
					uint32_t lo = 0;
					for (size_t q = 2; q < 6; q++)
						lo = (lo << 4) | (uint32_t)akj_hex((char)s[i + q]);
					if (lo >= 0xDC00 && lo <= 0xDFFF) {
						cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
						i += 6;
					}
				}
			} else {
				cp = e == 'b' ? 8 : e == 'f' ? 12 : e == 'n' ? 10 : e == 'r' ? 13
				   : e == 't' ? 9 : e;
				i += 2;
			}
		} else {
			size_t n = akj_utf8(s + i, k->end - i, &cp);
			if (n == 0)
				return -1; /* (the parser checked it: unreachable) */
			i += n;
		}
		if (latin1) {
			if (cp > 0xFF || o + 1 > cap)
				return -1;
			out[o++] = (char)cp;
			continue;
		}
		if (cp >= 0xD800 && cp <= 0xDFFF) { /* a lone surrogate: 6 raw bytes, 6 out */
			static const char hx[] = "0123456789abcdef";
			if (o + 6 > cap)
				return -1;
			out[o++] = '\\', out[o++] = 'u';
			for (int sh = 12; sh >= 0; sh -= 4)
				out[o++] = hx[(cp >> sh) & 0xF];
			continue;
		}
		size_t need = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
		if (o + need > cap)
			return -1;
		if (need == 1) {
			out[o++] = (char)cp;
		} else if (need == 2) {
			out[o++] = (char)(0xC0 | (cp >> 6));
			out[o++] = (char)(0x80 | (cp & 0x3F));
		} else if (need == 3) {
			out[o++] = (char)(0xE0 | (cp >> 12));
			out[o++] = (char)(0x80 | ((cp >> 6) & 0x3F));
			out[o++] = (char)(0x80 | (cp & 0x3F));
		} else {
			out[o++] = (char)(0xF0 | (cp >> 18));
			out[o++] = (char)(0x80 | ((cp >> 12) & 0x3F));
			out[o++] = (char)(0x80 | ((cp >> 6) & 0x3F));
			out[o++] = (char)(0x80 | (cp & 0x3F));
		}
	}
	return (long)o;
}

/* Whether string token t equals the (unescaped) key. */
static int akj_eq(const struct akj *j, int t, const char *key)
{
	const struct akj_tok *k = &j->toks[t];
	size_t n = strlen(key);
	if (!k->escaped)
		return k->end - k->start == n && memcmp(j->s + k->start, key, n) == 0;
	char buf[64];
	if (k->end - k->start >= sizeof(buf))
		return 0;
	long got = akj_decode(j, t, buf, sizeof(buf), 0);
	return got == (long)n && memcmp(buf, key, n) == 0;
}

/* The value of `key` in object token `obj` (the last one if repeated, as Python's dict
 * keeps), or -1. */
static int akj_get(const struct akj *j, int obj, const char *key)
{
	if (obj < 0 || j->toks[obj].type != AKJ_OBJ)
		return -1;
	int found = -1;
	uint32_t i = (uint32_t)obj + 1;
	for (uint32_t m = 0; m < j->toks[obj].size; m++) {
		uint32_t val = i + 1;
		if (akj_eq(j, (int)i, key))
			found = (int)val;
		i = j->toks[val].next;
	}
	return found;
}

#endif

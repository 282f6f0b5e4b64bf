/* libFuzzer target: the native CLI's JSON reader (launcher/json.h) on hostile lines. */
#include "json.h"

#include <assert.h>
#include <stdlib.h>

static struct akj_tok toks[4096];

/* Every token of a parsed tree decodes within its own size, and lookups stay inside. */
static void walk(const struct akj *j)
{
	for (size_t t = 0; t < j->n; t++) {
		const struct akj_tok *k = &j->toks[t];
		assert(k->start <= k->end && k->end <= j->len && k->next <= j->n && k->next > t);
		if (k->type == AKJ_STR) {
			size_t cap = k->end - k->start + 1;
			char *out = malloc(cap);
			assert(out);
			long n = akj_decode(j, (int)t, out, cap, 0);
			assert(n >= 0 && (size_t)n < cap);
			n = akj_decode(j, (int)t, out, cap, 1);
			assert(n < (long)cap);
			free(out);
		}
		if (k->type == AKJ_OBJ) {
			(void)akj_get(j, (int)t, "ev");
			(void)akj_get(j, (int)t, "d");
		}
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *copy = malloc(size ? size : 1); /* exact size: ASan sees any read past the line */
	assert(copy);
	memcpy(copy, data, size);
	struct akj j;
	if (akj_parse(&j, copy, size, toks, sizeof(toks) / sizeof(toks[0])) == 0)
		walk(&j);
	free(copy);
	return 0;
}

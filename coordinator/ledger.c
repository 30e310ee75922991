#include "coordinator/ledger.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct link {
	int a, b; /* node indexes, a < b */
	double gbps;
} link;

struct kvm_ledger {
	pthread_mutex_t mu;
	double lend_share;
	kvm_ledger_node *nodes;
	size_t n, cap;
	link *links;
	size_t n_links, links_cap;
};

int kvm_ledger_create(double lend_share, kvm_ledger **out)
{
	if (!out || !(lend_share >= 0.0 && lend_share <= 1.0))
		return -EINVAL;
	kvm_ledger *l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	pthread_mutex_init(&l->mu, NULL);
	l->lend_share = lend_share;
	*out = l;
	return 0;
}

void kvm_ledger_destroy(kvm_ledger *l)
{
	if (!l)
		return;
	pthread_mutex_destroy(&l->mu);
	free(l->nodes);
	free(l->links);
	free(l);
}

static int index_of(const kvm_ledger *l, const char *id)
{
	for (size_t i = 0; i < l->n; i++)
		if (strcmp(l->nodes[i].id, id) == 0)
			return (int)i;
	return -1;
}

static bool id_ok(const char *id)
{
	return id && id[0] && strlen(id) < KVM_NODE_ID_MAX;
}

int kvm_ledger_node_set(kvm_ledger *l, const char *id, uint64_t total_blocks,
			uint64_t evictable_blocks, bool schedulable)
{
	if (!l || !id_ok(id) || evictable_blocks > total_blocks)
		return -EINVAL;
	pthread_mutex_lock(&l->mu);
	int i = index_of(l, id), rc = 0;
	if (i < 0) {
		if (l->n == l->cap) {
			size_t cap = l->cap ? l->cap * 2 : 8;
			kvm_ledger_node *p = realloc(l->nodes, cap * sizeof(*p));
			if (!p) {
				rc = -ENOMEM;
				goto out;
			}
			l->nodes = p;
			l->cap = cap;
		}
		i = (int)l->n++;
		memset(&l->nodes[i], 0, sizeof(l->nodes[i]));
		strcpy(l->nodes[i].id, id);
	}
	kvm_ledger_node *nd = &l->nodes[i];
	nd->total_blocks = total_blocks;
	/* What is held cannot also be cached: the report may lag our bookkeeping. */
	uint64_t room = total_blocks > nd->used_blocks ? total_blocks - nd->used_blocks : 0;
	nd->evictable_blocks = evictable_blocks < room ? evictable_blocks : room;
	nd->lend_cap_blocks = (uint64_t)((double)total_blocks * l->lend_share);
	nd->schedulable = schedulable;
out:
	pthread_mutex_unlock(&l->mu);
	return rc;
}

bool kvm_ledger_models_match(const char *a, const char *b)
{
	return !a || !b || !a[0] || !b[0] || strcmp(a, b) == 0;
}

int kvm_ledger_node_model(kvm_ledger *l, const char *id, const char *model)
{
	if (!l || !id_ok(id) || !model || strlen(model) >= KVM_MODEL_ID_MAX)
		return -EINVAL;
	pthread_mutex_lock(&l->mu);
	int i = index_of(l, id);
	if (i >= 0)
		strcpy(l->nodes[i].model, model);
	pthread_mutex_unlock(&l->mu);
	return i >= 0 ? 0 : -ENOENT;
}

int kvm_ledger_node_remove(kvm_ledger *l, const char *id)
{
	if (!l || !id_ok(id))
		return -EINVAL;
	pthread_mutex_lock(&l->mu);
	int i = index_of(l, id), rc = -ENOENT;
	if (i >= 0) {
		/* Drop its links, fixing the indexes of later nodes. */
		size_t k = 0;
		for (size_t j = 0; j < l->n_links; j++) {
			link ln = l->links[j];
			if (ln.a == i || ln.b == i)
				continue;
			ln.a -= ln.a > i;
			ln.b -= ln.b > i;
			l->links[k++] = ln;
		}
		l->n_links = k;
		memmove(&l->nodes[i], &l->nodes[i + 1], (l->n - (size_t)i - 1) * sizeof(l->nodes[0]));
		l->n--;
		rc = 0;
	}
	pthread_mutex_unlock(&l->mu);
	return rc;
}

int kvm_ledger_link_set(kvm_ledger *l, const char *a, const char *b, double gbps)
{
	if (!l || !id_ok(a) || !id_ok(b) || !(gbps >= 0.0))
		return -EINVAL;
	pthread_mutex_lock(&l->mu);
	int ia = index_of(l, a), ib = index_of(l, b), rc = 0;
	if (ia < 0 || ib < 0 || ia == ib) {
		rc = ia < 0 || ib < 0 ? -ENOENT : -EINVAL;
		goto out;
	}
	if (ia > ib) {
		int t = ia;
		ia = ib, ib = t;
	}
	for (size_t j = 0; j < l->n_links; j++)
		if (l->links[j].a == ia && l->links[j].b == ib) {
			l->links[j].gbps = gbps;
			goto out;
		}
	if (l->n_links == l->links_cap) {
		size_t cap = l->links_cap ? l->links_cap * 2 : 16;
		link *p = realloc(l->links, cap * sizeof(*p));
		if (!p) {
			rc = -ENOMEM;
			goto out;
		}
		l->links = p;
		l->links_cap = cap;
	}
	l->links[l->n_links++] = (link){ia, ib, gbps};
out:
	pthread_mutex_unlock(&l->mu);
	return rc;
}

static double bandwidth(const kvm_ledger *l, int a, int b)
{
	if (a > b) {
		int t = a;
		a = b, b = t;
	}
	for (size_t j = 0; j < l->n_links; j++)
		if (l->links[j].a == a && l->links[j].b == b)
			return l->links[j].gbps;
	return 0.0;
}

static uint64_t free_of(const kvm_ledger_node *nd)
{
	uint64_t held = nd->used_blocks + nd->evictable_blocks;
	return nd->total_blocks > held ? nd->total_blocks - held : 0;
}

/* Creditor order for one home: bandwidth to home, then free blocks, then id
 * (so that equal candidates are ranked the same way every time). */
typedef struct candidate {
	int idx;
	double gbps;
	uint64_t free;
	const char *id;
} candidate;

static int by_rank(const void *x, const void *y)
{
	const candidate *a = x, *b = y;
	if (a->gbps != b->gbps)
		return a->gbps > b->gbps ? -1 : 1;
	if (a->free != b->free)
		return a->free > b->free ? -1 : 1;
	return strcmp(a->id, b->id);
}

int kvm_ledger_reserve(kvm_ledger *l, const char *home, uint64_t n, kvm_ledger_grant *grants,
		       size_t cap, size_t *n_grants)
{
	if (!l || !id_ok(home) || !n_grants || (cap && !grants))
		return -EINVAL;
	*n_grants = 0;
	if (n == 0)
		return 0;
	pthread_mutex_lock(&l->mu);
	int h = index_of(l, home), rc = 0;
	candidate *order = NULL;
	uint64_t *take_free = NULL, *take_evict = NULL;
	if (h < 0) {
		rc = -ENOENT;
		goto out;
	}
	order = malloc(l->n * sizeof(*order));
	take_free = calloc(l->n, sizeof(uint64_t));
	take_evict = calloc(l->n, sizeof(uint64_t));
	if (!order || !take_free || !take_evict) {
		rc = -ENOMEM;
		goto out;
	}
	/* Home first, then the creditors in rank order. */
	size_t m = 0;
	if (l->nodes[h].schedulable)
		order[m++] = (candidate){h, 0, 0, l->nodes[h].id};
	size_t first_creditor = m;
	for (size_t i = 0; i < l->n; i++)
		if ((int)i != h && l->nodes[i].schedulable &&
		    kvm_ledger_models_match(l->nodes[h].model, l->nodes[i].model))
			order[m++] = (candidate){(int)i, bandwidth(l, h, (int)i),
						 free_of(&l->nodes[i]), l->nodes[i].id};
	qsort(order + first_creditor, m - first_creditor, sizeof(*order), by_rank);

	/* How much each node may still take for this home: creditors only up
	 * to their lending cap. */
	uint64_t left = n;
	for (int pass = 0; pass < 2 && left > 0; pass++) {
		for (size_t k = 0; k < m && left > 0; k++) {
			int i = order[k].idx;
			const kvm_ledger_node *nd = &l->nodes[i];
			uint64_t room = pass == 0 ? free_of(nd) : nd->evictable_blocks;
			if (i != h) {
				uint64_t lent = nd->lent_blocks + take_free[i] + take_evict[i];
				uint64_t cap_left = nd->lend_cap_blocks > lent ? nd->lend_cap_blocks - lent : 0;
				room = room < cap_left ? room : cap_left;
			}
			uint64_t t = room < left ? room : left;
			if (pass == 0)
				take_free[i] += t;
			else
				take_evict[i] += t;
			left -= t;
		}
	}
	if (left > 0) {
		rc = -ENOSPC;
		goto out;
	}
	size_t used = 0;
	for (size_t k = 0; k < m; k++)
		used += take_free[order[k].idx] + take_evict[order[k].idx] > 0;
	if (used > cap) {
		rc = -E2BIG;
		goto out;
	}
	/* Commit. */
	for (size_t k = 0; k < m; k++) {
		int i = order[k].idx;
		uint64_t t = take_free[i] + take_evict[i];
		if (t == 0)
			continue;
		kvm_ledger_node *nd = &l->nodes[i];
		nd->used_blocks += t;
		nd->evictable_blocks -= take_evict[i];
		if (i != h) {
			nd->lent_blocks += t;
			l->nodes[h].borrowed_blocks += t;
		}
		kvm_ledger_grant *g = &grants[(*n_grants)++];
		strcpy(g->id, nd->id);
		g->blocks = t;
		g->evict = take_evict[i];
	}
out:
	pthread_mutex_unlock(&l->mu);
	free(order);
	free(take_free);
	free(take_evict);
	return rc;
}

int kvm_ledger_charge(kvm_ledger *l, const char *home, const char *node, uint64_t n)
{
	if (!l || !id_ok(home) || !id_ok(node))
		return -EINVAL;
	pthread_mutex_lock(&l->mu);
	int h = index_of(l, home), i = index_of(l, node), rc = 0;
	if (i < 0) {
		rc = -ENOENT;
	} else {
		l->nodes[i].used_blocks += n;
		if (h != i) {
			l->nodes[i].lent_blocks += n;
			if (h >= 0)
				l->nodes[h].borrowed_blocks += n;
		}
	}
	pthread_mutex_unlock(&l->mu);
	return rc;
}

int kvm_ledger_release(kvm_ledger *l, const char *home, const char *node, uint64_t n)
{
	if (!l || !id_ok(home) || !id_ok(node))
		return -EINVAL;
	pthread_mutex_lock(&l->mu);
	int h = index_of(l, home), i = index_of(l, node), rc = 0;
	if (i < 0) {
		rc = -ENOENT;
		goto out;
	}
	kvm_ledger_node *nd = &l->nodes[i];
	if (n > nd->used_blocks || (h != i && n > nd->lent_blocks)) {
		rc = -ERANGE; /* more than was reserved: a bookkeeping error upstream */
		goto out;
	}
	nd->used_blocks -= n;
	if (h != i) {
		nd->lent_blocks -= n;
		if (h >= 0) {
			kvm_ledger_node *hn = &l->nodes[h];
			hn->borrowed_blocks -= n < hn->borrowed_blocks ? n : hn->borrowed_blocks;
		}
	}
out:
	pthread_mutex_unlock(&l->mu);
	return rc;
}

int kvm_ledger_node_get(kvm_ledger *l, const char *id, kvm_ledger_node *out)
{
	if (!l || !id_ok(id) || !out)
		return -EINVAL;
	pthread_mutex_lock(&l->mu);
	int i = index_of(l, id);
	if (i >= 0)
		*out = l->nodes[i];
	pthread_mutex_unlock(&l->mu);
	return i >= 0 ? 0 : -ENOENT;
}

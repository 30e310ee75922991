/* The KV ledger: home first, then creditors by bandwidth within their
 * lending caps, eviction only when nothing is free, all-or-nothing
 * reservations, and the books always balance. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/ledger.h"

static kvm_ledger *three_nodes(void)
{
	kvm_ledger *l;
	cr_assert_eq(kvm_ledger_create(0.5, &l), 0);
	cr_assert_eq(kvm_ledger_node_set(l, "n1", 100, 0, true), 0);
	cr_assert_eq(kvm_ledger_node_set(l, "n2", 100, 0, true), 0);
	cr_assert_eq(kvm_ledger_node_set(l, "n3", 100, 0, true), 0);
	cr_assert_eq(kvm_ledger_link_set(l, "n1", "n2", 10), 0);  /* TCP */
	cr_assert_eq(kvm_ledger_link_set(l, "n1", "n3", 100), 0); /* RDMA */
	return l;
}

static kvm_ledger_node node(kvm_ledger *l, const char *id)
{
	kvm_ledger_node nd;
	cr_assert_eq(kvm_ledger_node_get(l, id, &nd), 0);
	return nd;
}

Test(ledger, home_first_then_fastest_creditor_within_caps)
{
	kvm_ledger *l = three_nodes();
	kvm_ledger_grant g[4];
	size_t n;
	cr_assert_eq(kvm_ledger_reserve(l, "n1", 80, g, 4, &n), 0);
	cr_assert_eq(n, 1);
	cr_assert_str_eq(g[0].id, "n1");
	cr_assert_eq(g[0].blocks, 80);

	/* 20 more fit at home; the other 40 are borrowed from n3 (100 Gbit/s). */
	cr_assert_eq(kvm_ledger_reserve(l, "n1", 60, g, 4, &n), 0);
	cr_assert_eq(n, 2);
	cr_assert_str_eq(g[0].id, "n1");
	cr_assert_eq(g[0].blocks, 20);
	cr_assert_str_eq(g[1].id, "n3");
	cr_assert_eq(g[1].blocks, 40);
	cr_assert_eq(node(l, "n1").borrowed_blocks, 40);
	cr_assert_eq(node(l, "n3").lent_blocks, 40);

	/* n3 lends at most 50 (half its pool): 10 more from n3, then n2. */
	cr_assert_eq(kvm_ledger_reserve(l, "n1", 30, g, 4, &n), 0);
	cr_assert_eq(n, 2);
	cr_assert_str_eq(g[0].id, "n3");
	cr_assert_eq(g[0].blocks, 10);
	cr_assert_str_eq(g[1].id, "n2");
	cr_assert_eq(g[1].blocks, 20);

	/* n2 can lend 30 more; 31 is too many: refused whole, nothing moves. */
	kvm_ledger_node before = node(l, "n2");
	cr_assert_eq(kvm_ledger_reserve(l, "n1", 31, g, 4, &n), -ENOSPC);
	cr_assert_eq(n, 0);
	kvm_ledger_node after = node(l, "n2");
	cr_assert_eq(before.used_blocks, after.used_blocks);
	cr_assert_eq(node(l, "n1").borrowed_blocks, 70);

	/* n2's own sequences still have its free memory beyond the cap. */
	cr_assert_eq(kvm_ledger_reserve(l, "n2", 80, g, 4, &n), 0);
	cr_assert_eq(n, 1);
	cr_assert_str_eq(g[0].id, "n2");

	/* Release: the space returns and the books follow. */
	cr_assert_eq(kvm_ledger_release(l, "n1", "n3", 50), 0);
	cr_assert_eq(node(l, "n3").lent_blocks, 0);
	cr_assert_eq(node(l, "n1").borrowed_blocks, 20);
	cr_assert_eq(kvm_ledger_release(l, "n1", "n3", 1), -ERANGE);
	kvm_ledger_destroy(l);
}

Test(ledger, eviction_only_when_nothing_is_free)
{
	kvm_ledger *l;
	cr_assert_eq(kvm_ledger_create(1.0, &l), 0);
	cr_assert_eq(kvm_ledger_node_set(l, "a", 10, 6, true), 0); /* 4 free, 6 cached */
	cr_assert_eq(kvm_ledger_node_set(l, "b", 10, 0, true), 0);
	kvm_ledger_grant g[4];
	size_t n;
	/* 4 free at home, then 10 free on b: no eviction yet. */
	cr_assert_eq(kvm_ledger_reserve(l, "a", 14, g, 4, &n), 0);
	cr_assert_eq(g[0].evict, 0);
	cr_assert_eq(g[1].evict, 0);
	/* Now only a's cache is left: 6 blocks, evicted. */
	cr_assert_eq(kvm_ledger_reserve(l, "a", 6, g, 4, &n), 0);
	cr_assert_eq(n, 1);
	cr_assert_str_eq(g[0].id, "a");
	cr_assert_eq(g[0].evict, 6);
	cr_assert_eq(kvm_ledger_reserve(l, "a", 1, g, 4, &n), -ENOSPC);
	kvm_ledger_destroy(l);
}

Test(ledger, unschedulable_nodes_and_bad_input)
{
	kvm_ledger *l = three_nodes();
	cr_assert_eq(kvm_ledger_node_set(l, "n3", 100, 0, false), 0); /* cordoned */
	kvm_ledger_grant g[4];
	size_t n;
	cr_assert_eq(kvm_ledger_reserve(l, "n1", 120, g, 4, &n), 0);
	for (size_t i = 0; i < n; i++)
		cr_assert_str_neq(g[i].id, "n3");
	/* A cordoned home borrows everything. */
	cr_assert_eq(kvm_ledger_node_set(l, "n1", 100, 0, false), 0);
	cr_assert_eq(kvm_ledger_reserve(l, "n1", 5, g, 4, &n), 0);
	cr_assert_str_eq(g[0].id, "n2");
	cr_assert_eq(kvm_ledger_reserve(l, "zz", 1, g, 4, &n), -ENOENT);
	cr_assert_eq(kvm_ledger_reserve(l, "n2", 1, g, 0, &n), -E2BIG);
	cr_assert_eq(kvm_ledger_node_set(l, "", 1, 0, true), -EINVAL);
	cr_assert_eq(kvm_ledger_node_set(l, "x", 1, 2, true), -EINVAL);
	cr_assert_eq(kvm_ledger_link_set(l, "n1", "n1", 1), -EINVAL);
	cr_assert_eq(kvm_ledger_link_set(l, "n1", "nope", 1), -ENOENT);
	cr_assert_eq(kvm_ledger_node_remove(l, "n2"), 0);
	cr_assert_eq(kvm_ledger_node_remove(l, "n2"), -ENOENT);
	cr_assert_eq(kvm_ledger_create(1.5, &l), -EINVAL);
	kvm_ledger_destroy(l);
}

/* Random reserves and releases for random homes against a record of what
 * each home holds where; after every step the books balance. */
Test(ledger, creditors_only_of_the_homes_model)
{
	kvm_ledger *l = three_nodes();
	cr_assert_eq(kvm_ledger_node_model(l, "n1", "llama"), 0);
	cr_assert_eq(kvm_ledger_node_model(l, "n2", "llama"), 0);
	cr_assert_eq(kvm_ledger_node_model(l, "n3", "qwen"), 0); /* the fastest link */
	cr_assert_eq(kvm_ledger_node_model(l, "nope", "llama"), -ENOENT);
	kvm_ledger_grant g[4];
	size_t n;
	/* 100 at home, then n2 lends its cap (50); n3 serves another model. */
	cr_assert_eq(kvm_ledger_reserve(l, "n1", 150, g, 4, &n), 0);
	cr_assert_eq(n, 2);
	cr_assert_str_eq(g[1].id, "n2");
	cr_assert_eq(node(l, "n3").used_blocks, 0);
	cr_assert_eq(kvm_ledger_reserve(l, "n1", 1, g, 4, &n), -ENOSPC, "n3 lent to a llama home");
	/* A node whose model is unknown lends to any home. */
	cr_assert_eq(kvm_ledger_node_model(l, "n3", ""), 0);
	cr_assert_eq(kvm_ledger_reserve(l, "n1", 1, g, 4, &n), 0);
	cr_assert_str_eq(g[0].id, "n3");
	cr_assert(kvm_ledger_models_match("llama", "llama"));
	cr_assert(kvm_ledger_models_match("", "qwen"));
	cr_assert(!kvm_ledger_models_match("llama", "qwen"));
	kvm_ledger_destroy(l);
}

Test(ledger, random_operations_keep_books_balanced)
{
	enum { NODES = 5, STEPS = 20000 };
	const char *ids[NODES] = {"a", "b", "c", "d", "e"};
	kvm_ledger *l;
	cr_assert_eq(kvm_ledger_create(0.4, &l), 0);
	for (int i = 0; i < NODES; i++)
		cr_assert_eq(kvm_ledger_node_set(l, ids[i], 50 + 10 * i, 0, true), 0);
	for (int i = 0; i < NODES; i++)
		for (int j = i + 1; j < NODES; j++)
			kvm_ledger_link_set(l, ids[i], ids[j], (i * 7 + j * 3) % 5);
	static uint64_t held[NODES][NODES]; /* [home][node] */
	srand(7);
	for (int step = 0; step < STEPS; step++) {
		int h = rand() % NODES;
		if (rand() % 2) {
			kvm_ledger_grant g[NODES];
			size_t n;
			int rc = kvm_ledger_reserve(l, ids[h], 1 + rand() % 30, g, NODES, &n);
			cr_assert(rc == 0 || rc == -ENOSPC);
			for (size_t k = 0; k < n; k++)
				for (int i = 0; i < NODES; i++)
					if (strcmp(g[k].id, ids[i]) == 0)
						held[h][i] += g[k].blocks;
		} else {
			int i = rand() % NODES;
			uint64_t r = held[h][i] ? 1 + (uint64_t)rand() % held[h][i] : 0;
			if (r) {
				cr_assert_eq(kvm_ledger_release(l, ids[h], ids[i], r), 0);
				held[h][i] -= r;
			}
		}
		uint64_t lent_total = 0, borrowed_total = 0;
		for (int i = 0; i < NODES; i++) {
			kvm_ledger_node nd = node(l, ids[i]);
			uint64_t used = 0, lent = 0, borrowed = 0;
			for (int k = 0; k < NODES; k++) {
				used += held[k][i];
				if (k != i)
					lent += held[k][i], borrowed += held[i][k];
			}
			cr_assert_eq(nd.used_blocks, used);
			cr_assert_eq(nd.lent_blocks, lent);
			cr_assert_eq(nd.borrowed_blocks, borrowed);
			cr_assert(nd.used_blocks <= nd.total_blocks);
			cr_assert(nd.lent_blocks <= nd.lend_cap_blocks);
			lent_total += nd.lent_blocks;
			borrowed_total += nd.borrowed_blocks;
		}
		cr_assert_eq(lent_total, borrowed_total);
	}
	kvm_ledger_destroy(l);
}

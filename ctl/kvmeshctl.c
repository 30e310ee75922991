/* kvmeshctl: the admin CLI. Talks to the coordinator over gRPC.
 *
 * Exit codes: 0 done; 1 the coordinator refused (the message says why);
 * 2 bad usage; 3 coordinator unreachable or too slow; 4 not found;
 * 5 not authenticated (no token, or another one than the cluster's). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/auth.h"
#include "common/config.h"
#include "common/rpc.h"
#include "proto/kvmesh.pb-c.h"

enum {
	EXIT_OK = 0,
	EXIT_REFUSED = 1,
	EXIT_USAGE = 2,
	EXIT_UNREACHABLE = 3,
	EXIT_NOT_FOUND = 4,
	EXIT_UNAUTHENTICATED = 5,
};

typedef struct ctl {
	kvm_rpc_channel *ch;
	char target[KVM_OPT_STRING_MAX];
	bool json;
	int timeout_ms;
} ctl;

static const char *usage_text =
	"usage: kvmeshctl [--coordinator=ADDR] [--auth-token-file=PATH] [-o table|json] [--timeout=5s]\n"
	"                 COMMAND [ARGS]\n"
	"\n"
	"commands:\n"
	"  nodes           list nodes: state, capacity, blocks lent and borrowed\n"
	"  models          list registered models and their block geometry\n"
	"  sequences [MODEL]  list sequences (of MODEL): home, tokens, blocks\n"
	"  seq SEQ         one sequence's block map\n"
	"  cordon NODE     no new blocks or home sequences on NODE (kept across restarts)\n"
	"  drain NODE      as cordon; it drops its cached blocks, and the blocks other\n"
	"                  nodes' sequences keep there move away (`nodes` shows progress)\n"
	"  uncordon NODE   undo cordon or drain\n"
	"  watch [AFTER]   stream node and sequence events until interrupted; with\n"
	"                  AFTER (an event's seq), first the held events after it\n"
	"\n"
	"exit codes: 0 done, 1 refused by the coordinator, 2 bad usage,\n"
	"            3 coordinator unreachable, 4 not found, 5 not authenticated\n";

/* ---- Output ----------------------------------------------------------------------- */

static void json_str(const char *s)
{
	putchar('"');
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\')
			printf("\\%c", *p);
		else if (*p < 0x20)
			printf("\\u%04x", *p);
		else
			putchar(*p);
	}
	putchar('"');
}

static const char *state_name(Kvmesh__V1__NodeState s)
{
	static const char *names[] = {"unknown", "ready", "cordoned", "draining", "dead"};
	return (unsigned)s < 5 ? names[s] : "unknown";
}

static const char *dtype_name(Kvmesh__V1__KvDtype d)
{
	static const char *names[] = {"unspecified", "f32", "f16", "bf16"};
	return (unsigned)d < 4 ? names[d] : "unknown";
}

/* Maps a call's outcome to an exit code, printing the error. */
static int rpc_exit(const char *what, int rc, const kvm_rpc_status *st)
{
	if (rc != 0) {
		fprintf(stderr, "kvmeshctl: %s: %s\n", what, strerror(-rc));
		return EXIT_UNREACHABLE;
	}
	if (st->code == KVM_RPC_OK)
		return EXIT_OK;
	fprintf(stderr, "kvmeshctl: %s: %s\n", what, st->message[0] ? st->message : "failed");
	switch (st->code) {
	case KVM_RPC_UNAVAILABLE:
	case KVM_RPC_DEADLINE_EXCEEDED:
		return EXIT_UNREACHABLE;
	case KVM_RPC_NOT_FOUND:
		return EXIT_NOT_FOUND;
	case KVM_RPC_INVALID_ARGUMENT:
		return EXIT_USAGE;
	case KVM_RPC_UNAUTHENTICATED:
		fprintf(stderr, "kvmeshctl: give the cluster's token with --auth-token-file "
				"(or KVMESH_AUTH_TOKEN_FILE)\n");
		return EXIT_UNAUTHENTICATED;
	default:
		return EXIT_REFUSED;
	}
}

/* Calls a unary method with a packed request; on success *resp holds the
 * response bytes (caller frees). */
static int call(ctl *c, const char *method, const ProtobufCMessage *req, void **resp,
		size_t *len)
{
	size_t n = protobuf_c_message_get_packed_size(req);
	uint8_t *buf = malloc(n ? n : 1);
	if (!buf)
		return EXIT_REFUSED;
	protobuf_c_message_pack(req, buf);
	char path[128], what[700];
	snprintf(path, sizeof(path), "/kvmesh.v1.Coordinator/%s", method);
	snprintf(what, sizeof(what), "%s at %s", method, c->target);
	kvm_rpc_status st;
	int rc = kvm_rpc_unary(c->ch, path, buf, n, c->timeout_ms, resp, len, &st);
	free(buf);
	return rpc_exit(what, rc, &st);
}

static uint64_t host_total(const Kvmesh__V1__Node *n, uint64_t *used)
{
	uint64_t t = 0;
	*used = 0;
	for (size_t i = 0; i < n->n_capacity; i++) {
		t += n->capacity[i]->total_blocks;
		*used += n->capacity[i]->used_blocks;
	}
	return t;
}

static void print_node_json(const Kvmesh__V1__Node *n)
{
	uint64_t used, total = host_total(n, &used);
	printf("{\"id\":");
	json_str(n->id);
	printf(",\"state\":\"%s\",\"grpc_address\":", state_name(n->state));
	json_str(n->grpc_address);
	printf(",\"data_address\":");
	json_str(n->data_address);
	printf(",\"model\":");
	json_str(n->model_id);
	printf(",\"total_blocks\":%" PRIu64 ",\"used_blocks\":%" PRIu64 ",\"lent_blocks\":%" PRIu64
	       ",\"borrowed_blocks\":%" PRIu64 ",\"lend_cap_blocks\":%" PRIu64
	       ",\"load\":%.3f,\"last_heartbeat_unix_ms\":%" PRIu64,
	       total, used, n->lent_blocks, n->borrowed_blocks, n->lend_cap_blocks, n->load,
	       n->last_heartbeat_unix_ms);
	if (n->state == KVMESH__V1__NODE_STATE__NODE_DRAINING)
		printf(",\"drain_blocks_left\":%" PRIu64 ",\"drain_home_sequences\":%u", n->drain_blocks_left,
		       n->drain_home_sequences);
	const Kvmesh__V1__Hardware *hw = n->hardware;
	if (hw) {
		printf(",\"hardware\":{\"cores\":%u,\"memory_bytes\":%" PRIu64
		       ",\"numa_nodes\":%u,\"gpus\":[",
		       hw->cores, hw->memory_bytes, hw->numa_nodes);
		for (size_t i = 0; i < hw->n_gpus; i++) {
			const Kvmesh__V1__Gpu *g = hw->gpus[i];
			printf("%s{\"index\":%u,\"name\":", i ? "," : "", g->index);
			json_str(g->name);
			printf(",\"memory_bytes\":%" PRIu64 ",\"compute_capability\":\"%u.%u\","
			       "\"pci_bus_id\":",
			       g->memory_bytes, g->compute_major, g->compute_minor);
			json_str(g->pci_bus_id);
			printf("}");
		}
		printf("],\"nics\":[");
		for (size_t i = 0; i < hw->n_nics; i++) {
			printf(i ? "," : "");
			json_str(hw->nics[i]->name);
		}
		printf("]}");
	}
	printf("}");
}

/* The GPUS column: "-", or the count and the first GPU's name and memory,
 * e.g. "2x NVIDIA H200 140GiB" ("+" when the GPUs differ). */
static void gpu_summary(const Kvmesh__V1__Hardware *hw, char *buf, size_t cap)
{
	if (!hw || hw->n_gpus == 0) {
		snprintf(buf, cap, "-");
		return;
	}
	const Kvmesh__V1__Gpu *g = hw->gpus[0];
	bool same = true;
	for (size_t i = 1; i < hw->n_gpus; i++)
		same = same && strcmp(hw->gpus[i]->name, g->name) == 0;
	snprintf(buf, cap, "%zux %s %.0fGiB%s", hw->n_gpus, g->name,
		 g->memory_bytes / (double)(1ull << 30), same ? "" : " +");
}

/* ---- Commands ----------------------------------------------------------------------- */

static int cmd_nodes(ctl *c)
{
	Kvmesh__V1__ListNodesRequest req = KVMESH__V1__LIST_NODES_REQUEST__INIT;
	void *resp;
	size_t len;
	int rc = call(c, "ListNodes", &req.base, &resp, &len);
	if (rc != EXIT_OK)
		return rc;
	Kvmesh__V1__ListNodesResponse *r = kvmesh__v1__list_nodes_response__unpack(NULL, len, resp);
	free(resp);
	if (!r) {
		fprintf(stderr, "kvmeshctl: ListNodes: malformed response\n");
		return EXIT_REFUSED;
	}
	if (c->json) {
		printf("[");
		for (size_t i = 0; i < r->n_nodes; i++) {
			if (i)
				printf(",");
			print_node_json(r->nodes[i]);
		}
		printf("]\n");
	} else {
		uint64_t now = (uint64_t)time(NULL) * 1000;
		printf("%-16s %-9s %-16s %-22s %10s %10s %8s %8s %6s %8s  %s\n", "NODE", "STATE",
		       "MODEL", "DATA ADDRESS", "BLOCKS", "USED", "LENT", "BORROWED", "LOAD", "SEEN",
		       "GPUS");
		for (size_t i = 0; i < r->n_nodes; i++) {
			const Kvmesh__V1__Node *n = r->nodes[i];
			uint64_t used, total = host_total(n, &used);
			char seen[32];
			uint64_t ago = now > n->last_heartbeat_unix_ms ? now - n->last_heartbeat_unix_ms : 0;
			snprintf(seen, sizeof(seen), "%.1fs", ago / 1000.0);
			char gpus[64];
			gpu_summary(n->hardware, gpus, sizeof(gpus));
			printf("%-16s %-9s %-16s %-22s %10" PRIu64 " %10" PRIu64 " %8" PRIu64
			       " %8" PRIu64 " %6.2f %8s  %s\n",
			       n->id, state_name(n->state), n->model_id[0] ? n->model_id : "-",
			       n->data_address, total, used, n->lent_blocks, n->borrowed_blocks, n->load,
			       seen, gpus);
		}
		/* Drain progress under the table: what still keeps each node busy. */
		for (size_t i = 0; i < r->n_nodes; i++) {
			const Kvmesh__V1__Node *n = r->nodes[i];
			if (n->state != KVMESH__V1__NODE_STATE__NODE_DRAINING)
				continue;
			if (n->drain_blocks_left == 0 && n->drain_home_sequences == 0)
				printf("%s: drained (nothing left on it; it can be stopped)\n", n->id);
			else
				printf("%s: draining: %" PRIu64 " blocks of other nodes' sequences still to move, "
				       "%u sequences homed here still to hand to other agents\n",
				       n->id, n->drain_blocks_left, n->drain_home_sequences);
		}
	}
	kvmesh__v1__list_nodes_response__free_unpacked(r, NULL);
	return EXIT_OK;
}

static int cmd_models(ctl *c)
{
	Kvmesh__V1__ListModelsRequest req = KVMESH__V1__LIST_MODELS_REQUEST__INIT;
	void *resp;
	size_t len;
	int rc = call(c, "ListModels", &req.base, &resp, &len);
	if (rc != EXIT_OK)
		return rc;
	Kvmesh__V1__ListModelsResponse *r = kvmesh__v1__list_models_response__unpack(NULL, len, resp);
	free(resp);
	if (!r) {
		fprintf(stderr, "kvmeshctl: ListModels: malformed response\n");
		return EXIT_REFUSED;
	}
	if (!c->json)
		printf("%-24s %6s %6s %8s %8s %12s %6s\n", "MODEL", "LAYERS", "Q", "KV HEADS",
		       "HEAD DIM", "BLOCK TOKENS", "DTYPE");
	else
		printf("[");
	for (size_t i = 0; i < r->n_models; i++) {
		const Kvmesh__V1__Model *m = r->models[i];
		Kvmesh__V1__BlockGeometry empty = KVMESH__V1__BLOCK_GEOMETRY__INIT;
		const Kvmesh__V1__BlockGeometry *g = m->geometry ? m->geometry : &empty;
		if (c->json) {
			printf("%s{\"id\":", i ? "," : "");
			json_str(m->id);
			printf(",\"layers\":%u,\"q_heads\":%u,\"kv_heads\":%u,\"head_dim\":%u,"
			       "\"block_tokens\":%u,\"dtype\":\"%s\"}",
			       g->layers, m->q_heads, g->kv_heads, g->head_dim, g->block_tokens,
			       dtype_name(g->dtype));
		} else {
			printf("%-24s %6u %6u %8u %8u %12u %6s\n", m->id, g->layers, m->q_heads,
			       g->kv_heads, g->head_dim, g->block_tokens, dtype_name(g->dtype));
		}
	}
	if (c->json)
		printf("]\n");
	kvmesh__v1__list_models_response__free_unpacked(r, NULL);
	return EXIT_OK;
}

static int cmd_seq(ctl *c, const char *id)
{
	Kvmesh__V1__GetSequenceRequest req = KVMESH__V1__GET_SEQUENCE_REQUEST__INIT;
	req.sequence_id = (char *)id;
	void *resp;
	size_t len;
	int rc = call(c, "GetSequence", &req.base, &resp, &len);
	if (rc != EXIT_OK)
		return rc;
	Kvmesh__V1__Sequence *s = kvmesh__v1__sequence__unpack(NULL, len, resp);
	free(resp);
	if (!s)
		return EXIT_REFUSED;
	if (c->json) {
		printf("{\"id\":");
		json_str(s->id);
		printf(",\"model\":");
		json_str(s->model_id);
		printf(",\"home\":");
		json_str(s->home_node);
		printf(",\"home_epoch\":%" PRIu64 ",\"tokens\":%" PRIu64 ",\"data_id\":%" PRIu64
		       ",\"degraded\":%s,\"shared_prefix_blocks\":%u,\"blocks\":[",
		       s->home_epoch, s->tokens, s->data_id, s->degraded ? "true" : "false",
		       s->shared_prefix_blocks);
		for (size_t i = 0; i < s->n_blocks; i++) {
			const Kvmesh__V1__BlockPlacement *b = s->blocks[i];
			printf("%s{\"index\":%u,\"node\":", i ? "," : "", b->index);
			json_str(b->node_id);
			printf(",\"borrowed\":%s,\"tokens\":%u", b->borrowed ? "true" : "false", b->tokens);
			if (b->handle)
				printf(",\"handle\":{\"slot\":%u,\"generation\":%u}", b->handle->slot,
				       b->handle->generation);
			printf("}");
		}
		printf("]}\n");
		kvmesh__v1__sequence__free_unpacked(s, NULL);
		return EXIT_OK;
	}
	printf("sequence %s model %s home %s tokens %" PRIu64 " data_id %" PRIu64 "%s\n", s->id,
	       s->model_id, s->home_node, s->tokens, s->data_id, s->degraded ? " DEGRADED" : "");
	if (s->shared_prefix_blocks)
		printf("  shares its first %u blocks\n", s->shared_prefix_blocks);
	for (size_t i = 0; i < s->n_blocks; i++) {
		const Kvmesh__V1__BlockPlacement *b = s->blocks[i];
		char h[48] = "unwritten"; /* no handle reported yet */
		if (b->handle)
			snprintf(h, sizeof(h), "handle %u/%u", b->handle->slot, b->handle->generation);
		printf("  block %u on %s%s (%u tokens) %s\n", b->index, b->node_id,
		       b->borrowed ? " borrowed" : "", b->tokens, h);
	}
	kvmesh__v1__sequence__free_unpacked(s, NULL);
	return EXIT_OK;
}

static int cmd_sequences(ctl *c, const char *model)
{
	/* Pages of 1000 until the coordinator says there are no more. */
	char after[256] = "";
	bool first = true;
	if (c->json)
		printf("[");
	else
		printf("%-28s %-20s %-16s %10s %7s %7s %s\n", "SEQUENCE", "MODEL", "HOME", "TOKENS", "BLOCKS",
		       "SHARED", "STATE");
	for (;;) {
		Kvmesh__V1__ListSequencesRequest req = KVMESH__V1__LIST_SEQUENCES_REQUEST__INIT;
		req.model_id = (char *)(model ? model : "");
		req.after = after;
		void *resp;
		size_t len;
		int rc = call(c, "ListSequences", &req.base, &resp, &len);
		if (rc != EXIT_OK)
			return rc;
		Kvmesh__V1__ListSequencesResponse *r = kvmesh__v1__list_sequences_response__unpack(NULL, len, resp);
		free(resp);
		if (!r) {
			fprintf(stderr, "kvmeshctl: ListSequences: malformed response\n");
			return EXIT_REFUSED;
		}
		for (size_t i = 0; i < r->n_sequences; i++) {
			const Kvmesh__V1__Sequence *s = r->sequences[i];
			if (c->json) {
				printf("%s{\"id\":", first ? "" : ",");
				json_str(s->id);
				printf(",\"model\":");
				json_str(s->model_id);
				printf(",\"home\":");
				json_str(s->home_node);
				printf(",\"tokens\":%" PRIu64 ",\"blocks\":%u,\"shared_prefix_blocks\":%u,"
				       "\"degraded\":%s,\"data_id\":%" PRIu64 "}",
				       s->tokens, s->block_count, s->shared_prefix_blocks,
				       s->degraded ? "true" : "false", s->data_id);
			} else {
				printf("%-28s %-20s %-16s %10" PRIu64 " %7u %7u %s\n", s->id, s->model_id, s->home_node,
				       s->tokens, s->block_count, s->shared_prefix_blocks,
				       s->degraded ? "degraded" : "ok");
			}
			first = false;
		}
		bool more = r->more && r->n_sequences > 0;
		if (more)
			snprintf(after, sizeof(after), "%s", r->sequences[r->n_sequences - 1]->id);
		kvmesh__v1__list_sequences_response__free_unpacked(r, NULL);
		if (!more)
			break;
	}
	if (c->json)
		printf("]\n");
	return EXIT_OK;
}

static int cmd_node_state(ctl *c, const char *method, const char *node)
{
	Kvmesh__V1__NodeRequest req = KVMESH__V1__NODE_REQUEST__INIT;
	req.node_id = (char *)node;
	void *resp;
	size_t len;
	int rc = call(c, method, &req.base, &resp, &len);
	if (rc != EXIT_OK)
		return rc;
	Kvmesh__V1__Node *n = kvmesh__v1__node__unpack(NULL, len, resp);
	free(resp);
	if (!n)
		return EXIT_REFUSED;
	if (c->json) {
		print_node_json(n);
		printf("\n");
	} else {
		printf("node %s is %s\n", n->id, state_name(n->state));
	}
	kvmesh__v1__node__free_unpacked(n, NULL);
	return EXIT_OK;
}

static const char *seq_event_name(Kvmesh__V1__SequenceEvent__Kind k)
{
	static const char *names[] = {"unknown",  "created", "extended",  "degraded",
				      "released", "moved",   "home_moved"};
	return (unsigned)k < sizeof(names) / sizeof(names[0]) ? names[k] : "unknown";
}

static int cmd_watch(ctl *c, uint64_t after)
{
	Kvmesh__V1__WatchEventsRequest req = KVMESH__V1__WATCH_EVENTS_REQUEST__INIT;
	req.after_seq = after;
	uint8_t buf[16];
	size_t n = kvmesh__v1__watch_events_request__pack(&req, buf);
	kvm_rpc_stream *s;
	if (kvm_rpc_stream_open(c->ch, "/kvmesh.v1.Coordinator/WatchEvents", buf, n, 0, &s) != 0)
		return EXIT_UNREACHABLE;
	void *msg;
	size_t len;
	int rc;
	while ((rc = kvm_rpc_stream_next(s, &msg, &len)) == 1) {
		Kvmesh__V1__Event *ev = kvmesh__v1__event__unpack(NULL, len, msg);
		free(msg);
		if (!ev)
			continue;
		time_t secs = (time_t)(ev->unix_ms / 1000);
		struct tm tm;
		char when[32];
		gmtime_r(&secs, &tm);
		strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
		if (ev->kind_case == KVMESH__V1__EVENT__KIND_NODE) {
			if (c->json) {
				printf("{\"seq\":%" PRIu64 ",\"unix_ms\":%" PRIu64 ",\"node\":", ev->seq,
				       ev->unix_ms);
				json_str(ev->node->node_id);
				printf(",\"state\":\"%s\",\"reason\":", state_name(ev->node->state));
				json_str(ev->node->reason);
				printf("}\n");
			} else {
				printf("%s.%03uZ node %s %s (%s)\n", when, (unsigned)(ev->unix_ms % 1000),
				       ev->node->node_id, state_name(ev->node->state), ev->node->reason);
			}
		} else if (ev->kind_case == KVMESH__V1__EVENT__KIND_SEQUENCE) {
			const Kvmesh__V1__SequenceEvent *se = ev->sequence;
			if (c->json) {
				printf("{\"seq\":%" PRIu64 ",\"unix_ms\":%" PRIu64 ",\"sequence\":", ev->seq,
				       ev->unix_ms);
				json_str(se->sequence_id);
				printf(",\"event\":\"%s\",\"reason\":", seq_event_name(se->kind));
				json_str(se->reason);
				const uint32_t *b = se->n_lost_blocks ? se->lost_blocks : se->moved_blocks;
				size_t nb = se->n_lost_blocks ? se->n_lost_blocks : se->n_moved_blocks;
				printf(",\"blocks\":[");
				for (size_t i = 0; i < nb; i++)
					printf("%s%u", i ? "," : "", b[i]);
				printf("]");
				if (se->node_id[0]) {
					printf(",\"node\":");
					json_str(se->node_id);
				}
				printf("}\n");
			} else {
				printf("%s.%03uZ sequence %s %s%s%s (%s)\n", when,
				       (unsigned)(ev->unix_ms % 1000), se->sequence_id,
				       seq_event_name(se->kind), se->node_id[0] ? " to " : "",
				       se->node_id, se->reason);
			}
		}
		fflush(stdout);
		kvmesh__v1__event__free_unpacked(ev, NULL);
	}
	const kvm_rpc_status *st = kvm_rpc_stream_status(s);
	kvm_rpc_status copy = st ? *st : (kvm_rpc_status){.code = KVM_RPC_UNKNOWN};
	kvm_rpc_stream_close(s);
	return rc < 0 ? EXIT_UNREACHABLE : rpc_exit("WatchEvents", 0, &copy);
}

int main(int argc, char **argv)
{
	ctl c = {0};
	char output[KVM_OPT_STRING_MAX], token_file[KVM_OPT_STRING_MAX];
	char token[KVM_AUTH_TOKEN_MAX + 1] = "";
	int64_t timeout_ms;
	const kvm_option opts[] = {
		{"coordinator", KVM_OPT_STRING, c.target, "127.0.0.1:7400",
		 "the coordinator's gRPC address"},
		{"output", KVM_OPT_STRING, output, "table", "table (for people) or json (for scripts)"},
		{"timeout", KVM_OPT_DURATION, &timeout_ms, "5s", "deadline of each call"},
		{"auth-token-file", KVM_OPT_STRING, token_file, "",
		 "file (mode 0600) with the cluster's shared token (empty: send none)"},
	};
	const size_t n_opts = sizeof(opts) / sizeof(opts[0]);
	/* -o is short for --output. */
	for (int i = 1; i < argc; i++)
		if (strcmp(argv[i], "-o") == 0)
			argv[i] = "--output";
	char err[512];
	int rc = kvm_config_load(opts, n_opts, &argc, argv, err, sizeof(err));
	if (rc == KVM_CONFIG_HELP) {
		fputs(usage_text, stdout);
		kvm_config_usage(stdout, "kvmeshctl", "", opts, n_opts);
		return EXIT_OK;
	}
	if (rc != 0) {
		fprintf(stderr, "kvmeshctl: %s\n", err);
		return EXIT_USAGE;
	}
	if (strcmp(output, "table") != 0 && strcmp(output, "json") != 0) {
		fprintf(stderr, "kvmeshctl: -o must be table or json, not \"%s\"\n", output);
		return EXIT_USAGE;
	}
	if (argc < 2) {
		fputs(usage_text, stderr);
		return EXIT_USAGE;
	}
	c.json = strcmp(output, "json") == 0;
	c.timeout_ms = (int)timeout_ms;
	const char *cmd = argv[1];
	int want_args = (!strcmp(cmd, "seq") || !strcmp(cmd, "cordon") || !strcmp(cmd, "drain") ||
			 !strcmp(cmd, "uncordon"))
				? 1
				: 0;
	/* `sequences` takes an optional model, `watch` an event seq to resume after. */
	if ((!strcmp(cmd, "sequences") || !strcmp(cmd, "watch")) && argc == 3)
		want_args = 1;
	bool known = want_args || !strcmp(cmd, "nodes") || !strcmp(cmd, "models") ||
		     !strcmp(cmd, "sequences") || !strcmp(cmd, "watch");
	if (!known) {
		fprintf(stderr, "kvmeshctl: unknown command \"%s\"\n%s", cmd, usage_text);
		return EXIT_USAGE;
	}
	if (argc - 2 != want_args) {
		fprintf(stderr, "kvmeshctl: %s takes %s\n", cmd,
			want_args ? "one argument" : "no arguments");
		return EXIT_USAGE;
	}
	if (token_file[0] &&
	    kvm_auth_load_token(token_file, token, sizeof(token), err, sizeof(err)) != 0) {
		fprintf(stderr, "kvmeshctl: --auth-token-file: %s\n", err);
		return EXIT_USAGE;
	}
	if (kvm_rpc_channel_open(c.target, &c.ch) != 0) {
		fprintf(stderr, "kvmeshctl: bad coordinator address \"%s\"\n", c.target);
		return EXIT_USAGE;
	}
	kvm_rpc_channel_set_token(c.ch, token); /* checked when loaded: cannot fail */
	if (!strcmp(cmd, "nodes"))
		rc = cmd_nodes(&c);
	else if (!strcmp(cmd, "models"))
		rc = cmd_models(&c);
	else if (!strcmp(cmd, "sequences"))
		rc = cmd_sequences(&c, argc == 3 ? argv[2] : NULL);
	else if (!strcmp(cmd, "seq"))
		rc = cmd_seq(&c, argv[2]);
	else if (!strcmp(cmd, "cordon"))
		rc = cmd_node_state(&c, "CordonNode", argv[2]);
	else if (!strcmp(cmd, "drain"))
		rc = cmd_node_state(&c, "DrainNode", argv[2]);
	else if (!strcmp(cmd, "uncordon"))
		rc = cmd_node_state(&c, "UncordonNode", argv[2]);
	else {
		char *end = NULL;
		unsigned long long after = argc == 3 ? strtoull(argv[2], &end, 10) : 0;
		if (argc == 3 && (!*argv[2] || *end || argv[2][0] == '-')) {
			fprintf(stderr, "kvmeshctl: watch [AFTER_SEQ]: \"%s\" is not an event seq\n", argv[2]);
			kvm_rpc_channel_close(c.ch);
			return EXIT_USAGE;
		}
		rc = cmd_watch(&c, after);
	}
	kvm_rpc_channel_close(c.ch);
	return rc;
}

/* The cluster as its coordinator and agents report it: see nodes.h. */
#include "client/demo/nodes.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/rpc.h"
#include "proto/kvmesh.pb-c.h"

/* One unary call with a small request; the reply unpacked with desc. */
static int call_small(const char *target, const char *token, const char *method,
		      const ProtobufCMessage *req, const ProtobufCMessageDescriptor *desc,
		      ProtobufCMessage **out)
{
	kvm_rpc_channel *ch;
	if (kvm_rpc_channel_open(target, &ch) != 0)
		return -EINVAL;
	if (kvm_rpc_channel_set_token(ch, token) != 0) {
		kvm_rpc_channel_close(ch);
		return -EINVAL;
	}
	uint8_t buf[256];
	if (protobuf_c_message_get_packed_size(req) > sizeof(buf)) {
		kvm_rpc_channel_close(ch);
		return -E2BIG;
	}
	size_t n = protobuf_c_message_pack(req, buf);
	void *resp = NULL;
	size_t len = 0;
	kvm_rpc_status st;
	int rc = kvm_rpc_unary(ch, method, buf, n, 3000, &resp, &len, &st);
	kvm_rpc_channel_close(ch);
	if (rc == 0 && st.code != KVM_RPC_OK)
		rc = st.code == KVM_RPC_UNAUTHENTICATED ? -EACCES : st.code == KVM_RPC_NOT_FOUND ? -ENOENT : -EIO;
	if (rc == 0 && !(*out = protobuf_c_message_unpack(desc, NULL, len, resp)))
		rc = -EPROTO;
	free(resp);
	return rc;
}

static double agent_data_bytes(const char *grpc, const char *token)
{
	Kvmesh__V1__StatsRequest req = KVMESH__V1__STATS_REQUEST__INIT;
	Kvmesh__V1__StatsResponse *r = NULL;
	if (call_small(grpc, token, "/kvmesh.v1.Agent/Stats", &req.base, &kvmesh__v1__stats_response__descriptor,
		       (ProtobufCMessage **)&r) != 0)
		return -1;
	double sum = -1;
	for (size_t k = 0; k < r->n_counters; k++)
		if (!strcmp(r->counters[k]->key, "data_bytes_in") || !strcmp(r->counters[k]->key, "data_bytes_out"))
			sum = (sum < 0 ? 0 : sum) + r->counters[k]->value;
	kvmesh__v1__stats_response__free_unpacked(r, NULL);
	return sum;
}

int demo_list_nodes(const char *coordinator, const char *token, bool with_stats, demo_node *out,
		    int cap)
{
	Kvmesh__V1__ListNodesRequest req = KVMESH__V1__LIST_NODES_REQUEST__INIT;
	Kvmesh__V1__ListNodesResponse *r = NULL;
	int rc = call_small(coordinator, token, "/kvmesh.v1.Coordinator/ListNodes", &req.base,
			    &kvmesh__v1__list_nodes_response__descriptor, (ProtobufCMessage **)&r);
	if (rc)
		return rc;
	for (size_t i = 0; i < r->n_nodes && (int)i < cap; i++) {
		const Kvmesh__V1__Node *nd = r->nodes[i];
		demo_node *v = &out[i];
		memset(v, 0, sizeof(*v));
		snprintf(v->id, sizeof(v->id), "%s", nd->id);
		snprintf(v->grpc, sizeof(v->grpc), "%s", nd->grpc_address);
		v->ready = nd->state == KVMESH__V1__NODE_STATE__NODE_READY;
		v->state = nd->state;
		v->drain_left = nd->drain_blocks_left;
		v->drain_homes = nd->drain_home_sequences;
		for (size_t c = 0; c < nd->n_capacity; c++) {
			v->total += nd->capacity[c]->total_blocks;
			v->used += nd->capacity[c]->used_blocks;
		}
		v->lent = nd->lent_blocks;
		v->borrowed = nd->borrowed_blocks;
		v->data_bytes = with_stats ? agent_data_bytes(v->grpc, token) : -1;
	}
	int n = (int)r->n_nodes;
	kvmesh__v1__list_nodes_response__free_unpacked(r, NULL);
	return n;
}

int demo_find_node(const char *coordinator, const char *token, const char *id, demo_node *out)
{
	demo_node nodes[256];
	int n = demo_list_nodes(coordinator, token, false, nodes, 256);
	for (int i = 0; i < n && i < 256; i++)
		if (strcmp(nodes[i].id, id) == 0) {
			*out = nodes[i];
			return 0;
		}
	return n < 0 ? n : -ENOENT;
}

int demo_node_admin(const char *coordinator, const char *token, const char *method, const char *id)
{
	char path[96];
	snprintf(path, sizeof(path), "/kvmesh.v1.Coordinator/%s", method);
	Kvmesh__V1__NodeRequest req = KVMESH__V1__NODE_REQUEST__INIT;
	req.node_id = (char *)id;
	Kvmesh__V1__Node *r = NULL;
	int rc = call_small(coordinator, token, path, &req.base, &kvmesh__v1__node__descriptor,
			    (ProtobufCMessage **)&r);
	if (r)
		kvmesh__v1__node__free_unpacked(r, NULL);
	return rc;
}

"""Shared helpers for integration tests: real daemons as separate processes on
loopback ports, driven by a real gRPC client (Debian's python3-grpcio) whose
stubs are generated from proto/*.proto at run time. A cluster may run with a
shared token (--auth-token-file): pass token= and the helpers' channels send
`authorization: Bearer <token>` on every call."""
import collections
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import grpc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("KVMESH_BUILD", os.path.join(ROOT, "build"))

_stubs = tempfile.mkdtemp(prefix="kvmesh-stubs-")
subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I" + os.path.join(ROOT, "proto"),
                "--python_out=" + _stubs, "--grpc_python_out=" + _stubs,
                os.path.join(ROOT, "proto", "kvmesh.proto"),
                os.path.join(ROOT, "proto", "health.proto")], check=True)
sys.path.insert(0, _stubs)
import health_pb2  # noqa: E402,F401
import health_pb2_grpc  # noqa: E402,F401
import kvmesh_pb2  # noqa: E402,F401
import kvmesh_pb2_grpc  # noqa: E402,F401


_ports_given = set()


def free_port():
    """A free port below the kernel's ephemeral range: one from that range can
    become the source port of an outgoing connection (agents dial their
    coordinator) before our daemon binds it, and a restarted daemon binds its
    old port again. Random, so that tests run at once rarely pick the same;
    never one given before in this process, since its daemon may not have
    bound it yet (drawing ~10 ports a test from 12,000, a repeat comes about
    once per 25 runs of a 14-test file, by the birthday bound)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start = max(1024, low - 12000)
    for _ in range(200 if low - start > 100 else 0):
        port = random.randrange(start, low)
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                _ports_given.add(port)
                return port
            except OSError:
                continue
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_token_file(token, mode=0o600):
    """A new file holding token and a newline, with mode; returns its path
    (in a temporary directory of its own, which the caller may remove)."""
    d = tempfile.mkdtemp(prefix="kvmesh-token-")
    path = os.path.join(d, "token")
    with open(path, "w") as f:
        f.write(token + "\n")
    os.chmod(path, mode)
    return path


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token):
        self.md = ("authorization", "Bearer " + token)

    def _details(self, d):
        md = list(d.metadata or []) + [self.md]
        return _CallDetails(d.method, d.timeout, md, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def channel(target, token=None):
    """An insecure channel to target that sends token (None: none)."""
    ch = grpc.insecure_channel(target)
    return grpc.intercept_channel(ch, _BearerToken(token)) if token else ch


class Coordinator:
    """A kvmesh-coordinator process with its own data directory; with token,
    it requires that token (a 0600 token file is written for it) and its
    stub sends it."""

    def __init__(self, data_dir=None, token=None, file_size_limit=None, **flags):
        self.own_dir = data_dir is None
        # A full disk without root: writes past the limit fail with EFBIG,
        # as they fail with ENOSPC on a full disk (lift it with lift_limit).
        self.file_size_limit = file_size_limit
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="kvmesh-coord-")
        self.port = free_port()
        self.token = token
        self.token_file = write_token_file(token) if token else None
        self.flags = {"listen": "127.0.0.1:%d" % self.port, "data-dir": self.data_dir}
        if token:
            self.flags["auth-token-file"] = self.token_file
        self.flags.update(flags)
        self.proc = None
        self.start()

    def start(self):
        args = [os.path.join(BUILD, "bin", "kvmesh-coordinator")]
        args += ["--%s=%s" % kv for kv in self.flags.items()]
        self.log = open(os.path.join(self.data_dir, "coordinator.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=self._limit if self.file_size_limit else None)
        # Wait for the port first: a gRPC channel that fails to connect backs
        # off for seconds before it tries again.
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("coordinator did not start: " + self.read_log())
                time.sleep(0.02)
        self.channel = channel("127.0.0.1:%d" % self.port, self.token)
        self.stub = kvmesh_pb2_grpc.CoordinatorStub(self.channel)
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.time() + 10
        while True:
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("coordinator did not start: " + self.read_log())
            time.sleep(0.05)

    def _limit(self):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (self.file_size_limit, resource.RLIM_INFINITY))

    def lift_limit(self):
        """Space again: the running coordinator may write files of any size."""
        self.file_size_limit = None
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    def read_log(self):
        with open(os.path.join(self.data_dir, "coordinator.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, sig="TERM"):
        if self.proc and self.proc.poll() is None:
            self.channel.close()  # an open connection holds the server's shutdown
            if sig == "KILL":
                self.proc.kill()
            else:
                self.proc.terminate()
            return self.proc.wait(timeout=15)
        return self.proc.returncode

    def close(self):
        # A clean shutdown exits 0 (under ASan, a leak would make it fail).
        rc = self.stop()
        keep_log_tail("coordinator", self.read_log)
        assert rc in (0, None, -9), "coordinator exit status %s: %s" % (rc, self.read_log()[-3000:])
        if self.own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.token_file:
            shutil.rmtree(os.path.dirname(self.token_file), ignore_errors=True)


class Agent:
    """A kvmesh-agent process for one model, registered with a coordinator.
    token: the cluster's token (a 0600 token file is written for it)."""

    def __init__(self, coordinator, node_id, model, host_pool="64MiB", env=None, token=None,
                 **flags):
        self.env = dict(os.environ, **env) if env else None  # added to ours
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvmesh-agent-")
        self.token = token
        self.flags = {"node-id": node_id, "coordinator": "127.0.0.1:%d" % coordinator.port,
                      "listen": "127.0.0.1:%d" % self.port,
                      "data-address": "127.0.0.1:%d" % free_port(),
                      "model": model, "host-pool": host_pool,
                      # tests stop agents at will: no drain first unless asked
                      "drain-timeout": "0"}
        if token:
            path = os.path.join(self.dir, "token")
            with open(path, "w") as f:
                f.write(token + "\n")
            os.chmod(path, 0o600)
            self.flags["auth-token-file"] = path
        self.flags.update(flags)
        self.start()

    def start(self):
        args = [os.path.join(BUILD, "bin", "kvmesh-agent")]
        args += ["--%s=%s" % kv for kv in self.flags.items()]
        self.log = open(os.path.join(self.dir, "agent.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env)

    def read_log(self):
        with open(os.path.join(self.dir, "agent.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, sig="TERM"):
        if self.proc.poll() is None:
            if sig == "KILL":
                self.proc.kill()
            else:
                self.proc.terminate()
        return self.proc.wait(timeout=15)

    def close(self):
        rc = self.stop()
        keep_log_tail("agent " + self.flags["node-id"], self.read_log)
        assert rc in (0, -9), "agent exit status %s: %s" % (rc, self.read_log()[-3000:])
        shutil.rmtree(self.dir, ignore_errors=True)


def list_nodes(c):
    """The coordinator's nodes by id."""
    return {n.id: n for n in c.stub.ListNodes(kvmesh_pb2.ListNodesRequest(), timeout=5).nodes}


class AgentCluster:
    """A coordinator and agents n0, n1, ... (one per pool size) serving
    `model`, all registered and ready; stub(node) is a gRPC Agent stub."""

    def __init__(self, model, pools, coordinator_flags=None, token=None, **agent_flags):
        self.token = token
        self.c = Coordinator(token=token, **(coordinator_flags or {}))
        self.agents, self.channels = {}, []
        try:
            self.c.stub.RegisterModel(model, timeout=5)
            for i, pool in enumerate(pools):
                self.agents["n%d" % i] = Agent(self.c, "n%d" % i, model.id, host_pool=str(pool),
                                               token=token, **agent_flags)
            wait_for("agents ready", lambda: all(
                i in list_nodes(self.c) and list_nodes(self.c)[i].state == kvmesh_pb2.NODE_READY
                for i in self.agents))
        except Exception:
            self.close()
            raise

    def stub(self, node, token=None):
        """An Agent stub; it sends the cluster's token, or token if given."""
        ch = channel("127.0.0.1:%d" % self.agents[node].port, token or self.token)
        self.channels.append(ch)
        return kvmesh_pb2_grpc.AgentStub(ch)

    def close(self):
        """Stops every daemon, even when one fails its exit check (the first
        failure is raised once all are stopped): a failed test must not
        leave a coordinator running."""
        for ch in self.channels:
            ch.close()
        errors = []
        for d in list(self.agents.values()) + [self.c]:
            try:
                d.close()
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        if errors:
            raise errors[0]


def wait_for(what, fn, timeout=10):
    """Polls fn() until it returns a true value; fails naming `what`."""
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.05)


# The last lines of each daemon a test closed (its directory is gone by
# then), printed when the test fails.
_log_tails = []


def keep_log_tail(name, read_log, lines=25):
    try:
        text = read_log()
    except OSError:  # closed before: its log went then
        return
    kept = [l for l in text.splitlines() if "level=debug" not in l][-lines:]
    _log_tails.append("--- %s, last %d lines:\n%s" % (name, len(kept), "\n".join(kept)))


def run_tests(tests, skipped=None):
    """Runs each test function, prints a line per test and 'N passed, N
    failed, N skipped'. A test that cannot run here appends its reason to
    `skipped` and returns."""
    skipped = skipped if skipped is not None else []
    passed = failed = 0
    for t in tests:
        start = time.time()
        del _log_tails[:]
        try:
            before = len(skipped)
            t()
            if len(skipped) > before:
                print("skip %s: %s" % (t.__name__, skipped[-1]), flush=True)
            else:
                passed += 1
                print("ok   %s (%.1fs)" % (t.__name__, time.time() - start), flush=True)
        except Exception:  # noqa: BLE001 - a test's failure of any kind
            failed += 1
            print("FAIL %s\n%s" % (t.__name__, traceback.format_exc()), flush=True)
            print("\n".join(_log_tails), flush=True)
    print("%d passed, %d failed, %d skipped" % (passed, failed, len(skipped)))
    sys.exit(1 if failed else 0)

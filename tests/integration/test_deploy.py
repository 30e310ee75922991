#!/usr/bin/python3
"""Deployment files that operators use: the systemd units verify, the daemons
tell systemd when they are ready, the example configs load, the
Kubernetes manifest names only options the daemons have, and the Prometheus
config and alert rules pass promtool (the rules their unit tests too)."""
import os
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.request

import yaml

from kvmesh_testlib import BUILD, ROOT, Agent, Coordinator, free_port, run_tests, wait_for

skipped = []


def test_systemd_units_verify():
    if not shutil.which("systemd-analyze"):
        skipped.append("systemd-analyze missing (deploy/deps.sh installs systemd)")
        return
    d = tempfile.mkdtemp()
    try:
        for name in os.listdir(os.path.join(ROOT, "deploy", "systemd")):
            with open(os.path.join(ROOT, "deploy", "systemd", name)) as f:
                text = f.read()
            # verify checks that ExecStart exists: point it at this build.
            text = text.replace("/usr/local/bin/", os.path.join(BUILD, "bin") + "/")
            with open(os.path.join(d, name.replace("@.", "@tiny.")), "w") as f:
                f.write(text)
        units = [os.path.join(d, n) for n in os.listdir(d)]
        p = subprocess.run(["systemd-analyze", "verify"] + units, capture_output=True, text=True,
                           timeout=60)
        # Complaints about the missing config file are the target machine's business.
        problems = [l for l in (p.stdout + p.stderr).splitlines()
                    if l.strip() and "kvmesh" in l and "/etc/kvmesh" not in l]
        assert not problems, problems
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_daemons_notify_systemd_when_ready():
    d = tempfile.mkdtemp()
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(10)
    os.environ["NOTIFY_SOCKET"] = path
    try:
        c = Coordinator()
        try:
            assert b"READY=1" in s.recv(4096)
        finally:
            c.close()
        assert b"STOPPING=1" in s.recv(4096)
    finally:
        del os.environ["NOTIFY_SOCKET"]
        s.close()
        shutil.rmtree(d, ignore_errors=True)


def test_example_configs_load():
    # Their fixed ports are replaced by free ones (flags win over the file).
    cm, am = free_port(), free_port()
    c = Coordinator(config=os.path.join(ROOT, "deploy", "config", "coordinator.yaml"),
                    **{"metrics-listen": "127.0.0.1:%d" % cm})
    a = None
    try:
        a = Agent(c, "cfg-agent", "no-such-model",
                  config=os.path.join(ROOT, "deploy", "config", "agent.yaml"),
                  **{"metrics-listen": "127.0.0.1:%d" % am})
        # It read its file and went on to wait for its model.
        wait_for("agent waiting for its model", lambda: "waiting_for_model" in a.read_log())
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % cm, timeout=5) as r:
            assert r.status == 200
    finally:
        if a:
            a.close()
        c.close()


def test_kubernetes_manifest_uses_real_options():
    with open(os.path.join(ROOT, "deploy", "k8s", "kvmesh.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["DaemonSet", "Service", "StatefulSet"], kinds
    helps = {}
    for binary in ("kvmesh-coordinator", "kvmesh-agent"):
        helps[binary] = subprocess.run([os.path.join(BUILD, "bin", binary), "--help"],
                                       capture_output=True, text=True, timeout=10).stdout
    for d in docs:
        if d["kind"] == "Service":
            continue
        for ctr in d["spec"]["template"]["spec"]["containers"]:
            binary = ctr["args"][0]
            for env in ctr.get("env", []):
                if env["name"].startswith("KVMESH_"):
                    assert env["name"] in helps[binary], (binary, env["name"])
            # The token comes from a Secret mounted only for its owner
            # (the daemons refuse a file group or others may read).
            envs = {e["name"]: e.get("value") for e in ctr.get("env", [])}
            assert "KVMESH_AUTH_TOKEN_FILE" in envs, (binary, "runs without a token")
            mounts = {m["name"]: m["mountPath"] for m in ctr.get("volumeMounts", [])}
            vols = {v["name"]: v for v in d["spec"]["template"]["spec"].get("volumes", [])}
            token_vol = [n for n, path in mounts.items()
                         if envs["KVMESH_AUTH_TOKEN_FILE"].startswith(path + "/")]
            assert token_vol, (binary, "the token file is on no volume")
            secret = vols[token_vol[0]]["secret"]
            assert secret["defaultMode"] & 0o077 == 0, (binary, oct(secret["defaultMode"]))
            # Prometheus is pointed at the port the daemon serves /metrics on.
            port = d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
            assert envs["KVMESH_METRICS_LISTEN"].endswith(":" + port), (binary, envs)
            assert int(port) in [p["containerPort"] for p in ctr["ports"]], (binary, port)


def test_prometheus_config_and_alert_rules():
    promtool = shutil.which("promtool")
    if not promtool:
        skipped.append("promtool not installed (Debian package prometheus; deploy/deps.sh)")
        return
    for args in (["check", "config", os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")],
                 # each alert fires on the series it is for, and not on healthy ones
                 ["test", "rules", os.path.join(ROOT, "tests", "integration",
                                                "kvmesh-rules.test.yaml")]):
        r = subprocess.run([promtool] + args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (args, r.stdout, r.stderr)


if __name__ == "__main__":
    tests = [test_systemd_units_verify, test_daemons_notify_systemd_when_ready,
             test_example_configs_load, test_kubernetes_manifest_uses_real_options,
             test_prometheus_config_and_alert_rules]
    run_tests(tests, skipped)

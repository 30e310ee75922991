#!/usr/bin/python3
"""kvmesh-demo, the main job (`make run`), end to end: a real local cluster
(coordinator and agents as processes), a synthetic transformer whose decode
runs attention on the agents holding the KV, checked by the demo itself
against the same model with local attention (every token equal, logits
within 1e-3). Here the demo's own verdict and its summary are checked, for
the default run and for other shapes: MHA and GQA, fp16, bf16 and fp32 KV,
one, two and three agents, with and without shared prefixes."""
import os
import re
import subprocess

from kvmesh_testlib import BUILD, run_tests

DEMO = os.path.join(BUILD, "bin", "kvmesh-demo")


def run_demo(*args, timeout=300):
    p = subprocess.run([DEMO, "--quiet"] + list(args), capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, "kvmesh-demo %s exited %d:\n%s" % (" ".join(args), p.returncode, out)
    assert "PASS" in p.stdout and "generated tokens equal the local run" in p.stdout, out
    return p.stdout


def borrowed(out):
    """Blocks each sequence borrowed from agents other than its home."""
    return [int(b) for b in re.findall(r"\((\d+) borrowed from other agents", out)]


def test_default_run_borrows_and_matches():
    out = run_demo()
    b = borrowed(out)
    assert len(b) == 3 and all(x > 0 for x in b), "every sequence should outgrow its home: %s" % out
    assert re.search(r"\d+ shared\)", out) and not re.search(r", 0 shared\).*\n.*, 0 shared\)", out)
    m = re.search(r"network: ([\d.]+ \w+) on the data plane.*would have cost ([\d.]+ \w+)", out)
    assert m, out


def test_mha_bf16_two_agents():
    out = run_demo("--agents=2", "--q-heads=4", "--kv-heads=4", "--dtype=bf16", "--prompt=300",
                   "--shared=0", "--steps=12", "--pool=1MiB", "--sequences=1")
    assert any(x > 0 for x in borrowed(out)), out


def test_gqa_f32_one_agent_no_borrowing():
    out = run_demo("--agents=1", "--dtype=f32", "--kv-heads=1", "--prompt=300", "--shared=100",
                   "--steps=10", "--pool=8MiB", "--sequences=2")
    assert borrowed(out) == [0, 0], out


def test_bad_arguments():
    for args in (["--dtype=f8"], ["--sequences=0"], ["--q-heads=3", "--kv-heads=2"], ["extra"]):
        p = subprocess.run([DEMO] + args, capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (args, p.returncode, p.stdout, p.stderr)
        assert "kvmesh-demo:" in p.stderr, p.stderr


if __name__ == "__main__":
    run_tests([test_default_run_borrows_and_matches, test_mha_bf16_two_agents,
               test_gqa_f32_one_agent_no_borrowing, test_bad_arguments])

"""`ray job submit` against a local Ray head, as the README documents it; our metrics scraped
from the head's Prometheus endpoint (bound to 127.0.0.1) while the job runs."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _ray(*args, env, timeout=300):
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _scrape(port: int) -> dict[str, float]:
    """Prometheus text of the metrics endpoint -> {'name{labels}': value} of the rlaccel series."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("ray_rlaccel_")}


def _value(series: dict[str, float], name: str) -> float:
    return next(v for k, v in series.items() if k.split("{")[0] == name)


@pytest.mark.slow
@pytest.mark.vllm
def test_ray_job_submit_runs_the_entry_point(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Unix socket paths must stay < 108 bytes
    # Ray >= 2.5x turns token auth on for `ray start` once ~/.ray/auth_token exists, but its job
    # client only sends the token when RAY_AUTH_MODE=token is set explicitly (README).
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray's node address (and so its metrics
    # endpoint) on loopback; without it Ray resolves 127.0.0.1 to the outward IP (README).
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "token",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    assert _ray("get-auth-token", "--generate", env=env).returncode == 0  # no-op when ~/.ray/auth_token exists
    port = 8265 + (os.getpid() % 500)
    metrics_port = port + 1000
    started = _ray("start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={port}", f"--metrics-export-port={metrics_port}", "--include-dashboard=true",
                   f"--temp-dir={ray_tmp}", env=env)
    assert started.returncode == 0, started.stderr
    try:
        run_dir, steps = tmp_path / "run", 60
        for _ in range(30):  # the head's job agent may need a few seconds after `ray start`
            job = subprocess.Popen(
                [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{port}", "--", "python", "-m",
                 "orchestration.grpo", "--config", "configs/tiny.yaml", f"orchestration.steps={steps}",
                 f"logging.dir={run_dir}", "logging.progress_bar=false"],
                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            seen: dict[str, float] = {}
            while job.poll() is None:  # scrape while the job runs (Ray exports every few seconds)
                series = _scrape(metrics_port)
                if any(k.startswith("ray_rlaccel_staleness_bucket") for k in series):
                    seen = series
                time.sleep(1)
            out = job.stdout.read()
            if "No available agent" not in out:
                break
            time.sleep(2)
        assert job.returncode == 0, out[-3000:]
        assert "succeeded" in out
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == steps
        # our metric names, with sane values, from the Prometheus endpoint of the head
        assert 0.0 <= _value(seen, "ray_rlaccel_reward") <= 1.0, seen
        assert _value(seen, "ray_rlaccel_rollout_tok_s") > 0 and _value(seen, "ray_rlaccel_update_s") > 0
        assert 0.0 <= _value(seen, "ray_rlaccel_trainer_idle_frac") <= 1.0
        assert _value(seen, "ray_rlaccel_sync_bytes") > 1e6  # the tiny policy is ~3 MB in float32
        assert _value(seen, "ray_rlaccel_staleness_count") >= 32  # one observation per trained group
        assert _value(seen, 'ray_rlaccel_staleness_bucket') >= 0
    finally:
        _ray("stop", "--force", env=env)
        time.sleep(1)
        shutil.rmtree(ray_tmp, ignore_errors=True)

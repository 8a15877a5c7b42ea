"""`ray job submit` against a local Ray head, as the README documents it."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _ray(*args, env, timeout=300):
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.vllm
def test_ray_job_submit_runs_the_entry_point(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Unix socket paths must stay < 108 bytes
    # Ray >= 2.5x turns token auth on for `ray start` once ~/.ray/auth_token exists, but its job
    # client only sends the token when RAY_AUTH_MODE=token is set explicitly (README).
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    assert _ray("get-auth-token", "--generate", env=env).returncode == 0  # no-op when ~/.ray/auth_token exists
    port = 8265 + (os.getpid() % 500)
    started = _ray("start", "--head", "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
                   "--include-dashboard=true", f"--temp-dir={ray_tmp}", env=env)
    assert started.returncode == 0, started.stderr
    try:
        run_dir = tmp_path / "run"
        for _ in range(30):  # the head's job agent may need a few seconds after `ray start`
            job = _ray("job", "submit", f"--address=http://127.0.0.1:{port}", "--", "python", "-m",
                       "orchestration.grpo", "--config", "configs/tiny.yaml", "orchestration.steps=3",
                       f"logging.dir={run_dir}", "logging.progress_bar=false", env=env, timeout=600)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3
    finally:
        _ray("stop", "--force", env=env)
        time.sleep(1)
        shutil.rmtree(ray_tmp, ignore_errors=True)

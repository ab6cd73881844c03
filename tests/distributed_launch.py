"""Run a script under ``torchrun`` (or ``accelerate launch``) with several CPU processes on the
gloo backend, bounded in time: on a timeout the whole process group is killed, so no worker
outlives the test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(extra: Optional[dict] = None) -> dict:
    """The test process's environment for the workers: the torchlora it imports, offline hubs,
    one thread per worker (two workers share the machine's cores)."""
    import torchlora

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(torchlora.__file__)))
    paths = [package_parent, os.path.join(ROOT, "tests")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def run_bounded(command: Sequence[str], timeout: float, env: Optional[dict] = None,
                cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """``command`` in its own session; on a timeout every process of that session is killed and
    the timeout is raised with the output so far."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, cwd=cwd, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        raise AssertionError(f"{' '.join(command)} did not finish in {timeout:.0f} s; output:\n{out[-4000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, out, "")


# What a process prints when gloo's worker threads let go of a tensor's Python object while the
# interpreter shuts down (pytorch/pytorch#190489). torchlora.utils.distributed.end_process_group
# makes it rare, not impossible; a second launch tells it from a failure of the script.
TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(script: str, args: Sequence[str] = (), nproc: int = 2, timeout: float = 240,
             env: Optional[dict] = None) -> str:
    """Run ``script`` with ``nproc`` processes; its combined output (AssertionError on failure)."""
    for _ in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                   f"--master-port={free_port()}", "--master-addr=127.0.0.1", script, *args]
        done = run_bounded(command, timeout, env=worker_env(env), cwd=ROOT)
        if done.returncode == 0 or TEARDOWN_ABORT not in done.stdout:
            break
    assert done.returncode == 0, f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout[-6000:]}"
    return done.stdout

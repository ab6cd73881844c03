"""The example HTTP server (examples/cpp, lora_server) as a process on loopback, and a load of
concurrent clients against it: used by benchmarks/bench_serving_http.py and by
tests/test_serving_http.py, so that the benchmark measures exactly what the tests check."""

from __future__ import annotations

import http.client
import json
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

REQUEST_TIMEOUT = 60.0


# ----------------------------------------------------------------------------- the served model
def tiny_llama(vocab: int = 64, hidden: int = 256, layers: int = 2):
    """A causal LM built from a config (no download) whose forward returns its logits tensor,
    the one output the server sends back."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class Logits(torch.nn.Module):
        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=ids).logits

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, use_cache=False)
    return Logits(LlamaForCausalLM(config)).eval()


# ----------------------------------------------------------------------------- the server


class Server:
    """lora_server on loopback; ``port`` is read from its "listening on" line."""

    def __init__(self, binary: Path, model: Path, adapters: Mapping[str, Path], *flags: str,
                 start_timeout: float = 120) -> None:
        args = [str(binary), "--port", "0", *flags, str(model)] + [f"{n}={p}" for n, p in adapters.items()]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        ready = threading.Event()
        self.port = 0

        def read() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not ready.wait(start_timeout) or not self.port:
            self.kill()
            raise RuntimeError("lora_server did not start:\n" + "".join(self.log))

    def request(self, method: str, path: str, body: Union[dict, bytes, None] = None) -> tuple[int, Union[dict, str]]:
        return http_request(self.port, method, path, body)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (the server finishes what it holds), then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def http_request(port: int, method: str, path: str, body: Union[dict, bytes, None] = None,
                 conn: Optional[http.client.HTTPConnection] = None) -> tuple[int, Union[dict, str]]:
    """One request; the JSON answer decoded (or its text)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text
    finally:
        if own:
            conn.close()


@dataclass
class LoadResult:
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        """Latency percentile in milliseconds."""
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    def summary(self, name: str) -> str:
        return (f"{name}: {self.requests} requests in {self.seconds:.1f} s = {self.throughput:.1f} req/s, "
                f"p50 {self.percentile(0.5):.1f} ms, p99 {self.percentile(0.99):.1f} ms")


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def run_load(port: int, seconds: float, bodies: Mapping[Hashable, bytes],
             check: Callable[[Hashable, bytes], Optional[str]], clients: int = 32,
             during: Optional[Callable[[], None]] = None) -> LoadResult:
    """``clients`` threads POST /v1/forward with bodies chosen at random for ``seconds``; every
    200 answer goes through ``check(key, raw)`` (None: right, else what is wrong) unless it is
    byte for byte an answer already checked for that key (so that the Python clients spend little
    time per request and the server, not the clients, is measured). ``during()`` runs meanwhile."""
    keys = list(bodies)
    result = LoadResult()
    lock = threading.Lock()
    verified: set[tuple[Hashable, bytes]] = set()
    deadline = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
        try:
            while time.monotonic() < deadline:
                key = rng.choice(keys)
                start = time.monotonic()
                try:
                    status, raw = _post(conn, "/v1/forward", bodies[key])
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
                    with lock:
                        result.failures.append(f"{key}: {type(e).__name__} {e}")
                    continue
                elapsed = time.monotonic() - start
                problem = None
                if status != 200:
                    problem = f"status {status}: {raw[:500]!r}"
                elif (key, raw) not in verified:
                    problem = check(key, raw)
                    if problem is None:
                        with lock:
                            verified.add((key, raw))
                with lock:
                    result.requests += 1
                    result.latencies.append(elapsed)
                    if problem:
                        result.failures.append(f"{key}: {problem}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join(seconds + 2 * REQUEST_TIMEOUT)
        if t.is_alive():
            result.failures.append("a load client hangs")
            break
    result.seconds = time.monotonic() - start
    return result

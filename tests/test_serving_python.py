"""torchlora.serving.AdapterServer: the C++ adapter pool under a torchlora model (tiny Llama) whose
LoRA layers read the pool's slots. 8 adapters of different ranks and targets saved by the real
peft; every row of mixed batches (rows without adapter included, per-request scales, more
adapters than slots, requests submitted from threads) must equal peft running that adapter alone."""

from __future__ import annotations

import threading
import warnings

import peft
import pytest
import torch

import tiny_models as tm
import torchlora
from serving_adapters import AdapterSpec, peft_reference, peft_rows, save_peft_adapters
from torchlora.serving import AdapterServer

serve = torchlora._C.serve
TOL = dict(rtol=1e-5, atol=5e-5)
SERVED = ["embed_tokens", "q_proj", "k_proj", "v_proj"]
SPECS = [
    AdapterSpec("a0", 1, 2, ("q_proj",)),
    AdapterSpec("a1", 2, 4, ("v_proj",)),
    AdapterSpec("a2", 3, 3, ("q_proj", "k_proj")),
    AdapterSpec("a3", 4, 16, ("embed_tokens",)),
    AdapterSpec("a4", 5, 10, ("q_proj", "embed_tokens"), rslora=True),
    AdapterSpec("a5", 6, 6, ("v_proj", "k_proj")),
    AdapterSpec("a6", 7, 21, ("q_proj", "k_proj", "v_proj", "embed_tokens")),
    AdapterSpec("a7", 8, 8, ("q_proj", "v_proj")),
]
NAMES = [s.name for s in SPECS]


def _llama():
    return tm.llama(use_cache=False)


def _logits(out):
    return (out.logits,)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    folders = save_peft_adapters(_llama, SPECS, str(root))
    return folders, peft_reference(_llama, folders)


def _model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchlora.get_peft_model(_llama(), torchlora.LoraConfig(r=2, target_modules=SERVED)).eval()


def _server(folders, names=NAMES, **kw) -> AdapterServer:
    server = _model().serve_adapters(**{"max_loras": 8, "max_lora_rank": 8, **kw})
    for name in names:
        server.load(name, folders[name])
    return server


def _check(outputs, expected) -> None:
    assert len(outputs) == len(expected)
    for i, (got, want) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(got, want[0][0], **TOL, msg=lambda m: f"row {i}: {m}")


def test_one_forward_serves_every_adapter_and_base_rows(adapters):
    folders, ref = adapters
    server = _server(folders)
    calls = []
    server.model.register_forward_hook(lambda *a: calls.append(1))
    rows = [None, "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "__base__", "a6", ""]
    ids = tm.input_ids(len(rows), 7)
    outputs = server.forward({"input_ids": ids}, rows)
    assert len(calls) == 1  # one forward whatever the adapters
    _check(outputs, peft_rows(ref, {"input_ids": ids}, [r or None if r != "__base__" else None for r in rows],
                              output=_logits))
    assert server.stats()["slot_loads"] == 8
    assert sorted(server.adapters()) == NAMES


def test_per_request_scale_and_one_adapter_at_two_scales(adapters):
    folders, ref = adapters
    server = _server(folders, names=["a6", "a4", "a2"])
    calls = []
    server.model.register_forward_hook(lambda *a: calls.append(1))
    rows, scales = ["a6", "a4", None, "a2", "a6"], [0.5, 2.0, 1.0, 1.0, 1.5]
    ids = tm.input_ids(len(rows), 6, seed=4)
    outputs = server.forward(ids, rows, scales)
    assert len(calls) == 2  # a6 at two scales: the pool gives one adapter one scale per batch
    _check(outputs, peft_rows(ref, {"input_ids": ids}, rows, row_scales=scales, output=_logits))


def test_more_adapters_than_slots_are_split_and_evicted(adapters):
    folders, ref = adapters
    server = _server(folders, max_loras=3, max_cpu_loras=8)
    rows = NAMES + [None, "a0"]
    ids = tm.input_ids(len(rows), 5, seed=6)
    outputs = server.forward(ids, rows)
    _check(outputs, peft_rows(ref, {"input_ids": ids}, rows, output=_logits))
    stats = server.stats()
    assert stats["slot_evictions"] >= 5 and stats["slot_loads"] >= 8


def test_submit_from_threads_batches_and_matches_peft(adapters):
    folders, ref = adapters
    g = torch.Generator().manual_seed(3)
    jobs = []
    for t in range(4):
        for k in range(6):
            index = int(torch.randint(-1, 8, (1,), generator=g))
            scale = [1.0, 0.5, 2.0][(t + k) % 3]
            jobs.append((t, tm.input_ids(1, 6, seed=10 * t + k)[0], NAMES[index] if index >= 0 else None, scale))
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    with _server(folders, max_wait_ms=50.0, max_batch_size=16) as server:
        calls = []
        server.model.register_forward_hook(lambda *a: calls.append(1))

        def client(thread: int) -> None:
            try:
                futures = [(i, server.submit({"input_ids": ids}, name, scale))
                           for i, (t, ids, name, scale) in enumerate(jobs) if t == thread]
                for i, future in futures:
                    results[i] = future.result(timeout=120)
            except BaseException as error:  # reported below, with the thread's traceback
                errors.append(error)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]
    assert len(results) == len(jobs)
    assert len(calls) < len(jobs)  # requests were batched
    for i, (_, ids, name, scale) in enumerate(jobs):
        expected = peft_rows(ref, {"input_ids": ids[None]}, [name], row_scales=[scale], output=_logits)
        torch.testing.assert_close(results[i], expected[0][0][0], **TOL)


def test_close_serves_queued_requests_then_refuses(adapters):
    folders, ref = adapters
    server = _server(folders, names=["a1"], max_wait_ms=20.0)
    ids = tm.input_ids(3, 5, seed=8)
    futures = [server.submit(ids[i], "a1" if i else None) for i in range(3)]
    server.close(timeout=120)
    assert all(f.done() for f in futures)
    _check([f.result() for f in futures], peft_rows(ref, {"input_ids": ids}, [None, "a1", "a1"], output=_logits))
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(ids[0], "a1")


def test_serving_leaves_the_model_as_it_was(adapters):
    folders, _ = adapters
    model = _model()
    ids = tm.input_ids(2, 5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    server = model.serve_adapters(max_loras=2, max_lora_rank=8)
    server.load("a7", folders["a7"])
    server.forward(ids, ["a7", None])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert all(layer._bound_slots is None for _, layer in server.layers)


def test_unknown_and_unloaded_adapters_raise_key_error(adapters):
    folders, _ = adapters
    server = _server(folders, names=["a0"])
    ids = tm.input_ids(2, 5)
    with pytest.raises(KeyError, match="nope"):
        server.forward(ids, ["a0", "nope"])
    with pytest.raises(KeyError, match="nope"):
        server.submit(ids[0], "nope")
    assert server.unload("a0") and not server.unload("a0")
    with pytest.raises(KeyError, match="a0"):
        server.forward(ids, ["a0", None])
    server.close()


def test_pool_errors_reach_the_caller(adapters, tmp_path):
    folders, _ = adapters
    server = _server(folders, names=["a0", "a1"], max_loras=2, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank"):  # AdapterRejectedError: rank 8 > max_lora_rank 4
        server.load("big", folders["a7"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    other.save_pretrained(str(tmp_path / "o_proj"))
    with pytest.raises(serve.AdapterRejectedError, match="o_proj"):
        server.load("o", str(tmp_path / "o_proj"))
    server.load("a2", folders["a2"])
    ids = tm.input_ids(1, 5)
    with server.pool.acquire([("a0", 1.0), ("a1", 1.0)]):  # every slot held by another batch
        with pytest.raises(serve.PoolExhaustedError):
            server.forward(ids, ["a2"])
    out = server.forward(ids, ["a2"])  # released: serving goes on
    assert len(out) == 1


def test_bad_arguments(adapters):
    folders, _ = adapters
    server = _server(folders, names=["a0"], max_loras=2)
    ids = tm.input_ids(2, 5)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        server.forward(ids, ["a0"] * 3)
    with pytest.raises(TypeError, match="one adapter name"):
        server.forward(ids, "a0")
    with pytest.raises(ValueError, match="scales must be a list"):
        server.forward(ids, ["a0", None], [1.0])
    with pytest.raises(TypeError, match="batch-first"):
        server.forward([ids], ["a0", None])
    with pytest.raises(ValueError, match="no torchlora LoRA layers"):
        AdapterServer(_llama())
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        AdapterServer(_model(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        AdapterServer(_model(), max_wait_ms=-1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        AdapterServer("model")

"""Per-request isolation in the scheduler: a fault injected into one request of a running batch (in
sampling, token bookkeeping, prompt logprobs, the grammar or output building) fails that request
alone, with finish reason abort and the message; its KV is released (the invariant holds) and every
other request of the batch finishes with exactly its solo result. A fault in the forward pass itself
still stops the engine."""

from __future__ import annotations

import threading
import time

import pytest

from radixlm.runtime.engine import Engine, EngineError

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello world, this is"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
VICTIM = "victim"


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=4096)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def solo(engine):
    return [engine.generate(p, GREEDY)["output_ids"] for p in PROMPTS]


def _run_together(engine, victim_index: int, extra: dict | None = None):
    """All prompts at once, each from its own thread (rid 'victim' for one); result or exception each."""
    results: list = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        rid = VICTIM if i == victim_index else f"ok-{i}"
        barrier.wait()
        try:
            results[i] = engine.generate(PROMPTS[i], GREEDY, rid=rid, **(extra or {}))
        except Exception as e:  # noqa: BLE001 - the victim's error is the result under test
            results[i] = e

    def gate() -> None:
        # Runs on the scheduler thread and holds it until every request is in its inbox, so all of them
        # are admitted in one step and share every batch from the first: which thread reaches the engine
        # first must not decide whether the victim ever shares a batch (a prompt-logprob fault has only
        # one chance, the victim's prefill).
        deadline = time.monotonic() + 60
        while engine._inbox.qsize() < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.001)

    engine._inbox.put(gate)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


class _Fault:
    """Raises inside ``fn`` for the victim once it has produced ``after`` tokens; records the batch size."""

    def __init__(self, engine, after: int = 3):
        self.engine = engine
        self.after = after
        self.batch_sizes: list[int] = []

    def hit(self, r) -> bool:
        # only once the victim shares the batch: the threads reach the engine at slightly different times,
        # and a fault in a batch of one would prove nothing about the neighbours
        shared = len(self.engine.scheduler.running)
        if r.rid == VICTIM and len(r.output_ids) >= self.after and shared > 1:
            self.batch_sizes.append(shared)
            return True
        return False


def _check(engine, solo, results, fault, victim_index: int, stage: str) -> None:
    err = results[victim_index]
    assert isinstance(err, ValueError) and stage in str(err) and "injected" in str(err), err
    assert fault.batch_sizes and max(fault.batch_sizes) > 1, "the fault did not hit a shared batch"
    for i, res in enumerate(results):
        if i != victim_index:
            assert not isinstance(res, Exception), res
            assert res["output_ids"] == solo[i]
    engine._wait_idle_then_check()
    assert engine.scheduler.get_stats()["num_failed_requests"] >= 1
    # and the engine goes on
    assert engine.generate(PROMPTS[0], GREEDY)["output_ids"] == solo[0]


def test_fault_in_sampling_fails_one_request(engine, solo, monkeypatch):
    fault = _Fault(engine)
    sampler = engine.scheduler.outputs.sampler
    real = type(sampler).__call__

    def faulty(self, logits, sb):
        if any(fault.hit(r) for r in sb.reqs):
            raise RuntimeError("injected sampler fault")
        return real(self, logits, sb)

    monkeypatch.setattr(type(sampler), "__call__", faulty)
    _check(engine, solo, _run_together(engine, 1), fault, 1, "sampling")


def test_fault_in_token_bookkeeping_fails_one_request(engine, solo, monkeypatch):
    fault = _Fault(engine)
    outputs = engine.scheduler.outputs
    real = outputs.append_token

    def faulty(r, tok, *rest):
        if fault.hit(r):
            raise IndexError("injected append fault")
        return real(r, tok, *rest)

    monkeypatch.setattr(outputs, "append_token", faulty)
    _check(engine, solo, _run_together(engine, 2), fault, 2, "output")


def test_fault_in_output_building_fails_one_request(engine, solo, monkeypatch):
    fault = _Fault(engine)
    outputs = engine.scheduler.outputs
    real = outputs.make_output

    def faulty(r):
        if fault.hit(r):
            raise KeyError("injected output fault")
        return real(r)

    monkeypatch.setattr(outputs, "make_output", faulty)
    _check(engine, solo, _run_together(engine, 0), fault, 0, "output")


def test_fault_in_prompt_logprobs_fails_one_request(engine, solo, monkeypatch):
    fault = _Fault(engine, after=0)
    outputs = engine.scheduler.outputs
    real = outputs._input_logprobs

    def faulty(r, *a):
        if fault.hit(r):
            raise ZeroDivisionError("injected logprob fault")
        return real(r, *a)

    monkeypatch.setattr(outputs, "_input_logprobs", faulty)
    results = _run_together(engine, 3, {"return_logprob": True, "logprob_start_len": 0})
    _check(engine, solo, results, fault, 3, "prompt logprobs")


def test_fault_in_grammar_mask_fails_one_request(engine, solo, monkeypatch):
    fault = _Fault(engine, after=1)
    grammars = engine.scheduler.grammars
    real = grammars.masks

    def faulty(reqs):
        if any(fault.hit(r) for r in reqs):
            raise RuntimeError("injected grammar fault")
        return real(reqs)

    monkeypatch.setattr(grammars, "masks", faulty)
    _check(engine, solo, _run_together(engine, 1), fault, 1, "sampling")


def test_forward_failure_still_stops_the_engine(tiny_llama):
    eng = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=1024)
    try:
        def broken(fb):
            raise RuntimeError("injected forward fault")

        eng.scheduler.runner.forward = broken
        with pytest.raises(EngineError):
            eng.generate("hello", GREEDY)
        with pytest.raises(EngineError):
            eng.generate("hello", GREEDY)
    finally:
        eng.shutdown()

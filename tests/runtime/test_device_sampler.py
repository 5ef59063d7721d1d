"""The device sampler (runtime/device_sampler.py) against the host reference Sampler (runtime/sampler.py).

Same logits, same requests: the same next tokens for greedy and seeded rows, penalties, min_p,
top-k/top-p, logit_bias, grammar masks (packed as bitmasks) and min_new_tokens bans, and the same raw
logprob rows, only for the requests that ask.
"""

from __future__ import annotations

import torch

from radixlm.runtime.device_sampler import DeviceSampler, SamplingBatch, pack_bitmask, unpack_bitmask
from radixlm.runtime.protocol import LogprobOptions
from radixlm.runtime.req import Req
from radixlm.runtime.sampler import Sampler
from radixlm.runtime.sampling_params import SamplingParams

V = 301  # not a multiple of 32: the last bitmask word is partial
EOS = 7


class _Matcher:
    """The one matcher method the samplers read: fill a bool row with the allowed tokens."""

    def __init__(self, allowed: list[int]):
        self.allowed = allowed

    def fill_mask(self, row: torch.Tensor) -> None:
        row[self.allowed] = True


class _Slot:
    def __init__(self, allowed: list[int]):
        self.matcher = _Matcher(allowed)


def _req(i: int, output_ids=(), grammar=None, return_logprob=False, **sp) -> Req:
    r = Req(rid=str(i), input_ids=[3, 5, 11 + i, 40 + i], sampling_params=SamplingParams(**sp),
            logprob=LogprobOptions(return_logprob=return_logprob), output_ids=list(output_ids))
    if grammar is not None:
        r.grammar = _Slot(grammar)
    return r


def _cases() -> list[Req]:
    return [
        _req(0, temperature=0.0),
        _req(1, temperature=0.0, return_logprob=True),
        _req(2, temperature=0.8, seed=11),
        _req(3, temperature=1.0, top_k=5, seed=3),
        _req(4, temperature=0.7, top_p=0.6, seed=4, return_logprob=True),
        _req(5, temperature=1.3, min_p=0.2, seed=5),
        _req(6, temperature=0.0, repetition_penalty=1.7, output_ids=[20, 21, 20]),
        _req(7, temperature=0.9, frequency_penalty=0.9, presence_penalty=0.5, output_ids=[30, 31, 30, 30], seed=9),
        _req(8, temperature=0.0, logit_bias={12: 50.0, 13: -4.0}),
        _req(9, temperature=0.0, grammar=[1, 2, 3, 64, 95, 96, 300]),
        _req(10, temperature=1.0, seed=2, grammar=list(range(31, 70))),
        _req(11, temperature=0.0, min_new_tokens=4, output_ids=[1]),
        # A grammar that admits only EOS outranks min_new_tokens.
        _req(12, temperature=0.0, min_new_tokens=4, grammar=[EOS]),
        _req(13, temperature=0.0, min_new_tokens=3, stop_token_ids=[9, 10], ignore_eos=True),
        _req(14, temperature=0.6, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, output_ids=[8], seed=1),
    ]


def _host_masks(reqs: list[Req]) -> torch.Tensor | None:
    if all(r.grammar is None for r in reqs):
        return None
    masks = torch.ones((len(reqs), V), dtype=torch.bool)
    for i, r in enumerate(reqs):
        if r.grammar is not None:
            masks[i].fill_(False)
            r.grammar.matcher.fill_mask(masks[i])
    return masks


def _logits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn((n, V), generator=g)
    x[:, EOS] += 8.0  # EOS is a favourite, so the bans matter
    x[:, [20, 30, 8]] += torch.tensor([9.0, 9.5, 9.0])  # ... and so do the penalties on these tokens
    return x


def _both(reqs: list[Req], logits: torch.Tensor, rows: list[int]):
    host = Sampler(V, {EOS}, seed=5)(logits[rows], reqs, _host_masks(reqs))
    sb = SamplingBatch.build(reqs, rows, V, [EOS], "cpu", _host_masks(reqs))
    dev = DeviceSampler(V, "cpu", seed=5)(logits, sb)
    return host, dev


def test_same_tokens_as_host_reference():
    reqs = _cases()
    for seed in range(5):
        logits = _logits(len(reqs) + 3, seed)
        rows = torch.randperm(len(reqs) + 3, generator=torch.Generator().manual_seed(seed))[: len(reqs)].tolist()
        host, dev = _both(reqs, logits, rows)
        assert dev.next_ids == host.next_ids
        # Logprob rows: only the requests that asked, equal to the reference's rows.
        asked = [i for i, r in enumerate(reqs) if r.logprob.return_logprob]
        assert dev.logprobs.shape == (len(asked), V)
        torch.testing.assert_close(dev.logprobs, host.logprobs[asked], rtol=0, atol=0)


def test_constraints_hold():
    reqs = _cases()
    logits = _logits(len(reqs), 0)
    _, dev = _both(reqs, logits, list(range(len(reqs))))
    assert dev.next_ids[9] in {1, 2, 3, 64, 95, 96, 300}
    assert 31 <= dev.next_ids[10] < 70
    assert dev.next_ids[11] != EOS  # min_new_tokens bans EOS ...
    assert dev.next_ids[12] == EOS  # ... unless the grammar allows nothing else
    assert dev.next_ids[13] not in (9, 10)
    assert dev.next_ids[8] == 12  # +50 bias wins
    assert dev.next_ids[0] == int(logits[0].argmax())


def test_unseeded_rows_follow_the_sampler_seed():
    reqs = [_req(i, temperature=1.0) for i in range(6)]
    logits = _logits(6, 1)
    host, dev = _both(reqs, logits, list(range(6)))
    assert dev.next_ids == host.next_ids


def test_greedy_rows_never_sort(monkeypatch):
    def no_sort(*a, **k):
        raise AssertionError("greedy sampling sorted the vocabulary")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch, "sort", no_sort)
    reqs = [r for r in _cases() if r.sampling_params.is_greedy]
    logits = _logits(len(reqs), 2)
    sb = SamplingBatch.build(reqs, list(range(len(reqs))), V, [EOS], "cpu", _host_masks(reqs))
    out = DeviceSampler(V, "cpu")(logits, sb)
    assert len(out.next_ids) == len(reqs)


def test_bitmask_round_trip():
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand((4, V), generator=g) < 0.3
    allowed[0, 31] = allowed[1, 63] = True  # the sign bit of a word
    allowed[2] = False
    allowed[3] = True
    words = pack_bitmask(allowed)
    assert words.dtype == torch.int32 and words.shape == (4, (V + 31) // 32)
    assert torch.equal(unpack_bitmask(words, V), allowed)

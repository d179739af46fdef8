"""Batched, per-row seeded sampling (serving.sampling): exact draws, top-p, and nothing read back."""

from __future__ import annotations

import torch

from serving.sampling import sample, uniform
from tests.syncs import count_syncs


def _rows(n, logits, temperature=1.0, top_p=1.0, seed=7):
    return (
        logits.expand(n, -1),
        torch.full((n,), temperature),
        torch.full((n,), top_p),
        torch.full((n,), seed, dtype=torch.int64),
        torch.arange(n, dtype=torch.int64),  # each row at its own step: independent draws
    )


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    n = 20000
    for temperature in (1.0, 0.5):
        p = torch.softmax(logits[0] / temperature, -1)
        freq = torch.bincount(sample(*_rows(n, logits, temperature)), minlength=5).float() / n
        # 4.5 standard errors of a binomial frequency: fails on a biased sampler, not on chance
        assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-4).all(), (temperature, freq, p)


def test_top_p_keeps_the_nucleus_and_renormalizes():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    p = torch.softmax(logits[0], -1)  # 0.563, 0.207, 0.126, 0.028, 0.076: the first two reach 0.77
    n = 20000
    freq = torch.bincount(sample(*_rows(n, logits, top_p=0.7)), minlength=5).float() / n
    assert freq[2:].sum() == 0
    want = p[0] / (p[0] + p[1])
    assert abs(freq[0] - want) < 4.5 * (want * (1 - want) / n) ** 0.5


def test_a_rows_draw_depends_on_its_seed_and_step_only():
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    temperature, top_p = torch.tensor([1.0, 0.0, 0.8, 1.0, 1.3, 1.0]), torch.tensor([0.9, 1, 1, 0.5, 1, 0.99])
    seed, step = torch.tensor([5, 5, 9, 9, 2, 3]), torch.tensor([0, 4, 4, 1, 7, 0])
    batch = sample(logits, temperature, top_p, seed, step)
    for i in range(6):  # alone, and at another row of another batch
        s = slice(i, i + 1)
        assert sample(logits[s], temperature[s], top_p[s], seed[s], step[s]) == batch[i]
    flipped = sample(logits.flip(0), temperature.flip(0), top_p.flip(0), seed.flip(0), step.flip(0))
    assert torch.equal(flipped.flip(0), batch)
    assert batch[1] == logits[1].argmax()  # temperature 0: greedy
    other = [int(sample(logits[:1], temperature[:1], top_p[:1], torch.tensor([s]), step[:1])) for s in range(40)]
    assert len(set(other)) > 5  # another seed, another draw


def test_skipping_the_sort_at_top_p_one_draws_the_same_tokens():
    torch.manual_seed(1)
    logits = torch.randn(64, 500)
    args = (logits, torch.ones(64), torch.ones(64), torch.arange(64), torch.arange(64))
    assert torch.equal(sample(*args, nucleus=True), sample(*args, nucleus=False))


def test_uniforms_are_uniform_in_the_open_interval():
    u = uniform(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 9]), 50000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - (1 / 12) ** 0.5) < 0.005
    assert not torch.equal(u[0], u[1])


def test_sampling_makes_no_host_sync():
    logits = torch.randn(4, 100)
    args = (
        logits,
        torch.tensor([1.0, 0.0, 0.7, 1.0]),
        torch.tensor([0.9, 1.0, 1.0, 0.5]),
        torch.arange(4),
        torch.arange(4),
    )
    with count_syncs() as syncs:
        sample(*args)
        sample(*args, nucleus=False)
    assert not syncs, dict(syncs)

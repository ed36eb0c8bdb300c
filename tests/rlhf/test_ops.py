import math

import torch

from rlhf.ops import (
    entropy_from_logits, logprobs_from_logits, masked_mean, masked_whiten, position_ids_from_mask,
    response_mask_from_ids,
)


def test_masked_mean_ignores_masked_tokens_and_empty_rows():
    values = torch.tensor([[1.0, 2.0, 100.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert masked_mean(values, mask).item() == 1.5
    assert masked_mean(values, mask, dim=1).tolist() == [1.5, 0.0]


def test_masked_whiten_hand_example():
    # counting values 1, 2, 3: mean 2, unbiased var 1 -> whitened -1, 0, 1 (the 100 is ignored)
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = masked_whiten(values, mask)
    assert torch.allclose(out[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)


def test_logprobs_equal_naive_log_softmax_and_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    ids = torch.randint(0, 11, (3, 5))
    for temperature in (1.0, 0.7):
        naive = torch.log_softmax(logits / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(logprobs_from_logits(logits, ids, temperature), naive, atol=1e-6)


def test_entropy_matches_definition():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]]])
    ent = entropy_from_logits(logits)
    assert math.isclose(ent[0, 0].item(), math.log(4), rel_tol=1e-6)  # uniform over 4
    assert ent[0, 1].item() < 1e-6  # (nearly) one-hot
    p = torch.softmax(torch.randn(2, 3, 7), -1)
    z = p.log()
    assert torch.allclose(entropy_from_logits(z), -(p * z).sum(-1), atol=1e-6)


def test_response_mask_keeps_first_eos_and_drops_the_rest():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    assert response_mask_from_ids(ids, eos).tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],  # never stopped: everything counts (truncated response)
        [True, False, False, False, False],
    ]


def test_position_ids_start_at_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_masked_moments_over_processes_by_hand():
    """Two processes holding the same shard [1, 2, 3] (all_reduce doubles every sum): the global batch is
    [1, 2, 3, 1, 2, 3], mean 2, Bessel-corrected variance (1 + 0 + 1) · 2 / 5 = 0.8; one process alone: 2 / 2 = 1."""
    from rlhf.ops import masked_moments, masked_whiten

    values, mask = torch.tensor([1.0, 2.0, 3.0, 9.0]), torch.tensor([True, True, True, False])
    mean, var = masked_moments(values, mask, all_reduce=lambda t: 2 * t)
    assert math.isclose(float(mean), 2.0) and math.isclose(float(var), 0.8, rel_tol=1e-6)
    mean, var = masked_moments(values, mask)
    assert math.isclose(float(mean), 2.0) and math.isclose(float(var), 1.0, rel_tol=1e-6)
    whitened = masked_whiten(values, mask, all_reduce=lambda t: 2 * t)
    assert torch.allclose(whitened[:3], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(0.8), atol=1e-6)

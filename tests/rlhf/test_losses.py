import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.losses import lm_loss, sft_loss, sft_loss_weights, token_nll


def _model_and_batch():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    # two sequences: prompt tokens then completion tokens, the second right-padded with 0
    input_ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 5, 6, 10, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]).bool()
    completion = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]]).bool()
    return model, input_ids, attention, completion


def test_token_nll_hand_example():
    # uniform logits over 4 tokens: every target costs log 4
    logits = torch.zeros(1, 3, 4)
    nll = token_nll(logits, torch.tensor([[0, 1, 2]]))
    assert torch.allclose(nll, torch.full((1, 2), math.log(4)))


def test_prompt_masking_trains_only_completion_tokens():
    _, _, attention, completion = _model_and_batch()
    w = sft_loss_weights(completion, attention, prompt_loss_weight=0.0)
    # targets are tokens 1..5; the completion starts at input position 3 -> target index 2
    assert w.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]
    w_half = sft_loss_weights(completion, attention, prompt_loss_weight=0.5)
    assert w_half.tolist() == [[0.5, 0.5, 1, 1, 1], [0.5, 0.5, 1, 0, 0]]


def test_lambda_one_equals_plain_lm_loss_over_whole_sequence():
    model, input_ids, attention, completion = _model_and_batch()
    logits = model(input_ids=input_ids, attention_mask=attention.long()).logits
    loss, _ = sft_loss(logits, input_ids, sft_loss_weights(completion, attention, 1.0))
    labels = input_ids.masked_fill(~attention, -100)
    reference = model(input_ids=input_ids, attention_mask=attention.long(), labels=labels).loss
    assert torch.allclose(loss, reference, atol=1e-6)
    plain, _ = lm_loss(logits, input_ids, attention)
    assert torch.allclose(loss, plain, atol=1e-7)


def test_lambda_zero_equals_masked_label_loss():
    model, input_ids, attention, completion = _model_and_batch()
    logits = model(input_ids=input_ids, attention_mask=attention.long()).logits
    loss, _ = sft_loss(logits, input_ids, sft_loss_weights(completion, attention, 0.0))
    labels = input_ids.masked_fill(~completion, -100)
    reference = model(input_ids=input_ids, attention_mask=attention.long(), labels=labels).loss
    assert torch.allclose(loss, reference, atol=1e-6)


def test_micro_batched_gradient_equals_full_batch_gradient():
    """With one global normalizer, accumulating two micro-batches gives the full batch's gradient exactly."""
    model, input_ids, attention, completion = _model_and_batch()
    weights = sft_loss_weights(completion, attention, 0.3)

    model.zero_grad()
    full, _ = sft_loss(model(input_ids=input_ids, attention_mask=attention.long()).logits, input_ids, weights)
    full.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    normalizer = weights.sum()
    for i in range(2):
        sl = slice(i, i + 1)
        logits = model(input_ids=input_ids[sl], attention_mask=attention[sl].long()).logits
        loss, _ = sft_loss(logits, input_ids[sl], weights[sl], normalizer)
        loss.backward()
    for g_full, p in zip(full_grads, model.parameters()):
        assert torch.allclose(g_full, p.grad, atol=1e-6)

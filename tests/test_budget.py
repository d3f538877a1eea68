import torch

from tta.budget import (Budget, Meter, attention_context, backward_flops, forward_flops, model_shape,
                        training_step_flops)
from tta.decoding import generate


def test_shape_excludes_only_the_input_embedding(tiny):
    shape = model_shape(tiny.model)
    cfg = tiny.model.config
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    per_layer = 4 * d * d + 3 * d * f + 2 * d          # q,k,v,o; gate,up,down; two norms
    by_hand = L * per_layer + d + V * d                # final norm, untied output projection
    assert shape.n_params == by_hand
    assert shape.n_layer == L and shape.d_model == d


def test_forward_formula_by_hand(tiny):
    shape = model_shape(tiny.model)
    # 5 new tokens after 3 cached ones attend to 4+5+6+7+8 = 30 positions.
    assert attention_context(3, 5) == 30
    assert forward_flops(shape, 5, 30) == 2 * shape.n_params * 5 + 2 * shape.n_layer * 30 * shape.d_model
    # full fine-tuning: 6N per token (plus 3x the attention term)
    assert training_step_flops(shape, 5, 30) == 6 * shape.n_params * 5 + 6 * shape.n_layer * 30 * shape.d_model


def test_meter_charges_real_tokens_of_every_forward(tiny):
    meter = Meter()
    meter.attach(tiny.model)
    try:
        ids = torch.tensor([[0, 0, 1, 3, 6], [1, 3, 6, 7, 5]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        with torch.no_grad():
            tiny.model(input_ids=ids, attention_mask=mask)
        shape = model_shape(tiny.model)
        expected = forward_flops(shape, 3 + 5, attention_context(0, 3) + attention_context(0, 5))
        assert meter.flops == expected
    finally:
        meter.detach()


def test_training_forward_also_pays_the_backward(tiny):
    meter = Meter()
    meter.attach(tiny.model)
    try:
        tiny.model.train()
        ids = torch.tensor([[1, 3, 6, 7]])
        with torch.enable_grad():
            tiny.model(input_ids=ids)
        shape = model_shape(tiny.model)
        assert meter.flops == forward_flops(shape, 4, 10) + backward_flops(shape, 4, 10)
    finally:
        tiny.model.eval()
        meter.detach()


def test_uncharged_compute_is_recorded_apart(tiny):
    meter = Meter()
    meter.attach(tiny.model)
    try:
        with meter.uncharged(), torch.no_grad():
            tiny.model(input_ids=torch.tensor([[1, 3, 6]]))
        assert meter.flops == 0 and meter.uncharged_flops > 0
    finally:
        meter.detach()


def test_decoding_stops_at_the_flop_cap(tiny):
    prompts = [[1, 3, 6, 7, 5, 4], [1, 3, 8, 5, 4]]
    free = Meter()
    free.attach(tiny.model)
    full = generate(tiny, prompts, free, max_new_tokens=30)
    free.detach()
    cap = free.flops / 3
    capped = Meter(Budget(flops=cap))
    capped.attach(tiny.model)
    short = generate(tiny, prompts, capped, max_new_tokens=30)
    capped.detach()
    assert capped.flops <= cap
    assert sum(len(g.tokens) for g in short) < sum(len(g.tokens) for g in full)


def test_seconds_cap():
    meter = Meter(Budget(seconds=0.0))
    assert meter.exhausted() and not meter.can_afford(0)
    assert Meter(Budget(flops=10)).can_afford(10) and not Meter(Budget(flops=10)).can_afford(11)

"""Compute accounting: the one place where FLOPs are counted and the cost formula lives.

The harness, not the method, counts what a method spends.  `Meter.attach` hooks
the modules that every forward of a transformers decoder runs through -- each
decoder layer and the output head -- so a forward is charged whatever its entry
point: `lm.model(...)`, `lm.model.forward(...)`, `lm.model.model(...)` followed
by `lm_head`, training or inference, a method's own call or the harness's.  A
layer whose output carries a gradient graph gets a tensor hook that charges the
backward pass when (and only when) a backward actually flows through it, in
train or eval mode alike.  A deep copy of the model keeps charging the task's meter
(`Meter.__deepcopy__`). While a task runs, work through any other torch module is charged too
(`Meter.watching_other_work`): a model the method builds from the weights or loads again is
hooked on its first forward like the run's model, and a network of the method's own is charged
at its linear, convolution, attention and recurrent modules, and so are the matrix products it
writes as bare tensor operations (`x @ w`, `F.linear`, `torch.einsum`) and the dense linear
algebra it runs (`torch.linalg.svd`, ...), in its own threads too; under `torch.func.vmap` every
count covers the whole batch (`vmapped_copies`), and under forward-mode AD every product is
charged once more per tangent it carries (`tangents`). The FLOP cap holds whether a method asks or
not: a forward whose decoder layers alone would take the spend past it raises `BudgetExceeded`
before it runs.  A TorchScript module, whose insides nothing here can see, is refused
(`UncountedWork`).

Methods never hold the meter.  They get a `TaskBudget`: it answers questions
(what is left, would this fit, keep X back for a later phase), lets a method add
compute the model hooks cannot see (`charge`), and records why a method stopped;
it has no way to switch counting off or to detach the hooks.

The formula, per token (attention as QKᵀ plus the weighted sum of values):

* forward: ``2 * N`` + ``4 * n_layer * ctx * d_attn`` where N counts the weights
  the token is multiplied by (every linear layer: attention, MLP, adapters and
  the output head; not the input embedding, a lookup, nor the norms' scales)
  and ``ctx`` is the number of positions the token attends to (its own included),
  ``d_attn = n_heads * head_dim``;
* backward: activation gradients ``2 * N`` plus twice the forward attention term
  (``8 * n_layer * ctx * d_attn``), and weight gradients ``2 * N_trainable``.
  Full fine-tuning is thus ``6 N`` per token, LoRA ``4 N + 2 N_lora``.

Only real tokens are charged, never padding (the attention mask says which are
real), so the spend does not depend on how a method batches its work.  A forward
that bypasses the decoder's mask (a decoder layer called by hand) is charged for
every position it is given.  `tests/test_budget.py` checks the hooks' count
against `torch.utils.flop_counter` with a LoRA attached.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import resource
import threading
import time
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad


# ---------------------------------------------------------------- the formula

@dataclass(frozen=True)
class ModelShape:
    n_params: int         # weights a token is multiplied by (input embedding and norms excluded)
    n_trainable: int      # of those, the ones that receive gradients
    n_layer: int
    d_model: int          # attention width: n_heads * head_dim (= hidden size for Llama)


def linear_weights(module: torch.nn.Module) -> tuple[int, int]:
    """(weights, trainable weights) of every linear map inside `module`, adapters included -- except
    a LoRA merged into its base weights, whose own matrices no longer run."""
    total = trainable = 0
    merged = {id(x) for m in module.modules() if getattr(m, "merged", False) and hasattr(m, "lora_A")
              for part in (m.lora_A, m.lora_B) for x in part.modules()}
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) and id(m) not in merged:
            n = m.weight.numel()
            total += n
            trainable += n if m.weight.requires_grad else 0
    return total, trainable


def attention_width(config) -> int:
    heads = config.num_attention_heads
    return heads * int(getattr(config, "head_dim", None) or config.hidden_size // heads)


def model_shape(model: torch.nn.Module) -> ModelShape:
    total, trainable = linear_weights(model)   # a tied output head is a Linear: counted, as it should be
    return ModelShape(n_params=total, n_trainable=trainable, n_layer=model.config.num_hidden_layers,
                      d_model=attention_width(model.config))


def attention_context(n_past: int, n_new: int) -> int:
    """Sum over `n_new` tokens, appended after `n_past`, of the positions each attends to."""
    return n_new * n_past + n_new * (n_new + 1) // 2


def attention_flops(n_layer: int, d_attn: int, context: int) -> float:
    """QKᵀ and the weighted sum of values: 2·ctx·d each, per layer."""
    return 4.0 * n_layer * d_attn * context


def forward_flops(shape: ModelShape, n_tokens: int, context: int) -> float:
    return 2.0 * shape.n_params * n_tokens + attention_flops(shape.n_layer, shape.d_model, context)


def backward_flops(shape: ModelShape, n_tokens: int, context: int) -> float:
    activations = 2.0 * shape.n_params * n_tokens + 2 * attention_flops(shape.n_layer, shape.d_model, context)
    weights = 2.0 * shape.n_trainable * n_tokens
    return activations + weights


def training_step_flops(shape: ModelShape, n_tokens: int, context: int) -> float:
    return forward_flops(shape, n_tokens, context) + backward_flops(shape, n_tokens, context)


def sequences_flops(shape: ModelShape, lengths: list[int], training: bool = False) -> float:
    """Whole sequences run once from scratch: a training batch, or prompts plus full-length
    answers (decoding with a KV cache costs the same as one pass over the finished sequence)."""
    tokens, context = sum(lengths), sum(attention_context(0, n) for n in lengths)
    return (training_step_flops if training else forward_flops)(shape, tokens, context)


# ---------------------------------------------------------------- the cap

# The FLOP cap per task of `tta run` and `tta experiment` when none is given (`--budget-flops none`
# or `budgets = ["none"]` asks for no cap).  The one place this number lives.
DEFAULT_FLOPS = 5e11


@dataclass
class Budget:
    """A per-task cap: FLOPs, wall seconds, or neither (None = unlimited)."""
    flops: float | None = None
    seconds: float | None = None

    def as_dict(self) -> dict:
        return {"flops": self.flops, "seconds": self.seconds}


class UncountedWork(RuntimeError):
    """Work the meter cannot count, refused before it runs: a TorchScript module (`torch.jit.script`
    or `torch.jit.trace`) runs its insides where neither module hooks nor the bare-product watch
    see them (a traced copy of the embedded model was charged 0 FLOPs a forward)."""


class BudgetExceeded(RuntimeError):
    """A forward of the model that would take the task past its FLOP cap, refused by the harness
    before it ran.  The built-in methods ask the budget first and never meet it; a method of one's
    own that does not ask fails the task with this error, or catches it and answers with what it
    has.  With gradients on and weights that learn, the forward is refused unless the backward it
    allows fits too.  (Only FLOP caps are enforced so: a seconds cap cannot be checked before a
    forward runs.)"""


@dataclass
class _Call:
    """The decoder call in progress: which of its positions are real tokens."""
    new_mask: torch.Tensor | None   # (batch, new positions) on the CPU, 1 = real; None = all real
    tokens: int
    context: int
    new_per_row: list[int] | None = None   # real new tokens per row, at the row's end (from `known_rows`)


def vmapped_copies(tensor) -> int:
    """How many examples `tensor` stands for under `torch.func.vmap`: inside a vmapped function a
    tensor shows one example's shape, and every count read from shapes there must be multiplied
    by the batch sizes of the vmap levels around it (1 outside vmap).  Without this, a forward of
    4 rows vmapped one row at a time was charged a quarter of the same forward run as a batch."""
    functorch = torch._C._functorch
    copies = 1
    try:
        while isinstance(tensor, torch.Tensor) and functorch.is_functorch_wrapped_tensor(tensor):
            inner = functorch.get_unwrapped(tensor)
            if functorch.is_batchedtensor(tensor):
                copies *= inner.shape[functorch.maybe_get_bdim(tensor)]
            tensor = inner
    except (RuntimeError, IndexError, AttributeError):   # a wrapper of another kind: counted as it shows
        pass
    return copies


def known_rows(mask: torch.Tensor, new: list[int], past: list[int]) -> torch.Tensor:
    """Tell the meter a forward's real tokens so that it need not read `mask` back from the device
    (on a GPU every read is a host sync, and decoding would pay one per step): per row, the real
    new tokens (at the end of the row) and the real positions before them.  The harness's decoder
    keeps these counts on the host anyway; any other caller is metered from the mask itself."""
    mask.tta_rows = (list(new), list(past))
    return mask


# decoder module -> the meters hooked to it, for forwards computed outside its modules
_METERS_OF: "weakref.WeakKeyDictionary[torch.nn.Module, list[Meter]]" = weakref.WeakKeyDictionary()


def charge_forward(model: torch.nn.Module, n_tokens: int, context: int, head_tokens: int | None = None) -> None:
    """Charge every meter attached to `model` for a forward of its weights that did not run
    through its modules (the harness's fast decoder, `tta.model.fast_decode`), by the formula
    the hooks apply: `n_tokens` real tokens attending to `context` positions in all, the output
    head run on `head_tokens` of them (default: all)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skipped = 0 if head_tokens is None or head is None else (n_tokens - head_tokens) * head.weight.numel()
    for meter in _METERS_OF.get(decoder, []) if decoder is not None else []:
        meter._charge(forward_flops(meter.shape(model), n_tokens, context) - 2.0 * skipped)


# Set in a module's `__dict__` (so copies keep it) while a meter's hooks charge the module's work.
_METERED = "_tta_metered"
_NO_DECODER = "_tta_no_decoder"   # a transformers model the meter cannot hook: charged part by part


def _mark(model: torch.nn.Module, metered: bool) -> None:
    for part in model.modules():
        if metered:
            part.__dict__[_METERED] = True
        else:
            part.__dict__.pop(_METERED, None)


def _hookable_decoder(module: torch.nn.Module):
    """The decoder of a transformers model the meter can hook (`get_decoder()` with `.layers`), or None."""
    if module.__dict__.get(_NO_DECODER) or getattr(type(module), "get_decoder", None) is None:
        return None
    try:
        decoder = module.get_decoder()
        ok = decoder is not None and getattr(decoder, "layers", None) is not None and hasattr(module, "config")
    except Exception:   # an architecture whose get_decoder does not apply
        ok = False
    if not ok:
        module.__dict__[_NO_DECODER] = True
        return None
    return decoder


# The modules whose work is charged when they run outside every hooked model (`module_flops`).
# An `nn.LSTM`/`GRU`/`RNN` is not one of them: its steps run in one call (`torch.lstm`, ...)
# that the watch on bare products prices with its backward (`_recurrent_call_flops`), a subclass's
# and a hand-made call's alike.
COUNTED_MODULES = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.MultiheadAttention)


def counted_as_a_module(module: torch.nn.Module) -> bool:
    """Whether a module outside the hooked models is charged at its own products (`module_flops`)
    rather than at the products inside it: one of `COUNTED_MODULES` running torch's own forward.
    A subclass that writes its own forward (a LoRA layer written as `nn.Linear` plus `x @ A @ B`,
    a quantised layer) can do any work, and a subclass of `nn.Linear` whose forward made ten
    products was charged one; its products are charged one by one instead, by the watch."""
    return isinstance(module, COUNTED_MODULES) and type(module).forward.__module__.startswith("torch.nn.modules.")


def _learns(module: torch.nn.Module) -> bool:
    """Whether a counted module's weights learn, those held by its parts included: a weight under
    a parametrization (`weight_norm`, `spectral_norm`) lives in a child module, and an attention
    layer's output projection is one."""
    return any(p.requires_grad for p in module.parameters())


def _backward_passes(module: torch.nn.Module, x=None) -> int:
    """Forward costs a counted module's backward takes: its input's gradient, and its own weights'
    when they learn.  A linear or convolution layer computes each gradient as one product the size
    of its forward, and only the gradients asked for: its input's only when the input requires
    grad (not a network's first layer, whose input is data; not a learning layer after frozen
    ones).  Before, every layer with learning weights was charged both, 29% more than torch's own
    counter for a 2-layer MLP's training step.  An attention layer keeps two passes whenever
    anything learns: the gradients of its scores run whether or not the input needs one."""
    learns = _learns(module)
    if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
        return int(learns) + int(isinstance(x, torch.Tensor) and x.requires_grad)
    return 2 if learns else 1


def _forward_ad_on() -> bool:
    """Whether a forward-mode AD level is open (torch.func.jvp opens one too).  A torch without
    the private level counter is asked tensor by tensor instead."""
    return getattr(_forward_ad, "_current_level", 0) >= 0


def tangents(x=None, module: torch.nn.Module | None = None) -> float:
    """The tangents a product carries (see `tangent_parts`), the input's and the weights' together."""
    return sum(tangent_parts(x, module))


def tangent_parts(x=None, module: torch.nn.Module | None = None) -> tuple[float, float]:
    """Tangents forward-mode AD (`torch.func.jvp`, `jacfwd`, a `torch.autograd.forward_ad`
    dual level) carries through a product: one when the input `x` carries a tangent, one when the
    weights of `module` do (the tangent of x W is dx W + x dW), each times the copies its tangent
    is batched into beyond the primal's (`jacfwd` pushes one tangent per input element through a
    single primal).  Each costs the product once more, so a forward with tangents is charged
    (1 + tangents) times its products.  Without this a jvp of a matmul, or of the model's forward
    against its weights (forward-gradient training), was charged as the plain forward, and a
    jacfwd over 128 inputs as two.  Outside forward-mode AD this is one attribute read."""
    if not _forward_ad_on():
        return 0.0, 0.0

    def streams(t) -> float:   # 0, or the tangent's copies per copy of its primal (jacfwd: one per input element)
        tangent = _forward_ad.unpack_dual(t).tangent if isinstance(t, torch.Tensor) else None
        return 0.0 if tangent is None else max(1.0, vmapped_copies(tangent) / vmapped_copies(t))
    weights = max((streams(p) for p in module.parameters()), default=0.0) if module is not None else 0.0
    return streams(x), weights


def _positional(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The call's inputs in the order of the module's `forward`, those given by keyword included:
    `linear(input=x)` and `attention(query=q, key=k, value=v)` were charged 0, since the products
    were priced from the positional inputs alone while the module's insides were passed by.  A
    global pre-hook is not given keywords, so such a call meets the cap only after it ran, as a
    convolution does."""
    if not kwargs:
        return args
    try:
        return tuple(inspect.signature(module.forward).bind(*args, **kwargs).arguments.values())
    except (TypeError, ValueError):   # a signature Python cannot read or bind: the positional inputs
        return args


def module_flops(module: torch.nn.Module, args: tuple, output=None) -> float:
    """FLOPs of one forward of a module outside every hooked model, counted at its matrix
    products: `nn.Linear`, `nn.Conv*` (known once it ran) and `nn.MultiheadAttention`.  Anything
    else costs 0 here: element-wise work is not counted anywhere, and a container's products run
    in its own `Linear`s and are counted there."""
    x = args[0] if args else None
    return _module_products(module, args, x, output) * vmapped_copies(x)


def _module_products(module: torch.nn.Module, args: tuple, x, output) -> float:
    if isinstance(module, torch.nn.Linear) and isinstance(x, torch.Tensor):
        return 2.0 * module.in_features * module.out_features * (x.numel() // max(module.in_features, 1))
    if isinstance(module, torch.nn.modules.conv._ConvNd) and isinstance(output, torch.Tensor):
        kernel = math.prod(module.kernel_size)
        if module.transposed:   # each input value is multiplied into every output it reaches
            return 2.0 * (module.out_channels // module.groups) * kernel * x.numel()
        return 2.0 * (module.in_channels // module.groups) * kernel * output.numel()
    if isinstance(module, torch.nn.MultiheadAttention) and len(args) >= 2 and isinstance(x, torch.Tensor):
        width, keys = module.embed_dim, args[1]
        batch = (x.shape[0] if module.batch_first else x.shape[1]) if x.dim() == 3 else 1
        queries, n_keys = x.numel() // width, keys.numel() // keys.shape[-1]
        projections = 2.0 * width * width * (2 * queries + 2 * n_keys)   # q and output; k and v
        return projections + 4.0 * width * (queries // batch) * (n_keys // batch) * batch
    return 0.0


def _tangent_costs(parts: tuple[float, float], weights: int, tokens: int, attention: float) -> float:
    """The tangents' work in a decoder layer (`tangent_parts`: the input's, the weights'): each
    linear map once more per tangent, and the attention's two products on tangents of both their
    operands, twice the forward's attention term (as the backward's activation gradients take),
    once per copy the tangents are batched into."""
    return 2.0 * weights * tokens * sum(parts) + 2 * attention * max(parts)


def _head_costs(head: torch.nn.Module, tokens: int) -> tuple[float, float]:
    """The output head's forward and backward FLOPs on `tokens` positions (the backward: the
    hidden states' gradient, and the head's own when it learns)."""
    weights = head.weight.numel()
    return 2.0 * weights * tokens, 2.0 * (weights + (weights if head.weight.requires_grad else 0)) * tokens


# ---------------------------------------------------------------- bare products

_RECURRENT_CALLS = (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)


class _RecurrentCall(NamedTuple):
    """What `torch.lstm`/`gru`/`rnn_tanh`/`rnn_relu` (the call an `nn.LSTM`/`GRU`/`RNN` forward
    makes) multiplies: (input, hx, weights, has_biases, layers, dropout, train, bidirectional,
    batch_first), or for a packed sequence (data, batch sizes, hx, weights, has_biases, layers,
    dropout, train, bidirectional)."""
    input: torch.Tensor
    states: list            # h0, and an LSTM's c0
    matrices: list          # per layer and direction: w_ih, w_hh, and an LSTM's projection w_hr
    layers: int
    directions: int
    rows: int               # time steps x batch (a packed sequence: its data's rows)
    first_rows: tuple       # rows of the step each direction starts from, whose state is hx

    @classmethod
    def read(cls, input, second, *rest, **__) -> "_RecurrentCall":
        packed = isinstance(second, torch.Tensor) and second.dim() == 1 and not second.is_floating_point()
        hx, weights, _, layers, _, _, bidirectional = (rest if packed else (second, *rest))[:7]
        states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        if packed:
            rows, first_rows = input.shape[0], (int(second[0]), int(second[-1]))
        else:
            batch = states[0].shape[-2] if states[0].dim() == 3 else 1
            rows, first_rows = input.numel() // max(input.shape[-1], 1), (batch, batch)
        return cls(input, states, [w for w in weights if w.dim() == 2], int(layers),
                   2 if bidirectional else 1, rows, first_rows)

    def forward_flops(self) -> float:
        """Every row (a time step of one sequence) multiplies its input and state by every weight
        matrix of its layer and direction: the gates', and an LSTM's projection."""
        return 2.0 * self.rows * sum(w.numel() for w in self.matrices)


def _recurrent_call_flops(*args, **kwargs) -> float:
    return _RecurrentCall.read(*args, **kwargs).forward_flops()


def _recurrent_backward_flops(call: _RecurrentCall) -> float:
    """The products a recurrent call's backward runs, as torch computes them (measured with its
    counter, every case of
    `test_a_recurrent_networks_training_step_is_charged_the_gradients_torch_computes`): per layer and
    direction, each learning matrix's gradient on every row; the input's gradient through w_ih
    where the layer's input needs one (the network's input, or a layer above one that learns);
    and where anything below the states learns or needs a gradient, the state's gradient through
    w_hh on every row but those of the first step (whose state is hx, unless hx needs a gradient)
    and through the projection on every row.  Before, a training step was charged two passes:
    for a 1-layer GRU whose input is data torch computes 1.6, so its backward was charged 25% over."""
    per_group = len(call.matrices) // max(call.layers * call.directions, 1)
    states_learn = any(isinstance(h, torch.Tensor) and h.requires_grad for h in call.states)
    input_needs_grad = call.input.requires_grad
    flops = 0.0
    for layer in range(call.layers):
        layer_learns = False
        for direction in range(call.directions):
            group = (layer * call.directions + direction) * per_group
            matrices = call.matrices[group:group + per_group]
            w_ih, w_hh, *projection = matrices
            learns = any(w.requires_grad for w in matrices)
            layer_learns |= learns
            flops += 2.0 * call.rows * sum(w.numel() for w in matrices if w.requires_grad)
            if input_needs_grad:
                flops += 2.0 * call.rows * w_ih.numel()
            if learns or input_needs_grad or states_learn:
                state_rows = call.rows - (0 if states_learn else call.first_rows[direction])
                flops += 2.0 * (state_rows * w_hh.numel() + call.rows * sum(w.numel() for w in projection))
        input_needs_grad = input_needs_grad or layer_learns or states_learn   # the next layer's input
    return flops


def _matmul_flops(a: torch.Tensor, b: torch.Tensor) -> float:
    """`a @ b` with torch's broadcasting: 2 * (rows of a) * (contracted) * (columns of b) per batch.
    A sparse operand multiplies only its stored values: 2 * (stored values) * (the other side's
    free dimension), as a sparse random projection costs."""
    rows = a.shape[-2] if a.dim() > 1 else 1
    columns = b.shape[-1] if b.dim() > 1 else 1
    if a.layout != torch.strided:
        return 2.0 * a._nnz() * columns
    if b.layout != torch.strided:
        return 2.0 * b._nnz() * rows
    batch = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return 2.0 * batch * rows * a.shape[-1] * columns


def _attention_pairs(queries: int, keys: int, causal: bool) -> int:
    """Query-key pairs of one head: every pair, or under `is_causal` torch's top-left causal mask
    (query i sees keys 0..i)."""
    if not causal:
        return queries * keys
    seen_growing = min(queries, keys)
    return seen_growing * (seen_growing + 1) // 2 + (queries - seen_growing) * keys


def _sdpa_flops(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *_, **__) -> float:
    """`F.scaled_dot_product_attention`: QKᵀ and the weighted sum of values, per query head."""
    heads = query.numel() // max(query.shape[-2] * query.shape[-1], 1)   # batch x query heads
    pairs = _attention_pairs(query.shape[-2], key.shape[-2], bool(is_causal))
    return 2.0 * heads * pairs * (query.shape[-1] + value.shape[-1])


_ON_META = "on meta"   # in `_bare_products`: priced by torch's counter on shapes only (`_priced_on_meta`)


def _bare_products():
    """Function -> (its FLOPs from its arguments' shapes, before it runs; the positions of the
    operands whose gradients a backward computes, each at the forward's cost, or None: all).  The
    shape rules read arguments as torch names or orders them; a call they cannot read is counted
    as it runs (`_run_counted`), and the product after it is refused if it spent the cap."""
    F, T = torch.nn.functional, torch.Tensor
    table = {}
    for f in (torch.matmul, T.matmul, T.__matmul__, torch.linalg.matmul, torch.mm, T.mm, torch.bmm, T.bmm,
              torch.mv, T.mv, torch.dot, T.dot, torch.vdot, T.vdot, torch.sparse.mm, torch.smm, T.smm):
        table[f] = (lambda a, b, *_, **__: _matmul_flops(a, b), (0, 1))
    table[T.__rmatmul__] = (lambda b, a, *_, **__: _matmul_flops(a, b), (0, 1))
    for f in (torch.addmm, T.addmm, torch.baddbmm, T.baddbmm, torch.addbmm, T.addbmm, torch.addmv, T.addmv,
              torch.sparse.addmm):
        table[f] = (lambda _, a, b, *__, **___: _matmul_flops(a, b), (1, 2))
    outputs = lambda weight: weight.shape[0] if weight.dim() > 1 else 1   # noqa: E731
    table[F.linear] = (lambda input, weight, *_, **__: 2.0 * input.numel() * outputs(weight), (0, 1))
    table[F.scaled_dot_product_attention] = (_sdpa_flops, (0, 1, 2))
    for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):   # each input value meets a kernel slice
        table[f] = (lambda input, weight, *_, **__: 2.0 * input.numel() * weight[0].numel(), (0, 1))
    for f in (T.addmm_, T.baddbmm_, T.addbmm_, T.addmv_):   # in place: the same product
        table[f] = table[getattr(T, f.__name__.rstrip("_"))]
    table[torch.inner] = (lambda a, b, *_, **__: 2.0 * a.numel() * max(b.numel() // max(b.shape[-1], 1), 1)
                          if a.dim() and b.dim() else 2.0, (0, 1))
    table[torch.linalg.vecdot] = (lambda x, y, *_, **__: 2.0 * math.prod(torch.broadcast_shapes(x.shape, y.shape)), (0, 1))
    table[torch.cdist] = (_cdist_flops, (0, 1))
    table[F.bilinear] = (lambda x1, x2, weight, *_, **__: 2.0 * x1.numel() * weight.shape[0] * x2.shape[-1], (0, 1, 2))
    # Products written as one call over broadcast shapes: a similarity search over a data store
    # (`F.cosine_similarity(queries[:, None], store[None], dim=-1)`) was free before.
    table[F.cosine_similarity] = (lambda x1, x2, *_, **__: 2.0 * math.prod(torch.broadcast_shapes(x1.shape, x2.shape)),
                                  (0, 1))
    table[F.pdist] = (lambda x, *_, **__: float(x.shape[0] * (x.shape[0] - 1) * x.shape[1]), (0,))   # half of cdist's
    for f in (torch.cov, T.cov, torch.corrcoef, T.corrcoef):   # the centred rows times their transpose
        table[f] = (lambda x, *_, **__: 2.0 * (x.shape[0] if x.dim() > 1 else 1) ** 2 * x.shape[-1], (0,))
    for f in _RECURRENT_CALLS:
        table[f] = (_recurrent_call_flops, None)
    table.update(_fourier_transforms())
    # Functions written in Python around products: the watch sees only the outer call (its own
    # calls run with the watch set aside), so torch's counter prices the whole on meta copies.
    for f in (F.conv1d, F.conv2d, F.conv3d, torch.einsum, torch.tensordot, torch.linalg.multi_dot,
              torch.chain_matmul, F.multi_head_attention_forward, torch.linalg.matrix_power, torch.matrix_power,
              T.matrix_power, torch.svd_lowrank, torch.pca_lowrank):
        table[f] = (_ON_META, None)
    table.update(_decompositions())
    table.update(_aten_products())
    return table


def _aten_products() -> dict:
    """The same products called by hand as aten operators (`torch.ops.aten.mm(a, b)`), which the
    watch sees under their own names: priced by torch's counter on meta copies, which counts the
    products a composite operator (`aten.matmul`, `aten.einsum`) breaks into; `mv`, `dot` and the
    CPU's fused attention, which that counter prices at 0, by the rules above.  Every overload of
    each (`aten.mm.default`, `aten.mm.out`) is priced alike.  Before, each cost 0."""
    aten = torch.ops.aten
    rules = {packet: (_ON_META, None) for packet in (
        aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.addbmm, aten.matmul, aten.linear, aten.einsum,
        aten.tensordot, aten.bilinear, aten.convolution, aten._convolution, aten.conv1d, aten.conv2d, aten.conv3d,
        aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d, aten.scaled_dot_product_attention)}
    for packet in (aten.mv, aten.dot, aten.vdot):
        rules[packet] = (lambda a, b, *_, **__: _matmul_flops(a, b), (0, 1))
    rules[aten.addmv] = (lambda _, a, b, *__, **___: _matmul_flops(a, b), (1, 2))
    rules[aten._scaled_dot_product_flash_attention_for_cpu] = (_sdpa_flops, (0, 1, 2))
    table = {}
    for packet, rule in rules.items():
        table[packet] = rule
        for overload in packet.overloads():
            table[getattr(packet, overload)] = rule
    return table


def _cdist_flops(x1, x2, *_, **__) -> float:
    """`torch.cdist`: every pair of rows, a difference, a power and a sum over the features: priced
    as the product of the same shapes (2 per pair and feature)."""
    batch = math.prod(torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2]))
    return 2.0 * batch * x1.shape[-2] * x2.shape[-2] * x1.shape[-1]


def _decompositions() -> dict:
    """Dense linear algebra, at the leading terms of the textbook operation counts (Golub and Van
    Loan, Matrix Computations, 4th ed.; a multiply-add is 2 FLOPs) for an m x n matrix, m >= n (a
    wide one is counted as its transpose), times its batch.  torch's counter prices none of these
    (0 FLOPs for an SVD), and a method could otherwise decompose large matrices for free.  The
    backward is charged once more when the matrix learns."""
    L, T = torch.linalg, torch.Tensor

    def priced(count):   # count(long side m, short side n, right-hand columns k, the call's kwargs)
        def price(A, B=None, *_, **kwargs):
            m, n = max(A.shape[-2:]), min(A.shape[-2:])
            batch = A.numel() // max(A.shape[-2] * A.shape[-1], 1)
            k = (B.shape[-1] if B.dim() == A.dim() else 1) if isinstance(B, torch.Tensor) else 0
            return float(batch * count(m, n, k, kwargs))
        return price

    spectral = lambda m, n, k, kw: 4 * m * n * n - 4 * n ** 3 / 3   # noqa: E731  (the singular values)
    inverse = lambda m, n, k, kw: 2 * n ** 3   # noqa: E731
    svd = lambda m, n, k, kw: (4 * m * m * n + 8 * m * n * n + 9 * n ** 3 if kw.get("full_matrices", True)   # noqa: E731
                               else 14 * m * n * n + 8 * n ** 3)
    counts = {
        (L.cholesky, L.cholesky_ex, torch.cholesky, T.cholesky): lambda m, n, k, kw: n ** 3 / 3,
        (L.lu_factor, L.lu_factor_ex, L.lu, L.det, torch.det, T.det, L.slogdet, torch.slogdet, T.slogdet,
         torch.logdet, T.logdet): lambda m, n, k, kw: m * n * n - n ** 3 / 3,
        (L.solve, L.solve_ex): lambda m, n, k, kw: 2 * n ** 3 / 3 + 2 * n * n * k,
        (L.solve_triangular,): lambda m, n, k, kw: n * n * k,
        (L.inv, L.inv_ex, torch.inverse, T.inverse): inverse,
        (L.qr, torch.qr, T.qr): lambda m, n, k, kw: 4 * m * n * n - 4 * n ** 3 / 3,
        (L.lstsq,): lambda m, n, k, kw: 2 * m * n * n - 2 * n ** 3 / 3 + 4 * m * n * k,
        (L.eigh,): lambda m, n, k, kw: 9 * n ** 3,
        (L.eigvalsh,): lambda m, n, k, kw: 4 * n ** 3 / 3,
        (L.eig,): lambda m, n, k, kw: 25 * n ** 3,
        (L.eigvals,): lambda m, n, k, kw: 10 * n ** 3,
        (L.svd,): svd,
        (torch.svd, T.svd): lambda m, n, k, kw: svd(m, n, k, {"full_matrices": not kw.get("some", True)}),
        (L.svdvals, L.matrix_rank): spectral,
        (L.pinv, torch.pinverse, T.pinverse): lambda m, n, k, kw: 14 * m * n * n + 8 * n ** 3,
    }
    table = {f: (priced(count), (0,)) for functions, count in counts.items() for f in functions}

    def norm_price(spectral_orders):   # a spectral or nuclear norm is the sum or the end of an SVD's values
        def price(A, ord=None, dim=None, *_, **kwargs):
            ord, dim = kwargs.get("p", kwargs.get("ord", ord)), kwargs.get("dim", dim)
            if A.dim() < 2 or ord not in spectral_orders or isinstance(dim, int) or (dim is not None and len(dim) != 2):
                return 0.0   # a vector or entry-wise norm (Frobenius included): element-wise work
            return priced(spectral)(A)
        return price
    for f in (L.matrix_norm, L.norm):
        table[f] = (norm_price((2, -2, "nuc")), (0,))
    for f in (torch.norm, T.norm):   # its p=2 is the entries' vector norm; only "nuc" is a matrix norm
        table[f] = (norm_price(("nuc",)), (0,))
    table[L.cond] = (lambda A, p=None, *_, **__: priced(spectral)(A) if p in (None, 2, -2, "nuc")
                     else priced(inverse)(A), (0,))

    def exponential_price(A, *_, **__):
        """torch's matrix exponential: a Taylor polynomial of degree up to 18 in at most 6
        products, then one squaring per halving of the matrix needed to bring its 1-norm under
        3.01 (the degree-18 bound), so the price reads that norm (O(n^2)) first."""
        n = A.shape[-1]
        norm = float(A.detach().abs().sum(dim=-2).amax()) if A.numel() else 0.0
        squarings = max(0, math.ceil(math.log2(norm / 3.01))) if norm > 3.01 else 0
        return float(A.numel() // max(n * n, 1)) * (6 + squarings) * 2.0 * n ** 3
    for f in (L.matrix_exp, torch.matrix_exp, T.matrix_exp):
        table[f] = (exponential_price, (0,))

    # Solves with a factor made before (by a call priced above): two triangular solves, n^2 k each
    # for k right-hand columns; an inverse from a Cholesky factor, L^-1 then its product.
    def factor_solve(factor, B):
        n, k = factor.shape[-1], B.shape[-1] if B.dim() > 1 else 1
        return 2.0 * n * n * k * (B.numel() // max(B.shape[-2] * k, 1) if B.dim() > 1 else 1)
    for f in (torch.cholesky_solve, T.cholesky_solve):
        table[f] = (lambda B, factor, *_, **__: factor_solve(factor, B), (0, 1))
    table[L.lu_solve] = (lambda LU, pivots, B, *_, **__: factor_solve(LU, B), (0, 2))
    for f in (torch.cholesky_inverse, T.cholesky_inverse):
        table[f] = (lambda factor, *_, **__: float(factor.numel() // max(factor.shape[-1] ** 2, 1))
                    * 2 * factor.shape[-1] ** 3 / 3, (0,))
    return table


def _fourier_transforms() -> dict:
    """The FFT family at the textbook count of a radix-2 transform, 5 N log2 N FLOPs for N complex
    points, half that when the input or output is real (`rfft`, `irfft`, `hfft`, ...), times the
    transforms the batch holds; `stft` and `istft` at one transform per frame.  torch's counter
    prices them at 0."""
    ft = torch.fft

    def price(dims_given: int | None, real: bool):   # dims_given: 1 (fft), 2 (fft2), None (fftn: all)
        def fft_price(input, size=None, dim=None, *_, **kwargs):
            size = kwargs.get("n", kwargs.get("s", size))
            if dim is None:
                dim = -1 if dims_given == 1 else ((-2, -1) if dims_given == 2 else tuple(range(input.dim())))
            dims = (dim,) if isinstance(dim, int) else tuple(dim)
            if size is None:
                lengths = [input.shape[d] for d in dims]
            else:
                lengths = [size] if isinstance(size, int) else [s_ if s_ != -1 else input.shape[d] for s_, d in zip(size, dims)]
            points = math.prod(lengths)
            transforms = input.numel() // max(math.prod(input.shape[d] for d in dims), 1)
            return (2.5 if real else 5.0) * transforms * points * math.log2(max(points, 2))
        return fft_price
    table = {}
    for names, dims in ((("fft", "ifft", "rfft", "irfft", "hfft", "ihfft"), 1),
                        (("fft2", "ifft2", "rfft2", "irfft2", "hfft2", "ihfft2"), 2),
                        (("fftn", "ifftn", "rfftn", "irfftn", "hfftn", "ihfftn"), None)):
        for name in names:
            table[getattr(ft, name)] = (price(dims, real="r" in name or "h" in name), (0,))

    def frames_price(input, n_fft, hop_length=None, win_length=None, window=None, center=True, pad_mode="reflect",
                     normalized=False, onesided=None, *_, **__):
        """`torch.stft`: one transform of n_fft points per frame, a frame every hop_length samples
        (n_fft // 4 by default), the signal padded by n_fft // 2 on each side when centred."""
        hop = hop_length or n_fft // 4
        length = input.shape[-1] + (2 * (n_fft // 2) if center else 0)
        frames = 1 + max(length - n_fft, 0) // hop
        real = not input.is_complex() and onesided is not False
        return (2.5 if real else 5.0) * (input.numel() // max(input.shape[-1], 1)) * frames * n_fft * math.log2(max(n_fft, 2))

    def inverse_frames_price(input, n_fft, *_, **__):   # `torch.istft`: one inverse per frame given
        frames, real = input.shape[-1], input.shape[-2] != n_fft   # a one-sided spectrum makes a real signal
        return ((2.5 if real else 5.0) * (input.numel() // max(input.shape[-1] * input.shape[-2], 1))
                * frames * n_fft * math.log2(max(n_fft, 2)))
    for f in (torch.stft, torch.Tensor.stft):
        table[f] = (frames_price, (0,))
    for f in (torch.istft, torch.Tensor.istft):
        table[f] = (inverse_frames_price, (0,))
    return table


_BARE_PRODUCTS = _bare_products()
_watches_on = 0      # bare-product watches entered now, in any thread
_task_meters: list["Meter"] = []   # the meters watching a task's work now (innermost last)


class _ThisThread(threading.local):
    """What the bare-product watches need to know about the thread they run in."""
    harness_depth = 0   # > 0 while the harness runs products it charges by the formula (`harness_products`);
    #                     per thread, so the harness's decoding does not hide a method thread's products
    task_watches = 0    # `watching_other_work` entered in this thread: its own watch charges here


_this_thread = _ThisThread()


@contextlib.contextmanager
def harness_products():
    """The harness's own tensor products that are charged another way (the fast decoder, by the
    model's formula through `charge_forward`) or are no method's (timing the CPU): the watch on
    bare products (`Meter.watching_other_work`) passes them by.

    Why torch function handling is switched off here rather than the watch returning early: the
    mode's Python call on every operation is the cost, not its work.  Measured (`python
    benchmarks/meter_overhead.py`, one thread, median of 3): 100 fast-decoder steps of 8 rows took
    1.84 s unwatched and 1.97 s with the watch returning early; switched off, 1.80 and 1.79 s."""
    _this_thread.harness_depth += 1
    try:
        with torch._C.DisableTorchFunction() if _watches_on else contextlib.nullcontext():
            yield
    finally:
        _this_thread.harness_depth -= 1


def _operands(func, args, kwargs) -> list:
    """The tensors a product multiplies, in the order its backward rule reads them."""
    if func is torch.einsum:
        return list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if func is torch.linalg.multi_dot:
        return list(args[0])
    if func in _RECURRENT_CALLS:
        try:
            call = _RecurrentCall.read(*args, **kwargs)
            return [call.input, *call.states, *call.matrices]
        except (TypeError, ValueError, IndexError, AttributeError):   # a call these rules cannot read: priced as it runs
            pass
    return list(args) + list(kwargs.values())


def _run_counted(func, args, kwargs):
    """Run `func` under torch's own counter (`torch.utils.flop_counter`): (output, FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode   # heavy import, rarely needed
    counter = FlopCounterMode(display=False)
    with counter:
        output = func(*args, **kwargs)
    return output, float(counter.get_total_flops())


def _priced_on_meta(func, args, kwargs) -> float | None:
    """FLOPs of a product whose price its output shape (a convolution) or its contraction path
    (einsum, tensordot, multi_dot) decides: torch's counter run on meta copies of its arguments,
    which carry shapes and do no work.  None if it cannot run there."""
    def meta(x):
        if isinstance(x, torch.Tensor):
            return torch.empty_like(x, device="meta")
        return type(x)(meta(y) for y in x) if isinstance(x, (list, tuple)) else x
    try:
        return _run_counted(func, meta(args), {k: meta(v) for k, v in kwargs.items()})[1]
    except Exception:   # an argument meta tensors cannot stand for: counted as it runs instead
        return None


class _BareProductWatch(torch.overrides.TorchFunctionMode):
    """Charges the matrix products a method writes as bare tensor operations (`x @ w`,
    `F.linear`, `torch.einsum`, `F.conv2d`, `F.scaled_dot_product_attention`, ...) outside every
    module the meter already counts.  Element-wise work is not counted, as in the formula."""

    def __init__(self, meter: "Meter"):
        super().__init__()
        self._meter = meter

    def meter(self) -> "Meter | None":
        return self._meter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        priced = _BARE_PRODUCTS.get(func)
        meter = self.meter() if priced is not None else None
        if meter is None or meter._in_thread.counted_modules or _this_thread.harness_depth:
            return func(*args, **kwargs)
        price, grads = priced
        operands = _operands(func, args, kwargs)
        copies = max((vmapped_copies(x) for x in operands if isinstance(x, torch.Tensor)), default=1)
        if price is _ON_META:   # under vmap, counted as it runs: torch's counter sees the whole batch
            cost = _priced_on_meta(func, args, kwargs) if copies == 1 else None
        else:
            try:
                cost = price(*args, **kwargs) * copies
            except (TypeError, IndexError, AttributeError):   # arguments by name, or not tensors
                cost = None
        learning = _backward_share(func, args, kwargs, operands, grads) if torch.is_grad_enabled() else 0
        tangent = sum(tangents(x) for x in operands)   # forward-mode AD: the product again per tangent
        if cost is not None:   # before the work, as a module's is, with the backward it allows
            meter._refuse_past(cost * (1 + tangent + learning), f"a bare {getattr(func, '__name__', func)}")
            output = func(*args, **kwargs)
        else:   # known once it ran: the product after it is refused if this one spent the cap
            output, cost = _run_counted(func, args, kwargs)
        meter._charge(cost * (1 + tangent))
        out = output[0] if isinstance(output, tuple) and output else output   # a recurrent call: (outputs, states)
        if isinstance(out, torch.Tensor) and out.requires_grad and learning:
            out.register_hook(meter._backward_charger(cost * learning, out))
        return output


def _backward_share(func, args, kwargs, operands: list, grads) -> float:
    """How many forward costs a product's backward takes: one per operand that learns; a recurrent
    call's, its backward's own count (`_recurrent_backward_flops`) over its forward's."""
    if func in _RECURRENT_CALLS:
        try:
            call = _RecurrentCall.read(*args, **kwargs)
            forward = call.forward_flops()
            return _recurrent_backward_flops(call) / forward if forward else 0.0
        except (TypeError, ValueError, IndexError, AttributeError):   # unreadable: both passes when anything learns
            return 2.0 if any(isinstance(x, torch.Tensor) and x.requires_grad for x in operands) else 0.0
    picked = operands if grads is None else [operands[i] for i in grads if i < len(operands)]
    learning = sum(isinstance(x, torch.Tensor) and x.requires_grad for x in picked)
    if learning and func is torch.nn.functional.scaled_dot_product_attention:
        return 2   # the formula's backward: twice the forward attention term
    return learning


class _WatchInStartedThread(_BareProductWatch):
    """The watch on bare products in a thread started in this process after
    `watch_threads_started_from_now`: it charges the task being watched when the product runs
    (none between tasks), so a pool made once in a method's `setup` charges each task its own."""

    def __init__(self):
        super().__init__(None)

    def meter(self) -> "Meter | None":
        if _this_thread.task_watches:   # a task run from this thread: its own watch charges it
            return None
        return _task_meters[-1] if _task_meters else None


_unwatched_bootstrap = None   # `threading.Thread._bootstrap_inner` before the watch wrapped it


def watch_threads_started_from_now() -> None:
    """Enter the bare-product watch in every Python thread this process starts from now on.

    Why: a torch function mode holds only in the thread that entered it, so a method's products
    in a thread of its own (`ThreadPoolExecutor.submit(torch.matmul, ...)`) ran uncharged.  Module
    hooks are global and needed no help.  Why wrap the thread's start rather than its `run`: a
    subclass's `run` replaces `Thread.run`, and `threading.setprofile` would take the place of a
    user's profiler.  A thread already running when this is called stays unwatched, so the
    harness calls it before a method's `setup`.  Idempotent."""
    global _unwatched_bootstrap
    if _unwatched_bootstrap is not None:
        return
    _unwatched_bootstrap = threading.Thread._bootstrap_inner

    def bootstrap_watched(thread):
        with _WatchInStartedThread():
            _unwatched_bootstrap(thread)

    threading.Thread._bootstrap_inner = bootstrap_watched


def _parameter_key(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, trainable parameters) of `module` and everything inside it: what changes when
    an adapter is attached, merged or removed, or weights are frozen.  Every decode step asks for
    it (`charge_forward`), so it walks `_modules` rather than calling `module.parameters()`: 171
    against 601 microseconds for the embedded model with a LoRA (259 modules, timed over 2,000
    calls); with `parameters()` the shape lookups took 16% of the time in a cProfile of
    `tta run --method ttt_lora --limit 5`."""
    count = trainable = 0
    stack = [module]
    while stack:
        part = stack.pop()
        for p in part._parameters.values():
            if p is not None:
                count += 1
                trainable += p.requires_grad
        stack.extend(m for m in part._modules.values() if m is not None)
    return count, trainable


class _ForwardInProgress(threading.local):
    """A meter's state for the forward under way in one thread."""

    def __init__(self):
        self.call: _Call | None = None
        self.last_call: _Call | None = None
        self.counted_modules: list = []


class Meter:
    """Counts FLOPs, seconds and peak memory for the task at hand.  Owned by the harness."""

    def __init__(self, budget: Budget | None = None, on_progress=None):
        self.budget = budget or Budget()
        self.on_progress = on_progress   # called with the share of the cap spent, at most twice a second
        self._last_progress = 0.0
        self.flops = 0.0
        self.uncharged_flops = 0.0   # evaluation-only compute (graded metrics), recorded apart
        self.refusals = 0            # times a method asked for more than the cap allowed
        self.out_of_work: str | None = None
        self._charging = True
        self._started = time.perf_counter()
        self._cpu_started = cpu_seconds()
        # The forward under way is per thread: two threads running the model at once each read
        # their own call's tokens.  Shared, a forward of 8 tokens and one of 200 in two threads were
        # charged 6% less than the same forwards one after another (2.602e9 against 2.778e9).
        self._in_thread = _ForwardInProgress()
        self._charge_lock = threading.Lock()     # charges may come from several threads at once
        self._handles = []
        self._decoders = []   # the decoders it is attached to (see `charge_forward`)
        self._models = []     # the models they belong to, one per decoder
        self._detached = False   # hooked models once, no more (see `_payer`)
        self._shapes: dict[int, tuple[tuple, object]] = {}   # module id -> (parameter key, count)
        self._marked: dict[int, tuple[tuple, object]] = {}   # the same for `_mark_parts`

    # ---- attaching to models
    def attach(self, model: torch.nn.Module) -> None:
        """Charge every forward (and backward) that runs through `model`'s layers and head."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if decoder is None or layers is None:
            raise ValueError(f"cannot meter {type(model).__name__}: no decoder with .layers")
        width = attention_width(model.config)
        head = model.get_output_embeddings()
        # always_call: a decoder forward that raised must not leave its call behind for the layers
        # a method runs by hand afterwards to be priced by
        self._handles += [decoder.register_forward_pre_hook(self._decoder_hook(width, head), with_kwargs=True),
                          decoder.register_forward_hook(self._after_decoder, always_call=True)]
        for layer in layers:
            self._handles += [layer.register_forward_pre_hook(self._layer_pre_hook(width), with_kwargs=True),
                              layer.register_forward_hook(self._layer_hook(width), with_kwargs=True)]
        if head is not None:
            self._handles += [head.register_forward_pre_hook(self._before_head),
                              head.register_forward_hook(self._on_head)]
        _METERS_OF.setdefault(decoder, []).append(self)
        self._decoders.append(decoder)
        self._models.append(model)
        _mark(model, True)
        if self not in Meter._attached:   # once, however many models it hooks
            Meter._attached.append(self)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for decoder, model in zip(self._decoders, self._models):
            meters = _METERS_OF.get(decoder, [])
            if self in meters:
                meters.remove(self)
            if not meters:   # no meter hooks it now: its work is the next task's to find
                _mark(model, False)
        self._decoders, self._models = [], []
        self._detached = True
        if self in Meter._attached:
            Meter._attached.remove(self)

    # ---- work outside the hooked models
    @contextlib.contextmanager
    def watching_other_work(self):
        """While a task runs, charge work that runs through torch modules this meter has not
        hooked: a second model the method loads or builds (from the run's weights or another's),
        or a network of its own, and the matrix products it writes as bare tensor operations.  A
        transformers decoder (a model with `get_decoder().layers`) is hooked on its first forward
        like the run's model, by the same formula, and its forwards meet the cap the same way;
        any other module is charged at its matrix products (`module_flops`), forward and, when one
        flows, backward; and a product outside every counted module (`x @ w`, `F.linear`,
        `torch.einsum`, `F.conv2d`, `F.scaled_dot_product_attention`, ...) is charged by a torch
        function mode (`_BareProductWatch`), refused like a module when its price, known from its
        arguments' shapes, would pass the cap.

        Why module hooks and a torch function mode that prices a few products, rather than
        `torch.utils.flop_counter.FlopCounterMode`, which sees every operation: that mode runs
        Python on every aten operation of the run's model too.  Measured (`python
        benchmarks/meter_overhead.py`, one thread, median of 3, 2026-12-03): 100 decode steps of
        8 rows through the embedded model's modules took 1.24 s plain, 1.41 s watched, 2.88 s
        under FlopCounterMode; 5 training steps 2.85, 2.87 and 3.34 s; 100 steps of the
        harness's fast decoder, which runs no modules and whose products the watch passes by
        (`harness_products`), 0.86, 0.85 and 2.10 s.

        Threads: module hooks hold in every thread; the bare-product watch holds in this thread and
        in every thread started after the first watch or the run's setup
        (`watch_threads_started_from_now`), where it charges whichever task is being watched."""
        hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._before_other),
                 torch.nn.modules.module.register_module_forward_hook(self._after_other, with_kwargs=True, always_call=True)]
        self._in_thread.counted_modules = []
        watch_threads_started_from_now()
        global _watches_on
        _watches_on += 1
        _task_meters.append(self)
        _this_thread.task_watches += 1
        try:
            with _BareProductWatch(self):
                yield
        finally:
            _this_thread.task_watches -= 1
            _task_meters.remove(self)
            _watches_on -= 1
            for hook in hooks:
                hook.remove()
            self._in_thread.counted_modules = []

    def _before_other(self, module, args):
        """Refuse a counted module's forward past the cap; note the modules running now whose
        work is counted (`_ForwardInProgress.counted_modules`), so the bare-product watch passes their insides by."""
        if isinstance(module, torch.jit.ScriptModule):
            raise UncountedWork(f"a TorchScript module ({type(module).__name__}) runs work the harness cannot count; "
                                "run the network as an ordinary module (torch.compile is counted)")
        if module.__dict__.get(_METERED) or self._hooked_on_first_forward(module):
            self._in_thread.counted_modules.append(module)
            return
        if not counted_as_a_module(module):
            return
        cost = module_flops(module, args)   # 0 for a convolution until it ran: refused once the cap is spent
        x = args[0] if args else None
        allowed = cost * (1 + tangents(x, module))
        if torch.is_grad_enabled():   # with the backward it allows, as `_after_other` would charge it
            if _learns(module) or (isinstance(x, torch.Tensor) and x.requires_grad):
                allowed += cost * _backward_passes(module, x)
        self._refuse_past(allowed, f"a forward of {type(module).__name__}")
        self._in_thread.counted_modules.append(module)

    def _passes_cap(self, cost: float = 0.0) -> bool:
        """Whether `cost` more FLOPs would take the spend past the FLOP cap (never while measuring,
        `uncharged`).  The slack: float rounding of a method's own pricing."""
        cap = self.budget.flops
        return cap is not None and self._charging and self.flops + cost > cap * (1 + 1e-9)

    def _refuse_past(self, cost: float, what: str) -> None:
        if self._passes_cap(cost):
            self.refusals += 1
            raise BudgetExceeded(f"{what} costing {cost:.3g} FLOPs with {self.flops:.3g} of the task's "
                                 f"{self.budget.flops:.3g}-FLOP cap spent would pass the cap")

    def _hooked_on_first_forward(self, module) -> bool:
        """Whether `module` is a transformers decoder model, now hooked as the run's model is (or
        a wrapper, such as peft's, around one already hooked).  When the call is to the bare
        decoder itself, its own pre-hook misses this first forward (torch read its hooks before
        this one ran), and its layers then charge every position given, padding included."""
        decoder = _hookable_decoder(module)
        if decoder is None:
            return False
        if decoder.__dict__.get(_METERED):
            return True
        try:
            self.attach(module)
            return True
        except Exception:   # a config the formula cannot read (attach fails before it hooks anything)
            module.__dict__[_NO_DECODER] = True   # charged part by part instead
            return False

    def _after_other(self, module, args, *kwargs_and_output):
        # (kwargs, output) after a forward; torch calls a global hook with (output) alone after a
        # forward that raised, where this hook must still close the module's counting
        kwargs, output = kwargs_and_output if len(kwargs_and_output) == 2 else ({}, kwargs_and_output[0])
        if self._in_thread.counted_modules and self._in_thread.counted_modules[-1] is module:   # also after an exception
            self._in_thread.counted_modules.pop()
        if module.__dict__.get(_METERED) or output is None or not counted_as_a_module(module):
            return
        args = _positional(module, args, kwargs)
        cost = module_flops(module, args, output)
        if not cost:
            return
        self._charge(cost * (1 + tangents(args[0] if args else None, module)))
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._backward_charger(cost * _backward_passes(module, args[0] if args else None), out))

    # ---- copies of a metered model
    # Meters attached now, in this process (the latest last): where the hooks of a model copied in
    # an earlier task, and kept, send their charges.
    _attached: "list[Meter]" = []

    def __deepcopy__(self, memo):
        """`copy.deepcopy(model)` copies the model's hooks, and with them every object they are
        bound to.  A copied meter would count the copy's work where nobody reads it; so a copy
        keeps charging this meter (and a method that trains a copy pays for it)."""
        return self

    def _payer(self) -> "Meter":
        """The meter that pays for work through this meter's hooks: itself while attached; once
        detached (a copy of the model kept past its task), the meter attached now, if any."""
        if self._handles or not self._detached or not Meter._attached:
            return self
        return Meter._attached[-1]

    def _recounted(self, module: torch.nn.Module, count, cache: dict | None = None):
        """`count(module)`, recomputed only when the module's parameters change (an adapter
        attached or removed, weights frozen or unfrozen): a forward hook must stay cheap."""
        cache = self._shapes if cache is None else cache
        with harness_products():   # reading `requires_grad` would call the bare-product watch
            key = _parameter_key(module)
        cached = cache.get(id(module))
        if cached is None or cached[0] != key:
            cached = (key, count(module))
            cache[id(module)] = cached
        return cached[1]

    def _mark_parts(self, module: torch.nn.Module, args=None) -> None:
        """Mark every part of a hooked decoder, layer or head as metered, again whenever its
        parameters change: the linear maps of an adapter injected after `attach` run inside a
        hooked layer, which charges them, so the watch on other modules must pass them by."""
        self._recounted(module, lambda m: _mark(m, True), self._marked)

    def shape(self, model: torch.nn.Module) -> ModelShape:
        """The model's shape (see `model_shape`), kept while its parameters stay the same."""
        return self._recounted(model, model_shape)

    # ---- the hooks
    def _decoder_hook(self, width: int, head: torch.nn.Module | None):
        def on_decoder(module, args, kwargs):
            self._mark_parts(module, args)
            call = self._real_tokens(args, kwargs)
            ids = kwargs.get("input_ids", args[0] if args else None)
            copies = vmapped_copies(ids if ids is not None else kwargs.get("inputs_embeds"))
            if copies > 1:   # one example's call under torch.func.vmap: the others run with it
                call = _Call(call.new_mask, call.tokens * copies, call.context * copies, call.new_per_row)
            self._payer()._refuse_past_cap(module, call, width, head, kwargs.get("inputs_embeds"))   # raises before it runs
            self._in_thread.call = call
        return on_decoder

    def _refuse_past_cap(self, decoder, call: _Call, width: int, head: torch.nn.Module | None,
                         embeds: torch.Tensor | None = None) -> None:
        """Raise `BudgetExceeded` before a forward whose decoder layers would take the spend past the
        FLOP cap: the cap holds whether or not a method asks.  In inference the output head may run
        on fewer positions (`logits_to_keep`), so it is priced apart, before it runs
        (`_before_head`); a training forward's price includes it on every position, with the
        backward.  Measurement (`uncharged`) is never refused."""
        cap = self.budget.flops
        if cap is None or not self._charging:
            return
        weights, trainable = self._recounted(decoder, lambda d: tuple(map(sum, zip(*(linear_weights(layer)
                                                                                      for layer in d.layers)))))
        attention = attention_flops(len(decoder.layers), width, call.context)
        cost = 2.0 * weights * call.tokens + attention + self._decoder_tangents(decoder, call, width, embeds)
        # With gradients on and weights that learn, a backward can follow, and it cannot be
        # stopped half way: the forward is admitted only if its backward fits too.  Priced on the
        # forward alone, a plugin's training step (transformers' Trainer) ended at 121% of the cap.
        backward = (2.0 * (weights + trainable) * call.tokens + 2 * attention
                    if trainable and torch.is_grad_enabled() else 0.0)
        if backward and head is not None:   # a training forward: the head's logits, and their backward, come with it
            backward += sum(_head_costs(head, call.tokens))
        if self._passes_cap(cost + backward):
            self.refusals += 1   # the cap cut the method's work, as a refused `can_afford` does
            with_backward = (f" (and {backward:.3g} for the head and the backward they allow: gradients are on and weights "
                             "learn; under torch.no_grad() only the forward is priced)") if backward else ""
            raise BudgetExceeded(
                f"a forward of {cost:.3g} FLOPs{with_backward} with {self.flops:.3g} of the task's {cap:.3g}-FLOP "
                "cap spent would pass the cap; ask budget.can_afford(flops) before calling the model, or catch "
                "tta.budget.BudgetExceeded and answer with what you have")

    def _decoder_tangents(self, decoder, call: _Call, width: int, embeds) -> float:
        """The tangents' work in a forward under forward-mode AD, layer by layer as the layers'
        hooks charge it: a tangent on the input embeddings flows through every layer, and one on a
        layer's weights joins it there and flows on (0 outside forward-mode AD)."""
        if not _forward_ad_on():
            return 0.0
        flowing, total = tangents(embeds), 0.0   # the tangent copies the hidden states carry
        for layer in decoder.layers:
            own = tangent_parts(module=layer)[1]
            total += _tangent_costs((flowing, own), self._recounted(layer, linear_weights)[0], call.tokens,
                                    attention_flops(1, width, call.context))
            flowing = max(flowing, own)
        return total   # the head's are priced with its own forward (`_before_head`)

    @staticmethod
    def _real_tokens(args, kwargs) -> _Call:
        """The real (not padding) tokens of a decoder call, and the positions they attend to."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        batch, length = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        rows = getattr(mask, "tta_rows", None)
        if rows is not None and len(rows[0]) == batch:
            new = [min(max(int(n), 0), length) for n in rows[0]]
            return _Call(None, sum(new), sum(n * int(p) + n * (n + 1) // 2 for n, p in zip(new, rows[1])), new)
        if mask is None or mask.dim() != 2:
            return _Call(None, batch * length, batch * attention_context(0, length))
        mask = mask.detach().to("cpu", torch.int64)
        new_mask = mask[:, -length:]
        new = new_mask.sum(dim=1)
        past = mask.sum(dim=1) - new
        return _Call(new_mask, int(new.sum()), int((new * past + new * (new + 1) // 2).sum()))

    def _after_decoder(self, module, args, output):
        self._in_thread.last_call, self._in_thread.call = self._in_thread.call, None   # the head, which runs next, reads it

    def _layer_positions(self, hidden: torch.Tensor) -> tuple[int, int]:
        """Tokens a decoder layer computes, and the positions they attend to: its decoder's real
        tokens, or every position when the layer is called outside its decoder."""
        if self._in_thread.call is not None:
            return self._in_thread.call.tokens, self._in_thread.call.context
        copies = vmapped_copies(hidden)
        return (copies * hidden.shape[0] * hidden.shape[1],
                copies * hidden.shape[0] * attention_context(0, hidden.shape[1]))

    def _layer_costs(self, layer, width: int, hidden: torch.Tensor) -> tuple[float, float, int]:
        """One decoder layer's forward FLOPs on `hidden` (with the tangents forward-mode AD carries
        through it), its backward's, and its weights that learn."""
        tokens, context = self._layer_positions(hidden)
        weights, trainable = self._recounted(layer, linear_weights)
        attention = attention_flops(1, width, context)
        forward = 2.0 * weights * tokens + attention
        return (forward + _tangent_costs(tangent_parts(hidden, layer), weights, tokens, attention),
                2.0 * (weights + trainable) * tokens + 2 * attention, trainable)

    def _layer_pre_hook(self, width: int):
        def before_layer(layer, args, kwargs):
            """Refuse a decoder layer called by hand (early exit, layer skipping, a logit lens)
            whose forward, with the backward it allows, would pass the cap.  Inside its decoder a
            layer was priced with the whole forward.  Before, such calls were charged and never
            refused: a plugin looping over the first layer spent 222x its cap and its task passed."""
            self._mark_parts(layer)
            hidden = args[0] if args else kwargs.get("hidden_states")
            if self._in_thread.call is not None or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                return
            forward, backward, trainable = self._layer_costs(layer, width, hidden)
            learning = torch.is_grad_enabled() and (trainable or hidden.requires_grad)
            self._payer()._refuse_past(forward + backward * learning,
                                       "a decoder layer's forward (with the backward it allows), called by hand,")
        return before_layer

    def _layer_hook(self, width: int):
        def hook(layer, args, kwargs, output):
            forward, backward, _ = self._layer_costs(layer, width, args[0] if args else kwargs["hidden_states"])
            self._charge(forward)
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(self._backward_charger(backward, out))
        return hook

    def _head_tokens(self, logits_shape: torch.Size) -> int:
        """Positions the head computes logits for: the real (not padding) tokens of the decoder
        call that just ran, or every row given when that call is not known."""
        rows = logits_shape[0] * logits_shape[1] if len(logits_shape) == 3 else logits_shape[0]
        call = self._in_thread.last_call
        if call is not None and call.new_per_row is not None and len(logits_shape) == 3 and logits_shape[0] == len(call.new_per_row):
            return sum(min(n, logits_shape[1]) for n in call.new_per_row)   # the last `kept` positions
        if (call is not None and call.new_mask is not None and len(logits_shape) == 3
                and logits_shape[0] == call.new_mask.shape[0] and logits_shape[1] <= call.new_mask.shape[1]):
            kept = logits_shape[1]   # logits_to_keep: the head ran on the last `kept` positions
            return int(call.new_mask[:, -kept:].sum())
        return rows

    def _before_head(self, head, args):
        """Refuse the head's forward (with the backward it allows) when it would pass the cap.
        The decoder's refusal leaves the head out; with the embedded model's 16-token vocabulary
        that is 0.1% of a forward, but with a general LLM's (49,152 x 576 for SmolLM-135M, by its
        config) the head is a fifth of it, and one call could pass the cap by that much."""
        self._mark_parts(head)
        cap, hidden = self._payer().budget.flops, args[0] if args else None
        if cap is None or not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
            return
        forward, backward = _head_costs(head, self._head_tokens(hidden.shape) * vmapped_copies(hidden))
        learning = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
        self._payer()._refuse_past(forward * (1 + tangents(hidden, head)) + backward * learning,
                                   "the output head's forward (with the backward it allows)")

    def _on_head(self, head, args, output):
        forward, backward = _head_costs(head, self._head_tokens(output.shape) * vmapped_copies(output))
        self._charge(forward * (1 + tangents(args[0] if args else None, head)))
        if output.requires_grad:
            output.register_hook(self._backward_charger(backward, output))

    def _backward_charger(self, flops: float, output: torch.Tensor):
        """Charge `flops` when the backward reaches `output`, times the cotangents it carries beyond
        the output's own batch: `torch.func.jacrev` (or `vmap` over `vjp`) runs one backward per
        output element at once, and was charged as one backward."""
        copies = vmapped_copies(output)

        def charge_backward(grad):
            self._charge(flops * max(1.0, vmapped_copies(grad) / copies))
        return charge_backward

    def _charge(self, flops: float) -> None:
        payer = self._payer()
        if payer is not self:
            return payer._charge(flops)
        if self._charging:
            with self._charge_lock:
                self.flops += flops
            if self.on_progress is not None and time.perf_counter() - self._last_progress > 0.5:
                self._last_progress = time.perf_counter()
                self.on_progress(self.progress())
        else:
            with self._charge_lock:
                self.uncharged_flops += flops

    def progress(self) -> float | None:
        """Share of the cap spent so far: FLOPs, or seconds under a seconds cap (None: no cap)."""
        if self.budget.flops:
            return min(1.0, self.flops / self.budget.flops)
        if self.budget.seconds:
            return min(1.0, self.seconds / self.budget.seconds)
        return None

    @contextlib.contextmanager
    def uncharged(self):
        """Compute that is measurement, not method (the teacher-forced NLL of the true answer).
        The harness's own use only: methods never see the meter."""
        previous, self._charging = self._charging, False
        try:
            yield
        finally:
            self._charging = previous

    # ---- the cap
    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._started

    def remaining_flops(self) -> float:
        return float("inf") if self.budget.flops is None else self.budget.flops - self.flops

    def can_afford(self, flops: float = 0.0, keep_flops: float = 0.0, keep_share: float = 0.0) -> bool:
        """Whether `flops` more fit, keeping `keep_flops` FLOPs and `keep_share` of a seconds
        cap for later; a no is remembered (the cap cut the method's work)."""
        seconds_cap = self.budget.seconds
        fits = flops + keep_flops <= self.remaining_flops() and not (
            seconds_cap is not None and self.seconds >= (1 - keep_share) * seconds_cap)
        if not fits:
            self.refusals += 1
        return fits

    def fail_if_past_cap(self) -> None:
        """Raise `BudgetExceeded` if the task's spend has passed its FLOP cap.  Work is refused
        before it runs wherever its price is known beforehand; this catches what is charged only
        after it ran (`budget.charge`, a convolution's first call), so no task is recorded as
        solved with more than its cap."""
        if self._passes_cap():
            raise BudgetExceeded(f"the task spent {self.flops:.3g} FLOPs, past its {self.budget.flops:.3g}-FLOP cap, on work charged "
                                 "after it ran; ask budget.can_afford(flops) before such work")

    def spent_cap(self) -> bool:
        if self.budget.seconds is not None and self.seconds >= self.budget.seconds:
            return True
        return self.budget.flops is not None and self.flops >= self.budget.flops

    def stopped_by_budget(self) -> bool:
        return self.refusals > 0 or self.spent_cap()

    def handle(self, model: torch.nn.Module | None = None) -> "TaskBudget":
        return TaskBudget(self, model)

    def summary(self) -> dict:
        share = None if not self.budget.flops else round(self.flops / self.budget.flops, 4)
        return {"flops": self.flops, "eval_flops": self.uncharged_flops, "seconds": round(self.seconds, 3),
                "cpu_seconds": round(cpu_seconds() - self._cpu_started, 3),
                "peak_memory_mb": peak_memory_mb(), "budget_share": share,
                "stopped_by_budget": self.stopped_by_budget(), "out_of_work": self.out_of_work}


class TaskBudget:
    """A method's view of its task's budget.

    Ask before spending: `can_afford(flops)` (a no is recorded as the cap cutting the
    method's work), `remaining()`, `holding_back(flops, share)` for a phase that must leave
    room for a later one.  Price work with `forward_cost`, `sequences_cost`, `training_cost`
    (the one formula, for the model as it is now, adapters included).  Every forward and
    backward of the model is charged by the harness whatever the method does; `charge` adds
    compute the model hooks cannot see (e.g. a similarity search), and `out_of_work(reason)`
    records that the method stopped below the cap because it had nothing useful left to do.
    """

    def __init__(self, meter: Meter, model: torch.nn.Module | None = None,
                 keep_flops: float = 0.0, keep_share: float = 0.0):
        self._meter, self._model = meter, model
        self._keep_flops, self._keep_share = keep_flops, keep_share

    @property
    def cap(self) -> Budget:
        return self._meter.budget

    @property
    def spent(self) -> float:
        return self._meter.flops

    @property
    def seconds(self) -> float:
        return self._meter.seconds

    def remaining(self) -> float:
        """FLOPs this phase may still spend (inf without a FLOP cap)."""
        return self._meter.remaining_flops() - self._keep_flops

    def can_afford(self, flops: float = 0.0) -> bool:
        return self._meter.can_afford(flops, self._keep_flops, self._keep_share)

    def exhausted(self) -> bool:
        return not self.can_afford(0.0) or self.remaining() <= 0

    def holding_back(self, flops: float = 0.0, share: float = 0.0, share_of_rest: float = 0.0) -> "TaskBudget":
        """The same budget for a phase that must leave `flops` FLOPs (and `share` of a seconds
        cap, or `share_of_rest` of the seconds this phase has left now) to the phases after it.
        Charging is untouched: this only makes the phase stop earlier."""
        keep_share = max(self._keep_share, share)
        cap = self.cap.seconds
        if cap and share_of_rest:   # the phase's end, as a share of the cap, moved toward now
            end = (1 - keep_share) * cap
            stop = min(end, self.seconds + max(0.0, end - self.seconds) * (1 - share_of_rest))
            keep_share = 1 - stop / cap
        return TaskBudget(self._meter, self._model, self._keep_flops + flops, keep_share)

    def seconds_left(self) -> float:
        """Wall seconds this phase may still run (inf without a seconds cap)."""
        cap = self.cap.seconds
        return float("inf") if cap is None else (1 - self._keep_share) * cap - self.seconds

    def charge(self, flops: float) -> None:
        """Add compute that does not run through the model (a finite number, never negative: a
        NaN charge made the spend NaN, and every later comparison with the cap false, so the cap
        stopped refusing anything)."""
        flops = float(flops)
        if not math.isfinite(flops) or flops < 0:
            raise ValueError(f"a charge must be a finite, non-negative number of FLOPs, not {flops}")
        self._meter._charge(flops)
        self._meter.fail_if_past_cap()   # the work is done; the task stops here, its spend recorded as it is

    def out_of_work(self, reason: str) -> None:
        self._meter.out_of_work = reason

    # ---- pricing, with the model's current shape
    def shape(self, model: torch.nn.Module | None = None) -> ModelShape:
        return self._meter.shape(model if model is not None else self._model)

    def forward_cost(self, n_tokens: int, context: int, model=None) -> float:
        return forward_flops(self.shape(model), n_tokens, context)

    def sequences_cost(self, lengths: list[int], model=None) -> float:
        """Prompts plus answers of these total lengths, decoded or scored once."""
        return sequences_flops(self.shape(model), lengths)

    def training_cost(self, lengths: list[int], model=None) -> float:
        """One training step (forward and backward) over sequences of these lengths."""
        return sequences_flops(self.shape(model), lengths, training=True)


def cpu_seconds() -> float:
    """CPU seconds this process has used, in every thread, plus those of its child processes that
    have ended.  Recorded beside the FLOPs as a check on them: work the meter cannot see (NumPy,
    a pool of processes) still shows here, against the wall seconds times the threads."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def peak_memory_mb() -> float:
    """Peak accelerator memory on CUDA; on the CPU the process's peak resident memory so far."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def reset_peak_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()

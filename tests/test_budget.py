"""The harness's compute meter: what it charges, that nothing escapes it, and the budget handle."""
import contextlib
import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tta.budget import (Budget, BudgetExceeded, Meter, TaskBudget, attention_context, attention_flops, forward_flops,
                        model_shape, training_step_flops)
from tta.inference.decoding import generate
from tta.model.loading import load_model
from tta.training.finetune import attach_lora, detach_lora


@pytest.fixture()
def lm():
    torch.manual_seed(0)
    return load_model("random:tiny", device="cpu")


def charged(lm, work, watched: bool = False) -> float:
    """What `work` costs on a meter attached to the run's model; `watched`: with the watch on
    other modules and bare products that a task runs under."""
    meter = Meter()
    meter.attach(lm.model)
    try:
        with meter.watching_other_work() if watched else contextlib.nullcontext():
            work()
    finally:
        meter.detach()
    return meter.flops


def counted_by_torch(model, work) -> dict[str, float]:
    """torch's own count of the matmuls: linear layers (mm/addmm) and attention (bmm), with the
    eager attention path (torch's counter has no formula for the CPU's fused SDPA kernel)."""
    implementation = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with FlopCounterMode(display=False) as counter:
            work()
    finally:
        model.config._attn_implementation = implementation
    linear = attention = 0.0
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op)
        if "addmm" in name or name.endswith(".mm") or "aten.mm" in name:
            linear += n
        else:
            attention += n
    return {"linear": linear, "attention": attention}


def test_shape_counts_every_linear_map_and_not_the_embedding_or_norms(lm):
    cfg = lm.model.config
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    shape = model_shape(lm.model)
    assert shape.n_params == shape.n_trainable == L * (4 * d * d + 3 * d * f) + V * d   # q,k,v,o; gate,up,down; head
    lm.model.requires_grad_(False)
    shape = model_shape(lm.model)
    assert shape.n_trainable == 0
    adapter = attach_lora(lm, rank=4, alpha=4, targets=["q_proj", "v_proj"])
    try:
        with_lora = model_shape(lm.model)
        lora = L * 2 * (4 * d + d * 4)   # A (r x d) and B (d x r) on q and v in every layer
        assert with_lora.n_params == shape.n_params + lora and with_lora.n_trainable == lora
    finally:
        detach_lora(lm, adapter)


@pytest.mark.parametrize("with_lora", [False, True])
def test_a_decode_step_is_charged_what_torch_counts(lm, with_lora):
    """One new token after a cached prompt: torch counts exactly QKᵀ and AV over the context, so
    linear and attention FLOPs must both match the hooks' charge."""
    from transformers import DynamicCache
    from tta.model.loading import cache_keyword, output_cache
    adapter = attach_lora(lm, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]) if with_lora else None
    try:
        model = lm.model
        prompt = torch.tensor([[1, 3, 6, 7, 5, 4, 3]])
        with torch.no_grad():
            cache = output_cache(model(input_ids=prompt, use_cache=True, **{cache_keyword(): DynamicCache()}))
        step = lambda: model(input_ids=torch.tensor([[6]]), attention_mask=torch.ones(1, 8, dtype=torch.long),
                             use_cache=True, **{cache_keyword(): cache})
        with torch.no_grad():
            torch_count = counted_by_torch(model, step)
            cache.crop(-1)   # back to the prompt alone
            ours = charged(lm, step)
        shape = model_shape(model)
        assert torch_count["linear"] == 2 * shape.n_params
        assert torch_count["attention"] == 4 * shape.n_layer * shape.d_model * 8   # ctx = 8 positions
        assert ours == torch_count["linear"] + torch_count["attention"]
    finally:
        if adapter is not None:
            detach_lora(lm, adapter)


def test_a_prompt_is_charged_the_causal_half_of_torchs_attention_count(lm):
    """torch counts the full square QKᵀ of a prompt; causal attention needs n(n+1)/2 of it."""
    ids = torch.tensor([[1, 3, 6, 7, 5, 4]])
    n = ids.shape[1]
    with torch.no_grad():
        torch_count = counted_by_torch(lm.model, lambda: lm.model(input_ids=ids))
        ours = charged(lm, lambda: lm.model(input_ids=ids))
    causal = torch_count["attention"] * (n + 1) / (2 * n)
    assert ours == pytest.approx(torch_count["linear"] + causal)


def test_padding_is_never_charged(lm):
    ids = torch.tensor([[0, 0, 1, 3, 6], [1, 3, 6, 7, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = charged(lm, lambda: lm.model(input_ids=ids, attention_mask=mask))
        alone = charged(lm, lambda: lm.model(input_ids=ids[:1, 2:])) + charged(lm, lambda: lm.model(input_ids=ids[1:]))
    shape = model_shape(lm.model)
    assert padded == alone == forward_flops(shape, 8, attention_context(0, 3) + attention_context(0, 5))


# ---------------------------------------------------------------- nothing escapes the meter

def _ids():
    return torch.tensor([[1, 3, 6, 7, 5, 4, 3, 2]])


def well_behaved(lm):
    with torch.no_grad():
        lm.model(input_ids=_ids())


def through_forward(lm):
    with torch.no_grad():
        lm.model.forward(input_ids=_ids())


def through_the_inner_model(lm):
    with torch.no_grad():
        hidden = lm.model.model(input_ids=_ids()).last_hidden_state
        lm.model.lm_head(hidden)


def test_every_entry_point_is_charged_the_same(lm):
    expected = charged(lm, lambda: well_behaved(lm))
    assert expected == forward_flops(model_shape(lm.model), 8, attention_context(0, 8))
    assert charged(lm, lambda: through_forward(lm)) == expected
    assert charged(lm, lambda: through_the_inner_model(lm)) == expected


def _train_step(lm, mode: str):
    adapter = attach_lora(lm, rank=4, alpha=4, targets=["q_proj", "v_proj"])
    try:
        lm.model.train(mode == "train")
        with torch.enable_grad():
            loss = lm.model(input_ids=_ids(), labels=_ids()).loss
            loss.backward()
        return model_shape(lm.model)
    finally:
        lm.model.eval()
        detach_lora(lm, adapter)


def test_a_backward_is_charged_in_eval_mode_as_in_train_mode(lm):
    meter = Meter()
    meter.attach(lm.model)
    shape = _train_step(lm, "train")
    in_train = meter.flops
    _train_step(lm, "eval")
    meter.detach()
    assert in_train == training_step_flops(shape, 8, attention_context(0, 8))
    assert meter.flops == 2 * in_train


def test_a_backward_is_charged_when_it_runs_not_before(lm):
    meter = Meter()
    meter.attach(lm.model)
    adapter = attach_lora(lm, rank=4, alpha=4, targets=["q_proj"])
    try:
        with torch.enable_grad():
            loss = lm.model(input_ids=_ids(), labels=_ids()).loss
            shape = model_shape(lm.model)
            forward_only = meter.flops
            assert forward_only == forward_flops(shape, 8, attention_context(0, 8))
            loss.backward()
        assert meter.flops == training_step_flops(shape, 8, attention_context(0, 8))
    finally:
        detach_lora(lm, adapter)
        meter.detach()


def test_the_method_handle_cannot_switch_counting_off(lm):
    meter = Meter(Budget(flops=1e12))
    meter.attach(lm.model)
    handle = meter.handle(lm.model)
    try:
        for name in ("uncharged", "detach", "attach", "flops"):
            assert not hasattr(handle, name)
        for wrong in (-1.0, float("nan"), float("inf")):   # NaN would have made every later cap check false
            with pytest.raises(ValueError, match="finite, non-negative"):
                handle.charge(wrong)
        well_behaved(lm)
        handle.charge(10.0)   # compute outside the model can only be added
        assert handle.spent == meter.flops == forward_flops(model_shape(lm.model), 8, 36) + 10
    finally:
        meter.detach()


# ---------------------------------------------------------------- the handle's questions

def test_holding_back_keeps_room_and_a_no_is_recorded():
    meter = Meter(Budget(flops=100))
    budget = meter.handle()
    assert budget.can_afford(100) and meter.refusals == 0 and not meter.stopped_by_budget()
    phase = budget.holding_back(40)
    assert phase.remaining() == 60 and phase.can_afford(60) and not phase.can_afford(61)
    assert meter.stopped_by_budget() and meter.summary()["stopped_by_budget"]
    assert budget.remaining() == 100   # the phase's reserve is the phase's alone
    budget.out_of_work("every distinct view used")
    assert meter.summary()["out_of_work"] == "every distinct view used"


def test_spending_the_cap_counts_as_a_stop_by_the_budget():
    meter = Meter(Budget(flops=10))
    meter._charge(10)
    assert meter.stopped_by_budget() and meter.summary()["budget_share"] == 1.0
    assert not Meter(Budget(flops=10)).stopped_by_budget()


def test_seconds_cap():
    meter = Meter(Budget(seconds=0.0))
    assert meter.handle().exhausted() and not meter.can_afford(0)
    assert meter.handle().holding_back(share=0.5).exhausted()


def test_decoding_stops_at_the_flop_cap(lm):
    prompts = [[1, 3, 6, 7, 5, 4], [1, 3, 8, 5, 4]]
    free = Meter()
    free.attach(lm.model)
    full = generate(lm, prompts, free.handle(lm.model), max_new_tokens=30)
    free.detach()
    cap = free.flops / 3
    capped = Meter(Budget(flops=cap))
    capped.attach(lm.model)
    short = generate(lm, prompts, capped.handle(lm.model), max_new_tokens=30)
    capped.detach()
    assert capped.flops <= cap and capped.stopped_by_budget()
    assert sum(len(g.tokens) for g in short) < sum(len(g.tokens) for g in full)


def test_pricing_matches_what_the_hooks_charge(lm):
    """A method plans with the handle's prices; they must be what running the work costs."""
    meter = Meter()
    meter.attach(lm.model)
    budget = meter.handle(lm.model)
    price = budget.sequences_cost([8])
    well_behaved(lm)
    meter.detach()
    assert price == meter.flops
    assert isinstance(budget, TaskBudget)


# ---------------------------------------------------------------- through the runner, as a plugin would

from tta.method import Method  # noqa: E402
from tta.run.solve import run_task  # noqa: E402
from conftest import flip_task  # noqa: E402


class WellBehaved(Method):
    """Scores the task's first prompt through the model's front door, then trains one step on it."""
    name = "well_behaved"

    def prompt(self, task):
        return torch.tensor([self.lm.format.encode(list(task.train), task.test[0].input).input_ids])

    def forward(self, ids):
        return self.lm.model(input_ids=ids).logits

    def backward(self, ids):
        self.lm.model.train()
        loss = self.lm.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.lm.model.eval()

    def adapt(self, task, budget, seed):
        ids = self.prompt(task)
        with torch.no_grad():
            self.forward(ids)
        with torch.enable_grad():
            self.backward(ids)
        return {}

    def predict(self, task, budget, seed):
        return [[p.input, None] for p in task.test], {}


class ThroughForward(WellBehaved):
    def forward(self, ids):
        return self.lm.model.forward(input_ids=ids).logits


class ThroughTheInnerModel(WellBehaved):
    def forward(self, ids):
        return self.lm.model.lm_head(self.lm.model.model(input_ids=ids).last_hidden_state)


class BackwardInEvalMode(WellBehaved):
    def backward(self, ids):
        loss = self.lm.model(input_ids=ids, labels=ids).loss   # eval mode: dropout off, graph on
        loss.backward()


class ReachesForTheMeter(WellBehaved):
    def adapt(self, task, budget, seed):
        for name in ("uncharged", "detach", "_meter"):
            if name != "_meter":
                assert not hasattr(budget, name)
        return super().adapt(task, budget, seed)


def rebuilt(model):
    """The model built anew from its config and weights: the meter's hooks do not come with it."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh


class OnARebuiltModel(WellBehaved):
    """WellBehaved's work on a model of its own, built from the run's weights."""
    def adapt(self, task, budget, seed):
        self.other = rebuilt(self.lm.model).requires_grad_(True)
        return super().adapt(task, budget, seed)

    def forward(self, ids):
        return self.other(input_ids=ids).logits

    def backward(self, ids):
        self.other(input_ids=ids, labels=ids).loss.backward()


class OnARebuiltDecoder(OnARebuiltModel):
    def forward(self, ids):
        return self.other.lm_head(self.other.model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("cls", [ThroughForward, ThroughTheInnerModel, BackwardInEvalMode, ReachesForTheMeter,
                                 OnARebuiltModel, OnARebuiltDecoder])
def test_a_method_that_escapes_the_front_door_is_charged_like_a_well_behaved_one(lm, cls):
    lm.model.requires_grad_(True)   # a full fine-tuning backward: every weight trains
    task = flip_task()
    expected = run_task(WellBehaved(None, lm), lm, task, Budget(), seed=0)
    got = run_task(cls(None, lm), lm, task, Budget(), seed=0)
    assert expected.error is None and got.error is None
    shape = model_shape(lm.model)
    n = len(lm.format.encode(list(task.train), task.test[0].input).input_ids)
    assert expected.flops == forward_flops(shape, n, attention_context(0, n)) + training_step_flops(
        shape, n, attention_context(0, n))
    assert got.flops == expected.flops


def test_the_record_says_whether_the_cap_cut_the_work(lm):
    from methods.icl import ICL, ICLConfig
    task = flip_task()
    capped = run_task(ICL(ICLConfig(max_views=64), lm), lm, task, Budget(flops=2e8), seed=0)
    assert capped.stopped_by_budget and capped.out_of_work is None
    assert 0.8 <= capped.budget_share <= 1.0 and capped.flops <= 2e8
    roomy = run_task(ICL(ICLConfig(max_views=16), lm), lm, task, Budget(flops=1e11), seed=0)
    assert not roomy.stopped_by_budget and roomy.out_of_work.startswith("max_views reached")
    assert roomy.extra["predict"]["views"] == 16


def test_progress_inside_a_task_is_the_share_of_the_cap_spent(lm, monkeypatch):
    from methods.icl import ICL, ICLConfig
    import tta.budget as budget_module
    clock = iter(range(0, 10**6))   # every charge looks half a second or more after the last
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: float(next(clock)))
    shares = []
    record = run_task(ICL(ICLConfig(max_views=64), lm), lm, flip_task(), Budget(flops=2e8), seed=0,
                      on_progress=shares.append)
    assert len(shares) > 10 and shares == sorted(shares)
    assert shares[-1] == pytest.approx(record.flops / 2e8) and shares[-1] > 0.8


# ---------------------------------------------------------------- the cap holds whether a method asks or not

class NeverAsks(WellBehaved):
    """Scores its prompt again and again without asking the budget: a method of one's own that
    ignores the cap.  Keeps every forward it got through, to answer with."""
    catch = False

    def adapt(self, task, budget, seed):
        return {}

    def predict(self, task, budget, seed):
        ids, self.forwards = self.prompt(task), 0
        try:
            with torch.no_grad():
                for _ in range(50):
                    self.forward(ids)
                    self.forwards += 1
        except BudgetExceeded:
            if not self.catch:
                raise
        return [[p.input, None] for p in task.test], {"forwards": self.forwards}


class CatchesTheRefusal(NeverAsks):
    catch = True


@pytest.mark.parametrize("cls", [NeverAsks, CatchesTheRefusal])
def test_a_forward_past_the_cap_is_refused_before_it_runs(lm, cls):
    task = flip_task()
    n = len(lm.format.encode(list(task.train), task.test[0].input).input_ids)
    one = forward_flops(model_shape(lm.model), n, attention_context(0, n))
    method = cls(None, lm)
    record = run_task(method, lm, task, Budget(flops=3.5 * one), seed=0) if cls.catch else None
    if not cls.catch:
        meter_spend = []
        with pytest.raises(BudgetExceeded, match="would pass the cap; ask budget.can_afford"):
            meter = Meter(Budget(flops=3.5 * one))
            meter.attach(lm.model)
            try:
                method.predict(task, meter.handle(lm.model), 0)
            finally:
                meter.detach()
                meter_spend.append(meter.flops)
        assert method.forwards == 3 and meter_spend == [3 * one]   # the fourth never ran
        return
    assert record.error is None and record.extra["predict"]["forwards"] == 3
    assert record.flops == 3 * one and record.budget_share <= 1
    assert record.metrics, "the graded metrics are measurement and are never refused"


def test_a_method_that_ignores_the_cap_fails_that_task_with_one_line_and_the_run_goes_on(tmp_path):
    import json
    from click.testing import CliRunner
    from tta.cli import main
    from conftest import GOOD, write_task
    (tmp_path / "greedy.py").write_text(
        "import torch\nfrom tta.method import Method\n\n"
        "class Greedy(Method):\n"
        "    def predict(self, task, budget, seed):\n"
        "        if task.id == 'heavy':\n"
        "            ids = torch.ones(1, 64, dtype=torch.long)\n"
        "            for _ in range(1000):\n"
        "                self.lm.model(input_ids=ids)\n"
        "        return [[p.input, None] for p in task.test], {}\n")
    (tmp_path / "tasks").mkdir()
    for name in ("heavy", "light"):
        write_task(tmp_path / "tasks" / f"{name}.json", GOOD)
    result = CliRunner().invoke(main, ["run", "--method", f"{tmp_path / 'greedy.py'}:Greedy", "--model", "random:tiny",
                                       "--dataset", str(tmp_path / "tasks"), "--budget-flops", "1e8",
                                       "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output
    records = {r["task_id"]: r for r in map(json.loads, (tmp_path / "r" / "results.jsonl").read_text().splitlines())}
    assert records["heavy"]["error"].startswith("BudgetExceeded: a forward of") and "\n" not in records["heavy"]["error"]
    assert records["light"]["error"] is None
    heavy = records["heavy"]   # the failed task's record keeps what it spent, all inside the cap
    assert 0 < heavy["flops"] <= 1e8 and heavy["budget_share"] <= 1 and heavy["stopped_by_budget"]


def layer_by_hand(model):
    """One call of the first decoder layer outside its decoder, as early-exit decoding makes."""
    hidden = model.model.embed_tokens(torch.ones(1, 24, dtype=torch.long))
    return lambda: model.model.layers[0](hidden, position_embeddings=model.model.rotary_emb(hidden, torch.arange(24)[None]))


def test_a_decoder_layer_called_by_hand_is_refused_before_it_would_pass_the_cap(lm):
    """Fails if layers run outside their decoder are charged but never refused: a plugin looping
    over the first layer spent 222 times its cap, and its task passed."""
    with torch.no_grad():
        call = layer_by_hand(lm.model)
        one = charged(lm, call)
        meter = Meter(Budget(flops=3.5 * one))
        meter.attach(lm.model)
        calls = 0
        with pytest.raises(BudgetExceeded, match="decoder layer's forward .* called by hand"):
            for _ in range(10):
                call()
                calls += 1
        meter.detach()
    assert calls == 3 and meter.flops == pytest.approx(3 * one)


class ChargesWithoutAsking(WellBehaved):
    def adapt(self, task, budget, seed):
        return {}

    def predict(self, task, budget, seed):
        budget.charge(2 * budget.cap.flops)   # e.g. a similarity search it priced itself
        return [[p.input, None] for p in task.test], {}


class ConvolvesWithoutAsking(ChargesWithoutAsking):
    def predict(self, task, budget, seed):   # a convolution is priced once it ran
        torch.nn.Conv2d(3, 64, 3)(torch.zeros(1, 3, 64, 64))
        return [[p.input, None] for p in task.test], {}


@pytest.mark.parametrize("cls", [ChargesWithoutAsking, ConvolvesWithoutAsking])
def test_work_charged_after_it_ran_past_the_cap_fails_the_task_with_its_spend(lm, cls):
    """Fails if a task whose spend passed the cap through work priced only after it ran (an
    explicit charge, a first convolution) is recorded as answered: its share of the cap was 2.0."""
    cap = 1e6
    with pytest.raises(BudgetExceeded, match="past its 1e\\+06-FLOP cap"):
        try:
            run_task(cls(None, lm), lm, flip_task(), Budget(flops=cap), seed=0)
        except BudgetExceeded as e:
            assert e.tta_spent["flops"] > cap   # recorded as it is
            raise


def test_no_cap_refuses_nothing(lm):
    record = run_task(NeverAsks(None, lm), lm, flip_task(), Budget(), seed=0)
    assert record.error is None and record.extra["predict"]["forwards"] == 50


def test_work_on_a_deep_copy_of_the_model_is_charged_as_work_on_the_model(lm):
    """A method may copy the model and train the copy (a full-weight adapter of its own): the copy
    carries the meter's hooks, and they must charge the task's meter, not a copied one."""
    import copy
    ids = torch.tensor([[1, 3, 6, 7, 5, 4]])

    def train_step(model):
        model.requires_grad_(True)
        model(input_ids=ids, labels=ids).loss.backward()

    on_model = charged(lm, lambda: train_step(lm.model))
    meter = Meter()
    meter.attach(lm.model)
    duplicate = copy.deepcopy(lm.model)
    train_step(duplicate)
    assert meter.flops == on_model
    meter.detach()
    later = Meter(Budget(flops=on_model * 1.2))   # a copy kept into the next task charges that task
    later.attach(lm.model)
    train_step(duplicate)
    assert later.flops == on_model and meter.flops == on_model
    with pytest.raises(BudgetExceeded):   # and meets that task's cap
        train_step(duplicate)
    later.detach()


def test_an_adapter_on_the_runs_model_or_on_a_rebuilt_one_is_charged_once(lm):
    """The watch on other modules must pass by the linear maps of a LoRA injected into a hooked
    model (its layer hooks charge them), and hook a rebuilt model's LoRA the same way."""
    from peft import LoraConfig, get_peft_model
    ids = torch.tensor([[1, 3, 6, 7, 5, 4]])

    def on_the_runs_model():
        adapter = attach_lora(lm, rank=4, alpha=8, targets=["q_proj", "v_proj"])
        adapter(input_ids=ids).logits.sum().backward()
        detach_lora(lm, adapter)

    def on_a_rebuilt_model():
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        get_peft_model(rebuilt(lm.model), config)(input_ids=ids).logits.sum().backward()

    unwatched = charged(lm, on_the_runs_model)
    assert unwatched > 0
    for work in (on_the_runs_model, on_a_rebuilt_model):
        assert charged(lm, work, watched=True) == unwatched


class OwnNetwork(Method):
    """Trains a small convolutional network of its own for one step; the run's model is not used."""
    name = "own_network"

    @staticmethod
    def network():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(10, 16, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(16 * 9, 10))

    def predict(self, task, budget, seed):
        self.steps = 0
        net, x = self.network(), torch.randn(4, 10, 3, 3)
        for _ in range(3):
            net(x).sum().backward()
            self.steps += 1
        return [[p.input, None] for p in task.test], {}


def test_a_network_of_the_methods_own_is_charged_and_meets_the_cap(lm):
    """Fails if a step of a network of the method's own is charged other than what torch's counter
    counts for it (its forward; the weight gradients of both layers and the input gradient of the
    second, not of the first, whose input is data), or if its forward is not refused at the cap."""
    with FlopCounterMode(display=False) as counter:
        OwnNetwork.network()(torch.randn(4, 10, 3, 3)).sum().backward()
    one_step = counter.get_total_flops()
    method = OwnNetwork(None, lm)
    record = run_task(method, lm, flip_task(), Budget(), seed=0)
    assert record.error is None and record.flops == 3 * one_step
    meter = Meter(Budget(flops=2.5 * one_step))
    meter.attach(lm.model)   # as in a task
    with meter.watching_other_work(), pytest.raises(BudgetExceeded, match="a forward of Linear"):
        method.predict(flip_task(), meter.handle(), 0)
    meter.detach()
    # In the third step the convolution, priced only once it ran, fit; the linear layer after it,
    # priced with the backward it allows, would have passed the cap.
    assert method.steps == 2 and 2 * one_step < meter.flops <= 2.5 * one_step and meter.stopped_by_budget()


def test_linear_and_convolution_backwards_are_charged_the_gradients_torch_computes(lm):
    """A layer's input gradient runs only when its input requires grad.  Fails if a layer with
    learning weights is charged it anyway (before: a 2-layer MLP's step at 29% over torch's
    count), or if a frozen layer between learning ones is not charged the gradient it passes on."""
    x = torch.randn(64, 32)

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                   torch.nn.Unflatten(1, (4, 4, 4)), torch.nn.Conv2d(4, 8, 3, padding=1))

    def learning(which):
        net = mlp().requires_grad_(False)
        for i in which:
            net[i].requires_grad_(True)
        return net

    cases = {"all learn": mlp(), "the last learns": learning([4]), "the first learns": learning([0]),
             "the first and last learn": learning([0, 4]),
             # its weight lives in a child module: the layer's own parameters are none
             "a weight under a parametrization": torch.nn.utils.parametrizations.weight_norm(
                 torch.nn.Linear(32, 64, bias=False))}
    for name, net in cases.items():
        with FlopCounterMode(display=False) as counter:
            net(x).sum().backward()
        assert charged(lm, lambda: net(x).sum().backward(), watched=True) == counter.get_total_flops(), name
    # an input that learns: every layer passes its gradient back, none computes a weight gradient
    frozen, x_learns = learning([]), x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        frozen(x_learns).sum().backward()
    assert charged(lm, lambda: frozen(x_learns).sum().backward(), watched=True) == counter.get_total_flops()


def test_counted_modules_called_with_their_inputs_by_keyword_are_charged(lm):
    """`linear(input=x)` and `attention(query=q, key=k, value=v)` were charged 0: their price was
    read from the positional inputs, and their insides were passed by as counted.  Fails if a call
    by keyword is charged other than the same call by position, forward and backward."""
    q = torch.randn(2, 5, 32, requires_grad=True)
    linear, attention = torch.nn.Linear(32, 64), torch.nn.MultiheadAttention(32, 4, batch_first=True)
    lstm, conv = torch.nn.LSTM(32, 16, batch_first=True), torch.nn.Conv1d(5, 8, 3)
    calls = {"linear": (lambda: linear(q), lambda: linear(input=q)),
             "attention": (lambda: attention(q, q, q)[0], lambda: attention(query=q, key=q, value=q)[0]),
             "lstm": (lambda: lstm(q)[0], lambda: lstm(input=q)[0]),
             "convolution": (lambda: conv(q), lambda: conv(input=q))}
    for name, (by_position, by_keyword) in calls.items():
        forward = charged(lm, by_position, watched=True)
        assert forward > 0 and charged(lm, by_keyword, watched=True) == forward, name
        step = charged(lm, lambda: by_position().sum().backward(), watched=True)
        assert step > forward and charged(lm, lambda: by_keyword().sum().backward(), watched=True) == step, name

    # A forward that raised still closes its module's counting: a product after it is charged.
    def product_after_a_failed_forward():
        with pytest.raises(RuntimeError):
            linear(input=torch.randn(3, 7))   # the wrong width
        return q @ q.transpose(1, 2)
    assert charged(lm, product_after_a_failed_forward, watched=True) == 2 * 2 * 5 * 5 * 32


def test_a_rebuilt_model_kept_past_its_task_is_hooked_again_in_the_next(lm):
    ids = torch.tensor([[1, 3, 6, 7, 5, 4]])
    kept = rebuilt(lm.model)
    spent = []
    for _ in range(2):
        meter = Meter()
        meter.attach(lm.model)
        with meter.watching_other_work(), torch.no_grad():
            kept(input_ids=ids)
        meter.detach()
        spent.append(meter.flops)
    with torch.no_grad():   # no task: nothing watches, and no meter of a task gone is charged
        kept(input_ids=ids)
    assert spent[0] == spent[1] == forward_flops(model_shape(lm.model), 6, attention_context(0, 6))


def test_a_meter_that_hooked_two_models_leaves_none_attached_and_an_unattached_meter_charges_itself(lm):
    """Fails if a meter is listed as attached once per model it hooks (after `detach` it stayed
    listed, and the charges of a later task without a model went to it), or if a meter that never
    hooked a model sends `charge` to whichever meter is attached."""
    ids = torch.tensor([[1, 3, 6]])
    meter = Meter()
    meter.attach(lm.model)
    with meter.watching_other_work(), torch.no_grad():
        rebuilt(lm.model)(input_ids=ids)   # hooked on its first forward: a second model
    meter.detach()
    assert meter not in Meter._attached
    other = Meter()
    other.attach(lm.model)
    without_model = Meter()   # a task whose method needs no model
    without_model.handle().charge(1e6)
    other.detach()
    assert without_model.flops == 1e6 and other.flops == 0


def bare_work(trained: bool):
    """Products written as bare tensor operations, forward and (when `trained`) backward: the
    weights learn, the inputs do not, and one product multiplies two learnt tensors."""
    F = torch.nn.functional
    torch.manual_seed(0)
    w = torch.randn(16, 24, requires_grad=trained)
    kernel = torch.randn(5, 3, 3, 3, requires_grad=trained)
    up = torch.randn(5, 2, 2, 2, requires_grad=trained)
    x, image = torch.randn(3, 7, 16), torch.randn(2, 3, 6, 6)
    h = x @ w                                                        # batched matmul, broadcast weight
    h = F.linear(h, w) + torch.einsum("btk,kn->btn", h, w.T)         # linear and einsum
    h = torch.bmm(h, h.transpose(1, 2)) + torch.addmm(torch.zeros(7, 7), h[0], h[1].T)
    g = F.conv_transpose2d(F.conv2d(image, kernel, padding=1), up, stride=2)
    total = h.sum() + torch.tensordot(g, g, dims=4)
    if trained:
        total.backward()


@pytest.mark.parametrize("trained", [False, True])
def test_bare_products_are_charged_what_torch_counts(lm, trained):
    """Fails if the watch on bare products misses an operation, prices one wrongly, or charges a
    backward for an operand that learns nothing."""
    with FlopCounterMode(display=False) as counter:
        bare_work(trained)
    assert charged(lm, lambda: bare_work(trained), watched=True) == counter.get_total_flops() > 0


def test_bare_causal_attention_is_charged_the_formulas_attention_term(lm):
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))   # batch 2, 4 heads of 8, 9 positions
    meter = Meter()
    meter.attach(lm.model)
    spent = []
    with meter.watching_other_work():   # by keyword, and every argument by position
        for attend in (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                       lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, None, 0.0, True),
                       lambda: torch.nn.functional.scaled_dot_product_attention(query=q, key=k, value=v,
                                                                                is_causal=True)):
            before = meter.flops
            attend()
            spent.append(meter.flops - before)
    meter.detach()
    assert spent == [attention_flops(1, 4 * 8, 2 * attention_context(0, 9))] * 3


def test_a_bare_product_past_the_cap_is_refused_before_it_runs(lm):
    """A matmul is priced from its shapes, a convolution and an einsum by torch's counter on meta
    copies: each is refused before it runs, and the spend stays where it was."""
    meter = Meter(Budget(flops=1e6))
    meter.attach(lm.model)
    a, image, kernel = torch.randn(64, 64), torch.randn(1, 16, 16, 16), torch.randn(16, 16, 3, 3)
    refused = {"matmul": lambda: a @ a,   # 524,288 FLOPs each
               "conv2d": lambda: torch.nn.functional.conv2d(image, kernel, padding=1),   # 1,179,648
               "einsum": lambda: torch.einsum("ij,jk->ik", a, a)}
    with meter.watching_other_work():
        a @ a
        for name, product in refused.items():
            with pytest.raises(BudgetExceeded, match=f"a bare {name} costing"):
                product()
    meter.detach()
    assert meter.flops == 2 * 64 ** 3 and meter.refusals == 3


def test_the_harness_decoder_and_the_models_modules_are_not_charged_again_by_the_watch(lm):
    """The fast decoder's products run bare, and the harness charges them by the formula; a
    hooked model's insides run bare products too.  Fails if either is charged twice."""
    prompt = lm.format.encode(list(flip_task().train), flip_task().test[0].input).input_ids
    ids = torch.tensor([prompt])

    def work():
        generate(lm, [prompt], max_new_tokens=6)
        with torch.no_grad():
            lm.model(input_ids=ids)

    assert charged(lm, work, watched=True) == charged(lm, work) > 0


class BareNetwork(Method):
    """A network of its own whose module multiplies by its weight with `@`: no counted module."""
    name = "bare_network"

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(10, 10))

        def forward(self, x):
            return torch.relu(x @ self.weight)

    def predict(self, task, budget, seed):
        torch.manual_seed(0)
        net = torch.nn.Sequential(self.Layer(), self.Layer())
        net(torch.randn(4, 10)).sum().backward()
        return [[p.input, None] for p in task.test], {}


def test_a_methods_own_module_of_bare_products_is_charged(lm):
    with FlopCounterMode(display=False) as counter:
        BareNetwork(None, lm).predict(flip_task(), None, 0)
    record = run_task(BareNetwork(None, lm), lm, flip_task(), Budget(), seed=0)
    assert record.error is None and record.flops == counter.get_total_flops() > 0


@pytest.mark.filterwarnings("ignore:There is a performance drop")   # torch's vmap of its CPU attention kernel
def test_work_vmapped_one_row_at_a_time_is_charged_as_the_same_rows_in_a_batch(lm):
    """Inside `torch.func.vmap` a tensor shows one example's shape.  Fails if any count read from
    shapes there (the decoder's tokens, the head, a counted module, a bare product) is not
    multiplied by the batch: vmapping 4 rows then cost a quarter of running them as a batch."""
    from torch.func import functional_call, grad, vmap
    ids = torch.randint(3, 10, (4, 6))
    x, w = torch.randn(8, 4, 32), torch.randn(32, 32)
    linear = torch.nn.Linear(32, 32)
    lm.model.requires_grad_(True)
    params = {k: v.detach() for k, v in lm.model.named_parameters()}

    def row_loss(p, row):
        return functional_call(lm.model, p, (), {"input_ids": row[None], "labels": row[None]}).loss

    pairs = {   # (as a batch, vmapped)
        "forward": (lambda: lm.model(input_ids=ids), lambda: vmap(lambda row: lm.model(input_ids=row[None]).logits)(ids)),
        "training step": (lambda: lm.model(input_ids=ids, labels=ids).loss.backward(),
                          lambda: vmap(grad(row_loss), in_dims=(None, 0))(params, ids)),
        "bare product": (lambda: x @ w, lambda: vmap(vmap(lambda r: r @ w))(x)),
        "linear module": (lambda: linear(x), lambda: vmap(linear)(x)),
    }
    for name, (batched, vmapped) in pairs.items():
        assert charged(lm, batched, watched=True) == charged(lm, vmapped, watched=True) > 0, name


def test_forwards_from_two_threads_at_once_are_each_charged_their_own_shape(lm):
    """A method may run the model from threads of its own.  Fails if the forward in progress is
    shared between threads: a layer then reads the other thread's tokens (a forward of 8 tokens
    and one of 200, each 100 times in two threads, were charged 6% less than one after another)."""
    import sys
    import threading
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as the interpreter can

    def forwards(length):
        with torch.no_grad():
            for _ in range(100):
                lm.model(torch.zeros(1, length, dtype=torch.long))

    def side_by_side():
        threads = [threading.Thread(target=forwards, args=(n,)) for n in (8, 200)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        one_after_another = charged(lm, lambda: (forwards(8), forwards(200)))
        assert charged(lm, side_by_side, watched=True) == pytest.approx(one_after_another, rel=1e-12)
    finally:
        sys.setswitchinterval(previous)


@pytest.fixture()
def threads_unwatched(monkeypatch):
    """As in a fresh process: no thread yet starts under the watch (an earlier test may have set it)."""
    import threading
    import tta.budget
    if tta.budget._unwatched_bootstrap is not None:
        monkeypatch.setattr(threading.Thread, "_bootstrap_inner", tta.budget._unwatched_bootstrap)
        monkeypatch.setattr(tta.budget, "_unwatched_bootstrap", None)


def test_bare_products_in_a_thread_the_method_starts_are_charged(lm, threads_unwatched):
    """A torch function mode holds only in the thread that entered it.  Fails if the watch is not
    entered in threads started during a task: the product ran there uncharged (0 FLOPs)."""
    import threading
    a, b = torch.randn(16, 32), torch.randn(32, 8)
    thread = threading.Thread(target=lambda: a @ b)
    assert charged(lm, lambda: (thread.start(), thread.join()), watched=True) == 2 * 16 * 32 * 8


def test_a_thread_pool_made_in_setup_charges_each_task_its_own_products(tmp_path, threads_unwatched):
    """A method may make a pool once, in `setup`, and use it in every task.  Fails if the harness
    starts watching threads only once a task runs (the pool's thread, started in setup, then
    charged nothing), or if a pool thread charges the meter of the task that was running when it
    started (the second task's product went to the first task's meter).  A product past the cap
    in a pool thread is refused there, and the task fails with one line."""
    import json
    from click.testing import CliRunner
    from tta.cli import main
    from conftest import GOOD, write_task
    (tmp_path / "pooled.py").write_text(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "import torch\nfrom tta.method import Method\n\n"
        "class Pooled(Method):\n"
        "    def setup(self, tasks):\n"
        "        self.pool = ThreadPoolExecutor(max_workers=1)\n"
        "        self.pool.submit(torch.ones, 1).result()   # the pool's one thread starts here\n"
        "        return {}\n\n"
        "    def predict(self, task, budget, seed):\n"
        "        size = 64 if task.id == 'heavy' else 16\n"
        "        a = torch.randn(size, size)\n"
        "        self.pool.submit(torch.matmul, a, a).result()\n"
        "        return [[p.input, None] for p in task.test], {}\n")
    (tmp_path / "tasks").mkdir()
    for name in ("heavy", "light", "light2"):
        write_task(tmp_path / "tasks" / f"{name}.json", GOOD)
    result = CliRunner().invoke(main, ["run", "--method", f"{tmp_path / 'pooled.py'}:Pooled", "--model", "random:tiny",
                                       "--dataset", str(tmp_path / "tasks"), "--budget-flops", "1e5",
                                       "--out", str(tmp_path / "r"), "--quiet", "--workers", "1"])
    assert result.exit_code == 0, result.output
    records = {r["task_id"]: r for r in map(json.loads, (tmp_path / "r" / "results.jsonl").read_text().splitlines())}
    assert records["heavy"]["error"].startswith("BudgetExceeded: a bare matmul costing 5.24e+05")
    for name in ("light", "light2"):
        assert records[name]["error"] is None and records[name]["flops"] == 2 * 16 ** 3


def test_a_task_run_from_a_thread_started_under_the_watch_is_charged_once(lm):
    """A harness of the user's own may run tasks from threads it starts.  Fails if such a thread's
    own watch (entered as it started) charges a product the task's watch has charged already."""
    import threading
    from tta.budget import watch_threads_started_from_now
    watch_threads_started_from_now()
    a = torch.randn(16, 16)
    spent = []
    thread = threading.Thread(target=lambda: spent.append(charged(lm, lambda: a @ a, watched=True)))
    thread.start()
    thread.join()
    assert spent == [2 * 16 ** 3]


def test_similarities_sparse_products_transforms_and_spectral_norms_are_charged(lm):
    """Fails if work a method could write as one call escapes: a cosine-similarity search over a
    data store, a covariance, `pdist`, `vdot`, a sparse product (charged at its stored values,
    not the dense count), the FFT family and `stft`, a spectral norm (an SVD's values), the matrix
    exponential and solves with a factor made before all cost 0 before.  Entry-wise norms stay element-wise work (free)."""
    n = 64
    a, v = torch.randn(n, n), torch.randn(n)
    sparse = (torch.randn(n, n) * (torch.rand(n, n) < 0.1)).to_sparse()
    expected = {
        "cosine similarity search": (lambda: torch.nn.functional.cosine_similarity(a[:8, None], a[None], dim=-1),
                                     2 * 8 * n * n),
        "covariance": (lambda: torch.cov(a[:16]), 2 * 16 * 16 * n),
        "pdist": (lambda: torch.nn.functional.pdist(a[:10]), 10 * 9 * n),
        "vdot": (lambda: torch.vdot(v, v), 2 * n),
        "sparse product": (lambda: torch.sparse.mm(sparse, a), 2 * sparse._nnz() * n),
        "sparse @": (lambda: sparse @ a, 2 * sparse._nnz() * n),
        "fft2": (lambda: torch.fft.fft2(a), 5 * n * n * math.log2(n * n)),
        "rfft of 8 rows": (lambda: torch.fft.rfft(a[:8]), 2.5 * 8 * n * math.log2(n)),
        "spectral norm": (lambda: torch.linalg.matrix_norm(a, 2), 4 * n ** 3 - 4 * n ** 3 / 3),
        "Frobenius norm": (lambda: torch.linalg.matrix_norm(a), 0),
        "torch.norm, p=2 (the entries' norm)": (lambda: torch.norm(a, p=2), 0),
        "matrix exponential, 1-norm under 3.01": (lambda: torch.linalg.matrix_exp(torch.eye(n)), 6 * 2 * n ** 3),
        "matrix exponential, 1-norm 12: two squarings": (lambda: torch.linalg.matrix_exp(12 * torch.eye(n)),
                                                          8 * 2 * n ** 3),
        # 4,096 samples centred (padded by 128 each side), a frame every 64: 65 frames of 256 points
        "stft": (lambda: torch.stft(torch.randn(4096), 256, hop_length=64, window=torch.hann_window(256),
                                    return_complex=True), 2.5 * 65 * 256 * 8),
        "istft of those frames": (lambda: torch.istft(torch.randn(129, 65, dtype=torch.complex64), 256, hop_length=64,
                                                      window=torch.hann_window(256)), 2.5 * 65 * 256 * 8),
        "cholesky_solve, 4 columns": (lambda: torch.cholesky_solve(v[:, None].expand(n, 4), torch.eye(n)), 2 * n * n * 4),
        "lu_solve, batch of 2": (lambda: torch.linalg.lu_solve(*torch.linalg.lu_factor(torch.eye(n)), torch.randn(2, n, 3)),
                                 (n ** 3 - n ** 3 / 3) + 2 * 2 * n * n * 3),
        "cholesky_inverse": (lambda: torch.cholesky_inverse(torch.eye(n)), 2 * n ** 3 / 3),
    }
    for name, (work, flops) in expected.items():
        with torch.no_grad():
            assert charged(lm, work, watched=True) == pytest.approx(flops, rel=1e-9), name


def test_products_called_by_hand_as_aten_operators_are_charged_as_the_functions_are(lm):
    """Fails if `torch.ops.aten.mm(a, b)` and its kin cost 0 (they did): the watch sees them
    under their own names, any overload, and a backward is charged when the operand learns."""
    aten, a, b, v, q = torch.ops.aten, torch.randn(8, 16), torch.randn(16, 4), torch.randn(16), torch.randn(1, 2, 6, 8)
    pairs = {   # an aten operator by hand -> the same work through the function the watch prices
        "mm": (lambda: aten.mm(a, b), lambda: torch.mm(a, b)),
        "mm.default": (lambda: aten.mm.default(a, b), lambda: a @ b),
        "matmul, a composite": (lambda: aten.matmul(a[None].expand(3, 8, 16), b), lambda: torch.matmul(a[None].expand(3, 8, 16), b)),
        "mv": (lambda: aten.mv(a, v), lambda: torch.mv(a, v)),
        "dot": (lambda: aten.dot(v, v), lambda: torch.dot(v, v)),
        "the CPU's fused attention": (lambda: aten._scaled_dot_product_flash_attention_for_cpu(q, q, q),
                                      lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)),
        "conv2d": (lambda: aten.conv2d(torch.randn(1, 3, 8, 8), torch.randn(5, 3, 3, 3)),
                   lambda: torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(5, 3, 3, 3))),
    }
    for name, (by_hand, function) in pairs.items():
        with torch.no_grad():
            assert charged(lm, by_hand, watched=True) == charged(lm, function, watched=True) > 0, name
    learning = a.clone().requires_grad_(True)
    assert charged(lm, lambda: aten.mm(learning, b).sum().backward(), watched=True) == 2 * 2 * 8 * 16 * 4


def test_products_torch_wraps_in_python_and_dense_linear_algebra_are_charged(lm):
    """Fails if work escapes the watch: a function torch writes in Python around its products
    (`F.multi_head_attention_forward`: the watch sees only the outer call) was charged 0, as were
    `torch.inner`, `torch.cdist`, `F.bilinear`, an in-place `addmm_` and every decomposition (an
    SVD of any size cost nothing).  The functional attention costs what the module does."""
    a, b, x = torch.randn(64, 64), torch.randn(64, 32), torch.randn(64, 1, 64)
    attention = torch.nn.MultiheadAttention(64, 4)
    n = 64
    expected = {   # work -> FLOPs: products as torch counts them; decompositions by their textbook counts
        "module attention": (lambda: attention(x, x, x, need_weights=False), None),
        "functional attention": (lambda: torch.nn.functional.multi_head_attention_forward(
            x, x, x, 64, 4, attention.in_proj_weight, attention.in_proj_bias, None, None, False, 0.0,
            attention.out_proj.weight, attention.out_proj.bias, need_weights=False), None),
        "inner": (lambda: torch.inner(a, b.T), 2 * 64 * 64 * 32),
        "cdist": (lambda: torch.cdist(a, b.T[:, :64]), 2 * 64 * 32 * 64),
        "bilinear": (lambda: torch.nn.functional.bilinear(a, a, torch.randn(8, 64, 64)), 2 * 64 * 8 * 64 * 64),
        "addmm_": (lambda: torch.zeros(64, 32).addmm_(a, b), 2 * 64 * 64 * 32),
        "svd": (lambda: torch.linalg.svd(a), 21 * n ** 3),
        "thin svd of a tall matrix": (lambda: torch.linalg.svd(torch.randn(128, n), full_matrices=False),
                                      14 * 128 * n * n + 8 * n ** 3),
        "solve": (lambda: torch.linalg.solve(a, b), 2 * n ** 3 / 3 + 2 * n * n * 32),
        "batched inverse": (lambda: torch.inverse(torch.randn(3, n, n)), 3 * 2 * n ** 3),
        "eigh": (lambda: torch.linalg.eigh(a @ a.T), 2 * n ** 3 + 9 * n ** 3),
    }
    spent = {}
    for name, (work, _) in expected.items():
        with torch.no_grad():
            spent[name] = charged(lm, work, watched=True)
    assert spent["functional attention"] == spent["module attention"] > 0
    for name, (_, flops) in expected.items():
        if flops is not None:
            assert spent[name] == pytest.approx(flops, rel=1e-9), name
    meter = Meter(Budget(flops=1e6))   # priced before it runs, so refused like any product
    meter.attach(lm.model)
    with meter.watching_other_work(), pytest.raises(BudgetExceeded, match="a bare linalg_svd costing"):
        torch.linalg.svd(a)
    meter.detach()
    assert meter.flops == 0


class Scripted(Method):
    """Runs a network of its own through TorchScript, traced in the task or scripted in setup."""
    name = "scripted"

    def setup(self, tasks):
        self.scripted = torch.jit.script(torch.nn.Linear(16, 16))

    def predict(self, task, budget, seed):
        x = torch.randn(4, 16)
        net = torch.jit.trace(torch.nn.Linear(16, 16), x) if task.id.endswith("traced") else self.scripted
        net(x)
        return [[p.input, None] for p in task.test], {}


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")   # tracing under the watch: harmless here
@pytest.mark.parametrize("how", ["traced", "scripted"])
def test_torchscript_work_the_meter_cannot_see_is_refused(lm, how):
    """Fails if a TorchScript module runs during a task: neither module hooks nor the watch on bare
    products see inside it (a traced copy of the model cost 0 FLOPs a forward)."""
    from tta.data.tasks import Task
    method = Scripted(None, lm)
    method.setup([])
    task = flip_task()
    task = Task(f"{task.id}-{how}", task.train, task.test)
    with pytest.raises(Exception, match="a TorchScript module .* runs work the harness cannot count") as caught:
        run_task(method, lm, task, Budget(), seed=0)
    assert type(caught.value).__name__ == "UncountedWork"


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_a_methods_own_recurrent_network_is_charged(lm):
    """An LSTM, GRU or RNN runs its steps inside one C++ call the watch cannot see.  Fails if
    they cost 0 (as they did), or if a layer, direction, gate or projection is priced wrongly:
    torch's counter prices each (except a plain LSTM, at 0 there) the same."""
    x = torch.randn(10, 4, 32)
    networks = {"gru": torch.nn.GRU(32, 64), "rnn": torch.nn.RNN(32, 64),
                "two-layer bidirectional gru": torch.nn.GRU(32, 64, num_layers=2, bidirectional=True),
                "lstm with a projection": torch.nn.LSTM(32, 64, proj_size=16)}
    for name, network in networks.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(x)
        with torch.no_grad():
            assert charged(lm, lambda: network(x), watched=True) == counter.get_total_flops() > 0, name
    with torch.no_grad():   # four gates' weights against a GRU's three
        lstm = charged(lm, lambda: torch.nn.LSTM(32, 64)(x), watched=True)
    assert lstm == 4 / 3 * charged(lm, lambda: networks["gru"](x), watched=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [10, 8, 5, 2])   # 25 steps, not 40
    with torch.no_grad():
        assert charged(lm, lambda: networks["gru"](packed), watched=True) == 2 * 3 * 64 * (32 + 64) * 25


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize("kind", ["gru", "lstm with a projection"])
def test_a_recurrent_networks_training_step_is_charged_the_gradients_torch_computes(lm, kind):
    """A recurrent backward was charged two forwards whenever anything learned; torch computes
    1.6 for a 1-layer GRU whose input is data (no input gradient, no state gradient into h0).
    Fails if any of these gradients is charged where torch skips it, or missed where it runs:
    weights learning or frozen, an input or an h0 that needs a gradient, a second layer, the
    reverse direction, a packed sequence (whose directions start from different rows)."""
    width, hidden = 16, 24
    projection = 8 if kind != "gru" else 0
    cases = itertools.product((1, 2), (False, True), (False, True), (False, True), (False, True), (False, True))
    for layers, bidirectional, packed, x_learns, weights_learn, h0_learns in cases:
        if not (x_learns or weights_learn or h0_learns):
            continue
        network = (torch.nn.LSTM(width, hidden, num_layers=layers, bidirectional=bidirectional, proj_size=projection)
                   if projection else torch.nn.GRU(width, hidden, num_layers=layers, bidirectional=bidirectional))
        network.requires_grad_(weights_learn)
        x = torch.randn(6, 3, width, requires_grad=x_learns)
        h0 = torch.zeros(layers * (2 if bidirectional else 1), 3, projection or hidden, requires_grad=h0_learns)
        state = (h0, torch.zeros(*h0.shape[:2], hidden)) if projection else h0

        def step():
            inputs = torch.nn.utils.rnn.pack_padded_sequence(x, [6, 4, 1]) if packed else x
            outputs = network(inputs, state)[0]
            (outputs.data if packed else outputs).sum().backward()
        with FlopCounterMode(display=False) as counter:
            step()
        case = dict(layers=layers, bidirectional=bidirectional, packed=packed, x_learns=x_learns,
                    weights_learn=weights_learn, h0_learns=h0_learns)
        assert charged(lm, step, watched=True) == counter.get_total_flops(), case


class LoRALinear(torch.nn.Linear):
    """A LoRA layer as loralib writes one: `nn.Linear` with a forward of its own."""
    def __init__(self, width: int, rank: int = 8):
        super().__init__(width, width)
        self.A, self.B = torch.nn.Parameter(torch.randn(rank, width)), torch.nn.Parameter(torch.randn(width, rank))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias) + x @ self.A.t() @ self.B.t()


class TenTimes(torch.nn.Linear):
    def forward(self, x):
        for _ in range(10):
            x = torch.nn.functional.linear(x, self.weight)
        return x


class OutputsOnlyLSTM(torch.nn.LSTM):
    def forward(self, x):
        return super().forward(x)[0]


def test_a_counted_layers_subclass_with_a_forward_of_its_own_is_charged_its_own_products(lm):
    """A subclass of `nn.Linear` was charged as the plain layer whatever its forward did (ten
    products charged as one; a LoRA layer's adapter free), since the watch passed its insides by.
    Fails if such a layer is charged other than torch's count, forward and training step; if a
    recurrent subclass (its steps in one C++ call, `torch.lstm`) is not charged as the plain
    module; or if a subclass that keeps torch's forward is charged differently from its base."""
    x = torch.randn(16, 64)
    for network in (LoRALinear(64), TenTimes(64, 64)):
        for name, work in (("forward", lambda: network(x)), ("step", lambda: network(x).sum().backward())):
            with FlopCounterMode(display=False) as counter:
                work()
            assert charged(lm, work, watched=True) == counter.get_total_flops(), (type(network).__name__, name)
    sequence = torch.randn(5, 3, 64)
    mine, plain = OutputsOnlyLSTM(64, 32, num_layers=2, bidirectional=True), torch.nn.LSTM(64, 32, num_layers=2, bidirectional=True)
    forward = charged(lm, lambda: plain(sequence), watched=True)
    assert forward > 0 and charged(lm, lambda: mine(sequence), watched=True) == forward
    # (torch's counter prices a plain LSTM at 0.)  Its backward: every weight's gradient (the
    # forward again), the second layer's input gradient in both directions on all 15 rows, and
    # the states' gradients of 4 layer-directions on the 12 rows after each one's first step.
    step = 2 * forward + 2 * (2 * 4 * 32 * 64) * 15 + 4 * (2 * 4 * 32 * 32) * 12
    assert charged(lm, lambda: plain(sequence)[0].sum().backward(), watched=True) == step
    assert charged(lm, lambda: mine(sequence).sum().backward(), watched=True) == step
    packed = torch.nn.utils.rnn.pack_padded_sequence(sequence, [5, 4, 2])
    assert charged(lm, lambda: mine(packed), watched=True) == charged(lm, lambda: plain(packed), watched=True) < forward
    named = type("Named", (torch.nn.Linear,), {})(64, 64)   # torch's forward, under another name
    assert charged(lm, lambda: named(x).sum().backward(), watched=True) == 2 * 2 * 16 * 64 * 64


def test_training_steps_of_a_method_that_never_asks_stay_inside_the_cap(lm):
    """A backward cannot be refused half way, so a forward with gradients on is admitted only if
    its backward fits too.  Fails if the forward alone is priced: a plugin's training loop (as
    transformers' Trainer runs it) then passed the cap by the last step's backward (121%)."""
    ids = torch.randint(3, 10, (2, 40))
    lm.model.requires_grad_(True)
    meter = Meter()
    meter.attach(lm.model)
    lm.model(input_ids=ids, labels=ids).loss.backward()
    step = meter.flops
    with torch.no_grad():
        lm.model(input_ids=ids)
    forward = meter.flops - step
    meter.detach()
    cap = 2.5 * step   # room for two steps and half of a third: its forward fits, its backward does not
    meter = Meter(Budget(flops=cap))
    meter.attach(lm.model)
    steps = 0
    with pytest.raises(BudgetExceeded, match="and .* for the head and the backward they allow"):
        while True:
            lm.model(input_ids=ids, labels=ids).loss.backward()
            steps += 1
    assert steps == 2 and meter.flops <= cap
    with torch.no_grad():   # without gradients only the forward is priced: it fits
        lm.model(input_ids=ids)
    meter.detach()
    assert meter.flops == pytest.approx(2 * step + forward) and meter.flops <= cap


def big_head_model() -> torch.nn.Module:
    """A general LLM's proportions: the output head (4,000 x 32) outweighs the decoder layers."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_an_inference_forward_whose_head_would_pass_the_cap_is_refused_before_the_head_runs():
    """Fails if the head is left out of the refusal: the decoder layers fit, and the head, a
    large share of a general LLM's forward, ran past the cap."""
    model, ids = big_head_model(), torch.randint(0, 4000, (2, 30))
    meter = Meter()
    meter.attach(model)
    with torch.no_grad():
        model(input_ids=ids)
    one = meter.flops
    meter.detach()
    layers = one - 2.0 * model.lm_head.weight.numel() * ids.numel()
    assert layers < 0.5 * one   # the head is most of this forward
    cap = one + layers + 1   # a second forward's layers fit, its head does not
    meter = Meter(Budget(flops=cap))
    meter.attach(model)
    with torch.no_grad():
        model(input_ids=ids)
        with pytest.raises(BudgetExceeded, match="output head"):
            model(input_ids=ids)
    meter.detach()
    assert meter.flops == pytest.approx(one + layers) and meter.flops <= cap and meter.refusals == 1


def test_a_training_forward_is_priced_with_the_heads_logits_and_their_backward():
    """Fails if a training forward's price leaves the head out: with a big head the layers and
    their backward fit, and the head's forward and backward then passed the cap."""
    model, ids = big_head_model(), torch.randint(0, 4000, (2, 30))
    model.requires_grad_(True)
    meter = Meter()
    meter.attach(model)
    model(input_ids=ids, labels=ids).loss.backward()
    step = meter.flops
    meter.detach()
    head_share = 2.0 * 3 * model.lm_head.weight.numel() * ids.numel()   # forward, and its two backward products
    cap = 2 * step + (step - head_share) + 1   # a third step's layers fit with their backward; its head does not
    meter = Meter(Budget(flops=cap))
    meter.attach(model)
    steps = 0
    with pytest.raises(BudgetExceeded, match="for the head and the backward they allow"):
        while True:
            model(input_ids=ids, labels=ids).loss.backward()
            steps += 1
    meter.detach()
    assert steps == 2 and meter.flops == pytest.approx(2 * step) and meter.flops <= cap


def test_a_methods_own_network_trained_without_asking_stays_inside_the_cap(lm):
    """The same for a network of the method's own, through a counted module and through a bare
    product.  Fails if only their forwards are priced before they run: the last step's backward
    then took the spend past the cap."""
    x = torch.randn(16, 32)
    linear, weight = torch.nn.Linear(32, 32, bias=False), torch.randn(32, 32, requires_grad=True)
    forward = 2 * 16 * 32 * 32
    for name, step, passes in (("module", lambda: linear(x).sum().backward(), 2),   # forward, weights' gradient (x learns nothing)
                               ("bare product", lambda: (x @ weight).sum().backward(), 2)):
        one_step = charged(lm, step, watched=True)
        assert one_step == passes * forward, name
        cap = 2.5 * one_step
        meter = Meter(Budget(flops=cap))
        meter.attach(lm.model)
        steps = 0
        with meter.watching_other_work(), pytest.raises(BudgetExceeded):
            while True:
                step()
                steps += 1
        meter.detach()
        assert steps == 2 and meter.flops <= cap, name


def test_forward_mode_ad_is_charged_its_tangents(lm):
    """Forward-mode AD (`torch.func.jvp`, a `forward_ad` dual level) computes every product once
    more per tangent it carries: the tangent of x W is dx W + x dW.  Fails if a jvp costs what the
    plain forward does (it did: a forward-gradient method trained at the price of inference), if
    a Jacobian (`jacfwd`, `jacrev`: one tangent or backward per element, batched) costs two
    products (it did), if a decoder layer or the head misses the tangent, or if the cap does not
    price it in before a forward runs."""
    import torch.autograd.forward_ad as forward_ad
    from tta.budget import attention_flops, model_shape
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    product = 2 * 8 * 16 * 4

    def dual_level():
        with forward_ad.dual_level():
            forward_ad.make_dual(a, torch.ones_like(a)) @ b
    linear = torch.nn.Linear(16, 4)
    weights = dict(linear.named_parameters())
    by_weights = lambda: torch.func.jvp(lambda w: torch.func.functional_call(linear, w, (a,)), (weights,),   # noqa: E731
                                        ({k: torch.ones_like(v) for k, v in weights.items()},))
    expected = {"a plain product": (lambda: a @ b, product),
                "one operand with a tangent": (lambda: torch.func.jvp(lambda x: x @ b, (a,), (a,)), 2 * product),
                "both operands": (lambda: torch.func.jvp(lambda x, y: x @ y, (a, b), (a, b)), 3 * product),
                "a forward_ad dual level": (dual_level, 2 * product),
                "a Linear against its input": (lambda: torch.func.jvp(linear, (a,), (a,)), 2 * product),
                "a Linear against its weights": (by_weights, 2 * product),
                # one primal, a tangent (or a backward) per input (output) element, batched
                "jacfwd over 128 inputs": (lambda: torch.func.jacfwd(lambda x: x @ b)(a), (1 + 128) * product),
                "jacrev over 32 outputs": (lambda: torch.func.jacrev(lambda x: x @ b)(a), (1 + 32) * product),
                "vmap over 5 tangents": (lambda: torch.func.vmap(lambda t: torch.func.jvp(lambda x: x @ b, (a,), (t,)))(
                    torch.randn(5, 8, 16)), (1 + 5) * product),
                "per-example gradients, for comparison": (lambda: torch.func.vmap(torch.func.grad(lambda x: (x @ b).sum()))(
                    torch.randn(5, 8, 16)), 5 * 2 * product)}
    for name, (work, flops) in expected.items():
        assert charged(lm, work, watched=True) == flops, name

    # The model, with eager attention (the CPU's fused kernel has no forward-mode rule).
    lm.model.config._attn_implementation = "eager"
    ids = torch.randint(0, 10, (1, 40))
    with torch.no_grad():
        forward = charged(lm, lambda: lm.model(input_ids=ids))
    embeds = lm.model.get_input_embeddings()(ids).detach()
    along_embeds = lambda: torch.func.jvp(lambda e: lm.model(inputs_embeds=e).logits, (embeds,), (torch.randn_like(embeds),))   # noqa: E731
    shape = model_shape(lm.model)
    # Every layer's and the head's products once more, and the attention's twice more.
    assert charged(lm, along_embeds) == pytest.approx(2 * forward + attention_flops(shape.n_layer, shape.d_model, 40 * 41 // 2))
    meter = Meter(Budget(flops=1.5 * forward))
    meter.attach(lm.model)
    try:
        with pytest.raises(BudgetExceeded, match="a forward of"):
            along_embeds()
    finally:
        meter.detach()
    assert meter.flops == 0   # refused before any layer ran

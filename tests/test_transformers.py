"""use_lawa with the real Hugging Face Trainer and accelerate: evaluation on the average
(nested, with a dict of eval datasets), checkpoints with the training weights that export
right, and bit-identical resume with gradient accumulation. Tiny models built from
configs: nothing is downloaded."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import assert_same, fingerprint, roundtrip  # noqa: E402
from torch import nn  # noqa: E402

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("accelerate", reason="accelerate is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")

from lawa_optim import LAWA, export_average  # noqa: E402
from lawa_optim.integrations.transformers import use_lawa  # noqa: E402

K = 2
STEPS_PER_EPOCH = 3  # 10 examples, batches of 2, 2 accumulated: steps of 2, 2 and 1 batches
EPOCHS = 3


def gpt2(seed):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def examples(seed, n):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 32, (8,), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


TRAIN, EVAL_A, EVAL_B = examples(0, 10), examples(1, 4), examples(2, 4)


def arguments(path, **kwargs):
    defaults = dict(
        output_dir=str(path), per_device_train_batch_size=2, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, num_train_epochs=EPOCHS, learning_rate=1e-2,
        eval_strategy="epoch", save_strategy="steps", save_steps=2, use_cpu=True, report_to=[],
        disable_tqdm=True, logging_strategy="no", seed=0, dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**{**defaults, **kwargs})


class Recorder(transformers.TrainerCallback):
    """Added after use_lawa: what the model holds at each hook."""

    def __init__(self):
        self.trainer = None
        self.at_step_end, self.exports, self.at_save, self.seen = {}, {}, {}, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at_step_end[state.global_step] = weights(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # Right before the epoch's evaluation (after the step's checkpoint).
        self.exports[state.global_step] = export_average(model, self.lawa)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        self.seen.append((state.global_step, dict(metrics), weights(model)))

    def on_save(self, args, state, control, model=None, **kwargs):
        export = export_average(model, self.lawa) if self.lawa.num_snapshots else None
        self.at_save[state.global_step] = (weights(model), export, self.lawa.steps)

    @property
    def lawa(self):
        return self.trainer.optimizer.optimizer


def weights(model):
    return {n: t.clone() for n, t in model.state_dict().items()}


def train(path, seed=0, resume=None, **kwargs):
    trainer = transformers.Trainer(
        model=gpt2(seed), args=arguments(path, **kwargs), train_dataset=TRAIN,
        eval_dataset={"a": EVAL_A, "b": EVAL_B},
    )
    lawa = use_lawa(trainer, k=K)
    recorder = Recorder()
    recorder.trainer = trainer
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, lawa, recorder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    return path, train(path, eval_on_start=True)


@pytest.fixture(scope="module")
def eval_loss(tmp_path_factory):
    """The eval loss a plain Trainer (no LAWA) reports for a model holding ``state``."""
    args = arguments(tmp_path_factory.mktemp("oracle"), eval_strategy="no")
    oracle = transformers.Trainer(model=gpt2(5), args=args)

    def loss(state, examples):
        oracle.model.load_state_dict(state)
        return oracle.evaluate(eval_dataset=examples)["eval_loss"]

    return loss


def test_the_trainer_steps_the_returned_lawa(run):
    _, (trainer, lawa, _) = run
    assert trainer.optimizer.optimizer is lawa and isinstance(lawa, LAWA)
    assert lawa.steps == trainer.state.global_step == STEPS_PER_EPOCH * EPOCHS
    assert lawa.num_snapshots == K and not lawa.is_swapped
    assert len(lawa.param_groups) == 2  # with and without weight decay


def test_evaluation_reports_the_metrics_of_the_exported_average(run, eval_loss):
    """Each evaluation ran on the average: the float64 mean of the training weights
    recorded at the last K snapshot steps (the steps that end an epoch), and exactly what
    export_average gives; the reported losses are those of that average."""
    _, (trainer, lawa, recorder) = run
    start = [s for s in recorder.seen if s[0] == 0]
    assert len(start) == 2 and 0 not in recorder.at_step_end  # eval_on_start, before any step
    for _, _, seen in start:
        assert_same(seen, weights(gpt2(0)))  # the initial training weights
    for epoch in range(1, EPOCHS + 1):
        step = epoch * STEPS_PER_EPOCH
        evals = [s for s in recorder.seen if s[0] == step]
        assert len(evals) == 2  # the dict of eval datasets: nested evaluate() calls
        export = recorder.exports[step]
        held = [recorder.at_step_end[e * STEPS_PER_EPOCH] for e in range(max(1, epoch - K + 1), epoch + 1)]
        mean = {n: sum(w[n].double() for w in held) / len(held) for n in export}
        for name, data, (_, metrics, seen) in zip("ab", (EVAL_A, EVAL_B), evals):
            assert_same(seen, export)
            for n in seen:
                torch.testing.assert_close(seen[n].double(), mean[n], rtol=0, atol=1e-6)
            loss = metrics[f"eval_{name}_loss"]
            assert loss == eval_loss(export, data)
            assert loss == pytest.approx(eval_loss({n: t.float() for n, t in mean.items()}, data), rel=1e-5)
            if epoch > 1:
                assert loss != pytest.approx(eval_loss(recorder.at_step_end[step], data), rel=1e-4)
    metrics = trainer.evaluate()
    final = recorder.at_save[STEPS_PER_EPOCH * EPOCHS][1]
    assert metrics["eval_a_loss"] == eval_loss(final, EVAL_A)


def test_checkpoints_hold_the_training_weights_and_export_right(run):
    path, (trainer, lawa, recorder) = run
    steps = sorted(recorder.at_save)
    assert steps == [2, 4, 6, 8, 9]  # every 2 steps and at the end
    for step in steps:
        folder = path / f"checkpoint-{step}"
        saved = safetensors_torch.load_file(folder / "model.safetensors")
        live, export, lawa_steps = recorder.at_save[step]
        assert torch.equal(live["lm_head.weight"], live["transformer.wte.weight"])  # tied: saved once
        assert_same(saved, {k: v for k, v in live.items() if k != "lm_head.weight"})
        sd = torch.load(folder / "optimizer.pt", weights_only=True)
        assert sd["param_groups"][0]["lawa"]["steps"] == lawa_steps == step
        assert sd["param_groups"][0]["lawa"]["swapped"] is False
        if export is None:  # before the first snapshot
            with pytest.raises(RuntimeError, match="no snapshot"):
                export_average(gpt2(7), sd)
            continue
        got = export_average(gpt2(7), sd)  # a fresh model: the two param groups map by name
        assert list(got) == list(export)
        assert_same(got, export)
        if step >= 2 * STEPS_PER_EPOCH:
            assert not torch.equal(saved["transformer.h.0.mlp.c_fc.weight"], export["transformer.h.0.mlp.c_fc.weight"])


def test_after_training_the_model_holds_the_training_weights(run):
    _, (trainer, lawa, recorder) = run
    assert_same(weights(trainer.model), recorder.at_step_end[STEPS_PER_EPOCH * EPOCHS])


@pytest.mark.parametrize("at", [4, 6], ids=["mid-epoch", "epoch-end"])
def test_resume_from_checkpoint_is_bit_identical(run, at, tmp_path):
    path, (trainer, lawa, _) = run
    resumed, lawa2, _ = train(tmp_path, seed=3, resume=str(path / f"checkpoint-{at}"))
    assert_same(weights(resumed.model), weights(trainer.model))
    assert lawa2.steps == lawa.steps and lawa2.num_snapshots == lawa.num_snapshots
    a, b = lawa.state_dict(), lawa2.state_dict()
    for pid in a["state"]:
        assert torch.equal(a["state"][pid]["lawa_history"], b["state"][pid]["lawa_history"])
    assert_same(export_average(resumed.model, lawa2), export_average(trainer.model, lawa))


def test_export_saves_with_save_pretrained(run, tmp_path):
    _, (trainer, lawa, _) = run
    export = export_average(trainer.model, lawa)
    expected = dict(export)  # save_pretrained empties the dict it is given
    trainer.model.save_pretrained(tmp_path, state_dict=export)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert_same(loaded.state_dict(), expected)


class Blocks(nn.Module):
    """Parameters of one shape. The Trainer puts ``bias_table`` (a name with "bias") in
    its group without weight decay, after ``proj``: the checkpoint's order is not
    model.parameters() order, and a mapping by order would be silently wrong."""

    def __init__(self):
        super().__init__()
        self.bias_table = nn.Parameter(torch.randn(4, 4) / 2)
        self.proj = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x, labels=None):
        out = torch.tanh(x @ self.bias_table) @ self.proj
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def test_trainer_checkpoint_of_same_shaped_parameters_exports_right(tmp_path):
    torch.manual_seed(0)
    data = [{"x": x, "labels": x.flip(0)} for x in torch.randn(8, 4)]
    args = arguments(
        tmp_path, max_steps=3, save_steps=3, eval_strategy="no", weight_decay=0.1,
        gradient_accumulation_steps=1, per_device_train_batch_size=4,
    )
    trainer = transformers.Trainer(model=Blocks(), args=args, train_dataset=data)
    lawa = use_lawa(trainer, k=K, every=1)
    trainer.train()
    sd = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert [g["param_names"] for g in sd["param_groups"]] == [["proj"], ["bias_table"]]
    live = export_average(trainer.model, lawa)
    assert_same(export_average(Blocks(), sd), live)
    for g in sd["param_groups"]:
        del g["param_names"]
    blind = export_average(Blocks(), sd)
    assert torch.equal(blind["bias_table"], live["proj"])  # what names prevent


class SaveDuringEvaluation(transformers.TrainerCallback):
    """A checkpoint saved from inside evaluate(), where the average is swapped in."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        before = weights(model)
        self.trainer._save_checkpoint(model, trial=None)
        self.seen.append((before, weights(model)))


def test_checkpoint_saved_during_evaluation_holds_the_training_weights(tmp_path):
    torch.manual_seed(0)
    data = [{"x": x, "labels": x.flip(0)} for x in torch.randn(8, 4)]
    args = arguments(
        tmp_path, max_steps=3, save_strategy="no", eval_strategy="steps", eval_steps=3,
        gradient_accumulation_steps=1, per_device_train_batch_size=4,
    )
    trainer = transformers.Trainer(model=Blocks(), args=args, train_dataset=data, eval_dataset=data[:4])
    use_lawa(trainer, k=K, every=1)
    saver = SaveDuringEvaluation(trainer)
    trainer.add_callback(saver)
    trainer.train()
    (before, after), = saver.seen
    assert_same(after, before)  # the evaluation went on with the same average, bit for bit
    saved = safetensors_torch.load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert_same(saved, weights(trainer.model))  # the training weights
    assert not torch.equal(saved["proj"], before["proj"])
    sd = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert sd["param_groups"][0]["lawa"]["swapped"] is False
    assert_same(export_average(Blocks(), sd), after)


def what_use_lawa_sets(trainer):
    """The trainer's optimizer, its callbacks and what use_lawa patches or adds, as they are."""
    own = vars(trainer)
    return {
        "optimizer": trainer.optimizer,
        "callbacks": list(trainer.callback_handler.callbacks),
        "patched": [own.get(name) for name in ("evaluate", "_save_checkpoint", "_lawa")],
    }


def test_refusals_change_nothing(tmp_path):
    trainer = transformers.Trainer(model=gpt2(0), args=arguments(tmp_path, eval_strategy="no"), train_dataset=TRAIN)
    built = what_use_lawa_sets(trainer)
    assert built["optimizer"] is None and built["patched"] == [None, None, None]
    for kwargs, error, message in (
        ({"k": 0}, ValueError, "k must be a positive int"),
        ({"k": 2, "evry": 1}, TypeError, "evry"),
    ):
        with pytest.raises(error, match=message):
            use_lawa(trainer, **kwargs)
        assert_same(what_use_lawa_sets(trainer), built)
    strided = Blocks()
    strided.proj = nn.Parameter(torch.randn(4, 8)[:, ::2])  # not a dense block of memory
    other = transformers.Trainer(model=strided, args=arguments(tmp_path, eval_strategy="no"))
    other_built = what_use_lawa_sets(other)
    with pytest.raises(ValueError, match="does not cover a dense block"):
        use_lawa(other)
    assert_same(what_use_lawa_sets(other), other_built)

    first = use_lawa(trainer, k=2)
    built = what_use_lawa_sets(trainer)
    assert built["optimizer"] is first and built["patched"][2] is first
    before = fingerprint(first)
    with pytest.raises(RuntimeError, match="already steps a LAWA"):
        use_lawa(trainer, k=2)
    assert_same(what_use_lawa_sets(trainer), built)
    assert_same(fingerprint(first), before)
    with pytest.raises(TypeError, match="must be a transformers.Trainer"):
        use_lawa(object())
    args = arguments(tmp_path, eval_strategy="no")
    init = transformers.Trainer(model_init=lambda: gpt2(0), args=args, train_dataset=TRAIN)
    init_built = what_use_lawa_sets(init)
    with pytest.raises(ValueError, match="model_init"):
        use_lawa(init)
    assert_same(what_use_lawa_sets(init), init_built)
    assert init.optimizer is None


@pytest.mark.parametrize("flag,what", [
    ("is_deepspeed_enabled", "DeepSpeed"), ("is_fsdp_enabled", "FSDP"), ("is_fsdp_xla_enabled", "FSDP on XLA"),
])
def test_sharded_trainers_are_refused_and_left_as_they_were(tmp_path, flag, what):
    trainer = transformers.Trainer(model=gpt2(0), args=arguments(tmp_path, eval_strategy="no"), train_dataset=TRAIN)
    setattr(trainer, flag, True)  # what accelerate's plugin would set
    built, weights_before = what_use_lawa_sets(trainer), weights(trainer.model)
    with pytest.raises(ValueError, match=f"use_lawa does not support {what} trainers: the optimizer is built after sharding"):
        use_lawa(trainer, k=2)
    assert_same(what_use_lawa_sets(trainer), built)
    assert_same(weights(trainer.model), weights_before)
    assert trainer.optimizer is None


def test_checkpoint_of_another_parameter_layout_is_refused_and_changes_nothing(tmp_path):
    """The names use_lawa saves are checked on load: a checkpoint whose parameters sit in
    other places (here the two same-shaped ones swapped) is refused before anything is
    loaded, and the dict given is left as it was; the right names load and are stripped."""
    torch.manual_seed(0)
    data = [{"x": x, "labels": x.flip(0)} for x in torch.randn(8, 4)]
    args = arguments(tmp_path, max_steps=3, save_strategy="no", eval_strategy="no", weight_decay=0.1,
                     gradient_accumulation_steps=1, per_device_train_batch_size=4)
    trainer = transformers.Trainer(model=Blocks(), args=args, train_dataset=data)
    lawa = use_lawa(trainer, k=K, every=1)
    trainer.train()
    saved = roundtrip(lawa.state_dict())
    assert [g["param_names"] for g in saved["param_groups"]] == [["proj"], ["bias_table"]]
    assert not any("param_names" in g for g in lawa.param_groups)
    swapped = copy.deepcopy(saved)
    for g, names in zip(swapped["param_groups"], (["bias_table"], ["proj"])):
        g["param_names"] = names
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # the weights the load must not touch
    lawa.step()  # moments and a history that a partial load would overwrite
    lawa.snapshot()
    before, kept = fingerprint(lawa, model=trainer.model), copy.deepcopy(swapped)
    with pytest.raises(ValueError, match="parameter 0 of param group 0 of the state_dict is 'bias_table', this "
                                         "optimizer's is 'proj': the checkpoint was saved with another parameter layout"):
        lawa.load_state_dict(swapped)
    assert_same(fingerprint(lawa, model=trainer.model), before)
    assert_same(swapped, kept)
    lawa.load_state_dict(saved)  # the names that fit
    assert lawa.steps == 3 and not any("param_names" in g for g in lawa.param_groups)
    assert_same(roundtrip(lawa.state_dict()), saved)

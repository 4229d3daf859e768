"""LAWACallback with the real Lightning (``lightning.pytorch`` and ``pytorch_lightning``):
validation on the average, checkpoints with the training weights, bit-identical resume."""

import copy
import importlib
import warnings

import pytest
import torch
from conftest import assert_same, fingerprint
from torch import nn

from lawa_optim import LAWA, export_average

LIGHTNING = {}
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        LIGHTNING[_name] = importlib.import_module(_name)
    except ImportError:
        pass
pytestmark = pytest.mark.skipif(not LIGHTNING, reason="neither lightning nor pytorch-lightning is installed")

K = 2
EPOCHS = 4
X = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
Y = X.sum(1, keepdim=True).sin()
VX, VY = X[:8] + 0.1, Y[:8]


def frameworks():
    return [pytest.param(name, id=name) for name in ("lightning.pytorch", "pytorch_lightning")]


def framework(name):
    if name not in LIGHTNING:
        pytest.skip(f"{name} is not installed")
    return LIGHTNING[name]


def module_class(pl):
    class Regressor(pl.LightningModule):
        """An unchanged LightningModule: a plain optimizer, nothing about LAWA."""

        def __init__(self, fail_at_epoch=None):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            self.fail_at_epoch = fail_at_epoch
            self.val_losses = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            if self.current_epoch == self.fail_at_epoch and not self.trainer.sanity_checking:
                raise RuntimeError("failure inside validation")
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("val_loss", loss)
            self.val_losses.append(loss.item())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Regressor


def make_recorder(pl, save_during_validation=None):
    class Recorder(pl.Callback):
        """Placed after LAWACallback: what the model holds at each hook."""

        def __init__(self):
            self.snapshots, self.exports, self.seen, self.saved_exports = [], [], [], []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx + 1 == trainer.num_training_batches:
                self.snapshots.append(weights(module))
                self.exports.append(export_average(module, self.lawa(trainer)))

        def on_validation_epoch_start(self, trainer, module):
            self.seen.append((trainer.sanity_checking, weights(module)))

        def on_validation_epoch_end(self, trainer, module):
            if save_during_validation and trainer.current_epoch == 2 and not trainer.sanity_checking:
                trainer.save_checkpoint(save_during_validation)

        def on_save_checkpoint(self, trainer, module, checkpoint):
            lawa = self.lawa(trainer)
            if not lawa.is_swapped:
                self.saved_exports.append(export_average(module, lawa))

        def lawa(self, trainer):
            return trainer.strategy.optimizers[0]

    return Recorder()


def weights(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def loaders():
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(VX, VY), batch_size=8)
    return train, val


def fit(pl, path, epochs, seed=0, ckpt_path=None, callback=None, module=None, **kwargs):
    """5 batches per epoch, 2 accumulated per optimizer step: 3 steps per epoch."""
    from lawa_optim.integrations.lightning import LAWACallback

    torch.manual_seed(seed)
    module = module or module_class(pl)()
    callback = callback or LAWACallback(k=K)
    recorder = make_recorder(pl, kwargs.pop("save_during_validation", None))
    checkpoints = [pl.callbacks.ModelCheckpoint(dirpath=path, save_top_k=-1, filename="{epoch}")]
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback, recorder, *checkpoints[: kwargs.pop("checkpoints", 1)]],
        accumulate_grad_batches=kwargs.pop("accumulate_grad_batches", 2),
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=path,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loaders' worker-count advice
        trainer.fit(module, *loaders(), ckpt_path=ckpt_path)
    return module, callback, recorder, trainer


def history(lawa):
    sd = lawa.state_dict()
    return [e["lawa_history"] for _, e in sorted(sd["state"].items())]


def mean(snapshots):
    return {n: sum(s[n].double() for s in snapshots) / len(snapshots) for n in snapshots[0]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run of 4 epochs with lightning.pytorch (or the one installed)."""
    name = next(iter(LIGHTNING))
    path = tmp_path_factory.mktemp("lightning")
    return name, path, fit(LIGHTNING[name], path, EPOCHS, save_during_validation=path / "during-validation.ckpt")


def test_validation_sees_the_average_including_that_epochs_snapshot(run):
    _, _, (module, callback, recorder, trainer) = run
    assert isinstance(callback.lawa, LAWA) and trainer.strategy.optimizers[0] is callback.lawa
    assert callback.lawa.steps == trainer.global_step == 3 * EPOCHS
    sanity, *epochs = recorder.seen
    assert sanity[0] is True and all(not s for s, _ in epochs)
    assert len(epochs) == EPOCHS == len(recorder.snapshots)
    for e, (_, seen) in enumerate(epochs):
        # The average of the snapshots up to and including this epoch's: no lag.
        assert_same(seen, recorder.exports[e])
        ref = mean(recorder.snapshots[max(0, e + 1 - K) : e + 1])
        for n in seen:
            torch.testing.assert_close(seen[n].double(), ref[n], rtol=0, atol=1e-6)
        if e >= 1:
            assert not torch.equal(seen["net.0.weight"], recorder.snapshots[e]["net.0.weight"])


def test_reported_metric_is_the_metric_of_the_exported_average(run):
    name, _, (module, _, recorder, _) = run
    val_losses = module.val_losses[-EPOCHS:]  # after the two sanity-check batches (one here)
    for e in range(EPOCHS):
        twin = module_class(LIGHTNING[name])()
        twin.load_state_dict(recorder.exports[e])
        with torch.no_grad():
            expected = nn.functional.mse_loss(twin.net(VX), VY).item()
        assert val_losses[e] == pytest.approx(expected, rel=1e-6, abs=0)
    assert module.val_losses[0] != pytest.approx(val_losses[0], rel=1e-3)  # sanity check: initial weights


def test_checkpoints_hold_the_training_weights_and_export_right(run):
    name, path, (module, _, recorder, _) = run
    pl = LIGHTNING[name]
    for e in range(EPOCHS):
        ckpt = torch.load(path / f"epoch={e}.ckpt", weights_only=True)
        assert_same(ckpt["state_dict"], recorder.snapshots[e])
        lawa_state = ckpt["optimizer_states"][0]
        assert all("param_names" in g for g in lawa_state["param_groups"])
        fresh = module_class(pl)()
        assert_same(export_average(fresh, lawa_state), recorder.saved_exports[e])
        if e >= 1:
            assert not torch.equal(ckpt["state_dict"]["net.0.weight"], recorder.exports[e]["net.0.weight"])
    # Saved during validation, while the average was swapped in:
    during = torch.load(path / "during-validation.ckpt", weights_only=True)
    assert_same(during["state_dict"], recorder.snapshots[2])
    assert during["optimizer_states"][0]["param_groups"][0]["lawa"]["swapped"] is False
    _, seen = recorder.seen[1 + 2]
    assert_same(seen, recorder.exports[2])


def test_after_fit_the_model_holds_the_training_weights(run):
    _, _, (module, callback, recorder, _) = run
    assert not callback.lawa.is_swapped
    assert_same(weights(module), recorder.snapshots[-1])


@pytest.mark.parametrize("name", frameworks())
def test_resume_from_checkpoint_is_bit_identical(run, name, tmp_path):
    pl = framework(name)
    _, path, (module, callback, recorder, _) = run
    # Another framework name reads the same checkpoint; the fresh module starts elsewhere.
    resumed, cb2, rec2, trainer2 = fit(
        pl, tmp_path, EPOCHS, seed=1, ckpt_path=path / "epoch=1.ckpt",
        save_during_validation=tmp_path / "during-validation.ckpt",
    )
    sanity_seen = rec2.seen[0]
    assert sanity_seen[0] is True and sanity_seen[1].keys() == recorder.snapshots[1].keys()
    assert_same(sanity_seen[1], recorder.snapshots[1])  # the restored training weights, not swapped
    assert_same(weights(resumed), weights(module))
    assert cb2.lawa.steps == callback.lawa.steps
    for a, b in zip(history(cb2.lawa), history(callback.lawa)):
        assert torch.equal(a, b)
    assert_same(export_average(resumed, cb2.lawa), export_average(module, callback.lawa))


@pytest.mark.parametrize("name", frameworks())
def test_leave_average_and_refusals(name, tmp_path):
    pl = framework(name)
    from lawa_optim.integrations.lightning import LAWACallback

    cb = LAWACallback(k=K, leave_average=True)
    module, _, recorder, _ = fit(pl, tmp_path, 2, callback=cb, checkpoints=0, enable_checkpointing=False)
    assert cb.lawa.is_swapped
    assert_same(weights(module), recorder.exports[-1])
    cb.lawa.swap_back()
    assert_same(weights(module), recorder.snapshots[-1])

    with pytest.raises(ValueError, match="k must be a positive int"):
        LAWACallback(k=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'evry'"):
        LAWACallback(k=2, evry=3)
    for bad in (1, "True", None):
        with pytest.raises(TypeError, match=f"leave_average must be a bool, got {bad!r}"):
            LAWACallback(k=2, leave_average=bad)


@pytest.mark.parametrize("name", frameworks())
def test_failure_inside_validation_leaves_the_training_weights(name, tmp_path):
    pl = framework(name)
    from lawa_optim.integrations.lightning import LAWACallback

    callback, recorder = LAWACallback(k=K), make_recorder(pl)
    module = module_class(pl)(fail_at_epoch=1)
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[callback, recorder], accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(RuntimeError, match="failure inside validation"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, *loaders())
    assert recorder.seen[-1][0] is False  # it failed with the average swapped in
    assert not callback.lawa.is_swapped and callback.lawa.num_snapshots == 2
    assert_same(weights(module), recorder.snapshots[-1])


@pytest.mark.parametrize("name", frameworks())
def test_manual_optimization_steps_the_lawa(name, tmp_path):
    pl = framework(name)
    from lawa_optim.integrations.lightning import LAWACallback

    class Manual(module_class(pl)):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()  # Lightning's wrapper around the LAWA
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    callback = LAWACallback(k=K)
    module, _, recorder, trainer = fit(
        pl, tmp_path, 2, module=Manual(), callback=callback, checkpoints=0, enable_checkpointing=False,
        accumulate_grad_batches=1,
    )
    assert callback.lawa.steps == 10 and callback.lawa.num_snapshots == 2  # 5 batches, no accumulation
    assert_same(recorder.seen[-1][1], recorder.exports[-1])
    assert not callback.lawa.is_swapped
    assert_same(weights(module), recorder.snapshots[-1])


def test_every_n_steps_replaces_the_epoch_snapshots(tmp_path):
    pl = next(iter(LIGHTNING.values()))
    from lawa_optim.integrations.lightning import LAWACallback

    callback = LAWACallback(k=K, every=2)
    fit(pl, tmp_path, 2, callback=callback, checkpoints=0, enable_checkpointing=False)
    meta = callback.lawa.state_dict()["param_groups"][0]["lawa"]
    assert callback.lawa.steps == 6 and meta["pushes"] == 3  # steps 2, 4, 6; none at the epochs' ends


def test_optimizers_it_cannot_wrap_are_refused(tmp_path):
    pl = next(iter(LIGHTNING.values()))

    class Two(module_class(pl)):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self):
            return torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)

    class Wrapped(module_class(pl)):
        def configure_optimizers(self):
            return LAWA(super().configure_optimizers(), k=2)

    for module, error, message in (
        (Two(), ValueError, "exactly one optimizer; configure_optimizers returned 2"),
        (Wrapped(), TypeError, "already returns a LAWA"),
    ):
        before = weights(module)
        with pytest.raises(error, match=message):
            fit(pl, tmp_path, 1, module=module, checkpoints=0, enable_checkpointing=False, accumulate_grad_batches=1)
        assert_same(weights(module), before)


def test_two_callbacks_are_refused_naming_the_cause(tmp_path):
    pl = next(iter(LIGHTNING.values()))
    from lawa_optim.integrations.lightning import LAWACallback

    module = module_class(pl)()
    before = weights(module)
    callbacks = [LAWACallback(k=2), LAWACallback(k=3)]
    trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="the Trainer has 2 LAWACallbacks") as info:
            trainer.fit(module, *loaders())
    assert "configure_optimizers" not in str(info.value)
    assert all(cb.lawa is None for cb in callbacks)
    assert not any(isinstance(o, LAWA) for o in trainer.strategy.optimizers)
    assert_same(weights(module), before)


def renamed(sd, old, new):
    """``sd`` with the saved name ``old`` replaced by ``new`` (of the same length)."""
    assert len(old) == len(new) and old != new
    sd = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        g["param_names"] = [new if n == old else n for n in g["param_names"]]
    return sd


def test_names_of_equal_length_that_differ_are_refused_by_the_shared_check():
    """The check on load compares the names, not their lengths (``record_names``, shared
    by the integrations), and changes nothing when it refuses."""
    from lawa_optim.integrations._common import record_names

    model = nn.ModuleDict({"enc": nn.Linear(3, 3), "dec": nn.Linear(3, 3)})
    lawa = LAWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2)
    record_names(lawa, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    lawa.step()
    lawa.snapshot()
    saved = lawa.state_dict()
    assert saved["param_groups"][0]["param_names"] == ["enc.weight", "enc.bias", "dec.weight", "dec.bias"]
    before = fingerprint(lawa, model=model)
    with pytest.raises(ValueError, match="parameter 0 of param group 0 of the state_dict is 'dec.weight', "
                                         "this optimizer's is 'enc.weight'"):
        lawa.load_state_dict(renamed(saved, "enc.weight", "dec.weight"))
    assert_same(fingerprint(lawa, model=model), before)
    lawa.load_state_dict(saved)


def test_a_checkpoint_with_names_of_equal_length_that_differ_is_refused(run):
    _, _, (module, callback, _, _) = run
    lawa = callback.lawa
    saved = lawa.state_dict()
    before = fingerprint(lawa, model=module)
    with pytest.raises(ValueError, match="parameter 1 of param group 0 of the state_dict is 'net.2.bias', "
                                         "this optimizer's is 'net.0.bias'"):
        lawa.load_state_dict(renamed(saved, "net.0.bias", "net.2.bias"))
    assert_same(fingerprint(lawa, model=module), before)

"""export_average: fresh tensors holding the average, from a live LAWA or a checkpoint file,
with everything else left bit for bit as it was."""

import copy

import pytest
import torch
from conftest import assert_same, fingerprint, roundtrip
from torch import nn

from lawa_optim import LAWA, export_average, update_bn


class Net(nn.Module):
    """Tied embedding and head, a BatchNorm and a dropout: every kind of state dict entry."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.body = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.drop(self.bn(torch.tanh(self.body(self.emb(idx))))))


def batches(seed, n=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 6, (8,), generator=g).to(device) for _ in range(n)]


def train(model, opt, epochs, kept=None):
    """Epochs of three steps and a snapshot each; ``kept`` collects float64 copies of the
    weights at every snapshot that was taken."""
    for e in epochs:
        for idx in batches(e, device=model.emb.weight.device):
            model(idx).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
        if opt.snapshot() and kept is not None:
            kept.append({n: p.detach().double().clone() for n, p in model.named_parameters()})


def make(seed=0, backend="torch", device="cpu", **kwargs):
    torch.manual_seed(seed)
    model = Net().to(device)
    return model, LAWA(torch.optim.AdamW(model.parameters(), lr=5e-2), backend=backend, **kwargs)


def storages(tensors):
    return [t.untyped_storage().data_ptr() for t in tensors]


def test_live_export_is_the_average_in_fresh_tensors(backend, device):
    model, opt = make(backend=backend, device=device, k=3)
    kept = []
    train(model, opt, range(5), kept)
    before = fingerprint(opt, model=model)
    with opt.averaged():
        swapped = {n: p.detach().clone() for n, p in model.named_parameters()}

    out = export_average(model, opt)

    assert list(out) == list(model.state_dict())
    assert_same(fingerprint(opt, model=model), before)
    for name, value in out.items():
        param = "emb.weight" if name == "head.weight" else name  # tied
        if param in swapped:
            ref = sum(s[param] for s in kept[-3:]) / 3
            assert torch.equal(value, swapped[param])
            torch.testing.assert_close(value.double(), ref, rtol=0, atol=1e-6)
            assert not torch.equal(value, model.state_dict()[name])  # the average, not the live weights
        else:
            assert torch.equal(value, model.state_dict()[name])
    # Nothing shares storage: not with the model, not between the tied keys.
    ptrs = storages(out.values())
    assert len(set(ptrs)) == len(ptrs)
    assert not set(ptrs) & set(storages(model.state_dict().values()))
    train(model, opt, range(5, 6))
    assert torch.equal(out["body.weight"], swapped["body.weight"])


CASES = {
    "uniform": {"k": 3},
    "bf16-history": {"k": 3, "history_dtype": torch.bfloat16},
    "every-start": {"k": 2, "every": 2, "start": 4},
    "ema": {"mode": "ema", "decay": 0.5},
}


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_file_exports_what_the_live_lawa_does(case, tmp_path):
    model, opt = make(**CASES[case])
    train(model, opt, range(5))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    live = export_average(model, opt)

    fresh, _ = make(seed=1)  # other weights: the file alone carries the average
    before = fingerprint(model=fresh)
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    got = export_average(fresh, saved)

    assert_same(fingerprint(model=fresh), before)
    assert list(got) == list(live)
    for name, value in got.items():
        if name.startswith(("bn.running", "bn.num")):
            assert torch.equal(value, fresh.state_dict()[name])  # buffers: the model's own
        else:
            assert torch.equal(value, live[name]), name


@pytest.mark.parametrize("case", CASES)
def test_export_of_a_live_state_dict_shares_no_storage_with_it(case):
    model, opt = make(**CASES[case])
    train(model, opt, range(4))
    sd = opt.state_dict()  # its history entries are views of the LAWA's own buffers
    out = export_average(model, sd)
    held = {t.untyped_storage().data_ptr() for e in sd["state"].values() for t in e.values() if torch.is_tensor(t)}
    held |= set(storages(model.state_dict().values()))
    assert not held & set(storages(out.values()))


def steps(model, opt, seed):
    for idx in batches(seed):
        model(idx).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def test_parameters_added_later_keep_their_weights_until_their_first_snapshot():
    torch.manual_seed(0)
    model = Net()
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("body")]
    opt = LAWA(torch.optim.SGD(rest, lr=0.1), k=2)
    train(model, opt, range(3))
    opt.add_param_group({"params": list(model.body.parameters()), "param_names": ["body.weight", "body.bias"]})
    for snapshots in range(3):
        steps(model, opt, 10 + snapshots)  # the first step builds the new group's history
        if snapshots:
            opt.snapshot()
        saved = roundtrip(opt.state_dict())
        live = export_average(model, opt)
        fresh = Net()
        got = export_average(fresh, saved)
        assert torch.equal(got["emb.weight"], live["emb.weight"])
        assert not torch.equal(live["emb.weight"], model.emb.weight)
        for name in ("body.weight", "body.bias"):
            assert torch.equal(got[name], live[name] if snapshots else fresh.state_dict()[name])
            # No snapshot: the live weights; one: the weights it holds; two: their mean.
            assert torch.equal(live[name], model.state_dict()[name]) == (snapshots < 2)


class Same(nn.Module):
    """Parameters of one shape, so a wrong mapping of saved to model parameters is silent."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, 3))
        self.b = nn.Parameter(torch.randn(3, 3))
        self.c = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return x @ self.a @ self.b.tanh() @ self.c


def test_param_names_map_groups_saved_out_of_model_order():
    torch.manual_seed(0)
    model = Same()
    named = dict(model.named_parameters())
    # Saved order c, a, b: not model.parameters() order.
    groups = [{"params": [("c", named["c"])]}, {"params": [("a", named["a"]), ("b", named["b"])], "lr": 0.05}]
    opt = LAWA(torch.optim.SGD(groups, lr=0.1), k=2)
    for e in range(4):
        model(torch.randn(2, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        opt.snapshot()
    saved = roundtrip(opt.state_dict())
    live = export_average(model, opt)
    got = export_average(Same(), saved)
    assert_same(got, live)
    # Without the names the order mapping is wrong, and nothing could tell.
    for g in saved["param_groups"]:
        del g["param_names"]
    blind = export_average(Same(), saved)
    assert torch.equal(blind["a"], live["c"]) and not torch.equal(blind["a"], live["a"])


def test_saved_running_mean_is_the_average_exported():
    model, opt = make(k=3)
    train(model, opt, range(4))
    saved = opt.state_dict()
    means = {}
    for pid, entry in saved["state"].items():
        means[pid] = torch.randn(entry["lawa_history"].shape[1:])
        entry["lawa_mean"] = means[pid]
    out = export_average(model, saved)
    ids = saved["param_groups"][0]["params"]
    for (name, _), pid in zip(model.named_parameters(), ids):
        assert torch.equal(out[name], means[pid])


def mismatches():
    def extra_param(model, sd):
        model.register_parameter("extra", nn.Parameter(torch.zeros(2)))

    def other_shape(model, sd):
        model.body = nn.Linear(4, 5)

    def other_dtype(model, sd):
        model.double()

    def other_name(model, sd):
        for g in sd["param_groups"]:
            g["param_names"] = [n.replace("body", "trunk") for n in g["param_names"]]

    def some_names(model, sd):
        sd["param_groups"][0]["param_names"] = ["emb.weight"]
        sd["param_groups"].append({**sd["param_groups"][0], "params": [], "lawa": sd["param_groups"][0]["lawa"]})
        del sd["param_groups"][1]["param_names"]

    def plain_optimizer(model, sd):
        for g in sd["param_groups"]:
            del g["lawa"]

    def no_history(model, sd):
        for entry in sd["state"].values():
            del entry["lawa_history"]

    def bad_counter(model, sd):
        sd["param_groups"][0]["lawa"]["pushes"] = -1

    def no_params(model, sd):
        del sd["param_groups"][0]["params"]

    def setting(key, value):
        def edit(model, sd):
            for g in sd["param_groups"]:
                g["lawa"][key] = value
        return edit

    def names_as_text(model, sd):
        sd["param_groups"][0]["param_names"] = "emb.weight"

    def fewer_names(model, sd):
        sd["param_groups"][0]["param_names"] = sd["param_groups"][0]["param_names"][:-1]

    def twice_named(model, sd):
        names = sd["param_groups"][0]["param_names"]
        names[1] = names[0]

    return {
        "no-params": (no_params, False, "param group 0 of source must be a dict with a 'params' list"),
        "bad-k": (setting("k", 0), False, "k=0; a LAWA state dict has an int >= 1"),
        "bad-mode": (setting("mode", "median"), False, "mode='median'; accepted"),
        "bad-history-dtype": (setting("history_dtype", "int16"), False, "history_dtype='int16'; accepted"),
        "names-as-text": (names_as_text, True, "param_names must be a list of str, got 'emb.weight'"),
        "fewer-names": (fewer_names, True, r"has \d+ parameters but \d+ param_names"),
        "twice-named": (twice_named, True, "one parameter of model, twice"),
        "count": (extra_param, False, "source holds 5 parameters .* but model has 6"),
        "shape": (other_shape, False, "shape"),
        "dtype": (other_dtype, False, "dtype torch.float32, model needs torch.float64"),
        "name": (other_name, True, "'trunk.weight'"),
        "some-names": (some_names, True, "param_names in some param groups"),
        "plain-optimizer": (plain_optimizer, False, "not saved by LAWA.state_dict()"),
        "no-history": (no_history, False, r"model parameter .emb.weight.\): the state_dict holds no lawa_history"),
        "bad-counter": (bad_counter, False, r"lawa 'pushes' must be an int in \[0, 2\*\*62\], got -1"),
    }


@pytest.mark.parametrize("case", mismatches())
def test_mismatched_checkpoint_is_refused_and_changes_nothing(case):
    change, named, message = mismatches()[case]
    torch.manual_seed(0)
    model = Net()
    params = model.named_parameters() if named else model.parameters()
    opt = LAWA(torch.optim.SGD(params, lr=0.1), k=2)
    train(model, opt, range(2))
    saved = roundtrip(opt.state_dict())
    target = Net()
    change(target, saved)
    before, kept = fingerprint(model=target), copy.deepcopy(saved)
    with pytest.raises(ValueError, match=message):
        export_average(target, saved)
    assert_same(fingerprint(model=target), before)
    assert_same(saved, kept)


def test_misuse_of_a_live_lawa_is_refused_and_changes_nothing():
    model, opt = make(k=2)
    before = fingerprint(opt, model=model)
    with pytest.raises(RuntimeError, match="no snapshot"):
        export_average(model, opt)
    assert_same(fingerprint(opt, model=model), before)
    with pytest.raises(RuntimeError, match="no snapshot"):
        export_average(model, roundtrip(opt.state_dict()))
    assert_same(fingerprint(opt, model=model), before)

    train(model, opt, range(2))
    other = Net()
    before, before_other = fingerprint(opt, model=model), fingerprint(model=other)
    with pytest.raises(ValueError, match="not a parameter of model"):
        export_average(other, opt)
    with pytest.raises(TypeError, match="source must be a LAWA"):
        export_average(model, [p for p in model.parameters()])
    assert_same(fingerprint(opt, model=model), before)
    assert_same(fingerprint(model=other), before_other)

    opt.swap_to_average()
    before = fingerprint(opt, model=model)
    with pytest.raises(RuntimeError, match="outside `with opt.averaged"):
        export_average(model, opt)
    assert_same(fingerprint(opt, model=model), before)
    opt.swap_back()


def rng_states():
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])]


def test_bn_loader_recomputes_statistics_on_a_copy(backend, device):
    model, opt = make(backend=backend, device=device, k=3)
    train(model, opt, range(4))
    model.eval()
    loader = batches(100, n=4, device=device)
    plain = export_average(model, opt)
    before = fingerprint(opt, model=model)

    torch.manual_seed(7)
    rng = rng_states()
    out = export_average(model, opt, bn_loader=loader)
    assert_same(rng_states(), rng)  # dropout in the BN pass drew from a fork
    assert_same(fingerprint(opt, model=model), before)

    oracle = copy.deepcopy(model)
    oracle.load_state_dict(plain)
    torch.manual_seed(7)
    update_bn(loader, oracle)
    assert_same(out, {k: v for k, v in oracle.state_dict().items()})
    assert not torch.equal(out["bn.running_mean"], model.bn.running_mean)
    for name in ("emb.weight", "body.weight", "bn.weight"):
        assert torch.equal(out[name], plain[name])


def test_export_saves_with_torch_save_and_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, opt = make(k=2)
    train(model, opt, range(3))
    out = export_average(model, opt)
    safetensors_torch.save_file(out, tmp_path / "avg.safetensors")  # refuses shared storage
    torch.save(out, tmp_path / "avg.pt")
    for loaded in (safetensors_torch.load_file(tmp_path / "avg.safetensors"), torch.load(tmp_path / "avg.pt")):
        fresh = Net()
        fresh.load_state_dict(loaded)
        assert_same(fresh.state_dict(), out)

import dataclasses
import itertools
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import nas
from nas.data import DataSplit, digits
from nas.space import load_space
from nas.supernet import Supernet, recalibrate_bn
from nas.train import (
    TrainSettings,
    alpha_divergence,
    calibration_batches,
    load_checkpoint,
    score_subnet,
    subnet_loss,
    train_supernet,
)


def _randomise(model: nn.Module) -> None:
    """Weights with O(1) outputs, so a 1e-5 agreement is a real check (the default init gives tiny logits)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 2 / m.in_features ** 0.5)


V2_SPACE = Path(__file__).parent / "v2_space.yaml"


@pytest.mark.parametrize(("name", "n"), [("mobilenetv3_compact", 8), ("mobilenetv3_small", 2),
                                         ("mobilenetv3_large", 2), (str(V2_SPACE), 8)])
def test_extracted_subnets_match_the_active_supernet(name: str, n: int) -> None:
    space = load_space(name)
    supernet = Supernet(space)
    _randomise(supernet)
    res = space.input.resolution
    batch = 8 if res <= 32 else 2
    calib = [torch.randn(batch, 3, res, res) for _ in range(2)]
    rng = random.Random(1)
    specs = [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(n))]
    if space.reference_spec() is not None:
        specs.append(space.reference_spec())
    for spec in specs:
        recalibrate_bn(supernet, calib, spec)
        net = supernet.extract(spec).eval()
        supernet.eval()
        assert isinstance(net, nas.model.Network) and net.spec == spec
        # The extracted network is nas.build_model(spec) with weights: same keys and shapes.
        fresh = nas.build_model(spec)
        assert [(k, v.shape) for k, v in net.state_dict().items()] == [
            (k, v.shape) for k, v in fresh.state_dict().items()]
        x = torch.randn(2, 3, res, res)
        with torch.no_grad():
            out, ref = supernet(x, spec), net(x)
        assert out.abs().max() > 0.2  # outputs of order one, not ~0.01
        assert (out - ref).abs().max().item() <= 1e-5


def test_relu6_is_searchable_and_runs_as_relu6() -> None:
    space = load_space(V2_SPACE)
    rng = random.Random(0)
    specs = [space.sample(rng) for _ in range(30)]
    assert {"relu", "relu6", "hswish"} <= {b.activation for s in specs for b in s.blocks}
    # The cost order of the registry: the smallest member takes relu over relu6, the largest hswish.
    assert space.smallest().blocks[1].activation == "relu" and space.largest().blocks[-1].activation == "hswish"
    block = nas.model.InvertedResidual(space.largest().blocks[1], space.batch_norm)
    x = torch.randn(1, block.spec.in_channels, 8, 8) * 50
    as_relu6 = dataclasses.replace(block.spec, activation="relu6")
    with torch.no_grad():
        block.part("expand")[1].bias.fill_(10.0)  # pre-activations far above 6: relu6 clips them, relu does not
        assert not torch.equal(block(x, as_relu6), block(x, dataclasses.replace(block.spec, activation="relu")))


def test_supernet_rejects_a_non_member() -> None:
    supernet = Supernet(load_space("mobilenetv3_compact"))
    with pytest.raises(nas.SpecError, match=r"^input: "):
        supernet(torch.randn(1, 3, 224, 224), nas.load_spec("mobilenet_v3_small"))


def test_subnets_share_weights() -> None:
    space = load_space("mobilenetv3_compact")
    supernet = Supernet(space)
    # One set of module names: the supernet's are the largest network's, nothing registered twice.
    assert list(supernet.state_dict()) == list(nas.build_model(space.largest()).state_dict())
    small = supernet.extract(space.smallest())
    big = supernet.extract(space.largest())
    # The smallest's first depthwise 3x3 kernel is the centre of the largest's 7x7.
    w_small = small.features[1].block[0][0].weight
    w_big = big.features[1].block[1][0].weight
    assert torch.equal(w_small, w_big[:w_small.shape[0], :, 2:5, 2:5])


def _tiny_digits(n_train: int = 192) -> DataSplit:
    d = digits(32, seed=0)
    x, y = d.train.tensors
    return dataclasses.replace(d, name="digits-tiny", train=torch.utils.data.TensorDataset(x[:n_train], y[:n_train]))


@pytest.mark.parametrize("distillation", ["kl", "alpha", "none"])
def test_a_few_training_steps_reduce_the_loss(tmp_path: Path, distillation: str) -> None:
    space = load_space("mobilenetv3_compact")
    data = _tiny_digits(384)
    # 4 epochs: on the labels (none) the largest learns slower here, every subnet pulling its shared weights
    result = train_supernet(space, data, TrainSettings(epochs=4, batch_size=32, lr=0.1, random_subnets=1,
                                                       distillation=distillation),
                            checkpoint=tmp_path / "sn.pt", progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and all(a > b for a, b in itertools.pairwise(losses)) and losses[-1] < 0.7 * losses[0], \
        losses
    calib = calibration_batches(data, batches=1)
    assert score_subnet(result.supernet, space.largest(), data, calib).accuracy > 0.3  # chance is 0.1


# fair with one member a step: 3 draws an epoch, so a 2-option decision's round is cut by the epoch's end
@pytest.mark.parametrize(("sampling", "random_subnets"), [("sandwich", 1), ("fair", 0)])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          sampling: str, random_subnets: int) -> None:
    space = load_space("mobilenetv3_compact")
    data = _tiny_digits(96)
    settings = TrainSettings(epochs=3, batch_size=32, random_subnets=random_subnets, sampling=sampling, seed=3)
    straight = train_supernet(space, data, settings, checkpoint=tmp_path / "a.pt", progress=False)

    import nas.train as train_module
    real_save = train_module._save_atomic
    saves = []

    def save_then_interrupt(obj: dict, path: Path) -> None:
        real_save(obj, path)
        saves.append(obj["epoch"])
        if obj["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_atomic", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(space, data, settings, checkpoint=tmp_path / "b.pt", progress=False)
    monkeypatch.setattr(train_module, "_save_atomic", real_save)
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 2
    resumed = train_supernet(space, data, settings, checkpoint=tmp_path / "b.pt", progress=False)
    assert not resumed.reused
    for (k, a), b in zip(straight.supernet.state_dict().items(), resumed.supernet.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    again = train_supernet(space, data, settings, checkpoint=tmp_path / "b.pt", progress=False)
    assert again.reused and again.history == resumed.history


def test_fair_members_take_each_option_in_turn() -> None:
    from collections import Counter

    from nas.train import fair_members
    space = load_space("mobilenetv3_compact")  # decisions of 1, 2, 3 and 4 options (stage2's expanded channels)
    draw = fair_members(space, random.Random(0), per_epoch=24)
    drawn = [space.choices(draw()) for _ in range(24)]
    # decisions every member makes (blocks within every stage's least depth): over 12 draws, a whole number of rounds
    # of each, every option came up equally often; uniform draws would almost never manage that for all of them
    always = [key for key in drawn[0] if all(key in d for d in drawn)]
    assert "stage2.block1.expansion" in always and "stage3.block2.kernel" in always
    for half in (drawn[:12], drawn[12:]):
        for key in always:
            counts = Counter(d[key] for d in half)
            assert len(set(counts.values())) == 1, (key, counts)
    assert len({tuple(sorted(d.items())) for d in drawn}) == 24  # distinct members, not one cycle repeated
    # the rounds restart each epoch: with 3 draws an epoch, a 2-option decision's first two draws of every epoch
    # make one round (without the restart, every other epoch's would straddle two rounds: equal half the time)
    per_epoch = fair_members(space, random.Random(1), per_epoch=3)
    se = [space.choices(per_epoch())["stage1.block1.se"] for _ in range(30)]
    assert all(se[k] != se[k + 1] for k in range(0, 30, 3)), se


def test_a_setting_added_later_keeps_the_caches_keyed_before_it() -> None:
    from nas._schema import digest, from_data, to_data
    # TrainSettings' cache key as it was before `sampling` existed (commit 44f3140): supernets and trained networks
    # cached then are found now
    assert digest(TrainSettings()) == "8ebfb6b0f6"
    assert "sampling" not in to_data(TrainSettings())
    fair = TrainSettings(sampling="fair")
    assert to_data(fair)["sampling"] == "fair" and digest(fair) != digest(TrainSettings())
    assert from_data(TrainSettings, to_data(fair)) == fair and from_data(TrainSettings, to_data(TrainSettings())) \
        == TrainSettings()
    with pytest.raises(nas.SpecError, match=r"^sampling: 'uniform' is not one of 'sandwich', 'fair'$"):
        TrainSettings(sampling="uniform")
    assert "distillation" not in to_data(TrainSettings())
    assert digest(TrainSettings(distillation="alpha")) != digest(TrainSettings())
    with pytest.raises(nas.SpecError, match=r"^distillation: 'kd' is not one of 'kl', 'alpha', 'none'$"):
        TrainSettings(distillation="kd")


def test_alpha_divergence_trains_each_image_on_the_larger_of_its_two_divergences() -> None:
    torch.manual_seed(0)
    logits, teacher = torch.randn(64, 10) * 0.3, (torch.randn(64, 10) * 0.3).softmax(dim=1)

    def closed_form(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_q = x.log_softmax(dim=1)
        q = log_q.exp()
        kl = (teacher * (teacher.log() - log_q)).sum(dim=1)  # D_+1
        chi = (q * (q / teacher - 1)).sum(dim=1) / 2  # D_-1
        return torch.where(chi > kl, chi, kl).mean(), chi > kl

    expected_x = logits.clone().requires_grad_()
    expected, minus = closed_form(expected_x)
    expected.backward()
    x = logits.clone().requires_grad_()
    value = alpha_divergence(x, teacher)
    value.backward()
    # both divergences train some images here, and no ratio q/p reaches the clip: value and gradient are the
    # divergence's own
    assert 0 < int(minus.sum()) < 64 and float((logits.softmax(dim=1) / teacher).max()) < 5
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(x.grad, expected_x.grad)
    assert float(alpha_divergence(logits, logits.softmax(dim=1))) == pytest.approx(0, abs=1e-6)
    # where the subnet is confident and the teacher is not (q/p = 8.8 > 5), D_-1 trains the image with the ratio
    # clipped at 5 and held as a weight: the gradient of sum q * min(q/p, 5), not of the divergence itself
    confident, unsure = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.1, 0.9]])
    x = confident.clone().requires_grad_()
    alpha_divergence(x, unsure).backward()
    q = confident.softmax(dim=1)
    expected_x = confident.clone().requires_grad_()
    (expected_x.softmax(dim=1) * (q / unsure).clamp(max=5)).sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad)
    unclipped = confident.clone().requires_grad_()
    (unclipped.softmax(dim=1) ** 2 / unsure).sum().div(2).backward()
    assert float(unclipped.grad.abs().max()) > 1.5 * float(x.grad.abs().max())


def test_each_distillation_trains_the_subnets_on_its_own_target() -> None:
    import torch.nn.functional as F
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    soft, other = torch.randn(16, 10).softmax(dim=1), torch.randn(16, 10).softmax(dim=1)
    kl, alpha = subnet_loss(TrainSettings()), subnet_loss(TrainSettings(distillation="alpha"))
    torch.testing.assert_close(kl(logits, labels, soft), F.cross_entropy(logits, soft))
    torch.testing.assert_close(alpha(logits, labels, soft), alpha_divergence(logits, soft))
    # none: the labels, smoothed as the largest's are, whatever the largest predicts
    none = subnet_loss(TrainSettings(distillation="none", label_smoothing=0.1))
    torch.testing.assert_close(none(logits, labels, soft), F.cross_entropy(logits, labels, label_smoothing=0.1))
    torch.testing.assert_close(none(logits, labels, other), none(logits, labels, soft))
    assert float(kl(logits, labels, other)) != pytest.approx(float(kl(logits, labels, soft)))


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(nas.SpecError, match=r"bad\.pt: not a readable supernet checkpoint"):
        load_checkpoint(bad)
    torch.save({"something": 1}, bad)
    with pytest.raises(nas.SpecError, match="not a supernet checkpoint of this version"):
        load_checkpoint(bad)
    space = load_space("mobilenetv3_compact")
    data = _tiny_digits(64)
    train_supernet(space, data, TrainSettings(epochs=1, batch_size=32, random_subnets=0), checkpoint=bad.with_name(
        "x.pt"), progress=False)
    with pytest.raises(nas.SpecError, match="was trained with another network, data set or settings"):
        train_supernet(space, data, TrainSettings(epochs=2, batch_size=32, random_subnets=0),
                       checkpoint=bad.with_name("x.pt"), progress=False)

"""AFT step: the update equals (1 - alpha) g1 + alpha g2 computed independently;
BatchNorm statistics come from the unperturbed pass only; theta is restored exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from defense_core.imageset import ImageSet
from defense_core.tsbd.aft import AFTStepper
from defense_core.tsbd.config import AFTConfig
from tests.unit.tsbd_fixtures import TinyNet, single_thread  # noqa: F401 (autouse fixture)


def _setup(seed: int = 0) -> tuple[TinyNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyNet().double()
    with torch.no_grad():  # non-trivial BN affine parameters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(12) % 4
    return model, x, y


def _expected_update(model: TinyNet, x: torch.Tensor, y: torch.Tensor, *, alpha: float, rho: float,
                     lr: float, norm: str) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    names = [n for n, _ in ref.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in ref.named_parameters()}

    def grads(params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        buffers = {n: b.clone() for n, b in ref.named_buffers()}
        loss = F.cross_entropy(functional_call(ref, {**params, **buffers}, (x,)), y)
        return list(torch.autograd.grad(loss, [params[n] for n in names]))

    g1 = grads(theta)
    if norm == "tensor":
        steps = [rho * g / g.norm() for g in g1]
    else:
        total = torch.sqrt(sum((g * g).sum() for g in g1))
        steps = [rho * g / total for g in g1]
    perturbed = {n: (theta[n] + e).detach().requires_grad_(True) for n, e in zip(names, steps, strict=True)}
    g2 = grads(perturbed)
    return {n: (theta[n] - lr * ((1 - alpha) * a + alpha * b)).detach() for n, a, b in zip(names, g1, g2, strict=True)}


@pytest.mark.parametrize("norm", ["tensor", "global"])
def test_one_aft_step_matches_independent_computation(norm: str) -> None:
    model, x, y = _setup()
    cfg = AFTConfig(alpha=0.7, rho=0.05, perturb_norm=norm)
    expected = _expected_update(model, x, y, alpha=0.7, rho=0.05, lr=0.5, norm=norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # first step: buffer = g
    AFTStepper(model, optimizer, cfg).step(x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], msg=name)


def test_alpha_zero_is_plain_sgd_with_one_pass() -> None:
    model, x, y = _setup(1)
    expected = _expected_update(model, x, y, alpha=0.0, rho=0.05, lr=0.5, norm="tensor")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    AFTStepper(model, torch.optim.SGD(model.parameters(), lr=0.5), AFTConfig(alpha=0.0)).step(x, y)
    assert len(calls) == 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], msg=name)


def test_aft_makes_exactly_two_passes_and_restores_theta_bitwise() -> None:
    model, x, y = _setup(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    AFTStepper(model, torch.optim.SGD(model.parameters(), lr=0.0), AFTConfig()).step(x, y)
    assert len(calls) == 2
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_batchnorm_statistics_come_from_the_unperturbed_pass_only() -> None:
    model, x, y = _setup(3)
    plain = copy.deepcopy(model).train()
    with torch.no_grad():
        plain(x)  # one plain forward in train mode from the same state
    AFTStepper(model, torch.optim.SGD(model.parameters(), lr=0.1), AFTConfig(alpha=0.9, rho=0.5)).step(x, y)
    for (name, buf), (_, ref) in zip(model.named_buffers(), plain.named_buffers(), strict=True):
        assert torch.equal(buf, ref), name
    assert int(model.bn1.num_batches_tracked) == 1


def test_step_reports_first_pass_loss_and_accuracy() -> None:
    model, x, y = _setup(4)
    probe = copy.deepcopy(model).train()
    logits = probe(x)
    loss = F.cross_entropy(logits, y)
    out = AFTStepper(model, torch.optim.SGD(model.parameters(), lr=0.1), AFTConfig()).step(x, y)
    torch.testing.assert_close(out.loss, loss.detach())
    assert int(out.correct) == int((logits.argmax(1) == y).sum())


def test_min_steps_schedule() -> None:
    cfg = AFTConfig(epochs=20, min_steps=200)
    assert cfg.num_epochs(1) == 200     # 200 images, batch 256
    assert cfg.num_epochs(10) == 20     # the paper's 2,500 images
    assert cfg.num_epochs(7) == 29      # ceil(200 / 7)
    assert AFTConfig(min_steps=0).num_epochs(1) == 20


def test_aft_config_validation() -> None:
    for kwargs in ({"alpha": 1.5}, {"rho": 0.0}, {"perturb_norm": "layer"}, {"lr": -1.0}, {"epochs": 0},
                   {"noise_blend": 1.5}, {"noise_blend": -0.1}, {"bn_reestimate": "yes"}):
        with pytest.raises(ValueError):
            AFTConfig(**kwargs)  # type: ignore[arg-type]


def test_noise_blend_mixes_the_chosen_share_with_noise_and_keeps_the_rest() -> None:
    from defense_core.transforms import noise_blend

    x = (torch.arange(200 * 64) % 256).to(torch.uint8).view(200, 1, 8, 8)
    assert torch.equal(noise_blend(x, 0.0, torch.Generator().manual_seed(0)), x)
    out = noise_blend(x, 0.5, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    changed = (out != x).flatten(1).any(1)
    assert 70 <= int(changed.sum()) <= 130  # about half of the images, the others untouched
    # a blended image is (1 - a) x + a noise with a in [0.1, 0.3]: within 0.3 * 255 of x everywhere,
    # and its mean difference from x is well above rounding
    diff = (out[changed].float() - x[changed].float()).abs()
    assert float(diff.max()) <= 0.3 * 255 + 0.5 and float(diff.flatten(1).mean(1).min()) > 5
    assert torch.equal(out, noise_blend(x, 0.5, torch.Generator().manual_seed(0)))  # seeded
    assert bool((noise_blend(x, 1.0, torch.Generator().manual_seed(1)) != x).flatten(1).any(1).all())


def test_noise_blend_reaches_fine_tuning_batches_only_when_asked() -> None:
    from defense_core.device import CPU_FP32
    from defense_core.transforms import NO_AUGMENT
    from defense_core.tsbd.batches import TrainBatches
    from tests.unit.tsbd_fixtures import SPEC, quadrant_set

    data = quadrant_set(32, seed=3)

    def first_batch(share: float) -> torch.Tensor:
        batches = TrainBatches(data, spec=SPEC, batch_size=32, augment_config=NO_AUGMENT,
                               generator=torch.Generator().manual_seed(0), runtime=CPU_FP32, noise_blend=share)
        return next(iter(batches.epoch()))[0]

    plain = first_batch(0.0)
    assert torch.equal(plain, first_batch(0.0))
    assert not torch.equal(plain, first_batch(1.0))


def test_bn_reestimate_sets_the_running_statistics_of_the_clean_set() -> None:
    from defense_core.transforms import Normalizer
    from defense_core.tsbd.aft import reestimate_bn_
    from tests.unit.tsbd_fixtures import SPEC, quadrant_set

    torch.manual_seed(0)
    model = TinyNet().eval()
    data = quadrant_set(40, seed=5)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    reestimate_bn_(model, data, spec=SPEC, batch_size=40)
    assert not model.training  # mode kept
    # known answer for the first BN: per-channel mean and unbiased variance of conv1 over the set
    with torch.no_grad():
        act = model.conv1(Normalizer(SPEC)(data.x))
    torch.testing.assert_close(model.bn1.running_mean, act.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.bn1.running_var, act.var(dim=(0, 2, 3), unbiased=True))
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_bn_reestimate_weighs_every_image_alike_when_the_set_is_not_a_multiple_of_the_batch() -> None:
    from defense_core.transforms import Normalizer
    from defense_core.tsbd.aft import reestimate_bn_
    from tests.unit.tsbd_fixtures import SPEC, quadrant_set

    torch.manual_seed(0)
    model = TinyNet()
    data = quadrant_set(41, seed=6)
    reestimate_bn_(model, data, spec=SPEC, batch_size=32)  # two batches of 21 and 20, not 32 and 9
    with torch.no_grad():
        act = model.conv1(Normalizer(SPEC)(data.x))
    first, second = act[:21], act[21:]
    torch.testing.assert_close(model.bn1.running_mean, (first.mean(dim=(0, 2, 3)) + second.mean(dim=(0, 2, 3))) / 2)
    torch.testing.assert_close(model.bn1.running_mean, act.mean(dim=(0, 2, 3)), atol=2e-3, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_bn_reestimate_gives_a_torchscript_model_the_statistics_of_the_eager_one() -> None:
    from defense_core.tsbd.aft import reestimate_bn_
    from tests.unit.tsbd_fixtures import SPEC, quadrant_set

    torch.manual_seed(0)
    eager = TinyNet().eval()
    scripted = torch.jit.script(copy.deepcopy(eager))
    data = quadrant_set(41, seed=2)
    reestimate_bn_(eager, data, spec=SPEC, batch_size=16)
    reestimate_bn_(scripted, data, spec=SPEC, batch_size=16)
    assert not scripted.training
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(scripted.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert int(eager.bn1.num_batches_tracked) == 3  # three batches of 14, 14 and 13


def test_bn_reestimate_of_momentum_none_layers_and_failed_passes() -> None:
    from defense_core.tsbd.aft import reestimate_bn_
    from tests.unit.tsbd_fixtures import SPEC, quadrant_set

    torch.manual_seed(0)
    model = TinyNet()
    reference = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    data = quadrant_set(40, seed=4)
    reestimate_bn_(model, data, spec=SPEC, batch_size=16)
    reestimate_bn_(reference, data, spec=SPEC, batch_size=16)
    torch.testing.assert_close(model.bn1.running_mean, reference.bn1.running_mean)
    torch.testing.assert_close(model.bn1.running_var, reference.bn1.running_var)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = ImageSet(x=torch.cat([data.x, data.x], dim=1), y=data.y)  # two channels, the network takes one
    with pytest.raises(RuntimeError):
        reestimate_bn_(model, broken, spec=SPEC, batch_size=16)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # statistics restored


def test_fine_tuning_reestimates_bn_only_with_noise_blends_unless_told() -> None:
    from defense_core.device import CPU_FP32
    from defense_core.transforms import NO_AUGMENT
    from defense_core.tsbd.aft import finetune_, reestimate_bn_
    from tests.unit.tsbd_fixtures import SPEC, quadrant_set

    data = quadrant_set(32, seed=3)

    def tuned(**kwargs: object) -> TinyNet:
        torch.manual_seed(0)
        model = TinyNet()
        finetune_(model, data, spec=SPEC, config=AFTConfig(epochs=2, min_steps=0, **kwargs), augment=NO_AUGMENT,
                  batch_size=16, generator=torch.Generator().manual_seed(0), runtime=CPU_FP32)
        return model

    def reestimated(model: TinyNet) -> bool:
        again = copy.deepcopy(model)
        reestimate_bn_(again, data, spec=SPEC, batch_size=16)
        pairs = zip(model.named_buffers(), again.named_buffers(), strict=True)
        stats = [(a, b) for (n, a), (_, b) in pairs if "running" in n]
        return all(torch.equal(a, b) for a, b in stats)

    assert AFTConfig(noise_blend=0.5).reestimates_bn and not AFTConfig().reestimates_bn
    assert reestimated(tuned(noise_blend=0.5))
    assert not reestimated(tuned())  # plain fine-tuning keeps its running averages
    assert reestimated(tuned(bn_reestimate=True))
    assert not reestimated(tuned(noise_blend=0.5, bn_reestimate=False))

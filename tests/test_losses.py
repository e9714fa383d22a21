"""Loss terms, EMA and schedule against independent computations."""

import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from unilip.errors import UserError
from unilip.losses import ConvNeXtLogitLoss, LeCamRegularizer, LPIPSLoss, TokenizerLoss, hinge_d_loss, hinge_g_loss
from unilip.models.discriminator import PatchDiscriminator
from unilip.training.ema import EMA
from unilip.training.schedules import cosine_with_warmup


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(5 / 6 + 1)
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def test_lecam_regulariser_and_its_ema():
    reg = LeCamRegularizer(decay=0.9)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    reg.update(real, fake)  # first update copies the means
    assert reg.ema_real.item() == pytest.approx(2.0) and reg.ema_fake.item() == pytest.approx(-0.5)
    reg.update(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert reg.ema_real.item() == pytest.approx(0.9 * 2.0) and reg.ema_fake.item() == pytest.approx(0.9 * -0.5 + 0.1)
    # EMAs now 1.8 (real) and -0.35 (fake); by hand:
    # mean(relu([1, 3] + 0.35)^2) = (1.35^2 + 3.35^2) / 2 = 6.5225
    # mean(relu(1.8 - [-1, 0])^2) = (2.8^2 + 1.8^2) / 2 = 5.54
    assert reg(real, fake).item() == pytest.approx(6.5225 + 5.54)
    # logits beyond the other side's EMA cost nothing
    assert reg(torch.tensor([-1.0]), torch.tensor([2.0])).item() == pytest.approx(0.0)


def test_tokenizer_loss_weights_and_names():
    loss = TokenizerLoss(l2_weight=1.0, l1_weight=0.5, perceptual_weight=0.0, distill_weight=2.0, gan_weight=0.1)
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    terms = loss.reconstruction(x, y)
    assert set(terms) == {"l2", "l1"}  # perceptual weight 0: no LPIPS/ConvNeXt built or computed
    assert terms["l2"].item() == pytest.approx(((x - y) ** 2).mean().item(), rel=1e-6)
    assert terms["l1"].item() == pytest.approx(0.5 * (x - y).abs().mean().item(), rel=1e-6)
    s, t = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    assert loss.distillation(s, t)["distill"].item() == pytest.approx(2.0 * ((s - t) ** 2).mean().item(), rel=1e-6)
    assert loss.generator_adversarial(torch.ones(2, 1, 3, 3))["gan_g"].item() == pytest.approx(-0.1)
    assert loss.generator_adversarial(torch.full((2, 1, 3, 3), 2.0))["gan_g"].item() == pytest.approx(-0.2)


def test_the_loss_classes_defaults_are_the_recipes_objective():
    """`TokenizerLoss()` in Python is the objective conf/loss/unilip.yaml and the paper give: L2 + 1.1 x (LPIPS +
    0.1 ConvNeXt-S logits at 224 px) + 0.1 GAN with LeCam 0.001 (EMA decay 0.999), no L1, no distillation."""
    from omegaconf import OmegaConf

    loss = TokenizerLoss()
    got = {
        name: getattr(loss, f"{name}_weight") for name in ("l2", "l1", "lpips", "convnext", "distill", "gan", "lecam")
    }
    expected = {"l2": 1.0, "l1": 0.0, "lpips": 1.1, "convnext": 0.11, "distill": 0.0, "gan": 0.1, "lecam": 0.001}
    assert got == pytest.approx(expected)
    assert loss.convnext.input_size == 224
    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "loss" / "unilip.yaml")
    from_config = {name: config[f"{name}_weight"] for name in ("l2", "l1", "gan", "lecam")}
    from_config |= {"lpips": config.perceptual_weight * config.lpips_weight}
    from_config |= {"convnext": config.perceptual_weight * config.convnext_weight}
    assert from_config == pytest.approx({name: expected[name] for name in from_config})
    reg = LeCamRegularizer()
    reg.update(torch.tensor([1.0]), torch.tensor([0.0]))  # the first update copies the means
    reg.update(torch.tensor([0.0]), torch.tensor([1.0]))
    assert reg.ema_real.item() == pytest.approx(0.999, rel=1e-5)
    assert reg.ema_fake.item() == pytest.approx(0.001, rel=1e-4)  # float32: 1 - 0.999


def test_the_tokenizer_loss_hands_its_weight_files_to_both_networks(tmp_path):
    """`loss.lpips_vgg_weights` and `loss.convnext_weights` reach the networks: both read the files given."""
    import timm
    from safetensors.torch import save_file

    vgg, convnext = torchvision.models.vgg16(), timm.create_model("convnext_small", pretrained=False)
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    save_file(convnext.state_dict(), tmp_path / "convnext.safetensors")
    loss = TokenizerLoss(lpips_vgg_weights=str(tmp_path / "vgg16.pth"),
                         convnext_weights=str(tmp_path / "convnext.safetensors"))  # fmt: skip
    assert loss.lpips.pretrained and loss.convnext.pretrained
    assert torch.equal(getattr(loss.lpips.net.net.slice1, "0").weight, vgg.features[0].weight)
    assert torch.equal(loss.convnext.net.stem[0].weight, convnext.stem[0].weight)


def test_lpips_reads_user_vgg_weights(tmp_path):
    vgg = torchvision.models.vgg16()
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    lpips = LPIPSLoss(str(tmp_path / "vgg16.pth"))
    assert lpips.pretrained
    assert torch.equal(getattr(lpips.net.net.slice1, "0").weight, vgg.features[0].weight)
    assert torch.equal(getattr(lpips.net.net.slice5, "28").weight, vgg.features[28].weight)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    # images are [0, 1]; the lpips library's own convention is [-1, 1] (its documented call, converted here)
    library = lpips.net(2 * y - 1, 2 * x - 1).flatten()
    assert torch.allclose(lpips(x, y), library, rtol=1e-5) and (library > 0).all()
    assert not torch.allclose(lpips(x, y), lpips.net(y, x).flatten(), rtol=1e-2)  # unconverted inputs differ


def test_perceptual_losses_warn_loudly_without_weights(caplog, monkeypatch):
    monkeypatch.setattr("unilip.losses.perceptual._torchvision_vgg16_cached", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert not LPIPSLoss(None).pretrained
        assert not ConvNeXtLogitLoss(None, input_size=32).pretrained
    assert caplog.records[0].getMessage() == (
        "LPIPS: no VGG-16 weights (set loss.lpips_vgg_weights=<vgg16-397923af.pth>); using a RANDOM "
        "backbone: this is not the LPIPS of the recipe"
    )
    assert "set loss.convnext_weights=<convnext_small weights>); using a RANDOM network" in caplog.text


def test_lpips_uses_torchvisions_cached_vgg16_when_no_file_is_given(monkeypatch):
    """Without a file, LPIPS takes torchvision's ImageNet VGG-16 from the torch hub cache when it is there
    (lpips' pretrained backbone, pnet_rand=False); recorded here instead of loading 528 MB."""
    import lpips as library

    built = []
    real = library.LPIPS

    def record(net, pnet_rand, verbose):
        built.append(pnet_rand)
        return real(net=net, pnet_rand=True, verbose=verbose)

    monkeypatch.setattr(library, "LPIPS", record)
    monkeypatch.setattr("unilip.losses.perceptual._torchvision_vgg16_cached", lambda: True)
    assert LPIPSLoss(None).pretrained and built == [False]
    monkeypatch.setattr("unilip.losses.perceptual._torchvision_vgg16_cached", lambda: False)
    assert not LPIPSLoss(None).pretrained and built == [False, True]


def test_a_failed_download_names_the_option_to_set(monkeypatch):
    """`lpips_vgg_weights=download` asks torchvision for the ImageNet VGG-16; offline, the error names
    the cause and the option that takes a local file."""
    asked = []

    def offline(weights=None):
        asked.append(weights)
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "vgg16", offline)
    with pytest.raises(RuntimeError) as error:
        LPIPSLoss("download")
    assert asked == ["IMAGENET1K_V1"]
    assert str(error.value) == (
        "could not download perceptual-loss weights (OSError: no network); "
        "set loss.lpips_vgg_weights=<local weights file>"
    )
    import timm

    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False: offline())
    with pytest.raises(RuntimeError, match=r"\(OSError: no network\); set loss.convnext_weights=<local weights file>$"):
        ConvNeXtLogitLoss("download")


def test_a_downloaded_vgg16_is_then_read_from_the_hub_cache(monkeypatch, capsys):
    """After `lpips_vgg_weights=download` fetched torchvision's VGG-16 into the hub cache, LPIPS uses that file
    (lpips' pretrained backbone), frozen; building it prints nothing."""
    import lpips as library

    built, real = [], library.LPIPS

    def record(net, pnet_rand, verbose):
        built.append(pnet_rand)
        return real(net=net, pnet_rand=True, verbose=verbose)

    real_vgg16, downloads = torchvision.models.vgg16, []

    def downloaded(**kwargs):  # the download, done; lpips builds its own backbone with this function too
        if kwargs.get("weights") == "IMAGENET1K_V1":
            return downloads.append(True)
        return real_vgg16(**kwargs)

    monkeypatch.setattr(torchvision.models, "vgg16", downloaded)
    monkeypatch.setattr(library, "LPIPS", record)
    monkeypatch.setattr("unilip.losses.perceptual._torchvision_vgg16_cached", lambda: True)
    lpips = LPIPSLoss("download")
    assert lpips.pretrained and built == [False] and downloads == [True]
    assert not any(parameter.requires_grad for parameter in lpips.parameters())
    monkeypatch.undo()
    LPIPSLoss(None)
    assert capsys.readouterr().out == ""


def test_convnext_logit_loss_is_the_mse_of_imagenet_logits():
    """Per image: mean over the 1000 classes of the squared logit difference, the network fed
    ImageNet-normalised images resized (antialiased) to its input size, whatever their shape."""
    loss = ConvNeXtLogitLoss(None, input_size=64)
    x, y = torch.rand(2, 3, 96, 80), torch.rand(2, 3, 96, 80)  # neither side 64: both are resized

    def logits(images):
        images = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return loss.net((images - mean) / std)

    with torch.no_grad():
        expected = (logits(y) - logits(x)).square().mean(dim=1)
        assert torch.allclose(loss(x, y), expected, rtol=1e-5)
        tall = torch.rand(1, 3, 80, 64)  # one side already 64: still resized
        assert torch.allclose(loss(tall, x[:1]), (logits(x[:1]) - logits(tall)).square().mean(dim=1), rtol=1e-5)
        wide = torch.rand(1, 3, 64, 80)
        assert torch.allclose(loss(wide, x[:1]), (logits(x[:1]) - logits(wide)).square().mean(dim=1), rtol=1e-5)


def test_downloaded_convnext_weights_are_not_called_random(caplog, monkeypatch):
    import timm

    create = timm.create_model
    downloads = []

    def offline_download(name, pretrained=False, **kwargs):  # what a successful hub download returns
        downloads.append(pretrained)
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_download)
    with caplog.at_level(logging.WARNING):
        assert ConvNeXtLogitLoss("download", input_size=32).pretrained
    assert downloads == [True] and "RANDOM" not in caplog.text


def test_convnext_logit_loss_reads_weights_and_is_zero_on_identity(tmp_path):
    import timm
    from safetensors.torch import save_file

    net = timm.create_model("convnext_small", pretrained=False)
    save_file(net.state_dict(), tmp_path / "convnext.safetensors")
    loss = ConvNeXtLogitLoss(str(tmp_path / "convnext.safetensors"), input_size=64)
    assert torch.equal(loss.net.stem[0].weight, net.stem[0].weight)
    x = torch.rand(1, 3, 48, 48)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-10)
    y = torch.rand(1, 3, 48, 48, requires_grad=True)
    loss(x, y).sum().backward()
    assert y.grad is not None and loss.net.stem[0].weight.grad is None  # the network stays frozen


def test_patch_discriminator_shapes():
    disc = PatchDiscriminator(base_channels=8, num_layers=3)
    assert disc(torch.rand(2, 3, 112, 112)).shape == (2, 1, 12, 12)


def test_ema_matches_a_hand_computed_average():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA({"w": param}, decay=0.5, warmup=False)
    values = [torch.tensor([3.0, 4.0]), torch.tensor([5.0, 0.0])]
    expected = param.detach().clone()
    for value in values:
        param.data.copy_(value)
        ema.update()
        expected = 0.5 * expected + 0.5 * value
    assert torch.allclose(ema.shadows()[0], expected)
    with ema.swapped():
        assert torch.equal(param.data, expected)
    assert torch.equal(param.data, values[-1])  # restored
    assert "w" in dict(ema.named_buffers()) and int(ema.num_updates) == 2


def test_ema_with_decay_other_than_a_half_matches_hand_values():
    """decay = 0.9, where decay and 1 - decay differ: each update keeps 90 % of the average, adds 10 % of the
    weights (by hand: 0 -> 0.9 * 0 + 0.1 * 10 = 1 -> 0.9 * 1 + 0.1 * 20 = 2.9)."""
    # with warm-up the decay is (1 + n) / (10 + n) while below 0.99: 1/10, then 2/11
    # (by hand: 0 -> 0.1 * 0 + 0.9 * 10 = 9 -> 2/11 * 9 + 9/11 * 20 = 198/11 = 18)
    for decay, warmup, expected in [(0.9, False, [1.0, 2.9]), (0.99, True, [9.0, 18.0])]:
        param = torch.nn.Parameter(torch.zeros(2))
        ema = EMA({"w": param}, decay=decay, warmup=warmup)
        for weight, average in zip([10.0, 20.0], expected, strict=True):
            param.data.fill_(weight)
            ema.update()
            assert torch.allclose(ema.shadows()[0], torch.full((2,), average)), (decay, warmup, weight)


def test_ema_warmup_decay():
    ema = EMA({"w": torch.nn.Parameter(torch.zeros(1))}, decay=0.9999, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)
    ema.num_updates.fill_(90)
    assert ema.current_decay() == pytest.approx(91 / 100)


def test_cosine_schedule_with_warmup_and_final_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = cosine_with_warmup(opt, warmup_steps=10, total_steps=110, final_ratio=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-5)  # (0 + 1) / 10 of the peak
    assert lrs[9] == pytest.approx(1e-4)
    assert lrs[10] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(1e-5 + 0.9e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(1e-5) and lrs[119] == pytest.approx(1e-5)


def test_cosine_schedule_edges():
    """Warm-up ending exactly at the total (no cosine part), a one-step cosine, and the accepted ranges."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=5, final_ratio=0.0)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.0])  # step 5 = the end of the one cosine step
    for ratio in (0.0, 1.0):  # both ends of [0, 1] are allowed; 1 keeps the peak LR
        cosine_with_warmup(torch.optim.SGD([param], lr=1.0), 0, 1, ratio)
    for ratio in (-0.1, 1.1):
        with pytest.raises(ValueError, match=f"final LR ratio {ratio} must be in"):
            cosine_with_warmup(torch.optim.SGD([param], lr=1.0), 0, 10, ratio)
    with pytest.raises(ValueError, match="total_steps=0 must be positive"):
        cosine_with_warmup(torch.optim.SGD([param], lr=1.0), 0, 0, 0.1)


def test_ema_defaults_names_and_an_exact_update_count():
    """The recipe's decay with warm-up by default; buffers named after the parameters (dots as "__", which
    checkpoint readers map back); the update count exact far past float32's 2^24."""
    from unilip.training.checkpoints import ema_state

    param = torch.nn.Parameter(torch.tensor([1.0]))
    ema = EMA({"decoder.conv.weight": param})
    assert ema.decay == 0.9999 and ema.current_decay() == pytest.approx(0.1)  # warm-up on: (1 + 0) / (10 + 0)
    assert "decoder__conv__weight" in dict(ema.named_buffers())
    state = {
        "tokenizer.decoder.conv.weight": param.detach() + 1,
        **{f"ema.{k}": v for k, v in ema.state_dict().items()},
    }
    assert torch.equal(ema_state(state, "tokenizer")["decoder.conv.weight"], param.detach())  # the EMA replaces it
    ema.num_updates.fill_(2**24 + 1)
    ema.update()
    assert int(ema.num_updates) == 2**24 + 2


def test_validation_runs_on_the_ema_weights_and_restores_the_raw_ones():
    from unilip.training.ema import ValidatesWithEMA

    class Module(ValidatesWithEMA):
        def __init__(self, ema):
            self.ema = ema

    param = torch.nn.Parameter(torch.tensor([1.0]))
    ema = EMA({"w": param}, decay=0.5, warmup=False)
    param.data.fill_(3.0)
    ema.update()  # shadow 0.5 * 1 + 0.5 * 3 = 2
    module = Module(ema)
    module.on_validation_epoch_start()
    assert param.item() == 2.0
    module.on_validation_epoch_end()
    assert param.item() == 3.0
    with Module(None).ema_weights():  # no EMA: the weights as they are
        assert param.item() == 3.0


def test_tokenizer_loss_weighs_each_term_and_keeps_the_recipes_defaults():
    """Perceptual terms exist for any positive weight (here below 1) and are weight x the network's mean; the
    LeCam term is lecam_weight x the regulariser only when there is one. Defaults: the UniLIP recipe's weights."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(TokenizerLoss).parameters.items()}
    assert defaults["lecam_weight"] == 1e-3 and defaults["gan_weight"] == 0.1 and defaults["l2_weight"] == 1.0
    torch.manual_seed(0)
    loss = TokenizerLoss(perceptual_weight=1.0, lpips_weight=0.5, convnext_weight=0.25)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        terms = loss.reconstruction(x, y)
        assert terms["lpips"].item() == pytest.approx(0.5 * loss.lpips(x, y).mean().item(), rel=1e-5)
        assert terms["convnext"].item() == pytest.approx(0.25 * loss.convnext(x, y).mean().item(), rel=1e-5)
    assert terms["convnext"].item() > 0
    real, fake = torch.tensor([0.5, -0.2]), torch.tensor([-0.4, 0.3])
    with_lecam = loss.discriminator(real, fake, torch.tensor(2.0))
    assert with_lecam["lecam"].item() == pytest.approx(2e-3)
    assert "lecam" not in loss.discriminator(real, fake, None)


def test_perceptual_weights_that_are_missing_not_a_checkpoint_or_miss_a_tensor_are_user_errors(tmp_path):
    """Each is one `error:` line in train.py (a UserError or OSError) naming the file and what is wrong with it."""
    from unilip.errors import UserError

    absent = tmp_path / "absent.pth"
    message = f"perceptual-loss weights '{absent}' do not exist"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        ConvNeXtLogitLoss(str(absent))
    bad = tmp_path / "convnext.pth"
    bad.write_text("not weights")
    with pytest.raises(UserError, match=r"^perceptual-loss weights '.*convnext\.pth' is not a plain PyTorch weights"):
        ConvNeXtLogitLoss(str(bad))
    (tmp_path / "convnext.safetensors").write_text("not weights")
    with pytest.raises(UserError, match=r"^perceptual-loss weights '.*convnext\.safetensors' is not a readable safe"):
        ConvNeXtLogitLoss(str(tmp_path / "convnext.safetensors"))
    state = ConvNeXtLogitLoss(None).net.state_dict()
    state.pop("stem.0.weight")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(
        UserError, match=r"'.*partial\.pth' \(timm convnext_small\) does not .*missing keys: stem\.0\.weight"
    ):
        ConvNeXtLogitLoss(str(tmp_path / "partial.pth"))
    vgg = torchvision.models.vgg16().state_dict()
    vgg.pop("features.28.bias")
    torch.save(vgg, tmp_path / "vgg16.pth")
    with pytest.raises(
        UserError,
        match=r"^perceptual-loss weights '.*vgg16\.pth' lack 1 of VGG-16's tensors \(features\.28\.bias\); give",
    ):
        LPIPSLoss(str(tmp_path / "vgg16.pth"))


def test_the_perceptual_networks_stay_in_eval_mode(tmp_path):
    """Lightning puts the module tree in training mode each epoch: the frozen networks ignore it (LPIPS' dropout
    would otherwise change its value)."""
    for network in (LPIPSLoss(None), ConvNeXtLogitLoss(None, input_size=32)):
        network.train()
        assert not any(module.training for module in network.modules())


def test_the_cached_vgg16_is_torchvisions_own_file(tmp_path, monkeypatch):
    """LPIPS without a weights file looks for the file torchvision's VGG-16 weights download to."""
    from unilip.losses.perceptual import _torchvision_vgg16_cached

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert not _torchvision_vgg16_cached()
    name = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / name).write_bytes(b"")
    assert _torchvision_vgg16_cached()


def constant_state(build, marked: str) -> dict[str, torch.Tensor]:
    """A network's state dict without initialising it (built on the meta device): zeros, `marked` all 0.5."""
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in build().state_dict().items()}
    return {key: torch.full(shape, 0.5) if key == marked else torch.zeros(shape) for key, shape in shapes.items()}


def test_perceptual_weights_saved_inside_a_checkpoint_are_unwrapped_and_a_non_state_dict_is_refused(tmp_path):
    """A weights file may hold the state dict itself or a training checkpoint with it under `state_dict`; a file
    holding anything else (a bare tensor, a list) is one error naming the file."""
    import timm

    vgg = constant_state(torchvision.models.vgg16, "features.28.weight")
    convnext = constant_state(lambda: timm.create_model("convnext_small", pretrained=False), "head.fc.weight")
    torch.save({"state_dict": vgg, "epoch": 3}, tmp_path / "vgg16.ckpt")
    torch.save({"state_dict": convnext}, tmp_path / "convnext.pth")
    lpips = LPIPSLoss(str(tmp_path / "vgg16.ckpt"))
    assert torch.equal(getattr(lpips.net.net.slice5, "28").weight, vgg["features.28.weight"])
    assert torch.equal(ConvNeXtLogitLoss(str(tmp_path / "convnext.pth")).net.head.fc.weight, convnext["head.fc.weight"])
    for held, name in [(torch.zeros(3), "Tensor"), ([torch.zeros(3)], "list")]:
        torch.save(held, tmp_path / "held.pth")
        for build in (LPIPSLoss, ConvNeXtLogitLoss):
            with pytest.raises(UserError, match=rf"^perceptual-loss weights '.*held\.pth' hold a {name}, not a state"):
                build(str(tmp_path / "held.pth"))


def test_a_vgg_file_short_of_tensors_names_the_first_three_and_one_of_the_wrong_shape_names_the_file(tmp_path):
    full = constant_state(torchvision.models.vgg16, "")
    three = ["features.0.bias", "features.2.bias", "features.5.bias"]
    for dropped, listed in [(three, ", ".join(three)), ([*three, "features.7.bias"], ", ".join(three) + ", ...")]:
        torch.save({k: v for k, v in full.items() if k not in dropped}, tmp_path / "vgg16.pth")
        with pytest.raises(UserError) as refused:
            LPIPSLoss(str(tmp_path / "vgg16.pth"))
        assert str(refused.value) == (
            f"perceptual-loss weights '{tmp_path / 'vgg16.pth'}' lack {len(dropped)} of VGG-16's tensors ({listed}); "
            "give torchvision's vgg16-397923af.pth"
        )
    torch.save({**full, "features.0.weight": torch.zeros(64, 3, 5, 5)}, tmp_path / "vgg16.pth")
    # (lpips' own name of features.0.weight: its slices keep torchvision's layer indices)
    match = r"^perceptual-loss weights '.*vgg16\.pth' \(torchvision VGG-16\) does not match .*slice1\.0\.weight \(64, 3"
    with pytest.raises(UserError, match=match):
        LPIPSLoss(str(tmp_path / "vgg16.pth"))


def test_the_convnext_normalisation_is_not_checkpoint_state():
    """The ImageNet mean and std are constants, not state: the loss's state dict is its network's, so a checkpoint
    holds no copy of them and one written before them still loads strictly."""
    loss = ConvNeXtLogitLoss(None, input_size=32)
    assert list(loss.state_dict()) == [f"net.{key}" for key in loss.net.state_dict()]

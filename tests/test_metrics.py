"""Metrics: PSNR/SSIM against skimage, LPIPS and FID offline paths, and missing-weights errors."""
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from util.metrics import (ALEXNET_URL, FID_INCEPTION_URL, LPIPS, MissingWeightsError, _fid_inception_architecture,
                          fid_from_folders, psnr, ssim)


def _pair(shape, seed, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    return x, (x + noise * torch.randn(shape, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 3, 17, 40), (2, 1, 9, 9)])
def test_psnr_ssim_match_skimage(shape):
    x, y = _pair(shape, seed=shape[2])
    ours_p, ours_s = psnr(x, y), ssim(x, y)
    for i in range(shape[0]):
        a, b = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        assert ours_p[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1), abs=1e-5)
        assert ours_s[i].item() == pytest.approx(structural_similarity(a, b, channel_axis=-1, data_range=1), abs=1e-5)


def test_ssim_of_identical_images_is_one_and_bad_shapes_raise():
    x, _ = _pair((2, 3, 16, 16), seed=0)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:1])
    with pytest.raises(ValueError, match="at least 7"):
        ssim(x[..., :5, :5], x[..., :5, :5])


def test_lpips_random_backbone_runs_offline():
    metric = LPIPS("alex", backbone_weights="random")
    assert metric.reportable is False
    x, y = _pair((2, 3, 64, 64), seed=1, noise=0.3)
    x, y = 2 * x - 1, 2 * y - 1
    torch.testing.assert_close(metric(x, x), torch.zeros(2))
    d = metric(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, LPIPS("alex", backbone_weights="random")(x, y))  # seeded init
    with pytest.raises(ValueError, match="alex"):
        LPIPS("resnet", backbone_weights="random")


def test_lpips_missing_weights_error_names_file_folder_and_url(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        LPIPS("alex")
    msg = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path / "checkpoints") in msg and ALEXNET_URL in msg


def test_lpips_reads_torchvision_weights_from_the_hub_folder(tmp_path, monkeypatch):
    import torchvision
    torch.manual_seed(0)
    features = torchvision.models.alexnet().features
    (tmp_path / "checkpoints").mkdir()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save(state, tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    metric = LPIPS("alex")
    assert metric.reportable is True
    # lpips keeps torchvision's layer indices inside its slices
    torch.testing.assert_close(getattr(metric.model.net.slice2, "3").weight, features[3].weight)
    torch.testing.assert_close(getattr(metric.model.net.slice5, "10").bias, features[10].bias)


def _write_images(folder, seed, n=3, size=32, high=256):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, high, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_fid_of_a_folder_with_itself_is_zero_and_differs_from_another(tmp_path):
    a, b = _write_images(tmp_path / "a", 0), _write_images(tmp_path / "b", 1, high=64)  # b: dark images
    itself = fid_from_folders(a, a, dims=64, weights="random")
    other = fid_from_folders(a, b, dims=64, weights="random")
    assert abs(itself) < 1e-6 and other > 1e-3
    # A weights file on disk goes through the same path (here: the random net, saved).
    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(_fid_inception_architecture().state_dict(), path)
    assert abs(fid_from_folders(a, a, dims=64, weights=path)) < 1e-6
    assert fid_from_folders(a, b, dims=64, weights=path) == pytest.approx(other, rel=1e-6)


def test_fid_architecture_accepts_pytorch_fid_state_dict_layout(monkeypatch):
    """pytorch-fid's own builder loads our architecture's state dict strictly: same keys."""
    from pytorch_fid import inception as I
    ours = _fid_inception_architecture().state_dict()
    monkeypatch.setattr(I, "load_state_dict_from_url", lambda url, **kw: ours)
    net = I.fid_inception_v3()
    assert set(net.state_dict()) == set(ours)


def test_fid_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    a = _write_images(tmp_path / "a", 0)
    with pytest.raises(MissingWeightsError) as err:
        fid_from_folders(a, a)
    msg = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and str(tmp_path / "checkpoints") in msg
    assert FID_INCEPTION_URL in msg


def test_fid_needs_two_images(tmp_path):
    a = _write_images(tmp_path / "a", 0, n=1)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_from_folders(a, a, dims=64, weights="random")

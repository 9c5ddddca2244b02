"""Image-quality metrics computed the standard way: PSNR, SSIM (as skimage), LPIPS, FID.

PSNR and SSIM take ``[B, C, H, W]`` images in [0, 1] (``data_range`` 1) and return ``[B]``.
LPIPS wraps the ``lpips`` package; FID wraps ``pytorch-fid``. Backbone weights are read
only from the torch hub checkpoints folder (``torch.hub.get_dir()/checkpoints``) or an
explicit path: nothing is ever downloaded. A missing file raises ``MissingWeightsError``
naming the file, the folder and the URL. ``"random"`` backbones exist for tests only; their
outputs carry ``reportable = False`` and are not LPIPS / FID numbers.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from util.images import list_images

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")
LPIPS_BACKBONE_URLS = {"alex": ALEXNET_URL, "vgg": VGG16_URL}


class MissingWeightsError(FileNotFoundError):
    """Pretrained backbone weights are not on disk (and are never downloaded silently)."""


def hub_checkpoint(url: str, what: str) -> Path:
    """Path of ``url``'s file in ``torch.hub.get_dir()/checkpoints``; raise if it is absent."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(url)
    if not path.is_file():
        raise MissingWeightsError(
            f"{what} needs the pretrained weights file '{path.name}', not found in {folder}. "
            f"Download it from {url} and place it in {folder} (or set TORCH_HOME / pass an explicit path).")
    return path


def read_weights(path: Path, what: str, url: str) -> dict:
    """The state dict in a downloaded weights file; a truncated or foreign file is a ValueError
    naming it and where to download it again."""
    import pickle
    import zipfile

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else "the file ends too early"
        raise ValueError(f"{what} weights file {path} cannot be read ({reason}): it is truncated or not "
                         f"a PyTorch weights file; download it again from {url}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} weights file {path} holds no state dict; download it again from {url}")
    return state


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block with the global RNG seeded, restoring it afterwards (for third-party inits)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- PSNR / SSIM

def _check_pair(x: torch.Tensor, y: torch.Tensor, who: str) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"{who} expects two [B, C, H, W] batches of the same shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``[B]`` (dB), as skimage's ``peak_signal_noise_ratio``.

    PSNR = 10 log10(R^2 / MSE), MSE over all channels and pixels; computed in float64.
    """
    _check_pair(x, y, "psnr")
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Mean structural similarity per image, ``[B]``, as skimage's ``structural_similarity``
    with ``channel_axis=-1`` and its defaults (7 x 7 uniform window, K1 = 0.01, K2 = 0.03,
    sample covariance N / (N - 1)).

    With local means mu, variances v and covariance v_xy over each window,
    S = (2 mu_x mu_y + C1)(2 v_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(v_x + v_y + C2)),
    C1 = (K1 R)^2, C2 = (K2 R)^2, averaged over the windows that lie inside the image (skimage
    crops (win_size - 1) / 2 pixels at each border) and then over channels.
    """
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim needs images of at least {win_size} x {win_size} px, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    B, C = x.shape[:2]
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [B, 5C, H, W]
    means = F.avg_pool2d(stack, win_size, stride=1)  # only windows inside the image
    means = means.view(B, 5, C, *means.shape[-2:])
    mu_x, mu_y, m_xx, m_yy, m_xy = means.unbind(1)
    n = win_size ** 2
    cov_norm = n / (n - 1)
    v_x, v_y = cov_norm * (m_xx - mu_x ** 2), cov_norm * (m_yy - mu_y ** 2)
    v_xy = cov_norm * (m_xy - mu_x * mu_y)
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    S = ((2 * mu_x * mu_y + C1) * (2 * v_xy + C2)) / ((mu_x ** 2 + mu_y ** 2 + C1) * (v_x + v_y + C2))
    return S.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- LPIPS

class LPIPS(nn.Module):
    """LPIPS distance (``lpips`` package, v0.1 linear layers) between images in [-1, 1].

    ``net``: "alex" or "vgg". ``backbone_weights``: None reads torchvision's ImageNet file
    from the hub checkpoints folder (error if absent); a path reads that file (a torchvision
    state dict, only its ``features.*`` entries are used); "random" keeps a randomly
    initialised backbone drawn with ``seed`` (tests only: ``reportable`` is then False).
    ``forward(x, y)``: ``[B, 3, H, W]`` each -> ``[B]``.
    """

    def __init__(self, net: str = "alex", backbone_weights=None, device="cpu", seed: int = 0):
        super().__init__()
        import lpips  # imported here: it is only needed for this metric
        if net not in LPIPS_BACKBONE_URLS:
            raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_URLS)}, got '{net}'")
        self.net_name = net
        self.reportable = backbone_weights != "random"
        if backbone_weights is None:
            backbone_weights = hub_checkpoint(LPIPS_BACKBONE_URLS[net], f"LPIPS({net})")
        with _seeded(seed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # pnet_rand=True: never let torchvision fetch the backbone; the linear layers
            # ship inside the lpips package and are loaded from there.
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if backbone_weights != "random":
            self._load_backbone(Path(backbone_weights))
        self.model.eval().requires_grad_(False).to(device)

    def _load_backbone(self, path: Path) -> None:
        if not path.is_file():
            raise MissingWeightsError(f"LPIPS({self.net_name}) backbone weights file {path} does not exist "
                                      f"(download from {LPIPS_BACKBONE_URLS[self.net_name]})")
        state = read_weights(path, f"LPIPS({self.net_name}) backbone", LPIPS_BACKBONE_URLS[self.net_name])
        # lpips splits torchvision's `features` into slices that keep the layer indices:
        # `slice2.3.weight` is `features.3.weight`.
        own = self.model.net.state_dict()
        mapped = {k: state.get("features." + k.split(".", 1)[1]) for k in own}
        missing = [k for k, v in mapped.items() if v is None]
        if missing:
            raise ValueError(f"{path} is not a torchvision {self.net_name} state dict: "
                             f"missing features.* entries for {missing[:3]}...")
        self.model.net.load_state_dict(mapped)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y, "LPIPS")
        return self.model(x, y, normalize=False).flatten()


# ----------------------------------------------------------------------------- FID

def _fid_inception_architecture() -> nn.Module:
    """pytorch-fid's FID Inception network (TF-FID blocks on torchvision's Inception v3),
    randomly initialised, built from pytorch-fid's own block classes."""
    from pytorch_fid import inception as I
    net = I._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", I.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", I.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", I.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", I.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", I.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", I.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", I.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", I.FIDInceptionE_1(1280)),
                        ("Mixed_7c", I.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    return net


def fid_inception(dims: int = 2048, weights=None, device="cpu", seed: int = 0) -> nn.Module:
    """pytorch-fid's ``InceptionV3`` feature extractor for ``dims`` (64, 192, 768, 2048).

    ``weights``: None = the FID file from the hub checkpoints folder (error if absent), a
    path, or "random" (tests only). pytorch-fid's own downloader is never reached.
    """
    from pytorch_fid import inception as I
    if dims not in I.InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(f"FID dims must be one of {sorted(I.InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
    if weights is None:
        weights = hub_checkpoint(FID_INCEPTION_URL, "FID")
    if weights != "random" and not Path(weights).is_file():
        raise MissingWeightsError(f"FID Inception weights file {weights} does not exist "
                                  f"(download from {FID_INCEPTION_URL})")

    def build() -> nn.Module:
        net = _fid_inception_architecture()
        if weights != "random":
            net.load_state_dict(read_weights(Path(weights), "FID Inception", FID_INCEPTION_URL))
        return net

    original = I.fid_inception_v3
    try:
        I.fid_inception_v3 = build
        with _seeded(seed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = I.InceptionV3([I.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    finally:
        I.fid_inception_v3 = original
    model.reportable = weights != "random"
    return model.eval().to(device)


def folder_statistics(folder, model: nn.Module, dims: int = 2048, batch_size: int = 50,
                      device="cpu", num_workers: int = 0):
    """Mean ``[dims]`` and covariance ``[dims, dims]`` of the Inception features of a folder."""
    from PIL import Image
    from pytorch_fid.fid_score import calculate_activation_statistics
    files = list_images(folder)
    if len(files) < 2:
        raise ValueError(f"FID needs at least 2 images per folder for a covariance; {folder} has {len(files)}")
    sizes = {Image.open(f).size for f in files}
    if len(sizes) > 1:
        raise ValueError(f"images in {folder} have different sizes {sorted(sizes)}; FID batches need one size")
    return calculate_activation_statistics([str(f) for f in files], model, min(batch_size, len(files)),
                                           dims, device, num_workers)


def fid_from_folders(folder1, folder2, dims: int = 2048, batch_size: int = 50, device="cpu",
                     weights=None, num_workers: int = 0, seed: int = 0) -> float:
    """Frechet Inception distance between two image folders, as pytorch-fid computes it:
    ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}).

    ``weights`` as in ``fid_inception``; with "random" the result is not an FID number.
    """
    from pytorch_fid.fid_score import calculate_frechet_distance
    model = fid_inception(dims, weights, device, seed)
    with torch.no_grad():
        mu1, s1 = folder_statistics(folder1, model, dims, batch_size, device, num_workers)
        mu2, s2 = folder_statistics(folder2, model, dims, batch_size, device, num_workers)
    with warnings.catch_warnings():
        # pytorch-fid passes scipy's deprecated `disp`; a singular product (fewer images than
        # dims) is handled inside it by adding eps to the diagonals, as upstream does.
        warnings.filterwarnings("ignore", message=".*disp.*deprecated", category=DeprecationWarning)
        return float(calculate_frechet_distance(mu1, np.atleast_2d(s1), mu2, np.atleast_2d(s2)))

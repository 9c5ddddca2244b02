"""Folder dataset, shipped samples and the image file helpers."""
import numpy as np
import pytest
import torch
from PIL import Image

from data import ImageFolderDataset, get_dataset
from conftest import ROOT
from util.images import load_image, save_image, to_uint8, to_unit

SAMPLES = ROOT / "data" / "samples"


def _write(path, array):
    Image.fromarray(array).save(path)
    return path


def test_folder_dataset_sorted_rgb_resized_cropped(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "b.jpg", rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    _write(tmp_path / "a.png", np.full((16, 16), 255, dtype=np.uint8))  # grayscale -> RGB
    _write(tmp_path / "c.JPEG", rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, image_size=24)
    assert len(ds) == 3
    names = [ds[i][2] for i in range(3)]
    assert names == ["a.png", "b.jpg", "c.JPEG"]
    for i in range(3):
        index, x, _ = ds[i]
        assert index == i and x.shape == (3, 24, 24) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(ds[0][1], torch.ones(3, 24, 24))  # white -> +1 in every channel


def test_centre_crop_keeps_the_middle(tmp_path):
    img = np.zeros((20, 60, 3), dtype=np.uint8)
    img[:, 20:40] = 255  # white central third of a wide image
    x = ImageFolderDataset(_write(tmp_path / "w.png", img).parent, image_size=20)[0][1]
    assert x[:, :, 3:17].mean() > 0.95  # the crop is the white middle square


def test_unreadable_file_and_missing_or_empty_folder_are_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="broken.png"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no .png"):
        get_dataset("ffhq", tmp_path / "empty")


def test_shipped_samples_load_and_have_licences():
    ds = get_dataset("ffhq", SAMPLES, image_size=256)
    assert [ds[i][2] for i in range(len(ds))] == ["astronaut.png", "chelsea.png", "coffee.png"]
    readme = (SAMPLES / "README.md").read_text()
    for i in range(len(ds)):
        _, x, name = ds[i]
        assert x.shape == (3, 256, 256) and x.std() > 0.1
        assert name in readme
    assert "public domain" in readme and readme.count("CC0") >= 2


def test_save_load_round_trip_is_atomic_and_exact_to_a_grey_level(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 10, 12, generator=g) * 2 - 1
    path = save_image(x, tmp_path / "out" / "x.png")
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary file left behind
    y = load_image(path)
    assert y.shape == (1, 3, 10, 12)
    assert (y - x).abs().max() <= 1 / 255 + 1e-6
    save_image(to_unit(x)[0], path, value_range=(0, 1))  # overwrite, [0, 1] input
    torch.testing.assert_close(load_image(path), y)
    with pytest.raises(ValueError, match="one image"):
        save_image(torch.zeros(2, 3, 4, 4), tmp_path / "two.png")


def test_to_uint8_rounds_and_clips():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0]).view(1, 1, 4).expand(3, 1, 4)
    out = to_uint8(x)
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 0, 128, 255]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """PIL's convert('RGB') clips 16-bit values to 255; we scale by 1/257 (65535 -> 255)."""
    values = np.array([[0, 257, 1000, 30000, 65535, 128 * 257]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = load_image(tmp_path / "g16.png")  # [1, 3, 1, 6] in [-1, 1]
    got = np.round((x[0, 0, 0].numpy() + 1) * 127.5).astype(int)
    assert got.tolist() == np.round(values[0] / 257).astype(int).tolist() == [0, 1, 4, 117, 255, 128]
    torch.testing.assert_close(x[0, 0], x[0, 2])  # grey in every channel


def test_hidden_files_are_skipped_and_a_file_is_no_folder(tmp_path):
    _write(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork, not an image")
    (tmp_path / ".b.png").write_bytes(b"hidden")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert [f.name for f in ds.files] == ["a.png"] and ds.unreadable([0]) == []
    with pytest.raises(NotADirectoryError, match="a.png is a file"):
        ImageFolderDataset(tmp_path / "a.png")


def test_unreadable_reports_every_bad_file(tmp_path):
    _write(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "b.png").write_bytes(b"junk")
    (tmp_path / "c.png").write_bytes((tmp_path / "a.png").read_bytes()[:40])  # truncated
    ds = ImageFolderDataset(tmp_path, image_size=8)
    bad = ds.unreadable(range(3))
    assert len(bad) == 2 and "b.png" in bad[0] and "c.png" in bad[1]


def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 2 x 10 pixels is Pillow's error threshold
    _write(tmp_path / "big.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"big\.png.*Downscale"):
        load_image(tmp_path / "big.png")


@pytest.mark.parametrize("shape", [(300, 400), (57, 100), (256, 256), (20, 33)])
def test_release_resize_is_torchvision_resize_and_centre_crop(tmp_path, shape):
    """data.resize: release reads an image exactly as the authors' transforms.Compose([Resize(S),
    CenterCrop(S), ToTensor(), Normalize((0.5,) * 3, (0.5,) * 3)]) does."""
    from torchvision import transforms

    rng = np.random.default_rng(shape[0])
    path = _write(tmp_path / "x.png", rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    size = 32
    theirs = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                 transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])(Image.open(path).convert("RGB"))
    ours = ImageFolderDataset(tmp_path, image_size=size, resize="release")[0][1]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    bicubic = ImageFolderDataset(tmp_path, image_size=size)[0][1]  # ours differs where there is resampling
    assert bicubic.shape == ours.shape
    if shape != (size, size) and min(shape) != size:
        assert (bicubic - ours).abs().max() > 0.01

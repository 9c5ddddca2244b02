"""scripts/evaluate.py: FID of a run's folders, and the offline error when weights are missing."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from util.images import save_image

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("evaluate", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def run_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    task = tmp_path / "inpainting_box"
    for name in ("input", "recon"):
        (task / name).mkdir(parents=True)
        for i in range(4):
            save_image(torch.rand(3, 32, 32, generator=g) * 2 - 1, task / name / f"{i:05d}.png")
    return task


def test_fid_of_a_run_with_a_random_inception(run_dir):
    evaluate = _load_script()
    out = evaluate.evaluate_fid(run_dir, weights="random", dims=64)
    assert out["reportable"] is False and out["n_recon"] == 4 and "fid_recon_opt" not in out
    assert out["fid_recon"] > 0
    assert json.loads((run_dir / "fid.json").read_text()) == out
    # the ground truth against itself: zero
    same = evaluate.fid_from_folders(run_dir / "input", run_dir / "input", dims=64, weights="random")
    assert abs(same) < 1e-6


def test_missing_inception_weights_name_the_file(run_dir, tmp_path, monkeypatch, capsys):
    evaluate = _load_script()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    assert evaluate.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "empty_hub" in err
    assert not (run_dir / "fid.json").exists()


def test_not_a_run_folder(tmp_path, capsys):
    evaluate = _load_script()
    assert evaluate.main([str(tmp_path)]) == 2
    assert "has no input/ folder" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, "half"], ids=["empty", "garbage", "truncated"])
def test_unreadable_weights_file_is_named(run_dir, tmp_path, capsys, content):
    evaluate = _load_script()
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    if content == "half":
        torch.save({"w": torch.zeros(1000)}, weights)
        content = weights.read_bytes()[:len(weights.read_bytes()) // 2]
    weights.write_bytes(content)
    assert evaluate.main([str(run_dir), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(weights) in err and "download it again" in err
    assert "Traceback" not in err and not (run_dir / "fid.json").exists()


def test_lpips_of_a_run_from_its_pngs(run_dir):
    evaluate = _load_script()
    (run_dir / "recon_opt").mkdir()
    for name in ("00000.png", "00001.png"):  # identical to the ground truth: LPIPS 0
        (run_dir / "recon_opt" / name).write_bytes((run_dir / "input" / name).read_bytes())
    out = evaluate.evaluate_lpips(run_dir, weights="random")
    assert out["reportable"] is False and out["n_recon"] == 4 and out["n_recon_opt"] == 2
    assert sorted(out["lpips_recon"]) == [f"{i:05d}.png" for i in range(4)]
    assert all(v > 0 for v in out["lpips_recon"].values())
    assert out["lpips_recon_opt"] == {"00000.png": 0.0, "00001.png": 0.0}
    # The same numbers as the metric on the loaded images
    from util.images import load_image
    from util.metrics import LPIPS
    x, gt = load_image(run_dir / "recon" / "00002.png"), load_image(run_dir / "input" / "00002.png")
    assert out["lpips_recon"]["00002.png"] == pytest.approx(LPIPS("alex", backbone_weights="random")(x, gt).item())
    assert json.loads((run_dir / "lpips.json").read_text()) == out


def test_lpips_needs_the_ground_truth_of_every_image(run_dir):
    evaluate = _load_script()
    (run_dir / "input" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match="lacks the ground truth of recon/00003.png"):
        evaluate.evaluate_lpips(run_dir, weights="random")


def test_lpips_weights_missing_or_unreadable_are_named(run_dir, tmp_path, monkeypatch, capsys):
    evaluate = _load_script()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    assert evaluate.main([str(run_dir), "--metrics", "lpips"]) == 2
    err = capsys.readouterr().err
    assert "alexnet-owt-7be5be79.pth" in err and "empty_hub" in err and "Traceback" not in err
    bad = tmp_path / "alexnet-owt-7be5be79.pth"
    bad.write_bytes(b"garbage" * 10)
    assert evaluate.main([str(run_dir), "--metrics", "lpips", "--lpips_weights", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "download it again" in err
    assert not (run_dir / "lpips.json").exists()

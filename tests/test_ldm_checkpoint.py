"""Checkpoint loading: code-running pickles are refused without running, EMA weights, the strict
key report, missing-file errors, safetensors round trip, and the standalone first stage winning."""
import pickle
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from ldm import CheckpointMismatchError, CheckpointNotFoundError, load_model, safe_pickle, save_model
from ldm.checkpoint import ema_key, read_checkpoint
from ldm.safe_pickle import LightningStub, UnsafeCheckpointError
from ldm_compact import single_thread  # noqa: F401  (autouse fixture)
from ldm_compact import COMPACT_LDM_CKPT, COMPACT_LDM_LIGHTNING_CKPT, load_io, rel_err, compact_ldm_config

TOL = 1e-5


@pytest.fixture(scope="module")
def io():
    return load_io("compact_ldm_io.pt")


@pytest.fixture(scope="module")
def state():
    return torch.load(COMPACT_LDM_CKPT, weights_only=True)["state_dict"]


class CopiesAFile:
    """Unpickling this runs shutil.copyfile(src, marker): the stand-in for malicious code."""

    def __init__(self, src, marker):
        self.src, self.marker = str(src), str(marker)

    def __reduce__(self):
        return shutil.copyfile, (self.src, self.marker)


def test_code_running_pickle_is_refused_and_not_run(tmp_path, state):
    marker = tmp_path / "marker"
    payload = CopiesAFile(COMPACT_LDM_CKPT.parent / "compact_ldm_io.pt", marker)
    # The payload really runs under plain pickle (so the check below means something).
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(state), "hyper_parameters": payload}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load the global 'shutil\.copyfile'"):
        read_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match=r"'shutil\.copyfile'"):
        load_model(compact_ldm_config(), ckpt=path)
    assert not marker.exists()


def test_lightning_classes_are_inert_stubs():
    obj = torch.load(COMPACT_LDM_LIGHTNING_CKPT, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
    (callback_class,) = obj["callbacks"]
    assert issubclass(callback_class, LightningStub)
    assert callback_class.qualified_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert obj["callbacks"][callback_class]["monitor"] == "val/loss_simple_ema"
    assert len(read_checkpoint(COMPACT_LDM_LIGHTNING_CKPT)) == len(read_checkpoint(COMPACT_LDM_CKPT))


def test_use_ema_loads_the_ema_weights(tmp_path, state, io):
    g = torch.Generator().manual_seed(0)
    ema_state = dict(state)
    unet = {k[len("model.diffusion_model."):]: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    for name, p in unet.items():
        ema_state[ema_key(name)] = p + 0.05 * p.abs().mean() * torch.randn(p.shape, generator=g)
    ema_state["model_ema.decay"] = torch.tensor(0.9999)
    ema_state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    assert ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": ema_state}, path)

    plain = load_model(compact_ldm_config(), ckpt=path)  # default: the trained (non-EMA) weights
    ema = load_model(compact_ldm_config(), ckpt=path, use_ema=True)
    for name in ("input_blocks.0.0.weight", "middle_block.1.qkv.weight", "out.2.bias"):
        torch.testing.assert_close(plain.unet.state_dict()[name], unet[name], rtol=0, atol=0)
        torch.testing.assert_close(ema.unet.state_dict()[name], ema_state[ema_key(name)], rtol=0, atol=0)
    with torch.no_grad():
        assert rel_err(plain.eps(io["unet_in"], io["unet_t"]), io["unet_eps"]) < TOL
        assert rel_err(ema.eps(io["unet_in"], io["unet_t"]), io["unet_eps"]) > 1e-3
        # the first stage is not affected by use_ema
        assert rel_err(ema.decode(io["encode_h"]), io["decode_quantized"]) < TOL
    with pytest.raises(CheckpointMismatchError, match="no model_ema"):
        load_model(compact_ldm_config(), ckpt=COMPACT_LDM_CKPT, use_ema=True)


def test_strict_key_report(tmp_path, state):
    bad = dict(state)
    del bad["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    del bad["model.diffusion_model.input_blocks.1.0.in_layers.2.bias"]
    del bad["first_stage_model.quantize.embedding.weight"]
    bad["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    bad["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": bad}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(compact_ldm_config(), ckpt=path)
    msg = str(err.value)
    assert "missing (3)" in msg
    assert "model.diffusion_model.input_blocks.* : 2 keys" in msg
    assert "first_stage_model.quantize.* : 1 keys" in msg
    assert "model.diffusion_model.input_blocks.1.0.in_layers.2.weight" in msg
    assert "unexpected (1)" in msg and "model.diffusion_model.extra_head.weight" in msg
    assert "wrong shape (1)" in msg and "model.diffusion_model.out.2.bias: checkpoint [5] vs model [3]" in msg
    assert str(path) in msg


def test_schedule_and_scale_factor_are_checked(tmp_path, state):
    bad = dict(state)
    bad["betas"] = bad["betas"] * 1.1
    torch.save({"state_dict": bad}, tmp_path / "sched.ckpt")
    with pytest.raises(CheckpointMismatchError, match="'betas'"):
        load_model(compact_ldm_config(), ckpt=tmp_path / "sched.ckpt")
    bad = dict(state)
    bad["scale_factor"] = torch.tensor(0.18)
    torch.save({"state_dict": bad}, tmp_path / "scale.ckpt")
    with pytest.raises(CheckpointMismatchError, match="scale_factor"):
        load_model(compact_ldm_config(), ckpt=tmp_path / "scale.ckpt")


def test_missing_files_say_how_to_get_them():
    with pytest.raises(CheckpointNotFoundError) as err:
        load_model(compact_ldm_config(), ckpt="models/ldm/ffhq/no-such-model.ckpt")
    assert isinstance(err.value, FileNotFoundError)
    assert "models/ldm/ffhq/no-such-model.ckpt not found" in str(err.value)
    assert "bash scripts/download_models.sh ffhq" in str(err.value)
    with pytest.raises(CheckpointNotFoundError, match="download_models.sh vq-f4"):
        load_model(compact_ldm_config(), ckpt=COMPACT_LDM_CKPT,
                   first_stage_ckpt="models/first_stage_models/vq-f4/no-such-model.ckpt")


def test_safetensors_round_trip(tmp_path, io):
    model = load_model(compact_ldm_config(), ckpt=COMPACT_LDM_CKPT)
    path = save_model(model, tmp_path / "model.safetensors")
    again = load_model(compact_ldm_config(ckpt=path))  # the path from the config this time
    for (k1, v1), (k2, v2) in zip(model.state_dict_compvis().items(), again.state_dict_compvis().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    with torch.no_grad():
        assert rel_err(again.eps(io["unet_in"], io["unet_t"]), io["unet_eps"]) < TOL
    with pytest.raises(ValueError, match="safetensors"):
        save_model(model, tmp_path / "model.ckpt")


def test_standalone_first_stage_wins(tmp_path, state, io):
    fs = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    # A standalone VQ file as taming writes it, with training-loss weights to drop.
    standalone = dict(fs, **{"loss.discriminator.main.0.weight": torch.ones(2, 3),
                             "loss.perceptual_loss.lin0.model.1.weight": torch.ones(1)})
    save_file({k: v.contiguous() for k, v in standalone.items()}, str(tmp_path / "vq.safetensors"))
    torch.save({"state_dict": standalone}, tmp_path / "vq.ckpt")
    # A combined file whose first stage is wrong, and one without a codebook.
    corrupted = {k: (v * 0.5 if k.startswith("first_stage_model.") else v) for k, v in state.items()}
    torch.save({"state_dict": corrupted}, tmp_path / "corrupted.ckpt")
    no_codebook = {k: v for k, v in state.items() if k != "first_stage_model.quantize.embedding.weight"}
    torch.save({"state_dict": no_codebook}, tmp_path / "no_codebook.ckpt")

    wrong = load_model(compact_ldm_config(), ckpt=tmp_path / "corrupted.ckpt")
    with torch.no_grad():
        assert rel_err(wrong.decode(io["encode_h"]), io["decode_quantized"]) > 1e-2
    for combined in ("corrupted.ckpt", "no_codebook.ckpt"):
        for first_stage in ("vq.safetensors", "vq.ckpt"):
            model = load_model(compact_ldm_config(first_stage_ckpt=tmp_path / first_stage), ckpt=tmp_path / combined)
            with torch.no_grad():
                assert rel_err(model.decode(io["encode_h"]), io["decode_quantized"]) < TOL
                assert rel_err(model.eps(io["unet_in"], io["unet_t"]), io["unet_eps"]) < TOL
    with pytest.raises(CheckpointMismatchError, match="first_stage_model.quantize.embedding.weight"):
        load_model(compact_ldm_config(), ckpt=tmp_path / "no_codebook.ckpt")


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_lightning_stubs_in_both_torch_formats(tmp_path, monkeypatch, state, zipfile):
    # A stand-in pytorch_lightning module, present only while writing the file.
    fake = types.ModuleType("pytorch_lightning.trainer.states")

    class TrainerState:
        def __init__(self):
            self.stage = "fit"

    TrainerState.__module__ = fake.__name__
    TrainerState.__qualname__ = "TrainerState"
    fake.TrainerState = TrainerState
    for name in ("pytorch_lightning", "pytorch_lightning.trainer", fake.__name__):
        monkeypatch.setitem(sys.modules, name, fake)
    path = tmp_path / "pl.ckpt"
    torch.save({"state_dict": dict(state), "loops": {TrainerState: TrainerState()}}, path,
               _use_new_zipfile_serialization=zipfile)
    for name in ("pytorch_lightning", "pytorch_lightning.trainer", fake.__name__):
        monkeypatch.delitem(sys.modules, name)

    with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader refuses it ...
        torch.load(path, weights_only=True)
    loaded = read_checkpoint(path)  # ... ours reads the weights
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    marker = tmp_path / "marker"
    torch.save({"state_dict": dict(state), "x": CopiesAFile(COMPACT_LDM_CKPT, marker)}, tmp_path / "evil.ckpt",
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeCheckpointError, match="'shutil.copyfile'"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_missing_ffhq_weights_message(tmp_path, monkeypatch):
    """With the real FFHQ config and no downloaded weights, the error is the download command."""
    import ldm.checkpoint
    monkeypatch.setattr(ldm.checkpoint, "PROJECT_ROOT", tmp_path)  # weights looked up in an empty tree
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError) as err:
        load_model(ROOT / "configs" / "models" / "ffhq-ldm-vq-4.yaml")
    assert str(err.value).startswith(
        "checkpoint models/ldm/ffhq/model.ckpt not found; run: bash scripts/download_models.sh ffhq")

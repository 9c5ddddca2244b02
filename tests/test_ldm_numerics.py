"""The loaded reduced LDMs reproduce every reference output of the original CompVis code
(UNet eps, encode, quantisation, decode, straight-through gradient, schedule) with both
attention kernels, from the plain and the Lightning-written checkpoint, and from an original
CompVis YAML; bf16 autocast runs and stays close."""
import pytest
import torch

from ldm import load_model
from ldm_compact import single_thread  # noqa: F401  (autouse fixture)
from ldm_compact import (COMPACT_LDM_CKPT, COMPACT_LDM_LIGHTNING_CKPT, load_io, rel_err,
                       compact_cin_config, compact_ldm_config)

TOL = 1e-5


@pytest.fixture(scope="module")
def ldm_io():
    return load_io("compact_ldm_io.pt")


@pytest.fixture(scope="module")
def cin_io():
    return load_io("compact_cin_io.pt")


@pytest.mark.parametrize("ckpt", [COMPACT_LDM_CKPT, COMPACT_LDM_LIGHTNING_CKPT], ids=["plain", "lightning"])
@pytest.mark.parametrize("attention", ["sdpa", "legacy"])
def test_compact_ldm_reproduces_reference(ldm_io, ckpt, attention):
    io = ldm_io
    model = load_model(compact_ldm_config(), ckpt=ckpt, attention=attention)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert rel_err(model.eps(io["unet_in"], io["unet_t"]), io["unet_eps"]) < TOL
        h = model.encode(io["image"])
        assert rel_err(h, io["encode_h"]) < TOL
        z_q, _, (_, _, idx) = model.first_stage.quantize(io["encode_h"])
        assert torch.equal(idx, io["quant_idx"])
        assert rel_err(z_q, io["quant_z"]) < TOL
        assert rel_err(model.decode(io["encode_h"]), io["decode_quantized"]) < TOL
        assert rel_err(model.decode(io["encode_h"], quantize=False), io["decode_not_quantized"]) < TOL
    h = io["encode_h"].clone().requires_grad_(True)
    loss = ((model.decode(h) - io["grad_target"]) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, h)
    assert rel_err(grad, io["grad_sumsq_decode_quantized_wrt_h"]) < TOL
    assert model.alphas_cumprod.dtype == torch.float32 and model.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(model.alphas_cumprod.double(), io["alphas_cumprod_float64"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("attention", ["sdpa", "legacy"])
def test_compact_cin_reproduces_reference(cin_io, attention):
    io = cin_io
    model = load_model(compact_cin_config(), attention=attention)
    with torch.no_grad():
        eps = model.eps(io["unet_in"], io["unet_t"], cond=io["class_label"])
        assert rel_err(eps, io["unet_eps"]) < TOL
        context = model.cond_stage(io["class_label"])
        assert context.shape == (3, 1, io["unet_config"]["context_dim"])
        torch.testing.assert_close(model.eps(io["unet_in"], io["unet_t"], cond=context), eps)
        # the class actually conditions the output
        other = (io["class_label"] + 1) % io["n_classes"]
        assert rel_err(model.eps(io["unet_in"], io["unet_t"], cond=other), eps) > 1e-3
    with pytest.raises(ValueError, match="class-conditional"):
        model.eps(io["unet_in"], io["unet_t"])


def test_attention_switch_changes_kernel_not_result(ldm_io):
    model = load_model(compact_ldm_config(), ckpt=COMPACT_LDM_CKPT)
    backends = {m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")}
    assert backends == {"sdpa"}
    with torch.no_grad():
        a = model.eps(ldm_io["unet_in"], ldm_io["unet_t"])
        model.set_attention("legacy")
        assert {m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")} == {"legacy"}
        b = model.eps(ldm_io["unet_in"], ldm_io["unet_t"])
    assert rel_err(a, b) < TOL
    with pytest.raises(ValueError, match="attention backend"):
        model.set_attention("flash")


COMPVIS_YAML = """\
model:
  base_learning_rate: 2.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    image_size: 16
    channels: 3
    monitor: val/loss_simple_ema
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 16
        in_channels: 3
        out_channels: 3
        model_channels: 32
        attention_resolutions: [2]
        num_res_blocks: 1
        channel_mult: [1, 1]
        num_head_channels: 16
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 64
        ddconfig:
          double_z: false
          z_channels: 3
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 1]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config: __is_unconditional__
data:
  target: main.DataModuleFromConfig
  params: {batch_size: 42}
lightning:
  trainer: {benchmark: true}
"""


def test_original_compvis_yaml(tmp_path, ldm_io):
    path = tmp_path / "config.yaml"
    path.write_text(COMPVIS_YAML)
    model = load_model(path, ckpt=COMPACT_LDM_LIGHTNING_CKPT)
    with torch.no_grad():
        assert rel_err(model.eps(ldm_io["unet_in"], ldm_io["unet_t"]), ldm_io["unet_eps"]) < TOL
        assert rel_err(model.decode(ldm_io["encode_h"]), ldm_io["decode_quantized"]) < TOL


def test_bf16_autocast_close_to_fp32(ldm_io, cin_io):
    model = load_model(compact_ldm_config(), ckpt=COMPACT_LDM_CKPT)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps = model.eps(ldm_io["unet_in"], ldm_io["unet_t"])
            x = model.decode(ldm_io["encode_h"], quantize=False)
        assert torch.isfinite(eps).all() and torch.isfinite(x).all()
        assert rel_err(eps.float(), ldm_io["unet_eps"]) < 5e-2
        assert rel_err(x.float(), ldm_io["decode_not_quantized"]) < 5e-2
    cin = load_model(compact_cin_config())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eps = cin.eps(cin_io["unet_in"], cin_io["unet_t"], cond=cin_io["class_label"])
    assert torch.isfinite(eps).all() and rel_err(eps.float(), cin_io["unet_eps"]) < 5e-2


@pytest.mark.parametrize("backend", ["legacy", "sdpa"])
def test_qkv_attention_layouts_agree(backend):
    """The legacy (per head q,k,v) and new (q|k|v, then heads) fused layouts compute the same attention."""
    from ldm.modules.unet_blocks import QKVAttention, QKVAttentionLegacy

    g = torch.Generator().manual_seed(0)
    B, H, C, T = 2, 3, 4, 5
    legacy = torch.randn(B, H, 3, C, T, generator=g, dtype=torch.float64)   # per head: q, k, v
    new = legacy.transpose(1, 2)                                             # q, k, v; then heads
    a, b = QKVAttentionLegacy(H), QKVAttention(H)
    a.attention_backend = b.attention_backend = backend
    out_legacy = a(legacy.reshape(B, 3 * H * C, T))
    out_new = b(new.reshape(B, 3 * H * C, T))
    q, k, v = legacy.unbind(2)                                               # [B, H, C, T]
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / C ** 0.5, dim=-1)
    expected = torch.einsum("bhts,bhcs->bhct", w, v).reshape(B, H * C, T)
    assert torch.allclose(out_legacy, expected, atol=1e-12)
    assert torch.allclose(out_new, expected, atol=1e-12)

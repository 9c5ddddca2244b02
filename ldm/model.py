"""``LatentDiffusion``: the one latent-diffusion object every sampler uses (docs/design.md, section 1)."""
import torch
from torch import nn

from .modules.attention import check_attention_backend
from .modules.autoencoder import VQModel
from .modules.unet import UNetModel
from .schedule import alphas_cumprod_from_betas

# Our attribute name -> CompVis state-dict prefix.
COMPVIS_PREFIXES = {"unet": "model.diffusion_model.", "first_stage": "first_stage_model.",
                    "cond_stage": "cond_stage_model."}


class LatentDiffusion(nn.Module):
    """An eps-prediction latent diffusion model with a VQ first stage.

    eps(z_t, t, cond) = eps_theta(z_t, t, c): noise prediction in latent space.
    encode(x) = scale_factor * E(x) (not quantised); decode(z) = D(q(z / scale_factor)) with the
    straight-through quantiser q (identity when quantize=False).
    Shapes: z [B, *latent_shape], x [B, *image_shape] in [-1, 1], t [B] long in [0, T) (t = T is also
    accepted: the sinusoidal embedding extends past the trained range, and the release calls it there once).
    """

    def __init__(self, unet: UNetModel, first_stage: VQModel, betas: torch.Tensor,
                 cond_stage: nn.Module | None = None, scale_factor: float = 1.0,
                 latent_size: int | None = None):
        super().__init__()
        self.unet = unet
        self.first_stage = first_stage
        self.cond_stage = cond_stage
        self.scale_factor = float(scale_factor)
        size = latent_size or unet.image_size
        f = first_stage.downsample_factor
        self.latent_shape = (unet.in_channels, size, size)
        self.image_shape = (first_stage.decoder.conv_out.out_channels, size * f, size * f)
        if unet.in_channels != first_stage.embed_dim:
            raise ValueError(f"UNet in_channels ({unet.in_channels}) must equal the first stage's "
                             f"embed_dim ({first_stage.embed_dim})")
        self.set_schedule(betas)

    def set_schedule(self, betas: torch.Tensor) -> None:
        """Store betas [T] (float64 in) as float32 buffers ``betas`` and ``alphas_cumprod``."""
        betas = betas.detach().to(torch.float64).cpu()
        self.betas_float64 = betas  # plain attribute: stays float64 on the CPU
        device = next(self.parameters()).device
        device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer("betas", betas.float().to(device), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod_from_betas(betas).float().to(device),
                             persistent=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_attention(self, backend: str) -> "LatentDiffusion":
        """Switch every attention layer to ``"sdpa"`` or ``"legacy"`` (same results, float tolerance)."""
        check_attention_backend(backend)
        for m in self.modules():
            if hasattr(m, "attention_backend"):
                m.attention_backend = backend
        return self

    def context(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Cross-attention context [B, S, D] from labels [B] (embedded) or a given context tensor."""
        if self.cond_stage is None:
            if cond is not None:
                raise ValueError("this model is unconditional: call eps(z_t, t) with cond=None")
            return None
        if cond is None:
            raise ValueError("this model is class-conditional: pass cond = class labels [B] (LongTensor)")
        if not torch.is_floating_point(cond):
            cond = self.cond_stage(cond.to(self.device))
        if cond.ndim != 3 or cond.shape[0] != batch:
            raise ValueError(f"cond must be labels [{batch}] or a context [{batch}, S, D], got {tuple(cond.shape)}")
        return cond

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction eps_theta(z_t, t, c): z_t [B, c, h, w], t [B] long -> [B, c, h, w]."""
        if z_t.ndim != 4 or z_t.shape[1] != self.latent_shape[0]:
            raise ValueError(f"z_t must be [B, {self.latent_shape[0]}, h, w], got {tuple(z_t.shape)}")
        t = torch.as_tensor(t, device=z_t.device)
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        if t.shape != (z_t.shape[0],):
            raise ValueError(f"t must be [B] = [{z_t.shape[0]}] timestep indices, got {tuple(t.shape)}")
        return self.unet(z_t, t, context=self.context(cond, z_t.shape[0]))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1] -> z = scale_factor * quant_conv(encoder(x)) [B, c, H/f, W/f]."""
        if x.ndim != 4 or x.shape[1] != self.image_shape[0]:
            raise ValueError(f"x must be [B, {self.image_shape[0]}, H, W] in [-1, 1], got {tuple(x.shape)}")
        return self.scale_factor * self.first_stage.encode(x)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """z [B, c, h, w] -> x [B, 3, h*f, w*f]; differentiable in z (straight-through quantiser)."""
        if z.ndim != 4 or z.shape[1] != self.latent_shape[0]:
            raise ValueError(f"z must be [B, {self.latent_shape[0]}, h, w], got {tuple(z.shape)}")
        return self.first_stage.decode(z / self.scale_factor, force_not_quantize=not quantize)

    def state_dict_compvis(self) -> dict[str, torch.Tensor]:
        """The weights under CompVis names (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)."""
        out = {}
        for name, tensor in self.state_dict().items():
            head, rest = name.split(".", 1)
            out[COMPVIS_PREFIXES[head] + rest] = tensor
        return out

    def load_state_dict_compvis(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load weights given under CompVis names (keys must match exactly; see ldm.checkpoint)."""
        ours = {}
        for name, tensor in state.items():
            for head, prefix in COMPVIS_PREFIXES.items():
                if name.startswith(prefix):
                    ours[head + "." + name[len(prefix):]] = tensor
                    break
            else:
                raise KeyError(f"{name!r} is not a CompVis model key")
        self.load_state_dict(ours, strict=True, assign=assign)

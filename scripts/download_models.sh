#!/usr/bin/env bash
# Download the pretrained CompVis latent-diffusion checkpoints (needs internet; about 3 GB in all).
#
#   bash scripts/download_models.sh ffhq        # FFHQ LDM + the VQ-f4 first stage it uses
#   bash scripts/download_models.sh vq-f4       # the VQ-f4 first stage only
#   bash scripts/download_models.sh cin256-v2   # ImageNet class-conditional LDM
#   bash scripts/download_models.sh all         # everything (the default)
#
# Files land where configs/models/*.yaml expect them, relative to the project root:
#   models/ldm/ffhq/model.ckpt, models/first_stage_models/vq-f4/model.ckpt, models/ldm/cin256-v2/model.ckpt
# URLs as in the CompVis/latent-diffusion README and its scripts/download_*.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

fetch() {  # fetch URL DEST
  if command -v wget >/dev/null; then wget -O "$2" "$1"; else curl -L --fail -o "$2" "$1"; fi
}

vq_f4() {
  mkdir -p models/first_stage_models/vq-f4
  fetch https://ommer-lab.com/files/latent-diffusion/vq-f4.zip models/first_stage_models/vq-f4/model.zip
  (cd models/first_stage_models/vq-f4 && unzip -o model.zip && rm model.zip)
}

ffhq() {
  mkdir -p models/ldm/ffhq
  fetch https://ommer-lab.com/files/latent-diffusion/ffhq.zip models/ldm/ffhq/ffhq.zip
  (cd models/ldm/ffhq && unzip -o ffhq.zip && rm ffhq.zip)
  vq_f4
}

cin256_v2() {
  mkdir -p models/ldm/cin256-v2
  fetch https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt models/ldm/cin256-v2/model.ckpt
}

case "${1:-all}" in
  ffhq) ffhq ;;
  vq-f4) vq_f4 ;;
  cin256-v2) cin256_v2 ;;
  all) ffhq; cin256_v2 ;;
  *) echo "usage: bash scripts/download_models.sh [ffhq|vq-f4|cin256-v2|all]" >&2; exit 2 ;;
esac
echo "done; see docs/models.md for how to load the models"

"""Task YAMLs: safe loading (DPS `!!python/tuple`), typed config, overrides, and every shipped task builds."""
import dataclasses

import pytest
import torch

from conftest import ROOT
from guided_diffusion.measurements import get_noise, get_operator
from smc import LDSMCConfig
from util.config import ConfigError, apply_overrides, load_task, load_yaml
from util.masks import MaskGenerator

TASKS = ROOT / "configs" / "tasks"
ALL_TASKS = sorted(TASKS.rglob("*.yaml"))
SAMPLER_FIELDS = [f.name for f in dataclasses.fields(LDSMCConfig)]


def test_every_family_is_there():
    names = {p.relative_to(TASKS).as_posix() for p in ALL_TASKS}
    paper = ["inpainting_config.yaml", "inpainting_freeform_config.yaml", "gaussian_deblur_config.yaml",
             "super_resolution_config.yaml"]
    extras = ["inpainting_random_config.yaml", "motion_deblur_config.yaml", "super_resolution_x4_config.yaml",
              "phase_retrieval_config.yaml"]
    for name in paper + extras:
        assert name in names and f"imagenet/{name}" in names
    for name in paper[:3] + extras[:2] + extras[3:]:
        assert f"demo/{name}" in names
    assert {"demo/super_resolution_x4_config.yaml", "demo/super_resolution_x2_config.yaml"} <= names


def test_paper_parameters():
    box = load_task(TASKS / "inpainting_config.yaml")
    assert box.name == "inpainting_box"
    assert box.measurement.mask_opt["mask_type"] == "box"
    assert list(box.measurement.mask_opt["mask_len_range"]) == [128, 129]
    blur = load_task(TASKS / "gaussian_deblur_config.yaml").measurement.operator
    assert (blur["name"], blur["kernel_size"], blur["intensity"]) == ("gaussian_blur", 61, 3.0)
    sr = load_task(TASKS / "super_resolution_config.yaml").measurement.operator
    assert sr["scale_factor"] == 8 and list(sr["in_shape"]) == [1, 3, 256, 256]
    assert load_task(TASKS / "inpainting_freeform_config.yaml").measurement.mask_opt["mask_type"] == "freeform"
    for path in ALL_TASKS:
        noise = load_task(path).measurement.noise
        assert noise == {"name": "gaussian", "sigma": 0.01}, path


def test_protocol_and_resize_of_each_task():
    """The paper's four tasks (FFHQ and ImageNet) run the release's protocol and resize; the DPS extras and the
    demo tasks ours."""
    paper = {"inpainting_config.yaml", "inpainting_freeform_config.yaml", "gaussian_deblur_config.yaml",
             "super_resolution_config.yaml"}
    for path in ALL_TASKS:
        task = load_task(path)
        release = path.name in paper and path.parent.name != "demo"
        assert task.protocol == ("release" if release else "per_image"), path
        assert task.data.resize == ("release" if release else "bicubic"), path
        if path.name != "motion_deblur_config.yaml" or path.parent.name != "demo":
            text = path.read_text()
            assert "protocol:" in text and "resize:" in text, f"{path} should state its protocol and resize"
    task = load_task(TASKS / "inpainting_config.yaml", ["protocol=per_image", "data.resize=bicubic"])
    assert (task.protocol, task.data.resize) == ("per_image", "bicubic")
    with pytest.raises(ConfigError, match="protocol must be one of per_image, release"):
        load_task(TASKS / "inpainting_config.yaml", ["protocol=same"])
    with pytest.raises(ConfigError, match="data.resize must be one of bicubic, release"):
        load_task(TASKS / "inpainting_config.yaml", ["data.resize=nearest"])


def test_python_tuple_tag_is_read_safely(tmp_path):
    raw = load_yaml(TASKS / "inpainting_config.yaml")
    assert raw["measurement"]["mask_opt"]["mask_len_range"] == (128, 129)
    evil = tmp_path / "evil.yaml"
    evil.write_text("a: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_yaml(evil)


@pytest.mark.parametrize("path", ALL_TASKS, ids=lambda p: p.relative_to(TASKS).as_posix())
def test_task_builds(path):
    """Every task names an existing model config, and its operator, noise and mask build at its image size."""
    task = load_task(path, sampler_fields=SAMPLER_FIELDS)
    LDSMCConfig(**task.sampler).resolve()  # the sampler section is a valid sampler config
    model_cfg = ROOT / task.model.config
    assert model_cfg.is_file(), f"{path} points at a missing model config {model_cfg}"
    size = 32 if path.parent.name == "demo" else 256
    op_cfg = dict(task.measurement.operator)
    op = get_operator(op_cfg.pop("name"), **op_cfg)
    x = torch.rand(1, 3, size, size) * 2 - 1
    if task.measurement.mask_opt is not None:
        gen = MaskGenerator.from_config(task.measurement.mask_opt)
        mask = gen(torch.Generator().manual_seed(0))
        assert mask.shape[-2:] == (size, size) and 0 < mask.mean() < 1
        op.set_mask(mask)
    y = get_noise(**task.measurement.noise)(op(x), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(y).all()
    if path.parent.name == "imagenet":
        assert task.data.labels_file or task.data.class_label is not None


def test_overrides_apply_and_are_validated():
    path = TASKS / "demo" / "gaussian_deblur_config.yaml"
    task = load_task(path, ["data.root=/some/where", "measurement.noise.sigma=0.05", "sampler.num_steps=7",
                            "data.max_images=3"], sampler_fields=SAMPLER_FIELDS)
    assert task.data.root == "/some/where" and task.data.max_images == 3
    assert task.measurement.noise["sigma"] == 0.05 and task.sampler["num_steps"] == 7
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.rooot'.*root"):
        load_task(path, ["data.rooot=x"], sampler_fields=SAMPLER_FIELDS)
    with pytest.raises(ConfigError, match=r"'sampler\.nope'"):
        load_task(path, ["sampler.nope=1"], sampler_fields=SAMPLER_FIELDS)
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_task(path, ["data.root"], sampler_fields=SAMPLER_FIELDS)
    # Operator arguments must already be in the YAML: a typo is an unknown key, not a silent no-op.
    with pytest.raises(ConfigError, match=r"measurement\.operator\.kernel_sise"):
        apply_overrides(load_yaml(path), ["measurement.operator.kernel_sise=3"])


def test_bad_configs_name_the_key(tmp_path):
    def write(text):
        p = tmp_path / "task.yaml"
        p.write_text(text)
        return p

    with pytest.raises(ConfigError, match="does not exist"):
        load_task(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task(write("measurement: [unclosed\n"))
    with pytest.raises(ConfigError, match="'measurement'.*operator: {name: .*noise: {name: gaussian"):
        load_task(write("data: {root: x}\n"))
    with pytest.raises(ConfigError, match=r"'measurement\.noise'"):
        load_task(write("measurement: {operator: {name: gaussian_blur}}\n"))
    with pytest.raises(ConfigError, match="mask_opt"):
        load_task(write("measurement: {operator: {name: inpainting}, noise: {name: gaussian, sigma: 0.1}}\n"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        load_task(write("data: {colour: red}\nmeasurement: {operator: {name: noise}, noise: {name: clean}}\n"))
    ok = "measurement: {operator: {name: noise}, noise: {name: gaussian, sigma: 0.1}}\n"
    for bad, key in (("data: {root: 5}\n", "data.root"), ("data: {batch_size: 0}\n", "data.batch_size"),
                     ("data: {image_size: abc}\n", "data.image_size"), ("data: {class_label: -1}\n", "data.class_label"),
                     ("model: {config: 3}\n", "model.config"), ("conditioning: {method: 3}\n", "conditioning.method"),
                     ("sampler: [1, 2]\n", "'sampler'")):
        with pytest.raises(ConfigError, match=key):
            load_task(write(bad + ok))
    for sigma in ("abc", "0", "-1", ".nan", "true"):
        with pytest.raises(ConfigError, match=r"measurement\.noise\.sigma must be a number > 0.*clean"):
            load_task(write(ok.replace("0.1", sigma)))
    with pytest.raises(ConfigError, match="top-level"):
        load_task(write("mesurement: {}\nmeasurement: {operator: {name: noise}, noise: {name: clean}}\n"))

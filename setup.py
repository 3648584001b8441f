"""gptjax: the GPT-assistant recipe (pretrain -> SFT -> RM -> PPO) in JAX/Flax.

Versions are pinned to a set verified together on CPU (Python 3.11, 2026-11).
"""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    # tfds builds and reads array_record without TensorFlow.
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    # tfds imports it without declaring it (tensorflow/datasets#11212).
    "importlib_resources==7.1.0",
    "sentencepiece==0.2.3",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "numpy>=2.0,<3",
    # jax's dtypes (bfloat16, float8). 0.7.0's extension spends 0.5-0.8 s initialising in
    # every process that imports jax; 0.6.0 takes 3 ms (BUILD.md, Tests).
    "ml_dtypes==0.6.0",
    "matplotlib==3.11.2",
    "tqdm>=4.66",
]

# Hugging Face checkpoints: safetensors and config.json need nothing (gptjax/hf reads
# them); their tokenizer.json files and chat templates need these.
HF = ["tokenizers==0.23.3", "jinja2==3.1.6"]

EXTRAS_REQUIRE = {
    "hf": HF,
    # transformers and CPU torch are the references of the Hugging Face parity tests
    # (tiny random models built in the tests). `torch==2.13.0` matches the CPU build
    # 2.13.0+cpu from https://download.pytorch.org/whl/cpu (BUILD.md).
    "test": [
        "pytest==9.0.3",
        "pytest-xdist==3.8.0",
        "ruff==0.17.6",
        *HF,
        "torch==2.13.0",
        "transformers==5.25.0",
        # The LoRA adapter export is checked by loading it in peft.
        "peft==0.21.2",
        "accelerate==1.16.0",
        # An independent reader of the TensorBoard event files gptjax/tb_events.py writes.
        "tensorboardX==2.6.5",
    ],
    # NVIDIA GPUs (driver >= 580, CUDA 13): the CUDA plugin with its pip-installed CUDA
    # and cuDNN libraries, at the pinned jax version (BUILD.md, GPU).
    "gpu": ["jax[cuda13]==0.10.2"],
    # libtpu for TPU VMs; also lets a CPU host compile ahead of time for TPU topologies.
    "tpu": ["jax[tpu]==0.10.2"],
    # Reading registered TFDS datasets that need TensorFlow to prepare (lm1b, c4).
    "tfds-prepare": ["tensorflow-cpu>=2.18"],
}

setuptools.setup(
    name="gptjax",
    version="0.1.0",
    description="Pretraining, SFT, reward modelling and RLHF (PPO) in JAX/Flax",
    packages=setuptools.find_packages(
        include=["gptjax", "gptjax.*", "experiments", "experiments.*", "configs"]
    ),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)

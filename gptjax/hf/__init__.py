"""Hugging Face checkpoints in and out (`gptjax.hf.model`), their safetensors files, configs
and tensor layouts. Needs no Hugging Face package: the files are read and written here."""

"""gptjax: pretraining, SFT, reward modelling and RLHF in JAX/Flax."""

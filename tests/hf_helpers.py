"""A tiny random Hugging Face checkpoint written by transformers (Llama with GQA, tied
embeddings), with a byte-level BPE tokenizer.json trained here and a Qwen-style chat
template; and small user data files (demos, Anthropic-HH comparisons, prompts)."""

import json
import os

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _qa(rng):
    a, b = (int(x) for x in rng.integers(0, 10, 2))
    return f"what is {a} plus {b}?", f"{a + b}"


def write_user_data(directory) -> dict[str, str]:
    rng = np.random.default_rng(0)
    paths = {k: os.path.join(directory, f"{k}.jsonl") for k in ("demos", "hh", "prompts")}
    with open(paths["demos"], "w") as f:
        for _ in range(200):
            p, r = _qa(rng)
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    with open(paths["hh"], "w") as f:
        for _ in range(60):
            p, r = _qa(rng)
            chosen = f"\n\nHuman: {p}\n\nAssistant: {r}"
            f.write(json.dumps({"chosen": chosen, "rejected": chosen[: -len(r)] + "no idea"}))
            f.write("\n")
    with open(paths["prompts"], "w") as f:
        for _ in range(40):
            f.write(json.dumps({"prompt": _qa(rng)[0], "response": "-"}) + "\n")
    return paths


def write_checkpoint(directory) -> str:
    """The checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    import tokenizers
    import torch
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    rng = np.random.default_rng(1)
    corpus = [" ".join(_qa(rng)) for _ in range(300)] + ["no idea", "user assistant system"]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    model_config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        bos_token_id=None,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(model_config).save_pretrained(directory)
    return str(directory)

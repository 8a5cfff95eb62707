"""Build a tiny random-weight Llama that real vLLM can serve, fully offline.

Usage: python make_tiny_model.py OUT_DIR

Run with the vLLM venv's python (it needs torch, transformers, tokenizers).
Nothing is downloaded: the tokenizer is trained here on a few lines of text.
The output is a few hundred KB and deterministic (fixed seed), so tests that
use temperature 0 see the same gibberish on every machine with the same
torch/vLLM versions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 1234
# Small enough to stay tiny, large enough that BPE learns real merges so token
# counts differ from byte counts (closer to what a real tokenizer does).
VOCAB_SIZE = 640

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML-like: vLLM's chat endpoint refuses to run without a template, and
# tests of diffbox prompt building want a realistic role/turn structure.
# Malformed roles are rejected here so that vLLM answers 400, as real models do.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Write a short summary of the following diff and explain the change.",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "diff --git a/file.py b/file.py\n--- a/file.py\n+++ b/file.py\n@@ -1,3 +1,4 @@",
    "You are a helpful assistant. Answer the question concisely.",
    "The server returned an error: request failed with status 400.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; symbols: {}[]()<>=+-*/",
    "A worker receives a job, downloads the input, runs the model and uploads the result.",
    "The image shows a red car parked in front of an old stone building at sunset.",
    "Please describe the picture in one sentence, then list three keywords.",
    "import json\nfrom pathlib import Path\n\nclass Config:\n    name: str = 'default'\n",
    "Temperature, top_p, max_tokens and stop sequences control the generation.",
    "Streaming responses arrive as server-sent events, one chunk per token.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    # Byte-level BPE: any input string is encodable (no <unk>), like GPT/Llama-3
    # tokenizers, and decoding random ids yields the invalid-UTF-8 / U+FFFD
    # output that real servers can produce, which clients must survive.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The corpus is small, so the trainer stops once no pair repeats: the real
    # vocab ends up a bit under VOCAB_SIZE (printed at the end).
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    # trim_offsets=False keeps offsets byte-exact; no automatic BOS here because
    # the chat template adds it, and a second BOS would skew token counts.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        # vLLM's CPU attention needs head_size >= 32: with 16 /health is 200
        # but the first real request kills the engine.
        head_dim=32,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Untied so the output rows of special tokens can be zeroed (below)
        # without touching their input embeddings.
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A zero output row gives logit 0 while the best of ~750 random logits
        # is positive, so greedy decoding never picks EOS/specials: tests get
        # exactly max_tokens tokens (finish_reason "length") unless they ask
        # for a `stop` string, instead of a seed-dependent early stop.
        for tid in tokenizer.all_special_ids:
            model.lm_head.weight[tid].zero_()
    return model.to(torch.bfloat16).eval()


def patch_tokenizer_config(out_dir: Path) -> None:
    # Newer transformers write the template only to chat_template.jinja; keep
    # it in tokenizer_config.json too so older loaders (and humans) find it.
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    tokenizer.save_pretrained(out_dir)
    patch_tokenizer_config(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Round-trip check: what vLLM will load must render the template.
    reloaded = PreTrainedTokenizerFast.from_pretrained(out_dir)
    prompt = reloaded.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str) and prompt.startswith(BOS), prompt
    print(f"tiny model: {out_dir} vocab={len(tokenizer)} params={model.num_parameters()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

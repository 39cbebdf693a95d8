"""Generate from a checkpoint: python sample.py runs/local/checkpoints/latest --prompt "def "

A byte-level model (vocabulary 257, the embedded corpus) takes and prints text; any other takes
and prints token ids (--prompt "1 2 3"): sample.py runs no tokenizer (a checkpoint's tokenizer.json,
where the run had data.tokenizer.name, is for transformers' AutoTokenizer).
CHECKPOINT is anything PicoDecoder.from_pretrained reads: a run's checkpoint, a transformers
Llama, pico-train's format, or a Hub repo id (NAME@REVISION).
"""

import argparse
import sys

import torch

import checkpoint
import data
from model import PicoDecoder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--prompt", default="\n", help="text, or space-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag, value, low in (("--temperature", args.temperature, 0), ("--top-k", args.top_k, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1)):
        if value is not None and value < low:
            parser.error(f"{flag} {value}: expected {low} or more")

    model = PicoDecoder.from_pretrained(args.checkpoint).eval()
    byte_level = model.config.vocab_size == data.BYTE_VOCAB_SIZE
    if byte_level:
        prompt = list(args.prompt.encode("utf-8"))
    else:
        try:
            prompt = [int(token) for token in args.prompt.split()]
        except ValueError:
            prompt = []
        if not prompt or not all(0 <= t < model.config.vocab_size for t in prompt):
            sys.exit(f"error: --prompt {args.prompt!r}: this model's vocabulary is not bytes; expected "
                     f"space-separated token ids in [0, {model.config.vocab_size})")
    torch.manual_seed(args.seed)
    out = model.generate(torch.tensor([prompt]), args.max_new_tokens, args.temperature, args.top_k)
    tokens = out[0].tolist()
    print(data.byte_text(tokens) if byte_level else " ".join(map(str, tokens)))


if __name__ == "__main__":
    try:
        main()
    except (checkpoint.CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")

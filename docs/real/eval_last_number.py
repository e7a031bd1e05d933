"""Held-out accuracy under the lenient reward of last_number.py: greedy answers of each model to the
toy's held-out 1- and 2-digit sums through the checkpoint's chat template (`--template chat`'s
prompt), scored by whether the last integer is the sum. The README's SmolLM2 table:

    python docs/real/eval_last_number.py runs/smollm2 runs/real/lenient_s0/zero/model runs/real/lenient_s1/zero/model
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from last_number import last_number  # noqa: E402

import tasks  # noqa: E402
from checkpoint import load_pretrained  # noqa: E402
from rollout import completion_text, generate  # noqa: E402
from tokenizer import Tokenizer, chat_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="HF-layout model directories")
    ap.add_argument("--n", type=int, default=32, help="held-out problems")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--show", type=int, default=4, help="answers printed per model")
    args = ap.parse_args()
    samples = tasks.get_task("toy", min_digits=1, max_digits=2).eval_samples(args.n)
    for d in args.models:
        model, tok = load_pretrained(d).eval(), Tokenizer.from_dir(d)
        prompts = [tok.encode(chat_prompt(tok, s["question"])) for s in samples]
        out = generate(model, prompts, args.max_new_tokens, temperature=0.0, eos_token_id=tok.eos_ids)
        texts = [completion_text(tok, t) for t in out.tokens]
        scores = last_number(texts, samples)
        length = sum(len(t) for t in out.tokens) / len(samples)
        print(f"{d}: last number right {sum(scores):.0f} / {len(samples)}, mean length {length:.1f} tokens")
        for s, t in list(zip(samples, texts))[:args.show]:
            print(f"    {s['question']} -> {t.strip()[:80]!r}")


if __name__ == "__main__":
    main()

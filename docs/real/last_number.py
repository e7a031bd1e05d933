"""A lenient accuracy reward for instruct models that answer in prose ("The answer is 11."): 1.0 when
the last integer in the completion is the gold answer, else 0.0. Used for the SmolLM2 R1-Zero run in
the README (`--reward docs/real/last_number.py:last_number`), where the rule reward, which needs
<answer> tags, is 0 on every sample."""
import re

_INT = re.compile(r"-?\d+")


def last_number(completions, samples):
    out = []
    for text, sample in zip(completions, samples):
        found = _INT.findall(text)
        out.append(1.0 if found and found[-1] == str(sample["answer"]).strip() else 0.0)
    return out

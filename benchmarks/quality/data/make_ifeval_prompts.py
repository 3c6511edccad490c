"""Writes ifeval_prompts.jsonl (committed): short requests, each with one or two IFEval-style instructions.

    python benchmarks/quality/data/make_ifeval_prompts.py

Deterministic: 36 requests x 3 instruction sets = 108 prompts; the first 24 requests are `train`, the
last 12 `test` (a test prompt's request never appears in training). The instruction sets cycle through
the types of `align_decode.rewards.instructions` so each split holds every type, alone and in pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

from align_decode.rewards.instructions import describe_instruction

# (request, a keyword it may plausibly use, a word it is likely to use)
REQUESTS = [
    ("Describe a rainy day.", "umbrella", "rain"),
    ("Name three fruits.", "apple", "fruit"),
    ("Give one tip for staying healthy.", "water", "health"),
    ("Explain what a cloud is.", "water", "sky"),
    ("Tell me about your favourite animal.", "dog", "animal"),
    ("Write a one-sentence story about a cat.", "mouse", "cat"),
    ("What is the capital of France?", "Paris", "France"),
    ("Describe the taste of coffee.", "bitter", "coffee"),
    ("Suggest a name for a pet fish.", "Bubbles", "fish"),
    ("Why is the sky blue?", "light", "blue"),
    ("Give a reason to learn to cook.", "food", "cook"),
    ("What do bees make?", "honey", "bees"),
    ("Describe a sunny beach.", "sand", "beach"),
    ("How do you make tea?", "boil", "tea"),
    ("Name a famous scientist.", "Einstein", "scientist"),
    ("What is your favourite season and why?", "summer", "season"),
    ("Describe a city at night.", "lights", "city"),
    ("Give advice to a new student.", "friends", "student"),
    ("What is a computer?", "machine", "computer"),
    ("Describe a forest in autumn.", "leaves", "forest"),
    ("Why do people exercise?", "healthy", "exercise"),
    ("Tell me about the moon.", "night", "moon"),
    ("What makes a good friend?", "trust", "friend"),
    ("Describe your ideal breakfast.", "eggs", "breakfast"),
    # test requests (never seen in training)
    ("Describe a snowy morning.", "cold", "snow"),
    ("Name two colours of the rainbow.", "red", "rainbow"),
    ("Give one tip for sleeping well.", "bed", "sleep"),
    ("Explain what a river is.", "water", "river"),
    ("Tell me about elephants.", "trunk", "elephant"),
    ("Write a one-sentence story about a robot.", "metal", "robot"),
    ("What is the largest ocean?", "Pacific", "ocean"),
    ("Describe the smell of bread.", "warm", "bread"),
    ("Suggest a name for a puppy.", "Max", "puppy"),
    ("Why do leaves fall?", "autumn", "leaves"),
    ("Give a reason to read books.", "learn", "books"),
    ("What do cows give us?", "milk", "cows"),
]
N_TRAIN = 24

ENDINGS = ["Have a nice day.", "That is all.", "Thank you."]
STARTS = ["Yes", "Sure", "Well"]


def single(kind: str, keyword: str, common: str, j: int) -> dict:
    if kind == "lower":
        return {"id": "change_case:english_lowercase"}
    if kind == "upper":
        return {"id": "change_case:english_capital"}
    if kind == "keyword":
        return {"id": "keywords:existence", "keywords": [keyword]}
    if kind == "forbidden":
        return {"id": "keywords:forbidden_words", "forbidden_words": [common]}
    if kind == "end":
        return {"id": "startend:end_checker", "end_phrase": ENDINGS[j % len(ENDINGS)]}
    if kind == "start":
        return {"id": "startend:start_checker", "start_phrase": STARTS[j % len(STARTS)]}
    if kind == "words":
        return {"id": "length_constraints:number_words", "relation": "less than", "num_words": (15, 20, 25)[j % 3]}
    if kind == "comma":
        return {"id": "punctuation:no_comma"}
    if kind == "quote":
        return {"id": "startend:quotation"}
    raise ValueError(kind)


# Instruction sets, cycled over the requests (each request gets three consecutive ones).
SETS = [("lower",), ("keyword", "words"), ("comma", "start"), ("quote",), ("end", "lower"), ("keyword", "forbidden"),
        ("words",), ("start", "keyword"), ("upper",), ("comma",), ("end",), ("quote", "comma"),
        ("forbidden",), ("lower", "words"), ("start",), ("keyword",), ("upper", "words"), ("end", "comma")]


def main() -> None:
    lines = []
    for r, (request, keyword, common) in enumerate(REQUESTS):
        for k in range(3):
            j = r * 3 + k
            instructions = [single(kind, keyword, common, j) for kind in SETS[j % len(SETS)]]
            prompt = " ".join([request] + [describe_instruction(i) for i in instructions])
            lines.append({"id": f"if{j:03d}", "prompt": prompt, "split": "train" if r < N_TRAIN else "test",
                          "instructions": instructions})
    out = Path(__file__).resolve().parent / "ifeval_prompts.jsonl"
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"wrote {len(lines)} prompts to {out}")


if __name__ == "__main__":
    main()

"""The neutral chat requests the speed benchmarks decode (the i-th request of a batch is PROMPTS[i % 8]).

Neutral on purpose: nothing in them pulls the policy towards any reward, so a guide's effect and cost
are measured on ordinary traffic."""

PROMPTS = [
    "Describe your morning routine.",
    "What do you think of rainy days?",
    "Give me advice on learning to cook.",
    "Tell me about your favourite book.",
    "How should I prepare for an exam?",
    "Write a note to a friend who moved away.",
    "What is a good way to spend a weekend?",
    "Explain why people enjoy music.",
]

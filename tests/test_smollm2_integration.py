"""GenARM on the real SmolLM2-135M-Instruct with a prompted SmolLM2 as the ARM."""

import pytest
import torch

from align_decode import AlignedModel, GenARM, PromptedARM
from align_decode.decoding import PromptBatch

pytestmark = pytest.mark.slow


def test_prompted_smollm2_guides_smollm2(smollm2):
    model, tok = smollm2
    tok.padding_side = "left"
    chats = [[{"role": "user", "content": "Describe your morning."}],
             [{"role": "user", "content": "What do you think of rainy days?"}]]
    enc = tok.apply_chat_template(chats, add_generation_prompt=True, return_dict=True, return_tensors="pt",
                                  padding=True)
    arm = PromptedARM(model, tok, "Answer with warmth, joy and enthusiasm.")
    aligned = AlignedModel(model, tokenizer=tok, strategy=GenARM(arm, beta=1.0))
    out = aligned.generate(**enc, max_new_tokens=16, do_sample=True, top_k=0, seed=[0, 1],
                           return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape[0] == 2 and len(out.scores) <= 16
    texts = tok.batch_decode(out.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(t.strip() for t in texts)
    # The first step's law is the GenARM mix of the policy and the instructed ARM, recomputed from scratch.
    guide_ids, guide_mask = arm.guide_prompts(PromptBatch(enc["input_ids"], enc["attention_mask"]))
    assert "warmth" in tok.decode(guide_ids[0])
    with torch.no_grad():
        for row in range(2):
            p = enc["input_ids"][row][enc["attention_mask"][row].bool()]
            g = guide_ids[row][guide_mask[row].bool()]
            lp = torch.log_softmax(model(input_ids=p[None]).logits[0, -1], -1)
            lg = torch.log_softmax(model(input_ids=g[None]).logits[0, -1], -1)
            torch.testing.assert_close(out.scores[0][row], torch.log_softmax(lp + lg, -1), atol=2e-4, rtol=0)
    # Weight 0 greedy is plain greedy decoding of SmolLM2.
    plain = model.generate(**enc, max_new_tokens=16, do_sample=False)
    zero = aligned.generate(**enc, max_new_tokens=16, do_sample=False, strategy=GenARM(arm, weights=[0.0]))
    assert torch.equal(plain, zero)

"""Step boundaries: delimiters inside one token or split over two, token-count steps, and the loop
ending a row at a step boundary."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from align_decode import AlignedModel, StepBeamSearch
from align_decode.decoding.steps import StepBoundary
from align_decode.rewards.process import ProcessReward
from tiny import tiny_llama

# id: text. 3 holds the delimiter, 4 holds it after other text, 5 + 6 split it, 7 ends with one newline
# but 2 starts with none.
TEXTS = ["<pad>", "</s>", "a", "\n\n", "b.\n\n", "c\n", "\nd", "e"]


def newline_tokenizer():
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(TEXTS)}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")


def test_delimiter_inside_a_token_or_split_over_two():
    boundary = StepBoundary.build(newline_tokenizer(), "\n\n")
    assert boundary.stop_ids() == [3, 4]
    previous = torch.tensor([2, 2, 5, 7, 5, 2])
    tokens = torch.tensor([3, 4, 6, 6, 2, 6])
    assert boundary(previous, tokens).tolist() == [True, True, True, False, False, False]


def test_token_count_steps_and_bad_arguments():
    boundary = StepBoundary.build(None, delimiter=None, step_tokens=4)
    assert boundary(torch.tensor([3]), torch.tensor([3])).tolist() == [False]
    assert boundary.limit(torch.tensor([10, 2])).tolist() == [4, 2]
    with pytest.raises(ValueError, match="a delimiter or a token count"):
        StepBoundary.build(None, delimiter=None)
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        StepBoundary.build(None, "\n\n")
    with pytest.raises(ValueError, match="must not be empty"):
        StepBoundary.build(newline_tokenizer(), "")


class Recorder(ProcessReward):
    name = "recorder"

    def __init__(self):
        self.seen = []

    def _score(self, responses):
        self.seen += responses
        return [float(len(r.steps)) for r in responses]


def test_search_steps_end_at_the_delimiter_or_the_token_count():
    tok = newline_tokenizer()
    policy = tiny_llama(len(TEXTS), seed=3, init=0.8)
    scorer = Recorder()
    boundary = StepBoundary.build(tok, "\n\n")
    search = StepBeamSearch(scorer, n=4, beam_width=2, step_delimiter="\n\n", step_tokens=5, max_steps=6)
    AlignedModel(policy, tokenizer=tok, strategy=search).generate(
        input_ids=torch.tensor([[2, 7]] * 3), max_new_tokens=24, do_sample=True, top_k=0, eos_token_id=1,
        pad_token_id=0, seed=[1, 2, 3], return_dict_in_generate=True)
    assert scorer.seen
    ended = 0
    for r in scorer.seen:
        step = list(r.step_ids[-1])
        previous = list(r.step_ids[-2])[-1:] if len(r.step_ids) > 1 else [7]
        at_delimiter = bool(boundary(torch.tensor((previous + step)[-2:-1]), torch.tensor(step[-1:])))
        assert at_delimiter or len(step) == 5 or step[-1] == 1 or sum(map(len, r.step_ids)) == 24
        # No delimiter before the step's last token.
        pairs = zip(previous + step[:-1], step[:-1])
        assert not any(bool(boundary(torch.tensor([p]), torch.tensor([t]))) for p, t in pairs)
        ended += at_delimiter
        assert r.steps[-1] == tok.decode(step, skip_special_tokens=True)
    assert ended > 0

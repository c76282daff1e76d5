"""A logits processor that makes any Dynamo recompile raise from a given forward of generate on."""

import torch
from transformers import LogitsProcessor


class FailOnRecompileFrom(LogitsProcessor):
    """Called after every forward of generate: from forward number ``call`` on (1 = the prefill),
    ``torch.compiler.set_stance("fail_on_recompile")``; reset the stance after generate."""

    def __init__(self, call: int):
        self.call = call
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.call:
            torch.compiler.set_stance("fail_on_recompile")
        return scores

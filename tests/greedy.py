"""Greedy generation as the tests compare it: NEW_TOKENS tokens, with the logits of every step."""

import torch

NEW_TOKENS = 4


def generate(model, inputs, max_new_tokens=NEW_TOKENS, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kwargs)

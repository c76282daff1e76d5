"""One CSP engine (budget 0.2, window 8) against plain vLLM and the reference selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from vllm import SamplingParams

from csp_compile.config import CSPConfig
from csp_compile.data import IMAGE_TOKENS, VOCAB, make_dataset
from csp_compile.scoring import resolve_budget
from csp_compile.selection import select_kept
from csp_compile.vllm import batch
from csp_compile.vllm.engine import BLOCK_SIZE, greedy, held_blocks, task_prompt
from kept_cache import assert_kept_equal_select_kept

CONFIG = CSPConfig(budget=0.2, window=8)


@pytest.fixture(scope="module")
def csp_llm(engine):
    return engine(CONFIG)


@pytest.fixture(scope="module")
def plain_llm(engine):
    return engine(None)


def test_full_budget_gives_plain_vllm_tokens(engine, plain_llm, test_split, records):
    prompts = test_split[0][:40]
    full = engine(CSPConfig(budget=1.0, window=8))
    assert greedy(full, prompts, 4) == greedy(plain_llm, prompts, 4)
    assert records == []  # nothing compacted


def _prefill_and_record(llm, prompts, records):
    """Greedy one token of every prompt in one ``generate`` call (prefill only: nothing overwrites the
    cache after); {req_id: the request's prompt token ids as vLLM expanded them}."""
    view = batch.view_for(llm.llm_engine.vllm_config)
    prompt_ids = {}
    batch.RECORDER.append(lambda name, req_id, *rest: prompt_ids.setdefault(req_id, view.request(req_id).prompt_token_ids))
    greedy(llm, prompts, 1)
    layers = 4
    assert len(records) == len(prompts) * layers and len(prompt_ids) == len(prompts)
    return {req_id: torch.tensor(ids) for req_id, ids in prompt_ids.items()}


def _check_records_against_select_kept(llm, records, prompt_ids, config=CONFIG):
    """Every compaction in ``records``: the plugin's modality ids equal the image tokens of the
    request's own expanded prompt, and ``assert_kept_equal_select_kept`` holds (block-rounded kept
    count, selection equal to ``select_kept`` on the request's own Q/K, the cache's layout)."""
    for record in records:
        name, req_id, query, key, value, modality, plan, indices, slots = record
        ids = prompt_ids[req_id]
        # modality from the token ids, independently of the placeholder ranges the plugin used
        assert torch.equal(modality, (ids == VOCAB.image).long())
        assert plan.length == len(ids)
        assert_kept_equal_select_kept(llm, record, config)


def test_kept_positions_per_layer_and_kv_head_equal_select_kept(csp_llm, records):
    examples = make_dataset(6, "test")
    prompt_ids = _prefill_and_record(csp_llm, [task_prompt(e) for e in examples], records)
    for ids in prompt_ids.values():
        assert any(torch.equal(ids, e.input_ids) for e in examples)  # vLLM expanded the one placeholder to 64
    _check_records_against_select_kept(csp_llm, records, prompt_ids)


def test_image_pooling_kept_positions_equal_select_kept_on_the_square_grid(engine, records):
    """pool="image" with image_grid="auto": the plugin takes Llava's rule (each 64-token image an 8 x 8
    grid), and its kept positions equal ``select_kept`` with image_grid="square"."""
    config = CONFIG.replace(pool="image", pool_kernel=3, image_grid="auto")
    llm = engine(config)
    examples = make_dataset(6, "test")
    prompt_ids = _prefill_and_record(llm, [task_prompt(e) for e in examples], records)
    _check_records_against_select_kept(llm, records, prompt_ids, config.replace(image_grid="square"))
    unpooled = [select_kept(r[2].permute(1, 0, 2)[None], r[3].permute(1, 0, 2)[None], r[5][None],
                            CONFIG.replace(budget=r[6].kept), scale=1 / math.sqrt(r[3].shape[-1])).indices[0]
                for r in records]
    assert any(not torch.equal(record[7], plain) for record, plain in zip(records, unpooled))  # pooling matters


# Llava's image token count is fixed by its vision tower (image_size 32 / patch 4 = 64 tokens, CLIP position
# embeddings for exactly 8 x 8 patches): vLLM refuses pixel sizes other than 32 x 32 ("pixel_values dim[2] expected
# 32"), so images of other sizes are resized by the processor (per request: ``mm_processor_kwargs``; the prepared
# model dir passes 32 x 32 images through unchanged, as the task's). Different image-token counts per request come
# from the number of images: one image is 64 tokens, two are 128.
RESIZE = {"do_resize": True, "size": {"height": 32, "width": 32}}


def _resized(image, height, width):
    """The (H, W, 3) task image scaled to ``height`` x ``width`` pixels (an image of another original size)."""
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    return F.interpolate(pixels, size=(height, width), mode="bilinear").clamp(0, 1)[0].permute(1, 2, 0).contiguous().numpy()


def _images_of_different_sizes():
    """Four prompts for one batch: the task's 32 x 32 image, a 48 x 48 and a 24 x 40 one (resized by the
    processor), and one with two images (16 x 56 and 40 x 40: 128 image tokens), placeholders at other offsets."""
    examples = make_dataset(4, "test", seed=5)
    prompts = [task_prompt(e) for e in examples]
    for prompt, (height, width) in zip(prompts[1:3], [(48, 48), (24, 40)]):
        prompt["multi_modal_data"] = {"image": _resized(prompt["multi_modal_data"]["image"], height, width)}
        prompt["mm_processor_kwargs"] = RESIZE
    two = prompts[3]
    ids, image = two["prompt_token_ids"], two["multi_modal_data"]["image"]
    middle = len(ids) // 2
    two["prompt_token_ids"] = ids[:middle] + [VOCAB.image] + ids[middle:]
    two["multi_modal_data"] = {"image": [_resized(image, 16, 56), _resized(image[::-1].copy(), 40, 40)]}
    two["mm_processor_kwargs"] = RESIZE
    return prompts


def test_one_batch_of_images_of_different_sizes_keeps_each_requests_own_selection(csp_llm, records):
    prompts = _images_of_different_sizes()
    prompt_ids = _prefill_and_record(csp_llm, prompts, records)
    image_tokens = sorted(int((ids == VOCAB.image).sum()) for ids in prompt_ids.values())
    assert image_tokens == [IMAGE_TOKENS] * 3 + [2 * IMAGE_TOKENS]
    assert len({len(ids) for ids in prompt_ids.values()}) > 1
    first_layer = records[0][0]
    assert [r[0] for r in records[: len(prompts)]] == [first_layer] * len(prompts)  # all compacted in one step
    _check_records_against_select_kept(csp_llm, records, prompt_ids)


def test_one_batch_of_images_of_different_sizes_at_full_budget_gives_plain_vllm_tokens(engine, plain_llm):
    prompts = _images_of_different_sizes()
    assert greedy(engine(CSPConfig(budget=1.0, window=8)), prompts, 4) == greedy(plain_llm, prompts, 4)


def test_a_request_holds_only_its_kept_blocks_after_prefill(csp_llm, plain_llm):
    example = make_dataset(1, "test")[0]
    length = len(example.input_ids)
    held = {}
    for name, llm in (("csp", csp_llm), ("plain", plain_llm)):
        engine = llm.llm_engine
        engine.add_request(name, task_prompt(example), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        engine.step()  # the prefill step
        (held[name],) = held_blocks(llm).values()
        while engine.has_unfinished_requests():
            engine.step()
    kept = length - (length - resolve_budget(length, CONFIG)[0]) // BLOCK_SIZE * BLOCK_SIZE
    assert held["plain"] == math.ceil(length / BLOCK_SIZE)
    assert held["csp"] == math.ceil(kept / BLOCK_SIZE) < held["plain"]

"""The image-conditioned policy: a LLaVA-style model of a saved ViT, a fresh projector and the demo's tiny Llama,
through PolicyModel's load / generate / forward / reference / LoRA / save, and the bad inputs of image prompts."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.config import LoraSettings, ModelSettings
from rlhf.data import Record, collate_sft, tokenize_sft
from rlhf.errors import UserError
from rlhf.policy import PolicyModel, next_token_logprobs
from rlhf.vision import IMAGE_TOKEN, check_image_prompts, record_images

SIDE, PATCH = 32, 8  # 16 patches + [CLS] = 17 image tokens per prompt


def _square(path, colour, box):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIDE, SIDE), (240, 240, 240))
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def image_rows(tmp_path_factory):
    """Two prompt records with images, paths relative to their jsonl file, as a dataset would hold them."""
    root = tmp_path_factory.mktemp("rows")
    (root / "images").mkdir()
    _square(root / "images" / "red.png", (220, 30, 30), (4, 4, 20, 20))
    _square(root / "images" / "blue.png", (30, 30, 220), (10, 10, 28, 28))
    rows = [{"prompt": f"<add> {IMAGE_TOKEN}=", "completion": " 7", "images": ["images/red.png"], "task": "add"},
            {"prompt": f"<add> {IMAGE_TOKEN}=", "completion": " 12", "images": ["images/blue.png"], "task": "add"}]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [Record.at(r, f"{root / 'rows.jsonl'}:{i + 1}") for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def vlm(policy_dir, vit_dir):
    return PolicyModel.load(ModelSettings(path=str(policy_dir), vision_tower=str(vit_dir)), with_reference=True,
                            device="cpu")


def _images(rows):
    return [record_images(r)[0] for r in rows]


def test_built_from_the_tower_and_the_language_model(vlm, policy_dir, vit_dir):
    from transformers import AutoModelForCausalLM, ViTModel

    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    assert vlm.image_inputs.tokens_per_image == (SIDE // PATCH) ** 2 + 1  # patches and [CLS]
    assert IMAGE_TOKEN in vlm.tokenizer.get_vocab()
    lm = AutoModelForCausalLM.from_pretrained(policy_dir)
    inner = vlm.model.model
    assert torch.equal(inner.language_model.layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight)
    rows = lm.get_input_embeddings().weight.size(0)
    assert torch.equal(inner.language_model.embed_tokens.weight[:rows], lm.get_input_embeddings().weight)
    tower = ViTModel.from_pretrained(vit_dir, add_pooling_layer=False)
    assert torch.equal(inner.vision_tower.embeddings.cls_token, tower.embeddings.cls_token)


def test_generate_and_forward_agree_and_the_image_matters(vlm, image_rows):
    prompts = [r["prompt"] for r in image_rows]
    rollout = vlm.generate(prompts, images=_images(image_rows), max_new_tokens=6, greedy=True, backend="hf")
    assert rollout.pixel_values.shape == (2, 3, SIDE, SIDE)
    assert rollout.prompt_ids.size(1) >= 17 + 2  # the placeholder became 17 image tokens
    with torch.no_grad():
        logits = vlm.model(**rollout.model_inputs()).logits[:, rollout.prompt_ids.size(1) - 1:-1]
    greedy = logits.argmax(-1)
    assert torch.equal(greedy[rollout.response_mask], rollout.response_ids[rollout.response_mask])
    # the same prompt with the other row's image: different next-token distributions
    swapped = rollout.select([0, 0])
    swapped.pixel_values = rollout.pixel_values[[0, 1]]
    with torch.no_grad():
        own = vlm.forward(rollout.select([0, 0])).logprobs
        other = vlm.forward(swapped).logprobs
    assert not torch.allclose(own[1], other[1])


def test_chunked_logprobs_equal_the_full_projection(vlm, image_rows):
    rollout = vlm.generate([r["prompt"] for r in image_rows], images=_images(image_rows), n=2, max_new_tokens=5,
                           seed=0, backend="hf")
    with torch.no_grad():
        full, _, _ = next_token_logprobs(vlm.model, rollout.model_inputs(), rollout.response_ids, chunk_elements=2**30)
        chunked, _, _ = next_token_logprobs(vlm.model, rollout.model_inputs(), rollout.response_ids, chunk_elements=64)
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=1e-5)
    assert len(rollout) == 4 and torch.equal(rollout.pixel_values[0], rollout.pixel_values[1])


def test_reference_starts_equal_and_lora_trains_the_projector(policy_dir, vit_dir, image_rows):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    policy = PolicyModel.load(ModelSettings(path=str(policy_dir), vision_tower=str(vit_dir), lora=lora), device="cpu")
    rollout = policy.generate([r["prompt"] for r in image_rows], images=_images(image_rows), max_new_tokens=4, seed=0,
                              backend="hf")
    with torch.no_grad():
        own = policy.forward(rollout).logprobs
        with policy.reference() as ref:
            reference = ref.forward(rollout).logprobs
    torch.testing.assert_close(own, reference)  # LoRA B = 0 at start, and the projector copy equals the original
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n for n in trainable) and any("lora_" in n for n in trainable)
    # q_proj / v_proj name the ViT's attention too: the tower gets adapters, its own weights stay frozen
    assert not any("vision_tower" in n and "lora_" not in n for n in trainable)


def test_saved_policy_loads_back_with_its_processor(vlm, image_rows, tmp_path):
    from transformers import AutoProcessor

    vlm.save(tmp_path / "saved")
    back = PolicyModel.from_pretrained(str(tmp_path / "saved"))
    assert back.image_inputs.tokens_per_image == vlm.image_inputs.tokens_per_image
    rollout = vlm.generate([r["prompt"] for r in image_rows], images=_images(image_rows), max_new_tokens=4, seed=1,
                           backend="hf")
    with torch.no_grad():
        torch.testing.assert_close(back.forward(rollout).logprobs, vlm.forward(rollout).logprobs)
    processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    encoded = processor(text=[image_rows[0]["prompt"]], images=_images(image_rows[:1]), return_tensors="pt")
    assert int((encoded["input_ids"] == vlm.model.config.image_token_id).sum()) == vlm.image_inputs.tokens_per_image
    torch.testing.assert_close(encoded["pixel_values"], rollout.pixel_values[:1])


def test_sft_examples_carry_their_images(vlm, image_rows):
    examples, _ = tokenize_sft(image_rows, vlm.tokenizer, 64, image_inputs=vlm.image_inputs)
    image_id = vlm.model.config.image_token_id
    assert all(e.input_ids.count(image_id) == 17 for e in examples)
    batch = collate_sft(examples, vlm.tokenizer.pad_token_id, vlm.image_inputs)
    assert batch["pixel_values"].shape == (2, 3, SIDE, SIDE)
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])


def test_chat_messages_with_image_parts(vlm, image_rows):
    row = Record.at({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is it?"}]}],
                     "images": image_rows[0]["images"]}, image_rows[0].origin)
    from rlhf.data import prompt_text

    text = prompt_text(row, vlm.tokenizer)
    assert text.count(IMAGE_TOKEN) == 1
    check_image_prompts([row], vlm.image_inputs, "vlm", prompt_of=lambda r: prompt_text(r, vlm.tokenizer))


def test_bad_image_inputs_name_the_record_and_field(vlm, image_rows, tmp_path):
    origin = image_rows[0].origin
    missing = Record.at({**image_rows[0], "images": ["images/nope.png"]}, origin)
    with pytest.raises(UserError, match=r"rows\.jsonl:1: field 'images' item 0: image file not found"):
        check_image_prompts([missing], vlm.image_inputs, "vlm")
    (tmp_path / "notes.png").write_text("not an image")
    broken = Record.at({**image_rows[0], "images": [str(tmp_path / "notes.png")]}, origin)
    with pytest.raises(UserError, match=r"rows\.jsonl:1: field 'images' item 0: .*notes\.png is not a readable image"):
        check_image_prompts([broken], vlm.image_inputs, "vlm")
    with pytest.raises(UserError, match=r"rows\.jsonl:1: field 'images': the model text-lm is text-only"):
        check_image_prompts(image_rows, None, "text-lm")
    text_only = Record.at({"prompt": "<add> 3+4=", "task": "add"}, "p.jsonl:3")
    with pytest.raises(UserError, match=r"p\.jsonl:3: field 'images' is missing: the model vlm is a vision-language"):
        check_image_prompts([text_only], vlm.image_inputs, "vlm")
    no_placeholder = Record.at({**image_rows[0], "prompt": "<add> ="}, origin)
    with pytest.raises(UserError, match=r"rows\.jsonl:1: field 'prompt' has 0 '<image>' placeholders for 1 image"):
        check_image_prompts([no_placeholder], vlm.image_inputs, "vlm")
    two = Record.at({**image_rows[0], "images": ["images/red.png", "images/blue.png"]}, origin)
    with pytest.raises(UserError, match="holds 2 images; one image per prompt"):
        check_image_prompts([two], vlm.image_inputs, "vlm")


def test_a_vision_tower_that_is_not_one(policy_dir, tmp_path):
    with pytest.raises(UserError, match="model.vision_tower"):
        PolicyModel.load(ModelSettings(path=str(policy_dir), vision_tower=str(tmp_path)), device="cpu")
    with pytest.raises(UserError, match="is a llama model, not a ViT"):
        PolicyModel.load(ModelSettings(path=str(policy_dir), vision_tower=str(policy_dir)), device="cpu")


def test_the_fast_sampler_takes_image_prompts(vlm, policy_dir, vit_dir, image_rows):
    from rlhf import generation

    assert generation.unsupported_reason(vlm.model) is None  # the language model is a Llama: fast decodes it
    prompts, images = [r["prompt"] for r in image_rows], _images(image_rows)
    fast = vlm.generate(prompts, images=images, max_new_tokens=8, greedy=True, backend="fast")
    slow = vlm.generate(prompts, images=images, max_new_tokens=8, greedy=True, backend="hf")
    assert torch.equal(fast.response_ids, slow.response_ids)
    # under LoRA with moved adapters too, and the image token is never sampled
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    policy = PolicyModel.load(ModelSettings(path=str(policy_dir), vision_tower=str(vit_dir), lora=lora), device="cpu")
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        head = policy.model.get_output_embeddings().weight
        head[policy.model.config.image_token_id] += 5.0  # the image token would win every step
    assert generation.unsupported_reason(policy.model) is None
    fast = policy.generate(prompts, images=images, max_new_tokens=8, greedy=True, backend="fast")
    slow = policy.generate(prompts, images=images, max_new_tokens=8, greedy=True, backend="hf")
    assert torch.equal(fast.response_ids, slow.response_ids)
    sampled = policy.generate(prompts, images=images, n=4, max_new_tokens=8, seed=0, backend="fast")
    assert not (sampled.response_ids == policy.model.config.image_token_id).any()

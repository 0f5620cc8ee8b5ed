"""Model cards of T5 and image-classifier EE checkpoints: the right pipeline tag and usage section.

The converter writes a `README.md` from `model_cards/`; for these families it must show their own client class,
pipeline and CLI command, not the causal-LM ones.
"""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard
from tiny_families import convert_tiny_family

from hss_ee_hf.hub.model_card import render_model_card

CASES = {
    "t5-relu-tied": ("text2text-generation", "HSSEEForConditionalGeneration.from_pretrained(", "hss-ee generate"),
    "resnet-basic": ("image-classification", '"hss-ee-image-classification"', "hss-ee classify"),
    "vit": ("image-classification", '"hss-ee-image-classification"', "hss-ee classify"),
}


@pytest.mark.parametrize("variant", sorted(CASES))
def test_card_names_the_task_and_its_client(variant: str, tmp_path) -> None:
    _, folder, _ = convert_tiny_family(variant, tmp_path)
    tag, client, command = CASES[variant]
    for text in ((folder / "README.md").read_text(encoding="utf-8"), render_model_card(folder, "me/model-ee")):
        card = ModelCard(text)
        assert card.data.pipeline_tag == tag
        assert card.data.library_name == "hss-ee-hf"
        assert client in card.text and command in card.text
        assert "HSSEEForCausalLM" not in card.text

import re
from pathlib import Path

import pytest

from comfusion import prompts

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth"

SUPPLEMENT_D = ["in the rain", "in the river", "in the sky", "in the room", "in the basket", "in the TV",
                "in the snow", "on the sofa", "on the bed", "on the table", "on the stage",
                "on the top of mountain", "on the playground", "on the floor", "on the grass"]


def test_paper_scenes_are_supplement_d_in_order():
    assert list(prompts.PAPER_SCENES) == SUPPLEMENT_D


def test_text_builders():
    assert prompts.instance_text("sks", "dog") == "a sks dog"
    assert prompts.class_text("dog") == "a dog"
    assert prompts.class_scene_text("dog", "in the rain") == "a dog in the rain"
    assert prompts.instance_scene_text("sks", "dog", "in the rain") == "a sks dog in the rain"


def test_evaluation_prompts_pick_the_live_or_object_list():
    dog, bowl = prompts.evaluation_prompts("sks", "dog"), prompts.evaluation_prompts("sks", "bowl")
    assert len(dog) == len(bowl) == 25
    assert "a sks dog wearing a santa hat" in dog and "a sks bowl floating in an ocean of milk" in bowl
    assert dog[-5:] == ("a red sks dog", "a purple sks dog", "a shiny sks dog", "a wet sks dog",
                        "a cube shaped sks dog")


def test_evaluation_prompts_match_the_dataset_file():
    path = DREAMBOOTH / "prompts_and_classes.txt"
    if not path.is_file():
        pytest.skip(f"DreamBooth dataset not found at {DREAMBOOTH}")
    text = path.read_text()
    obj, live = text.split("Live Subject Prompts")
    for block, cls in ((obj, "bowl"), (live, "dog")):
        templates = re.findall(r"'(a [^']*)'\.format\(unique_token, class_token\)", block)
        expected = tuple(t.replace("{0} {1}", "sks " + cls) for t in templates)
        assert prompts.evaluation_prompts("sks", cls) == expected

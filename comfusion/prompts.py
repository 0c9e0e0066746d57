"""The texts of the paper: instance, class, class-scene and instance-scene prompts, and scene lists."""
from __future__ import annotations

# Supplement D: the 15 specific scenes, in the paper's order.
PAPER_SCENES: tuple[str, ...] = (
    "in the rain",
    "in the river",
    "in the sky",
    "in the room",
    "in the basket",
    "in the TV",
    "in the snow",
    "on the sofa",
    "on the bed",
    "on the table",
    "on the stage",
    "on the top of mountain",
    "on the playground",
    "on the floor",
    "on the grass",
)

# Identifier words that the project's byte-level tokenizers (`tiny`, `toy`, `sd15-arch`) keep as
# single tokens of their own, appended after the byte vocabulary (`comfusion.models`). No caption
# of the toy world and no prompt list here uses them, so, like "sks" in SD 1.5's vocabulary, each
# is a rare token that shares nothing with a class or scene word. The default identifier is the
# first; the demo's subjects use the first two.
IDENTIFIER_TOKENS: tuple[str, ...] = ("sks", "zwx", "qlv", "vbx", "pxk", "jqz", "wqy", "ykv")
DEFAULT_IDENTIFIER = IDENTIFIER_TOKENS[0]

# Supplement E / DreamBooth protocol: 25 prompts for unseen scenes. Each is a template
# over "{identifier} {class_noun}"; the lists are the dataset's `prompts_and_classes.txt`.
_SHARED_RECONTEXT = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_PROPERTY = (
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)
OBJECT_PROMPTS: tuple[str, ...] = _SHARED_RECONTEXT + (
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
) + _PROPERTY
LIVE_SUBJECT_PROMPTS: tuple[str, ...] = _SHARED_RECONTEXT + (
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
) + _PROPERTY

# DreamBooth's live subjects are its cats and dogs; every other class uses the object list.
LIVE_CLASSES = frozenset({"cat", "dog"})


def instance_text(identifier: str, class_noun: str) -> str:
    """T^I = "a [identifier] [class noun]" (Eq. 1)."""
    return f"a {identifier} {class_noun}"


def class_text(class_noun: str) -> str:
    """T^C = "a [class noun]" (DreamBooth's Eq. 2)."""
    return f"a {class_noun}"


def class_scene_text(class_noun: str, scene: str) -> str:
    """T^CS = "a [class noun] [scene]" (Eq. 3)."""
    return f"a {class_noun} {scene}"


def instance_scene_text(identifier: str, class_noun: str, scene: str) -> str:
    """T^IS = "a [identifier] [class noun] [scene]" (Eq. 4): T^CS with the identifier added."""
    return f"a {identifier} {class_noun} {scene}"


def evaluation_prompts(identifier: str, class_noun: str) -> tuple[str, ...]:
    """The 25 DreamBooth prompts for a subject, live-subject list for cats and dogs."""
    templates = LIVE_SUBJECT_PROMPTS if class_noun in LIVE_CLASSES else OBJECT_PROMPTS
    return tuple(t.format(f"{identifier} {class_noun}") for t in templates)

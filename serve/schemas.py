"""Request and response models of the Serve API (pydantic v2).

Everything a client sends is checked here, before any model code runs: an out-of-range or
unknown field is a 422 that names the field. Token counting needs the tokenizer, so the
ingress does that one check itself.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from comfusion.data import is_valid_subject_id

MAX_IMAGES = 4
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MIN_SIZE, MAX_SIZE = 8, 1024
MAX_SEED = 2**32 - 1
MAX_SCENE_CHARS = 200
MAX_PROMPT_CHARS = 1000  # the 77-token limit is checked later with the model's tokenizer


def _subject_id(value: str) -> str:
    if not is_valid_subject_id(value):
        raise ValueError("must match ^[a-z0-9][a-z0-9_-]{0,63}$ (lower-case letters, digits, '-' and '_')")
    return value


def _text(value: str | None) -> str | None:
    if value is None:
        return None
    value = " ".join(value.split())  # one space between words; no newlines or tabs reach the model
    if not value:
        raise ValueError("must not be blank")
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


SubjectId = Annotated[str, Field(max_length=64, description="the subject id, e.g. 'yellow-ball'"),
                      AfterValidator(_subject_id)]
Scene = Annotated[str, Field(max_length=MAX_SCENE_CHARS), AfterValidator(_text)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_text)]
ImageSide = Annotated[int, Field(ge=MIN_SIZE, le=MAX_SIZE, multiple_of=8)]


class GenerateRequest(BaseModel):
    """`POST /v1/generate`: render a trained subject in a scene (or with a full prompt)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    subject: SubjectId
    scene: Scene | None = Field(None, description="e.g. 'in the snow': the prompt becomes "
                                                  "'a [identifier] [class noun] in the snow'")
    prompt: Prompt | None = Field(None, description="a full prompt, used as it is (give scene or prompt)")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the first image (image i uses "
                                                                  "seed + i); random when left out")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="DDIM steps (default: the app's, 30)")
    guidance_scale: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    height: ImageSide | None = Field(None, description="pixels, a multiple of 8 (default: the model's size)")
    width: ImageSide | None = Field(None, description="pixels, a multiple of 8 (default: the model's size)")

    @model_validator(mode="after")
    def _scene_or_prompt(self) -> GenerateRequest:
        if (self.scene is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'scene' or 'prompt'")
        return self


class GenerateResponse(BaseModel):
    """The images (base64 PNG, one per seed) and what produced them."""

    images: list[str]
    prompt: str
    seeds: list[int]
    subject: str
    version: int
    steps: int
    guidance_scale: float
    height: int
    width: int


class SubjectInfo(BaseModel):
    """One servable subject, as `GET /v1/subjects` lists it."""

    id: str
    version: int
    identifier: str
    class_noun: str
    method: str
    created: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    kind: str = "full"  # "full" (finetuned weights) or "lora" (adapters on the base model)


class SubjectList(BaseModel):
    subjects: list[SubjectInfo]

"""Subject photos: check a subjects manifest before any compute, and turn photos into tensors.

Every subject is checked in full (id, texts, scenes, each photo decoded end to end) and all of
its problems are reported together; a bad subject never hides the verdict on the others.
Photos are untrusted input: only JPEG, PNG and WebP are parsed, their pixel count is capped
before decoding, and truncated files are refused whatever `ImageFile.LOAD_TRUNCATED_IMAGES` says.
"""
from __future__ import annotations

import io
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from comfusion.config import DataConfig, SubjectSpec

# The manifest contract (DESIGN.md). Use `is_valid_subject_id`, not `.match`: `$` also matches
# before a trailing newline, so only `fullmatch` refuses "dog\n".
SUBJECT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MIN_IMAGES, MAX_IMAGES = 1, 5
# Identifier and class noun go into prompts, MLflow tags and run names: short, one line, printable.
# An identifier is one word (a rare token such as "sks" or "<sks>"); a class noun is up to 4 words.
MAX_IDENTIFIER, MAX_CLASS_NOUN = 32, 48
IDENTIFIER_PATTERN = re.compile(rf"[\w<>.\-]{{1,{MAX_IDENTIFIER}}}")
CLASS_NOUN_PATTERN = re.compile(r"[\w'\-]+(?: [\w'\-]+){0,3}")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # PIL format ids; no other parser sees user bytes


def is_valid_subject_id(s: object) -> bool:
    """True for a safe subject id (no path separators, dots, percent signs or upper case)."""
    return isinstance(s, str) and SUBJECT_ID_PATTERN.fullmatch(s) is not None


def _show(value: object, limit: int = 80) -> str:
    """repr() cut to `limit` chars: escapes control chars, keeps a 10 kB id out of the logs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ImageError(ValueError):
    """A photo cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"image '{self.path}': {reason}")


class SubjectError(ValueError):
    """A subject fails validation; `.problems` lists every problem found, not just the first."""

    def __init__(self, subject: object, problems: list[str]):
        self.subject = subject
        self.problems = list(problems)
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"subject {_show(subject)} is invalid ({len(self.problems)} problem(s)):{lines}")

    def __reduce__(self):  # crosses process boundaries (Ray, process pools) intact
        return type(self), (self.subject, self.problems)


# ---------------------------------------------------------------------------------------
# one photo


def load_image(path: str | Path, *, min_side: int = 256, max_pixels: int = 50_000_000) -> Image.Image:
    """Open, fully decode and check one photo; returns an upright RGB image or raises ImageError."""
    path = Path(path)
    data = _read_bytes(path, max_pixels)
    try:
        # Scoped, not global: PIL's size warning becomes an exception only for this call.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _decode(path, data, max_pixels)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"too many pixels, refused as a decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: PIL's parsers raise many types
        raise ImageError(path, f"cannot be decoded, the file is corrupt or truncated "
                               f"({type(e).__name__}: {e})") from None
    if min(img.size) < min_side:
        raise ImageError(path, f"is {img.width}x{img.height}; its short side is below min_side={min_side}")
    return img


def _read_bytes(path: Path, max_pixels: int) -> bytes:
    if not path.exists():
        raise ImageError(path, "file does not exist")
    if not path.is_file():
        raise ImageError(path, "is not a regular file")
    # Even 16-bit RGBA stored raw is 8 bytes a pixel: anything far larger is not a photo we accept.
    size_cap = 8 * max_pixels + 64 * 2**20
    try:
        n_bytes = path.stat().st_size
        if n_bytes > size_cap:
            raise ImageError(path, f"file is {n_bytes} bytes, too large for max_pixels={max_pixels}")
        return path.read_bytes()
    except OSError as e:
        raise ImageError(path, f"cannot be read ({e.strerror or e})") from None


def _decode(path: Path, data: bytes, max_pixels: int) -> Image.Image:
    """Header checks first (format, pixel count, complete file), then the pixels."""
    with _open_header(path, data) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(path, f"too many pixels: {width}x{height} = {width * height}, "
                                   f"above max_pixels={max_pixels}")
        if not _is_complete(img.format, data):
            raise ImageError(path, f"{img.format} file is truncated (its end marker is missing)")
        img.load()  # decode every pixel now, so a broken file fails here and not mid-training
        return _to_rgb(ImageOps.exif_transpose(img))


def _open_header(path: Path, data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        other = _other_format(data)
        if other:
            raise ImageError(path, f"unsupported image format {other}; use JPEG, PNG or WebP") from None
        raise ImageError(path, "not an image (expected a JPEG, PNG or WebP file)") from None


def _other_format(data: bytes) -> str | None:
    """The format name of a readable image that is not JPEG/PNG/WebP, for a clearer error."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only; never decoded
            return img.format
    except Exception:  # noqa: BLE001 - any failure just means "not an image"
        return None


def _is_complete(fmt: str | None, data: bytes) -> bool:
    """Whether the file reaches its format's end marker.

    PIL pads a truncated file silently when some library has set the process-wide
    `ImageFile.LOAD_TRUNCATED_IMAGES`, so completeness is checked on the bytes here.
    """
    if fmt == "PNG":
        return b"IEND\xaeB`\x82" in data  # the IEND chunk type and its fixed CRC
    if fmt == "WEBP":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)  # RIFF size
    return _jpeg_complete(data)  # JPEG and MPO (phone photos) come from the JPEG parser


def _jpeg_complete(data: bytes) -> bool:
    """An end-of-image marker follows the main image's first scan.

    Segments before the scan are skipped by their lengths, so an EXIF thumbnail (a whole JPEG
    inside APP1) cannot pass for the main image's end; scan data never holds FF D9.
    """
    i = 2  # after SOI
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", i) >= 0
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2: i + 4], "big")
    return False


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode PIL gives for JPEG/PNG/WebP."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Composite on white: dropping alpha would show whatever colour hides under
        # transparent pixels (often black), and product photos sit on white.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if img.mode.startswith("I"):
        # 16-bit grey PNG: PIL's convert clips 0..65535 to 255 (nearly all white); scale instead.
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def prepare_image(img: Image.Image, resolution: int) -> torch.Tensor:
    """Centre-crop to a square, resize to `resolution` and scale to [-1, 1]: (3, R, R) float32."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    img = img if img.mode == "RGB" else _to_rgb(img)
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    # Crop first: resize(box=...) would let the filter reach pixels outside the square.
    square = img.crop((left, top, left + side, top + side)).resize((resolution, resolution),
                                                                    Image.Resampling.LANCZOS)
    pixels = np.asarray(square, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous().clamp_(-1.0, 1.0)


# ---------------------------------------------------------------------------------------
# subjects


@dataclass(frozen=True)
class Subject:
    """A validated subject, ready to train."""

    id: str
    identifier: str  # the rare token, e.g. "sks"
    class_noun: str  # e.g. "dog"
    image_paths: tuple[str, ...]
    scenes: tuple[str, ...]  # class-scene prior scenes
    pixels: torch.Tensor = field(compare=False, repr=False)  # (N, 3, R, R) in [-1, 1]; (0, 3, R, R) unloaded


def _text_problem(name: str, value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"{name} must be a non-empty string, got {_show(value)}"
    # Texts go into prompts and logs: one line, no control characters.
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
        return f"{name} {_show(value)} must be one line without control characters"
    return None


def _word_problem(name: str, value: str) -> str | None:
    """Length and characters of the identifier / class noun (checked after `_text_problem`)."""
    limit, pattern, what = ((MAX_IDENTIFIER, IDENTIFIER_PATTERN, "one word of letters, digits, '_', '-', '.', '<', '>'")
                            if name == "identifier" else
                            (MAX_CLASS_NOUN, CLASS_NOUN_PATTERN, "1 to 4 words of letters, digits, '-' and "
                                                                 "apostrophes, separated by single spaces"))
    if len(value) > limit:
        return f"{name} is {len(value)} characters long; at most {limit} are allowed"
    if pattern.fullmatch(value) is None:
        return f"{name} {_show(value)} must be {what}"
    return None


def _path_problems(paths: Iterable[str], data_cfg: DataConfig) -> list[str]:
    """Image paths that leave `data.root` (after following symlinks), unless absolute paths are allowed."""
    if data_cfg.allow_absolute_paths or not data_cfg.root:
        return []
    root = Path(data_cfg.root).resolve()
    problems = []
    for p in paths:
        real = (root / p).resolve()  # an absolute `p` stays itself; symlinks are followed
        if not real.is_relative_to(root):
            problems.append(f"image {_show(str(p))} lies outside data.root ({root}); set "
                            "data.allow_absolute_paths: true to allow it")
    return problems


def _spec_problems(spec: SubjectSpec, scenes: object) -> list[str]:
    """Everything about a subject except its photos."""
    problems = []
    if not is_valid_subject_id(spec.id):
        problems.append(f"id {_show(spec.id)} must match {SUBJECT_ID_PATTERN.pattern} "
                        "(lower-case letters, digits, '_' and '-', at most 64 characters)")
    if not MIN_IMAGES <= len(spec.images) <= MAX_IMAGES:
        problems.append(f"has {len(spec.images)} images; a subject needs {MIN_IMAGES} to {MAX_IMAGES}")
    for name in ("identifier", "class_noun"):
        problem = _text_problem(name, getattr(spec, name)) or _word_problem(name, getattr(spec, name))
        if problem:
            problems.append(problem)
    if isinstance(scenes, str) or not scenes:
        problems.append(f"scenes must be a non-empty list of strings, got {_show(scenes)}")
    else:
        problems += [p for i, s in enumerate(scenes) if (p := _text_problem(f"scenes[{i}]", s))]
    return problems


def subject_scenes(own: Sequence[str] | None, job_scenes: Sequence[str]) -> Sequence[str]:
    """A subject's scenes (its priors, validation images and "specific" evaluation prompts): its
    own list when its manifest entry gives one, else the job's `data.scenes`."""
    return own if own is not None else job_scenes


def check_subject(spec: SubjectSpec, data_cfg: DataConfig, resolution: int, *,
                  load_pixels: bool = True) -> Subject:
    """Check one subject in full; raises one SubjectError listing all of its problems.

    Every photo is decoded either way; `load_pixels=False` only skips building the tensor.
    """
    scenes = subject_scenes(spec.scenes, data_cfg.scenes)
    problems = _spec_problems(spec, scenes)
    outside = _path_problems(spec.images, data_cfg)
    problems += outside
    pixels = []
    for path in spec.images if not outside else ():  # a path outside the root is never opened
        try:
            img = load_image(Path(data_cfg.root or ".") / path,  # an absolute `path` stays itself
                             min_side=data_cfg.min_side, max_pixels=data_cfg.max_pixels)
        except ImageError as e:
            problems.append(str(e))
            continue
        if load_pixels and not problems:
            pixels.append(prepare_image(img, resolution))  # (3, R, R)
    if problems:
        raise SubjectError(spec.id, problems)
    stacked = torch.stack(pixels) if load_pixels else torch.empty(0, 3, resolution, resolution)
    return Subject(id=spec.id, identifier=spec.identifier, class_noun=spec.class_noun,
                   image_paths=tuple(str(p) for p in spec.images), scenes=tuple(scenes), pixels=stacked)


def validate_subjects(specs: Iterable[SubjectSpec], data_cfg: DataConfig, resolution: int, *,
                      load_pixels: bool = True) -> tuple[list[Subject], dict[str, list[str]]]:
    """Check every subject; returns (good subjects in manifest order, problems by subject id).

    A later subject reusing an earlier id is refused (the earlier one keeps its verdict).
    """
    good: list[Subject] = []
    errors: dict[str, list[str]] = {}
    first_index: dict[str, int] = {}
    for index, spec in enumerate(specs):
        key = spec.id if isinstance(spec.id, str) else repr(spec.id)
        if key in first_index:
            errors.setdefault(key, []).append(
                f"subject #{index} reuses the id of subject #{first_index[key]}; ids must be unique")
            continue
        first_index[key] = index
        try:
            good.append(check_subject(spec, data_cfg, resolution, load_pixels=load_pixels))
        except SubjectError as e:
            errors[key] = e.problems
    return good, errors


def format_subject_errors(errors: dict[str, list[str]]) -> str:
    """A readable report of `validate_subjects` errors, one block per subject."""
    if not errors:
        return "all subjects are valid"
    lines = [f"{len(errors)} subject(s) failed validation:"]
    for subject, problems in errors.items():
        lines.append(f"subject {_show(subject)}:")
        lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)

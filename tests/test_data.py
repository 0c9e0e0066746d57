"""Subject photo checks and preparation, on real files written to tmp_path."""
from __future__ import annotations

import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from comfusion.config import DataConfig, SubjectSpec
from comfusion.data import (
    ImageError,
    Subject,
    SubjectError,
    check_subject,
    format_subject_errors,
    is_valid_subject_id,
    load_image,
    prepare_image,
    validate_subjects,
)

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared/datasets/dreambooth"
SMALL = DataConfig(min_side=32)  # small photos keep the tests fast on two shared cores


# --------------------------------------------------------------------------------------
# helpers


def _photo(path: Path, size=(72, 64), fmt=None, seed=0, **save_kw) -> Path:
    """A smooth random RGB photo (compresses like a real one), saved by file suffix or `fmt`."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR).save(path, fmt, **save_kw)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels but holds none: signature, IHDR, IEND."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# --------------------------------------------------------------------------------------
# subject ids


@pytest.mark.parametrize("good", ["dog", "dog2", "backpack_dog", "a-b_c", "0", "a" * 64])
def test_valid_subject_ids(good):
    assert is_valid_subject_id(good)


@pytest.mark.parametrize("bad", ["../x", "a/b", "%2e%2e", "a" * 300, "a" * 65, "", "Dog", "-a", "_a",
                                 ".hidden", "a b", "dog\n", "d\u00f6g", None, 5])
def test_invalid_subject_ids(bad):
    assert not is_valid_subject_id(bad)


# --------------------------------------------------------------------------------------
# one photo


def test_jpeg_png_webp_load_to_pixels_in_range(tmp_path):
    paths = [_photo(tmp_path / "a.jpg", seed=1), _photo(tmp_path / "b.png", seed=2),
             _photo(tmp_path / "c.webp", seed=3)]
    subject = check_subject(SubjectSpec("dog", tuple(map(str, paths)), "dog"), SMALL, 16)
    assert subject.pixels.shape == (3, 3, 16, 16)
    assert subject.pixels.dtype == torch.float32
    assert subject.pixels.min() >= -1.0 and subject.pixels.max() <= 1.0
    assert subject.pixels.std() > 0.05  # real content, not a constant
    assert subject.image_paths == tuple(map(str, paths))
    assert subject.scenes == SMALL.scenes and subject.identifier == "sks"


def test_prepare_image_centre_crops_then_scales():
    img = np.zeros((40, 60, 3), dtype=np.uint8)  # (H, W, 3): red | white | blue columns
    img[:, :10] = (255, 0, 0)
    img[:, 10:50] = (255, 255, 255)
    img[:, 50:] = (0, 0, 255)
    x = prepare_image(Image.fromarray(img), 8)
    assert x.shape == (3, 8, 8)
    # The 40x40 centre crop is all white; the side stripes must be cut away.
    torch.testing.assert_close(x, torch.ones(3, 8, 8), atol=1e-2, rtol=0)
    black = prepare_image(Image.new("RGB", (5, 5)), 4)
    torch.testing.assert_close(black, -torch.ones(3, 4, 4))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _photo(tmp_path / "rotated.jpg", size=(80, 48), exif=exif)
    assert Image.open(path).size == (80, 48)
    assert load_image(path, min_side=32).size == (48, 80)


@pytest.mark.parametrize("flag", [False, True])
@pytest.mark.parametrize("suffix", ["jpg", "png", "webp"])
def test_truncated_file_is_rejected(tmp_path, monkeypatch, flag, suffix):
    # Some library may set LOAD_TRUNCATED_IMAGES process-wide; the check must not depend on it.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", flag)
    path = _truncate(_photo(tmp_path / f"cut.{suffix}", size=(96, 96)))
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(path, min_side=32)
    assert str(path) in str(info.value)


def test_jpeg_cut_in_scan_is_rejected_despite_an_embedded_thumbnail(tmp_path, monkeypatch):
    # A thumbnail (a whole JPEG, end marker included) sits in an APPn segment before the scan;
    # its end marker must not pass for the main image's.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    thumb = _photo(tmp_path / "thumb.jpg", size=(16, 16)).read_bytes()
    main = _photo(tmp_path / "main.jpg", size=(96, 96), progressive=True).read_bytes()
    app5 = b"\xff\xe5" + struct.pack(">H", len(thumb) + 2) + thumb
    path = tmp_path / "with_thumb.jpg"
    path.write_bytes(main[:2] + app5 + main[2:])
    assert load_image(path, min_side=32).size == (96, 96)
    _truncate(path, 0.8)
    with pytest.raises(ImageError, match="truncated"):
        load_image(path, min_side=32)


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n" * 20)
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(path, min_side=1)
    assert str(path) in str(info.value)


def test_other_image_formats_are_refused_by_name(tmp_path):
    path = _photo(tmp_path / "anim.jpg", fmt="GIF")
    with pytest.raises(ImageError, match="unsupported image format GIF"):
        load_image(path, min_side=1)


def test_short_side_below_min_side_is_rejected(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(ImageError, match="1x1.*min_side=256") as info:
        load_image(path, min_side=256)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("side", "max_pixels"), [(30_000, 50_000_000), (3_000, 1_000_000)])
def test_too_many_pixels_refused_from_the_header(tmp_path, side, max_pixels):
    # 30000x30000 trips PIL's own bomb guard first; 3000x3000 only our cap. Neither may decode.
    path = _png_header_only(tmp_path / "bomb.png", side, side)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageError, match="too many pixels") as info:
        load_image(path, min_side=1, max_pixels=max_pixels)
    assert str(path) in str(info.value)
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB


def test_missing_file_and_folder_are_rejected(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.jpg", min_side=1)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path, min_side=1)


def _rgba(tmp_path):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[20:, :, 3] = 255  # top half fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_modes_are_converted_to_rgb(tmp_path):
    transparent = load_image(_rgba(tmp_path), min_side=32)
    assert transparent.mode == "RGB"
    assert transparent.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white, not black
    assert transparent.getpixel((5, 30)) == (200, 0, 0)

    grey = tmp_path / "grey.png"
    Image.new("L", (40, 40), 77).save(grey)
    assert load_image(grey, min_side=32).getpixel((3, 3)) == (77, 77, 77)

    palette = tmp_path / "palette.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    assert load_image(palette, min_side=32).getpixel((3, 3)) == (10, 200, 30)
    Image.open(palette).save(palette, transparency=0)  # palette entry 0 (the only colour) clear
    assert load_image(palette, min_side=32).getpixel((3, 3)) == (255, 255, 255)

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 40), (0, 0, 0, 0)).save(cmyk, quality=95)
    assert load_image(cmyk, min_side=32).mode == "RGB"

    deep = tmp_path / "grey16.png"
    Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)).save(deep)  # 32896 = 128 * 257
    assert load_image(deep, min_side=32).getpixel((3, 3)) == (128, 128, 128)  # scaled, not clipped


# --------------------------------------------------------------------------------------
# subjects


def test_check_subject_collects_every_problem(tmp_path):
    good = str(_photo(tmp_path / "ok.jpg"))
    spec = SubjectSpec("Bad/Id", (good, str(tmp_path / "gone.png")), "", identifier="sks\nx", scenes=())
    with pytest.raises(SubjectError) as info:
        check_subject(spec, SMALL, 16)
    err = info.value
    assert err.subject == "Bad/Id"
    assert len(err.problems) == 5, err.problems  # id, identifier, class noun, scenes, missing file
    message = str(err)
    assert "'Bad/Id'" in message and "gone.png" in message and "class_noun" in message
    assert "identifier" in message and "scenes" in message and "\\n" in message  # escaped, one line


def test_check_subject_without_pixels_still_decodes_photos(tmp_path):
    good = _photo(tmp_path / "ok.jpg")
    subject = check_subject(SubjectSpec("cat", (str(good),), "cat", scenes=("in the rain",)), SMALL, 16,
                            load_pixels=False)
    assert subject.pixels.shape == (0, 3, 16, 16) and subject.scenes == ("in the rain",)
    _truncate(good)
    with pytest.raises(SubjectError, match="truncated"):
        check_subject(SubjectSpec("cat", (str(good),), "cat"), SMALL, 16, load_pixels=False)


def test_validate_subjects_keeps_good_and_names_each_bad(tmp_path):
    photos = [str(_photo(tmp_path / f"{i}.jpg", seed=i)) for i in range(6)]
    missing = str(tmp_path / "missing.jpg")
    specs = [
        SubjectSpec("dog", tuple(photos[:2]), "dog"),
        SubjectSpec("../x", (photos[0],), "dog"),
        SubjectSpec("ghost", (photos[0], missing), "cat"),
        SubjectSpec("crowd", tuple(photos), "dog"),
        SubjectSpec("nameless", (photos[1],), "  "),
        SubjectSpec("dog", (photos[2],), "dog"),  # duplicate id: refused, the first keeps its verdict
    ]
    good, errors = validate_subjects(specs, SMALL, 8)
    assert [s.id for s in good] == ["dog"] and isinstance(good[0], Subject)
    assert good[0].pixels.shape == (2, 3, 8, 8)
    assert set(errors) == {"../x", "ghost", "crowd", "nameless", "dog"}
    assert any("id '../x'" in p for p in errors["../x"])
    assert any(missing in p and "does not exist" in p for p in errors["ghost"])
    assert any("6 images" in p for p in errors["crowd"])
    assert any("class_noun" in p for p in errors["nameless"])
    assert any("reuses the id" in p for p in errors["dog"])
    report = format_subject_errors(errors)
    for name in ("'../x'", "'ghost'", "'crowd'", "'nameless'", "'dog'", missing):
        assert name in report
    assert format_subject_errors({}) == "all subjects are valid"


# --------------------------------------------------------------------------------------
# the DreamBooth dataset


def _dreambooth_classes() -> dict[str, str]:
    """subject_name -> class from the dataset's `prompts_and_classes.txt` table."""
    classes = {}
    for line in (DREAMBOOTH / "prompts_and_classes.txt").read_text().splitlines():
        name, sep, noun = line.partition(",")
        if sep and name != "subject_name" and " " not in name and "(" not in line:
            classes[name.strip()] = noun.strip()
    return classes


def test_dreambooth_dataset_validates():
    if not DREAMBOOTH.is_dir():
        pytest.skip(f"DreamBooth dataset not found at {DREAMBOOTH}")
    classes = _dreambooth_classes()
    specs = []
    for folder in sorted(p for p in DREAMBOOTH.iterdir() if p.is_dir()):
        images = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        assert 1 <= len(images) <= 6, folder
        specs.append(SubjectSpec(folder.name, tuple(images[:5]), classes.get(folder.name, "object")))
    cfg = DataConfig(min_side=256)
    good, errors = validate_subjects(specs, cfg, 32, load_pixels=False)
    assert not errors, format_subject_errors(errors)
    assert [s.id for s in good] == [s.id for s in specs]
    for spec in specs[:2]:
        subject = check_subject(spec, cfg, 32)
        assert subject.pixels.shape == (len(spec.images), 3, 32, 32)
        assert subject.pixels.min() >= -1.0 and subject.pixels.max() <= 1.0


# --------------------------------------------------------------------------------------
# identifier / class noun limits and paths that leave data.root


@pytest.mark.parametrize("field,value,expect", [
    ("class_noun", "dog" * 2700, "8100 characters long; at most 48"),
    ("class_noun", "dog; rm -rf", "1 to 4 words"),
    ("class_noun", "a  dog", "1 to 4 words"),
    ("class_noun", "very big fluffy brown dog", "1 to 4 words"),
    ("identifier", "s" * 33, "33 characters long; at most 32"),
    ("identifier", "sks dog", "one word"),
    ("identifier", "sks\"", "one word"),
])
def test_identifier_and_class_noun_limits_name_the_field(tmp_path, field, value, expect):
    photo = str(_photo(tmp_path / "ok.jpg"))
    fields = {"class_noun": "dog", "identifier": "sks", field: value}
    with pytest.raises(SubjectError) as info:
        check_subject(SubjectSpec("dog", (photo,), **fields), SMALL, 8)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(field)
    assert expect in info.value.problems[0] and len(str(info.value)) < 400  # never echoes 8 kB


@pytest.mark.parametrize("identifier,class_noun", [("sks", "stuffed animal"), ("<sks>", "rc car"),
                                                    ("zwx", "teddy-bear"), ("olis", "chien")])
def test_ordinary_identifiers_and_class_nouns_pass(tmp_path, identifier, class_noun):
    photo = str(_photo(tmp_path / "ok.jpg"))
    assert check_subject(SubjectSpec("a", (photo,), class_noun, identifier), SMALL, 8).class_noun == class_noun


def test_photo_outside_root_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir(), elsewhere.mkdir()
    inside = _photo(root / "in.jpg")
    outside = _photo(elsewhere / "secret.jpg")
    (root / "link.jpg").symlink_to(outside)  # a symlink inside the root that points out of it
    cfg = DataConfig(min_side=32, root=str(root))
    opened = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self.name) or real_read(self))
    for bad in (str(outside), str(root / ".." / "elsewhere" / "secret.jpg"), str(root / "link.jpg")):
        with pytest.raises(SubjectError, match="lies outside data.root"):
            check_subject(SubjectSpec("a", (str(inside), bad), "dog"), cfg, 8)
    assert "secret.jpg" not in opened and "link.jpg" not in opened
    assert check_subject(SubjectSpec("a", ("in.jpg",), "dog"), cfg, 8).pixels.shape == (1, 3, 8, 8)  # from the root
    allowed = DataConfig(min_side=32, root=str(root), allow_absolute_paths=True)
    assert check_subject(SubjectSpec("a", (str(outside),), "dog"), allowed, 8).pixels.shape == (1, 3, 8, 8)

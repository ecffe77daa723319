"""indexer.images: each kind of bad file gives one ImageError with the right reason; good files of any mode give RGB."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import signal
import stat
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from indexer import images
from indexer.defaults import MAX_PIXELS, MIN_SIDE
from indexer.images import (
    ImageError,
    content_id,
    decode_image,
    is_utf8_path,
    load_image,
    printable_path,
    read_bytes,
)
from tests.conftest import PETS, sample_photos
from tests.helpers_badfiles import (
    NON_UTF8_KEYWORD,
    add_duplicates,
    make_bad_corpus,
    png_header_only,
    real_photo_bytes,
)

# ------------------------------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad")
    return folder, make_bad_corpus(folder)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: a blocked open() or read() (a FIFO, a device) is interrupted by SIGALRM."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_corpus_covers_at_least_forty_kinds(bad_corpus: tuple[Path, dict[str, str]]) -> None:
    folder, expected = bad_corpus
    assert len(expected) >= 45  # distinct ways to fail (loop_a/loop_b are one kind, so >= 44 kinds)
    assert len(set(expected.values())) >= 25  # and many distinct reasons among them
    assert {p.name for p in folder.iterdir()} == set(expected)
    assert all(is_utf8_path(name) for name in expected)  # the one non-UTF-8 name is opt-in


def test_every_bad_file_gives_its_reason_in_bounded_time(bad_corpus: tuple[Path, dict[str, str]]) -> None:
    folder, expected = bad_corpus
    wrong = {}
    for name, keyword in expected.items():
        path = folder / name
        start = time.monotonic()
        with deadline(10):
            try:
                load_image(path)
                got = "no error"
            except ImageError as e:
                got = e.reason
                assert e.path == str(path)
                assert str(e) == f"{path}: {e.reason}"
        assert time.monotonic() - start < 5, name  # no file may stall a run (FIFO, device, bomb)
        if keyword.lower() not in got.lower() or "\n" in got or len(got) >= 200:
            wrong[name] = (keyword, got)
    assert not wrong, wrong


@pytest.mark.parametrize(
    "name",
    [
        "empty.jpg", "truncated.jpg", "random_bytes.jpg", "notes.jpg", "page.png", "bomb.png", "logo.png",
        "scan.jpg", "archive.png", "truncated.png", "tiny.png", "broken_link.jpg", "folder.jpg", "huge.jpg",
        "pipe.jpg", "devnull.jpg", "loop_a.jpg", "jpeg_sof_bomb.jpg", "png_bad_crc.png", "zeros.jpg",
    ],
)  # fmt: skip
def test_each_bad_file_gives_its_reason(bad_corpus: tuple[Path, dict[str, str]], name: str) -> None:
    folder, expected = bad_corpus
    path = folder / name
    with deadline(10), pytest.raises(ImageError) as info:
        load_image(path)
    err = info.value
    assert expected[name].lower() in err.reason.lower(), err.reason
    assert err.path == str(path)
    assert str(err) == f"{path}: {err.reason}"
    assert "\n" not in err.reason and len(err.reason) < 200


def test_reasons_are_the_documented_phrases(bad_corpus: tuple[Path, dict[str, str]]) -> None:
    folder, _ = bad_corpus

    def reason(name: str) -> str:
        with pytest.raises(ImageError) as info:
            load_image(folder / name)
        return info.value.reason

    assert reason("empty.jpg") == "empty file"
    assert reason("random_bytes.jpg") == "not an image (unrecognised format)"
    assert reason("bomb.png") == f"image too large: 100000x100000 px exceeds the {MAX_PIXELS} px limit"
    assert reason("tiny.png") == "image too small: 2x2 px"
    assert reason("logo.png") == "unsupported format SVG"
    assert reason("huge.jpg") == "file too large: 52428801 bytes exceeds the 50 MB limit"
    assert reason("truncated.jpg").startswith("truncated or corrupt image data (")
    assert reason("pipe.jpg") == "not a regular file (FIFO)"
    assert reason("devnull.jpg") == "not a regular file (character device)"
    assert reason("loop_a.jpg").startswith("symlink loop")
    assert reason("jpeg_sof_bomb.jpg") == f"image too large: 65000x65000 px exceeds the {MAX_PIXELS} px limit"
    assert reason("jpeg_soi_only.jpg") == "truncated or corrupt image data (JPEG file cut short after 2 bytes)"
    assert reason("png_zero_width.png") == "truncated or corrupt image data (PNG header declares 0x480 px)"
    assert reason("thin_strip.png") == "image too small: 10000x1 px"
    assert reason("iphone.jpg") == "unsupported format HEIC"
    assert reason("video.jpg") == "not an image (MP4 video)"
    assert reason("utf16_notes.jpg") == "not an image (text file)"
    assert reason("api_error.jpg") == "not an image (JSON text file)"


def test_huge_file_is_refused_before_reading(bad_corpus: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    folder, _ = bad_corpus
    assert (folder / "huge.jpg").stat().st_blocks * 512 < 1024 * 1024  # sparse: the test costs no disk
    sixty = tmp_path / "sixty.jpg"
    with open(sixty, "wb") as f:
        f.truncate(60 * 2**20)
    with pytest.raises(ImageError) as info:
        read_bytes(sixty)
    assert info.value.reason == "file too large: 60 MB exceeds the 50 MB limit"


def test_max_bytes_is_a_parameter(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(real_photo_bytes())
    size = p.stat().st_size
    assert read_bytes(p, max_bytes=size) == p.read_bytes()
    with pytest.raises(ImageError, match=r"file too large: .* KB exceeds the 1 KB limit"):
        read_bytes(p, max_bytes=1024)


def test_header_size_is_checked_before_pixels_are_decoded(tmp_path: Path) -> None:
    # A bomb under Pillow's own thresholds is stopped by ours, from the header alone.
    with pytest.raises(ImageError, match="image too large: 9000x9000 px exceeds the 64000000 px limit"):
        decode_image(png_header_only(9000, 9000), "mid.png")
    # A truncated photo with a lowered limit reports the size, so no pixel was decoded first.
    half = real_photo_bytes()
    half = half[: len(half) // 2]
    with pytest.raises(ImageError, match="image too large"):
        decode_image(half, "x.jpg", max_pixels=100)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(half, "x.jpg")


def test_pil_global_state_is_untouched(bad_corpus: tuple[Path, dict[str, str]]) -> None:
    folder, expected = bad_corpus
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning (or any other) escapes
        for name in expected:
            with pytest.raises(ImageError):
                load_image(folder / name)
        decode_image(_png(Image.new("RGB", (64, 64))), "ok.png")
    assert before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_fifo_and_symlink(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        read_bytes(tmp_path / "nope.jpg")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):  # reading it would block forever
        read_bytes(fifo)
    target = tmp_path / "real.jpg"
    target.write_bytes(real_photo_bytes())
    link = tmp_path / "link.jpg"
    link.symlink_to(target)
    assert load_image(link)[0] == load_image(target)[0]


def test_image_error_pickles() -> None:
    err = ImageError("/a/b.jpg", "empty file")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ImageError)
    assert (back.path, back.reason, str(back)) == ("/a/b.jpg", "empty file", "/a/b.jpg: empty file")


def test_non_utf8_file_name_is_an_error_with_a_printable_path(tmp_path: Path) -> None:
    corpus = make_bad_corpus(tmp_path / "bad", non_utf8_name=True)
    name = "bad\udcff.jpg"  # b"bad\xff.jpg" as Python lists it
    assert corpus[name] == NON_UTF8_KEYWORD and name in os.listdir(tmp_path / "bad")
    path = tmp_path / "bad" / name
    assert path.is_file() and not is_utf8_path(path)  # a real photo: only its name is wrong
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.reason == "file name is not valid UTF-8"
    assert info.value.path == str(path)  # as given, so the caller can match it
    shown = str(info.value)
    shown.encode("utf-8")  # printable: no surrogate left
    assert shown == f"{tmp_path}/bad/bad\\xff.jpg: file name is not valid UTF-8"
    # A bad byte in a folder name is named as such.
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(folder)
    inside = Path(os.fsdecode(folder)) / "ok.jpg"
    inside.write_bytes(real_photo_bytes())
    with pytest.raises(ImageError, match="folder name is not valid UTF-8"):
        read_bytes(inside)


def test_printable_path_and_is_utf8_path() -> None:
    assert printable_path("/a/caf\u00e9.jpg") == "/a/caf\u00e9.jpg" and is_utf8_path("/a/caf\u00e9.jpg")
    assert printable_path(b"/a/bad\xff.jpg") == "/a/bad\\xff.jpg" and not is_utf8_path(b"/a/bad\xff.jpg")
    assert printable_path(Path(os.fsdecode(b"/a/bad\xff.jpg"))) == "/a/bad\\xff.jpg"
    assert not is_utf8_path(Path("bad\udcff.jpg"))
    assert printable_path("lone\ud800") == "lone\\ud800" and not is_utf8_path("lone\ud800")
    for p in ("x", b"\xff\xfe", "\udcff\udc80", "\ud800"):
        printable_path(p).encode("utf-8")


def test_file_that_vanishes_after_scanning(tmp_path: Path) -> None:
    from indexer.sources import scan

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(real_photo_bytes())
    (src / "gone.jpg").write_bytes(real_photo_bytes())
    rows = scan(src, layout="flat")
    (src / "gone.jpg").unlink()
    with pytest.raises(ImageError) as info:
        load_image(rows[1].path)
    assert info.value.reason == "file not found"
    assert load_image(rows[0].path)[1].mode == "RGB"


def test_swapped_between_stat_and_open_never_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file replaced after it was checked: by a FIFO (opening it plainly would block forever) or by nothing.
    real_stat = os.stat
    path = tmp_path / "swap.jpg"

    def stat_then(change: str) -> object:
        def fake(p: object, *a: object, **kw: object) -> os.stat_result:
            st = real_stat(p, *a, **kw)  # type: ignore[arg-type]
            if Path(str(p)) == path and stat.S_ISREG(st.st_mode):
                path.unlink()
                if change == "fifo":
                    os.mkfifo(path)
            return st

        return fake

    for change, reason in (
        ("fifo", "not a regular file (FIFO)"),
        ("gone", "file not found (removed while being read)"),
    ):
        path.write_bytes(real_photo_bytes())
        monkeypatch.setattr(images.os, "stat", stat_then(change))
        with deadline(10), pytest.raises(ImageError) as info:
            read_bytes(path)
        monkeypatch.undo()
        assert info.value.reason == reason
        path.unlink(missing_ok=True)


def test_duplicates_are_not_errors(tmp_path: Path) -> None:
    a, b = add_duplicates(tmp_path)
    assert a != b and sorted(os.listdir(tmp_path)) == sorted([a, b])
    assert load_image(tmp_path / a)[0] == load_image(tmp_path / b)[0]


# ------------------------------------------------------------------------------------------------- good files


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_real_photos_decode_to_rgb_with_sha256_id() -> None:
    assert PETS.is_dir()
    for path in sample_photos(5):
        cid, img = load_image(path)
        assert cid == hashlib.sha256(path.read_bytes()).hexdigest() == content_id(path.read_bytes())
        assert img.mode == "RGB" and min(img.size) >= MIN_SIDE
        with Image.open(path) as raw:
            assert img.size == raw.size


def test_content_id_ignores_the_name(tmp_path: Path) -> None:
    data = real_photo_bytes()
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "copy of a.JPG").write_bytes(data)
    assert load_image(tmp_path / "a.jpg")[0] == load_image(tmp_path / "copy of a.JPG")[0]
    assert content_id(data) != content_id(data + b"\0")


def test_png_named_jpg_is_read_by_content(tmp_path: Path) -> None:
    p = tmp_path / "really_a_png.jpg"
    p.write_bytes(_png(Image.new("RGB", (32, 16), (10, 200, 30))))
    _, img = load_image(p)
    assert img.size == (32, 16) and img.getpixel((0, 0)) == (10, 200, 30)


def test_alpha_is_composed_onto_white() -> None:
    img = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (10, 0, 20, 10))  # right half fully transparent (blue underneath)
    out = decode_image(_png(img), "alpha.png")
    assert out.mode == "RGB"
    assert out.getpixel((2, 5)) == (255, 0, 0)
    assert out.getpixel((15, 5)) == (255, 255, 255)
    la = Image.new("LA", (16, 16), (0, 0))  # black, fully transparent
    assert decode_image(_png(la), "la.png").getpixel((3, 3)) == (255, 255, 255)


def test_palette_with_transparency_is_white_not_black() -> None:
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(0, (0, 0, 8, 16))
    data = _encode(img, "GIF", transparency=0)
    out = decode_image(data, "t.gif")
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((12, 2)) == (255, 0, 0)


def test_grayscale_and_sixteen_bit() -> None:
    out = decode_image(_png(Image.new("L", (16, 16), 77)), "g.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (77, 77, 77)
    deep = Image.new("I;16", (16, 16), 32768)  # mid-grey in 16 bits; a plain convert would clip it to white
    data = _png(deep)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode.startswith("I")
    px = decode_image(data, "g16.png").getpixel((0, 0))
    assert isinstance(px, tuple) and _close(px, (128, 128, 128), tol=1)
    bw = Image.new("1", (16, 16), 1)
    assert decode_image(_encode(bw, "BMP"), "bw.bmp").getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg() -> None:
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    data = _encode(img, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "CMYK"
    out = decode_image(data, "cmyk.jpg")
    px = out.getpixel((16, 16))
    assert out.mode == "RGB" and isinstance(px, tuple) and _close(px, (255, 0, 0), tol=20)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (24, 24), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as raw:
        assert getattr(raw, "n_frames", 1) == 2 and raw.mode == "P"
    px = decode_image(data, "anim.gif").getpixel((5, 5))
    assert isinstance(px, tuple) and _close(px, (255, 0, 0), tol=2)


def test_webp_and_tiff() -> None:
    src = Image.new("RGB", (40, 30), (20, 120, 220))
    for fmt in ("WEBP", "TIFF"):
        out = decode_image(_encode(src, fmt), f"x.{fmt.lower()}")
        px = out.getpixel((20, 15))
        assert out.size == (40, 30) and isinstance(px, tuple) and _close(px, (20, 120, 220)), fmt


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(img, "JPEG", exif=exif, quality=95)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (40, 20)
    out = decode_image(data, "rot.jpg")
    assert out.size == (20, 40)  # transposed
    top, bottom = out.getpixel((10, 3)), out.getpixel((10, 36))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert _close(top, (255, 0, 0), tol=30) and _close(bottom, (0, 0, 255), tol=30)


def test_min_side_is_a_parameter() -> None:
    data = _png(Image.new("RGB", (12, 40)))
    assert decode_image(data, "a.png").size == (12, 40)
    with pytest.raises(ImageError, match="image too small: 12x40 px"):
        decode_image(data, "a.png", min_side=16)


def test_decoded_image_is_detached_and_picklable(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(real_photo_bytes())
    cid, img = load_image(p)
    p.unlink()  # the image must not need its file any more
    back = pickle.loads(pickle.dumps((cid, img)))
    assert back[0] == cid and back[1].tobytes() == img.tobytes() and back[1].mode == "RGB"


def _big_jpeg(photo: Path, factor: int, exif: Image.Exif | None = None) -> bytes:
    img = Image.open(photo).convert("RGB")
    img = img.resize((img.width * factor, img.height * factor), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, exif=exif or Image.Exif())
    return buf.getvalue()


def test_big_jpegs_decode_at_reduced_scale_with_their_own_size_and_the_same_embedding() -> None:
    import torch

    from indexer.encoders import load_encoder
    from indexer.extract import embed
    from indexer.images import decode_image_for

    enc = load_encoder("efficientnet-lite0")
    assert enc.input_side == 256
    photos = sample_photos(6, step=190)
    full_imgs, small_imgs = [], []
    for photo in photos:
        data = _big_jpeg(photo, 8)
        full, size = decode_image_for(data, "big.jpg")
        small, small_size = decode_image_for(data, "big.jpg", side=256)
        assert size == small_size == full.size  # the photo's own size, whatever the decoded scale
        assert min(small.size) >= 512 and small.width <= full.width // 2  # reduced, never below 2x the side
        full_imgs.append(full)
        small_imgs.append(small)
    x = torch.stack([enc.preprocess(im) for im in full_imgs + small_imgs])
    v = embed(enc.model, x, torch.device("cpu"), **enc.run_options)
    cos = (v[:6] * v[6:]).sum(axis=1)
    assert cos.min() >= 0.999
    # Small photos (every shared set) and non-JPEGs decode at full size.
    data = PETS.joinpath(*photos[0].parts[-3:]).read_bytes()
    assert decode_image_for(data, "x.jpg", side=256)[0].size == decode_image(data, "x.jpg").size


def test_reduced_scale_decoding_reports_the_upright_size_of_a_turned_photo() -> None:
    from indexer.images import decode_image_for

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    data = _big_jpeg(sample_photos(1)[0], 8, exif)
    stored = Image.open(io.BytesIO(data)).size
    img, size = decode_image_for(data, "turned.jpg", side=64)
    assert size == (stored[1], stored[0])  # upright: the sides of the photo as shown
    assert img.size == (size[0] // 8, size[1] // 8)  # decoded at 1/8, turned the same way

"""Encoder registry tests: real weights, real open_clip / timm code, real photos from the shared pets set."""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import indexer.encoders
from indexer.encoders import Encoder, EncoderError, has_text_tower, load_encoder, parse_encoder_name, resolve_device
from indexer.encoders.efficientnet import (
    WEIGHTS_ENV,
    build_preprocess,
    load_efficientnet_lite0,
    load_efficientnet_lite0_classifier,
    packaged_weights_path,
    rename_original_keys,
    resolve_weights_path,
)
from indexer.encoders.registry import KNOWN_ENCODERS, describe_known_encoders
from tests.conftest import PETS
from tests.helpers_openclip import (
    TINY_MODEL_NAME,
    TINY_OPEN_CLIP_CONFIG,
    make_tiny_open_clip_checkpoint,
    tiny_open_clip_model,
)

EFFICIENTNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
IMAGENET_DOMESTIC_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian
IMAGENET_PUG = 254


def _photos(folder: str, n: int) -> list[Path]:
    files = sorted((PETS / folder).glob("*.jpg"))[:n]
    assert len(files) == n, f"expected {n} photos in {PETS / folder}"
    return files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _embed(encoder: Encoder, paths: list[Path]) -> torch.Tensor:
    batch = torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return encoder.model(batch)


@pytest.fixture(scope="module")
def effnet() -> Encoder:
    return load_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def effnet_classifier() -> Any:  # timm EfficientNet; forward_head is not on nn.Module's type
    return load_efficientnet_lite0_classifier()


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Force huggingface_hub offline with an empty cache: the download path fails fast instead of retrying ~45 s,
    and a machine with network never downloads hundreds of MB here."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


# --------------------------------------------------------------------------------------------------------------
# efficientnet-lite0


def test_efficientnet_describes_itself(effnet: Encoder) -> None:
    assert effnet.name == "efficientnet-lite0"
    assert effnet.dim == 1280
    assert effnet.weights_sha256 == EFFICIENTNET_SHA256
    assert _sha256(packaged_weights_path()) == EFFICIENTNET_SHA256
    assert effnet.encode_text is None
    pp = effnet.preprocessing
    assert (pp["size"], pp["crop"], pp["interpolation"]) == (256, 224, "bicubic")
    assert pp["mean"] == [0.5, 0.5, 0.5] and pp["std"] == [0.5, 0.5, 0.5]
    json.dumps(effnet.describe())  # the manifest stores it
    assert not any(p.requires_grad for p in effnet.model.parameters())
    assert not effnet.model.training


def test_efficientnet_is_deterministic(effnet: Encoder) -> None:
    photos = _photos("cat/persian", 2) + _photos("dog/pug", 1)
    first = _embed(effnet, photos)
    assert first.shape == (3, 1280)
    assert torch.equal(first, _embed(effnet, photos))
    assert torch.equal(first, _embed(load_encoder("efficientnet-lite0"), photos))
    # Batch composition must not change a photo's vector beyond float noise.
    assert torch.allclose(first[2:], _embed(effnet, photos[2:]), atol=1e-5)


@pytest.mark.parametrize(
    ("folder", "wanted"),
    [("cat/persian", IMAGENET_DOMESTIC_CATS), ("dog/pug", [IMAGENET_PUG])],
    ids=["persian->domestic-cat", "pug->pug"],
)
def test_efficientnet_imagenet_sanity(
    effnet: Encoder, effnet_classifier: Any, folder: str, wanted: range | list[int]
) -> None:
    """Wrong key renaming or preprocessing would still give 1280 numbers; real ImageNet predictions would not."""
    photos = _photos(folder, 3)
    batch = torch.stack([effnet.preprocess(Image.open(p).convert("RGB")) for p in photos])
    with torch.inference_mode():
        top5 = effnet_classifier(batch).topk(5, dim=1).indices.tolist()
    for path, classes in zip(photos, top5, strict=True):
        assert set(classes) & set(wanted), (
            f"{path.name}: top-5 ImageNet classes {classes}, wanted one of {list(wanted)}"
        )


def test_efficientnet_embedding_is_classifier_pre_logits(effnet: Encoder, effnet_classifier: Any) -> None:
    x = torch.stack([effnet.preprocess(Image.open(p).convert("RGB")) for p in _photos("dog/pug", 2)])
    with torch.inference_mode():
        pooled = effnet_classifier.forward_head(effnet_classifier.forward_features(x), pre_logits=True)
        # The encoder has its BatchNorms folded into its convolutions (the classifier has not): float rounding
        # apart (6e-6 measured, on values up to 2.8), the same numbers.
        assert torch.allclose(effnet.model(x), pooled, atol=5e-5)


def test_efficientnet_preprocess_matches_timm_and_pickles(effnet: Encoder) -> None:
    import timm
    import timm.data

    ref_model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    timm_tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=ref_model))
    img = Image.open(_photos("cat/persian", 1)[0]).convert("RGB")
    # The transform the manifest describes is timm's, to the last bit ...
    assert torch.allclose(build_preprocess()(img), timm_tf(img), atol=1e-6)
    # ... and the fused step the encoder runs (indexer/encoders/fused.py) gives the same pixels up to the
    # rounding of Pillow's two resize passes: at most 2 of 255 levels (1 level = 1/127.5 here), rarely.
    ours = effnet.preprocess(img)
    assert ours.shape == (3, 224, 224)
    diff = (ours - timm_tf(img)).abs()
    assert diff.max() <= 2.01 / 127.5 and (diff > 1e-6).float().mean() <= 0.01
    clone = pickle.loads(pickle.dumps(effnet.preprocess))
    assert torch.equal(clone(img), ours)
    # Non-RGB input (grayscale, palette) is converted rather than crashing a worker.
    assert effnet.preprocess(img.convert("L")).shape == (3, 224, 224)


def test_efficientnet_accepts_renamed_weight_file(
    effnet: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    renamed = rename_original_keys(original)
    assert len(renamed) == len(original) == 296
    path = tmp_path / "tf_efficientnet_lite0_in1k.pth"
    torch.save(renamed, path)
    photos = _photos("dog/pug", 2)

    by_argument = load_efficientnet_lite0(weights_path=path)  # the family loader: BatchNorms not folded
    assert torch.equal(_embed(by_argument, photos), _embed(load_encoder("efficientnet-lite0", fold=False),
                                                           photos))
    assert by_argument.weights_sha256 == _sha256(path) != EFFICIENTNET_SHA256

    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    assert resolve_weights_path() == path
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(EncoderError, match="weight file not found"):
        load_encoder("efficientnet-lite0")


def test_efficientnet_rejects_bad_weight_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    torch.save({"foo.weight": torch.zeros(3)}, junk)
    with pytest.raises(EncoderError, match="keys match neither"):
        load_efficientnet_lite0(weights_path=junk)
    partial = tmp_path / "partial.pth"
    sd = rename_original_keys(torch.load(packaged_weights_path(), map_location="cpu", weights_only=True))
    del sd["conv_head.weight"]
    torch.save(sd, partial)
    with pytest.raises(EncoderError, match="does not fit"):
        load_efficientnet_lite0(weights_path=partial)
    with pytest.raises(EncoderError, match="not found"):
        load_efficientnet_lite0(weights_path=tmp_path / "missing.pth")


# --------------------------------------------------------------------------------------------------------------
# open_clip


def test_open_clip_tiny_checkpoint_round_trip(tmp_path: Path) -> None:
    name = make_tiny_open_clip_checkpoint(tmp_path)
    assert name == f"open_clip:{TINY_MODEL_NAME}/{tmp_path / 'tiny.pt'}"
    assert parse_encoder_name(name) == ("open_clip", TINY_MODEL_NAME, str(tmp_path / "tiny.pt"))
    encoder = load_encoder(name)
    reference = tiny_open_clip_model()
    embed_dim = TINY_OPEN_CLIP_CONFIG["model_cfg"]["embed_dim"]

    assert encoder.dim == embed_dim
    assert encoder.weights_sha256 == _sha256(tmp_path / "tiny.pt")
    pp = encoder.preprocessing
    assert pp["size"] == pp["crop"] == 32
    assert pp["mean"] == TINY_OPEN_CLIP_CONFIG["preprocess_cfg"]["mean"]
    assert pp["std"] == TINY_OPEN_CLIP_CONFIG["preprocess_cfg"]["std"]
    json.dumps(encoder.describe())

    photos = _photos("cat/persian", 1) + _photos("dog/pug", 1)
    batch = torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in photos])
    assert batch.shape == (2, 3, 32, 32)
    with torch.inference_mode():
        ours = encoder.model(batch)
        expected = reference.encode_image(batch)
    assert ours.shape == (2, embed_dim)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours[0], ours[1])  # a constant output would pass the check above trivially

    import open_clip

    prompts = ["a photo of a persian cat", "a photo of a pug"]
    assert encoder.encode_text is not None
    text = encoder.encode_text(prompts)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(prompts)
    with torch.inference_mode():
        expected_text = reference.encode_text(tokens)
    assert text.shape == (2, embed_dim)
    assert torch.allclose(text, expected_text, atol=1e-5)
    assert torch.allclose(encoder.encode_text(prompts[0]), text[:1], atol=1e-6)  # type: ignore[arg-type]

    clone = pickle.loads(pickle.dumps(encoder.preprocess))
    assert torch.equal(clone(Image.open(photos[0]).convert("RGB")), batch[0])


def test_open_clip_config_registered_through_add_model_config(tmp_path: Path) -> None:
    """The custom config reaches open_clip's public registry, and a later load of the same name replaces it."""
    import open_clip

    name = make_tiny_open_clip_checkpoint(tmp_path / "small")
    assert load_encoder(name).dim == 32
    assert TINY_MODEL_NAME in open_clip.list_models()
    assert open_clip.get_model_config(TINY_MODEL_NAME) == TINY_OPEN_CLIP_CONFIG["model_cfg"]

    # Same model name, another folder, a narrower projection: that checkpoint fits only the new config.
    narrow = copy.deepcopy(TINY_OPEN_CLIP_CONFIG)
    narrow["model_cfg"]["embed_dim"] = 16
    narrow_name = make_tiny_open_clip_checkpoint(tmp_path / "narrow", config=narrow)
    encoder = load_encoder(narrow_name)
    assert encoder.dim == 16
    assert encoder.encode_text is not None and encoder.encode_text(["a pug"]).shape == (1, 16)
    assert open_clip.get_model_config(TINY_MODEL_NAME) == narrow["model_cfg"]
    assert load_encoder(name).dim == 32  # and back


def test_open_clip_custom_model_needs_its_config(tmp_path: Path) -> None:
    make_tiny_open_clip_checkpoint(tmp_path)
    (tmp_path / "open_clip_config.json").unlink()
    with pytest.raises(EncoderError, match=r"unknown open_clip model 'mammals-no-config'.*open_clip_config\.json"):
        load_encoder(f"open_clip:mammals-no-config/{tmp_path / 'tiny.pt'}")


def test_open_clip_checkpoint_must_fit_config(tmp_path: Path) -> None:
    make_tiny_open_clip_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["width"] = 128
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EncoderError, match="cannot build open_clip model 'mammals-wide'"):
        load_encoder(f"open_clip:mammals-wide/{tmp_path / 'tiny.pt'}")


def test_open_clip_pretrained_tag_offline(offline_hub: None) -> None:
    with pytest.raises(EncoderError, match=r"open_clip:ViT-B-32/laion2b_s34b_b79k: .*no network"):
        load_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k")


# --------------------------------------------------------------------------------------------------------------
# timm


def test_timm_checkpoint_round_trip(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    reference: Any = timm.create_model("test_vit").eval()
    path = tmp_path / "test_vit.pth"
    torch.save(reference.state_dict(), path)  # with the 1000-class head, as a trained checkpoint would be
    reference.reset_classifier(0)

    encoder = load_encoder(f"timm:test_vit/{path}")
    assert encoder.dim == reference.num_features == 64
    assert encoder.weights_sha256 == _sha256(path)
    assert encoder.preprocessing["crop"] == 160
    json.dumps(encoder.describe())
    photos = _photos("dog/pug", 1) + _photos("cat/persian", 1)
    batch = torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in photos])
    with torch.inference_mode():
        ours = encoder.model(batch)
        expected = reference(batch)
    assert ours.shape == (2, 64)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert not torch.allclose(ours[0], ours[1])
    assert pickle.loads(pickle.dumps(encoder.preprocess)) is not None


def test_timm_rejects_checkpoint_of_another_model(tmp_path: Path) -> None:
    import timm

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(EncoderError, match="does not fit timm model 'test_vit'") as info:
        load_encoder(f"timm:test_vit/{path}")
    assert f"checkpoint {path} does not fit" in str(info.value)


@pytest.mark.parametrize("layout", ["headless", "safetensors", "training-checkpoint"])
def test_timm_checkpoint_layouts(layout: str, tmp_path: Path) -> None:
    """A checkpoint without the classifier, a safetensors file and a {"state_dict": ...} wrapper all load."""
    import timm

    torch.manual_seed(0)
    reference: Any = timm.create_model("test_vit").eval()
    state_dict = reference.state_dict()
    if layout == "headless":
        path = tmp_path / "headless.pth"
        torch.save({k: v for k, v in state_dict.items() if not k.startswith("head.")}, path)
    elif layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "test_vit.safetensors"
        save_file(state_dict, str(path))
    else:
        path = tmp_path / "last.pth"
        torch.save({"epoch": 3, "state_dict": state_dict}, path)
    reference.reset_classifier(0)

    encoder = load_encoder(f"timm:test_vit/{path}")
    assert encoder.weights_sha256 == _sha256(path)
    x = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(encoder.model(x), reference(x), atol=1e-6)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("missing", 'Missing key(s) in state_dict: "norm.weight"'),
        ("renamed", 'Unexpected key(s) in state_dict: "norm.gamma"'),
        ("extra", 'Unexpected key(s) in state_dict: "aux_head.weight"'),
        ("reshaped", "size mismatch for norm.weight"),
    ],
)
def test_timm_strict_load_names_file_and_key(change: str, needle: str, tmp_path: Path) -> None:
    import timm

    state_dict = timm.create_model("test_vit").state_dict()
    if change == "missing":
        del state_dict["norm.weight"]
    elif change == "renamed":
        state_dict["norm.gamma"] = state_dict.pop("norm.weight")
    elif change == "extra":
        state_dict["aux_head.weight"] = torch.zeros(3, 64)
    else:
        state_dict["norm.weight"] = torch.zeros(65)
    path = tmp_path / f"{change}.pth"
    torch.save(state_dict, path)
    name = f"timm:test_vit/{path}"
    with pytest.raises(EncoderError) as info:
        load_encoder(name)
    message = str(info.value)
    assert message.startswith(f"{name}: checkpoint {path} does not fit timm model 'test_vit' (")
    assert needle in message
    assert "\n" not in message


class _NotATensor:
    """Pickled into a checkpoint: a weights-only load must refuse it rather than run arbitrary unpickling."""


def test_timm_checkpoint_is_loaded_weights_only(tmp_path: Path) -> None:
    import timm

    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": timm.create_model("test_vit").state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(EncoderError, match="weights_only") as info:
        load_encoder(f"timm:test_vit/{path}")
    assert f"checkpoint {path} does not fit" in str(info.value)


def test_timm_hub_weights_offline(offline_hub: None) -> None:
    with pytest.raises(EncoderError, match=r"timm:test_vit: .*no network.*local checkpoint"):
        load_encoder("timm:test_vit")


# --------------------------------------------------------------------------------------------------------------
# names and errors


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("efficientnet-lite0", ("efficientnet", "efficientnet-lite0", "")),
        ("  efficientnet-lite0 ", ("efficientnet", "efficientnet-lite0", "")),
        ("open_clip:ViT-B-32/laion2b_s34b_b79k", ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")),
        ("open_clip:ViT-B-32//abs/dir/ckpt.pt", ("open_clip", "ViT-B-32", "/abs/dir/ckpt.pt")),
        ("open_clip:my-vit/rel/dir/ckpt.pt", ("open_clip", "my-vit", "rel/dir/ckpt.pt")),
        ("timm:resnet18", ("timm", "resnet18", "")),
        ("timm:resnet18.a1_in1k//w/r.pth", ("timm", "resnet18.a1_in1k", "/w/r.pth")),
    ],
)
def test_parse_encoder_name(name: str, expected: tuple[str, str, str]) -> None:
    assert parse_encoder_name(name) == expected


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("", "empty encoder name"),
        ("foo:bar", "foo:bar: unknown encoder"),
        ("efficientnet-lite1", "efficientnet-lite1: unknown encoder"),
        ("open_clip:ViT-B-32", "missing '/<pretrained>'"),
        ("open_clip:/x.pt", "no model name"),
        ("open_clip:Foo/bar", "open_clip:Foo/bar: unknown open_clip model 'Foo' (known: "),
        ("open_clip:ViT-B-23/laion2b_s34b_b79k", "did you mean: ViT-B-32"),
        ("open_clip:ViT-B-32/laion9", "'laion9' is neither a pretrained tag of ViT-B-32"),
        ("open_clip:ViT-B-32/{tmp}/missing.pt", "checkpoint file not found: {tmp}/missing.pt"),
        ("open_clip:mammals-x/{tmp}/missing.pt", "checkpoint file not found: {tmp}/missing.pt"),
        ("timm:test_vt", "timm:test_vt: unknown timm model 'test_vt' (did you mean: test_vit"),
        ("timm:test_vit/{tmp}/missing.pth", "checkpoint file not found: {tmp}/missing.pth"),
        ("timm:test_vit/{tmp}", "checkpoint path is not a file"),
    ],
)
def test_bad_names_give_one_line_errors(name: str, needle: str, tmp_path: Path) -> None:
    name = name.replace("{tmp}", str(tmp_path))
    with pytest.raises(EncoderError) as info:
        load_encoder(name)
    message = str(info.value)
    assert needle.replace("{tmp}", str(tmp_path)) in message
    assert "\n" not in message
    if name:
        assert message.startswith(name + ": ")


def test_bad_device_is_an_encoder_error() -> None:
    with pytest.raises(EncoderError, match="bad device"):
        load_encoder("efficientnet-lite0", device="gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA is not available"):
            load_encoder("efficientnet-lite0", device="cuda")


def test_known_encoders_help_lists_every_family() -> None:
    text = describe_known_encoders()
    for pattern in KNOWN_ENCODERS:
        assert pattern in text
    assert "efficientnet-lite0" in text and "open_clip:" in text and "timm:" in text


def test_package_exports_device_and_text_tower_helpers() -> None:
    from indexer.encoders import registry

    assert registry.resolve_device is resolve_device and registry.has_text_tower is has_text_tower
    assert resolve_device("cpu") == torch.device("cpu")
    assert has_text_tower("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert not has_text_tower("timm:resnet18")
    assert not has_text_tower("efficientnet-lite0")
    assert not has_text_tower("no-such-encoder")


def test_family_modules_do_not_import_the_registry() -> None:
    """Families import only ``common`` and leaves (no cycle; ``common`` the leaf ``fused``, open_clip the leaf
    ``attention``); the registry imports them, not the other way round."""
    package = Path(indexer.encoders.__file__).parent
    for module in ("common", "efficientnet", "openclip", "timm_models"):
        tree = ast.parse((package / f"{module}.py").read_text(encoding="utf-8"))
        ours: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                ours.add("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                ours.update(alias.name for alias in node.names)
        ours = {m for m in ours if m.startswith((".", "indexer.encoders"))}
        leaves = {"indexer.encoders.common", "indexer.encoders.fused", "indexer.encoders.attention"}
        assert ours <= leaves, (module, ours)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)


def _layouts_agree(encoder: Encoder, photos: list[Path]) -> torch.Tensor:
    """Per photo, cosine between the encoder's own layout and plain NCHW float32 (a contiguous copy)."""
    from indexer.extract import embed

    batch = torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in photos])
    cpu = torch.device("cpu")
    ours = embed(encoder.model, batch, cpu, memory_format=encoder.memory_format)
    nchw = copy.deepcopy(encoder.model).to(memory_format=torch.contiguous_format)
    plain = embed(nchw, batch, cpu)
    return _cosines(torch.from_numpy(ours), torch.from_numpy(plain))


def test_channels_last_for_cnns_only_and_embeddings_unchanged(tmp_path: Path, effnet: Encoder) -> None:
    import timm

    photos = _photos("cat/persian", 4) + _photos("dog/pug", 4)
    # The real encoder runs channels-last (2-3x faster on CPUs) and gives the NCHW embeddings.
    assert effnet.memory_format == torch.channels_last
    assert effnet.run_options == {"memory_format": torch.channels_last, "autocast": None}
    assert _layouts_agree(effnet, photos).min() >= 0.9999
    # A timm CNN too; a ViT (timm or open_clip) stays in the default layout.
    torch.manual_seed(0)
    path = tmp_path / "cnn.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    cnn = load_encoder(f"timm:test_efficientnet/{path}")
    assert cnn.memory_format == torch.channels_last and _layouts_agree(cnn, photos).min() >= 0.9999
    vit = load_encoder(make_tiny_open_clip_checkpoint(tmp_path))
    assert vit.memory_format == torch.contiguous_format
    assert _layouts_agree(vit, photos).min() >= 0.9999


def test_cpu_bfloat16_for_transformers_only_and_within_cosine_0999(tmp_path: Path, effnet: Encoder) -> None:
    from indexer.encoders.registry import cpu_has_bf16
    from indexer.extract import embed

    vit = load_encoder(make_tiny_open_clip_checkpoint(tmp_path))
    assert vit.autocast == (torch.bfloat16 if cpu_has_bf16() else None)
    assert effnet.autocast is None  # a CNN loses more than the 0.999 in bfloat16 (0.996 measured)
    assert load_encoder(make_tiny_open_clip_checkpoint(tmp_path), precision="fp32").autocast is None
    photos = sorted(PETS.glob("*/*/*.jpg"))[::40]
    batch = torch.stack([vit.preprocess(Image.open(p).convert("RGB")) for p in photos])
    cpu = torch.device("cpu")
    half = embed(vit.model, batch, cpu, memory_format=vit.memory_format, autocast=torch.bfloat16)
    full = embed(vit.model, batch, cpu, memory_format=vit.memory_format)
    assert _cosines(torch.from_numpy(half), torch.from_numpy(full)).min() >= 0.999


def test_packed_self_attention_is_multihead_attention_and_takes_over_under_autocast(tmp_path: Path) -> None:
    # Under CPU autocast nn.MultiheadAttention's generic path copied its weight once per token (bfloat16 slower
    # than float32 for open_clip's ViT); PackedSelfAttention computes the same attention from contiguous rows
    # there and is the parent, bit for bit, everywhere else.
    from indexer.encoders.attention import PackedSelfAttention, pack_self_attention, packed_self_attention

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.MultiheadAttention(64, 4, batch_first=True)).eval()
    x = torch.randn(3, 10, 64)
    with torch.inference_mode():
        ref = net[0](x, x, x, need_weights=False)[0]
        assert pack_self_attention(net) == 1 and isinstance(net[0], PackedSelfAttention)
        assert torch.equal(net[0](x, x, x, need_weights=False)[0], ref)  # float32: the parent's own path
        assert torch.allclose(packed_self_attention(net[0], x), ref, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = net[0](x, x, x, need_weights=False)[0]
            assert torch.equal(half, packed_self_attention(net[0], x))
            mask = torch.zeros(10, 10)
            masked = net[0](x, x, x, need_weights=False, attn_mask=mask)[0]  # a mask: the parent's path
        tokens = ref.reshape(-1, 64)
        assert _cosines(half.reshape(-1, 64), tokens).min() >= 0.999
        assert _cosines(masked.reshape(-1, 64), tokens).min() >= 0.999
    # open_clip's image tower gets it; its text tower (causal masks) keeps its own.
    vit = load_encoder(make_tiny_open_clip_checkpoint(tmp_path))
    clip = vit.model.clip  # type: ignore[union-attr]
    attn = [type(m) for m in clip.visual.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attn and set(attn) == {PackedSelfAttention}
    assert all(type(m) is torch.nn.MultiheadAttention
               for m in clip.transformer.modules() if isinstance(m, torch.nn.MultiheadAttention))


def test_unknown_precision_is_an_encoder_error() -> None:
    with pytest.raises(EncoderError, match="precision"):
        load_encoder("efficientnet-lite0", precision="fp8")
    assert load_encoder("efficientnet-lite0", device="cpu", precision="fp16").autocast is None  # CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_autocast_embeddings_within_cosine_0999_of_float32(tmp_path: Path) -> None:
    from indexer.extract import embed

    photos = sorted(PETS.glob("*/*/*.jpg"))[::20]
    for name in ("efficientnet-lite0", make_tiny_open_clip_checkpoint(tmp_path)):
        half = load_encoder(name, device="cuda")
        assert half.autocast == torch.float16
        batch = torch.stack([half.preprocess(Image.open(p).convert("RGB")) for p in photos])
        got = embed(half.model, batch, torch.device("cuda"), **half.run_options)
        full = embed(half.model, batch, torch.device("cuda"), memory_format=half.memory_format)
        cpu = load_encoder(name, device="cpu")
        ref = embed(cpu.model, batch, torch.device("cpu"), **cpu.run_options)
        assert _cosines(torch.from_numpy(got), torch.from_numpy(full)).min() >= 0.999, name
        assert _cosines(torch.from_numpy(full), torch.from_numpy(ref)).min() >= 0.9999, name

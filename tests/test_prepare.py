"""ImageNet preparation (alexnet_jax/data/prepare.py) on miniature sources made here."""

import functools
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from alexnet_jax.data import listing, pipeline, prepare, records, shards, sources, writer
from tests.conftest import ROOT, SHARED_SAMPLES

# The first six ILSVRC-2012 validation images' classes, so a miniature val
# tar labelled from the tfds copy of validation_labels.txt has known labels.
VAL_WNIDS = sources.ilsvrc2012_validation_wnids()[:6]


def _jpeg(seed: int, size=(300, 220), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((w, h), Image.BILINEAR).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


BAD_FILES = {
    # name -> (bytes maker, what prepare must do with it)
    "gray.JPEG": (lambda: _jpeg(100, mode="L"), "grayscale"),
    "cmyk.JPEG": (lambda: _jpeg(101, mode="CMYK"), "cmyk"),
    "png.JPEG": (lambda: _jpeg(102, fmt="PNG"), "not_jpeg"),
    "truncated.JPEG": (lambda: _jpeg(103)[:1500], "truncated"),
    "empty.JPEG": (lambda: b"", "empty"),
    "junk.JPEG": (lambda: b"definitely not an image" * 8, "undecodable"),
}


def _folder_source(root: str, wnids=("n01440764", "n01443537", "n01484850"), per_class=4):
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            size = (200 + 37 * i, 260 + 11 * c)  # Both orientations, some under 256.
            _write(os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG"), _jpeg(10 * c + i, size))
        _write(os.path.join(root, "val", wnid, f"val_{wnid}.JPEG"), _jpeg(500 + c))
    for name, (make, _) in BAD_FILES.items():
        _write(os.path.join(root, "train", wnids[0], name), make())
    return root


def _read_shards(data_dir: str, split: str, metadata: dict) -> list[dict]:
    examples = []
    for path in records.shard_paths(data_dir, split, metadata):
        reader = ArrayRecordReader(path)
        examples += [records.decode_example(r) for r in reader.read_all()]
        reader.close()
    return examples


@pytest.fixture(scope="module")
def folder_prepared(tmp_path_factory):
    source = _folder_source(str(tmp_path_factory.mktemp("folder_src")))
    out = str(tmp_path_factory.mktemp("folder_out"))
    metadata = prepare.prepare(source, out, examples_per_shard=5, num_workers=0)
    return source, out, metadata


def test_folder_layout_converts_and_reports_every_bad_file(folder_prepared):
    _, out, metadata = folder_prepared
    summary = metadata["summary"]["train"]
    # 12 good images + gray, cmyk and png kept; truncated, empty and junk reported.
    assert summary["written"] == 15 and metadata["splits"]["train"]["num_examples"] == 15
    assert metadata["splits"]["train"]["num_shards"] == 4  # 18 inputs / 5 per shard
    for kind in ("grayscale", "cmyk", "not_jpeg", "truncated", "empty", "undecodable"):
        assert summary[kind] == 1, kind
    assert summary["other_mode"] == 0 and summary["unknown_label"] == 0
    bad = {b["key"].rsplit("/", 1)[1]: b for b in metadata["bad_files"]}
    assert {n: b["kind"] for n, b in bad.items()} == {
        "truncated.JPEG": "truncated",
        "empty.JPEG": "empty",
        "junk.JPEG": "undecodable",
    }
    assert all(b["reason"] and b["split"] == "train" for b in bad.values())
    assert metadata["summary"]["val"]["written"] == 3

    examples = _read_shards(out, "train", metadata)
    by_name = {e["key"].rsplit("/", 1)[1]: e for e in examples}
    assert len(by_name) == 15
    wnids = [c["id"] for c in metadata["classes"]]
    assert wnids == ["n01440764", "n01443537", "n01484850"]
    for example in examples:
        image = pipeline.decode_jpeg(example["image"])
        assert image.shape == (256, 256, 3)
        assert wnids[example["label"]] == example["key"].split("/")[1]
    gray = pipeline.decode_jpeg(by_name["gray.JPEG"]["image"]).astype(int)
    assert np.abs(gray[..., 0] - gray[..., 2]).max() <= 3  # Converted, still gray.


def test_statistics_equal_direct_numpy_computation(folder_prepared):
    _, out, metadata = folder_prepared
    dataset = pipeline.open_dataset(out, how_to_prepare="-")
    images = np.stack(
        [pipeline.decode_jpeg(e["image"]) for e in _read_shards(out, "train", metadata)]
    ).astype(np.float64)
    np.testing.assert_allclose(dataset.mean_image(), images.mean(0), rtol=1e-6, atol=1e-4)
    covariance = np.cov(images.reshape(-1, 3).T / 255.0, bias=True)
    values, vectors = dataset.rgb_eigen()
    assert np.all(np.diff(values) <= 0)  # Descending.
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, covariance, atol=1e-10)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-10)


def test_interrupted_run_resumes_to_identical_output(folder_prepared, tmp_path, monkeypatch):
    source, reference, _ = folder_prepared
    out = str(tmp_path / "out")
    real_prepare_shard = shards.prepare_shard
    calls = []

    def interrupted(task):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(task.index)
        return real_prepare_shard(task)

    monkeypatch.setattr(shards, "prepare_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(source, out, examples_per_shard=5, num_workers=0)
    assert records.read_metadata(out) is None  # Not marked complete.
    finished = [n for n in os.listdir(out) if n.endswith(".array_record")]
    assert len(finished) == 2
    mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in finished}
    _write(os.path.join(out, "train-00002-of-00004.array_record.tmp"), b"half written")

    monkeypatch.setattr(shards, "prepare_shard", real_prepare_shard)
    prepare.prepare(source, out, examples_per_shard=5, num_workers=2)  # Resume with workers.
    for name in finished:  # Finished shards were kept, not redone.
        assert os.stat(os.path.join(out, name)).st_mtime_ns == mtimes[name]
    produced = sorted(n for n in os.listdir(out) if not n.endswith(".tmp"))
    assert produced == sorted(os.listdir(reference))
    for name in produced:
        with open(os.path.join(out, name), "rb") as f:
            ours = f.read()
        with open(os.path.join(reference, name), "rb") as f:
            assert ours == f.read(), name
    # A run over a finished preparation changes nothing.
    prepare.prepare(source, out, examples_per_shard=5, num_workers=0)
    assert sorted(os.listdir(out)) == produced


def test_shards_are_the_bytes_the_format_functions_give_in_the_documented_order(
    folder_prepared, tmp_path
):
    """Listing, reading and shard writing, checked against a path that uses none of them.

    The reference lists the folder by hand (classes and files sorted, every
    image-named file an input, shards of 5 inputs with bad files left out of
    their shard) and writes each shard with writer's functions alone. Equal
    bytes mean prepare's listing, reading and sharding add, drop and reorder
    nothing: what its split into modules must keep (the resume test covers
    worker processes against this in-process output).
    """
    source, out, metadata = folder_prepared
    per_shard = 5
    for split in ("train", "val"):
        split_dir = os.path.join(source, split)
        inputs = [
            (os.path.join(split_dir, wnid, name), label, f"{split}/{wnid}/{name}")
            for label, wnid in enumerate(sorted(os.listdir(split_dir)))
            for name in sorted(os.listdir(os.path.join(split_dir, wnid)))
        ]
        chunks = [inputs[i : i + per_shard] for i in range(0, len(inputs), per_shard)]
        assert metadata["splits"][split]["num_shards"] == len(chunks)
        for index, chunk in enumerate(chunks):
            examples = []
            for path, label, key in chunk:
                with open(path, "rb") as f:
                    data = f.read()
                try:
                    image, _ = writer.prepare_image(data)
                except writer.BadImageError:
                    continue
                examples.append((writer.encode_jpeg(image), label, key))
            name = records.shard_filename(split, index, len(chunks))
            writer.write_shard(str(tmp_path / name), examples)
            with open(tmp_path / name, "rb") as ours, open(os.path.join(out, name), "rb") as f:
                assert f.read() == ours.read(), name


def test_missing_or_wrong_source_fails_saying_what_was_expected(tmp_path):
    with pytest.raises(sources.SourceError, match="does not exist.*ILSVRC2012_img_train.tar"):
        prepare.prepare(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.SourceError, match="none of the accepted layouts.*<class>/\\*.jpg"):
        prepare.prepare(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def _class_folders(root: str, counts: dict[str, int], prefix: str = "") -> str:
    """ROOT/<prefix><class>/img_i.jpg, counts[class] small images per class."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _write(os.path.join(root, prefix, name, f"img_{i}.jpg"), _jpeg(50 * c + i, (64, 48)))
    return root


def test_flat_class_folders_get_a_seeded_stratified_validation_split(tmp_path):
    counts = {"cat": 10, "dog": 5, "bird": 3}
    source = _class_folders(str(tmp_path / "pets"), counts)
    os.makedirs(tmp_path / "pets" / ".ipynb_checkpoints")  # Jupyter's: never a class.
    _write(str(tmp_path / "pets" / "stray.jpg"), _jpeg(7, (64, 48)))
    metadata = prepare.prepare(source, str(tmp_path / "out"), num_workers=0)

    assert metadata["name"] == "pets" and metadata["source_kind"] == "class_folders"
    assert metadata["classes"] == [{"id": c, "name": c} for c in ("bird", "cat", "dog")]
    assert not metadata["standard_ilsvrc2012_order"]
    split = metadata["val_split"]
    assert (split["val_fraction"], split["seed"], split["stratified"]) == (0.2, 0, True)
    # round(0.2 n), at least one per class on each side: 10 -> 8/2, 5 -> 4/1, 3 -> 2/1.
    assert split["per_class"] == {
        "bird": {"train": 2, "val": 1},
        "cat": {"train": 8, "val": 2},
        "dog": {"train": 4, "val": 1},
    }
    assert metadata["splits"]["train"]["num_examples"] == 14
    assert metadata["splits"]["val"]["num_examples"] == 4
    train = {e["key"]: e["label"] for e in _read_shards(str(tmp_path / "out"), "train", metadata)}
    val = {e["key"]: e["label"] for e in _read_shards(str(tmp_path / "out"), "val", metadata)}
    assert not set(train) & set(val) and len(train) + len(val) == 18
    for key, label in {**train, **val}.items():
        assert metadata["classes"][label]["id"] == key.split("/")[0]
    # The image beside the class folders is reported, not trained on.
    assert [(b["key"], b["kind"]) for b in metadata["bad_files"]] == [
        ("stray.jpg", "unknown_label")
    ]
    assert metadata["skipped_files"]["examples"] == [".ipynb_checkpoints"]

    # The same seed holds out the same images; another seed, others (recorded).
    again = prepare.prepare(source, str(tmp_path / "again"), num_workers=0)
    assert again["val_split"] == split
    assert {e["key"] for e in _read_shards(str(tmp_path / "again"), "val", again)} == set(val)
    other = prepare.prepare(source, str(tmp_path / "other"), num_workers=0, split_seed=3)
    assert other["val_split"]["seed"] == 3
    assert {e["key"] for e in _read_shards(str(tmp_path / "other"), "val", other)} != set(val)


def test_train_folder_without_val_is_split_and_named_by_flag_or_folder(tmp_path):
    source = _class_folders(str(tmp_path / "shop"), {"mug": 4, "spoon": 4}, prefix="train")
    metadata = prepare.prepare(
        source, str(tmp_path / "out"), num_workers=0, val_fraction=0.5, name="kitchen"
    )
    assert metadata["name"] == "kitchen" and metadata["source_kind"] == "folder"
    assert metadata["val_split"]["held_out_from"] == "train/"
    assert metadata["val_split"]["per_class"] == {
        "mug": {"train": 2, "val": 2},
        "spoon": {"train": 2, "val": 2},
    }
    keys = {e["key"] for e in _read_shards(str(tmp_path / "out"), "val", metadata)}
    assert len(keys) == 4 and all(k.startswith("train/") for k in keys)
    # With a val/ folder, its images are the validation set: nothing is held out.
    _class_folders(source, {"mug": 1, "spoon": 1}, prefix="val")
    own = prepare.prepare(source, str(tmp_path / "own"), num_workers=0)
    assert "val_split" not in own and own["name"] == "shop"
    assert own["splits"]["train"]["num_examples"] == 8
    assert own["splits"]["val"]["num_examples"] == 2


def test_classes_too_small_to_split_are_all_named_with_their_folders(tmp_path):
    source = _class_folders(str(tmp_path / "src"), {"big": 5, "one": 1, "none": 0})
    os.makedirs(tmp_path / "src" / "none", exist_ok=True)
    with pytest.raises(sources.SourceError) as e:
        prepare.prepare(source, str(tmp_path / "out"), num_workers=0)
    message = str(e.value)
    assert f"{tmp_path / 'src' / 'one'} (1 image)" in message and "but 2 have fewer" in message
    assert f"{tmp_path / 'src' / 'none'} (0 images)" in message
    assert "big" not in message and "at least 2 images" in message
    assert "ROOT/val/<class>/" in message
    assert not os.path.exists(tmp_path / "out")
    # Without a val split nothing needs splitting.
    metadata = prepare.prepare(source, str(tmp_path / "out"), num_workers=0, splits=["train"])
    assert metadata["splits"] == {"train": {"num_examples": 6, "num_shards": 1}}
    with pytest.raises(sources.SourceError, match="--val_fraction=1.0 must be in"):
        prepare.prepare(source, str(tmp_path / "x"), val_fraction=1.0)


def test_images_without_class_folders_say_how_to_arrange_them(tmp_path):
    for i in range(3):
        _write(str(tmp_path / "src" / f"photo_{i}.jpg"), _jpeg(i, (64, 48)))
    with pytest.raises(sources.SourceError, match=r"holds 3 images but no class folders.*<class>"):
        prepare.prepare(str(tmp_path / "src"), str(tmp_path / "out"))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_ilsvrc_tar_layout_with_nested_class_tars(tmp_path):
    wnids = sorted(set(VAL_WNIDS))
    with tarfile.open(tmp_path / listing.TRAIN_TAR, "w") as outer:
        for c, wnid in enumerate(wnids):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(3):
                    _add_bytes(inner, f"{wnid}_{i}.JPEG", _jpeg(20 * c + i))
            _add_bytes(outer, f"{wnid}.tar", inner_bytes.getvalue())
    with tarfile.open(tmp_path / listing.VAL_TAR, "w") as val:
        for i in range(len(VAL_WNIDS)):
            _add_bytes(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(900 + i))
    out = str(tmp_path / "out")
    metadata = prepare.prepare(str(tmp_path), out, examples_per_shard=4, num_workers=0)

    assert [c["id"] for c in metadata["classes"]] == wnids
    assert metadata["source_kind"] == "tars" and not metadata["standard_ilsvrc2012_order"]
    assert metadata["splits"]["train"]["num_examples"] == 3 * len(wnids)
    assert metadata["splits"]["val"]["num_examples"] == len(VAL_WNIDS)
    assert metadata["bad_files"] == []
    train = _read_shards(out, "train", metadata)
    assert [e["key"] for e in train] == [f"train/{w}/{w}_{i}.JPEG" for w in wnids for i in range(3)]
    # The bytes came from the right offsets inside the nested tars.
    first = pipeline.decode_jpeg(train[0]["image"]).astype(int)
    expected, _ = writer.prepare_image(_jpeg(0))
    assert np.abs(first - np.asarray(expected, int)).mean() < 3
    val = _read_shards(out, "val", metadata)
    assert [wnids[e["label"]] for e in val] == VAL_WNIDS


@functools.cache
def _tiny_tfds_builder_class():
    """A two-class imagenet-like tfds builder (defined once: tfds registers builders by name)."""
    import tensorflow_datasets as tfds

    class AlexnetJaxTinyImagenet(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # Defined in a test, not a dataset package: no checksums file.

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(names=["n01440764", "n01443537"]),
                        "file_name": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                name = f"img_{i}.JPEG"
                yield name, {"image": io.BytesIO(_jpeg(i)), "label": i % 2, "file_name": name}

    return AlexnetJaxTinyImagenet


def build_tiny_tfds(root: str) -> str:
    """Builds the tiny tfds dataset under ``root`` (array_record, no TensorFlow); its dir."""
    builder = _tiny_tfds_builder_class()(data_dir=root, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def test_tfds_built_dataset_is_read_without_tensorflow(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    data_dir = build_tiny_tfds(str(tmp_path / "tfds"))
    out = str(tmp_path / "out")
    metadata = prepare.prepare(data_dir, out, examples_per_shard=4, num_workers=0)
    assert metadata["source_kind"] == "tfds"
    assert [c["id"] for c in metadata["classes"]] == ["n01440764", "n01443537"]
    assert metadata["splits"]["train"]["num_examples"] == 6
    assert metadata["splits"]["val"]["num_examples"] == 2
    train = _read_shards(out, "train", metadata)
    assert sorted(e["key"] for e in train) == [f"train/img_{i}.JPEG" for i in range(6)]
    assert all(e["label"] == int(e["key"][-6]) % 2 for e in train)


@pytest.mark.skipif(not os.path.isdir(SHARED_SAMPLES), reason="../shared/imagenet-samples absent")
def test_real_imagenet_samples_prepare_and_decode(tmp_path):
    from alexnet_jax.benchmarks import input_pipeline

    names = input_pipeline.samples_as_folder(SHARED_SAMPLES, str(tmp_path / "src"))
    assert len(names) == 100
    grayscale = sum(
        Image.open(os.path.join(SHARED_SAMPLES, f)).mode == "L"
        for f in os.listdir(SHARED_SAMPLES)
        if f.endswith(".JPEG")
    )
    out = str(tmp_path / "out")
    metadata = prepare.prepare(str(tmp_path / "src"), out, examples_per_shard=50)
    assert metadata["summary"]["train"]["written"] == 100 and metadata["bad_files"] == []
    assert metadata["summary"]["train"]["grayscale"] == grayscale
    classes = metadata["classes"]
    assert [c["id"] for c in classes] == sorted(names)
    assert classes[0] == {"id": "n01440764", "name": "tench"}
    for example in _read_shards(out, "train", metadata):
        assert pipeline.decode_jpeg(example["image"]).shape == (256, 256, 3)
        wnid = classes[example["label"]]["id"]
        assert example["key"].split("/")[-1].startswith(wnid + "_")


def _sixteen_bit_blocks() -> np.ndarray:
    """256x256 uint16, constant on each JPEG 8x8 block (so storing it as JPEG is near exact)."""
    by, bx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    blocks = (bx * 32 + by) * 64  # 0 .. 65472, every block a different level.
    return np.repeat(np.repeat(blocks, 8, 0), 8, 1).astype(np.uint16)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_high_depth_grayscale_is_scaled_not_clipped(mode):
    values = _sixteen_bit_blocks()
    if mode == "I;16B":
        image = Image.frombytes(mode, (256, 256), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))
    assert image.mode == mode
    prepared = np.asarray(writer.resize_and_center_crop(image), int)
    assert prepared.shape == (256, 256, 3)
    np.testing.assert_allclose(prepared[..., 0], values / 257.0, atol=0.5 + 1e-9)
    assert (prepared[..., 0] == prepared[..., 2]).all()


def test_float_images_are_taken_as_0_to_1_when_they_fit():
    values = np.linspace(0.0, 1.0, 256 * 256, dtype=np.float32).reshape(256, 256)
    values[0, 0] = np.nan
    prepared = np.asarray(writer.resize_and_center_crop(Image.fromarray(values)), int)
    assert prepared[0, 0, 0] == 0
    np.testing.assert_allclose(prepared[1:, :, 1], values[1:] * 255.0, atol=0.5 + 1e-6)
    beyond = Image.fromarray(np.full((256, 256), 300.0, np.float32))
    assert (np.asarray(writer.resize_and_center_crop(beyond)) == 255).all()


@pytest.mark.parametrize("mode", ["P", "LA"])  # (PNG cannot hold PIL's PA.)
def test_transparent_pixels_composite_onto_white(mode):
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[:, :128] = (40, 40, 40, 255)  # Opaque dark left half, transparent right half.
    image = Image.fromarray(rgba)
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((200, 0))
    else:
        image = image.convert(mode)
    prepared, _ = writer.prepare_image(_png(image))
    pixels = np.asarray(prepared, int)
    assert np.abs(pixels[:, :100] - 40).max() <= 2, mode
    assert (pixels[:, 156:] == 255).all(), mode


# ---------------------------------------------------------------------------
# Paths that cannot be read, files that are not images, and failing workers.

WNIDS = ("n01440764", "n01443537")


def _small_source(root: str) -> list[str]:
    """Two classes of good images (one a 16-bit PNG); the keys prepare must write."""
    keys = []
    for c, wnid in enumerate(WNIDS):
        for i in range(2):
            _write(os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG"), _jpeg(40 + 2 * c + i))
            keys.append(f"train/{wnid}/{wnid}_{i}.JPEG")
        _write(os.path.join(root, "val", wnid, f"val_{wnid}.JPEG"), _jpeg(60 + c))
    deep = _png(Image.fromarray(_sixteen_bit_blocks()))  # Saved as a 16-bit grayscale PNG.
    _write(os.path.join(root, "train", WNIDS[1], "deep.png"), deep)
    return sorted([*keys, f"train/{WNIDS[1]}/deep.png"])


def _make_directory(path: str) -> None:
    os.makedirs(path)


def _make_dangling_symlink(path: str) -> None:
    os.symlink(os.path.join(os.path.dirname(path), "gone.JPEG"), path)


def _make_unreadable(path: str) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file")
    _write(path, _jpeg(70))
    os.chmod(path, 0)


# name in the first class folder -> (how to make it, what its reason must say)
UNREADABLE = {
    "x.JPEG": (_make_directory, "a directory"),
    "link.JPEG": (_make_dangling_symlink, "broken symbolic link.*gone.JPEG"),
    "locked.JPEG": (_make_unreadable, "no permission"),
    "pipe.JPEG": (os.mkfifo, "named pipe"),
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_an_unreadable_path_is_a_bad_file_and_the_run_finishes(tmp_path, name):
    make, reason = UNREADABLE[name]
    good = _small_source(str(tmp_path / "src"))
    try:
        make(str(tmp_path / "src" / "train" / WNIDS[0] / name))
        out = str(tmp_path / "out")
        metadata = prepare.prepare(str(tmp_path / "src"), out, examples_per_shard=3, num_workers=0)
    finally:
        locked = tmp_path / "src" / "train" / WNIDS[0] / "locked.JPEG"
        if locked.exists():
            locked.chmod(0o644)  # So pytest can clean up.
    assert records.read_metadata(out) is not None  # Finished and marked complete.
    assert sorted(e["key"] for e in _read_shards(out, "train", metadata)) == good
    (bad,) = metadata["bad_files"]
    assert bad["key"] == f"train/{WNIDS[0]}/{name}" and bad["kind"] == "unreadable"
    assert re.search(reason, bad["reason"]), bad["reason"]
    assert metadata["summary"]["train"]["unreadable"] == 1
    assert metadata["summary"]["train"]["written"] == len(good)


def test_cli_reports_every_kind_and_stores_16_bit_pngs_scaled(tmp_path):
    good = _small_source(str(tmp_path / "src"))
    first_class = tmp_path / "src" / "train" / WNIDS[0]
    os.makedirs(first_class / "x.JPEG")
    _make_dangling_symlink(str(first_class / "link.JPEG"))
    (first_class / "notes.txt").write_text("not an image")
    (tmp_path / "src" / "val" / "README").write_text("beside the class folders")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "alexnet_jax.data.prepare", f"--source={tmp_path / 'src'}"]
    command += [f"--output_dir={out}", "--examples_per_shard=2", "--num_workers=2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped (not an image extension): 1" in run.stdout  # In train and in val.
    assert f"bad file train/{WNIDS[0]}/x.JPEG: unreadable (a directory" in run.stdout
    assert f"bad file train/{WNIDS[0]}/link.JPEG: unreadable (broken symbolic link" in run.stdout

    metadata = records.read_metadata(str(out))
    assert metadata["skipped_files"] == {
        "count": 2,
        "examples": [f"train/{WNIDS[0]}/notes.txt", "val/README"],
    }
    summary = metadata["summary"]
    assert summary["train"]["skipped"] == 1 and summary["val"]["skipped"] == 1
    assert summary["train"]["unreadable"] == 2 and summary["train"]["written"] == len(good)
    assert summary["train"]["high_depth"] == 1 and summary["val"]["written"] == 2
    train = {e["key"]: e for e in _read_shards(str(out), "train", metadata)}
    assert sorted(train) == good
    stored = pipeline.decode_jpeg(train[f"train/{WNIDS[1]}/deep.png"]["image"]).astype(int)
    expected = _sixteen_bit_blocks() / 257.0  # 256x256 already: no resize, no crop.
    assert np.abs(stored - expected[..., None]).max() <= 1.0


def test_a_failing_worker_ends_the_run_at_once_naming_its_shard(tmp_path):
    _small_source(str(tmp_path / "src"))
    out = tmp_path / "out"
    # The first shard's report cannot be written: a bug-like fault of the worker, not of a file.
    report = records.shard_filename("train", 0, 3) + ".json.tmp"
    os.makedirs(out / shards.PROGRESS_DIR / report)
    start = time.time()
    with pytest.raises(shards.WorkerError, match=r"(?s)train shard 1 of 3.*IsADirectoryError"):
        prepare.prepare(str(tmp_path / "src"), str(out), examples_per_shard=2, num_workers=2)
    assert time.time() - start < 60
    assert records.read_metadata(str(out)) is None


def test_map_unordered_yields_every_result():
    assert sorted(shards.map_unordered(abs, [-1, -2, 3, -4], 2)) == [1, 2, 3, 4]


def test_map_unordered_cancels_the_rest_on_the_first_failure():
    # time.sleep(-1) raises; the 40 three-second sleeps would take 60 s on two workers.
    start = time.time()
    with pytest.raises(shards.WorkerError, match="(?s)preparing -1 failed.*non-negative"):
        for _ in shards.map_unordered(time.sleep, [-1] + [3] * 40, 2):
            pass
    assert time.time() - start < 30


def test_map_unordered_reports_a_worker_that_died():
    with pytest.raises(shards.WorkerError, match="worker process died while preparing 3"):
        list(shards.map_unordered(os._exit, [3], 1))


def test_a_tfrecord_tfds_build_is_named_with_the_command_that_makes_a_readable_one(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from alexnet_jax.data import pipeline

    data_dir = build_tiny_tfds(str(tmp_path / "tfds"))
    info_path = os.path.join(data_dir, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["fileFormat"] = "tfrecord"  # As a default tfds build writes it (needs TensorFlow).
    with open(info_path, "w") as f:
        json.dump(info, f)
    for name in os.listdir(data_dir):
        renamed = name.replace(".array_record-", ".tfrecord-")
        os.rename(os.path.join(data_dir, name), os.path.join(data_dir, renamed))
    expected = "is built as tfrecord files"
    with pytest.raises(sources.SourceError, match=expected) as error:
        prepare.prepare(data_dir, str(tmp_path / "out"), examples_per_shard=4, num_workers=0)
    assert "--file_format=array_record" in str(error.value)
    assert "Build it first" not in str(error.value)
    with pytest.raises(pipeline.DatasetMissingError, match=expected) as error:
        pipeline.open_tfds(
            data_dir,
            data_dir=None,
            stats_images=2,
            how_to_prepare="(x)",
            cache_dir=str(tmp_path / "cache"),
        )
    assert str(error.value).count(expected) == 1 and "Build it with tfds" not in str(error.value)

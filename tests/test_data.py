import pytest
import torch

from common.errors import ConfigError
from common.data.datasets import load, parse_spec
from common.data.synthetic import generate


def test_synthetic_is_deterministic_and_balanced():
    a_img, a_lab, a_diff = generate(500, seed=3)
    b_img, b_lab, b_diff = generate(500, seed=3)
    assert (a_img == b_img).all() and (a_lab == b_lab).all() and (a_diff == b_diff).all()
    assert a_img.shape == (500, 3, 32, 32) and a_img.dtype.name == "uint8"
    assert set(a_lab.tolist()) == set(range(10))
    assert {0, 1, 2} == set(a_diff.tolist())
    c_img, _, _ = generate(500, seed=4)
    assert not (a_img == c_img).all()


def test_splits_differ():
    val = load("synthetic", "val", limit=100)
    test = load("synthetic:test", "val", limit=100)  # the split in the spec wins
    assert not torch.equal(val.images, test.images)
    assert len(val) == 100 and val.class_names[0] == "class0"


@pytest.mark.parametrize("spec, kind, path, split", [
    ("synthetic", "synthetic", None, None),
    ("synthetic:test", "synthetic", None, "test"),
    ("cifar10:/data/c", "cifar10", "/data/c", None),
    ("imagefolder:/a/b:val", "imagefolder", "/a/b", "val"),
])
def test_parse_spec(spec, kind, path, split):
    s = parse_spec(spec)
    assert (s.kind, str(s.path) if s.path else None, s.split) == (kind, path, split)


@pytest.mark.parametrize("spec", ["mnist", "cifar10", "synthetic:foo", "imagefolder:"])
def test_bad_specs(spec):
    with pytest.raises(ConfigError):
        parse_spec(spec)


def test_cifar_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--download"):
        load(f"cifar10:{tmp_path}", "train")


def _folder(root, classes=("cat", "dog"), n=20, shift=0):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            value = shift + 5 * i + (100 if c == "dog" else 0)
            Image.new("RGB", (32, 32), (value,) * 3).save(root / c / f"{i}.png")


def _keys(part):
    return {(int(img[0, 0, 0]), int(lab)) for img, lab in zip(part.images, part.labels)}


def test_test_partition_does_not_move_with_the_training_seed(tmp_path):
    _folder(tmp_path)
    test0 = load(f"imagefolder:{tmp_path}", "test", seed=0)
    for seed in (1, 2, 3):
        assert _keys(load(f"imagefolder:{tmp_path}", "test", seed=seed)) == _keys(test0)
        train = _keys(load(f"imagefolder:{tmp_path}", "train", seed=seed))
        val = _keys(load(f"imagefolder:{tmp_path}", "val", seed=seed))
        assert not (train & _keys(test0)) and not (val & _keys(test0)) and not (train & val)


def test_imagefolder_with_split_folders(tmp_path):
    _folder(tmp_path / "train", n=10)
    _folder(tmp_path / "val", n=3, shift=1)
    _folder(tmp_path / "test", n=2, shift=2)
    assert len(load(f"imagefolder:{tmp_path}", "train")) == 20
    assert {v % 5 for v, _ in _keys(load(f"imagefolder:{tmp_path}", "val"))} == {1}
    assert {v % 5 for v, _ in _keys(load(f"imagefolder:{tmp_path}", "test"))} == {2}
    # ImageNette's shape: train/ and val/ only -> val/ is the test split, validation is held out of train/.
    (tmp_path / "test").rename(tmp_path / "unused")
    assert {v % 5 for v, _ in _keys(load(f"imagefolder:{tmp_path}", "test"))} == {1}
    assert len(load(f"imagefolder:{tmp_path}", "train")) + len(load(f"imagefolder:{tmp_path}", "val")) == 20


def test_imagefolder_partitions_deterministically(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(20):
            value = 5 * i + (100 if c == "dog" else 0)
            Image.new("RGB", (40, 36) if i % 2 else (32, 32), (value,) * 3).save(tmp_path / c / f"{i}.png")
    parts = {s: load(f"imagefolder:{tmp_path}", s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [32, 4, 4]
    assert parts["train"].class_names == ["cat", "dog"]
    seen = [tuple(img[0, 0, 0].item() + 1000 * lab for img, lab in zip(p.images, p.labels.tolist()))
            for p in parts.values()]
    assert not (set(seen[0]) & set(seen[1])) and not (set(seen[0]) & set(seen[2]))
    again = load(f"imagefolder:{tmp_path}", "val")
    assert torch.equal(again.images, parts["val"].images)


def _write_idx(path, array):
    import gzip

    import numpy as np

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_mnist_from_local_idx_files(tmp_path):
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    train_labels = np.arange(50, dtype=np.uint8) % 10
    _write_idx(raw / "train-images-idx3-ubyte.gz", train_images)  # gzipped, as distributed
    _write_idx(raw / "train-labels-idx1-ubyte", train_labels)
    _write_idx(raw / "t10k-images-idx3-ubyte", train_images[:7])
    _write_idx(raw / "t10k-labels-idx1-ubyte", train_labels[:7])
    train = load(f"mnist:{tmp_path}", "train")
    val = load(f"mnist:{tmp_path}", "val")
    test = load(f"mnist:{tmp_path}", "test")
    assert train.images.shape == (45, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(val) == 5 and len(test) == 7 and train.class_names == [str(d) for d in range(10)]
    # Every training image is one of the file's images with its own label; validation is held out of them.
    for img, lab in zip(train.images, train.labels):
        (i,) = [k for k in range(50) if (train_images[k] == img[0].numpy()).all()]
        assert train_labels[i] == lab
    assert torch.equal(test.images[:, 0], torch.from_numpy(train_images[:7]))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09" + bytes(3))
    with pytest.raises(ConfigError, match="header promises"):
        load(f"mnist:{tmp_path}", "test")
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        load(f"mnist:{tmp_path / 'nowhere'}", "train")


def test_imagenette_is_read_at_224_with_the_imagenet_centre_crop(tmp_path):
    from PIL import Image

    from common.data.datasets import normalization

    for split in ("train", "val"):
        for c in ("tench", "church"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                # 400 x 300 image with a white frame (30 px left and right, 15 px top and bottom): resizing to 256
                # and cropping 224 keeps only its middle 332 x 262 pixels, so none of the frame survives.
                im = Image.new("RGB", (400, 300), (255, 255, 255))
                im.paste((10 * i, 50, 90), (30, 15, 370, 285))
                im.save(tmp_path / split / c / f"{i}.png")
    test = load(f"imagenette:{tmp_path}", "test")
    assert test.images.shape == (6, 3, 224, 224)
    assert int(test.images[:, 1].max()) < 60  # no white border left
    assert load(f"imagenette:{tmp_path}", "test", image_size=64).images.shape[-1] == 64
    assert normalization(f"imagenette:{tmp_path}") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization("mnist:/x") == ((0.1307,), (0.3081,))
    assert normalization("synthetic")[0] == (0.4914, 0.4822, 0.4465)  # unchanged for the existing data

"""predict.py: folders of mixed sizes, a corrupt file, videos, and agreement with eval.py."""
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as eval_script
import predict
from dataset.common import DatasetError
from dataset.labels import LABELS, NUM_CLASSES
from dataset.normalization import get_normalization
from model import bisenet_checkpoint_entry, build_bisenet, load_bisenet
from utils.checkpoint import CHECKPOINT_FORMAT

av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
# (name, height, width): two images of one size (one batch at --batch-size 2), odd sizes, a sub-folder.
IMAGES = (("a.png", 32, 64), ("a2.png", 32, 64), ("b.jpg", 40, 50), ("sub/c.png", 17, 33))
COLOUR_OF_TRAIN_ID = {label.train_id: label.color for label in LABELS if label.train_id < NUM_CLASSES}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained BiSeNet (seed 1): it predicts several classes, so mix-ups show."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("predict_checkpoint") / "untrained.pth"
    torch.save({"format": CHECKPOINT_FORMAT, **bisenet_checkpoint_entry(build_bisenet("resnet18", NUM_CLASSES),
                                                                        "imagenet")}, path)
    return path


@pytest.fixture
def folder(tmp_path):
    """IMAGES as random pictures, a truncated PNG (bad.png) and a text file that is no image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    for name, height, width in IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)
    whole = (root / "a.png").read_bytes()
    (root / "bad.png").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    (root / "notes.txt").write_text("not an image\n")
    return root


def run(checkpoint, *flags):
    return predict.main(predict.get_args(["--checkpoint", str(checkpoint), "--workers", "0", "--no-progress",
                                          *map(str, flags)]))


@pytest.fixture(scope="module")
def network(checkpoint):
    return load_bisenet(checkpoint)


def reference_train_ids(network, image):
    """The network on the image padded with black to a multiple of 32, cropped back (by hand)."""
    height, width = image.shape[:2]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    pixels = F.pad(pixels, (0, -width % 32, 0, -height % 32), value=0)
    with torch.no_grad():
        logits = network(get_normalization("imagenet", "cityscapes").normalize_tensor(pixels))
    return logits[0, :, :height, :width].argmax(0).numpy()


def read(path):
    with Image.open(path) as image:
        return np.array(image)


def test_a_corrupt_file_stops_with_its_name_and_keeps_what_was_written(checkpoint, folder, tmp_path):
    out = tmp_path / "out"
    (out / "color").mkdir(parents=True)
    (out / "color" / "earlier.png").write_bytes(b"an earlier result")
    process = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(checkpoint), "--input",
                              str(folder), "--output-dir", str(out), "--workers", "0", "--no-progress"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2, process.stderr
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(folder / "bad.png") in errors[0] and "--skip-bad" in errors[0]
    assert "Traceback" not in process.stderr
    # Sorted order: a, a2, b come before bad.png; they stay written, and so does the earlier file.
    for name in ("a", "a2", "b"):
        assert all((out / kind / f"{name}.png").is_file() for kind in ("color", "overlay", "labels")), name
    assert not (out / "labels" / "sub").exists()
    assert (out / "color" / "earlier.png").read_bytes() == b"an earlier result"
    assert not [path for path in out.rglob("*") if path.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("batch_size", [1, 2])
def test_mixed_sizes_are_predicted_at_their_own_size(checkpoint, network, folder, tmp_path, batch_size):
    out = tmp_path / "out"
    summary = run(checkpoint, "--input", folder, "--output-dir", out, "--skip-bad", "--alpha", "0.25",
                  "--batch-size", batch_size)
    assert summary["images"] == len(IMAGES)
    assert summary["skipped"] == [str(folder / "bad.png")]
    assert not (out / "labels" / "notes.png").exists()
    for name, height, width in IMAGES:
        stem = Path(name).with_suffix("").as_posix()
        image = read(folder / name)
        labels = read(out / "labels" / f"{stem}.png")
        assert labels.shape == (height, width)
        # The padded prediction is the network's on the black-padded image, cropped back.
        expected = reference_train_ids(network, image)
        assert (labels == expected).mean() >= 0.999, stem
        # Colours from the official label table; the overlay blends a quarter of them in.
        colours = np.array([COLOUR_OF_TRAIN_ID[int(train_id)] for train_id in labels.reshape(-1)], np.uint8)
        color = read(out / "color" / f"{stem}.png")
        np.testing.assert_array_equal(color.reshape(-1, 3), colours)
        blend = np.rint(0.75 * image.astype(np.float64) + 0.25 * color.astype(np.float64))
        assert np.abs(read(out / "overlay" / f"{stem}.png").astype(np.int16) - blend).max() <= 1
    assert len(np.unique(read(out / "labels" / "a.png"))) > 1  # several classes: a wrong mapping would show


def test_glob_and_single_image_inputs(checkpoint, folder, tmp_path):
    summary = run(checkpoint, "--input", str(folder / "**" / "*.png"), "--output-dir", tmp_path / "glob",
                  "--skip-bad", "--outputs", "labels")
    assert summary["images"] == 3  # a, a2, sub/c (b is a JPEG)
    assert (tmp_path / "glob" / "labels" / "sub" / "c.png").is_file()
    assert not (tmp_path / "glob" / "color").exists()
    # An output folder inside the input folder is not read as input on the next run.
    for _ in range(2):
        summary = run(checkpoint, "--input", folder, "--output-dir", folder / "results", "--skip-bad",
                      "--outputs", "labels")
        assert summary["images"] == len(IMAGES)
    (folder / "a.jpg").write_bytes((folder / "b.jpg").read_bytes())
    with pytest.raises(DatasetError, match="a.jpg.*a.png|a.png.*a.jpg"):  # both would write labels/a.png
        run(checkpoint, "--input", folder, "--output-dir", tmp_path / "clash")
    run(checkpoint, "--input", folder / "b.jpg", "--output-dir", tmp_path / "one", "--ids", "cityscapes")
    ids = read(tmp_path / "one" / "labels" / "b.png")
    assert set(np.unique(ids)) <= {label.id for label in LABELS if label.train_id < NUM_CLASSES}


def test_teacher_network_and_its_input_convention_come_from_the_checkpoint(folder, tmp_path):
    """--network teacher picks the MPL teacher, and its recorded course convention is applied."""
    torch.manual_seed(2)
    student, teacher = build_bisenet("resnet18", NUM_CLASSES), build_bisenet("resnet18", NUM_CLASSES)
    checkpoint = tmp_path / "mpl.pth"
    torch.save({"format": CHECKPOINT_FORMAT, **bisenet_checkpoint_entry(student, "imagenet"),
                **bisenet_checkpoint_entry(teacher, "course", key="teacher")}, checkpoint)
    run(checkpoint, "--input", folder / "b.jpg", "--output-dir", tmp_path / "out", "--network", "teacher",
        "--outputs", "labels")
    image = read(folder / "b.jpg")
    pixels = F.pad(torch.from_numpy(image).permute(2, 0, 1)[None], (0, -50 % 32, 0, -40 % 32), value=0)
    with torch.no_grad():  # the course convention: BGR, the Cityscapes mean subtracted, no std
        bgr = pixels.float().flip(1) - torch.tensor([73.16, 82.91, 72.39]).view(1, 3, 1, 1)
        expected = teacher.eval()(bgr)[0, :, :40, :50].argmax(0).numpy()
    assert (read(tmp_path / "out" / "labels" / "b.png") == expected).mean() >= 0.999


@pytest.mark.parametrize("size", [None, "32x16"])
def test_label_pngs_equal_eval_predictions(checkpoint, tiny_data_root, tmp_path, size):
    """--ids cityscapes writes what eval.py --save-predictions writes, at the image's size or resized."""
    sizes = ["--eval-size", size] if size else []
    eval_script.main(eval_script.get_args(["--checkpoint", str(checkpoint), "--data-root", str(tiny_data_root),
                                           "--target-size", "64x32", "--workers", "0", "--no-progress",
                                           "--output-dir", str(tmp_path / "eval"),
                                           "--save-predictions", str(tmp_path / "eval_png"), *sizes]))
    val = tiny_data_root / "Cityscapes" / "leftImg8bit" / "val"
    run(checkpoint, "--input", val, "--output-dir", tmp_path / "out", "--ids", "cityscapes", "--batch-size", 2,
        *(["--size", size] if size else []))
    official = sorted((tmp_path / "eval_png" / "cityscapes_results").glob("*.png"))
    assert len(official) == 3
    for path in official:
        ours = tmp_path / "out" / "labels" / "city" / path.name
        np.testing.assert_array_equal(read(ours), read(path))
        eval_color = tmp_path / "eval_png" / "color" / "city" / path.name.replace("_leftImg8bit", "_color")
        np.testing.assert_array_equal(read(tmp_path / "out" / "color" / "city" / path.name), read(eval_color))


def write_video(path, frames, rate):
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=rate)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "yuv420p"
    for frame in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode(None))
    container.close()


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, stream.average_rate


def test_video_keeps_frame_count_size_and_rate(checkpoint, network, tmp_path):
    rng = np.random.default_rng(0)
    rate = Fraction(30000, 1001)  # NTSC: a rate that is no integer
    frames = [np.repeat(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), 4, axis=0).repeat(4, axis=1)
              for _ in range(7)]  # 64x48, blocky so the codec keeps it close
    video = tmp_path / "clip.mp4"
    write_video(video, frames, rate)
    out = tmp_path / "out"
    summary = run(checkpoint, "--input", video, "--output-dir", out, "--batch-size", 3,
                  "--outputs", "color", "overlay", "labels")  # 7 frames: batches of 3, 3 and 1
    assert summary["frames"] == 7 and summary["frames_per_s"] > 0
    for kind in ("color", "overlay"):
        written, written_rate = decode(out / f"clip_{kind}.mp4")
        assert len(written) == 7 and written_rate == rate
        assert written[0].shape == (48, 64, 3)
    # Frame i's labels are the prediction of the decoded frame i, in order.
    decoded, _ = decode(video)
    for index in (0, 3, 6):
        expected = reference_train_ids(network, decoded[index])
        assert (read(out / "labels" / "clip" / f"{index:06d}.png") == expected).mean() >= 0.999, index
    # The colour video shows the label colours (H.264 at CRF 18 moves them a little).
    first_color, _ = decode(out / "clip_color.mp4")
    palette_image = np.array([COLOUR_OF_TRAIN_ID[int(t)] for t in read(out / "labels" / "clip" / "000000.png").ravel()])
    assert np.abs(first_color[0].reshape(-1, 3).astype(int) - palette_image).mean() < 8


def test_odd_sized_video_keeps_its_size(checkpoint, tmp_path):
    from dataset.video import VideoWriter

    writer = VideoWriter(tmp_path / "odd.mp4", 12, 33, 17)  # yuv420p cannot hold odd sizes
    for value in (0, 120, 240):
        writer.write(np.full((17, 33, 3), value, np.uint8))
    writer.close()
    run(checkpoint, "--input", tmp_path / "odd.mp4", "--output-dir", tmp_path / "out", "--outputs", "overlay")
    written, rate = decode(tmp_path / "out" / "odd_overlay.mp4")
    assert (len(written), written[0].shape, rate) == (3, (17, 33, 3), 12)
    assert not (tmp_path / "out" / "odd_color.mp4").exists()


@pytest.mark.parametrize("case, message", [
    ("empty folder", "no image files"),
    ("text file", "neither an image"),
    ("empty image", "cannot read image file"),
    ("unmatched glob", "matches no image files"),
    ("broken video", "cannot read video"),
    ("missing", "no such file or folder"),
    ("output is a file", "is a file; expected a folder"),
])
def test_bad_inputs_give_one_clear_error_and_lose_nothing(checkpoint, tmp_path, case, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip_color.mp4").write_bytes(b"an earlier video")
    inputs = {"empty folder": tmp_path / "empty", "text file": tmp_path / "notes.txt",
              "empty image": tmp_path / "empty.png", "unmatched glob": tmp_path / "*.jpg",
              "broken video": tmp_path / "clip.mp4", "missing": tmp_path / "nothing.png",
              "output is a file": tmp_path / "empty.png"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    output = tmp_path / "notes.txt" if case == "output is a file" else out
    with pytest.raises(DatasetError, match=message) as error:
        run(checkpoint, "--input", inputs[case], "--output-dir", output)
    assert "\n" not in str(error.value)
    assert (out / "clip_color.mp4").read_bytes() == b"an earlier video"
    assert (tmp_path / "notes.txt").read_text() == "hello\n"
    assert sorted(path.name for path in out.iterdir()) == ["clip_color.mp4"]  # no temporary files left

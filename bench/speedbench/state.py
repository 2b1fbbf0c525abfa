"""The state the sections share: synthetic scenes and inputs, briefly trained weights, strict fp32
references for the agreement check, and the PNG files of the real sizes for the loader entries."""
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset.labels import ID_TO_TRAINID, LABELS
from dataset.normalization import get_normalization
from model import build_bisenet
from engine.steps import supervised_step
from engine.optim import build_optimizer
from engine.precision import Precision

from .common import cudnn_flags, size_text, strict_fp32, synchronize
from .config import IMAGE_NOISE, PREP_LR


class Bench:
    def __init__(self, args, profile, device):
        self.args, self.profile, self.device = args, profile, device
        self.cuda = device.type == "cuda"
        self.normalization = get_normalization("imagenet", "cityscapes")
        self._scenes = {}
        self._weights = {}
        self._models = {}
        self._references = {}
        self._structured = {}
        self._train_batch = None
        self._files = None
        self._tempdir = None
        self.results = None  # the Recorder's result dict, for entries that read earlier ones

    # ---- scenes (dataset.synthetic: procedural street scenes with Cityscapes id labels) -------
    def scenes(self, domain, count):
        """``count`` (image uint8 HxWx3, label ids uint8 HxW) scenes of the synthetic benchmark."""
        from dataset.synthetic import render_sample

        have = self._scenes.setdefault(domain, [])
        while len(have) < count:
            have.append(render_sample(domain, seed=0, split="train", index=len(have)))
        return have[:count]

    def scene_batch(self, domain, count, size_hw, channels_last=False):
        """(images float32 [B, 3, H, W] normalised, labels int64 [B, H, W] trainIds) on the device."""
        height, width = size_hw
        images, labels = [], []
        for image, label in self.scenes(domain, count):
            image = np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))
            images.append(self.normalization(image))
            labels.append(torch.from_numpy(ID_TO_TRAINID[label].astype(np.int64)))
        images = torch.stack(images).to(self.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, torch.stack(labels).to(self.device)

    def structured(self, size_hw, batch):
        """The fixed structured input of the agreement check (target scenes, NCHW)."""
        key = (tuple(size_hw), batch)
        if key not in self._structured:
            self._structured[key] = self.scene_batch("target", batch, size_hw)[0]
        return self._structured[key]

    def train_batch(self):
        """Fixed source images + labels and target images at the profile's training sizes."""
        if self._train_batch is None:
            p = self.profile
            source, labels = self.scene_batch("source", p.train_batch, p.train_source)
            target, _ = self.scene_batch("target", p.train_batch, p.train_target)
            self._train_batch = (source, labels, target)
        return self._train_batch

    # ---- weights ---------------------------------------------------------------------------
    def weights(self, context_path):
        """State dict of a BiSeNet for ``context_path``: --checkpoint, or briefly trained."""
        if context_path in self._weights:
            return self._weights[context_path]
        info = {"source": None}
        if self.args.checkpoint:
            from model import load_bisenet

            loaded = load_bisenet(self.args.checkpoint, map_location="cpu")
            if loaded.context_path_name == context_path:
                convention = loaded.checkpoint_info.get("input_convention") or "imagenet"
                self.normalization = get_normalization(convention, "cityscapes")
                self._weights[context_path] = ({k: v.clone() for k, v in loaded.state_dict().items()},
                                               {"source": f"checkpoint {self.args.checkpoint}",
                                                "input_convention": convention})
                return self._weights[context_path]
        p = self.profile
        torch.manual_seed(0)
        model = build_bisenet(context_path).to(self.device).train()
        optimizer = build_optimizer("sgd", model.parameters(), PREP_LR)
        precision = Precision(self.device, "auto")
        scaler = precision.grad_scaler()
        # Trained on source-like scenes, checked on target-like ones: predictions as unsure as a
        # GTA5-trained model's on Cityscapes, not the over-confident ones of its own training images.
        images, labels = self.scene_batch("source", max(p.prep_batch, 2), p.prep_size)
        started = time.perf_counter()
        losses = []
        with cudnn_flags(benchmark=self.cuda):
            for step in range(p.prep_steps):
                losses.append(supervised_step(model, optimizer, scaler, precision, images, labels)["loss_seg"])
        synchronize(self.device)
        info.update(source=f"random init + {p.prep_steps} supervised steps on {len(images)} synthetic source scenes "
                           f"at {size_text(p.prep_size)} (precision {precision.mode}, SGD lr {PREP_LR})",
                    first_loss=float(losses[0]) if losses else None, last_loss=float(losses[-1]) if losses else None,
                    seconds=time.perf_counter() - started)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        del model, optimizer
        self._weights[context_path] = (state, info)
        return self._weights[context_path]

    def model(self, context_path, channels_last=False):
        """Eval-mode BiSeNet with the prepared weights, on the device, NCHW or channels_last."""
        key = (context_path, channels_last)
        if key not in self._models:
            state, _ = self.weights(context_path)
            model = build_bisenet(context_path)
            model.load_state_dict(state)
            model = model.to(self.device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            self._models[key] = model.eval()
        return self._models[key]

    @torch.no_grad()
    def reference(self, context_path, size_hw, batch):
        """Strict fp32 eager argmax on the structured batch, and the share of near-tied pixels."""
        key = (context_path, tuple(size_hw), batch)
        if key not in self._references:
            model = self.model(context_path)
            with strict_fp32():
                logits = model(self.structured(size_hw, batch)).float()
            top2 = logits.topk(2, dim=1).values
            ambiguous = float(((top2[:, 0] - top2[:, 1]) < 1e-2).float().mean())
            self._references[key] = (logits.argmax(1), ambiguous)
            del logits, top2
        return self._references[key]

    @torch.no_grad()
    def agreement(self, context_path, size_hw, batch, network, precision, channels_last):
        reference, ambiguous = self.reference(context_path, size_hw, batch)
        images = self.structured(size_hw, batch)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            prediction = network(images).argmax(1)
        return {"agreement": float((prediction == reference).float().mean()),
                "reference_near_ties": ambiguous}

    # ---- PNG files of the real sizes for the loader measurements ---------------------------
    def loader_files(self):
        """GTA5 (images + palette labels) and Cityscapes (official layout) PNGs at the real sizes."""
        if self._files is not None:
            return self._files
        p = self.profile
        if self.args.data_dir:
            root = Path(self.args.data_dir)
        else:
            self._tempdir = tempfile.mkdtemp(prefix="speed_bench_")
            root = Path(self._tempdir)
        gta_images, gta_labels = root / "GTA5" / "images", root / "GTA5" / "labels"
        city = "benchcity"
        cs_images = root / "Cityscapes" / "leftImg8bit" / "train" / city
        cs_labels = root / "Cityscapes" / "gtFine" / "train" / city
        for folder in (gta_images, gta_labels, cs_images, cs_labels):
            folder.mkdir(parents=True, exist_ok=True)
        palette = np.zeros((256, 3), np.uint8)
        for label in LABELS:
            palette[label.id] = label.color
        jobs = []
        for index in range(p.loader_images):
            name = f"{index + 1:05d}.png"
            jobs.append(("source", index, p.gta5_file, gta_images / name, gta_labels / name, palette))
        for index in range(p.loader_images):
            stem = f"{city}_{index:06d}_000019"
            jobs.append(("target", index, p.cityscapes_file, cs_images / f"{stem}_leftImg8bit.png",
                         cs_labels / f"{stem}_gtFine_labelIds.png", None))
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(_write_scene_pngs, jobs))
        sizes = {"gta5": [p_.stat().st_size for p_ in gta_images.glob("*.png")],
                 "cityscapes": [p_.stat().st_size for p_ in cs_images.glob("*.png")]}
        self._files = {
            "root": str(root), "gta5": str(root / "GTA5"), "cityscapes": str(root / "Cityscapes"),
            "images_per_domain": p.loader_images, "generation_s": time.perf_counter() - started,
            "gta5_file_size": size_text(p.gta5_file), "cityscapes_file_size": size_text(p.cityscapes_file),
            "mean_image_mb": {k: float(np.mean(v)) / 1e6 for k, v in sizes.items()},
            "note": "synthetic street scenes upsampled to the real file sizes plus sensor noise "
                    f"(sigma {IMAGE_NOISE}); real leftImg8bit PNGs are about 2-2.5 MB",
        }
        return self._files

    def weights_info(self):
        """Where each context path's weights came from (the JSON's ``weights``)."""
        return {context_path: info for context_path, (_, info) in self._weights.items()}

    def close(self):
        if self._tempdir and not self.args.keep_data:
            shutil.rmtree(self._tempdir, ignore_errors=True)


def _write_scene_pngs(job):
    """Render one synthetic scene, upsample it to the real file size, add noise, write image + label."""
    from dataset.synthetic import render_sample

    domain, index, size_hw, image_path, label_path, palette = job
    image, label = render_sample(domain, seed=0, split="train", index=index)
    height, width = size_hw
    rng = np.random.default_rng(index)
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR), np.float32)
    image = np.clip(image + rng.normal(0.0, IMAGE_NOISE, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(image_path)
    label = Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST)
    if palette is not None:  # GTA5 ships palette PNGs whose indices are the ids
        label = label.convert("P")
        label.putpalette(palette.reshape(-1).tolist())
    label.save(label_path)

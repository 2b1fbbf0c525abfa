"""Section ``loader``: images/s of the project's datasets + transforms (decode, id -> trainId remap,
resize, flip, normalise) on PNGs of the real sizes, in one process and with DataLoader workers."""
import os
import time

from .common import Job, RepeatedDataset, bind, size_text


def loader_jobs(bench, recorder):
    from dataset.cityscapes import CityscapesDataset
    from dataset.gta5 import GTA5Dataset
    from dataset.transforms import train_transform
    from engine.data import BatchStream

    p = bench.profile
    workers = min(16, os.cpu_count() or 1)

    def dataset(domain):
        files = bench.loader_files()
        if domain == "gta5":
            return GTA5Dataset(files["gta5"], transform=train_transform(p.gta5_size, resize_hw=p.gta5_size))
        return CityscapesDataset(files["cityscapes"], split="train", labeled=True,
                                 transform=train_transform(p.cityscapes_size, resize_hw=p.cityscapes_size))

    def one_process(domain):
        data = dataset(domain)
        data.load(0)  # first file read: page cache, imports
        started = time.perf_counter()
        for index in range(len(data)):
            data.load(index)
        elapsed = time.perf_counter() - started
        return {"images_per_s": len(data) / elapsed, "ms_per_image": 1e3 * elapsed / len(data), "images": len(data),
                "files": bench.loader_files()}

    def with_workers(domain):
        data = dataset(domain)
        repeats = max(1, (p.loader_batches + 1) * p.loader_batch // len(data) + 1)
        stream = BatchStream(RepeatedDataset(data, repeats), p.loader_batch, seed=0, num_workers=workers,
                             pin_memory=bench.cuda)
        started = time.perf_counter()
        next(stream)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(p.loader_batches):
            next(stream)
        elapsed = time.perf_counter() - started
        del stream
        return {"images_per_s": p.loader_batches * p.loader_batch / elapsed, "first_batch_s": first_s,
                "workers": workers, "batch_size": p.loader_batch, "batches": p.loader_batches,
                "pin_memory": bench.cuda}

    jobs = []
    for domain, file_hw, size_hw in (("gta5", p.gta5_file, p.gta5_size), ("cityscapes", p.cityscapes_file,
                                                                           p.cityscapes_size)):
        what = f"{'GTA5' if domain == 'gta5' else 'Cityscapes'} {size_text(file_hw)} -> {size_text(size_hw)}"
        settings = {"file_size": size_text(file_hw), "output_size": size_text(size_hw),
                    "pipeline": "PNG decode + label LUT remap + resize + flip + normalise (dataset classes)",
                    "labels": "read and remapped"}
        jobs.append(Job("loader", f"{domain}/1", f"{what}, one process (no workers)", bind(one_process, domain),
                        settings=settings, cost_s=10))
        jobs.append(Job("loader", f"{domain}/workers", f"{what}, BatchStream with {workers} workers",
                        bind(with_workers, domain), settings={**settings, "workers": workers}, cost_s=10))
    return jobs

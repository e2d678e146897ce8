"""Input pipeline throughput: images/s of the grain loaders with 0, 1, 2 worker processes.

    python -m benchmarks.input_pipeline --old-commit 9f39074
    python -m benchmarks.input_pipeline --tiny

Two datasets, each through the paper's training augmentation:

* ``cifar``: random 32x32 uint8 images in memory (:class:`ArraySource`, as
  the CIFAR folders load), pad-crop-flip-normalise.
* ``imagenet``: ``--images`` JPEGs of 500x375 (smooth random colour fields
  with noise, about ImageNet's bytes per image) written into one ArrayRecord
  file and read back with ``grain.sources.ArrayRecordDataSource``; each
  example is decoded with PIL where grain runs the pipeline (the worker
  processes), then random-resized-cropped to 224, flipped and normalised.
  (tfds' own ArrayRecord files hold TensorFlow protos, which need
  TensorFlow to write; the decode-and-augment work is the same.)

Each rate is the median over ``--repeats`` fresh iterators of ``--batches``
batches read back to back, timed from the first batch (worker start-up,
reported apart, excluded). ``wait_ms`` is the mean time per batch the
consumer then spent blocked on data while it "trained" for ``--step-ms`` per
batch (a sleep: an accelerator step leaves the CPU free). With ``--old-commit REV`` the pre-grain loader of that
commit (a background thread, batch-vectorised numpy) is measured in the same
run, single-threaded (``prefetch=0``) and with its thread (``prefetch=2``).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from sfpk_jax.data import ArraySource, Loader, cifar_transforms, imagenet_train

ROOT = Path(__file__).resolve().parents[1]


class JpegRecords:
    """An ArrayRecord file of ``label (4 bytes) + JPEG`` records, decoded on read.

    Picklable (grain sends it to its workers), like the ArrayRecord source inside.
    """

    def __init__(self, path: str):
        self.records = grain.sources.ArrayRecordDataSource(path)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[int(index)]
        image = np.asarray(Image.open(io.BytesIO(record[4:])).convert("RGB"))
        return {"image": image, "label": np.int32(int.from_bytes(record[:4], "little"))}


def write_jpegs(path: str, count: int, size: tuple[int, int], seed: int = 0) -> float:
    """Writes ``count`` JPEGs of ``size`` (width, height) into an ArrayRecord file.

    Returns:
      The mean JPEG size in KB.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    writer = ArrayRecordWriter(path, "group_size:1")
    total = 0
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
        noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
        total += buffer.tell()
        writer.write(int(i % 1000).to_bytes(4, "little") + buffer.getvalue())
    writer.close()
    return total / count / 1024


def _measure(make_iter, batches: int, step_ms: float) -> tuple[float, float, float]:
    """``(images/s, start-up s, wait ms per batch)`` of a fresh iterator.

    The rate is of ``batches`` batches read back to back after the first
    (whose time, the start-up, is reported apart); then, with a sleep of
    ``step_ms`` after each batch for the model's step, the time spent blocked
    in ``next`` over ``batches`` more batches.
    """
    start = time.perf_counter()
    it = make_iter()
    size = len(next(it)["label"])
    startup = time.perf_counter() - start
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = size * batches / (time.perf_counter() - t0)
    waited = 0.0
    for _ in range(batches):
        time.sleep(step_ms / 1000)
        w0 = time.perf_counter()
        next(it)
        waited += time.perf_counter() - w0
    if hasattr(it, "close"):
        it.close()
    return rate, startup, 1000 * waited / batches


def _median(runs: list[tuple[float, float, float]]) -> dict:
    return {"images_s": statistics.median(r[0] for r in runs), "startup_s": statistics.median(r[1] for r in runs),
            "wait_ms": statistics.median(r[2] for r in runs)}


def _old_modules(rev: str):
    """The pre-grain ``pipeline`` and ``augment`` modules of commit ``rev`` (via ``git show``)."""
    folder = Path(tempfile.mkdtemp(prefix="old-pipeline-"))
    modules = {}
    for name in ("augment", "pipeline"):
        text = subprocess.run(["git", "show", f"{rev}:sfpk_jax/data/{name}.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from sfpk_jax.data.augment import", "from old_augment import")
        (folder / f"old_{name}.py").write_text(text)
        spec = importlib.util.spec_from_file_location(f"old_{name}", folder / f"old_{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"old_{name}"] = modules[name]
        spec.loader.exec_module(modules[name])
    return modules["pipeline"], modules["augment"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few small batches: runs in seconds")
    parser.add_argument("--images", type=int, default=600, help="ImageNet-sized JPEGs generated")
    parser.add_argument("--cifar", type=int, default=20000, help="CIFAR-sized images in memory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per pass (ImageNet)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--step-ms", type=float, default=5.0, help="simulated model step per batch")
    parser.add_argument("--old-commit", default=None, help="also measure the loader of this commit")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.cifar, args.batches, args.repeats, args.batch_size = 40, 512, 2, 1, 8
    workers = [int(w) for w in args.workers.split(",")]
    # Each pass reads 2 * batches + 1 batches of one epoch.
    cifar_batches = min((args.cifar // args.batch_size - 1) // 2, 30 * args.batches)
    if args.images // args.batch_size < 2 * args.batches + 1:
        parser.error(f"--images must give at least {2 * args.batches + 1} batches of --batch-size")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "imagenet.array_record")
        size = (125, 94) if args.tiny else (500, 375)
        kb = write_jpegs(path, args.images, size)
        rng = np.random.default_rng(0)
        cifar = ArraySource(rng.integers(0, 256, (args.cifar, 32, 32, 3), dtype=np.uint8),
                            rng.integers(0, 100, args.cifar))
        cifar_train, _ = cifar_transforms("cifar100")
        datasets = {"imagenet": (JpegRecords(path), imagenet_train, args.batches),
                    "cifar": (cifar, cifar_train, cifar_batches)}
        report = {"batch_size": args.batch_size, "jpeg_kb": round(kb, 1), "step_ms": args.step_ms,
                  "cpus": os.cpu_count(), "load_average": os.getloadavg()}
        detail = {}
        for name, (source, transform, batches) in datasets.items():
            for w in workers:
                runs = [_measure(lambda e=e: Loader(source, args.batch_size, transform=transform, seed=0,
                                                    workers=w).epoch(e), batches, args.step_ms)
                        for e in range(args.repeats)]
                detail[f"{name}/{w}"] = _median(runs)
                print(f"{name:8s} workers={w}: {detail[f'{name}/{w}']}", flush=True)
        if args.old_commit:
            old, old_augment = _old_modules(args.old_commit)
            old_transforms = {"imagenet": old_augment.imagenet_train,
                              "cifar": old_augment.cifar_transforms("cifar100")[0]}
            for name, (source, _, batches) in datasets.items():
                for prefetch in (0, 2):
                    loader = old.Loader(source, args.batch_size, transform=old_transforms[name], seed=0,
                                        prefetch=prefetch)
                    runs = [_measure(lambda e=e: loader.epoch(e), batches, args.step_ms)
                            for e in range(args.repeats)]
                    detail[f"old:{name}/prefetch{prefetch}"] = _median(runs)
                    print(f"old {name:8s} prefetch={prefetch}: {detail[f'old:{name}/prefetch{prefetch}']}",
                          flush=True)
    for name in datasets:
        report[name] = {str(w): round(detail[f"{name}/{w}"]["images_s"], 1) for w in workers}
        report[f"{name}_wait_ms"] = {str(w): round(detail[f"{name}/{w}"]["wait_ms"], 2) for w in workers}
        report[f"{name}_startup_s"] = {str(w): round(detail[f"{name}/{w}"]["startup_s"], 2) for w in workers}
        if args.old_commit:
            report[f"old_{name}"] = {f"prefetch{p}": round(detail[f"old:{name}/prefetch{p}"]["images_s"], 1)
                                     for p in (0, 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()

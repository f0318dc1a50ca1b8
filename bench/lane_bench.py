"""What the Lambda lane costs a photo: the worker's CPU path timed per image, its cold start, both projected to Lambda.

The Lambda lane (issue 23) embeds a small dispatcher batch on a function's vCPUs with the worker's
own code: each photo decoded and preprocessed (`ClipModel.prepare`), then the image tower on
batches (`ClipModel.embed`, as `clip_worker.embed` runs it). On real photos (scikit-image's, as
bench/worker_bench.py), for each model with seeded random weights (the architecture and the cost of
the real ones; nothing can be downloaded here):

(1) per image, at 1 and 2 torch threads: CPU seconds (the process's time, all its threads) and
    wall seconds of preparing a photo, on as many threads as torch has (in this process: what the
    worker's sandbox adds, 1-3 ms an image by worker_bench's (c), the projection adds), and of the
    forward pass on one batch of the model's photos;
(2) the cold start, in a fresh process per model, as a function's INIT and first invocation would
    run: the imports, the decoding sandbox's helpers started as `runner.run` starts them,
    `clip_worker.model.load` from a checkpoint file saved here (open_clip's file path; naming the
    weights by the file's SHA-256, which a baked tag does not pay, timed apart), and a first batch of
    10 photos through the sandbox and the model; wall and CPU seconds of each phase, the helpers'
    CPU included;

and projects their CPU seconds (a shared machine's walls are its neighbours') to Lambda's CPU share
at 3,008 and 10,240 MB (`project`, which bench/cost_bench.py prices the lane with; docs/benchmarks.md,
"Lambda lane", writes the derivation out).

    python -m bench.lane_bench --repeats 3 --json bench/out/lane.json   # the recorded run: ~8 minutes on 2 cores
    python -m bench.lane_bench --quick                        # a smoke run
    python -m bench.lane_bench --models ViT-B-32 --no-cold    # per image only

Only the standard library is imported here at module level: the same module runs the cold start's
fresh process (`--cold-child`), where every import is part of what is measured.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402 - after the clock starts: the cold child's imports are measured from it
import json  # noqa: E402 - after the clock starts, as everything here
import math  # noqa: E402 - after the clock starts, as everything here
import os  # noqa: E402 - after the clock starts, as everything here
import resource  # noqa: E402 - after the clock starts, as everything here
import subprocess  # noqa: E402 - after the clock starts, as everything here
import sys  # noqa: E402 - after the clock starts, as everything here
import tempfile  # noqa: E402 - after the clock starts, as everything here
from concurrent.futures import ThreadPoolExecutor  # noqa: E402 - after the clock starts, as everything here
from dataclasses import asdict, dataclass, fields  # noqa: E402 - after the clock starts, as everything here
from pathlib import Path  # noqa: E402 - after the clock starts, as everything here
from typing import TYPE_CHECKING, Any  # noqa: E402 - after the clock starts, as everything here

from bench.cold_child import peak_rss_mb, stopwatch, time_imports  # noqa: E402 - after the clock starts, as everything here

if TYPE_CHECKING:
    from clip_worker.model import ClipModel

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
#: Photos per model for (1): ViT-L-14 takes seconds an image on one core, so it gets few.
IMAGES = {"ViT-B-32": 32, "ViT-B-16": 16, "ViT-L-14": 4}
DEFAULT_IMAGES = 8
#: A phone's 12 MP photo (what the projection prices: decoding scales with the photo, the model does
#: not) and a small web image.
SIZES = ((4000, 3000), (640, 480))
QUICK_SIZES = ((640, 480),)
FIRST_BATCH = 10
THREADS = (1, 2)
#: What the worker's decoding sandbox adds per image (pickling the bytes and the tensor over pipes):
#: worker_bench's (c), 1-3 ms a photo (docs/benchmarks.md); the projection counts the most.
SANDBOX_S_PER_IMAGE = 0.003
#: Lambda: one vCPU's worth of CPU time at 1,769 MB, in proportion to memory, at most 6 vCPUs
#: (https://docs.aws.amazon.com/lambda/latest/dg/configuration-memory.html).
LAMBDA_MB_PER_VCPU = 1769
LAMBDA_MAX_VCPUS = 6
LAMBDA_MEMORIES_MB = (3008, 10240)
#: The cold child's imports, group by group: what the worker's code path loads.
IMPORT_GROUPS = (
    ("torch", "import torch"),
    ("torchvision", "import torchvision"),
    ("open_clip", "import open_clip"),
    ("numpy, pyarrow", "import numpy, pyarrow, pyarrow.parquet"),
    ("Pillow", "import PIL.Image"),
    ("boto3", "import boto3"),
    ("clip_worker", "import clip_worker.runner, clip_worker.model, clip_worker.sandbox"),
)


@dataclass(frozen=True)
class PerImage:
    """Seconds per image of one step at one thread count: CPU (every thread's) and wall."""

    model: str
    step: str  # "prepare WxH" or "forward"
    threads: int
    images: int
    batch: int
    cpu_s: float
    wall_s: float


@dataclass(frozen=True)
class Cold:
    """One fresh process: seconds of wall (and CPU, the sandbox's helpers included) per phase."""

    model: str
    threads: int
    checkpoint_mb: float
    interpreter_s: float
    imports_s: float
    imports: dict[str, float]
    #: From the sandbox's start to the model loaded, and the CPU of this process in it.
    load_s: float
    load_cpu_s: float
    #: Reading the whole checkpoint to name the weights (keys.weights_id): not paid with a baked tag.
    hashing_s: float
    first_batch_images: int
    first_batch_s: float
    first_batch_cpu_s: float
    #: What the sandbox's helpers spent, all of it (their imports, then the first batch's decoding).
    helpers_cpu_s: float
    #: CPU seconds of the whole process, interpreter to first batch, helpers included.
    total_cpu_s: float
    #: In MiB, as Lambda's memory setting counts them.
    peak_rss_mb: float
    #: The sandbox's helper processes, and the largest one's peak resident memory.
    helpers: int
    helper_peak_rss_mb: float

    @property
    def init_s(self) -> float:
        """What a function's INIT would take here: interpreter, imports and the model, less the hashing."""
        return self.interpreter_s + self.imports_s + self.load_s - self.hashing_s


@dataclass(frozen=True)
class Figures:
    """What the projection needs of one model's measurements (the JSON's `figures`): CPU seconds only.

    Walls here are what the neighbours leave (the development machine's 2 vCPUs are shared); CPU
    seconds are what the work costs, and Lambda bills them at the function's share of a vCPU.
    """

    model: str
    #: Per image, prepare (a 12 MP JPEG) + forward, at 1 and 2 torch threads.
    cpu_1_s: float
    cpu_2_s: float
    #: The cold start's INIT, the hashing left out: all of its CPU (the sandbox's helpers importing
    #: beside the model's load), and this process's alone, which runs on one thread.
    init_cpu_s: float
    init_serial_cpu_s: float
    #: The first batch's CPU beyond what its photos take warm.
    first_call_cpu_s: float
    #: Peak resident memory of the function's processes, this one's and its helpers', in MiB.
    peak_rss_mb: float


@dataclass(frozen=True)
class Projection:
    model: str
    memory_mb: int
    vcpus: float
    threads: int
    seconds_per_image: float
    gb_seconds_per_image: float
    init_s: float
    first_call_extra_s: float
    #: Images one invocation embeds in 5 minutes (a third of Lambda's 15), the cold start included.
    images_in_5_min: int
    #: Whether the processes' peak memory fits the function's.
    fits: bool


def vcpus(memory_mb: int) -> float:
    return min(LAMBDA_MAX_VCPUS, memory_mb / LAMBDA_MB_PER_VCPU)


def project(figures: Figures, memory_mb: int) -> Projection:
    """Seconds per image and of the cold start on a function of `memory_mb`, from this machine's CPU seconds.

    Lambda shows the function ceil(vCPUs) cores and lets it use vCPUs x 1 s of CPU a second. The
    function runs one torch thread per core shown; the CPU that threads beyond the first add
    (spinning, sharing out the work) grows in proportion to them, as from 1 to 2 threads here; and
    a batch's photos keep every thread busy. So an image takes
        (cpu_1 + (n - 1) (cpu_2 - cpu_1)) / vCPUs  + the sandbox's 3 ms,
    and the INIT the longer of its own thread's CPU and all its CPU (helpers included) over the vCPUs.
    Assumes a Lambda vCPU does what one of this machine's does.
    """
    share = vcpus(memory_mb)
    threads = max(1, math.ceil(share - 1e-9))
    cpu = figures.cpu_1_s + (threads - 1) * max(0.0, figures.cpu_2_s - figures.cpu_1_s)
    seconds = cpu / share + SANDBOX_S_PER_IMAGE
    init = max(figures.init_serial_cpu_s, figures.init_cpu_s / share)
    first_call = figures.first_call_cpu_s / share
    images = max(0, int((300 - init - first_call) / seconds))
    return Projection(
        model=figures.model,
        memory_mb=memory_mb,
        vcpus=round(share, 2),
        threads=threads,
        seconds_per_image=round(seconds, 4),
        gb_seconds_per_image=round(seconds * memory_mb / 1024, 4),
        init_s=round(init, 2),
        first_call_extra_s=round(first_call, 2),
        images_in_5_min=images,
        fits=figures.peak_rss_mb <= memory_mb,
    )


def figures_from(per_image: list[PerImage], cold: Cold | None, model: str, size: str) -> Figures:
    def step(name: str, threads: int) -> PerImage:
        return next(row for row in per_image if row.model == model and row.step == name and row.threads == threads)

    cpu = {n: step(f"prepare {size}", n).cpu_s + step("forward", n).cpu_s for n in THREADS}
    if cold is None:
        return Figures(model, cpu[1], cpu[2], 0.0, 0.0, 0.0, 0.0)
    # The hashing is one thread reading the file: its wall is its CPU.
    own = cold.total_cpu_s - cold.helpers_cpu_s
    return Figures(
        model=model,
        cpu_1_s=cpu[1],
        cpu_2_s=cpu[2],
        init_cpu_s=cold.total_cpu_s - cold.first_batch_cpu_s - cold.hashing_s,
        init_serial_cpu_s=own - cold.first_batch_cpu_s - cold.hashing_s,
        first_call_cpu_s=max(0.0, cold.first_batch_cpu_s - cold.first_batch_images * cpu[cold.threads]),
        peak_rss_mb=cold.peak_rss_mb + cold.helpers * cold.helper_peak_rss_mb,
    )


#: The recorded run (docs/benchmarks.md, "Lambda lane": `--repeats 3`, 6 Dec 2026 12:25 UTC, commit
#: 80c6e63): what bench/cost_bench.py prices the lane with unless given a run of its own (--lane-figures).
RECORDED: dict[str, Figures] = {
    "ViT-B-32": Figures(
        model="ViT-B-32",
        cpu_1_s=0.1272,
        cpu_2_s=0.1613,
        init_cpu_s=12.3181,
        init_serial_cpu_s=5.274,
        first_call_cpu_s=1.0662,
        peak_rss_mb=3450.7305,
    ),
    "ViT-B-16": Figures(
        model="ViT-B-16",
        cpu_1_s=0.4525,
        cpu_2_s=0.5352,
        init_cpu_s=13.7819,
        init_serial_cpu_s=6.2743,
        first_call_cpu_s=0.0,
        peak_rss_mb=3438.5352,
    ),
    "ViT-L-14": Figures(
        model="ViT-L-14",
        cpu_1_s=1.8376,
        cpu_2_s=2.4764,
        init_cpu_s=21.1808,
        init_serial_cpu_s=12.861,
        first_call_cpu_s=0.091,
        peak_rss_mb=5561.5312,
    ),
}


def jpegs(size: tuple[int, int], count: int) -> list[bytes]:
    from bench.worker_bench import PHOTO_NAMES, camera_sized, variants

    return variants(camera_sized(PHOTO_NAMES, size), count)


def time_step(work: Any, repeats: int) -> tuple[float, float]:
    """(CPU, wall) seconds of `work()`, each the least of `repeats` tries."""
    cpu = wall = math.inf
    for _ in range(repeats):
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        work()
        cpu, wall = min(cpu, time.process_time() - cpu_before), min(wall, time.perf_counter() - wall_before)
    return cpu, wall


def measure_model(model: ClipModel, photos: dict[str, list[bytes]], threads: int, batch: int, repeats: int) -> list[PerImage]:
    import torch

    from clip_worker.config import WorkerConfig

    torch.set_num_threads(threads)
    max_pixels = WorkerConfig.max_image_pixels
    rows = []
    inputs: list[torch.Tensor] = []
    with ThreadPoolExecutor(threads) as pool:
        for size, files in photos.items():

            def prepare(files: list[bytes] = files, url: str = f"s3://bench/{size}.jpg") -> None:
                inputs[:] = pool.map(lambda data: model.prepare(data, url, max_pixels), files)

            cpu, wall = time_step(prepare, repeats)
            rows.append(PerImage(model.name, f"prepare {size}", threads, len(files), 1, cpu / len(files), wall / len(files)))
    batches = [torch.stack(inputs[start : start + batch]) for start in range(0, len(inputs), batch)]
    model.embed(batches[0][:2])  # the kernels warmed at this thread count

    def forward() -> None:
        for pixels in batches:
            model.embed(pixels)

    cpu, wall = time_step(forward, repeats)
    rows.append(PerImage(model.name, "forward", threads, len(inputs), batch, cpu / len(inputs), wall / len(inputs)))
    return rows


def cold_start(model: str, checkpoint: Path, photos: list[Path], model_config: str | None, threads: int) -> Cold:
    settings = {
        "model": model,
        "checkpoint": str(checkpoint),
        "photos": [str(path) for path in photos],
        "model_config": model_config,
        "threads": threads,
    }
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "cold.json"
        settings["out"] = str(out)
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        spawned = time.time()
        subprocess.run(  # noqa: S603 - this module, with this interpreter
            [sys.executable, "-m", "bench.lane_bench", "--cold-child", json.dumps(settings)], env=environment, check=True
        )
        result = json.loads(out.read_text())
    result["interpreter_s"] = result.pop("started") - spawned
    result["checkpoint_mb"] = round(checkpoint.stat().st_size / 1e6, 1)
    return Cold(**{field.name: result[field.name] for field in fields(Cold)})


def peak_rss_mib(pid: int | str) -> float:
    """A process's peak resident memory since its exec, in MiB (Lambda's "MB")."""
    return peak_rss_mb(pid) * 1e6 / 2**20


def cold_child(settings: dict[str, Any]) -> None:
    """The fresh process of `cold_start`: everything here is timed from the module's first line."""
    imports = time_imports(list(IMPORT_GROUPS))
    imported = time.time()

    import torch

    import clip_shared.keys
    from clip_worker import model as clip_model
    from clip_worker.config import WorkerConfig
    from clip_worker.runner import new_sandbox

    torch.set_num_threads(settings["threads"])
    config = WorkerConfig(manifest_uri="s3://bench/manifest", output_bucket="bench")
    hashing: list[float] = []
    stopwatch(clip_shared.keys, "weights_id", hashing)
    cpu_before = time.process_time()
    # As runner.run: the helpers start importing while this process loads the model.
    with new_sandbox(config) as sandbox:
        model = clip_model.load(settings["model"], settings["checkpoint"], "cpu", None, settings["model_config"])
        loaded, load_cpu = time.time(), time.process_time() - cpu_before
        data = [Path(path).read_bytes() for path in settings["photos"]]
        cpu_before = time.process_time()
        with ThreadPoolExecutor(config.io_threads) as pool:
            inputs = list(
                pool.map(lambda item: model.prepare(item, "s3://bench/photo.jpg", config.max_image_pixels, sandbox), data)
            )
        model.embed(torch.stack(inputs))
        first_batch, first_batch_cpu = time.time(), time.process_time() - cpu_before
        helpers = [peak_rss_mib(pid) for pid in sandbox.pids]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "model": settings["model"],
        "threads": settings["threads"],
        "started": STARTED,
        "imports_s": imported - STARTED,
        "imports": imports,
        "load_s": loaded - imported,
        "load_cpu_s": load_cpu,
        "hashing_s": sum(hashing),
        "first_batch_images": len(data),
        "first_batch_s": first_batch - loaded,
        "first_batch_cpu_s": first_batch_cpu,
        "helpers_cpu_s": children.ru_utime + children.ru_stime,
        "total_cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
        "peak_rss_mb": peak_rss_mib("self"),
        "helpers": len(helpers),
        "helper_peak_rss_mb": max(helpers, default=0.0),
    }
    Path(settings["out"]).write_text(json.dumps(result))


def report(
    per_image: list[PerImage],
    colds: list[Cold],
    figures: list[Figures],
    projections: list[Projection],
    environment: dict[str, Any],
) -> str:
    lines = [
        f"on {environment['cpu_count']} CPUs, Python {environment['python']}, torch {environment['torch']}, "
        f"open_clip {environment['open_clip']}, Pillow {environment['pillow']}; commit {environment['commit']}, {environment['date']}",
        "",
        "(1) per image, least of the tries: CPU seconds (all threads) / wall seconds",
        f"  {'model':<10} {'step':<18} {'images':>6} {'batch':>5}   {'1 thread cpu/wall':>19}   {'2 threads cpu/wall':>19}",
    ]
    for model in dict.fromkeys(row.model for row in per_image):
        for step in dict.fromkeys(row.step for row in per_image if row.model == model):
            by = {row.threads: row for row in per_image if row.model == model and row.step == step}
            cells = "   ".join(f"{by[n].cpu_s:>9.4f} /{by[n].wall_s:>8.4f}" for n in THREADS if n in by)
            first = next(iter(by.values()))
            lines.append(f"  {model:<10} {step:<18} {first.images:>6} {first.batch:>5}   {cells}")
    lines += ["", f"  CPU seconds per image, prepare ({next(iter(SIZES))[0]}x{next(iter(SIZES))[1]} unless --quick) + forward"]
    lines += [f"  {found.model:<10} 1 thread {found.cpu_1_s:.4f}   2 threads {found.cpu_2_s:.4f}" for found in figures]
    if colds:
        lines += ["", "(2) cold start in a fresh process (s): wall, and CPU where given (helpers included)"]
        for cold in colds:
            groups = ", ".join(f"{name} {seconds:.2f}" for name, seconds in cold.imports.items())
            lines += [
                f"  {cold.model} ({cold.checkpoint_mb:.0f} MB checkpoint, {cold.threads} torch threads, peak RSS {cold.peak_rss_mb:.0f} MB "
                f"+ {cold.helpers} helpers of up to {cold.helper_peak_rss_mb:.0f} MB)",
                f"    interpreter {cold.interpreter_s:.2f}   imports {cold.imports_s:.2f} ({groups})",
                f"    sandbox start + load {cold.load_s:.2f} (this process's CPU {cold.load_cpu_s:.2f}; of it hashing the checkpoint {cold.hashing_s:.2f})",
                f"    first batch of {cold.first_batch_images} {cold.first_batch_s:.2f} (CPU {cold.first_batch_cpu_s:.2f})   "
                f"helpers' CPU {cold.helpers_cpu_s:.2f}   whole process CPU {cold.total_cpu_s:.2f}",
                f"    INIT without the hashing {cold.init_s:.2f}",
            ]
    if projections:
        lines += [
            "",
            "(3) projected to Lambda from the CPU seconds (project(): vCPUs = MB / 1769, at most 6; not a measurement)",
            f"  {'model':<10} {'MB':>6} {'vCPUs':>5} {'threads':>7} {'s/image':>8} {'GB-s/image':>10} {'$/M images':>10} "
            f"{'INIT s':>7} {'1st call':>8} {'in 5 min':>8} {'fits':>5}",
        ]
        for projection in projections:
            dollars = projection.gb_seconds_per_image * 0.0000166667 * 1e6
            lines.append(
                f"  {projection.model:<10} {projection.memory_mb:>6} {projection.vcpus:>5.2f} {projection.threads:>7} "
                f"{projection.seconds_per_image:>8.4f} {projection.gb_seconds_per_image:>10.4f} {dollars:>10.2f} "
                f"{projection.init_s:>7.2f} {projection.first_call_extra_s:>8.2f} {projection.images_in_5_min:>8} "
                f"{'yes' if projection.fits else 'NO':>5}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--model-config", default=None, help="an open_clip model config for models open_clip lacks")
    parser.add_argument("--images", type=int, default=None, help="photos per model (default: 32, 16, 4 by model)")
    parser.add_argument("--repeats", type=int, default=2, help="tries per step; each keeps its least")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold starts (and the checkpoints they load)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small photos, 4 of them, one try")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cold-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cold_child:
        cold_child(json.loads(args.cold_child))
        return 0

    import warnings

    import open_clip
    import torch

    from bench._harness import environment, save_random_checkpoint, write_json
    from clip_worker.model import load

    warnings.filterwarnings("ignore", message="CLIP_PRETRAINED=none")
    if args.model_config:
        open_clip.add_model_config(args.model_config)
    sizes = QUICK_SIZES if args.quick else SIZES
    repeats = 1 if args.quick else args.repeats
    threads_before = torch.get_num_threads()
    per_image: list[PerImage] = []
    colds: list[Cold] = []
    figures: list[Figures] = []
    with tempfile.TemporaryDirectory() as scratch:
        first = []
        for index, data in enumerate(jpegs(sizes[0], FIRST_BATCH)):
            first.append(Path(scratch) / f"photo-{index}.jpg")
            first[-1].write_bytes(data)
        for name in args.models:
            count = 4 if args.quick else args.images or IMAGES.get(name, DEFAULT_IMAGES)
            photos = {f"{w}x{h}": jpegs((w, h), count) for w, h in sizes}
            model = load(name, "none", "cpu", None, args.model_config)
            for threads in THREADS:
                per_image += measure_model(model, photos, threads, min(count, 32), repeats)
            torch.set_num_threads(threads_before)
            del model
            cold = None
            if not args.no_cold:
                checkpoint = save_random_checkpoint(name, Path(scratch) / f"{name}.pt")
                cold = cold_start(name, checkpoint, first, args.model_config, max(THREADS))
                checkpoint.unlink()
                colds.append(cold)
            size = next(iter(photos))
            figures.append(figures_from(per_image, cold, name, size))
            print(f"{name} done", file=sys.stderr, flush=True)
    projections = [project(found, memory) for found in figures for memory in LAMBDA_MEMORIES_MB]
    env = environment()
    env["pillow"] = __import__("PIL").__version__
    print(report(per_image, colds, figures, projections, env))
    write_json(
        args.json,
        {
            "environment": env,
            "repeats": repeats,
            "per_image": [asdict(row) for row in per_image],
            "cold": [{**asdict(cold), "init_s": cold.init_s} for cold in colds],
            "figures": [asdict(found) for found in figures],
            "projections": [asdict(projection) for projection in projections],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

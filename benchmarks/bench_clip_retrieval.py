"""`mammals index` side by side with clip-retrieval (`clip-retrieval inference`, the field's reference embedding
pipeline) on the same photos and the same open_clip ViT-B-32 checkpoint (random weights, seeded, saved locally).

Each command is timed as a whole process, from launch to exit (imports, model loading, warm-up, decode, forward,
writing), once per repeat, after one untimed read of every photo (page cache) and one untimed import of each
side's libraries.  Four commands:

* clip-retrieval: ``clip-retrieval inference --input_format files --enable_text False --enable_metadata False``
  with ``--batch_size`` and ``--num_prepro_workers`` set to ours (indexer/defaults.py), from its own virtualenv
  (created if missing, outside the repo: clip-retrieval pins numpy<2 and pyarrow<16, which this repo cannot);
* ``mammals index DATA --store S --encoder open_clip:ViT-B-32/<checkpoint>`` with default options;
* the same with ``--no-sparsity``;
* the same with ``--precision fp32`` (the default runs a ViT in bfloat16 autocast on a CPU with native bfloat16,
  within cosine 0.999 of float32; clip-retrieval runs float32 on a CPU).

Both tools must return one embedding per photo, and for every photo clip-retrieval's vector and ours must agree
(cosine >= 0.99; clip-retrieval stores float16).  Figures: img/s of each and ours over clip-retrieval's.
Target: ratio >= 1.5.

    python -m benchmarks.bench_clip_retrieval [--data ../shared/data/pets] [--repeats 1] [--work DIR]
                                              [--venv ~/.cache/mammals-bench/clip-retrieval-venv] [--setup-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import SHARED_DATA, shown, write_results
from indexer import defaults

# Everything the clip-retrieval virtualenv is built from, exactly as installed (see install_clip_retrieval).
# torch/torchvision are pinned to the builds this machine already holds as local files, so pip never resolves
# (and downloads) a torch of its choosing; open_clip_torch is pinned to the newest release clip-retrieval accepts
# (<3); numpy/pyarrow are clip-retrieval's own upper bounds; setuptools<70 keeps ``pkg_resources.packaging``,
# which clip-anytorch (imported by clip-retrieval on every run) still uses.
CLIP_RETRIEVAL_PINS: tuple[str, ...] = (
    "clip-retrieval==2.45.0",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch==2.32.0",
    "numpy<2",
    "pyarrow<16",
    "setuptools<70",
)
# torch 2.14.1 declares setuptools>=77, so no resolver accepts setuptools<70 next to it: that pin is installed in
# a second step without dependencies (torch needs setuptools only to build C++ extensions, never here).
NO_DEPS_PINS: tuple[str, ...] = ("setuptools<70",)
DEFAULT_VENV = Path("~/.cache/mammals-bench/clip-retrieval-venv")
# Written into the venv once the pins installed and clip-retrieval imported, so later runs skip the install.
PINS_MARKER = ".mammals-bench-pins.json"

MODEL = "ViT-B-32"
TARGET_RATIO = 1.5
# Our commands, each timed like clip-retrieval's: the default (on a CPU with native bfloat16, a ViT runs in
# bfloat16 autocast: indexer/encoders/registry.py), without sparsity, and in float32 like clip-retrieval.
OURS: tuple[tuple[str, tuple[str, ...]], ...] = (("mammals_default", ()), ("mammals_no_sparsity", ("--no-sparsity",)),
                                                 ("mammals_fp32", ("--precision", "fp32")))
MIN_COSINE = 0.99
# A run in which other processes used more than this share of the machine's CPU time is flagged in the note.
BUSY_SHARE = 0.05
# Extensions clip-retrieval's files reader globs (clip_inference/reader.py), lower-cased.
CLIP_RETRIEVAL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- environments


def pip_sources(python: Path) -> list[str]:
    """pip's configured indexes and find-links as ``uv pip`` options (uv reads no pip.conf).

    The local mirrors become extra indexes, which uv ranks above the default index, and ``unsafe-best-match`` lets
    a package that a mirror holds only in other versions (pyarrow<16) still come from PyPI; for one version held
    in several places uv takes the first, so the local torch wheels win over PyPI's.
    """
    out = subprocess.run([str(python), "-m", "pip", "config", "list"], capture_output=True, text=True, check=False)
    flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}
    seen: list[tuple[str, str]] = []
    for line in out.stdout.splitlines():  # e.g. global.extra-index-url='file:///a file:///b'
        key, _, value = line.partition("=")
        flag = flags.get(key.rsplit(".", 1)[-1])
        if flag:
            seen += [(flag, v) for v in value.strip("'\"").split() if (flag, v) not in seen]
    opts = [x for pair in seen for x in pair]
    return [*opts, "--index-strategy", "unsafe-best-match"]


def install_clip_retrieval(venv: Path, installer: str) -> None:
    """Create ``venv`` if missing and install ``CLIP_RETRIEVAL_PINS`` into it, unless it already holds them."""
    python = venv / "bin" / "python"
    marker = venv / PINS_MARKER
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == list(CLIP_RETRIEVAL_PINS) and python.exists():
            return
    if not python.exists():
        log(f"creating {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    uv = shutil.which("uv") if installer in ("auto", "uv") else None
    if installer == "uv" and uv is None:
        raise SystemExit("--installer uv: no uv on PATH")
    if uv:
        base = [uv, "pip", "install", "--python", str(python), *pip_sources(python)]
    else:
        base = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    first = [p for p in CLIP_RETRIEVAL_PINS if p not in NO_DEPS_PINS]
    log(f"installing into {venv} with {'uv' if uv else 'pip'}: {' '.join(CLIP_RETRIEVAL_PINS)} (a few minutes)")
    subprocess.run([*base, *first], check=True, stdout=sys.stderr)
    subprocess.run([*base, "--no-deps", *NO_DEPS_PINS], check=True, stdout=sys.stderr)
    # Import what `clip-retrieval inference` imports, so that a broken environment fails here, not mid-benchmark.
    subprocess.run([str(python), "-c", "import clip_retrieval.clip_inference.worker"], check=True)
    marker.write_text(json.dumps(list(CLIP_RETRIEVAL_PINS)))


def versions_in(python: Path, dists: Sequence[str]) -> dict[str, str]:
    """Installed versions of ``dists`` in the environment of ``python`` (absent ones left out)."""
    code = ("import importlib.metadata as m, json, sys\nv = {}\nfor d in sys.argv[1:]:\n    try: v[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: pass\nprint(json.dumps(v))")
    out = subprocess.run([str(python), "-c", code, *dists], capture_output=True, text=True, check=True)
    versions: dict[str, str] = json.loads(out.stdout)
    return versions


def save_random_checkpoint(path: Path, seed: int) -> None:
    """A ViT-B-32 with open_clip's random initialisation under ``seed``, saved as a plain state_dict (what
    ``open_clip.create_model_and_transforms(pretrained=<file>)`` loads, in both tools)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------- measuring


def photo_files(data: Path) -> list[Path]:
    """The photos both tools index: our image extensions that clip-retrieval's reader also globs."""
    exts = set(defaults.IMAGE_EXTENSIONS) & set(CLIP_RETRIEVAL_EXTENSIONS)
    return sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def read_all(paths: Sequence[Path]) -> int:
    """Read every file once (untimed) so that neither timed command pays for a cold page cache."""
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    return n


def cpu_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Run:
    seconds: float
    cpu_seconds: float  # of the command and every process it waited for
    other_cpu_share: float | None  # share of the machine's CPU time other processes took meanwhile


def timed_command(cmd: Sequence[str], log_file: Path, timeout: float) -> Run:
    """Run ``cmd`` to completion (output to ``log_file``) and time the whole process, launch to exit."""
    busy0, child0 = cpu_busy_seconds(), children_cpu_seconds()
    with open(log_file, "wb") as out:
        t = time.perf_counter()
        proc = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        seconds = time.perf_counter() - t
    busy1, child1 = cpu_busy_seconds(), children_cpu_seconds()
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{cmd[0]} exited {proc.returncode}; end of {log_file}:\n{tail}")
    ours = child1 - child0
    other = None
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0 - ours) / (seconds * (os.cpu_count() or 1)))
    return Run(seconds, ours, other)


@dataclass
class Side:
    """One of the commands: how it is launched and what each repeat measured."""

    name: str
    runs: list[Run] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(r.seconds for r in self.runs)

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    def figures(self, n: int) -> dict[str, Any]:
        return {"seconds": [round(r.seconds, 3) for r in self.runs], "best_seconds": round(self.best, 3),
                "median_seconds": round(self.median, 3), "images_per_second": round(n / self.best, 2),
                "images_per_second_median": round(n / self.median, 2),
                "cpu_seconds": [round(r.cpu_seconds, 1) for r in self.runs],
                "other_cpu_share": [None if r.other_cpu_share is None else round(r.other_cpu_share, 3)
                                    for r in self.runs],
                **({"runs": self.extra} if any(self.extra) else {})}


# ------------------------------------------------------------------------------------------------- embeddings


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clip_retrieval_embeddings(out: Path) -> dict[str, np.ndarray]:
    """path -> embedding from clip-retrieval's output: img_emb/img_emb_<k>.npy and, row for row, the
    ``image_path`` column of metadata/metadata_<k>.parquet (written even with --enable_metadata False)."""
    import pyarrow.parquet as pq

    embs: dict[str, np.ndarray] = {}
    for npy in sorted((out / "img_emb").glob("img_emb_*.npy")):
        part = npy.stem.removeprefix("img_emb_")
        vecs = np.load(npy)
        paths = pq.read_table(out / "metadata" / f"metadata_{part}.parquet", columns=["image_path"])
        names = paths.column("image_path").to_pylist()
        if len(names) != len(vecs):
            raise SystemExit(f"clip-retrieval partition {part}: {len(vecs)} embeddings for {len(names)} paths")
        embs.update((str(Path(p).resolve()), v) for p, v in zip(names, unit(vecs), strict=True))
    return embs


def store_embeddings(store_dir: Path) -> dict[str, np.ndarray]:
    """path -> embedding from a mammals store's encoder space."""
    from indexer.store import Store

    with Store.open(store_dir) as st:
        names = [n for n in st.space_names() if st.space_meta(n).get("kind") == "encoder"]
        if len(names) != 1:
            raise SystemExit(f"{store_dir}: expected one encoder space, found {st.space_names()}")
        space = st.space(names[0])
        images = st.images
        path_of = dict(zip(images["id"], images["path"], strict=True))
        return {str(Path(path_of[i]).resolve()): v for i, v in zip(space.ids, unit(space.vectors), strict=True)}


def agreement(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> dict[str, float]:
    """Cosine of each photo's two embeddings, and for scale the mean cosine between different photos (near 1
    would make the per-photo check meaningless)."""
    keys = sorted(ours)
    a = np.stack([ours[k] for k in keys])
    b = np.stack([theirs[k] for k in keys])
    same = np.sum(a * b, axis=1)
    sample = b[:: max(1, len(b) // 500)]  # all pairs of <= ~500 photos: enough for a mean, cheap
    sims = sample @ sample.T
    other = sims[~np.eye(len(sample), dtype=bool)]
    return {"min_cosine_same_photo": round(float(same.min()), 6),
            "mean_cosine_same_photo": round(float(same.mean()), 6),
            "mean_cosine_other_photos": round(float(other.mean()), 4) if other.size else float("nan")}


def check(label: str, embs: dict[str, np.ndarray], expected: set[str]) -> None:
    if set(embs) != expected:
        missing, extra = len(expected - set(embs)), len(set(embs) - expected)
        raise SystemExit(f"{label}: {len(embs)} embeddings for {len(expected)} photos "
                         f"({missing} photos missing, {extra} unexpected paths)")


# ----------------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bench-clip-retrieval-") as tmp:
        yield Path(tmp)


def anonymised(cmd: Sequence[str], subs: dict[str, str]) -> str:
    text = " ".join(cmd)
    for old, new in subs.items():
        text = text.replace(old, new)
    return text


def warm_imports(python: Path, modules: Sequence[str]) -> None:
    """Import ``modules`` once in a throwaway process (untimed): the first import after an install compiles
    bytecode and reads hundreds of MB of shared libraries, which neither timed run should pay for."""
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n"
            "    try: importlib.import_module(m)\n    except Exception: pass")
    subprocess.run([str(python), "-c", code, *modules], check=False, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "pets")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="clip-retrieval's virtualenv (created if missing)")
    ap.add_argument("--installer", choices=("auto", "uv", "pip"), default="auto",
                    help="auto: uv where it is on PATH, else pip")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the checkpoint, outputs and logs here (default: a temporary folder, removed)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each command (best and median reported)")
    ap.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE)
    ap.add_argument("--workers", type=int, default=defaults.WORKERS, help="decode workers of both tools")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random ViT-B-32 weights")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each command")
    ap.add_argument("--note", default="", help="free text recorded with the figures")
    ap.add_argument("--setup-only", action="store_true", help="build the clip-retrieval venv and stop")
    a = ap.parse_args()

    venv = a.venv.expanduser().absolute()
    install_clip_retrieval(venv, a.installer)
    if a.setup_only:
        print(f"clip-retrieval venv ready: {venv}")
        return 0
    cr_python = venv / "bin" / "python"
    mammals = Path(sys.executable).parent / "mammals"
    data = a.data.resolve()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # what both tools pick by themselves
    photos = photo_files(data)
    expected = {str(p.resolve()) for p in photos}
    n = len(photos)
    log(f"{n} photos from {shown(data)}; batch {a.batch_size}, {a.workers} decode worker(s), {device}; "
        f"load average {os.getloadavg()[0]:.2f}")

    with work_dir(a.work) as work:
        ckpt = work / f"{MODEL}-random-seed{a.seed}.pt"
        if not ckpt.exists():
            log(f"saving random {MODEL} weights (seed {a.seed}) to {ckpt}")
            save_random_checkpoint(ckpt, a.seed)
        # Absolute checkpoint path: both tools split the model name at the first '/', so '//abs/path' keeps
        # the leading slash (all_clip joins the rest back with '/', mammals' registry partitions once).
        model_name = f"open_clip:{MODEL}/{ckpt}"

        log("warming the page cache and both environments' imports (untimed)")
        read_all([*photos, ckpt])
        warm_imports(cr_python, ["clip_retrieval.cli", "clip_retrieval.clip_inference.worker"])
        warm_imports(Path(sys.executable), ["open_clip", "faiss", "deltalake", "indexer.cli", "indexer.pipeline"])

        ours_extra = ([] if a.batch_size == defaults.BATCH_SIZE else ["--batch-size", str(a.batch_size)]) + (
            [] if a.workers == defaults.WORKERS else ["--workers", str(a.workers)])

        def cr_cmd(out: Path) -> list[str]:
            return [str(venv / "bin" / "clip-retrieval"), "inference", "--input_dataset", str(data),
                    "--output_folder", str(out), "--input_format", "files", "--enable_text", "False",
                    "--enable_metadata", "False", "--batch_size", str(a.batch_size),
                    "--num_prepro_workers", str(a.workers), "--clip_model", model_name]

        def ours_cmd(out: Path, *opts: str) -> list[str]:
            return [str(mammals), "index", str(data), "--store", str(out), "--encoder", model_name, *ours_extra, *opts]

        sides = {"clip_retrieval": Side("clip-retrieval"), "mammals_default": Side("mammals index"),
                 "mammals_no_sparsity": Side("mammals index --no-sparsity"),
                 "mammals_fp32": Side("mammals index --precision fp32")}
        agree: dict[str, dict[str, float]] = {}
        for rep in range(a.repeats):
            # One of each per repeat, in turn, so that a slow spell on a shared machine hits all three alike.
            out = work / f"clip-retrieval-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            run = timed_command(cr_cmd(out), work / f"clip-retrieval-{rep}.log", a.timeout)
            theirs = clip_retrieval_embeddings(out)
            check("clip-retrieval", theirs, expected)
            stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("[0-9]*.json"))]
            warm = re.findall(r"done warming up in ([0-9.]+)s", (work / f"clip-retrieval-{rep}.log").read_text())
            # Its own per-batch loop time (what its "sample_per_sec" reports): the rest of the wall time is
            # start-up: imports, two model loads (the reader's and the mapper's, cached), warm-up, spawned loggers.
            sides["clip_retrieval"].runs.append(run)
            sides["clip_retrieval"].extra.append({
                "own_loop_seconds": round(sum(s.get("total_duration", 0.0) for s in stats), 3),
                "own_inference_seconds": round(sum(s.get("inference_duration", 0.0) for s in stats), 3),
                "warmup_seconds": round(sum(float(w) for w in warm), 3)})
            log(f"[{rep + 1}/{a.repeats}] clip-retrieval inference: {run.seconds:.1f} s")
            for key, opts in OURS:
                store = work / f"{key}-{rep}"
                shutil.rmtree(store, ignore_errors=True)
                run = timed_command(ours_cmd(store, *opts), work / f"{key}-{rep}.log", a.timeout)
                ours = store_embeddings(store)
                check(sides[key].name, ours, expected)
                agree[key] = res = agreement(ours, theirs)
                if res["min_cosine_same_photo"] < MIN_COSINE:
                    raise SystemExit(f"{sides[key].name} and clip-retrieval disagree: {res}")
                sides[key].runs.append(run)
                sides[key].extra.append({})
                log(f"[{rep + 1}/{a.repeats}] {sides[key].name}: {run.seconds:.1f} s; agreement {res}")
                if a.work is None:
                    shutil.rmtree(store, ignore_errors=True)
            if a.work is None:
                shutil.rmtree(out, ignore_errors=True)

    cr = sides["clip_retrieval"]
    ratio = {k: cr.best / sides[k].best for k, _ in OURS}
    ratio_median = {k: cr.median / sides[k].median for k, _ in OURS}
    shares = [r.other_cpu_share for s in sides.values() for r in s.runs if r.other_cpu_share is not None]
    notes = [a.note] if a.note else []
    if shares and max(shares) > BUSY_SHARE:
        notes.append(f"machine busy: other processes took up to {max(shares):.0%} of the CPU time during a timed "
                     f"run (mean {statistics.mean(shares):.0%}); rerun on a quiet machine for final figures")

    print(f"{n} photos, {MODEL} (random weights, seed {a.seed}), batch {a.batch_size}, {a.workers} decode "
          f"worker(s), {device}; best of {a.repeats}")
    for s in sides.values():
        print(f"{s.name:30s}: {s.best:7.2f} s  ({n / s.best:6.1f} img/s)")
    for k in ratio:
        print(f"ratio {sides[k].name + ' / clip-retrieval':45s}: {ratio[k]:5.2f}x  (target >= {TARGET_RATIO})")
    extra = cr.extra[-1]
    print(f"clip-retrieval's own loop: {extra['own_loop_seconds']:.1f} s of {cr.runs[-1].seconds:.1f} s "
          f"(warm-up {extra['warmup_seconds']:.1f} s)")
    for k, res in agree.items():
        print(f"agreement {sides[k].name}: min cosine {res['min_cosine_same_photo']:.5f} "
              f"(different photos: {res['mean_cosine_other_photos']:.3f})")
    for line in notes:
        print(f"note: {line}")

    # Commands as recorded: no machine's absolute paths in the repo (see common.shown).
    subs = {str(ckpt): "<checkpoint>", str(data): shown(data), str(venv / "bin") + "/": "", str(mammals): "mammals"}
    out_file = write_results("clip_retrieval", {
        "data": shown(data), "images": n, "model": MODEL, "weights": f"random, torch.manual_seed({a.seed}), saved "
        "as a state_dict file and given to both tools as open_clip:ViT-B-32/<file>",
        "batch_size": a.batch_size, "workers": a.workers, "device": device, "torch_threads": torch.get_num_threads(),
        "repeats": a.repeats,
        "commands": {"clip_retrieval": anonymised(cr_cmd(Path("<out>")), subs),
                     "mammals_default": anonymised(ours_cmd(Path("<store>")), subs),
                     **{k: anonymised(ours_cmd(Path("<store>"), *opts), subs) for k, opts in OURS}},
        **{k: s.figures(n) for k, s in sides.items()},
        "ratio_default_over_clip_retrieval": round(ratio["mammals_default"], 3),
        "ratio_no_sparsity_over_clip_retrieval": round(ratio["mammals_no_sparsity"], 3),
        "ratio_fp32_over_clip_retrieval": round(ratio["mammals_fp32"], 3),
        "ratio_default_over_clip_retrieval_median": round(ratio_median["mammals_default"], 3),
        "ratio_no_sparsity_over_clip_retrieval_median": round(ratio_median["mammals_no_sparsity"], 3),
        "target_ratio": TARGET_RATIO,
        "agreement": {**agree, "threshold": MIN_COSINE,
                      "clip_retrieval_dtype": "float16 (clip-retrieval stores its embeddings as float16)"},
        "versions": {
            "clip_retrieval_venv": versions_in(cr_python, ["clip-retrieval", "open_clip_torch", "all_clip", "torch",
                                                           "torchvision", "pillow", "numpy"]),
            "mammals_venv": versions_in(Path(sys.executable), ["mammals-space", "open_clip_torch", "torch",
                                                               "torchvision", "pillow", "numpy"]),
            "clip_retrieval_pins": list(CLIP_RETRIEVAL_PINS),
        },
        "load_average_at_end": round(os.getloadavg()[0], 2),
        **({"note": "; ".join(notes)} if notes else {}),
    })
    log(f"written to {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

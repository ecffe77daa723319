"""Training time of the mapper and the VAE with their defaults, and indexing throughput with every space and
per-layer sparsity on versus the encoder alone, on the shared photos, in one run.

Targets: the mapper trains in under 5 minutes and the VAE in under 15 (issue 10) on a 2-core CPU; indexing
with every space and sparsity at most 1.3x the time of the encoder alone (issue 11).  The two index runs
alternate in rounds after training (``--repeats``, default 5), each into a fresh store, and each keeps its
fastest round, as in bench_index: this shared VM drifts by 10-40% from minute to minute.  The ratio of those
best times is the figure; the median of the rounds' own ratios (two runs a minute apart) is printed beside it.
The models' reports (held-out kNN accuracies, swap accuracy, reconstruction species/breed agreement, Fréchet
distance) are written beside the times.

    python -m benchmarks.bench_latents [--data ../shared/data/pets] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from analysis.training import new_store_with_models, train_store_mapper, train_store_vae
from benchmarks.common import SHARED_DATA, shown, timed, write_results
from indexer.pipeline import run_index

MAPPER_TARGET_S = 300
VAE_TARGET_S = 900
RATIO_TARGET = 1.3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "pets")
    ap.add_argument("--keep", type=Path, help="build the stores in this new folder and keep them (e.g. for "
                    "`python -m dashboard.screenshots KEEP/full`) instead of a temporary one")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the two index runs; each keeps its best")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        tmp = a.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        base = Path(tmp) / "trained"
        run_index([a.data], base, progress=False, sparsity=False)
        mapper, mapper_s = timed(train_store_mapper, base, progress=False)
        vae, vae_s = timed(train_store_vae, base, progress=False)

        # The same photos into fresh stores: the encoder alone without sparsity, and (a store that already has
        # both models) every space + sparsity per image.
        enc_only_s = full_s = float("inf")
        rounds: list[tuple[float, float]] = []
        for r in range(a.repeats):
            rep, s = timed(run_index, [a.data], Path(tmp) / f"encoder-only-{r}", progress=False, sparsity=False)
            s_enc = s
            if s < enc_only_s:
                rep_enc, enc_only_s = rep, s
            last = r == a.repeats - 1
            full = Path(tmp) / ("full" if last else f"full-{r}")  # --keep keeps the last (for screenshots)
            new_store_with_models(base, full)
            rep, s = timed(run_index, [a.data], full, progress=False, sparsity=True)
            rounds.append((s_enc, s))
            if s < full_s:
                rep_full, full_s = rep, s
            shutil.rmtree(Path(tmp) / f"encoder-only-{r}")  # two stores per round: drop them as we go
            if not last:
                shutil.rmtree(full)

    ratio = full_s / enc_only_s
    pair_ratios = sorted(f / e for e, f in rounds)
    median_pair = statistics.median(pair_ratios)
    print(f"train mapper (defaults)          : {mapper_s:7.1f} s  (target < {MAPPER_TARGET_S} s)")
    print(f"train VAE (defaults)             : {vae_s:7.1f} s  (target < {VAE_TARGET_S} s)")
    m, v = mapper["report"], vae["report"]
    print(f"mapper val kNN breed acc         : raw {m['val_knn_breed_acc_raw']:.3f}  z_id "
          f"{m['val_knn_breed_acc_z_id']:.3f}  z_attr {m['val_knn_breed_acc_z_attr']:.3f}  swap {m['swap_acc']:.3f}")
    print(f"VAE val reconstructions          : species {v['val_species_agreement']:.3f} "
          f"(majority {v['val_species_majority_rate']:.3f})  breed {v['val_breed_agreement']:.3f} "
          f"(majority {v['val_breed_majority_rate']:.3f})  FD {v['val_frechet_distance']:.3f}")
    print(f"index, encoder only, no sparsity : {enc_only_s:7.1f} s  ({rep_enc.added / enc_only_s:5.1f} img/s)")
    print(f"index, all spaces + sparsity     : {full_s:7.1f} s  ({rep_full.added / full_s:5.1f} img/s)")
    print(f"ratio all/encoder-only           : {ratio:7.3f}  (target <= {RATIO_TARGET}; best of {a.repeats} rounds)")
    print(f"median of the rounds' own ratios : {median_pair:7.3f}  (each round: "
          f"{', '.join(f'{r:.3f}' for r in pair_ratios)})")
    print(f"stages (all spaces)              : {rep_full.stages}")
    out = write_results("latents", {
        "data": shown(a.data), "images": rep_enc.added,
        "train_mapper_seconds": round(mapper_s, 1), "train_vae_seconds": round(vae_s, 1),
        "target_seconds": {"mapper": MAPPER_TARGET_S, "vae": VAE_TARGET_S},
        "mapper_report": mapper["report"], "vae_report": vae["report"],
        "index_encoder_only_seconds": round(enc_only_s, 2), "index_all_spaces_sparsity_seconds": round(full_s, 2),
        "ratio_all_over_encoder_only": round(ratio, 3), "target_ratio": RATIO_TARGET, "rounds": a.repeats,
        "estimator": "best round of each, rounds interleaved", "median_round_ratio": round(median_pair, 3),
        "rounds_seconds": [{"encoder_only": round(e, 2), "all_spaces_sparsity": round(f, 2)} for e, f in rounds],
        "stages_encoder_only": rep_enc.stages,
        "stages_all_spaces": rep_full.stages,
        "spaces": rep_full.spaces,
    })
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune the default model on a labelled task, then load the result back and predict.

    python examples/finetune.py TASK.csv [RUN_DIR] [FREEZE] [ROOT]

TASK.csv has a header `path,label[,split][,group]` (paths relative to the CSV's folder, or to
ROOT); rows without a split are divided into train / valid / test for you (stratified, seeded).
FREEZE is `full` (the default), `last-N` or `frozen`. On a laptop CPU a few hundred clips take a
few minutes. The benchmark tasks in `benchmarks/` use the project's dev set, for instance:

    python examples/finetune.py benchmarks/drums-class.csv runs/drums full ../shared/data/dev

The same run from the command line:
    musicssl finetune benchmarks/drums-class.csv -o runs/drums --root ../shared/data/dev --epochs 20
"""

from __future__ import annotations

import logging
import sys

import musicssl
from musicssl.evaluate.tasks import load_task
from musicssl.finetune import finetune, format_metrics


def main(task_csv: str, run: str = "runs/finetuned", freeze: str = "full", root: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # one line per epoch
    task = load_task(task_csv, root=root)
    result = finetune(task, out=run, freeze=freeze, epochs=20)  # model: the default, simclr-mini
    print(f"best validation {result.primary} at epoch {result.best_epoch} of {result.epochs}")
    print(format_metrics(result))

    # The run folder is a release: backbone + head, loaded strictly, no network needed.
    clf = musicssl.load(run)
    test = [task.paths[i] for i in task.indices("test")][:5]
    pred = clf.predict(test)  # any length and sample rate: decoded, resampled, windowed
    for path, label, scores in zip(test, pred.labels, pred.scores):
        print(f"{path.name}: {label} (p={float(scores.max()):.2f})")
    # It is still an encoder: the fine-tuned backbone's embeddings.
    print("clip embedding:", tuple(clf.embed(test[0]).clip.shape))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:5])

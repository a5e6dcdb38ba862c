"""What issue 42 tried on the photo detector, one change at a time, as measured: one record
per step, rendered into the lab report's photos section and into docs/results.md (between
its photo_steps markers; tests/test_docs.py checks they are equal).

These are measurements of one session, not something the lab recomputes: each costs up to a
CIFAR backbone's training. All on the same 500 held-out dogs-vs-cats photos (the lab's
`--photo_counts=500,250,250` split), threshold chosen on val by accuracy, on a 2-core AMD
EPYC (family 25 model 17, AVX512-BF16, no AMX), mixed_bfloat16, 2026-12-07, shared with
other work: CPU-minutes are user + sys of the training process.
"""
from __future__ import annotations

import dataclasses
import re

MEASURED = ("2026-12-07, 2-core AMD EPYC (family 25 model 17, AVX512-BF16, no AMX), "
            "mixed_bfloat16, shared machine")


@dataclasses.dataclass(frozen=True)
class PhotoStep:
    step: str
    accuracy: str  # at the val threshold / at 0.5
    roc_auc: str
    cpu_minutes: str  # of photo training (the CIFAR backbone is the lab's, paid once)
    verdict: str


PHOTO_STEPS = (
    PhotoStep("**the lab's photo detector** (`lab_photos`, `photos_from_cifar.flags`, 64 px, "
              'views `flip_shifts`)',
              '**0.926 / 0.928**',
              '**0.9804**',
              '10 (594 and 611 CPU-s for the same recipe at seeds 1 and 2)',
              'the baseline, kept'),
    PhotoStep('the photo recipe at 96 px (`--image_size=96`, data made at 128 px)',
              '0.906 / 0.920',
              '0.9767',
              '23.3',
              'does not pay: below the baseline on both, 2.3x the CPU'),
    PhotoStep('TTA at native aspect (`--tta_windows=3`, `native3_flip`; no training)',
              '0.932 / 0.930',
              '0.9798',
              '0 (scoring val + test 1.1 CPU-min, `flip` 0.46)',
              'does not pay: ROC-AUC flat (-0.0006 against `flip`), accuracy +0.2 to +1.2 '
              'points, inside one standard error on 500 photos (about 1.2 points); 2.3x the '
              'scoring cost'),
    PhotoStep('three seeds of the photo recipe averaged (`--seed=0,1,2`, scored as `predict` '
              'scores: mirror only)',
              '0.904 / 0.922',
              '0.9804',
              '30',
              'does not pay: the members score 0.9789 / 0.9790 / 0.9804 alone the same way, '
              'the average 0.9804'),
    PhotoStep('SimCLR backbone (`train --objective=simclr`, CIFAR-10 train + the 1,000 '
              'training photos, 1.5 epochs) instead of the supervised CIFAR-10 one, then the '
              'photo recipe without `--head_from`',
              '0.740 / 0.736',
              '0.829',
              '5.9 wall (stopped at 155 of 434 steps) + 16.4 of pretraining',
              'does not pay at this budget (the reference pretrains 1,000 epochs)'),
    PhotoStep('the photo recipe chosen by a sweep on val '
              '([sweeps.md](sweeps.md#the-photo-sweep-issue-41), on a shorter 132-step '
              'backbone)',
              '0.892 (both)',
              '0.9612 against 0.9611',
              "2x the recipe's",
              'does not pay'),
    PhotoStep('a wider, longer-trained backbone: airbench95 (`airbench95.flags`: widths '
              '128/384/384, 15 epochs; CIFAR-10 test 10-class 0.9134 with TTA) instead of '
              'airbench94, then the same photo recipe (zero-shot ROC-AUC 0.957 / accuracy '
              '0.880 against 0.942 / 0.854)',
              '0.924 / 0.932',
              '0.9828',
              '25.9 for the whole photos stage (data, zero-shot scoring, training, scoring, '
              'figures; its training 341 s wall against the baseline\'s 151 s) + the '
              'backbone: 135 CPU-min (4,378 s of training against airbench94\'s 1,317 s stage)',
              'does not pay: ROC-AUC +0.0024 and accuracy -0.2 / +0.4 points, inside one '
              'standard error on 500 photos; the zero-shot detector gains more (+0.015 '
              'ROC-AUC) than the fine-tuned one keeps'),
    PhotoStep('a backbone trained on CIFAR at 64 px',
              'not run',
              '',
              "the backbone: 4x the fast recipe's compute, about 1.7 h of this CPU idle (4 x "
              '25 min)',
              'not run: the session that had the time measured airbench95 instead, the other '
              'way to a backbone that sees more'),
    PhotoStep('a backbone from CIFAR-10 + CIFAR-100',
              'not run',
              '',
              '',
              'CIFAR-100 is not reachable here (no copy in `../shared`, no network); the '
              '`cifar100-python` source reads it where it is'),
)

HEADER = ("step", "held-out accuracy at the val threshold / at 0.5", "ROC-AUC",
          "photo training, CPU-min", "verdict")


def rows() -> list[list[str]]:
    return [[s.step, s.accuracy, s.roc_auc, s.cpu_minutes, s.verdict] for s in PHOTO_STEPS]


def markdown_table() -> str:
    """The table of docs/results.md (between its photo_steps markers)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines) + "\n"


def plain(text: str) -> str:
    """A cell without its markdown (links as their text, no code marks or emphasis), for
    the report's HTML, which escapes what it is given."""
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text).replace("**", "").replace("`", "")


REPORT_HEADER = ("step: verdict",) + HEADER[1:4]


def measured(step: PhotoStep) -> bool:
    return any(ch.isdigit() for ch in step.accuracy)


def report_rows() -> list[list[str]]:
    """The measured steps for the lab report (REPORT_HEADER: the verdict beside the step,
    every other cell a number)."""
    return [[plain(f"{s.step}: {s.verdict}"), plain(s.accuracy), plain(s.roc_auc),
             plain(s.cpu_minutes)] for s in PHOTO_STEPS if measured(s)]


def not_run() -> str:
    """The steps without a measurement, as one sentence."""
    return "; ".join(plain(f"{s.step} ({s.verdict})") for s in PHOTO_STEPS if not measured(s))

"""The seeds of every evaluation's data, named once.

Evaluation data is drawn from numpy generators seeded by `[BASE, STREAM, ...]`: a base keeps a
set of scenes apart from the others (the world's training data uses seeds 0..99), and a stream
tag keeps the draws of different measurements on one base apart.  Changing any value here
changes every figure measured with it.
"""

from __future__ import annotations

import numpy as np
import torch

# Held-out test scenes: builtin-quality's edits, generation prompts and autoencoder scenes, and
# the experiments' edit sets (at HELD_OUT_SEED + the run's --seed).
HELD_OUT_SEED = 10_000
# The edits `dds eval builtin-defaults` chooses the editing defaults on; never a test edit.
VALIDATION_SEED = 20_000
# `dds translate-eval`'s held-out scenes of each rule (generators [TRANSLATION_TEST_SEED, i]).
TRANSLATION_TEST_SEED = 20_000

# Stream tags under a base seed.
GENERATION_STREAM = 1  # [HELD_OUT_SEED, 1, n_objects]: generation prompts
VAE_STREAM = 2  # [HELD_OUT_SEED, 2]: autoencoder scenes
DERANGEMENT_STREAM = 7  # [run seed, 7]: the caption permutation of unaligned pairs
DEMO_STREAM = 77  # [demo seed, 77, kind]: `dds demo`'s scenes
SCENES_STREAM = 4242  # [run seed, 4242]: the captioned scenes of score-norms
NORMS_STREAM = 1  # seed_gen(run seed, 1, t, batch): score-norms' noise draws
COSINE_STREAM = 2  # seed_gen(run seed, 2, t, batch): score-cosine's noise draws


def seed_gen(*ints: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (independent streams per unit)."""
    s = np.random.SeedSequence([int(i) for i in ints]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(s) & ((1 << 63) - 1))

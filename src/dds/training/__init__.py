"""What the trainers share (`dds.training.toolkit`): a resumable CSV log, atomic sealed folder
exports and checkpoints with the damaged-checkpoint fallback, the learning-rate schedule and
the EMA of weights.  The trainers themselves are `dds.builtin.train` (the built-in model) and
`dds.translate.train` (the paper's Section 4 translation network)."""

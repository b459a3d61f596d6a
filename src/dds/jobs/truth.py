"""Metrics of an edit whose exact truth is known, with the evaluations' own metrics
(`dds.eval.metrics`).

- A world edit (a job from world:N, or a row with an `edit` column): every metric of
  `WORLD_METRICS` as `dds eval` computes it: success (the judge reads the edited attribute;
  `success_pos` also needs the object where the truth has it), PSNR to the truth and its gain
  over the source's, PSNR and SSIM to the source outside the edited region (the exact edit mask).
- A truth image alone (a `truth` column): PSNR to the truth and its gain, and PSNR and SSIM to
  the source outside the region where the truth differs from the source (by more than 2/255 in
  any channel, grown by 2 pixels as `dds.eval.metrics.outside` does).

Beside each output, the same metrics of the two floors (`TruthScorer.floors`): the source
itself (no edit) and its autoencoder round trip, decode(encode(source)).

Outputs are scored at the truth's size (the world's canvas, 64x64): an output at another
working size is resized to it first (Lanczos), and so is a source.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dds.errors import DDSError

TRUTH_ONLY_METRICS = ("psnr_gt", "psnr_gain", "psnr_out", "ssim_out")
DIFF_LEVEL = 2 / 255  # a pixel where truth and source differ by more is inside the edit


def _tensor(im: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL -> (1,3,H,W) in [0,1] at `size` (w, h)."""
    if im.size != size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)


class TruthScorer:
    """Scores outputs of jobs that carry their truth; the judge is loaded on first use."""

    def __init__(self):
        self._judge = None

    def judge(self):
        if self._judge is None:
            from dds.world import Judge

            self._judge = Judge.load()
        return self._judge

    def score(self, job, output: Image.Image, source: Image.Image) -> dict | None:
        """The metrics of one output (None when the job's truth is unknown).  `source`: the
        job's input image as loaded (before the working size)."""
        if job.edit is not None:
            return self._world(job, output)
        if job.truth is not None:
            return self._truth_image(job, output, source)
        return None

    def floors(self, job, source: Image.Image, round_trip: Image.Image) -> dict | None:
        """The two floors every edit-quality report shows, for one job whose truth is known:
        the same metrics for the source itself as the output ("no-edit") and for its
        autoencoder round trip ("round-trip"); None when the truth is unknown."""
        if job.edit is None and job.truth is None:
            return None
        return {"no-edit": self.score(job, source, source),
                "round-trip": self.score(job, round_trip, source)}

    def _world(self, job, output: Image.Image) -> dict:
        from dds.eval.metrics import WORLD_METRICS, score_outputs
        from dds.eval.world_edits import world_refs
        from dds.world import CANVAS, Edit

        refs = world_refs([Edit.from_dict(job.edit)], self.judge())
        x = _tensor(output, (CANVAS, CANVAS))
        return {k: float(v[0]) for k, v in score_outputs(x, refs, WORLD_METRICS).items()}

    def _truth_image(self, job, output: Image.Image, source: Image.Image) -> dict:
        from dds.eval.metrics import References, outside, score_outputs
        from dds.images import load_image

        try:
            truth_im = load_image(job.truth)
        except DDSError as e:
            return {"error": f"the truth image cannot be read: {e}"}
        size = truth_im.size
        truth, src, x = _tensor(truth_im, size), _tensor(source, size), _tensor(output, size)
        changed = ((truth - src).abs().amax(1) > DIFF_LEVEL).float()  # (1,H,W)
        keep = outside(changed)
        names = TRUTH_ONLY_METRICS if keep.sum() > 0 else TRUTH_ONLY_METRICS[:2]
        refs = References(source=src, truth=truth, outside=keep)
        return {k: float(v[0]) for k, v in score_outputs(x, refs, names).items()}

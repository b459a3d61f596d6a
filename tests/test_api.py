"""The library's front door in a fresh interpreter: `dds.edit` is the function every time."""

import json
import subprocess
import sys

SCRIPT = r"""
import json
import numpy as np
from PIL import Image
import dds

assert dds.EditConfig().steps > 0 and callable(dds.edit_latents)
rng = np.random.default_rng(0)
im = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
outs = [dds.edit(im, "a photo of noise", "a red circle", steps=2, size=32) for _ in range(2)]
print(json.dumps({
    "types": [type(o).__module__ + "." + type(o).__name__ for o in outs],
    "sizes": [list(o.size) for o in outs],
    "modes": [o.mode for o in outs],
    "same": bool(np.array_equal(np.asarray(outs[0]), np.asarray(outs[1]))),
}))
"""


def test_edit_twice_in_a_fresh_interpreter():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["types"] == ["PIL.Image.Image"] * 2
    assert got["sizes"] == [[32, 16]] * 2 and got["modes"] == ["RGB"] * 2
    assert got["same"], "two identical edits gave different pixels"

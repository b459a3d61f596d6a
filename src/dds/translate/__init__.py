"""Image-to-image translation: a one-pass editing network trained with DDS (paper Section 4).

    from dds.translate import translate
    edited = translate("runs/circle/model", ["in.png"], task="square")   # list of PIL images

Training: `dds translate-train` (`dds.translate.train`); evaluation on the built-in world:
`dds translate-eval` (`dds.translate.evaluate`).
"""

from __future__ import annotations

from dds.translate.network import Translator, translate

__all__ = ["Translator", "translate"]

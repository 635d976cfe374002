"""Test-time augmentation settings: ``--tta flip``, ``--tta flip,scales=0.75,1,1.25``.

Pure Python (the config checks it before Ray starts, and ``--help`` imports it); the device work
is :func:`raydeeplab.segmenter.augmented_probabilities`.
"""

from __future__ import annotations

import dataclasses

MIN_SCALE, MAX_SCALE = 0.25, 4.0


@dataclasses.dataclass(frozen=True)
class TestTimeAugmentation:
    """Views whose class probabilities are averaged before the argmax: each scale, and with
    ``flip`` each one mirrored left-right too (MMSegmentation's TTA: flip + multi-scale)."""

    __test__ = False  # not a pytest class, despite the name

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @property
    def passes(self) -> int:
        """Forward passes per image: the cost, in device time, of this setting."""
        return len(self.scales) * (2 if self.flip else 1)

    def sides(self, size: int) -> tuple[int, ...]:
        """The input side of each scale for a ``size``-pixel model: a multiple of 32, which
        DeepLabV3+'s stride-32 features need. Scales that meet at one side are refused: they
        would cost a pass and add nothing (0.75 and 1.25 of a 64 px model are both 64)."""
        sides = tuple(max(32, round(size * scale / 32) * 32) for scale in self.scales)
        if len(set(sides)) < len(sides):
            raise ValueError(
                f"--tta: scales {', '.join(map(str, self.scales))} give inputs of {', '.join(map(str, sides))} px "
                f"for this {size} px model (multiples of 32); pick scales further apart"
            )
        return sides

    @classmethod
    def parse(cls, text: str | None) -> TestTimeAugmentation:
        """``None``/``"none"`` -> no augmentation; ``"flip"``; ``"scales=0.75,1,1.25"``; both,
        comma-separated (``"flip,scales=0.75,1,1.25"``)."""
        if text is None or text.strip().lower() in ("", "none"):
            return cls()
        flip, scales = False, (1.0,)
        head, given, tail = text.partition("scales=")
        for word in filter(None, (w.strip() for w in head.split(","))):
            if word != "flip":
                raise ValueError(f"--tta: unknown view {word!r}; use flip and/or scales=0.75,1,1.25")
            flip = True
        if given:
            try:
                scales = tuple(float(s) for s in tail.split(",") if s.strip())
            except ValueError:
                raise ValueError(f"--tta: scales must be numbers, got {tail!r}") from None
            if not scales or not all(MIN_SCALE <= s <= MAX_SCALE for s in scales):
                raise ValueError(f"--tta: each scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {tail!r}")
        return cls(flip, scales)

"""Augmentations that detectron2 does not ship."""

from typing import Optional, Sequence

import numpy as np
from detectron2.data import transforms as T

__all__ = ["RandomChoice"]


class RandomChoice(T.Augmentation):
    """
    Apply one of several augmentations (each may be an :class:`AugmentationList`), drawn with the
    given probabilities. DETR's training recipe uses it to crop half of the images:
    ``RandomChoice([resize], [resize, crop, resize])``.
    """

    def __init__(
        self,
        augmentations: Sequence[Sequence[T.Augmentation]],
        probabilities: Optional[Sequence[float]] = None,
    ):
        """
        Args:
            augmentations: the choices; each a list of augmentations applied in order.
            probabilities: one per choice, summing to 1; default uniform.
        """
        super().__init__()
        if len(augmentations) == 0:
            raise ValueError("RandomChoice needs at least one choice, got []")
        if probabilities is None:
            probabilities = [1.0 / len(augmentations)] * len(augmentations)
        if len(probabilities) != len(augmentations) or abs(sum(probabilities) - 1.0) > 1e-6:
            raise ValueError(
                f"probabilities {list(probabilities)} must be one per choice "
                f"({len(augmentations)}) and sum to 1"
            )
        self.choices = [T.AugmentationList(list(choice)) for choice in augmentations]
        self.probabilities = [float(p) for p in probabilities]

    def __call__(self, aug_input) -> T.Transform:
        index = np.random.choice(len(self.choices), p=self.probabilities)
        return self.choices[index](aug_input)

    def __repr__(self) -> str:
        return f"RandomChoice(choices={self.choices}, probabilities={self.probabilities})"

    __str__ = __repr__

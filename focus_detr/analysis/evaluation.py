"""Box AP of a model on its config's test loader, optionally on the first images only."""

import copy
import inspect
import tempfile
from typing import Dict, List, Optional, Sequence

from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from torch import nn

__all__ = ["ImageSubsetEvaluator", "evaluate_box_ap", "first_items"]


def first_items(items: Sequence, count: int) -> List:
    """The first ``count`` items (a LazyCall target that limits a config's dataset)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return list(items)[:count]


class ImageSubsetEvaluator(DatasetEvaluator):
    """
    Delegates to ``evaluator`` and evaluates only the images it saw: a COCOEvaluator otherwise
    scores every image of the annotation file, and images without predictions count as misses.
    """

    def __init__(self, evaluator: DatasetEvaluator):
        if "img_ids" not in inspect.signature(evaluator.evaluate).parameters:
            raise ValueError(
                f"{type(evaluator).__name__}.evaluate takes no img_ids: it cannot be limited to "
                "the first images"
            )
        self.evaluator = evaluator
        self.image_ids: List = []

    def reset(self) -> None:
        self.image_ids = []
        self.evaluator.reset()

    def process(self, inputs, outputs) -> None:
        self.image_ids += [item["image_id"] for item in inputs]
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        return self.evaluator.evaluate(img_ids=self.image_ids)


def evaluate_box_ap(cfg, model: nn.Module, *, num_images: Optional[int] = None) -> Dict[str, float]:
    """
    ``inference_on_dataset`` of ``model`` on ``cfg.dataloader.test`` with
    ``cfg.dataloader.evaluator`` (e.g. detectron2's COCOEvaluator, its files written to a
    temporary folder), limited to the first ``num_images`` images when given.

    Returns:
        ``{"AP": ..., "AP50": ...}`` of the "bbox" results, in percent.

    Raises:
        ValueError: the config has no test loader or evaluator, or the results no bbox AP.
    """
    dataloader = getattr(cfg, "dataloader", None)
    if dataloader is None or "test" not in dataloader or "evaluator" not in dataloader:
        raise ValueError("AP needs the config's dataloader.test and dataloader.evaluator")
    cfg = copy.deepcopy(cfg)
    with tempfile.TemporaryDirectory(prefix="focus_detr_eval_") as output_dir:
        if "output_dir" in cfg.dataloader.evaluator:
            cfg.dataloader.evaluator.output_dir = output_dir
        # before the dataset node changes: the evaluator's dataset name may interpolate it
        evaluator = instantiate(cfg.dataloader.evaluator)
        if num_images is not None:
            test = cfg.dataloader.test
            test.dataset = L(first_items)(items=test.dataset, count=num_images)
            evaluator = ImageSubsetEvaluator(evaluator)
        results = inference_on_dataset(model, instantiate(cfg.dataloader.test), evaluator)
    boxes = (results or {}).get("bbox")
    if not boxes or "AP" not in boxes or "AP50" not in boxes:
        raise ValueError(f"the evaluator returned no bbox AP / AP50: {results}")
    return {"AP": float(boxes["AP"]), "AP50": float(boxes["AP50"])}

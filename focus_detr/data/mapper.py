"""detectron2's ``DatasetMapper`` with the image reader and box checks of focus_detr.data."""

import copy
import logging
from typing import Dict

import numpy as np
import torch
from detectron2.data import DatasetMapper as _D2DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.logger import log_first_n

from .boxes import valid_annotations
from .images import read_image

__all__ = ["DatasetMapper", "SampleLoadError"]


class SampleLoadError(RuntimeError):
    """A sample could not be loaded or mapped; the message names its file."""


class DatasetMapper(_D2DatasetMapper):
    """
    :class:`detectron2.data.DatasetMapper` (same arguments, same output) that

    * reads images with :func:`focus_detr.data.images.read_image` (16-bit and float images
      scaled, unsupported modes rejected naming the file and the mode);
    * drops annotations whose box is not a valid box (:mod:`focus_detr.data.boxes`) before the
      transforms, which would otherwise reorder a box of negative width into a valid one (the
      training preflight drops and counts them per dataset first; here one warning per process
      says that some were met);
    * raises every failure as :class:`SampleLoadError` naming the record's ``file_name``.

    Semantic segmentation files (``sem_seg_file_name``) are not read: the detectors of this
    package do not use them.
    """

    def __call__(self, dataset_dict: Dict) -> Dict:
        name = dataset_dict.get("file_name", "(no file_name)")
        try:
            return self._map(copy.deepcopy(dataset_dict))
        except SampleLoadError:
            raise
        except Exception as error:
            raise SampleLoadError(
                f"Failed to load image {name}: {type(error).__name__}: {error}"
            ) from error

    def _map(self, dataset_dict: Dict) -> Dict:
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        dataset_dict.pop("sem_seg_file_name", None)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            dataset_dict["annotations"] = self._valid(dataset_dict)
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    @staticmethod
    def _valid(dataset_dict: Dict) -> list:
        kept, reasons = valid_annotations(dataset_dict)
        if reasons:
            log_first_n(
                logging.WARNING,
                f"DatasetMapper drops boxes that are not valid boxes, e.g. in "
                f"{dataset_dict.get('file_name')}: {reasons[0]}",
                n=1,
                key="caller",
            )
        return kept

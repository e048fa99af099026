# COCO 2017 through detectron2's builtin registration ($DETECTRON2_DATASETS/coco) with the DETR
# training augmentation: flip, then with p = 0.5 each either a multi-scale resize (short side
# 480..800 step 32, max 1333) or resize 400/500/600 -> random crop 384..600 -> multi-scale resize.
# focus_detr's DatasetMapper is detectron2's with one image reader (16-bit and float images scaled,
# not clipped), boxes that are not boxes dropped, and the file named in every loading error.
from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from focus_detr.data import DatasetMapper
from focus_detr.data.transforms import RandomChoice

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(),
            L(RandomChoice)(
                augmentations=[
                    [
                        L(T.ResizeShortestEdge)(
                            short_edge_length=list(range(480, 801, 32)),
                            max_size=1333,
                            sample_style="choice",
                        ),
                    ],
                    [
                        L(T.ResizeShortestEdge)(
                            short_edge_length=[400, 500, 600], sample_style="choice"
                        ),
                        L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
                        L(T.ResizeShortestEdge)(
                            short_edge_length=list(range(480, 801, 32)),
                            max_size=1333,
                            sample_style="choice",
                        ),
                    ],
                ]
            ),
        ],
        image_format="RGB",
        use_instance_mask=False,
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="RGB",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}",
)

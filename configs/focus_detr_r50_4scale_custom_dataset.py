# Fine-tune Focus-DETR R50 on your own COCO-format dataset.
#
#   FOCUS_DETR_DATASET_ROOT=/data/my_dataset FOCUS_DETR_NUM_CLASSES=3 \
#   python train_net.py --config-file configs/focus_detr_r50_4scale_custom_dataset.py \
#       train.init_checkpoint=/path/to/focus_detr_r50_coco.pth
#
# expects $FOCUS_DETR_DATASET_ROOT/annotations/instances_{train,val}.json and the images in
# $FOCUS_DETR_DATASET_ROOT/{train,val}/. Starting from COCO weights, the class heads (80 classes)
# do not match and are skipped with a warning by the checkpointer: they start from scratch.
import os

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from .focus_detr_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

_ROOT = os.environ.get("FOCUS_DETR_DATASET_ROOT", "datasets/my_dataset")
for _split in ("train", "val"):
    if f"my_dataset_{_split}" not in DatasetCatalog.list():
        register_coco_instances(
            f"my_dataset_{_split}",
            {},
            os.path.join(_ROOT, "annotations", f"instances_{_split}.json"),
            os.path.join(_ROOT, _split),
        )

dataloader.train.dataset.names = "my_dataset_train"
dataloader.test.dataset.names = "my_dataset_val"
model.num_classes = int(os.environ.get("FOCUS_DETR_NUM_CLASSES", "1"))
train.output_dir = "./output/focus_detr_r50_custom_dataset"
train.max_iter = 20000
train.eval_period = 2000
train.checkpointer.period = 2000

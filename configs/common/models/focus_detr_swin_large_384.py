# Focus-DETR with a Swin-L backbone pretrained at 384x384 on ImageNet-22k (window 12): p1-p3
# (384/768/1536 channels) + one neck level, strides 8/16/32/64.
from .focus_detr_swin_tiny import model

model.backbone.pretrain_img_size = 384
model.backbone.embed_dim = 192
model.backbone.depths = (2, 2, 18, 2)
model.backbone.num_heads = (6, 12, 24, 48)
model.backbone.window_size = 12
model.backbone.drop_path_rate = 0.2

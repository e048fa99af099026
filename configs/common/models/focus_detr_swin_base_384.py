# Focus-DETR with a Swin-B backbone pretrained at 384x384 on ImageNet-22k (window 12): p1-p3
# (256/512/1024 channels) + one neck level, strides 8/16/32/64.
from .focus_detr_swin_tiny import model

model.backbone.pretrain_img_size = 384
model.backbone.embed_dim = 128
model.backbone.depths = (2, 2, 18, 2)
model.backbone.num_heads = (4, 8, 16, 32)
model.backbone.window_size = 12
model.backbone.drop_path_rate = 0.2

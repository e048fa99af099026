# The `train` dict read by train_net.py (focus_detr.engine): detectron2's common/train.py plus the
# DETR-specific gradient clipping, EMA and seed.
train = dict(
    output_dir="./output",
    # train_net.py stops before writing anything when output_dir holds checkpoints (model_*.pth,
    # last_checkpoint) and --resume is not given; True trains from scratch over them
    overwrite=False,
    init_checkpoint="",
    max_iter=90000,
    # True / False / "auto": on the CPU "auto" uses bfloat16 where the CPU runs it natively (AMX
    # or AVX512-BF16); on CUDA True and "auto" use bfloat16 from compute capability 8.0, float16
    # + grad scaler before (focus_detr.engine.precision)
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    device="cuda",  # falls back to the CPU (with a warning) when CUDA is not available
    seed=-1,  # >= 0: deterministic shuffling, denoising noise and augmentation
    clip_grad=dict(enabled=True, max_norm=0.1),
    # N > 0: skip up to N NaN/inf-loss steps in a row (no update), then stop; 0: stop at the first
    skip_nonfinite=dict(max_consecutive=0),
    ema=dict(enabled=False, decay=0.9998, warmup=2000),
)

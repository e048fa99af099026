# The `train` dict read by train_net.py (focus_detr.engine): detectron2's common/train.py plus the
# DETR-specific gradient clipping, EMA and seed.
train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=90000,
    # True / False / "auto": "auto" uses bfloat16 autocast where the device runs it natively (a CPU
    # with bfloat16 instructions, within ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA; a GPU of compute
    # capability 8.0 or newer), float16 + grad scaler on older GPUs with tensor cores
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

#!/usr/bin/env python3
"""
Train or evaluate a focus-detr LazyConfig: detectron2's ``tools/lazyconfig_train_net.py`` with
what DETR training needs (focus_detr.engine): gradient clipping, mixed precision on CPU and CUDA
(``train.amp.enabled=True/False/"auto"``), an EMA of the weights, a policy for NaN losses,
checks of the inputs before anything is built, atomic checkpoints, and a seeded data stream
that a resumed run continues exactly.

    python train_net.py --config-file configs/focus_detr_demo_shapes.py
    python train_net.py --config-file configs/focus_detr_r50_4scale_12ep.py --num-gpus 8
    python train_net.py --config-file ... --eval-only train.init_checkpoint=model_final.pth
    python train_net.py --config-file ... --resume

The ``train`` keys it reads are those of configs/common/train.py. Before it writes anything into
``train.output_dir`` it checks that nothing of an earlier run is lost and that the weights fit
(focus_detr.engine.run_checks): a folder with checkpoints needs ``--resume`` (or
``train.overwrite=True``), ``--eval-only`` needs ``train.init_checkpoint`` (or
``--random-weights``). Command-line overrides must name existing keys (``+key=value`` adds one).
SIGINT and SIGTERM stop training after the current step with a checkpoint to resume from.
"""

import logging
import sys
from collections import OrderedDict

import torch.multiprocessing
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks, launch
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf

from focus_detr.data import build_resumable_train_loader
from focus_detr.engine import (
    BoundedHistoryHook,
    DETRTrainer,
    FileNamingModel,
    IterationSeedHook,
    ModelEMA,
    NonFiniteLossError,
    SafeCheckpointer,
    StopOnSignalHook,
    TrainingInterrupted,
    amp_from_config,
    apply_overrides,
    build_model,
    check_eval_weights,
    check_output_dir,
    check_run_dir,
    forward_stop_signals_to_children,
    ignore_stop_signals_in_workers,
    keep_run_config,
    load_for_eval,
    on_main_process,
    resume_advice,
    run_preflight,
    wrap_ddp,
)

logger = logging.getLogger("detectron2")

_CHECK = object()  # do_train's resume_from default: check the output folder itself


def _option(cfg, key: str, default):
    """``cfg.train.<key>``, or ``default`` for configs without it."""
    return OmegaConf.select(cfg, f"train.{key}", default=default)


def do_test(cfg, model) -> OrderedDict:
    """
    Run ``cfg.dataloader.evaluator`` on ``cfg.dataloader.test``; prints the COCO table. A
    failure of the model names the images of the batch.
    """
    if "evaluator" not in cfg.dataloader:
        return OrderedDict()
    results = inference_on_dataset(
        FileNamingModel(model),
        ignore_stop_signals_in_workers(instantiate(cfg.dataloader.test)),
        instantiate(cfg.dataloader.evaluator),
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(cfg, *, resume: bool = False, resume_from=_CHECK) -> OrderedDict:
    """
    Train ``cfg.model`` as the config says; returns the last evaluation's results. With
    ``resume`` the newest intact checkpoint of ``cfg.train.output_dir`` is loaded with the
    iteration, optimizer, LR schedule, grad scaler, EMA and run seed, and training continues with
    the batches and randomness an uninterrupted run would have had; a run that is complete is
    evaluated only. ``resume_from``: the checkpoint :func:`check_run_dir` chose (None: start
    from scratch); by default it is chosen here.
    """
    if resume_from is _CHECK:
        resume_from = on_main_process(lambda: check_run_dir(cfg, resume=resume))
    train_dataset = run_preflight(cfg, check_output=comm.is_main_process())
    model = build_model(cfg)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    ema = None
    if _option(cfg, "ema.enabled", False):
        ema = ModelEMA(
            model, decay=_option(cfg, "ema.decay", 0.9998), warmup=_option(cfg, "ema.warmup", 2000)
        )
    amp = amp_from_config(cfg, next(model.parameters()).device)
    clip = _option(cfg, "clip_grad.max_norm", 0.1) if _option(cfg, "clip_grad.enabled", True) else 0
    trainer = DETRTrainer(
        wrap_ddp(model, **cfg.train.ddp),
        None,  # built below, once the start iteration is known
        optimizer,
        clip_grad_max_norm=clip,
        amp=amp.enabled,
        amp_dtype=amp.dtype,
        ema=ema,
        max_consecutive_nonfinite=_option(cfg, "skip_nonfinite.max_consecutive", 0),
    )
    extra = {"ema": ema} if ema is not None else {}
    checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trainer=trainer, **extra)
    results = OrderedDict()

    def evaluate() -> OrderedDict:
        results.clear()
        results.update(do_test(cfg, ema.module if ema is not None else model))
        return results

    main = comm.is_main_process()
    trainer.register_hooks(
        [
            IterationSeedHook(),  # first: every hook's before_step draws from the step's stream
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main
                else None
            ),
            BoundedHistoryHook(),  # after the writers read the step's scalars
            StopOnSignalHook(checkpointer),  # last: saves after every other hook's step
        ]
    )
    seed = _option(cfg, "seed", -1)
    # one run seed for all processes; a resumed run takes the one of its checkpoint
    trainer.seed = seed if seed is not None and seed >= 0 else comm.shared_random_seed()
    if resume_from:
        checkpointer.load(resume_from)  # weights and every checkpointable
        start_iter = trainer.iter + 1
    else:
        checkpointer.load(cfg.train.init_checkpoint, checkpointables=[])
        start_iter = 0
    if ema is not None and ema.updates == 0:
        ema.copy_from(model)  # start the average from the loaded weights
    if start_iter >= cfg.train.max_iter:
        logger.info(
            f"{resume_from} is of iteration {start_iter - 1}: the run of train.max_iter="
            f"{cfg.train.max_iter} iterations is complete and nothing is trained (raise "
            f"train.max_iter to train longer). Evaluating its weights"
        )
        return evaluate()
    trainer.data_loader = ignore_stop_signals_in_workers(
        build_resumable_train_loader(
            cfg.dataloader.train, start_iter=start_iter, seed=trainer.seed, dataset=train_dataset
        )
    )
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except NonFiniteLossError as error:
        if not main:
            raise
        raise NonFiniteLossError(f"{error}. {resume_advice(checkpointer)}", error.iteration)
    return results


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = apply_overrides(cfg, args.opts)  # unknown keys are errors
    random_weights = getattr(args, "random_weights", False)
    if random_weights and not args.eval_only:
        raise ValueError("--random-weights is an option of --eval-only (training starts from them)")
    # Before default_setup writes its log and config.yaml into train.output_dir: nothing of an
    # earlier run is overwritten, and the weights to load fit the model.
    if args.eval_only:
        on_main_process(lambda: check_eval_weights(cfg, random_weights=random_weights))
    else:
        if comm.is_main_process():
            check_output_dir(cfg.train.output_dir)
        resume_from = on_main_process(lambda: check_run_dir(cfg, resume=args.resume))
    if args.eval_only and comm.is_main_process():
        with keep_run_config(cfg.train.output_dir):  # a training run's config.yaml stays
            default_setup(cfg, args)
    else:
        default_setup(cfg, args)
    # focus_detr's own messages (dataset generation, extension fallback) in the same log
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="focus_detr")
    if args.eval_only:
        model = build_model(cfg)
        if not random_weights:
            load_for_eval(cfg, model)
        return do_test(cfg, wrap_ddp(model))
    try:
        return do_train(cfg, resume=args.resume, resume_from=resume_from)
    except TrainingInterrupted as stop:
        if comm.is_main_process():
            logger.warning(str(stop))
        sys.exit(stop.exit_code)


def build_parser():
    """detectron2's ``default_argument_parser`` with ``--random-weights``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="with --eval-only: evaluate the model's initial weights (no checkpoint)",
    )
    return parser


def invoke_main() -> None:
    args = build_parser().parse_args()
    if args.num_gpus * args.num_machines > 1:
        # this process only waits for the training processes: signals go on to them
        forward_stop_signals_to_children()
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except torch.multiprocessing.ProcessExitedException as error:
        if error.exit_code is None or error.exit_code <= 128:
            raise
        sys.exit(error.exit_code)  # stopped by a signal: the processes said how to resume


if __name__ == "__main__":
    invoke_main()
